"""What a retraining job adds to its corrections: pasted copies (``RETRAIN_COPY_PASTE``,
:func:`copy_paste`) and presence questions answered "No." (:func:`absence_records`).

A team teaching the model a word it never saw corrects a few hundred tasks; the model
then has to learn the word from those few scenes, and with a few hundred of them it learns
the scenes as much as the word (bench/RESULTS.md: 200 corrections teach the bundled model
less than 800 do, whatever the number of epochs). Simple Copy-Paste (Ghiasi et al., CVPR
2021) multiplies the contexts an object is seen in: the corrected object, cut out by its
mask, is pasted into another correction's image at another place, and the same expression
refers to it there - new distractors around it, new position, same appearance. No library
the project uses does this on referring-expression records (torchvision's and albumentations'
transforms change one image and its own targets; they do not move an object between
images), hence this module.

Per eligible correction, ``k`` new records: its referred objects, as one block that keeps
their layout, scaled by the ratio of the two images' short sides (so "small" and "large",
relative to the canvas, stay true), pasted at a random place of a random other training
image. Boxes move and scale with the block; masks are the pasted pixels.

Eligible: a referring-expression record whose every box has a mask (the cut-out needs
it), whose expression has no word of position or order (:data:`POSITION_WORDS`: "the left
cup" does not stay left), and a background image whose own corrections do not use any
word of the expression but articles and generic nouns (a "pink shape" pasted beside an
annotated pink square would be ambiguous). What stays assumed: that the background holds no
UNannotated object the expression also names - true where a project's annotators label
every instance of their words, as in the new-words benchmark.

Deterministic: the records and ``seed`` fix every draw.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nextchat_core.conversation import exists_turns
from nextchat_core.image_processing import load_image
from nextchat_core.masks import mask_to_coco_rle

from .data import Record, _decode_mask, _size, image_key

if TYPE_CHECKING:
    from nextchat_core.config import NextChatConfig

# Words that tie an expression to where its object is in ITS image, or to its order among
# others: a pasted copy would make them false.
POSITION_WORDS = frozenset(
    [
        "left",
        "right",
        "top",
        "bottom",
        "upper",
        "lower",
        "above",
        "below",
        "under",
        "over",
        "middle",
        "center",
        "centre",
        "corner",
        "leftmost",
        "rightmost",
        "topmost",
        "bottommost",
        "uppermost",
        "lowermost",
        "front",
        "behind",
        "back",
        "next",
        "beside",
        "near",
        "nearest",
        "closest",
        "far",
        "farthest",
        "between",
        "first",
        "second",
        "third",
        "last",
    ]
)
# Words two expressions may share without naming the same thing.
GENERIC_WORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "all",
        "every",
        "each",
        "of",
        "in",
        "and",
        "shape",
        "shapes",
        "object",
        "objects",
    ]
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def eligible(record: Record) -> bool:
    """Can ``record`` be cut out and pasted elsewhere (see the module docstring)?"""
    return (
        record.task == "rec"
        and bool(record.boxes)
        and record.masks is not None
        and len(record.masks) == len(record.boxes)
        and all(m is not None for m in record.masks)
        and not (_words(record.text) & POSITION_WORDS)
    )


@dataclasses.dataclass(frozen=True)
class PastedImage:
    """A background with an object block pasted at ``(x, y)`` (original pixels of the
    background), built by :meth:`load` when a training sample is made - a job's copies
    keep only their blocks (``patch``: ``hxwx3`` uint8, ``alpha``: ``hxw`` bool, the
    pasted pixels) and a reference to the background, never whole images."""

    background: Any  # what training.data.Record.image holds: a path or an HxWx3 array
    patch: np.ndarray
    alpha: np.ndarray
    x: int
    y: int

    def load(self) -> np.ndarray:
        """The pasted image, ``HxWx3`` uint8 RGB."""
        canvas = np.array(load_image(self.background))  # a writable copy
        h, w = self.alpha.shape
        region = canvas[self.y : self.y + h, self.x : self.x + w]
        region[self.alpha] = self.patch[self.alpha]
        return canvas

    def __str__(self) -> str:
        return f"{self.background} (pasted at {self.x},{self.y})"


class _Backgrounds:
    """The images of ``records`` and the words their corrections use: which other image
    an expression may be pasted into, or asked about, without becoming ambiguous."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.images: dict[object, Record] = {}
        self.words: dict[object, set[str]] = {}
        for r in records:
            key = image_key(r)
            self.images.setdefault(key, r)
            self.words.setdefault(key, set()).update(_words(r.text) - GENERIC_WORDS)

    def allowed(self, record: Record) -> list[Record]:
        mine, own = _words(record.text) - GENERIC_WORDS, image_key(record)
        return [
            self.images[key]
            for key, words in self.words.items()
            if key != own and not (words & mine)
        ]


def copy_paste(records: Sequence[Record], k: int, *, seed: int = 0) -> list[Record]:
    """``k`` pasted copies of each eligible record of ``records`` (module docstring), each
    into another image of ``records``. Returns the new records: images as
    :class:`PastedImage` (built when the sample is made), masks as COCO RLE, boxes in the
    background's original pixels."""
    if k < 0:
        raise ValueError(f"copy-paste copies per correction must be >= 0, got {k}")
    if k == 0:
        return []
    rng = np.random.default_rng([int(seed), 2021])
    backgrounds = _Backgrounds(records)
    out: list[Record] = []
    for r in records:
        options = backgrounds.allowed(r) if eligible(r) else []
        if not options:
            continue
        block = _cut(r)  # once per correction, whatever k
        for j in range(k):
            bg = options[int(rng.integers(len(options)))]
            source = f"{r.source} pasted into {bg.source} (copy {j + 1})"
            out.append(_paste(block, r, bg, rng, source))
    return out


def absence_records(
    records: Sequence[Record], config: NextChatConfig, *, seed: int = 0
) -> list[Record]:
    """For each boxed ``rec`` record, its presence question ("Is there a pink heart?",
    :func:`~nextchat_core.conversation.exists_turns`) asked of another image of ``records``
    whose corrections use none of its words, answered ``"No."``: the counterpart of
    :func:`training.data.presence_records`' "Yes". Without it, retraining on corrections
    teaches only "Yes" and the presence gate stops holding back what is not there
    (measured: bench/RESULTS.md, new words). Same assumption as copy-paste: the other image
    holds no unannotated object the expression names."""
    rng = np.random.default_rng([int(seed), 2022])
    backgrounds = _Backgrounds(records)
    no = f"{config.template.no_answer}."
    out: list[Record] = []
    for r in records:
        options = backgrounds.allowed(r) if r.task == "rec" and r.boxes else []
        if options:
            bg = options[int(rng.integers(len(options)))]
            question = exists_turns(r.text, config)[0].text
            out.append(
                dataclasses.replace(
                    bg,
                    task="chat",
                    text=question,
                    answer=no,
                    boxes=[],
                    masks=None,
                    source=f"{r.source}: asked of {bg.source} (absent)",
                )
            )
    return out


@dataclasses.dataclass(frozen=True)
class _Block:
    """A record's referred objects cut out of its image: the crop around all of them (its
    boxes and mask pixels), each object's mask in the crop, the boxes relative to the
    crop's top-left corner (``Nx4`` xyxy) and the source image's short side."""

    pixels: np.ndarray  # h x w x 3 uint8
    masks: list[np.ndarray]  # h x w bool each
    boxes: np.ndarray  # N x 4
    short_side: int


def _cut(obj: Record) -> _Block:
    w, h = _size(obj)
    masks = [_decode_mask(m, w, h, obj.source) for m in obj.masks or []]
    boxes = np.asarray(obj.boxes, dtype=np.float64)  # N x 4, xyxy original pixels of obj
    x0, y0 = np.floor(boxes[:, :2].min(0)).astype(int)
    x1, y1 = np.ceil(boxes[:, 2:].max(0)).astype(int)
    for m in masks:
        ys, xs = np.nonzero(m)
        if len(xs):
            x0, y0 = min(x0, xs.min()), min(y0, ys.min())
            x1, y1 = max(x1, xs.max() + 1), max(y1, ys.max() + 1)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    pixels = np.asarray(load_image(obj.image))[y0:y1, x0:x1]
    return _Block(pixels, [m[y0:y1, x0:x1] for m in masks], boxes - [x0, y0, x0, y0], min(w, h))


def _paste(block: _Block, obj: Record, bg: Record, rng: np.random.Generator, source: str) -> Record:
    """``block`` (cut out of ``obj``) pasted into ``bg``'s image at a random place, scaled
    by the ratio of the two images' short sides."""
    from PIL import Image

    bw, bh = _size(bg)
    h, w = block.pixels.shape[:2]
    scale = min(bw, bh) / block.short_side
    tw, th = max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))
    sx, sy = tw / w, th / h
    px = int(rng.integers(0, bw - tw + 1))
    py = int(rng.integers(0, bh - th + 1))
    patch = np.asarray(Image.fromarray(block.pixels).resize((tw, th), Image.Resampling.BILINEAR))
    pasted: list[dict[str, Any]] = []
    union = np.zeros((th, tw), dtype=bool)
    for m in block.masks:
        small = Image.fromarray(m.astype(np.uint8) * 255)
        sm = np.asarray(small.resize((tw, th), Image.Resampling.NEAREST)) > 127
        full = np.zeros((bh, bw), dtype=bool)
        full[py : py + th, px : px + tw] = sm
        pasted.append(mask_to_coco_rle(full))  # compact until the sample is made
        union |= sm
    # the boxes move and scale with the block, clipped to the background
    moved = block.boxes * [sx, sy, sx, sy] + [px, py, px, py]
    return dataclasses.replace(
        obj,
        image=PastedImage(bg.image, np.ascontiguousarray(patch), union, px, py),
        boxes=np.clip(moved, 0, [bw, bh, bw, bh]).tolist(),
        masks=pasted,
        width=bw,
        height=bh,
        source=source,
    )
