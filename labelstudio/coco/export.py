"""Label Studio JSON -> COCO instances, brush masks and predictions included.

Frames: Label Studio results are in **percent** of the EXIF-transposed original image;
everything written here is in **original pixels** of that image (``bbox`` absolute
``[x, y, width, height]``, polygons ``[x1, y1, x2, y2, ...]`` on pixel edges, RLE at the
image's ``[height, width]``).

One COCO annotation per object: a rectangle and the brush mask / polygons of the same
object (linked by ``parentID``, or matched by :func:`labelstudio.results.pair_objects`'s
rule) are one annotation: the rectangle's ``bbox``, the shapes' ``segmentation`` and
``area``, ``ls_region_id`` the rectangle's and ``ls_shape_region_ids`` the shapes'.

What one annotation holds, per region kind (``segmentation``; ``area``):

* rectangle alone: its outline as one 4-point polygon (stock ``COCOeval`` segm needs a
  segmentation on every annotation); box width x height.
* rotated rectangle: its 4 corners as one polygon; pixels inside that polygon.
* polygon: the polygon; pixels inside it.
* brush, ``masks="rle"``: COCO compressed RLE, counts as text; mask pixels.
* brush, ``masks="polygon"``: exact pixel-edge outlines, one per 4-connected part (holes
  cannot be expressed and are filled, with a warning); pixels inside the outlines.

Every annotation has ``iscrowd: 0`` and ``ls_region_id``; predictions carry ``score``
(so the annotation list is a COCO results list); with ``source="both"`` each annotation
says ``"source": "annotation" | "prediction"``; the TextArea prompt, if any, is kept as
``prompt``. A region with several labels gives one annotation per label. Image ids are
the Label Studio task ids when every task has a distinct integer id, else 1..N in file
order; category ids are 1..K in label-config order (sorted label names without a config).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nextchat_core import frames
from nextchat_core.masks import (
    coco_segmentation_to_mask,
    mask_iou,
    mask_to_coco_rle,
    mask_to_polygons,
)

from ..config import LabelConfig, parse_label_config
from ..images import (
    FetchOptions,
    TaskError,
    fetch_images,
    image_file_name,
    read_image_size,
    resolve_local_image,
)
from ..results import (
    LabelStudioFormatError,
    Region,
    TaskSource,
    image_reference,
    pair_objects,
    parse_task,
    result_image_size,
    result_sets,
    task_id_of,
    task_results,
)
from .common import BOX_ONLY, box_outline

logger = logging.getLogger(__name__)

MaskFormat = Literal["rle", "polygon"]

_DECIMALS = 3  # coordinates in pixels: 1/1000 px is far below annotation precision
_MAX_LISTED_ERRORS = 10


@dataclass
class CocoExport:
    """An export's result: the COCO ``instances`` dict and the problems skipped."""

    coco: dict[str, Any]
    errors: list[LabelStudioFormatError] = field(default_factory=list)
    # Tasks left out because they hold nothing of the exported source (not annotated /
    # not predicted): reason -> number of tasks. Not errors: nothing is wrong with them.
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def results(self) -> list[dict[str, Any]]:
        """The scored annotations as a COCO results list (``pycocotools`` ``loadRes``)."""
        return coco_results(self.coco)


def load_tasks(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a Label Studio JSON export (a list of tasks; a single task object is accepted
    too). Raises ``ValueError`` for malformed JSON, naming the line and column."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "expected a Label Studio JSON export: a list of tasks"
        ) from exc
    if isinstance(data, dict) and "data" in data:
        data = [data]
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, expected a Label Studio JSON export "
            "(a list of tasks, exportType=JSON; JSON_MIN and COCO exports are not accepted)"
        )
    return data


def fetch_project(
    project_id: int, *, base_url: str | None = None, api_key: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Export every task of a Label Studio project (annotations and predictions) and its
    label config, through ``label_studio_sdk``.

    ``base_url``/``api_key``: the Label Studio address and an access token (the CLI
    defaults them to ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``). Tasks and annotations
    come from the synchronous JSON export of Label Studio Community
    (``/api/projects/ID/export?exportType=JSON&download_all_tasks=true``); its
    ``predictions`` are only ids there (Label Studio 1.23), so the full predictions are
    read from the predictions API (``/api/predictions?project=ID``) and put in their tasks.
    """
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    if not base_url or not api_key:
        raise ValueError(
            "exporting a project needs the Label Studio URL and API key: set "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or pass --url / --api-key)"
        )
    client = LabelStudio(base_url=base_url, api_key=api_key)
    try:
        project = client.projects.get(id=project_id)
        raw = b"".join(
            client.projects.exports.download_sync(
                project_id, export_type="JSON", download_all_tasks=True, download_resources=False
            )
        )
        predictions = [
            p.model_dump(mode="json") for p in client.predictions.list(project=project_id)
        ]
    except ApiError as exc:
        raise RuntimeError(
            f"Label Studio at {base_url} answered {exc.status_code} for project {project_id}: "
            f"{str(exc.body)[:200]} (check the project id and the API key)"
        ) from exc
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach Label Studio at {base_url}: {exc}") from exc
    try:
        tasks = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"Label Studio returned an export that is not JSON: {exc}") from exc
    if not isinstance(tasks, list):
        raise RuntimeError(f"Label Studio returned a {type(tasks).__name__}, expected a task list")
    by_task: dict[Any, list[dict[str, Any]]] = {}
    for pred in predictions:
        by_task.setdefault(pred.get("task"), []).append(pred)
    for task in tasks:
        if isinstance(task, dict):
            task["predictions"] = by_task.get(task.get("id"), [])
    logger.info(
        "fetched %d tasks and %d predictions of project %s from %s",
        len(tasks),
        len(predictions),
        project_id,
        base_url,
    )
    return tasks, project.label_config or ""


def export_coco(
    tasks: Sequence[dict[str, Any]] | str | os.PathLike[str],
    *,
    label_config: str | LabelConfig | None = None,
    masks: MaskFormat = "rle",
    source: TaskSource = "annotations",
    skip_bad: bool = False,
    image_root: str | os.PathLike[str] | None = None,
    all_annotations: bool = False,
    model_version: str | None = None,
    fetch: FetchOptions | None = None,
) -> CocoExport:
    """Label Studio tasks (a list, or the path of a JSON export) -> COCO instances.

    Only tasks that hold the exported source are exported: with ``source="annotations"``
    a task nobody annotated (or whose annotations were all skipped) is left out and counted
    in ``CocoExport.skipped``; likewise tasks without predictions (of ``model_version``)
    for ``"predictions"``, and tasks with neither for ``"both"``. An annotation with no
    regions is an image with no objects and is exported.

    Image sizes come from the task's results (``original_width``/``original_height``,
    annotations' and predictions' alike); a task without any is sized from the image file
    when it is local (``image_root``, ``LOCAL_FILES_DOCUMENT_ROOT``), else, with ``fetch``
    given, by downloading the image with those options (the backend's fetch rules), EXIF
    orientation applied. ``source``, ``all_annotations`` and ``model_version`` pick
    results as :func:`labelstudio.results.parse_task` does.

    One object is one COCO annotation: a rectangle and its brush mask or polygons
    (:func:`labelstudio.results.pair_objects`) give the rectangle's ``bbox`` and the
    mask's ``segmentation`` and ``area``; a box-only annotation's ``segmentation`` is its
    box outline (:func:`labelstudio.coco.common.box_outline`), which stock ``COCOeval``
    needs for ``iouType="segm"``.

    Bad tasks and regions raise one ``ValueError`` listing them; with ``skip_bad`` they
    are left out, listed in ``CocoExport.errors`` and logged, and the rest is exported.
    """
    if masks not in ("rle", "polygon"):
        raise ValueError(f"masks must be 'rle' or 'polygon', got {masks!r}")
    if source not in ("annotations", "predictions", "both"):
        raise ValueError(f"source must be 'annotations', 'predictions' or 'both', got {source!r}")
    if isinstance(tasks, str | os.PathLike):
        tasks = load_tasks(tasks)
    config = parse_label_config(label_config) if isinstance(label_config, str) else label_config

    errors: list[LabelStudioFormatError] = []
    ids = [t.get("id") if isinstance(t, dict) else None for t in tasks]
    use_task_ids = all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(
        set(ids)
    ) == len(ids)

    skipped: dict[str, int] = {}
    chosen: list[tuple[int, dict[str, Any]]] = []
    for index, task in enumerate(tasks):
        try:
            reason = _nothing_to_export(task, source, model_version)
        except LabelStudioFormatError as exc:
            errors.append(exc)
            continue
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            chosen.append((index, task))
    fetched = _fetch_sizes([t for _, t in chosen], config, image_root, fetch)

    images: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], str]] = []  # (annotation without category, label)
    for index, task in chosen:
        try:
            task_id = task_id_of(task)
            ref = image_reference(task, config)
            size = _image_size(task, ref, task_id, image_root, fetched)
            regions = parse_task(
                task,
                source=source,
                image_size=size,
                all_annotations=all_annotations,
                model_version=model_version,
                errors=errors,
            )
            regions = pair_objects(regions)
        except LabelStudioFormatError as exc:  # the task itself is unusable: no image entry
            errors.append(exc)
            continue
        image_id = task_id if use_task_ids else index + 1
        image: dict[str, Any] = {
            "id": image_id,
            "file_name": image_file_name(ref),
            "width": size[0],
            "height": size[1],
        }
        if task_id is not None:
            image["ls_task_id"] = task_id
        images.append(image)
        for region in regions:
            if not region.labels:
                errors.append(
                    LabelStudioFormatError(
                        "region has no label, so it has no COCO category",
                        task_id=task_id,
                        region_id=region.region_id,
                    )
                )
                continue
            ann = _annotation(region, image_id, masks, with_source=source == "both")
            pending += [(ann, label) for label in region.labels]

    names = config.categories if config is not None else sorted({lab for _, lab in pending})
    category_ids = {name: i + 1 for i, name in enumerate(names)}
    annotations: list[dict[str, Any]] = []
    for ann, label in pending:
        if label not in category_ids:
            errors.append(
                LabelStudioFormatError(
                    f"label {label!r} is not in the label config; its labels are {names}",
                    task_id=_task_of(images, ann["image_id"]),
                    region_id=ann["ls_region_id"],
                )
            )
            continue
        annotations.append({"id": len(annotations) + 1, **ann, "category_id": category_ids[label]})

    if errors and not skip_bad:
        raise ValueError(_summarize(errors))
    for error in errors:
        logger.warning("skipped: %s", error)
    coco = {
        "info": {
            "description": "Label Studio export by nextchat-studio",
            "date_created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": source,
        },
        "licenses": [],
        "images": images,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in category_ids.items()],
        "annotations": annotations,
    }
    logger.info(
        "COCO export: %d images, %d annotations, %d categories, %d bad, %s",
        len(images),
        len(annotations),
        len(category_ids),
        len(errors),
        describe_skipped(skipped) or "no task left out",
    )
    return CocoExport(coco=coco, errors=errors, skipped=skipped)


def describe_skipped(skipped: dict[str, int]) -> str:
    """``"left out 3 task(s) not annotated"`` (empty when nothing was left out)."""
    return "; ".join(f"left out {n} task(s) {why}" for why, n in skipped.items())


def coco_results(coco: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotations that carry a ``score`` as a COCO results list
    (``image_id``, ``category_id``, ``bbox``, ``score``, ``segmentation`` when non-empty)."""
    out = []
    for ann in coco.get("annotations", []):
        if "score" not in ann:
            continue
        res = {k: ann[k] for k in ("image_id", "category_id", "bbox", "score")}
        if ann.get("segmentation"):
            res["segmentation"] = ann["segmentation"]
        out.append(res)
    return out


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as compact JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


# --------------------------------------------------------------------------- helpers


def _nothing_to_export(
    task: dict[str, Any], source: TaskSource, model_version: str | None
) -> str | None:
    """Why ``task`` holds nothing of ``source`` (``None``: it does)."""
    task_id = task_id_of(task)
    annotated = any(not a.get("was_cancelled") for a in result_sets(task, "annotations", task_id))
    predicted = any(
        model_version is None or p.get("model_version") == model_version
        for p in result_sets(task, "predictions", task_id)
    )
    if source == "annotations" and not annotated:
        return "not annotated"
    if source == "predictions" and not predicted:
        return "without predictions" + (f" of {model_version}" if model_version else "")
    if source == "both" and not (annotated or predicted):
        return "neither annotated nor predicted"
    return None


def _fetch_sizes(
    tasks: list[dict[str, Any]],
    config: LabelConfig | None,
    image_root: str | os.PathLike[str] | None,
    fetch: FetchOptions | None,
) -> dict[int, tuple[int, int] | str]:
    """Sizes of the tasks that only a download can size (no result has one, no local
    file): ``id(task)`` -> ``(width, height)`` or why the download failed."""
    if fetch is None:
        return {}
    need = []
    for task in tasks:
        try:
            if result_image_size(task_results(task)) is not None:
                continue
            ref = image_reference(task, config)
        except LabelStudioFormatError:
            continue  # reported by the main loop
        if resolve_local_image(ref, image_root) is None:
            need.append(task)
    if not need:
        return {}
    logger.info("downloading %d image(s) that no result sizes", len(need))
    out: dict[int, tuple[int, int] | str] = {}
    for task, got in zip(need, fetch_images(need, _any_config(config), fetch), strict=True):
        out[id(task)] = got.detail if isinstance(got, TaskError) else (got.width, got.height)
    return out


def _any_config(config: LabelConfig | None) -> LabelConfig:
    # fetch_images locates the image with a label config; without one, data["image"].
    return config or parse_label_config('<View><Image name="image" value="$image"/></View>')


def _image_size(
    task: dict[str, Any],
    ref: str,
    task_id: Any,
    image_root: str | os.PathLike[str] | None,
    fetched: dict[int, tuple[int, int] | str],
) -> tuple[int, int]:
    size = result_image_size(task_results(task), task_id=task_id)
    if size is not None:
        return size
    path = resolve_local_image(ref, image_root)
    if path is None:
        got = fetched.get(id(task))
        if isinstance(got, tuple):
            return got
        how = (
            f"downloading it failed: {got}"
            if got is not None
            else "it is not a readable local file (pass --image-root with the image folder, "
            "or export with --project so the image can be downloaded)"
        )
        raise LabelStudioFormatError(
            f"missing image size: no result has original_width/original_height and the image "
            f"{ref!r} cannot be sized: {how}",
            task_id=task_id,
        )
    try:
        return read_image_size(path)
    except ValueError as exc:
        raise LabelStudioFormatError(f"missing image size: {exc}", task_id=task_id) from exc


def _annotation(
    region: Region, image_id: Any, masks: MaskFormat, *, with_source: bool
) -> dict[str, Any]:
    """One COCO annotation (without ``id``/``category_id``) for a region in original pixels."""
    segmentation: Any
    bbox = [round(v, _DECIMALS) for v in frames.xyxy_to_xywh(region.box_xyxy)]
    shapes = region.shapes or ([region] if region.kind != "rectangle" else [])
    outlines = [s.polygon for s in shapes if s.kind == "polygon" and s.polygon is not None]
    if len(outlines) < len(shapes):
        # a brush among the shapes: the shapes' union as one mask, in the asked format
        mask = region.to_mask()
        if masks == "rle":
            segmentation = mask_to_coco_rle(mask)
            area = float(mask.sum())
        else:
            polygons = mask_to_polygons(mask)
            segmentation = [_flat(p) for p in polygons]
            drawn = coco_segmentation_to_mask(segmentation, region.width, region.height)
            area = float(drawn.sum())
            if area != float(mask.sum()):
                logger.warning(
                    "task %s, region %s: the mask has holes, which COCO polygons cannot hold; "
                    "they are filled (IoU %.4f). Use masks='rle' to keep them.",
                    region.task_id,
                    region.region_id,
                    mask_iou(mask, drawn),
                )
    elif shapes:  # polygons, written as they are
        segmentation = [_flat(p) for p in outlines]
        area = float(coco_segmentation_to_mask(segmentation, region.width, region.height).sum())
    elif region.polygon is not None:  # a rotated rectangle: its corners
        segmentation = [_flat(region.polygon)]
        area = float(coco_segmentation_to_mask(segmentation, region.width, region.height).sum())
    else:
        segmentation = box_outline(bbox)
        x1, y1, x2, y2 = region.box_xyxy
        area = float((x2 - x1) * (y2 - y1))
    ann: dict[str, Any] = {
        "image_id": image_id,
        "bbox": bbox,
        "area": round(area, _DECIMALS),
        "iscrowd": 0,
        "segmentation": segmentation,
        "ls_region_id": region.region_id,
    }
    if region.source == "prediction":
        # A results file needs a score; unscored predictions rank as certain.
        ann["score"] = 1.0 if region.score is None else float(region.score)
    if region.kind == "rectangle" and region.shapes:
        ann["ls_shape_region_ids"] = [s.region_id for s in region.shapes]
    elif region.kind == "rectangle" and region.polygon is None:
        ann[BOX_ONLY] = True
    if with_source:
        ann["source"] = region.source
    if region.prompt:
        ann["prompt"] = region.prompt
    return ann


def _flat(points: np.ndarray) -> list[float]:
    return [round(float(v), _DECIMALS) for v in np.asarray(points).reshape(-1)]


def _task_of(images: list[dict[str, Any]], image_id: Any) -> Any:
    return next((im.get("ls_task_id") for im in images if im["id"] == image_id), None)


def _summarize(errors: list[LabelStudioFormatError]) -> str:
    lines = [str(e) for e in errors[:_MAX_LISTED_ERRORS]]
    more = len(errors) - len(lines)
    if more:
        lines.append(f"... and {more} more")
    return (
        f"{len(errors)} bad task(s)/region(s) in the Label Studio export (pass --skip-bad / "
        "skip_bad=True to export the rest):\n  " + "\n  ".join(lines)
    )
