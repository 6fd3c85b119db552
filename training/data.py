"""Training data: the formats users have -> the same conversation :class:`Sample` s.

Readers (images are loaded lazily, when a batch is collated):

* **refexp jsonl** - one record per line::

    {"image": "images/1.png",          # path, relative to the jsonl's folder or absolute
     "width": 640, "height": 480,      # optional (read from the image header if absent)
     "task": "rec",                    # "rec" (default) | "caption" | "chat"
     "expression": "the red car",      # rec: what to find
     "question": "...",                # chat: the user's question (no <image> needed)
     "answer": "...",                  # caption/chat: the reply; rec: optional, default
                                       #   the template's "Answer: <at> <boxes> ."
     "boxes": [[x1, y1, x2, y2], ...], # original-pixel xyxy, one per <at> <boxes> pair in
                                       #   text order (caption: the input region first)
     "masks": [RLE | polygon | null]}  # optional, aligned with boxes (COCO segmentation)

* **COCO instances** (+ optional referring expressions) through ``pycocotools``: one
  sample per (image, category) - "all <category>" with every instance as a box - and one
  per referring expression ``{"ann_id" | "image_id"+"bbox", "expression"}``.
* **Label Studio JSON export**: per task, regions grouped by their prompt (a TextArea),
  else by their label name; each group is one sample with the group's boxes and masks.

Every record is checked when read (missing image, box outside the image, box count not
matching the text): a ``ValueError``/``FileNotFoundError`` naming the record
(``file:line``, ``task 7``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelstudio.images import read_image_size, resolve_local_image
from labelstudio.results import (
    LabelStudioFormatError,
    image_reference,
    pair_objects,
    parse_task,
)
from nextchat_core import frames
from nextchat_core.batch import Sample
from nextchat_core.config import NextChatConfig
from nextchat_core.conversation import (
    Turn,
    box_pairs,
    caption_turns,
    chat_turns,
    exists_turns,
    grounding_turns,
)
from nextchat_core.masks import coco_segmentation_to_mask

log = logging.getLogger(__name__)


@dataclass
class Record:
    """A parsed record before its image is opened. Boxes in original pixels."""

    image: Any  # a path, an HxWx3 uint8 array, or an object whose load() returns one
    task: str
    text: str  # rec: expression; chat: question; caption: "" (the region is the input)
    answer: str | None
    boxes: list[list[float]]
    masks: list[Any] | None  # COCO segmentations, HxW bool arrays, or None, per box
    width: int | None
    height: int | None
    source: str


class SampleSet:
    """A list of records that yields :class:`Sample` s (masks decoded on access)."""

    def __init__(self, records: Sequence[Record], config: NextChatConfig) -> None:
        self.records = list(records)
        self.config = config
        self.shuffle = True  # the trainer draws a fresh permutation per epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        return record_to_sample(self.records[i], self.config)

    def __add__(self, other: SampleSet) -> SampleSet:
        return SampleSet(self.records + other.records, self.config)


def record_to_sample(rec: Record, config: NextChatConfig, *, image: Any = None) -> Sample:
    """The conversation for a record (template from ``config``) with its boxes and masks.
    ``image``: what the sample holds instead of the record's image (a feature cache gives
    the original ``(width, height)``: training.feature_cache)."""
    n = len(rec.boxes)
    turns: list[Turn]
    if rec.task == "rec":
        turns = grounding_turns(rec.text, config, num_boxes=n)
        if rec.answer is not None:
            turns[1] = Turn("assistant", rec.answer)
    elif rec.task == "caption":
        turns = caption_turns(config, caption=rec.answer or "")
    elif rec.task == "chat":
        turns = chat_turns(rec.text, config, answer=rec.answer or "")
    else:
        raise ValueError(
            f"{rec.source}: unknown task {rec.task!r}; expected 'rec', 'caption' or 'chat'"
        )
    masks = None
    if rec.masks is not None and any(m is not None for m in rec.masks):
        w, h = _size(rec)
        masks = [None if m is None else _decode_mask(m, w, h, rec.source) for m in rec.masks]
    # an image built when used (training.augment.PastedImage: a pasted copy keeps only its
    # object's pixels until then, so a job's copies do not hold whole images in memory)
    return Sample(
        load_record_image(rec) if image is None else image,
        turns,
        [list(b) for b in rec.boxes],
        masks,
        rec.source,
    )


def load_record_image(rec: Record) -> Any:
    """The record's image as a sample takes it: built now if it is built when used
    (training.augment.PastedImage), else as stored (a path, an array, ...)."""
    return rec.image.load() if hasattr(rec.image, "load") else rec.image


def image_key(rec: Record) -> Any:
    """What identifies a record's image: a path by its value, anything else (an array, an
    image built when used) by identity - records of one image share the key."""
    image = rec.image
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)


def presence_records(records: Sequence[Record], config: NextChatConfig) -> list[Record]:
    """For each boxed ``rec`` record, the presence question its region's confidence will
    ask (``exists_turns``: "Is there a red cross?"), answered ``"{yes}, <at> <boxes> ..."``
    with the same boxes and masks: retraining on corrected boxes then also teaches the
    model to say "Yes" to what it was corrected on - under ``"exists"`` scoring a word the
    model never saw would otherwise stay held back by the presence gate however well its
    boxes were learned."""
    yes = config.template.yes_answer
    return [
        dataclasses.replace(
            r,
            task="chat",
            text=exists_turns(r.text, config)[0].text,
            answer=f"{yes}, {box_pairs(len(r.boxes))}.",
        )
        for r in records
        if r.task == "rec" and r.boxes
    ]


def _size(rec: Record) -> tuple[int, int]:
    if rec.width is None or rec.height is None:
        if isinstance(rec.image, np.ndarray):
            rec.height, rec.width = rec.image.shape[:2]
        else:
            rec.width, rec.height = read_image_size(rec.image)
    return int(rec.width), int(rec.height)


def _decode_mask(m: Any, width: int, height: int, source: str) -> np.ndarray:
    if isinstance(m, np.ndarray):
        if m.shape != (height, width):
            raise ValueError(
                f"{source}: mask shape {m.shape} differs from the image ({height}, {width})"
            )
        return m.astype(bool)
    try:
        return coco_segmentation_to_mask(m, width, height)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: bad mask: {exc}") from exc


def _check_boxes(rec: Record) -> None:
    """Raise naming the record when a box is malformed or outside the image."""
    w, h = _size(rec)
    for k, b in enumerate(rec.boxes):
        frames.check_pixel_box(b, w, h, what=f"{rec.source}: box {k}", tolerance=0.5)


def _check_image(path: Path, source: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{source}: image not found: {path}")
    return path


# ------------------------------------------------------------------- refexp jsonl


def read_refexp_jsonl(path: str | Path, config: NextChatConfig) -> SampleSet:
    """Referring-expression records from a jsonl file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"referring-expression file not found: {path}")
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            source = f"{path.name}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: not valid JSON: {exc}") from exc
            records.append(parse_training_refexp(raw, root=path.parent, source=source))
    return SampleSet(records, config)


def parse_training_refexp(raw: Any, *, root: Path, source: str) -> Record:
    """One jsonl training object -> a checked :class:`Record` (records with predictions,
    to be scored, are :func:`labelstudio.coco.evaluate.parse_scored_refexp`'s)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a record must be a JSON object, got {type(raw).__name__}")
    if "image" not in raw:
        raise ValueError(f"{source}: missing 'image' (path of the image file)")
    task = raw.get("task", "rec")
    boxes = raw.get("boxes")
    if boxes is None and "box" in raw:
        boxes = [raw["box"]]
    if not isinstance(boxes, list):
        raise ValueError(f"{source}: 'boxes' must be a list of [x1, y1, x2, y2], got {boxes!r}")
    text = raw.get("expression") if task == "rec" else raw.get("question", "")
    if task == "rec" and not (isinstance(text, str) and text.strip()):
        raise ValueError(f"{source}: a 'rec' record needs a non-empty 'expression'")
    masks = raw.get("masks")
    if masks is None and "mask" in raw:
        masks = [raw["mask"]]
    if masks is not None and len(masks) != len(boxes):
        raise ValueError(f"{source}: {len(masks)} masks for {len(boxes)} boxes")
    image = Path(raw["image"])
    image = _check_image(image if image.is_absolute() else root / image, source)
    rec = Record(
        image,
        task,
        text or "",
        raw.get("answer"),
        boxes,
        masks,
        raw.get("width"),
        raw.get("height"),
        source,
    )
    _check_boxes(rec)
    return rec


# --------------------------------------------------------------------------- COCO


def read_coco(
    instances: str | Path,
    config: NextChatConfig,
    *,
    image_root: str | Path | None = None,
    refs: str | Path | None = None,
    with_category_samples: bool = True,
) -> SampleSet:
    """Samples from a COCO instances file via pycocotools (see module docstring)."""
    from pycocotools.coco import COCO

    instances = Path(instances)
    if not instances.is_file():
        raise FileNotFoundError(f"COCO instances file not found: {instances}")
    coco = COCO(str(instances))
    root = Path(image_root) if image_root else instances.parent
    records: list[Record] = []

    def image_path(img: dict[str, Any]) -> Path:
        return _check_image(root / img["file_name"], f"{instances.name}: image {img['id']}")

    def xyxy(bbox: Sequence[float]) -> list[float]:
        x, y, w, h = bbox
        return [float(x), float(y), float(x + w), float(y + h)]

    if with_category_samples:
        for img_id in sorted(coco.getImgIds()):
            img = coco.loadImgs(img_id)[0]
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))]
            by_cat: dict[int, list[dict]] = {}
            for a in anns:
                by_cat.setdefault(a["category_id"], []).append(a)
            for cat_id, group in sorted(by_cat.items()):
                group.sort(key=lambda a: a["bbox"][0])  # left to right, as answers list them
                name = coco.loadCats(cat_id)[0]["name"]
                source = f"{instances.name}: image {img_id} category {name!r}"
                masks = [
                    coco.annToMask(a).astype(bool) if a.get("segmentation") else None for a in group
                ]
                rec = Record(
                    image_path(img),
                    "rec",
                    name if len(group) == 1 else f"all {name}",
                    None,
                    [xyxy(a["bbox"]) for a in group],
                    masks,
                    img["width"],
                    img["height"],
                    source,
                )
                _check_boxes(rec)
                records.append(rec)
    if refs is not None:
        ref_list = json.loads(Path(refs).read_text())
        for i, ref in enumerate(ref_list):
            source = f"{Path(refs).name}[{i}]"
            if "ann_id" in ref:
                ann = coco.loadAnns(ref["ann_id"])[0]
                img = coco.loadImgs(ann["image_id"])[0]
                box, mask = (
                    xyxy(ann["bbox"]),
                    (coco.annToMask(ann).astype(bool) if ann.get("segmentation") else None),
                )
            else:
                img = coco.loadImgs(ref["image_id"])[0]
                box, mask = xyxy(ref["bbox"]), None
            rec = Record(
                image_path(img),
                "rec",
                ref["expression"],
                None,
                [box],
                [mask],
                img["width"],
                img["height"],
                source,
            )
            _check_boxes(rec)
            records.append(rec)
    return SampleSet(records, config)


# --------------------------------------------------------------------- Label Studio


ImageResolver = Callable[[str, dict[str, Any]], str | Path]


def read_label_studio(
    export: str | Path | list[dict[str, Any]],
    config: NextChatConfig,
    *,
    image_root: str | Path | None = None,
    resolve_image: ImageResolver | None = None,
    errors: list[LabelStudioFormatError] | None = None,
) -> SampleSet:
    """Samples from a Label Studio JSON export (a file or the list of tasks).

    With ``errors`` given, a region that cannot be used (NaN or negative sizes, outside
    the image, an unknown type) is appended there and skipped, so one bad annotation never
    sinks a retraining job; otherwise it raises ``LabelStudioFormatError``.

    Regions (rectangles, brushes, polygons; see :mod:`labelstudio.results`) are
    grouped by their prompt TextArea, else by their label name; each group becomes one
    referring-expression sample whose expression is the prompt or the label name and whose
    boxes are the group's regions, left to right. Brush and polygon regions carry masks.
    ``resolve_image(ref, task)`` turns the task's image reference into a local path (the
    retraining workers fetch through label-studio-sdk); by default local paths and
    ``image_root`` are tried.
    """
    if isinstance(export, str | Path):
        path = Path(export)
        if not path.is_file():
            raise FileNotFoundError(f"Label Studio export not found: {path}")
        try:
            tasks = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a Label Studio JSON export: {exc}") from exc
        name = path.name
    else:
        tasks, name = export, "tasks"
    if not isinstance(tasks, list):
        raise ValueError(
            f"{name}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}"
        )
    records: list[Record] = []
    for task in tasks:
        # A rectangle and its mask are one object (one box to learn, with that mask).
        regions = pair_objects(parse_task(task, source="annotations", errors=errors))
        if not regions:
            continue
        tid = task.get("id")
        ref = image_reference(task)
        if resolve_image is not None:
            image = Path(resolve_image(ref, task))
        else:
            local = resolve_local_image(ref, image_root)
            if local is None:
                raise FileNotFoundError(
                    f"{name}: task {tid}: image {ref!r} is not a local file; pass image_root "
                    "or an image resolver (the retraining worker fetches with label-studio-sdk)"
                )
            image = local
        _check_image(image, f"{name}: task {tid}")
        groups: dict[str, list] = {}
        for r in regions:
            expression = (r.prompt or "").strip() or (r.label or "")
            if not expression:
                raise ValueError(
                    f"{name}: task {tid}, region {r.region_id}: no label and no prompt to learn from"
                )
            groups.setdefault(expression, []).append(r)
        for expression, group in groups.items():
            group.sort(key=lambda r: float(r.box_xyxy[0]))
            width, height = group[0].width, group[0].height
            masks = [r.to_mask() if r.kind != "rectangle" or r.shapes else None for r in group]
            rec = Record(
                image,
                "rec",
                expression,
                None,
                [[float(v) for v in r.box_xyxy] for r in group],
                masks,
                width,
                height,
                f"{name}: task {tid} {expression!r}",
            )
            _check_boxes(rec)
            records.append(rec)
    return SampleSet(records, config)


def corpus(samples: SampleSet) -> list[str]:
    """Every text of a dataset (for training a small model's tokenizer)."""
    out = []
    for rec in samples.records:
        out.append(rec.text)
        if rec.answer:
            out.append(rec.answer.replace(box_pairs(1), " "))
    return out
