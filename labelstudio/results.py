"""Label Studio JSON <-> typed regions in original pixels: the one parser and builder.

Two directions, one function each:

* **parse**: a task (``{"data", "annotations", "predictions"}``) or one annotation's /
  prediction's ``result`` list -> :class:`Region` objects whose geometry is in **original
  pixels** (the EXIF-transposed image, as Label Studio shows it). Label configs are
  :mod:`labelstudio.config`'s; image locating and fetching :mod:`labelstudio.images`'s.
* **build**: pixel-frame geometry -> Label Studio result dicts in **percent**
  (``rectanglelabels``, ``polygonlabels``, ``brushlabels`` with Label Studio brush RLE,
  ``textarea``), ready for ``{"result": [...], "score", "model_version"}``.

Every coordinate conversion goes through :mod:`nextchat_core.frames`. Bad input raises
:class:`LabelStudioFormatError` (a ``ValueError``) naming the task id, the region id and
what was expected; callers that want to keep going pass an ``errors`` list instead.

Result types: ``rectangle[labels]``, ``polygon[labels]`` and ``brush[labels]`` become
regions (a ``labels`` result with the geometry in its value, as the generic ``<Labels>``
tag writes it, too); a ``labels`` result without geometry adds its labels to the region
with the same ``id``; ``textarea`` gives the prompt (per region when it shares the
region's ``id``, else for the whole annotation). Classification-only types (choices,
rating, relations, ...) and click-refinement points (``keypointlabels``: SAM prompts) carry
no region and are skipped; other region types (ellipses, bare keypoints, video, text spans)
and unknown types are errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import numpy as np

from nextchat_core import frames
from nextchat_core.masks import mask_to_box, polygon_to_mask

from .config import CLICK_PROMPT_TAGS, LabelConfig, RegionKind

logger = logging.getLogger(__name__)

RegionSource = Literal["annotation", "prediction"]
TaskSource = Literal["annotations", "predictions", "both"]

# Result "type" -> region kind. "labels" is resolved from its value's keys.
_KIND_OF_TYPE: dict[str, RegionKind] = {
    "rectanglelabels": "rectangle",
    "rectangle": "rectangle",
    "polygonlabels": "polygon",
    "polygon": "polygon",
    "brushlabels": "brush",
    "brush": "brush",
}
# Result types that describe no image region (whole-task classification, relations).
_NON_REGION_TYPES = frozenset(
    {"choices", "taxonomy", "rating", "number", "datetime", "pairwise", "ranker", "relation"}
)
# Region types Label Studio knows that cannot become a box / polygon / mask instance.
_UNSUPPORTED_REGION_TYPES = frozenset(
    {
        "ellipselabels",
        "ellipse",
        "keypoint",
        "videorectangle",
        "timelinelabels",
        "hypertextlabels",
        "paragraphlabels",
        "timeserieslabels",
        "bitmasklabels",
        "bitmask",
        "magicwand",
        "vector",
        "vectorlabels",
    }
)
_SUPPORTED = "rectangle[labels], polygon[labels], brush[labels], labels, textarea"


class LabelStudioFormatError(ValueError):
    """Bad Label Studio JSON, located by task id and region id (``None`` when unknown)."""

    def __init__(self, message: str, *, task_id: Any = None, region_id: Any = None) -> None:
        self.task_id = task_id
        self.region_id = region_id
        self.detail = message
        where = f"task {task_id}" if task_id is not None else "task (no id)"
        if region_id is not None:
            where += f", region {region_id}"
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------------------- regions


@dataclass
class Region:
    """One labeled image region, geometry in original pixels.

    ``box_xyxy`` is the tight extent: for rectangles their (rotated) corners, for polygons
    their points, for brushes the mask's pixel-edge box. ``polygon`` holds polygon points,
    or the 4 corners of a rotated rectangle (clockwise from its own top-left corner);
    ``mask`` the brush pixels. ``width``/``height`` are the original (EXIF-transposed)
    image size the geometry refers to.
    """

    task_id: Any  # the task's "id" (None in files without ids)
    region_id: str  # the result's "id" ("result[i]" when the result has none)
    from_name: str  # control tag name, e.g. "label"
    to_name: str  # object tag name, e.g. "image"
    labels: list[str]  # in the order Label Studio stored them; usually one
    kind: RegionKind
    box_xyxy: np.ndarray  # (4,) float64, original pixels
    width: int  # original image width, pixels
    height: int  # original image height, pixels
    mask: np.ndarray | None = None  # HxW bool, brush regions only
    polygon: np.ndarray | None = None  # Nx2 float64 original pixels (polygons, rotated rects)
    rotation: float = 0.0  # rectangles: degrees clockwise about the top-left corner
    score: float | None = None  # predictions: the result's score, else the prediction's
    # The region's prompt: its meta text (written by the backend), else its per-region
    # TextArea, else its annotation's prompt TextArea when that holds a single prompt.
    prompt: str | None = None
    parent_id: str | None = None  # "parentID": the region it belongs to (box of a mask)
    # A rectangle's masks / polygons of the same object, after :func:`pair_objects`.
    shapes: list[Region] = field(default_factory=list)
    source: RegionSource = "annotation"
    result_set_id: Any = None  # id of the annotation / prediction holding the result
    model_version: str | None = None  # predictions only

    @property
    def label(self) -> str | None:
        """The first label (the category for single-label configs), ``None`` if unlabeled."""
        return self.labels[0] if self.labels else None

    def to_mask(self) -> np.ndarray:
        """The region as a binary ``HxW`` mask at original resolution (rectangles and
        polygons rasterized by pycocotools; brushes as stored; a rectangle paired with its
        shapes: their union)."""
        if self.shapes:
            union = self.shapes[0].to_mask().copy()
            for shape in self.shapes[1:]:
                union |= shape.to_mask()
            return union
        if self.mask is not None:
            return self.mask
        if self.polygon is not None:
            return polygon_to_mask(self.polygon, self.width, self.height)
        x1, y1, x2, y2 = self.box_xyxy
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
        return polygon_to_mask(corners, self.width, self.height)


# --------------------------------------------------------------------------- parsing


def parse_results(
    results: Sequence[dict[str, Any]],
    *,
    task_id: Any = None,
    image_size: tuple[int, int] | None = None,
    source: RegionSource = "annotation",
    result_set_id: Any = None,
    default_score: float | None = None,
    model_version: str | None = None,
    errors: list[LabelStudioFormatError] | None = None,
) -> list[Region]:
    """One annotation's or prediction's ``result`` list -> regions in original pixels.

    ``image_size`` (``(width, height)``, EXIF-transposed original pixels) is used for
    results without ``original_width``/``original_height``. ``default_score`` (the
    prediction's score) fills results without their own ``score``. With ``errors`` given,
    a bad result is appended there and skipped; otherwise it raises.
    """
    if not isinstance(results, list):
        raise LabelStudioFormatError(
            f"'result' must be a list of result objects, got {type(results).__name__}",
            task_id=task_id,
        )

    def fail(exc: LabelStudioFormatError) -> None:
        if errors is None:
            raise exc
        errors.append(exc)

    # Group by region id: a region may be split over a geometry result, a "labels"
    # result and a per-region "textarea" that share one id.
    region_results: list[tuple[str, dict[str, Any]]] = []
    extra_labels: dict[str, list[str]] = {}
    texts: list[tuple[str, str]] = []  # (region id, text) of textarea results
    for i, r in enumerate(results):
        rid = _region_id(r, i)
        try:
            if not isinstance(r, dict):
                raise ValueError(f"a result must be an object, got {type(r).__name__}")
            rtype = r.get("type")
            value = r.get("value")
            if not isinstance(rtype, str):
                raise ValueError(f"result has no 'type' string (expected one of {_SUPPORTED})")
            rtype = rtype.lower()
            if rtype in _NON_REGION_TYPES or rtype in CLICK_PROMPT_TAGS:
                logger.debug("task %s, region %s: skipping %s result", task_id, rid, rtype)
                continue
            if rtype in _UNSUPPORTED_REGION_TYPES:
                raise ValueError(
                    f"result type '{rtype}' cannot become a box, polygon or mask; supported "
                    f"region types are {_SUPPORTED} (convert it, or drop it with --skip-bad)"
                )
            if not isinstance(value, dict):
                raise ValueError(f"'value' must be an object, got {type(value).__name__}")
            if rtype == "textarea":
                texts.append((rid, _text_of(value)))
            elif rtype in _KIND_OF_TYPE or (rtype == "labels" and _geometry_kind(value)):
                region_results.append((rid, r))
            elif rtype == "labels":
                extra_labels.setdefault(rid, []).extend(_labels_of(value, "labels"))
            else:
                raise ValueError(f"unknown result type '{rtype}'; expected one of {_SUPPORTED}")
        except ValueError as exc:
            fail(LabelStudioFormatError(str(exc), task_id=task_id, region_id=rid))

    region_ids = {rid for rid, _ in region_results}
    region_text = {rid: t for rid, t in texts if rid in region_ids}
    # The annotation's prompt TextArea: one prompt per submitted line. A region without
    # its own prompt (meta or per-region text) takes it only when it is the only one:
    # with several, which one found the region is unknown.
    lines = [line.strip() for rid, t in texts if rid not in region_ids for line in t.split("\n")]
    lines = [line for line in lines if line]
    prompt = lines[0] if len(lines) == 1 else None
    regions = []
    for rid, r in region_results:
        try:
            region = _parse_region(r, rid, task_id=task_id, image_size=image_size)
        except ValueError as exc:
            fail(LabelStudioFormatError(str(exc), task_id=task_id, region_id=rid))
            continue
        for label in extra_labels.get(rid, []):
            if label not in region.labels:
                region.labels.append(label)
        region.prompt = _meta_text(r) or region_text.get(rid) or prompt
        parent = r.get("parentID")
        region.parent_id = str(parent) if isinstance(parent, str | int) and parent != "" else None
        region.source = source
        region.result_set_id = result_set_id
        region.model_version = model_version
        if region.score is None:
            region.score = default_score
        regions.append(region)
    return regions


def parse_task(
    task: dict[str, Any],
    *,
    source: TaskSource = "annotations",
    image_size: tuple[int, int] | None = None,
    all_annotations: bool = False,
    model_version: str | None = None,
    errors: list[LabelStudioFormatError] | None = None,
) -> list[Region]:
    """A Label Studio task (export or import format) -> its regions in original pixels.

    ``source`` picks annotations, predictions or both. Cancelled (skipped) annotations are
    ignored; of the rest, the ``ground_truth`` one wins, else the latest (by
    ``updated_at``/``created_at``/``id``), unless ``all_annotations``. Predictions: those
    of ``model_version`` when given, else the latest prediction. ``image_size`` is
    ``(width, height)`` in EXIF-transposed original pixels, for results without
    ``original_width``/``original_height``.
    """
    task_id = task_id_of(task)
    if source not in ("annotations", "predictions", "both"):
        raise ValueError(f"source must be 'annotations', 'predictions' or 'both', got {source!r}")
    regions: list[Region] = []
    if source in ("annotations", "both"):
        anns = result_sets(task, "annotations", task_id)
        anns = [a for a in anns if not a.get("was_cancelled")]
        if not all_annotations and len(anns) > 1:
            gt = [a for a in anns if a.get("ground_truth")]
            anns = [gt[0] if gt else max(anns, key=_recency)]
        for a in anns:
            regions += parse_results(
                a.get("result", []),
                task_id=task_id,
                image_size=image_size,
                source="annotation",
                result_set_id=a.get("id"),
                errors=errors,
            )
    if source in ("predictions", "both"):
        preds = result_sets(task, "predictions", task_id)
        if model_version is not None:
            preds = [p for p in preds if p.get("model_version") == model_version]
        elif len(preds) > 1:
            preds = [max(preds, key=_recency)]
        for p in preds:
            score = p.get("score")
            regions += parse_results(
                p.get("result", []),
                task_id=task_id,
                image_size=image_size,
                source="prediction",
                result_set_id=p.get("id"),
                default_score=float(score) if _is_number(score) else None,
                model_version=p.get("model_version"),
                errors=errors,
            )
    return regions


# A rectangle and an unlinked mask/polygon of the same labels are one object when the
# shape's extent overlaps the rectangle by at least this IoU (human annotations: a box
# drawn round an object and its painted mask agree far better than this; two different
# objects of one label rarely overlap this much).
PAIR_IOU = 0.5


def pair_objects(regions: Sequence[Region], *, iou: float = PAIR_IOU) -> list[Region]:
    """One region per object: each rectangle together with the brush masks / polygons of
    the same object (``Region.shapes``), the rest unchanged, in input order.

    A shape belongs to a rectangle of the same annotation (or prediction) when its
    ``parentID`` names it (the backend links every mask and polygon to the rectangle of
    the same detection; Label Studio keeps the link on save). Unlinked shapes - drawn by
    hand - are matched greedily, best IoU first, to an unpaired rectangle with the same
    labels whose box overlaps the shape's extent by at least ``iou``; one shape per
    rectangle. The paired region keeps the rectangle's box, id, score and prompt (the
    shape's prompt when the rectangle has none); ``to_mask()`` then gives the shapes'
    union.
    """
    out = list(regions)
    groups: dict[tuple[Any, Any, Any], list[int]] = {}
    for i, r in enumerate(out):
        groups.setdefault((r.task_id, r.source, r.result_set_id), []).append(i)
    dropped: set[int] = set()
    for members in groups.values():
        rects = {out[i].region_id: i for i in members if out[i].kind == "rectangle"}
        shapes = [i for i in members if out[i].kind in ("brush", "polygon")]
        if not rects or not shapes:
            continue
        found: dict[int, list[int]] = {}
        loose = []
        for i in shapes:
            parent = out[i].parent_id
            if parent is not None and parent in rects:
                found.setdefault(rects[parent], []).append(i)
            else:
                loose.append(i)
        free = [j for j in rects.values() if j not in found]
        candidates = sorted(
            (
                (frames.box_iou(out[j].box_xyxy, out[i].box_xyxy), j, i)
                for j in free
                for i in loose
                if sorted(out[j].labels) == sorted(out[i].labels)
            ),
            reverse=True,
        )
        taken: set[int] = set()
        for overlap, j, i in candidates:
            if overlap < iou or j in found or i in taken:
                continue
            found[j] = [i]
            taken.add(i)
        for j, parts in found.items():
            rect = out[j]
            out[j] = dataclasses.replace(
                rect,
                shapes=[out[i] for i in parts],
                prompt=rect.prompt or next((out[i].prompt for i in parts if out[i].prompt), None),
            )
            dropped.update(parts)
    return [r for i, r in enumerate(out) if i not in dropped]


def task_id_of(task: Any) -> Any:
    """The task's ``id`` (``None`` when absent); ``LabelStudioFormatError`` if ``task`` is
    not a task object."""
    if not isinstance(task, dict):
        raise LabelStudioFormatError(
            f"a task must be an object with 'data', got {type(task).__name__}"
        )
    task_id = task.get("id")
    if not isinstance(task.get("data"), dict):
        raise LabelStudioFormatError(
            "task has no 'data' object (expected {'data': {'image': ...}, 'annotations': [...]}, "
            "as in Label Studio's JSON export; JSON_MIN exports are not accepted)",
            task_id=task_id,
        )
    return task_id


def result_image_size(results: Iterable[Any], *, task_id: Any = None) -> tuple[int, int] | None:
    """The ``(width, height)`` that a task's results agree on (``original_width`` /
    ``original_height``, EXIF-transposed original pixels), ``None`` when no result has
    one. Raises ``LabelStudioFormatError`` when results disagree."""
    size = None
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "original_width" not in r:
            continue
        try:
            s = _size_of(r)
        except ValueError as exc:
            raise LabelStudioFormatError(
                str(exc), task_id=task_id, region_id=_region_id(r, i)
            ) from exc
        if s is None:
            continue
        if size is not None and s != size:
            raise LabelStudioFormatError(
                f"results disagree on the image size: {size[0]}x{size[1]} and {s[0]}x{s[1]} "
                "(original_width x original_height); re-save the task in Label Studio",
                task_id=task_id,
                region_id=_region_id(r, i),
            )
        size = s
    return size


def task_results(task: dict[str, Any]) -> list[Any]:
    """Every result of a task (annotations and predictions), for size look-ups."""
    out: list[Any] = []
    for key in ("annotations", "completions", "predictions"):
        for item in task.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("result"), list):
                out.extend(item["result"])
    return out


def image_reference(task: dict[str, Any], config: LabelConfig | None = None) -> str:
    """The task's image reference (URL or path) from ``data``: the key of the config's
    ``Image`` tag, else ``data["image"]``, else the only string value."""
    data = task.get("data") or {}
    key = config.image_key() if config is not None else None
    if key is None:
        if "image" in data:
            key = "image"
        else:
            strings = [k for k, v in data.items() if isinstance(v, str)]
            key = strings[0] if len(strings) == 1 else None
    ref = data.get(key) if key is not None else None
    if not isinstance(ref, str) or not ref:
        raise LabelStudioFormatError(
            f"task data has no image reference under {key or 'image'!r} (data keys: "
            f'{sorted(data)}); pass the label config so the <Image value="$key"> is known',
            task_id=task.get("id"),
        )
    return ref


# -------------------------------------------------------------------------- building


def prediction_score(decisions: Iterable[float]) -> float:
    """A Label Studio prediction's ``score`` (the Data Manager's "Prediction score" column,
    sorted ascending to review the doubtful tasks first) from the confidences of its
    decisions - each region shown (its score) and, where known, each region held back or
    prompt left without one (the confidence that nothing is there): the least certain. The
    minimum, not the mean: one doubtful region among sure ones still brings the task up,
    however many labels it was asked for. 0 when nothing was decided."""
    values = list(decisions)
    return float(min(values)) if values else 0.0


def rectangle_result(
    box_xyxy: Any,
    labels: Sequence[str],
    *,
    width: int,
    height: int,
    from_name: str = "label",
    to_name: str = "image",
    region_id: str | None = None,
    score: float | None = None,
    corners: Any = None,
    prompt: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """A ``rectanglelabels`` result from an original-pixel xyxy box (or, for a rotated
    rectangle, its 4 corners ``4x2`` clockwise from its own top-left corner)."""
    if corners is not None:
        rect = frames.corners_to_percent(corners, width, height)
    else:
        rect = frames.pixel_to_percent(box_xyxy, width, height)
    value = {
        "x": rect.x,
        "y": rect.y,
        "width": rect.width,
        "height": rect.height,
        "rotation": rect.rotation,
        "rectanglelabels": list(labels),
    }
    return _result(
        "rectanglelabels",
        value,
        width,
        height,
        from_name,
        to_name,
        region_id,
        score,
        prompt,
        parent_id,
    )


def polygon_result(
    points_px: Any,
    labels: Sequence[str],
    *,
    width: int,
    height: int,
    from_name: str = "polygon",
    to_name: str = "image",
    region_id: str | None = None,
    score: float | None = None,
    prompt: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """A ``polygonlabels`` result from polygon points in original pixels (``Nx2``)."""
    pts = frames.points_pixel_to_percent(points_px, width, height)
    value = {"points": pts.tolist(), "closed": True, "polygonlabels": list(labels)}
    return _result(
        "polygonlabels",
        value,
        width,
        height,
        from_name,
        to_name,
        region_id,
        score,
        prompt,
        parent_id,
    )


def brush_result(
    mask: np.ndarray,
    labels: Sequence[str],
    *,
    from_name: str = "brush",
    to_name: str = "image",
    region_id: str | None = None,
    score: float | None = None,
    prompt: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """A ``brushlabels`` result from a binary ``HxW`` mask at original resolution."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {tuple(mask.shape)}")
    height, width = mask.shape
    value = {"format": "rle", "rle": mask_to_ls_rle(mask), "brushlabels": list(labels)}
    return _result(
        "brushlabels",
        value,
        width,
        height,
        from_name,
        to_name,
        region_id,
        score,
        prompt,
        parent_id,
    )


def textarea_result(
    text: str | Sequence[str],
    *,
    from_name: str = "prompt",
    to_name: str = "image",
    region_id: str | None = None,
) -> dict[str, Any]:
    """A ``textarea`` result; give it a region's id to attach the text to that region."""
    texts = [text] if isinstance(text, str) else list(text)
    out: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": texts},
    }
    if region_id is not None:
        out["id"] = region_id
    return out


def region_to_result(
    region: Region,
    *,
    from_name: str | None = None,
    to_name: str | None = None,
    region_id: str | None = None,
) -> dict[str, Any]:
    """The inverse of :func:`parse_results` for one region: a Label Studio result of the
    region's kind (rotated rectangles keep their rotation)."""
    common: dict[str, Any] = {
        "from_name": from_name or region.from_name,
        "to_name": to_name or region.to_name,
        "region_id": region_id or region.region_id,
        "score": region.score,
    }
    if region.kind == "brush":
        return brush_result(region.to_mask(), region.labels, **common)
    if region.kind == "polygon":
        if region.polygon is None:
            raise ValueError(f"region {region.region_id}: polygon region without points")
        return polygon_result(
            region.polygon, region.labels, width=region.width, height=region.height, **common
        )
    corners = region.polygon if region.rotation else None
    return rectangle_result(
        region.box_xyxy,
        region.labels,
        width=region.width,
        height=region.height,
        corners=corners,
        **common,
    )


# --------------------------------------------------------------------------- helpers


def _result(
    rtype: str,
    value: dict[str, Any],
    width: int,
    height: int,
    from_name: str,
    to_name: str,
    region_id: str | None,
    score: float | None,
    prompt: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": rtype,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
    }
    if region_id is not None:
        out["id"] = region_id
    if score is not None:
        out["score"] = float(score)
    if prompt:
        # The region's own prompt, as Label Studio's region meta (shown and editable in
        # the region's details, kept when the annotator accepts and saves): retraining
        # learns each region from the prompt that found it.
        out["meta"] = {"text": [prompt]}
    if parent_id is not None:
        # The region this one belongs to (Label Studio nests it under that region in the
        # outliner and keeps the link on save): a brush mask or polygon points at the
        # rectangle of the same object, so exports count the object once.
        out["parentID"] = parent_id
    return out


def _parse_region(
    r: dict[str, Any], rid: str, *, task_id: Any, image_size: tuple[int, int] | None
) -> Region:
    rtype = r["type"].lower()
    value = r["value"]
    kind = _KIND_OF_TYPE.get(rtype) or _geometry_kind(value)
    assert kind is not None  # the caller only passes region results
    size = _size_of(r) or image_size
    if size is None:
        raise ValueError(
            "missing image size: the result has no original_width/original_height and the "
            "image size is unknown (give a readable local image, e.g. with --image-root)"
        )
    width, height = size
    label_key = rtype if rtype.endswith("labels") else "labels"
    labels = _labels_of(value, label_key) if label_key in value else []
    score = r.get("score")
    common: dict[str, Any] = {
        "task_id": task_id,
        "region_id": rid,
        "from_name": str(r.get("from_name", "")),
        "to_name": str(r.get("to_name", "")),
        "labels": labels,
        "width": width,
        "height": height,
        "score": float(score) if _is_number(score) else None,
    }
    if kind == "rectangle":
        nums = {k: value.get(k) for k in ("x", "y", "width", "height")}
        bad = [k for k, v in nums.items() if not _is_number(v) or not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"rectangle value needs numbers x, y, width, height in percent (0-100); "
                f"missing or not a finite number: {bad}"
            )
        rotation = value.get("rotation", 0) or 0
        if not _is_number(rotation):
            raise ValueError(f"rectangle rotation must be a number of degrees, got {rotation!r}")
        if nums["width"] <= 0 or nums["height"] <= 0:
            raise ValueError(
                f"rectangle has zero or negative size (width={nums['width']}%, "
                f"height={nums['height']}%); delete it in Label Studio"
            )
        rect = frames.PercentRect(
            x=float(nums["x"]),
            y=float(nums["y"]),
            width=float(nums["width"]),
            height=float(nums["height"]),
            rotation=float(rotation) % 360.0,
        )
        box = frames.clip_boxes(frames.percent_to_pixel(rect, width, height), width, height)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(
                f"rectangle lies outside the image (x={rect.x}%, y={rect.y}%, "
                f"width={rect.width}%, height={rect.height}%)"
            )
        corners = frames.percent_to_corners(rect, width, height) if rect.rotation else None
        return Region(
            kind="rectangle", box_xyxy=box, polygon=corners, rotation=rect.rotation, **common
        )
    if kind == "polygon":
        points = value.get("points")
        try:
            pts_pct = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            pts_pct = np.zeros((0,))
        if pts_pct.ndim != 2 or pts_pct.shape[1] != 2 or len(pts_pct) < 3:
            raise ValueError(
                "polygon value needs 'points': a list of at least 3 [x%, y%] pairs, got "
                f"{str(points)[:80]}"
            )
        if not np.isfinite(pts_pct).all():
            raise ValueError("polygon points must be finite numbers (percent)")
        pts = frames.points_percent_to_pixel(pts_pct, width, height)
        box = np.array([*pts.min(0), *pts.max(0)])
        box = frames.clip_boxes(box, width, height)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError("polygon has zero area inside the image")
        return Region(kind="polygon", box_xyxy=box, polygon=pts, **common)
    # brush
    fmt = value.get("format", "rle")
    if fmt != "rle" or "rle" not in value:
        raise ValueError(
            f"brush value needs format 'rle' and an 'rle' list (Label Studio brush RLE), got "
            f"format={fmt!r} and keys {sorted(value)}"
        )
    mask = ls_rle_to_mask(value["rle"], width, height)
    mbox = mask_to_box(mask)
    if mbox is None:
        raise ValueError("brush mask is empty (no pixel with alpha > 127)")
    return Region(kind="brush", box_xyxy=mbox, mask=mask, **common)


def _geometry_kind(value: dict[str, Any]) -> RegionKind | None:
    if "rle" in value:
        return "brush"
    if "points" in value:
        return "polygon"
    if {"x", "y", "width", "height"} <= value.keys():
        return "rectangle"
    return None


def _labels_of(value: dict[str, Any], key: str) -> list[str]:
    labels = value.get(key)
    if isinstance(labels, str):
        return [labels]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"value['{key}'] must be a list of label strings, got {labels!r}")
    return list(labels)


def _text_of(value: dict[str, Any]) -> str:
    text = value.get("text")
    if isinstance(text, str):
        return text
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return "\n".join(text)
    raise ValueError(f"textarea value['text'] must be a list of strings, got {text!r}")


def _meta_text(r: dict[str, Any]) -> str | None:
    meta = r.get("meta")
    text = meta.get("text") if isinstance(meta, dict) else None
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list):
        return None
    joined = " ".join(t.strip() for t in text if isinstance(t, str) and t.strip())
    return joined or None


def _size_of(r: dict[str, Any]) -> tuple[int, int] | None:
    w, h = r.get("original_width"), r.get("original_height")
    if w is None and h is None:
        return None
    if not (_is_number(w) and _is_number(h)) or w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise ValueError(
            f"original_width/original_height must be positive integers (pixels), got {w!r}, {h!r}"
        )
    return int(w), int(h)


def _region_id(r: Any, index: int) -> str:
    rid = r.get("id") if isinstance(r, dict) else None
    return str(rid) if rid not in (None, "") else f"result[{index}]"


def result_sets(task: dict[str, Any], key: str, task_id: Any = None) -> list[dict[str, Any]]:
    """The task's ``annotations`` (``completions`` in Label Studio < 1.0 exports) or
    ``predictions`` objects, checked to be objects with a ``result`` list."""
    items = task.get(key)
    if items is None and key == "annotations":
        items = task.get("completions")  # Label Studio < 1.0 exports
    if items is None:
        return []
    if not isinstance(items, list):
        raise LabelStudioFormatError(
            f"'{key}' must be a list, got {type(items).__name__}", task_id=task_id
        )
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("result", []), list):
            raise LabelStudioFormatError(
                f"each of '{key}' must be an object with a 'result' list, got {str(item)[:60]} "
                "(export with full annotation and prediction objects, e.g. exportType=JSON)",
                task_id=task_id,
            )
    return items


def _recency(item: dict[str, Any]) -> tuple[str, float]:
    stamp = item.get("updated_at") or item.get("created_at") or ""
    ident = item.get("id")
    return str(stamp), float(ident) if _is_number(ident) else 0.0


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ------------------------------------------------------------------ brush RLE


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """Binary ``HxW`` mask -> Label Studio brush RLE (``value.rle``)."""
    from label_studio_sdk.converter.brush import mask2rle

    return list(mask2rle((mask > 0).astype(np.uint8) * 255))


def ls_rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE -> binary ``HxW`` mask (alpha > 127). Raises ``ValueError``
    when the RLE is malformed or does not hold exactly ``height x width`` RGBA pixels.

    The size is checked on the RLE header (its first 32 bits count the RGBA bytes) before
    decoding, so an RLE from another image fails fast instead of decoding megabytes.
    """
    from label_studio_sdk.converter.brush import decode_rle

    if (
        not isinstance(rle, list | tuple | np.ndarray)
        or len(rle) < 4
        or not all(isinstance(v, int | np.integer) and 0 <= v <= 255 for v in rle)
    ):
        raise ValueError(
            "a Label Studio brush RLE must be a list of byte values (ints 0-255) with a "
            f"4-byte header, got {str(rle)[:80]}"
        )
    expected = width * height * 4
    num = int.from_bytes(bytes(int(v) for v in rle[:4]), "big")
    if num != expected:
        raise ValueError(
            f"brush RLE holds {num} bytes, expected {expected} for a {width}x{height} RGBA "
            "image: the RLE belongs to an image of another size"
        )
    try:
        flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    except (ValueError, IndexError) as exc:  # the SDK's bit reader on truncated data
        raise ValueError(f"brush RLE is truncated or corrupt: {exc}") from exc
    if flat.size != expected:
        raise ValueError(
            f"brush RLE decodes to {flat.size} bytes, expected {expected} for a "
            f"{width}x{height} RGBA image: the RLE belongs to an image of another size"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 127
