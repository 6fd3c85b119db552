"""Overlay PNGs: the image with each answer's boxes, masks and labels drawn on it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nextchat_core.predictor import Answer

_COLORS = [
    (255, 59, 48),
    (52, 199, 89),
    (0, 122, 255),
    (255, 204, 0),
    (175, 82, 222),
    (255, 149, 0),
    (90, 200, 250),
    (255, 45, 85),
]


def draw_overlay(
    image: Image.Image, answers: Sequence[Answer], *, alpha: float = 0.45
) -> Image.Image:
    """A copy of ``image`` (RGB, original size) with masks tinted, boxes outlined and each
    box labeled ``prompt score``; one color per prompt."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i, answer in enumerate(answers):
        color = np.array(_COLORS[i % len(_COLORS)], dtype=np.float32)
        for det in answer.detections:
            if det.mask is not None:
                base[det.mask] = (1 - alpha) * base[det.mask] + alpha * color
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 250))
    for i, answer in enumerate(answers):
        outline = _COLORS[i % len(_COLORS)]
        for det in answer.detections:
            x1, y1, x2, y2 = (float(v) for v in det.box)
            draw.rectangle([x1, y1, x2, y2], outline=outline, width=width)
            label = f"{answer.prompt} {det.score:.2f}"
            tx, ty = x1 + 2, max(0.0, y1 - 12)
            bbox = draw.textbbox((tx, ty), label)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=outline)
    return out
