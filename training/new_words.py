"""The new-words domain: scenes whose referred object carries a word the model never saw.

A benchmark for active learning that teaches a concept rather than a location (issue #21).
Each scene holds 3-6 objects drawn by :func:`training.synth.render_scene` (its renderer,
shapes and masks; no second copy). Exactly one of them, the **target**, carries a new
word - a shape from :data:`synth.NEW_SHAPES` and/or a color from :data:`synth.NEW_COLORS`,
words the bundled demo model was never trained on - and the others, the **distractors**,
use the original vocabulary only (:data:`synth.SHAPES`, :data:`synth.COLORS`). With
``hard_negative_prob`` a distractor shares the target's known word (a red circle beside
"the pink circle", a green square beside "the green heart"), so the known word alone does
not find it; with ``new_distractor_prob`` one more distractor carries ANOTHER new word (a
cross beside "the heart"), so "the object I do not know" does not find it either.

The expression always contains the target's new word(s), in synth's grammar:
``the {color} {shape}`` (mostly), ``the {shape}`` or ``the {color} shape`` when that alone
is unique. Records are synth's (:func:`synth.rec_record`: box, mask, attributes), so every
reader, Label Studio task builder and evaluator of the synthetic domain takes them.

Deterministic: scene ``i`` of seed ``s`` draws from ``numpy.random.default_rng([s, i, 21])``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import synth

KINDS: tuple[str, ...] = ("shape", "color", "both")  # which of the target's words is new


@dataclass(frozen=True)
class NewWordsConfig:
    """What the new-words generator draws. Validated on creation (``ValueError``)."""

    new_shapes: tuple[str, ...] = synth.NEW_SHAPES  # names from synth.NEW_SHAPES
    new_colors: tuple[str, ...] = tuple(synth.NEW_COLORS)  # names from synth.NEW_COLORS
    # relative weights of the target kinds: a new shape in a known color, a known shape
    # in a new color, both new
    kinds: dict[str, float] = field(
        default_factory=lambda: {"shape": 0.4, "color": 0.4, "both": 0.2}
    )
    min_objects: int = 3
    max_objects: int = 6
    min_side: int = 128  # canvas sides, original pixels (the demo model reads 256 px)
    max_side: int = 256
    hard_negative_prob: float = 0.7  # a distractor shares the target's known word
    new_distractor_prob: float = 0.25  # a distractor carries another new word

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_shapes", tuple(self.new_shapes))
        object.__setattr__(self, "new_colors", tuple(self.new_colors))
        object.__setattr__(self, "kinds", dict(self.kinds))
        for name, value, allowed in (
            ("new_shapes", self.new_shapes, synth.NEW_SHAPES),
            ("new_colors", self.new_colors, tuple(synth.NEW_COLORS)),
        ):
            unknown = [v for v in value if v not in allowed]
            if unknown or len(set(value)) != len(value):
                raise ValueError(
                    f"{name} must list distinct names from {list(allowed)}, got {list(value)}"
                )
        weights = {k: w for k, w in self.kinds.items() if w > 0}
        if (
            any(k not in KINDS for k in self.kinds)
            or any(not w >= 0 for w in self.kinds.values())
            or not weights
        ):
            raise ValueError(
                f"kinds must map names from {list(KINDS)} to non-negative weights with a "
                f"positive sum, got {self.kinds}"
            )
        needs = {"shape": (True, False), "color": (False, True), "both": (True, True)}
        for kind in weights:
            shape, color = needs[kind]
            if (shape and not self.new_shapes) or (color and not self.new_colors):
                raise ValueError(
                    f"target kind {kind!r} needs new_shapes{' and' if shape and color else ''}"
                    f"{' new_colors' if color else ''}; got new_shapes={list(self.new_shapes)}"
                    f", new_colors={list(self.new_colors)}"
                )
        if not 3 <= self.min_objects <= self.max_objects <= 12:
            raise ValueError(
                "object counts need 3 <= min_objects <= max_objects <= 12 (a target among "
                f"distractors), got {self.min_objects} and {self.max_objects}"
            )
        for name in ("hard_negative_prob", "new_distractor_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        synth.SynthConfig(min_side=self.min_side, max_side=self.max_side)  # checks the sides

    @property
    def words(self) -> tuple[str, ...]:
        """Every new word this config may draw."""
        return self.new_shapes + self.new_colors


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``seed`` (independent of synth's streams)."""
    return np.random.default_rng([int(seed), int(index), 21])


def new_words_of(expression: str) -> list[str]:
    """The new words (:data:`synth.NEW_SHAPES`, :data:`synth.NEW_COLORS`) in an
    expression, in order."""
    new = set(synth.NEW_SHAPES) | set(synth.NEW_COLORS)
    return [w for w in expression.replace(",", " ").split() if w in new]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def draw_objects(rng: np.random.Generator, config: NewWordsConfig) -> list[tuple[str, str]]:
    """The ``(shape, color)`` of a scene's objects, the target first (it is drawn first,
    so it is always placed; later objects may cover at most a quarter of it)."""
    kinds = sorted(k for k, w in config.kinds.items() if w > 0)
    weights = np.array([config.kinds[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    known_shapes, known_colors = synth.SHAPES, tuple(synth.COLORS)
    shape = _pick(rng, config.new_shapes if kind in ("shape", "both") else known_shapes)
    color = _pick(rng, config.new_colors if kind in ("color", "both") else known_colors)
    objects = [(shape, color)]
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    if kind != "both" and rng.random() < config.hard_negative_prob:
        # shares the known word: another known color on the same shape, or another known
        # shape in the same color
        if kind == "color":
            objects.append((shape, _pick(rng, known_colors)))
        else:
            objects.append((_pick(rng, known_shapes), color))
    if rng.random() < config.new_distractor_prob:
        other_shapes = [s for s in config.new_shapes if s != shape]
        other_colors = [c for c in config.new_colors if c != color]
        if kind in ("shape", "both") and other_shapes:
            objects.append((_pick(rng, other_shapes), _pick(rng, known_colors)))
        elif other_colors:
            objects.append((_pick(rng, known_shapes), _pick(rng, other_colors)))
    while len(objects) < n:
        objects.append((_pick(rng, known_shapes), _pick(rng, known_colors)))
    return objects


def describe_target(scene: synth.Scene, rng: np.random.Generator) -> str:
    """An expression for object 0 (the target) that contains its new word(s) and selects
    it alone; synth's forms and weights (mostly ``the {color} {shape}``)."""
    objs, target = scene.objects, scene.objects[0]
    new = set(synth.NEW_SHAPES) | set(synth.NEW_COLORS)
    forms = {"color_shape": f"the {target.color} {target.shape}"}
    if target.shape in new and sum(o.shape == target.shape for o in objs) == 1:
        forms["shape"] = f"the {target.shape}"
    if target.color in new and sum(o.color == target.color for o in objs) == 1:
        forms["color"] = f"the {target.color} shape"
    weights = {"color_shape": 0.6, "shape": 0.2, "color": 0.2}
    names = sorted(forms)
    w = np.array([weights[n] for n in names], dtype=np.float64)
    return forms[names[int(rng.choice(len(names), p=w / w.sum()))]]


def generate(
    seed: int, n_scenes: int, config: NewWordsConfig | None = None, *, start: int = 0
) -> Iterator[tuple[synth.Scene, dict[str, Any]]]:
    """Yield ``(scene, record)`` for scenes ``start .. start + n_scenes - 1`` of ``seed``:
    one ``rec`` record per scene (synth's format) referring to the target."""
    config = config or NewWordsConfig()
    if n_scenes < 0 or start < 0:
        raise ValueError(f"n_scenes and start must be >= 0, got {n_scenes} and {start}")
    render = synth.SynthConfig(min_side=config.min_side, max_side=config.max_side)
    for i in range(start, start + n_scenes):
        rng = scene_rng(seed, i)
        scene = synth.render_scene(rng, render, scene_id=i, objects=draw_objects(rng, config))
        expression = describe_target(scene, rng)
        # the same color + shape twice cannot happen (the target's pair holds a new word,
        # the extra new-word distractor another), so the expression is unambiguous
        assert (
            sum(
                (o.color, o.shape) == (scene.objects[0].color, scene.objects[0].shape)
                for o in scene.objects
            )
            == 1
        )
        yield scene, synth.rec_record(scene, 0, expression)


def absent_expression(scene: synth.Scene, rng: np.random.Generator) -> str | None:
    """A near miss for scene ``scene`` of :func:`generate`: ``the {color} {shape}`` with
    one of the target's words kept and a new word that is not in the scene in place of the
    other (its color on another new shape, another new color on its shape), matching no
    object - what a retrained model must still answer with no region. ``None`` when no
    such pair is left."""
    present = {(o.color, o.shape) for o in scene.objects}
    target = scene.objects[0]
    pairs = [(target.color, s) for s in synth.NEW_SHAPES] + [
        (c, target.shape) for c in synth.NEW_COLORS
    ]
    pairs = [p for p in pairs if p not in present]
    if not pairs:
        return None
    color, shape = pairs[int(rng.integers(len(pairs)))]
    return f"the {color} {shape}"
