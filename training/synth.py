"""The synthetic grounding domain the demo checkpoint is trained and evaluated on.

A **scene** is a canvas of ``width x height`` original pixels (each side drawn
independently from ``[min_side, max_side]``, so most canvases are not square) holding 1-6
flat, upright shapes on a plain, gradient or noisy background. Every object has a
``shape`` (:data:`SHAPES`), a ``color`` (:data:`COLORS`, one fixed RGB per name) and a
``size`` (``small`` or ``large``: its nominal extent, the side of the square the shape is
inscribed in, is a fraction of the canvas' short side drawn from ``small_range`` or
``large_range``, with a gap between the two so that no size is ambiguous). Shapes are
rasterized with PIL ``ImageDraw`` without anti-aliasing and composited with numpy, so each
object's **mask** (``HxW`` bool, original pixels) is exactly the set of pixels of its
color that remain visible after the later objects are drawn over it, and its **box** is
the tight original-pixel ``xyxy`` box of that mask (:func:`nextchat_core.mask_to_box`,
pixel edges: a pixel at ``(x, y)`` spans ``[x, x+1] x [y, y+1]``). Objects may overlap
but every object keeps at least ``min_visible`` of its drawn pixels; objects of the same
color never touch (their nominal squares stay apart) so they never merge on screen; and
every object color keeps at least ``min_contrast`` RGB distance from every pixel value the
background can take (:func:`background_contrast`).

Referring expressions (``task = "rec"``), each resolving to exactly the boxed objects:

* ``the {color} {shape}`` / ``the {shape}`` / ``the {color} shape`` when that is unique;
* ``the {size} {color} {shape}`` or ``the {position} {color} {shape}`` (``position`` one
  of :data:`POSITION_WORDS`: ``leftmost``, ``rightmost``, ``topmost``, ``bottom``) only
  when color + shape is ambiguous, and ``the {position} {size} {color} {shape}`` when
  neither word alone suffices. A position word picks the extreme visible-box centre
  among the objects matching the other words, and is used only when that object beats
  the runner-up by at least ``position_margin`` of the canvas side along that axis;
* multi-instance (the ``multi`` task, written as ``task = "rec"`` with several boxes):
  ``all {color} shapes``, ``all {shape}s``, ``all {color} {shape}s`` for groups of 2 or
  more, boxes sorted left to right (by ``x1``, then ``y1``).

Region captions (``task = "caption"``): the input box of one object in, ``a|an {size}
{color} {shape}`` out (only objects whose box overlaps no other object's box at IoU > 0.5).
Chats (``task = "chat"``): ``Is there a|an {color} {shape}?`` (or ``{shape}`` /
``{color} shape``), answered ``Yes, <at> <boxes> ... .`` with one pair per matching object
(left to right), or ``No.`` when nothing matches.

Record format
-------------
:func:`write_dataset` writes ``images/{scene_id:06d}.png`` and ``data.jsonl`` (plus
``synth.json``: seed, scene count and config). Each ``data.jsonl`` line is one JSON
object, with always the same keys, in this order:

``image`` (str)
    image path relative to the jsonl file, ``"images/000123.png"``.
``width``, ``height`` (int)
    image size in original pixels.
``task`` (str)
    ``"rec"``, ``"caption"`` or ``"chat"``.
``expression`` (str | null)
    the referring expression (``rec``; null otherwise). The question and the answer come
    from the checkpoint's template (``grounding_turns``), with ``len(boxes)`` box pairs.
``question`` (str | null)
    the user's question (``chat``; null otherwise; ``chat_turns`` prepends ``<image>``).
    A caption's question is the template's ``caption_question`` with one ``<at> <boxes>``.
``answer`` (str | null)
    the assistant's answer (``chat``: ``"Yes, <at> <boxes>."`` / ``"No."``; ``caption``:
    ``"a small green star"``; null for ``rec``).
``boxes`` (list of ``[x1, y1, x2, y2]`` ints)
    original-pixel xyxy, one per ``<at> <boxes>`` pair of the conversation, in text
    order: ``rec`` - the referred objects; ``caption`` - the one INPUT region box (the
    pair in the question); ``chat`` - the boxes of the answer (``[]`` for ``No.``).
``masks`` (list of COCO RLE dict | null)
    aligned with ``boxes``: ``{"size": [h, w], "counts": str}`` of the object's visible
    mask (:func:`nextchat_core.mask_to_coco_rle`); the synthetic domain always
    gives masks, the format allows null.
``attributes`` (list of ``{"shape", "color", "size"}``)
    aligned with ``boxes``, for auxiliary losses and analysis.
``scene_id`` (int)
    the scene's index in the generated sequence (also the image's file number).

Everything is deterministic from the seed: scene ``i`` of seed ``s`` draws from
``numpy.random.default_rng([s, i])``, so it does not depend on how many scenes are
generated, and the same seed gives byte-identical images and records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from nextchat_core import frames
from nextchat_core.conversation import box_pairs
from nextchat_core.files import atomic_write
from nextchat_core.masks import coco_segmentation_to_mask, mask_to_box, mask_to_coco_rle

if TYPE_CHECKING:
    from nextchat_core.batch import Sample
    from nextchat_core.config import NextChatConfig

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# One fixed RGB per color name, far apart from each other (closest pair: orange/yellow, 80).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Words the bundled demo model never saw (its recipe draws only SHAPES and COLORS): the
# vocabulary of the new-words benchmark (training.new_words). Each new color keeps >= 100
# RGB from every color above and from the others (closest: brown/red).
NEW_SHAPES: tuple[str, ...] = ("cross", "heart", "arrow", "crescent")
NEW_COLORS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 150, 200),
    "cyan": (40, 210, 230),
    "brown": (125, 80, 25),
}
# Every name a scene may draw (SynthConfig defaults to the original vocabulary only).
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NEW_COLORS}
SIZES: tuple[str, ...] = ("small", "large")
# An unnamed random shape (a star-convex polygon of 5-12 vertices), drawn only for the
# perception pre-training (SynthConfig.blob_prob): no word names it and no record refers to
# it; the tower learns its objectness, colour and extent from its pixels, not from a class
# (a stand-in for the open-ended images CLIP is pre-trained on, beyond any task's words).
BLOB = "blob"
# What a per-object class id is for a BLOB's shape: ignored by torch's cross-entropy.
IGNORE_CLASS = -100
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "texture")
# What SynthConfig() draws from (the held-out split's renderer): "texture" is opt-in.
DEFAULT_BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise")
# The answer to a referring expression that matches nothing in the image ("absent" task).
ABSENT_ANSWER = "There is none."
# "multi" is a rec record with several boxes; it has its own weight in the mix.
# "absent" is a rec record naming a color + shape that is not in the scene: no boxes, the
# answer ABSENT_ANSWER (the model must learn to answer in text, without <at>).
TASKS: tuple[str, ...] = ("rec", "multi", "caption", "chat", "absent")
DEFAULT_TASK_MIX: dict[str, float] = {
    "rec": 0.5,
    "multi": 0.15,
    "caption": 0.15,
    "chat": 0.2,
    "absent": 0.0,
}
# position word -> (axis of the visible-box centre: 0 = x, 1 = y; +1 largest, -1 smallest)
POSITION_WORDS: dict[str, tuple[int, int]] = {
    "leftmost": (0, -1),
    "rightmost": (0, 1),
    "topmost": (1, -1),
    "bottom": (1, 1),
}
# Relative weights of the unique single-object forms: mostly color + shape, as in the issue.
_FORM_WEIGHTS: dict[str, float] = {"color_shape": 0.6, "shape": 0.2, "color": 0.2}
# Chat queries: color + shape, shape only, color only.
_QUERY_WEIGHTS: dict[str, float] = {"color_shape": 0.7, "shape": 0.15, "color": 0.15}
_GRADIENT_LEVELS = 4096


# ----------------------------------------------------------------------------- config


@dataclass
class SynthConfig:
    """What the generator draws. Validated on creation (``ValueError`` on bad values)."""

    seed: int = 0  # seed used by generate()/write_dataset() when they are given none
    min_side: int = 160  # canvas width and height are drawn independently from
    max_side: int = 512  # [min_side, max_side] original pixels
    min_objects: int = 1
    max_objects: int = 6
    # nominal object extent (side of the square the shape is inscribed in) as a fraction of
    # the canvas' short side; the gap between the ranges keeps "small"/"large" unambiguous
    small_range: tuple[float, float] = (0.06, 0.14)
    large_range: tuple[float, float] = (0.21, 0.35)
    small_prob: float = 0.5  # probability that an object is small
    # probability that a drawn object is an unnamed BLOB instead of one of ``shapes``: for
    # the perception pre-training's scenes only (render_scene); generate() refuses it
    blob_prob: float = 0.0
    shapes: tuple[str, ...] = SHAPES  # restrict for curricula; names from ALL_SHAPES
    colors: tuple[str, ...] = tuple(COLORS)  # names from ALL_COLORS
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS  # drawn uniformly
    noise_amplitude: int = 24  # "noise": uniform per-channel noise in [-a, a]
    # "texture": a smooth random field (a coarse grid of cells of ~texture_scale px,
    # bicubic-upsampled) within [-a, a] per channel around the base color
    texture_amplitude: int = 40
    texture_scale: int = 24
    # Rendering variation (all 0 by default: flat, aliased, lossless). Per scene:
    antialias_prob: float = 0.0  # shapes supersampled 4x, edges alpha-blended (mask: >= 50 %)
    blur_prob: float = 0.0  # Gaussian blur, sigma uniform in blur_sigma
    blur_sigma: tuple[float, float] = (0.4, 1.2)
    noise_prob: float = 0.0  # additive Gaussian pixel noise, sigma uniform in pixel_noise
    pixel_noise: tuple[float, float] = (2.0, 8.0)
    jpeg_prob: float = 0.0  # JPEG round trip, quality uniform in jpeg_quality
    jpeg_quality: tuple[int, int] = (50, 95)
    gradient_span: int = 90  # "gradient": max per-channel difference between the two ends
    min_contrast: float = 80.0  # min RGB distance from an object color to any background pixel
    min_visible: float = 0.75  # fraction of its drawn pixels every object keeps visible
    repeat_prob: float = 0.35  # a new object copies an earlier one's color and/or shape
    position_margin: float = 0.04  # a position word needs this lead (fraction of the side)
    task_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_MIX))
    records_per_scene: int = 4  # fewer when a scene cannot give that many distinct records
    chat_yes_prob: float = 0.5  # fraction of chat questions whose answer is "Yes"
    easy: bool = False  # curriculum: 1-2 objects, all large (overrides counts and small_prob)
    max_attempts: int = 60  # placement tries per object before the scene keeps fewer objects

    def __post_init__(self) -> None:
        for name in ("small_range", "large_range", "blur_sigma", "pixel_noise", "jpeg_quality"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} must be (low, high) fractions, got {value}")
            kind = int if name == "jpeg_quality" else float
            setattr(self, name, (kind(value[0]), kind(value[1])))
        self.shapes = tuple(self.shapes)
        self.colors = tuple(self.colors)
        self.backgrounds = tuple(self.backgrounds)
        self.task_mix = dict(self.task_mix)
        self.validate()

    def validate(self) -> None:
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(
                f"canvas sides need 32 <= min_side <= max_side, got min_side={self.min_side}, "
                f"max_side={self.max_side}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 12:
            raise ValueError(
                f"object counts need 1 <= min_objects <= max_objects <= 12, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        (s_lo, s_hi), (l_lo, l_hi) = self.small_range, self.large_range
        if not 0.0 < s_lo <= s_hi < l_lo <= l_hi <= 0.5:
            raise ValueError(
                "object size ranges (fractions of the short side) need "
                "0 < small_lo <= small_hi < large_lo <= large_hi <= 0.5 so that small and "
                f"large never meet, got small_range={self.small_range}, "
                f"large_range={self.large_range}"
            )
        for name, value, allowed in (
            ("shapes", self.shapes, ALL_SHAPES),
            ("colors", self.colors, tuple(ALL_COLORS)),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [v for v in value if v not in allowed]
            if not value or unknown or len(set(value)) != len(value):
                raise ValueError(
                    f"{name} must be a non-empty list of distinct names from {list(allowed)}, "
                    f"got {list(value)}"
                )
        unknown = [t for t in self.task_mix if t not in TASKS]
        weights = list(self.task_mix.values())
        if unknown or any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(
                f"task_mix must map task names from {list(TASKS)} to non-negative weights "
                f"with a positive sum, got {self.task_mix}"
            )
        for name in (
            "small_prob",
            "blob_prob",
            "repeat_prob",
            "chat_yes_prob",
            "antialias_prob",
            "blur_prob",
            "noise_prob",
            "jpeg_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must lie in (0, 1], got {self.min_visible}")
        if not 0.0 <= self.position_margin < 0.5:
            raise ValueError(f"position_margin must lie in [0, 0.5), got {self.position_margin}")
        if not 0.0 <= self.min_contrast <= 250.0:
            raise ValueError(
                f"min_contrast (RGB distance) must lie in [0, 250], got {self.min_contrast}"
            )
        if not 0 <= self.noise_amplitude <= 64 or not 0 <= self.gradient_span <= 255:
            raise ValueError(
                "need 0 <= noise_amplitude <= 64 and 0 <= gradient_span <= 255, got "
                f"{self.noise_amplitude} and {self.gradient_span}"
            )
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(
                f"jpeg_quality must be (low, high) in [1, 100], got {self.jpeg_quality}"
            )
        for name in ("blur_sigma", "pixel_noise"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(
                    f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}"
                )
        if not 0 <= self.texture_amplitude <= 64 or self.texture_scale < 2:
            raise ValueError(
                "need 0 <= texture_amplitude <= 64 and texture_scale >= 2, got "
                f"{self.texture_amplitude} and {self.texture_scale}"
            )
        if self.records_per_scene < 1 or self.max_attempts < 1:
            raise ValueError(
                f"records_per_scene and max_attempts must be >= 1, got "
                f"{self.records_per_scene} and {self.max_attempts}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Background:
    """How the background was drawn. ``colors``: the plain color, the two gradient ends,
    or the noise's base color; ``noise_amplitude``: per-channel noise half-range."""

    kind: str
    colors: tuple[tuple[int, int, int], ...]
    noise_amplitude: int = 0
    angle: float = 0.0  # gradient direction in radians (0: left to right, pi/2: top down)


@dataclass
class SceneObject:
    """One drawn object. ``mask``: ``HxW`` bool of its VISIBLE pixels (original pixels);
    ``box``: tight original-pixel xyxy of ``mask`` (``mask_to_box``); ``center``
    and ``extent``: its nominal placement (centre and side of its bounding square, original
    pixels); ``drawn_area``: pixels it covered when drawn, before later objects."""

    shape: str
    color: str
    size: str
    mask: np.ndarray
    box: np.ndarray
    center: tuple[float, float]
    extent: float
    drawn_area: int

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size}

    @property
    def rgb(self) -> tuple[int, int, int]:
        return ALL_COLORS[self.color]

    @property
    def box_center(self) -> tuple[float, float]:
        """Centre of the visible box, original pixels (what position words compare)."""
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass
class Scene:
    """A rendered scene. ``image``: ``HxWx3`` uint8 RGB; ``objects`` in drawing order
    (later ones on top)."""

    scene_id: int
    image: np.ndarray
    objects: list[SceneObject]
    background: Background

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass
class DenseAnnotations:
    """Per-pixel targets of one scene (for stage-0 pre-training).

    ``label_map``: ``HxW`` int32, the index into ``attributes`` of the object visible at
    each original pixel, ``-1`` on the background. ``attributes``: one
    ``{"shape", "color", "size"}`` per object; ``shape_ids``/``color_ids``/``size_ids``:
    the same as indices into :data:`SHAPES`, ``list(COLORS)`` and :data:`SIZES` (int64
    arrays of length N; a :data:`BLOB`'s shape is :data:`IGNORE_CLASS`); ``boxes``:
    ``Nx4`` original-pixel xyxy."""

    label_map: np.ndarray
    attributes: list[dict[str, str]]
    shape_ids: np.ndarray
    color_ids: np.ndarray
    size_ids: np.ndarray
    boxes: np.ndarray


def background_contrast(rgb: Sequence[int], background: Background) -> float:
    """Smallest RGB (Euclidean) distance between ``rgb`` and any pixel value the background
    can take: exact for plain and noise (the noise box clipped to ``[0, 255]``), and a
    lower bound for gradients (distance to the segment between the ends, less the
    rounding of at most half a level per channel)."""
    c = np.asarray(rgb, dtype=np.float64)
    if background.kind == "plain":
        return float(np.linalg.norm(c - np.asarray(background.colors[0], dtype=np.float64)))
    if background.kind in ("noise", "texture"):
        base = np.asarray(background.colors[0], dtype=np.float64)
        lo = np.clip(base - background.noise_amplitude, 0, 255)
        hi = np.clip(base + background.noise_amplitude, 0, 255)
        return float(np.linalg.norm(np.maximum(np.maximum(lo - c, 0.0), c - hi)))
    if background.kind == "gradient":
        a, b = (np.asarray(v, dtype=np.float64) for v in background.colors)
        d = b - a
        denom = float(d @ d)
        t = 0.0 if denom == 0 else float(np.clip((c - a) @ d / denom, 0.0, 1.0))
        return max(0.0, float(np.linalg.norm(c - (a + t * d))) - 0.5 * math.sqrt(3))
    raise ValueError(f"unknown background kind {background.kind!r}; expected one of {BACKGROUNDS}")


def contrast_ok(rgb: Sequence[int], background: Background, min_contrast: float) -> bool:
    """Whether a color of ``rgb`` stands out from every pixel of ``background``."""
    return background_contrast(rgb, background) >= min_contrast


def render_scene(
    rng: np.random.Generator,
    config: SynthConfig,
    *,
    scene_id: int = 0,
    objects: Sequence[tuple[str, str]] | None = None,
) -> Scene:
    """Draw one scene: canvas size, background, then objects placed one by one under the
    visibility and same-color constraints (an object that finds no place within
    ``max_attempts`` tries is dropped; a scene always keeps at least one, the first).

    ``objects``: the ``(shape, color)`` of each object to draw, in drawing order (names
    from :data:`ALL_SHAPES` / :data:`ALL_COLORS`), instead of drawing them from the config;
    the background then keeps ``min_contrast`` from every one of their colors. Sizes and
    positions are drawn as always."""
    if objects is not None:
        objects = list(objects)
        bad = [o for o in objects if o[0] not in ALL_SHAPES or o[1] not in ALL_COLORS]
        if not objects or bad:
            raise ValueError(
                "objects must be a non-empty list of (shape, color) names from "
                f"{list(ALL_SHAPES)} and {list(ALL_COLORS)}, got {objects}"
            )
    width = int(rng.integers(config.min_side, config.max_side + 1))
    height = int(rng.integers(config.min_side, config.max_side + 1))
    required = tuple(dict.fromkeys(c for _, c in objects)) if objects else ()
    background, palette = _draw_background(rng, config, required)
    image = _render_background(rng, background, width, height, config.texture_scale)
    antialias = bool(config.antialias_prob) and bool(rng.random() < config.antialias_prob)

    if objects is not None:
        n_target = len(objects)
    elif config.easy:
        n_target = int(rng.integers(1, 3))
    else:
        n_target = int(rng.integers(config.min_objects, config.max_objects + 1))
    short = min(width, height)
    placed: list[_Placed] = []
    for k in range(n_target):
        forced = objects[k] if objects is not None else None
        for _attempt in range(config.max_attempts):
            candidate = _propose(
                rng, config, placed, palette, width, height, short, antialias, forced
            )
            if candidate is not None and _fits(candidate, placed, config):
                for other in placed:  # the new object is drawn on top of the earlier ones
                    covered = other.visible[candidate.slices] & candidate.crop
                    other.visible[candidate.slices] &= ~candidate.crop
                    other.visible_count -= int(np.count_nonzero(covered))
                placed.append(candidate)
                break
        else:
            logger.debug("scene %d: no room for object %d; keeping fewer", scene_id, len(placed))
    if not placed:  # cannot happen with sane sizes: the first object always fits
        raise RuntimeError(f"scene {scene_id}: could not place a single object ({config})")

    drawn: list[SceneObject] = []
    for p in placed:
        if p.alpha is None:
            image[p.slices][p.crop] = ALL_COLORS[p.color]
        else:  # anti-aliased edge: blend by coverage
            region = image[p.slices].astype(np.float32)
            a = p.alpha[..., None]
            color = np.asarray(ALL_COLORS[p.color], dtype=np.float32)
            image[p.slices] = np.rint(region * (1.0 - a) + color * a).astype(np.uint8)
    image = _degrade(rng, image, config)
    for p in placed:
        # The visible mask lies inside the drawn crop: its tight box there, shifted by the
        # crop's corner, is the full-canvas box at a fraction of the cost.
        box = mask_to_box(p.visible[p.slices])
        assert box is not None and p.visible_count > 0, "min_visible keeps every object visible"
        box += [p.slices[1].start, p.slices[0].start] * 2
        drawn.append(
            SceneObject(
                shape=p.shape,
                color=p.color,
                size=p.size,
                mask=p.visible,
                box=box,
                center=p.center,
                extent=p.extent,
                drawn_area=p.area,
            )
        )
    return Scene(scene_id=scene_id, image=image, objects=drawn, background=background)


def shape_id(shape: str) -> int:
    """The class of ``shape`` among :data:`SHAPES`; :data:`IGNORE_CLASS` for a :data:`BLOB`."""
    return IGNORE_CLASS if shape == BLOB else SHAPES.index(shape)


def dense_annotations(scene: Scene) -> DenseAnnotations:
    """The scene's per-pixel object index map and per-object attributes (stage-0 targets)."""
    label = np.full((scene.height, scene.width), -1, dtype=np.int32)
    for i, obj in enumerate(scene.objects):
        label[obj.mask] = i  # visible masks are disjoint, so order does not matter
    color_names = list(COLORS)
    return DenseAnnotations(
        label_map=label,
        attributes=[o.attributes for o in scene.objects],
        shape_ids=np.array([shape_id(o.shape) for o in scene.objects], dtype=np.int64),
        color_ids=np.array([color_names.index(o.color) for o in scene.objects], dtype=np.int64),
        size_ids=np.array([SIZES.index(o.size) for o in scene.objects], dtype=np.int64),
        boxes=np.array([o.box for o in scene.objects], dtype=np.float64).reshape(-1, 4),
    )


@dataclass
class _Placed:
    """A placed object while the scene is built: its drawn pixels ``crop`` at ``slices``
    of the canvas, and its full-canvas ``visible`` mask, updated as others cover it."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    extent: float
    slices: tuple[slice, slice]
    crop: np.ndarray
    area: int
    visible: np.ndarray
    visible_count: int
    alpha: np.ndarray | None = None  # anti-aliased coverage of the crop, float32 in [0, 1]


def _degrade(rng: np.random.Generator, image: np.ndarray, config: SynthConfig) -> np.ndarray:
    """The per-scene rendering variation of ``config`` (blur, pixel noise, JPEG), drawn
    in that order; masks and boxes stay those of the clean scene. Draws nothing from
    ``rng`` when every probability is 0, so default scenes are unchanged."""
    if config.blur_prob and rng.random() < config.blur_prob:
        from PIL import ImageFilter

        sigma = float(rng.uniform(*config.blur_sigma))
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
    if config.noise_prob and rng.random() < config.noise_prob:
        sigma = float(rng.uniform(*config.pixel_noise))
        noisy = image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape)
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if config.jpeg_prob and rng.random() < config.jpeg_prob:
        import io

        quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        image = np.asarray(Image.open(buf).convert("RGB"))
    return np.ascontiguousarray(image)


def _rgb(values: Any) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in values)
    return r, g, b


def _draw_background(
    rng: np.random.Generator, config: SynthConfig, required: Sequence[str] = ()
) -> tuple[Background, list[str]]:
    """A background and the configured colors that keep ``min_contrast`` against it (and
    against which every ``required`` color does too)."""
    need = min(3, len(config.colors))
    for _ in range(1000):
        kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
        base = _rgb(rng.integers(0, 256, size=3))
        if kind == "plain":
            bg = Background("plain", (base,))
        elif kind == "noise":
            bg = Background("noise", (base,), noise_amplitude=config.noise_amplitude)
        elif kind == "texture":
            bg = Background("texture", (base,), noise_amplitude=config.texture_amplitude)
        else:
            offset = rng.integers(-config.gradient_span, config.gradient_span + 1, size=3)
            end = _rgb(np.clip(np.asarray(base) + offset, 0, 255))
            angle = float(rng.uniform(0.0, 2.0 * math.pi))
            bg = Background("gradient", (base, end), angle=angle)
        palette = [c for c in config.colors if contrast_ok(ALL_COLORS[c], bg, config.min_contrast)]
        if len(palette) >= need and all(
            contrast_ok(ALL_COLORS[c], bg, config.min_contrast) for c in required
        ):
            return bg, palette
    raise ValueError(
        f"no background keeps min_contrast={config.min_contrast} against {need} of the colors "
        f"{list(config.colors)} and all of {list(required)}; lower min_contrast or allow more "
        "colors"
    )


def _render_background(
    rng: np.random.Generator, bg: Background, width: int, height: int, texture_scale: int = 24
) -> np.ndarray:
    """``HxWx3`` uint8 background in original pixels."""
    if bg.kind == "texture":
        a = bg.noise_amplitude
        gw, gh = max(2, width // texture_scale + 2), max(2, height // texture_scale + 2)
        grid = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
        field_ = np.asarray(
            Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC),
            dtype=np.float64,
        )
        offset = (field_ / 255.0 * 2.0 - 1.0) * a  # within [-a, a], smooth
        base = np.asarray(bg.colors[0], dtype=np.float64)
        return np.clip(np.rint(base + offset), 0, 255).astype(np.uint8)
    if bg.kind == "plain":
        row = np.tile(np.asarray(bg.colors[0], dtype=np.uint8), width)  # np.full is 50x slower
        return np.tile(row, (height, 1)).reshape(height, width, 3)
    if bg.kind == "noise":
        a = bg.noise_amplitude
        noise = rng.integers(-a, a + 1, size=(height, width, 3), dtype=np.int16)
        return np.clip(noise + np.asarray(bg.colors[0], dtype=np.int16), 0, 255).astype(np.uint8)
    # Gradient along `angle` over the pixel centres. t is separable (t = tx + ty), so it is
    # quantized to _GRADIENT_LEVELS steps and the colors looked up in a table: 8x faster
    # than interpolating every pixel in floating point, and every value still lies on the
    # segment between the two ends (up to rounding), as background_contrast assumes.
    tx = (np.arange(width) + 0.5) * math.cos(bg.angle)
    ty = (np.arange(height) + 0.5) * math.sin(bg.angle)
    tx -= tx.min()
    ty -= ty.min()
    scale = (_GRADIENT_LEVELS - 1) / max(float(tx.max() + ty.max()), 1e-6)
    qx = np.floor(tx * scale).astype(np.int32)
    qy = np.floor(ty * scale).astype(np.int32)
    t = np.arange(_GRADIENT_LEVELS, dtype=np.float64)[:, None] / (_GRADIENT_LEVELS - 1)
    start = np.asarray(bg.colors[0], dtype=np.float64)
    lut = np.zeros((_GRADIENT_LEVELS, 4), dtype=np.uint8)
    lut[:, :3] = np.rint(start + t * (np.asarray(bg.colors[1], dtype=np.float64) - start))
    packed = lut.view(np.uint32).ravel()[qy[:, None] + qx[None, :]]  # one gather per pixel
    return np.ascontiguousarray(packed.view(np.uint8).reshape(height, width, 4)[..., :3])


def _propose(
    rng: np.random.Generator,
    config: SynthConfig,
    placed: list[_Placed],
    palette: list[str],
    width: int,
    height: int,
    short: int,
    antialias: bool = False,
    forced: tuple[str, str] | None = None,
) -> _Placed | None:
    """Draw one candidate object (attributes, extent, position) and rasterize it
    (``antialias``: at 4x, box-filtered down to a coverage ``alpha``; drawn = >= 50 %).
    ``forced``: its ``(shape, color)``, not drawn."""
    small = False if config.easy else bool(rng.random() < config.small_prob)
    lo, hi = config.small_range if small else config.large_range
    extent = float(rng.uniform(lo, hi)) * short
    r = extent / 2.0
    cx = float(rng.uniform(r, width - r))
    cy = float(rng.uniform(r, height - r))
    if forced is not None:
        shape, color = forced
    else:
        shape = config.shapes[int(rng.integers(len(config.shapes)))]
        color = palette[int(rng.integers(len(palette)))]
        if config.blob_prob and rng.random() < config.blob_prob:  # no draw when 0: the
            shape = BLOB  # default scenes stay the same pixel for pixel
    if forced is None and placed and rng.random() < config.repeat_prob:
        # Repeated colors/shapes are what makes size, position and multi-instance
        # expressions necessary; independent draws rarely repeat a color + shape.
        src = placed[int(rng.integers(len(placed)))]
        mode = int(rng.integers(3))
        if mode in (0, 1):
            color = src.color
        if mode in (0, 2):
            shape = src.shape
    outline = _blob_outline(rng) if shape == BLOB else None
    x0, y0 = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
    x1, y1 = min(width, math.ceil(cx + r) + 2), min(height, math.ceil(cy + r) + 2)
    alpha = None
    if antialias:
        k = 4
        big = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
        _draw_shape(ImageDraw.Draw(big), shape, (cx - x0) * k, (cy - y0) * k, r * k, 255, outline)
        small_img = big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.asarray(small_img, dtype=np.float32) / 255.0
        crop = alpha >= 0.5
        alpha = np.where(crop | (alpha > 0), alpha, 0.0).astype(np.float32)
    else:
        crop_img = Image.new("1", (x1 - x0, y1 - y0), 0)
        _draw_shape(ImageDraw.Draw(crop_img), shape, cx - x0, cy - y0, r, 1, outline)
        crop = np.asarray(crop_img, dtype=bool)
    area = int(np.count_nonzero(crop))
    if area == 0:
        return None
    slices = (slice(y0, y1), slice(x0, x1))
    visible = np.zeros((height, width), dtype=bool)
    visible[slices] = crop
    return _Placed(
        shape=shape,
        color=color,
        size="small" if small else "large",
        center=(cx, cy),
        extent=extent,
        slices=slices,
        crop=crop,
        area=area,
        visible=visible,
        visible_count=area,
        alpha=alpha,
    )


def _fits(candidate: _Placed, placed: list[_Placed], config: SynthConfig) -> bool:
    """Same-color objects keep their nominal squares 2 px apart; every earlier object
    keeps ``min_visible`` of its drawn pixels under the candidate."""
    cx, cy = candidate.center
    for other in placed:
        if other.color == candidate.color:
            gap = (candidate.extent + other.extent) / 2.0 + 2.0
            if abs(cx - other.center[0]) < gap and abs(cy - other.center[1]) < gap:
                return False
        covered = int(np.count_nonzero(other.visible[candidate.slices] & candidate.crop))
        if covered and other.visible_count - covered < config.min_visible * other.area:
            return False
    return True


def _regular_polygon(
    cx: float, cy: float, r: float, n: int, start: float
) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(start + 2 * math.pi * k / n),
            cy + r * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _blob_outline(rng: np.random.Generator) -> np.ndarray:
    """A :data:`BLOB`'s outline: ``n x 2`` (angle, radius as a fraction of the half-side)
    of 5-12 vertices at sorted random angles, radii 0.3-1, scaled so that the farthest
    vertex touches the nominal square's edge (the blob spans its square on one axis)."""
    n = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
    radii = rng.uniform(0.3, 1.0, n)
    reach = np.maximum(np.abs(np.cos(angles)), np.abs(np.sin(angles))) * radii
    return np.stack([angles, radii / reach.max()], axis=1)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: int = 1,
    outline: np.ndarray | None = None,
) -> None:
    """Rasterize ``shape`` inscribed in the square of half-side ``r`` centred at
    ``(cx, cy)`` (pixels of ``draw``'s image), upright, fill 1, no anti-aliasing;
    a :data:`BLOB` by its ``outline`` (:func:`_blob_outline`)."""
    if shape == BLOB:
        if outline is None:
            raise ValueError("a blob is drawn from its outline (_blob_outline)")
        draw.polygon(
            [(cx + r * f * math.cos(t), cy + r * f * math.sin(t)) for t, f in outline], fill=fill
        )
        return
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if shape == "crescent":  # a disc less a disc shifted right: horns to the right
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        d = 0.45 * r
        draw.ellipse([cx - r + d, cy - 0.9 * r, cx + r + d, cy + 0.9 * r], fill=0)
        return
    if shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "triangle":  # apex up, base as wide as the square
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "diamond":  # taller than wide, so it is never a rotated square
        pts = [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    elif shape == "hexagon":  # flat top
        pts = _regular_polygon(cx, cy, r, 6, 0.0)
    elif shape == "star":  # five points, one up
        outer = _regular_polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _regular_polygon(cx, cy, 0.45 * r, 5, -math.pi / 2 + math.pi / 5)
        pts = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":  # a plus sign, arms a third of the side wide
        a = r / 3.0
        pts = [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    elif shape == "arrow":  # pointing right: a shaft and a head as tall as the square
        s = 0.3 * r
        pts = [
            (cx - r, cy - s), (cx, cy - s), (cx, cy - r), (cx + r, cy),
            (cx, cy + r), (cx, cy + s), (cx - r, cy + s),
        ]  # fmt: skip
    elif shape == "heart":  # the classic parametric heart, point down, fit to the square
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        hx = 16.0 * np.sin(t) ** 3
        hy = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        hy -= (hy.max() + hy.min()) / 2.0  # centre vertically (extent 16 x ~14.5)
        k = r / 16.0
        pts = [(cx + k * float(x), cy + k * float(y)) for x, y in zip(hx, hy, strict=True)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")
    draw.polygon(pts, fill=fill)


# ---------------------------------------------------------------------------- records


def article(word: str) -> str:
    """``"an"`` before a vowel sound (``orange``), ``"a"`` otherwise."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str | None) -> str:
    """``circles``, ``shapes`` (for ``None``)."""
    return "shapes" if shape is None else f"{shape}s"


def _matching(
    objects: Sequence[SceneObject],
    *,
    color: str | None = None,
    shape: str | None = None,
    size: str | None = None,
) -> list[int]:
    return [
        i
        for i, o in enumerate(objects)
        if (color is None or o.color == color)
        and (shape is None or o.shape == shape)
        and (size is None or o.size == size)
    ]


def _left_to_right(scene: Scene, indices: Sequence[int]) -> list[int]:
    return sorted(
        indices, key=lambda i: (float(scene.objects[i].box[0]), float(scene.objects[i].box[1]), i)
    )


def _extreme_words(
    scene: Scene, target: int, group: Sequence[int], config: SynthConfig
) -> list[str]:
    """Position words that single out ``target`` among ``group`` with the required lead."""
    words = []
    sides = (scene.width, scene.height)
    for word, (axis, sign) in POSITION_WORDS.items():
        value = sign * scene.objects[target].box_center[axis]
        rivals = [sign * scene.objects[j].box_center[axis] for j in group if j != target]
        if rivals and value - max(rivals) >= max(config.position_margin * sides[axis], 1.0):
            words.append(word)
    return words


def _choose(rng: np.random.Generator, options: Sequence[str], weights: dict[str, float]) -> str:
    w = np.array([weights.get(o, 1.0) for o in options], dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def describe_object(
    scene: Scene, index: int, rng: np.random.Generator, config: SynthConfig
) -> str | None:
    """A referring expression that selects exactly object ``index`` (see the module
    docstring for the forms), or ``None`` when no form of the grammar can."""
    objs = scene.objects
    o = objs[index]
    same = _matching(objs, color=o.color, shape=o.shape)
    forms = {
        "color_shape": same == [index],
        "shape": _matching(objs, shape=o.shape) == [index],
        "color": _matching(objs, color=o.color) == [index],
    }
    unique = [f for f, ok in forms.items() if ok]
    if unique:
        form = _choose(rng, unique, _FORM_WEIGHTS)
        if form == "shape":
            return f"the {o.shape}"
        if form == "color":
            return f"the {o.color} shape"
        return f"the {o.color} {o.shape}"
    options: list[str] = []
    if _matching(objs, color=o.color, shape=o.shape, size=o.size) == [index]:
        options.append(f"the {o.size} {o.color} {o.shape}")
    positions = _extreme_words(scene, index, same, config)
    if options and positions and rng.random() < 0.5:
        options = []  # choose between the size and the position disambiguation evenly
    if not options and positions:
        word = positions[int(rng.integers(len(positions)))]
        options.append(f"the {word} {o.color} {o.shape}")
    if options:
        return options[0]
    same_size = _matching(objs, color=o.color, shape=o.shape, size=o.size)
    positions = _extreme_words(scene, index, same_size, config)
    if positions:
        word = positions[int(rng.integers(len(positions)))]
        return f"the {word} {o.size} {o.color} {o.shape}"
    return None


def caption_of(obj: SceneObject) -> str:
    """Region caption: ``"a small green star"``."""
    return f"{article(obj.size)} {obj.size} {obj.color} {obj.shape}"


def _record(
    scene: Scene,
    task: str,
    indices: Sequence[int],
    *,
    expression: str | None = None,
    question: str | None = None,
    answer: str | None = None,
) -> dict[str, Any]:
    objs = [scene.objects[i] for i in indices]
    return {
        "image": f"images/{scene.scene_id:06d}.png",
        "width": scene.width,
        "height": scene.height,
        "task": task,
        "expression": expression,
        "question": question,
        "answer": answer,
        "boxes": [[int(v) for v in o.box] for o in objs],
        "masks": [mask_to_coco_rle(o.mask) for o in objs],
        "attributes": [o.attributes for o in objs],
        "scene_id": scene.scene_id,
    }


def rec_record(scene: Scene, index: int, expression: str) -> dict[str, Any]:
    """The ``rec`` record of ``expression`` referring to object ``index`` of ``scene`` (the
    module docstring's format), for generators with their own grammar
    (:mod:`training.new_words`)."""
    return _record(scene, "rec", [index], expression=expression)


def _draw_rec(
    scene: Scene, rng: np.random.Generator, config: SynthConfig, used: set[str]
) -> dict[str, Any] | None:
    # One expression per object and scene: two phrasings of the same target add little.
    for i in rng.permutation(len(scene.objects)).tolist():
        if f"rec-object:{i}" in used:
            continue
        expr = describe_object(scene, i, rng, config)
        if expr is not None:
            used.update((f"rec-object:{i}", f"rec:{expr}"))
            return _record(scene, "rec", [i], expression=expr)
    return None


def _draw_multi(
    scene: Scene, rng: np.random.Generator, config: SynthConfig, used: set[str]
) -> dict[str, Any] | None:
    objs = scene.objects
    groups: dict[str, list[int]] = {}
    for o in objs:
        groups[f"all {o.color} shapes"] = _matching(objs, color=o.color)
        groups[f"all {plural(o.shape)}"] = _matching(objs, shape=o.shape)
        groups[f"all {o.color} {plural(o.shape)}"] = _matching(objs, color=o.color, shape=o.shape)
    options = sorted(e for e, g in groups.items() if len(g) >= 2 and f"rec:{e}" not in used)
    if not options:
        return None
    expr = options[int(rng.integers(len(options)))]
    used.add(f"rec:{expr}")
    return _record(scene, "rec", _left_to_right(scene, groups[expr]), expression=expr)


def _draw_caption(
    scene: Scene, rng: np.random.Generator, config: SynthConfig, used: set[str]
) -> dict[str, Any] | None:
    objs = scene.objects
    for i in rng.permutation(len(objs)).tolist():
        # A box that another object's box nearly coincides with would not say which
        # object the caption is about.
        clear = all(
            frames.box_iou(objs[i].box, objs[j].box) <= 0.5 for j in range(len(objs)) if j != i
        )
        if clear and f"caption:{i}" not in used:
            used.add(f"caption:{i}")
            return _record(scene, "caption", [i], answer=caption_of(objs[i]))
    return None


def _draw_chat(
    scene: Scene, rng: np.random.Generator, config: SynthConfig, used: set[str]
) -> dict[str, Any] | None:
    objs = scene.objects
    queries: dict[tuple[str, bool], list[tuple[str, list[int]]]] = {}
    for color in config.colors:
        for shape in config.shapes:
            hits = _matching(objs, color=color, shape=shape)
            q = f"Is there {article(color)} {color} {shape}?"
            queries.setdefault(("color_shape", bool(hits)), []).append((q, hits))
    for shape in config.shapes:
        hits = _matching(objs, shape=shape)
        queries.setdefault(("shape", bool(hits)), []).append(
            (f"Is there {article(shape)} {shape}?", hits)
        )
    for color in config.colors:
        hits = _matching(objs, color=color)
        q = f"Is there {article(color)} {color} shape?"
        queries.setdefault(("color", bool(hits)), []).append((q, hits))
    order = [True, False] if rng.random() < config.chat_yes_prob else [False, True]
    for yes in order:
        kinds = [
            k
            for k in _QUERY_WEIGHTS
            if any(f"chat:{q}" not in used for q, _ in queries.get((k, yes), []))
        ]
        if not kinds:
            continue
        kind = _choose(rng, kinds, _QUERY_WEIGHTS)
        pool = [(q, h) for q, h in queries[(kind, yes)] if f"chat:{q}" not in used]
        question, hits = pool[int(rng.integers(len(pool)))]
        used.add(f"chat:{question}")
        hits = _left_to_right(scene, hits)
        answer = f"Yes, {box_pairs(len(hits))}." if hits else "No."
        return _record(scene, "chat", hits, question=question, answer=answer)
    return None


def _draw_absent(
    scene: Scene, rng: np.random.Generator, config: SynthConfig, used: set[str]
) -> dict[str, Any] | None:
    """``the {color} {shape}`` for a combination that is not in the scene, answered
    :data:`ABSENT_ANSWER` with no boxes. Mostly near misses (the color is there on another
    shape, or the shape in another color): those are what a model that matches one word
    alone gets wrong."""
    present = {(o.color, o.shape) for o in scene.objects}
    colors = {o.color for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    pairs = [
        (c, sh)
        for c in config.colors
        for sh in config.shapes
        if (c, sh) not in present and f"rec:the {c} {sh}" not in used
    ]
    near = [(c, sh) for c, sh in pairs if c in colors or sh in shapes]
    pool = near if near and rng.random() < 0.8 else pairs
    if not pool:
        return None
    color, shape = pool[int(rng.integers(len(pool)))]
    expr = f"the {color} {shape}"
    used.add(f"rec:{expr}")
    return _record(scene, "rec", [], expression=expr, answer=ABSENT_ANSWER)


_DRAWERS: dict[
    str, Callable[[Scene, np.random.Generator, SynthConfig, set[str]], dict[str, Any] | None]
] = {
    "rec": _draw_rec,
    "multi": _draw_multi,
    "caption": _draw_caption,
    "chat": _draw_chat,
    "absent": _draw_absent,
}


def make_records(
    scene: Scene, rng: np.random.Generator, config: SynthConfig
) -> list[dict[str, Any]]:
    """Up to ``config.records_per_scene`` distinct records for ``scene``, tasks drawn from
    ``config.task_mix`` (a task the scene cannot give, e.g. ``multi`` with no repeated
    color or shape, is redrawn from the others). The format is the module docstring's;
    ``image`` names the file :func:`write_dataset` saves the scene to."""
    active = {t: w for t, w in config.task_mix.items() if w > 0}
    used: set[str] = set()
    records: list[dict[str, Any]] = []
    for _ in range(config.records_per_scene):
        while active:
            names = sorted(active)
            task = _choose(rng, names, active)
            record = _DRAWERS[task](scene, rng, config, used)
            if record is not None:
                records.append(record)
                break
            del active[task]  # exhausted for this scene
        if not active:
            break
    return records


# ------------------------------------------------------------------------- generation


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``seed`` (independent of the scene count)."""
    return np.random.default_rng([int(seed), int(index)])


def generate(
    seed: int | None, n_scenes: int, config: SynthConfig | None = None, *, start: int = 0
) -> Iterator[tuple[Scene, list[dict[str, Any]]]]:
    """Yield ``(scene, records)`` for scenes ``start .. start + n_scenes - 1`` of ``seed``
    (``None``: ``config.seed``), deterministically."""
    config = config or SynthConfig()
    seed = config.seed if seed is None else seed
    if config.blob_prob:
        raise ValueError(
            f"blob_prob={config.blob_prob}: blobs have no name for a record to use; they are "
            "for the perception pre-training's scenes (render_scene). Set blob_prob=0 here."
        )
    if n_scenes < 0 or start < 0:
        raise ValueError(f"n_scenes and start must be >= 0, got {n_scenes} and {start}")
    for i in range(start, start + n_scenes):
        rng = scene_rng(seed, i)
        scene = render_scene(rng, config, scene_id=i)
        yield scene, make_records(scene, rng, config)


@dataclass
class DatasetSummary:
    """What :func:`write_dataset` wrote: ``jsonl`` path, counts and timing (seconds)."""

    out_dir: Path
    jsonl: Path
    n_scenes: int
    n_records: int
    seconds: float
    tasks: dict[str, int]


def write_dataset(
    out_dir: str | Path,
    seed: int | None,
    n_scenes: int,
    config: SynthConfig | None = None,
    *,
    overwrite: bool = False,
) -> DatasetSummary:
    """Write ``images/{scene_id:06d}.png``, ``data.jsonl`` (one record per line) and
    ``synth.json`` (seed, scene count, config) under ``out_dir``.

    Raises ``ValueError`` when ``out_dir/data.jsonl`` exists and ``overwrite`` is false.
    """
    config = config or SynthConfig()
    seed = config.seed if seed is None else seed
    out = Path(out_dir)
    jsonl = out / "data.jsonl"
    if jsonl.exists() and not overwrite:
        raise ValueError(
            f"{jsonl} already exists; choose another output directory or pass overwrite=True "
            "(--overwrite)"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_records = 0
    tasks: dict[str, int] = {}
    with atomic_write(jsonl) as f:  # a crash leaves no half-written data.jsonl behind
        for scene, records in generate(seed, n_scenes, config):
            Image.fromarray(scene.image).save(out / f"images/{scene.scene_id:06d}.png")
            for r in records:
                f.write(json.dumps(r) + "\n")
                tasks[r["task"]] = tasks.get(r["task"], 0) + 1
            n_records += len(records)
    meta = {"seed": seed, "n_scenes": n_scenes, "config": config.to_dict()}
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - t0
    logger.info("wrote %d scenes, %d records to %s in %.1f s", n_scenes, n_records, out, seconds)
    return DatasetSummary(out, jsonl, n_scenes, n_records, seconds, tasks)


def rec_turns(expression: str, nextchat_config: NextChatConfig, *, num_boxes: int) -> list[Any]:
    """A referring expression's training turns: the template's REC question and answer with
    ``num_boxes`` box pairs, or (``num_boxes == 0``: the expression matches nothing) the
    text answer :data:`ABSENT_ANSWER`, without ``<at>``."""
    from nextchat_core.conversation import Turn, grounding_turns

    if num_boxes:
        return grounding_turns(expression, nextchat_config, num_boxes=num_boxes)
    return [*grounding_turns(expression, nextchat_config), Turn("assistant", ABSENT_ANSWER)]


def record_turns(
    record: dict[str, Any], nextchat_config: NextChatConfig, *, what: str = "record"
) -> list[Any]:
    """A record's training turns in the checkpoint's template (see the module docstring's
    tasks)."""
    from nextchat_core.conversation import caption_turns, chat_turns

    if record["task"] == "rec":
        return rec_turns(record["expression"], nextchat_config, num_boxes=len(record["boxes"]))
    if record["task"] == "caption":
        return caption_turns(nextchat_config, caption=record["answer"])
    if record["task"] == "chat":
        return chat_turns(record["question"], nextchat_config, answer=record["answer"])
    raise ValueError(f"{what} has task {record['task']!r}; expected rec, caption or chat")


def to_samples(
    scene: Scene, records: Sequence[dict[str, Any]], nextchat_config: NextChatConfig
) -> list[Sample]:
    """Training :class:`~nextchat_core.batch.Sample`s of a scene's records, in memory: the
    image array, the turns of the checkpoint's template, boxes in original pixels and the
    masks decoded from the records' RLE."""
    from nextchat_core.batch import Sample

    samples = []
    for k, r in enumerate(records):
        boxes: list[Sequence[float]] = [[float(v) for v in b] for b in r["boxes"]]
        turns = record_turns(r, nextchat_config, what=f"record {k}")
        masks = [
            None if m is None else coco_segmentation_to_mask(m, r["width"], r["height"])
            for m in r["masks"]
        ]
        samples.append(
            Sample(
                image=scene.image,
                turns=turns,
                boxes=boxes,
                masks=masks,
                source=f"synth scene {scene.scene_id} record {k} ({r['task']})",
            )
        )
    return samples


def label_studio_task(
    record: dict[str, Any],
    task_id: int,
    image_ref: str,
    *,
    annotation_id: int | None = None,
    masks: bool = False,
    boxes: bool | None = None,
    label: str = "Object",
) -> dict[str, Any]:
    """A ``rec`` record as a Label Studio task with one corrected annotation (what an
    annotator's submission looks like): the expression in the ``prompt`` TextArea and one
    ``rectanglelabels`` region per box, or (``masks``) one ``brushlabels`` region per
    mask, or (``masks`` and ``boxes``) both, each mask nested under its rectangle
    (``parentID``, as the backend links them). ``boxes`` defaults to ``not masks``. The
    active-learning demo, tests and bench feed these through ``/webhook``."""
    from labelstudio.results import brush_result, rectangle_result, textarea_result

    if record["task"] != "rec":
        raise ValueError(f"only 'rec' records become annotations, got {record['task']!r}")
    w, h = record["width"], record["height"]
    results: list[dict[str, Any]] = []
    boxes = not masks if boxes is None else boxes
    if not (boxes or masks):
        raise ValueError("label_studio_task needs boxes, masks or both; got neither")
    for k, box in enumerate(record["boxes"]):
        rid = f"r{task_id}-{k}"
        if boxes:
            results.append(rectangle_result(box, [label], width=w, height=h, region_id=rid))
        if masks:
            mask = coco_segmentation_to_mask(record["masks"][k], w, h)
            results.append(
                brush_result(
                    mask,
                    [label],
                    from_name="brush",
                    region_id=f"{rid}-mask" if boxes else rid,
                    parent_id=rid if boxes else None,
                )
            )
    results.append(textarea_result(record["expression"]))
    annotation = {"id": annotation_id or 100_000 + task_id, "task": task_id, "result": results}
    return {"id": task_id, "data": {"image": image_ref}, "annotations": [annotation]}
