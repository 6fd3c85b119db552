"""COCO instances (+ a results file) -> Label Studio tasks, to review model outputs.

Frames: COCO geometry is in **original pixels** (``bbox`` ``[x, y, width, height]``,
polygons and RLE at the image's size); Label Studio results are written in **percent**
of the original size (rectangles, polygons) or as brush RLE at original resolution.

Each COCO annotation becomes one Label Studio region: ``rectanglelabels`` when it has no
segmentation, ``brushlabels`` for RLE masks, ``polygonlabels`` (one region per polygon)
or ``brushlabels`` (``polygons_as="brush"``) for polygons; ``also_boxes`` adds the box of
segmented annotations as a rectangle too. Crowd annotations (``iscrowd: 1``) are left out
unless ``include_crowd``. Region ids are ``coco-<annotation id>`` and ``det-<index>``.

Where things go: with a results file, instances become ``annotations`` (the reference)
and results become ``predictions`` (with ``score``); without one, instances become
``predictions`` (``instances_as`` overrides this).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import numpy as np

from nextchat_core import frames
from nextchat_core.masks import coco_segmentation_to_mask

from ..config import LabelConfig, parse_label_config
from ..results import (
    RegionKind,
    brush_result,
    polygon_result,
    prediction_score,
    rectangle_result,
)
from .common import CocoLike, ResultsLike, is_box_only, load_instances, load_results

logger = logging.getLogger(__name__)

InstancesAs = Literal["auto", "annotations", "predictions"]
PolygonsAs = Literal["polygon", "brush"]

DEFAULT_IMAGE_PREFIX = "/data/local-files/?d="


def import_coco(
    instances: CocoLike,
    results: ResultsLike | None = None,
    *,
    image_prefix: str = DEFAULT_IMAGE_PREFIX,
    label_config: str | LabelConfig | None = None,
    instances_as: InstancesAs = "auto",
    polygons_as: PolygonsAs = "polygon",
    also_boxes: bool = False,
    include_crowd: bool = False,
    min_score: float = 0.0,
    model_version: str = "coco-import",
) -> list[dict[str, Any]]:
    """COCO instances (and optionally a results list) -> Label Studio tasks (import JSON).

    Each image becomes ``{"data": {<image key>: image_prefix + file_name}, ...}``; the
    image key and control names come from ``label_config`` when given (its first
    ``Image`` and the first rectangle / brush / polygon controls), else ``image``,
    ``label``, ``brush``, ``polygon`` as in :func:`label_config_for`. Detections below
    ``min_score`` are dropped.
    """
    if instances_as not in ("auto", "annotations", "predictions"):
        raise ValueError(
            f"instances_as must be 'auto', 'annotations' or 'predictions', got {instances_as!r}"
        )
    if polygons_as not in ("polygon", "brush"):
        raise ValueError(f"polygons_as must be 'polygon' or 'brush', got {polygons_as!r}")
    gt = load_instances(instances)
    dets = load_results(results, gt) if results is not None else None
    config = parse_label_config(label_config) if isinstance(label_config, str) else label_config
    names = _ControlNames.from_config(config)
    if polygons_as == "polygon" and names.polygon is None and names.brush is not None:
        logger.info("the label config has no polygon control: importing polygons as brushes")
        polygons_as = "brush"
    categories = {c["id"]: c["name"] for c in gt["categories"]}
    if config is not None:
        unknown = sorted(set(categories.values()) - set(config.categories))
        if unknown:
            raise ValueError(
                f"COCO categories {unknown} are not labels of the label config "
                f"{config.categories}; add them to the config"
            )
    if instances_as == "auto":
        instances_as = "annotations" if dets is not None else "predictions"

    gt_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in gt["annotations"]:
        gt_by_image[ann["image_id"]].append(ann)
    det_by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, det in enumerate(dets or []):
        if float(det["score"]) >= min_score:
            det_by_image[det["image_id"]].append((i, det))

    tasks = []
    skipped_crowd = 0
    for image in gt["images"]:
        width, height = int(image["width"]), int(image["height"])
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(f"image {image['id']} has no file_name")
        converted: list[list[dict[str, Any]]] = []
        for ann in gt_by_image[image["id"]]:
            if ann.get("iscrowd") and not include_crowd:
                skipped_crowd += 1
                continue
            converted.append(
                _results_for(
                    ann,
                    f"coco-{ann.get('id', len(converted))}",
                    categories,
                    names,
                    width=width,
                    height=height,
                    polygons_as=polygons_as,
                    also_boxes=also_boxes,
                )
            )
        task: dict[str, Any] = {"data": {names.image_key: image_prefix + file_name}}
        gt_results = [r for rs in converted for r in rs]
        if instances_as == "annotations":
            # An image of the ground truth without instances is an image with no objects:
            # an annotation with an empty result (exports keep it; "not annotated" drops).
            task["annotations"] = [{"result": gt_results}]
            preds = [
                _results_for(
                    det,
                    f"det-{i}",
                    categories,
                    names,
                    width=width,
                    height=height,
                    polygons_as=polygons_as,
                    also_boxes=also_boxes,
                )
                for i, det in det_by_image[image["id"]]
            ]
            pred_results = [r for rs in preds for r in rs]
        else:
            pred_results = gt_results
        if pred_results or instances_as == "predictions":
            prediction: dict[str, Any] = {"model_version": model_version, "result": pred_results}
            scores = [r["score"] for r in pred_results if "score" in r]
            if scores:  # every imported detection is shown: the least certain one
                prediction["score"] = prediction_score(scores)
            task["predictions"] = [prediction] if pred_results else []
        tasks.append(task)
    if skipped_crowd:
        logger.info("left out %d crowd annotations (include_crowd=True keeps them)", skipped_crowd)
    logger.info("COCO import: %d tasks", len(tasks))
    return tasks


def label_config_for(
    categories: list[str],
    *,
    rectangles: bool = True,
    brushes: bool = True,
    polygons: bool = True,
    image_key: str = "image",
) -> str:
    """A Label Studio label config (XML) whose controls match :func:`import_coco`'s default
    names: ``Image name="image"``, ``RectangleLabels name="label"``, ``BrushLabels
    name="brush"``, ``PolygonLabels name="polygon"``, labels in the given order."""
    labels = "".join(f"\n    <Label value={quoteattr(c)}/>" for c in categories)
    parts = [f'<View>\n  <Image name="image" value="${image_key}"/>']
    for enabled, tag, name in (
        (rectangles, "RectangleLabels", "label"),
        (brushes, "BrushLabels", "brush"),
        (polygons, "PolygonLabels", "polygon"),
    ):
        if enabled:
            parts.append(f'  <{tag} name="{name}" toName="image">{labels}\n  </{tag}>')
    parts.append("</View>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _ControlNames:
    """Where results go: the task data key of the image and the control tag names
    (``None`` where a given label config has no such control)."""

    image_key: str
    to_name: str
    rectangle: str | None
    brush: str | None
    polygon: str | None

    @classmethod
    def from_config(cls, config: LabelConfig | None) -> _ControlNames:
        if config is None:
            return cls("image", "image", "label", "brush", "polygon")
        image_name = next(iter(config.images))
        kinds: tuple[RegionKind, ...] = ("rectangle", "brush", "polygon")
        found = {k: config.control_for(k) for k in kinds}
        return cls(
            image_key=config.images[image_name],
            to_name=image_name,
            rectangle=found["rectangle"].name if found["rectangle"] else None,
            brush=found["brush"].name if found["brush"] else None,
            polygon=found["polygon"].name if found["polygon"] else None,
        )

    def need(self, kind: RegionKind) -> str:
        name = getattr(self, kind)
        if name is None:
            tag = {
                "rectangle": "RectangleLabels",
                "brush": "BrushLabels",
                "polygon": "PolygonLabels",
            }
            raise ValueError(
                f"the label config has no {tag[kind]} (or Labels) control for the {kind} "
                "regions this COCO file needs; add one, or import without a label config"
            )
        return str(name)


def _results_for(
    ann: dict[str, Any],
    region_id: str,
    categories: dict[Any, str],
    names: _ControlNames,
    *,
    width: int,
    height: int,
    polygons_as: PolygonsAs,
    also_boxes: bool,
) -> list[dict[str, Any]]:
    """Label Studio results for one COCO annotation or detection (original pixels in)."""
    labels = [categories[ann["category_id"]]]
    score = ann.get("score")
    segm = ann.get("segmentation")
    if is_box_only(ann):
        segm = None  # a box-only annotation (labelstudio.coco.common.box_outline)
    where = f"annotation {ann.get('id', region_id)} of image {ann['image_id']}"
    out = []
    if segm:
        try:
            if isinstance(segm, list) and polygons_as == "polygon":
                coco_segmentation_to_mask(segm, width, height)  # validates the polygons
                for k, flat in enumerate(segm):
                    pts = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
                    rid = region_id if len(segm) == 1 else f"{region_id}-{k}"
                    out.append(
                        polygon_result(
                            pts,
                            labels,
                            width=width,
                            height=height,
                            from_name=names.need("polygon"),
                            to_name=names.to_name,
                            region_id=rid,
                            score=score,
                        )
                    )
            else:
                mask = coco_segmentation_to_mask(segm, width, height)
                out.append(
                    brush_result(
                        mask,
                        labels,
                        from_name=names.need("brush"),
                        to_name=names.to_name,
                        region_id=region_id,
                        score=score,
                    )
                )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: bad segmentation: {exc}") from exc
    if not segm or also_boxes:
        bbox = ann.get("bbox")
        if bbox is None:
            raise ValueError(f"{where}: has neither a segmentation nor a bbox")
        box = frames.clip_boxes(frames.xywh_to_xyxy(bbox), width, height)
        rid = region_id if not segm else f"{region_id}-box"
        out.append(
            rectangle_result(
                box,
                labels,
                width=width,
                height=height,
                from_name=names.need("rectangle"),
                to_name=names.to_name,
                region_id=rid,
                score=score,
            )
        )
    return out
