"""A second, independent renderer of the synthetic shapes vocabulary: the robustness split.

The demo model is trained on :mod:`training.synth` scenes. To know whether it learned
*shapes* rather than that renderer, it is also scored on scenes drawn here by a separate
code path that shares only the vocabulary (the names in :data:`synth.SHAPES`,
:data:`synth.COLORS`, :data:`synth.SIZES`) and the record grammar
(:func:`synth.make_records`, which reads only object attributes, masks and boxes):

* geometry computed here (vertices of each shape, circles as 96-gons), drawn on the whole
  canvas at 3x and box-filtered down: anti-aliased edges; an object's **mask** is where
  its visible coverage (its own coverage times what later objects leave) is >= 50 %;
* colors jittered by up to +-10 per channel around the named RGB;
* other backgrounds: checkerboards, sine stripes at any angle, multi-octave "clouds",
  radial vignettes and grainy paper (each object color >= 70 RGB from the 0.5-99.5 %
  range of the background's pixels);
* sizes continuous from 4 % to 45 % of the short side - between and beyond the
  generator's small (6-14 %) and large (21-35 %) ranges; "small" below 17.5 %, and no
  record whose words depend on the size of an object within 14-21 % (it would be
  ambiguous);
* canvases of 128-640 px with aspect ratios up to 3:1, either orientation;
* optional blur (sigma up to 0.8), then JPEG at quality 60-95 - the written images ARE
  the JPEG files, as a user's photos would be.

Deterministic from the seed: scene ``i`` of seed ``s`` draws from
``numpy.random.default_rng([s, i, 7])``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from nextchat_core.masks import mask_to_box

from . import synth

SUPERSAMPLE = 3
SIZE_RANGE = (0.04, 0.45)  # nominal extent / short side
SMALL_BELOW = 0.175
AMBIGUOUS = (0.14, 0.21)  # sizes whose "small"/"large" word a record must not rely on
BACKGROUND_KINDS = ("checker", "stripes", "clouds", "vignette", "paper")
MIN_CONTRAST = 70.0


@dataclass
class RobustConfig:
    """What the robustness renderer draws (defaults: the robustness split)."""

    min_side: int = 128
    max_side: int = 640
    max_aspect: float = 3.0
    min_objects: int = 1
    max_objects: int = 6
    blur_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (60, 95)
    repeat_prob: float = 0.35
    task_mix: dict[str, float] | None = None  # synth tasks; default: rec/multi/absent


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), 7])


def render(
    rng: np.random.Generator, config: RobustConfig, *, scene_id: int = 0
) -> tuple[synth.Scene, bytes, dict[int, float]]:
    """One scene: the :class:`synth.Scene` (image = the decoded JPEG), the JPEG bytes, and
    each object's nominal extent as a fraction of the short side (by object index)."""
    short = int(rng.integers(config.min_side, min(config.max_side, 440) + 1))
    long = int(min(config.max_side, round(short * rng.uniform(1.0, config.max_aspect))))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    background = _background(rng, width, height)
    lo, hi = np.percentile(background.reshape(-1, 3), [0.5, 99.5], axis=0)
    palette = [
        name
        for name, rgb in synth.COLORS.items()
        if _box_distance(np.asarray(rgb, dtype=np.float64), lo, hi) >= MIN_CONTRAST
    ]
    if len(palette) < 2:  # a background that hides most colors: draw another
        return render(rng, config, scene_id=scene_id)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[dict[str, Any]] = []
    for _ in range(n):
        for _attempt in range(50):
            cand = _propose(rng, config, placed, palette, width, height)
            if cand is not None and _fits(cand, placed):
                placed.append(cand)
                break
    # Visible coverage: each object's coverage times what the objects drawn later leave.
    image = background.astype(np.float64)
    for p in placed:
        a = p["alpha"][..., None]
        image = image * (1.0 - a) + np.asarray(p["rgb"], dtype=np.float64) * a
    objects: list[synth.SceneObject] = []
    extents: dict[int, float] = {}
    for i, p in enumerate(placed):
        vis = p["alpha"].copy()
        for q in placed[i + 1 :]:
            vis *= 1.0 - q["alpha"]
        mask = vis >= 0.5
        box = mask_to_box(mask)
        if box is None:
            continue
        extents[len(objects)] = p["fraction"]
        objects.append(
            synth.SceneObject(
                shape=p["shape"],
                color=p["color"],
                size="small" if p["fraction"] < SMALL_BELOW else "large",
                mask=mask,
                box=box,
                center=p["center"],
                extent=p["extent"],
                drawn_area=int((p["alpha"] >= 0.5).sum()),
            )
        )
    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    if rng.random() < config.blur_prob:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    buf = io.BytesIO()
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    pil.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    scene = synth.Scene(
        scene_id=scene_id,
        image=decoded,
        objects=objects,
        background=synth.Background("plain", ((0, 0, 0),)),  # informational only
    )
    return scene, data, extents


def records(
    scene: synth.Scene, extents: dict[int, float], rng: np.random.Generator, config: RobustConfig
) -> list[dict[str, Any]]:
    """The scene's records (synth's grammar), without those whose size word or caption
    would be ambiguous for an object of an in-between size."""
    mix = config.task_mix or {"rec": 0.6, "multi": 0.2, "absent": 0.2}
    cfg = synth.SynthConfig(task_mix=mix, records_per_scene=3, repeat_prob=config.repeat_prob)
    out = []
    ambiguous = {
        i for i, f in extents.items() if AMBIGUOUS[0] <= f <= AMBIGUOUS[1]
    }  # object indices
    for r in synth.make_records(scene, rng, cfg):
        text = (r["expression"] or "") + " " + (r["answer"] or "")
        words = set(text.replace(".", " ").split())
        if words & {"small", "large"}:
            # which objects share the record's color + shape (what the size word separates)
            names = [(a["color"], a["shape"]) for a in r["attributes"]]
            rivals = {i for i, o in enumerate(scene.objects) if (o.color, o.shape) in set(names)}
            if rivals & ambiguous:
                continue
        out.append(r)
    return out


def write_split(
    out_dir: str | Path,
    seed: int,
    n_scenes: int,
    config: RobustConfig | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``images/{i:06d}.jpg`` and ``data.jsonl`` (synth's record format) and
    ``robust.json``; returns the jsonl path."""
    config = config or RobustConfig()
    out = Path(out_dir)
    jsonl = out / "data.jsonl"
    if jsonl.exists() and not overwrite:
        raise ValueError(f"{jsonl} already exists; pass overwrite=True (--overwrite)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n_scenes):
            rng = scene_rng(seed, i)
            scene, data, extents = render(rng, config, scene_id=i)
            (out / f"images/{i:06d}.jpg").write_bytes(data)
            for r in records(scene, extents, rng, config):
                r["image"] = f"images/{i:06d}.jpg"
                f.write(json.dumps(r) + "\n")
    tmp.replace(jsonl)
    meta = {"seed": seed, "n_scenes": n_scenes, "renderer": "training.robust_render"}
    (out / "robust.json").write_text(json.dumps(meta, indent=2) + "\n")
    return jsonl


# ------------------------------------------------------------------------- drawing


def _box_distance(c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.linalg.norm(np.maximum(np.maximum(lo - c, 0.0), c - hi)))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    a = rng.integers(0, 256, size=3).astype(np.float64)
    b = np.clip(a + rng.integers(-60, 61, size=3), 0, 255)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "checker":
        cell = float(rng.uniform(6, 40))
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2)[..., None]
    elif kind == "stripes":
        angle, period = float(rng.uniform(0, math.pi)), float(rng.uniform(6, 60))
        t = (
            0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        )[..., None]
    elif kind == "clouds":
        t = np.zeros((height, width))
        for octave, weight in ((64, 0.5), (24, 0.3), (8, 0.2)):
            g = rng.random((height // octave + 2, width // octave + 2))
            up = Image.fromarray((g * 255).astype(np.uint8)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
            t += weight * np.asarray(up, dtype=np.float64) / 255.0
        t = t[..., None]
    elif kind == "vignette":
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = np.hypot(xs - cx, ys - cy) / max(width, height)
        t = np.clip(r * 1.4, 0, 1)[..., None]
    else:  # paper: grain
        t = np.full((height, width, 1), 0.5)
        grain = rng.normal(0.0, 9.0, size=(height, width, 3))
        img = a + grain
        return np.clip(
            np.asarray(
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(0.7)
                ),
                dtype=np.float64,
            ),
            0,
            255,
        )
    return a * (1.0 - t) + b * t


def _vertices(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` inscribed in the square of half-side ``r`` (own geometry)."""

    def ring(n: int, rad: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + rad * math.cos(phase + 2 * math.pi * k / n),
                cy + rad * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "circle":
        return ring(96, r, 0.0)
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer = ring(5, r, -math.pi / 2)
        inner = ring(5, 0.43 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def _propose(
    rng: np.random.Generator,
    config: RobustConfig,
    placed: list[dict[str, Any]],
    palette: list[str],
    width: int,
    height: int,
) -> dict[str, Any] | None:
    short = min(width, height)
    fraction = float(rng.uniform(*SIZE_RANGE))
    extent = fraction * short
    if extent < 5:
        return None
    r = extent / 2.0
    cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
    shape = synth.SHAPES[int(rng.integers(len(synth.SHAPES)))]
    color = palette[int(rng.integers(len(palette)))]
    if placed and rng.random() < config.repeat_prob:
        src = placed[int(rng.integers(len(placed)))]
        if rng.random() < 0.5:
            color = src["color"] if src["color"] in palette else color
        else:
            shape = src["shape"]
    k = SUPERSAMPLE
    layer = Image.new("L", (width * k, height * k), 0)
    pts = [((x + 0.0) * k, (y + 0.0) * k) for x, y in _vertices(shape, cx, cy, r)]
    ImageDraw.Draw(layer).polygon(pts, fill=255)
    alpha = (
        np.asarray(layer.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    )
    if (alpha >= 0.5).sum() < 8:
        return None
    rgb = np.clip(np.asarray(synth.COLORS[color]) + rng.integers(-10, 11, size=3), 0, 255)
    return {
        "shape": shape,
        "color": color,
        "rgb": tuple(int(v) for v in rgb),
        "fraction": fraction,
        "extent": extent,
        "center": (cx, cy),
        "alpha": alpha,
    }


def _fits(cand: dict[str, Any], placed: list[dict[str, Any]]) -> bool:
    cx, cy = cand["center"]
    for p in placed:
        if p["color"] == cand["color"]:  # same colors never touch (they would merge)
            gap = (cand["extent"] + p["extent"]) / 2.0 + 3.0
            if abs(cx - p["center"][0]) < gap and abs(cy - p["center"][1]) < gap:
                return False
    # every earlier object keeps >= 70 % of its own drawn area visible under the new one
    for i, p in enumerate(placed):
        vis = p["alpha"].copy()
        for q in [*placed[i + 1 :], cand]:
            vis *= 1.0 - q["alpha"]
        if (vis >= 0.5).sum() < 0.7 * (p["alpha"] >= 0.5).sum():
            return False
    return True
