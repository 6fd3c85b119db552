"""Model answers -> Label Studio results, through ``labelstudio.results`` builders.

Frames: detections arrive in original pixels of the EXIF-transposed image (the
predictor's frame); the builders convert to Label Studio percent via
``nextchat_core.frames``. Nothing here does coordinate arithmetic.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from labelstudio.results import (
    Region,
    brush_result,
    polygon_result,
    prediction_score,
    rectangle_result,
)
from nextchat_core import frames
from nextchat_core.masks import mask_to_polygons, polygon_area, simplify_polygon
from nextchat_core.predictor import Answer, Detection

from .label_config import LabelPlan

# Polygons: parts of a mask smaller than this fraction of its largest part are dropped.
MIN_PART = 0.05


@dataclass
class LabeledDetection:
    """A detection with the prompt that produced it and the label it was asked for
    (``None`` for a free-typed prompt: matched per control by ``LabelPlan.label_for``)."""

    detection: Detection
    prompt: str
    label: str | None = None


def new_region_id() -> str:
    """A fresh Label Studio region id (10 URL-safe characters, like the editor's)."""
    return uuid.uuid4().hex[:10]


def deduplicate(
    items: list[LabeledDetection], plan: LabelPlan, *, iou: float, cross_label_iou: float = 1.0
) -> list[LabeledDetection]:
    """Drop a detection whose box overlaps a higher-scored kept one of the same label by
    more than ``iou`` (several prompts of one label, e.g. ``predicted_values="car,auto"``,
    find the same object), or of another label by more than ``cross_label_iou`` (two
    labels' prompts find one object - "circle" and "hexagon" on a hexagon: the label the
    model is surer of is kept). Order of the kept ones: by descending score."""
    if (iou >= 1.0 and cross_label_iou >= 1.0) or not plan.region_controls:
        return items
    control = plan.region_controls[0]
    kept: list[tuple[str, LabeledDetection]] = []
    for item in sorted(items, key=lambda d: -d.detection.score):
        label = plan.label_for(item.prompt, control, item.label)
        if any(
            frames.box_iou(item.detection.box, other.detection.box)
            > (iou if lab == label else cross_label_iou)
            for lab, other in kept
        ):
            continue
        kept.append((label, item))
    return [item for _, item in kept]


def task_score(answers: list[Answer], shown: list[Detection], score_threshold: float) -> float:
    """The prediction's score (:func:`labelstudio.results.prediction_score` of its
    decisions). Each box the model found is a decision - shown (confidence: its score) or
    held back by the presence gate or ``score_threshold`` (confidence it is not there:
    1 - score); a grounding prompt with no box at all is the decision "absent" (1 - its
    presence, when measured). Boxes dropped as duplicates or as regions already on the task
    decide nothing."""
    on = {id(d) for d in shown}
    decisions: list[float] = []
    for answer in answers:
        if not answer.detections and not answer.rejected and answer.presence is not None:
            decisions.append(1.0 - answer.presence)
        decisions += [1.0 - d.score for d in answer.rejected]
        for det in answer.detections:
            if id(det) in on:
                decisions.append(det.score)
            elif det.score < score_threshold:
                decisions.append(1.0 - det.score)
    return prediction_score(decisions)


# A detection is the object of an existing region of its label above this box IoU: lower
# than DEDUP_IOU because the annotator may have corrected the box they accepted, and two
# objects of one label seldom overlap this much.
EXISTING_IOU = 0.5


def drop_existing(
    items: list[LabeledDetection],
    existing: list[Region],
    plan: LabelPlan,
    *,
    iou: float = EXISTING_IOU,
) -> list[LabeledDetection]:
    """Drop a detection whose box overlaps a region the annotation already holds (same
    label, box IoU above ``iou``): asking a prompt again adds only what is new."""
    if not plan.region_controls or not existing:
        return items
    control = plan.region_controls[0]
    return [
        item
        for item in items
        if not any(
            plan.label_for(item.prompt, control, item.label) in region.labels
            and frames.box_iou(item.detection.box, region.box_xyxy) > iou
            for region in existing
        )
    ]


def detection_results(
    item: LabeledDetection,
    plan: LabelPlan,
    *,
    width: int,
    height: int,
    polygon_tolerance: float,
) -> list[dict[str, Any]]:
    """One region per region control of the config for one detection: a rectangle, a
    brush mask and polygons, one per connected part of the mask of at least ``MIN_PART``
    of its largest part, all with the detection's score (one object, one confidence:
    ``nextchat_core.predictor``). Without a mask (SAM's IoU below the threshold) the brush
    is left out and the polygon is the box outline."""
    det = item.detection
    out: list[dict[str, Any]] = []
    # Every region carries the prompt that found it (region meta); the mask and polygons
    # point at the rectangle of the same detection (parentID): one object, counted once
    # by exports and retraining (labelstudio.results.pair_objects).
    parent: str | None = None
    if plan.rectangles is not None:
        label = plan.label_for(item.prompt, plan.rectangles, item.label)
        parent = new_region_id()
        out.append(
            rectangle_result(
                det.box,
                [label],
                width=width,
                height=height,
                from_name=plan.rectangles.name,
                to_name=plan.image,
                region_id=parent,
                score=det.score,
                prompt=item.prompt,
            )
        )
    has_mask = det.mask is not None and bool(det.mask.any())
    if plan.brushes is not None and has_mask:
        assert det.mask is not None
        label = plan.label_for(item.prompt, plan.brushes, item.label)
        out.append(
            brush_result(
                det.mask,
                [label],
                from_name=plan.brushes.name,
                to_name=plan.image,
                region_id=new_region_id(),
                score=det.score,
                prompt=item.prompt,
                parent_id=parent,
            )
        )
    if plan.polygons is not None:
        label = plan.label_for(item.prompt, plan.polygons, item.label)
        if has_mask:
            assert det.mask is not None
            traced = mask_to_polygons(det.mask)
            areas = [polygon_area(p) for p in traced]
            # SAM masks carry specks: a part under MIN_PART of the largest is noise to an
            # annotator, not an object part.
            keep = [p for p, a in zip(traced, areas, strict=True) if a >= MIN_PART * max(areas)]
            polygons = [simplify_polygon(p, polygon_tolerance) for p in keep]
        else:
            x1, y1, x2, y2 = (float(v) for v in det.box)
            polygons = [np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])]
        for points in polygons:
            out.append(
                polygon_result(
                    points,
                    [label],
                    width=width,
                    height=height,
                    from_name=plan.polygons.name,
                    to_name=plan.image,
                    region_id=new_region_id(),
                    score=det.score,
                    prompt=item.prompt,
                    parent_id=parent,
                )
            )
    return out


def answer_text(text: str, box_token: str) -> str:
    """The model's answer for a TextArea: each ``<at> <boxes>`` pair becomes ``[k]``
    (k = 1, 2, ... in the order of the answer's detections); spacing tidied."""
    counter = iter(range(1, 10_000))
    out = re.sub(re.escape(box_token), lambda _: f"[{next(counter)}]", text)
    out = re.sub(r"\s+([.,;:!?])", r"\1", out)
    return re.sub(r"\s{2,}", " ", out).strip()
