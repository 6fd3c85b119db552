"""Reading COCO files and lining results up with ground truth (shared by import and
evaluation). All boxes are COCO ``bbox`` ``[x, y, width, height]`` in original pixels."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CocoLike = dict[str, Any] | str | os.PathLike[str]
ResultsLike = list[dict[str, Any]] | dict[str, Any] | str | os.PathLike[str]


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Load a JSON file; ``ValueError`` naming the file, line and column when malformed."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"expected {what}"
        ) from exc


def load_instances(coco: CocoLike, *, role: str = "COCO instances") -> dict[str, Any]:
    """A COCO instances dict (from a dict or a file), checked for ``images``,
    ``categories`` and ``annotations`` lists. Annotations marked ``"source":
    "prediction"`` (exports with ``source="both"``) are left out: this is ground truth."""
    data = coco if isinstance(coco, dict) else read_json(coco, role)
    if not isinstance(data, dict):
        raise ValueError(
            f"{role} must be an object with images, categories and annotations, got a JSON "
            f"{type(data).__name__} (a bare list is a COCO results file)"
        )
    for key in ("images", "categories", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{role} has no '{key}' list")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not {"id", "width", "height"} <= im.keys():
            raise ValueError(f"{role}: images[{i}] needs id, width and height, got {im!r}")
        images[im["id"]] = im
    categories = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not {"id", "name"} <= cat.keys():
            raise ValueError(f"{role}: categories[{i}] needs id and name, got {cat!r}")
        categories[cat["id"]] = cat
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(ann, i, role, images, categories)
        if ann.get("source", "annotation") == "annotation":
            annotations.append(ann)
    return {**data, "annotations": annotations}


def load_results(results: ResultsLike, gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Detections lined up with the ground truth ``gt``.

    Accepts a COCO results list (``image_id`` and ``category_id`` in ``gt``'s ids) or a
    COCO instances dict with scored annotations (e.g. ``export-coco --source
    predictions``): its image ids are mapped to ``gt``'s by ``file_name`` and its category
    ids by ``name``, so two exports with different ids still line up.
    """
    data = results if isinstance(results, dict | list) else read_json(results, "COCO results")
    role = "results"
    gt_images = {im["id"]: im for im in gt["images"]}
    gt_categories = {c["id"]: c for c in gt["categories"]}
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise ValueError(
                "results must be a COCO results list or an instances dict with 'annotations'"
            )
        image_map = _id_map(data.get("images"), gt["images"], "file_name", "image")
        category_map = _id_map(data.get("categories"), gt["categories"], "name", "category")
        anns = []
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or ann.get("source", "prediction") != "prediction":
                continue
            ann = dict(ann)
            if image_map is not None:
                ann["image_id"] = image_map.get(ann.get("image_id"), ann.get("image_id"))
            if category_map is not None:
                ann["category_id"] = category_map.get(
                    ann.get("category_id"), ann.get("category_id")
                )
            anns.append(ann)
    elif isinstance(data, list):
        anns = data
    else:
        raise ValueError(f"results must be a JSON list of detections, got {type(data).__name__}")
    out = []
    for i, ann in enumerate(anns):
        _check_annotation(ann, i, role, gt_images, gt_categories)
        score = ann.get("score")
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise ValueError(
                f"results[{i}] (image {ann.get('image_id')}) has no numeric 'score'; results "
                "need one (export predictions with --source predictions)"
            )
        out.append(ann)
    return out


def _check_annotation(
    ann: Any, index: int, role: str, images: dict[Any, Any], categories: dict[Any, Any]
) -> None:
    if not isinstance(ann, dict):
        raise ValueError(f"{role}: annotations[{index}] must be an object, got {ann!r}")
    where = f"{role}: annotation {ann.get('id', f'[{index}]')} of image {ann.get('image_id')}"
    if ann.get("image_id") not in images:
        raise ValueError(f"{where}: image_id is not among the images of the ground truth")
    if ann.get("category_id") not in categories:
        raise ValueError(
            f"{where}: category_id {ann.get('category_id')} is not among the categories "
            f"{sorted(categories)}"
        )
    bbox = ann.get("bbox")
    has_segm = bool(ann.get("segmentation"))
    if bbox is None and has_segm:
        return
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        or bbox[2] < 0
        or bbox[3] < 0
    ):
        raise ValueError(
            f"{where}: bbox must be [x, y, width, height] in original pixels, got {bbox!r}"
        )


def _id_map(theirs: Any, ours: list[dict[str, Any]], key: str, what: str) -> dict[Any, Any] | None:
    """Their ids -> our ids, matched on ``key``; ``None`` when they list nothing to match."""
    if not isinstance(theirs, list) or not theirs:
        return None
    by_key = {item.get(key): item["id"] for item in ours}
    mapping = {}
    missing = []
    for item in theirs:
        if item.get(key) in by_key:
            mapping[item["id"]] = by_key[item[key]]
        else:
            missing.append(item.get(key))
    if missing:
        raise ValueError(
            f"results name {len(missing)} {what}(s) that the ground truth lacks (matched on "
            f"{key}): {missing[:5]}"
        )
    return mapping


def box_outline(bbox: Any) -> list[list[float]]:
    """The COCO polygon segmentation of a box ``[x, y, w, h]`` (its 4 corners, clockwise
    from the top-left): what an export writes for a box-only annotation, so that stock
    ``pycocotools`` ``COCOeval(iouType="segm")`` can read every annotation (it fails on an
    empty ``segmentation``) and scores box-only objects as box-shaped masks."""
    x, y, w, h = (float(v) for v in bbox)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# Marks an exported annotation whose segmentation is only its box outline.
BOX_ONLY = "box_only"


def is_box_only(ann: dict[str, Any]) -> bool:
    """Whether ``ann`` is a box-only annotation as this project exports it (marked
    :data:`BOX_ONLY`, segmentation exactly :func:`box_outline` of its bbox): imported back
    as a rectangle. A COCO file's own square polygons stay polygons."""
    segmentation, bbox = ann.get("segmentation"), ann.get("bbox")
    if not ann.get(BOX_ONLY) or not isinstance(segmentation, list) or len(segmentation) != 1:
        return False
    if bbox is None:
        return False
    try:
        expected = box_outline(bbox)[0]
        got = [float(v) for v in segmentation[0]]
    except (TypeError, ValueError):
        return False
    return len(got) == 8 and all(abs(a - b) < 1e-3 for a, b in zip(got, expected, strict=True))
