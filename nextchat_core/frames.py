"""Every coordinate-frame conversion in nextchat-studio lives here, and only here.

The frames, by name (every docstring in the project uses these names):

* **original pixels** - absolute ``xyxy`` in the EXIF-transposed original image,
  ``0 <= x <= width``, ``0 <= y <= height``.
* **square** - the padded-square frame of the vision tower. NExT-Chat (like LLaVA's
  ``expand2square``) pastes the image centered on a square canvas of side
  ``max(width, height)``; boxes are ``xyxy`` shifted by that padding and divided by the
  side, so they lie in ``[0, 1]``. This is the frame of ``loc_encoder`` inputs and
  ``loc_decoder`` outputs.
* **sam** - SAM's input frame: the image resized so its longest side is ``sam_size``
  (1024 for the released model) and pasted centered on a ``sam_size`` square, the same
  centered padding as the square frame, so the two frames agree up to scale.
* **percent** - Label Studio's frame: ``x, y, width, height`` in percent (0-100) of the
  original size, ``x, y`` the top-left corner, plus an optional ``rotation`` in degrees
  clockwise about that corner.

Masks (binary ``HxW`` arrays at original resolution), their codecs and polygon geometry
live in :mod:`nextchat_core.masks`.

Functions are pure arithmetic so they accept numpy arrays and torch tensors alike
(``...x4`` boxes, sizes as scalars or arrays broadcastable against ``...``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class SquareGeometry:
    """Centered pad-to-square placement of a ``width x height`` image.

    ``side`` is the square's side in original pixels; ``pad_x``/``pad_y`` the integer
    offsets of the image's top-left corner on the square canvas (floor of half the slack,
    as PIL's ``paste`` in LLaVA/NExT-Chat ``expand2square``).
    """

    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"image size must be positive, got width={self.width}, height={self.height}"
            )

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def pad_x(self) -> int:
        return (self.side - self.width) // 2

    @property
    def pad_y(self) -> int:
        return (self.side - self.height) // 2


@dataclass(frozen=True)
class SamGeometry:
    """Placement of a ``width x height`` image in SAM's ``size x size`` input frame.

    Longest side resized to ``size`` (``new_width``/``new_height`` rounded as in
    segment-anything's ``ResizeLongestSide``), then pasted centered (``pad_x``/``pad_y``).
    """

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def new_width(self) -> int:
        return int(self.width * self.scale + 0.5)

    @property
    def new_height(self) -> int:
        return int(self.height * self.scale + 0.5)

    @property
    def pad_x(self) -> int:
        return (self.size - self.new_width) // 2

    @property
    def pad_y(self) -> int:
        return (self.size - self.new_height) // 2


def _xyxy_affine(boxes: Any, sx: Any, sy: Any, tx: Any, ty: Any) -> Any:
    """Apply ``x' = x * sx + tx``, ``y' = y * sy + ty`` to ``...x4`` xyxy boxes."""
    out = boxes * 1.0  # a new array/tensor in floating point, same library as the input
    out[..., 0] = boxes[..., 0] * sx + tx
    out[..., 2] = boxes[..., 2] * sx + tx
    out[..., 1] = boxes[..., 1] * sy + ty
    out[..., 3] = boxes[..., 3] * sy + ty
    return out


# ------------------------------------------------------------------ original <-> square


def pixel_to_square(boxes: Any, width: Any, height: Any) -> Any:
    """Original-pixel xyxy (``...x4``) -> square-frame normalized xyxy in ``[0, 1]``."""
    side = _maximum(width, height)
    pad_x = (side - width) // 2
    pad_y = (side - height) // 2
    return _xyxy_affine(boxes, 1.0 / side, 1.0 / side, pad_x / side, pad_y / side)


def square_to_pixel(boxes: Any, width: Any, height: Any, *, clip: bool = False) -> Any:
    """Square-frame normalized xyxy -> original-pixel xyxy; ``clip`` clamps to the image."""
    side = _maximum(width, height)
    pad_x = (side - width) // 2
    pad_y = (side - height) // 2
    out = _xyxy_affine(boxes, side, side, -pad_x, -pad_y)
    if clip:
        out = clip_boxes(out, width, height)
    return out


# --------------------------------------------------------------------- square <-> sam


def square_to_sam(boxes: Any, width: Any, height: Any, sam_size: int) -> Any:
    """Square-frame normalized xyxy -> SAM input frame (pixels of the ``sam_size`` canvas).

    Goes through original pixels with SAM's own rounding so that a box prompt lands on
    exactly the pixels of the resized image.
    """
    return pixel_to_sam(square_to_pixel(boxes, width, height), width, height, sam_size)


def _pixel_to_sam_affine(width: Any, height: Any, sam_size: int) -> tuple[Any, Any, Any, Any]:
    """``(sx, sy, tx, ty)`` with SAM-frame ``x = x_px * sx + tx``, ``y = y_px * sy + ty``."""
    scale = sam_size / _maximum(width, height)
    new_w = _floor(width * scale + 0.5)
    new_h = _floor(height * scale + 0.5)
    pad_x = (sam_size - new_w) // 2
    pad_y = (sam_size - new_h) // 2
    return new_w / width, new_h / height, pad_x, pad_y


def pixel_to_sam(boxes: Any, width: Any, height: Any, sam_size: int) -> Any:
    """Original-pixel xyxy -> SAM input frame xyxy."""
    return _xyxy_affine(boxes, *_pixel_to_sam_affine(width, height, sam_size))


def points_pixel_to_sam(points: Any, width: int, height: int, sam_size: int) -> np.ndarray:
    """Original-pixel points ``Nx2`` (x, y) -> SAM input frame ``Nx2``: the same mapping as
    :func:`pixel_to_sam` (point prompts and box prompts land on the same pixels)."""
    sx, sy, tx, ty = _pixel_to_sam_affine(width, height, sam_size)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([sx, sy]) + np.array([tx, ty])


def sam_to_pixel(boxes: Any, width: Any, height: Any, sam_size: int) -> Any:
    """SAM input frame xyxy -> original-pixel xyxy."""
    scale = sam_size / _maximum(width, height)
    new_w = _floor(width * scale + 0.5)
    new_h = _floor(height * scale + 0.5)
    pad_x = (sam_size - new_w) // 2
    pad_y = (sam_size - new_h) // 2
    return _xyxy_affine(
        boxes, width / new_w, height / new_h, -pad_x * width / new_w, -pad_y * height / new_h
    )


def sam_mask_to_original(mask_logits: Any, geometry: SamGeometry) -> Any:
    """Crop SAM-frame masks (``...xSxS`` torch tensor, S = geometry.size) to the image and
    resize to original resolution (``...xHxW``), bilinear on logits."""
    import torch.nn.functional as F

    g = geometry
    cropped = mask_logits[..., g.pad_y : g.pad_y + g.new_height, g.pad_x : g.pad_x + g.new_width]
    lead = cropped.shape[:-2]
    flat = cropped.reshape(-1, 1, g.new_height, g.new_width)
    out = F.interpolate(
        flat.float(), size=(g.height, g.width), mode="bilinear", align_corners=False
    )
    return out.reshape(*lead, g.height, g.width)


def original_mask_to_sam(mask: np.ndarray, geometry: SamGeometry) -> np.ndarray:
    """Binary ``HxW`` mask at original resolution -> ``SxS`` float mask in the SAM frame
    (nearest resize, zero padding): the target frame of the mask loss."""
    from PIL import Image

    g = geometry
    if mask.shape != (g.height, g.width):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the image (height, width) = "
            f"({g.height}, {g.width})"
        )
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (g.new_width, g.new_height), Image.Resampling.NEAREST
    )
    out = np.zeros((g.size, g.size), dtype=np.float32)
    out[g.pad_y : g.pad_y + g.new_height, g.pad_x : g.pad_x + g.new_width] = np.asarray(small) > 127
    return out


# ------------------------------------------------------------------- pixel <-> percent


def sort_corners(boxes: Any) -> Any:
    """xyxy boxes with ``x1 <= x2`` and ``y1 <= y2`` (a decoded box may come out inverted:
    NExT-Chat's ``loc_decoder`` has no sigmoid or ordering)."""
    out = boxes * 1.0
    out[..., 0] = _minimum(boxes[..., 0], boxes[..., 2])
    out[..., 2] = _maximum(boxes[..., 0], boxes[..., 2])
    out[..., 1] = _minimum(boxes[..., 1], boxes[..., 3])
    out[..., 3] = _maximum(boxes[..., 1], boxes[..., 3])
    return out


def clip_boxes(boxes: Any, width: Any, height: Any) -> Any:
    """Clamp original-pixel xyxy boxes to ``[0, width] x [0, height]``."""
    out = boxes * 1.0
    out[..., 0] = _clamp(boxes[..., 0], 0, width)
    out[..., 2] = _clamp(boxes[..., 2], 0, width)
    out[..., 1] = _clamp(boxes[..., 1], 0, height)
    out[..., 3] = _clamp(boxes[..., 3], 0, height)
    return out


def check_pixel_box(
    box: Any, width: int, height: int, *, what: str = "box", tolerance: float = 0.0
) -> np.ndarray:
    """``box`` as a float ``(4,)`` original-pixel xyxy array, or ``ValueError`` (prefixed
    with ``what``) when it is malformed or not inside the ``width x height`` image;
    ``tolerance`` pixels of slack absorb rounding in stored labels."""
    values = list(box) if isinstance(box, list | tuple | np.ndarray) else None
    if (
        values is None
        or len(values) != 4
        or not all(isinstance(v, int | float | np.number) for v in values)
    ):
        raise ValueError(f"{what} must be [x1, y1, x2, y2] numbers in original pixels, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    t = tolerance
    if not (-t <= x1 < x2 <= width + t and -t <= y1 < y2 <= height + t):
        raise ValueError(
            f"{what} {[x1, y1, x2, y2]} lies outside the {width}x{height} image (expected "
            "original-pixel xyxy with 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height)"
        )
    return np.array([x1, y1, x2, y2])


@dataclass(frozen=True)
class PercentRect:
    """A Label Studio rectangle: top-left ``x, y`` and ``width, height`` in percent of the
    original image, ``rotation`` in degrees clockwise about the top-left corner."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0


def pixel_to_percent(box_xyxy: Any, width: int, height: int) -> PercentRect:
    """Original-pixel xyxy box -> Label Studio percent rectangle (unrotated)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return PercentRect(
        x=100.0 * x1 / width,
        y=100.0 * y1 / height,
        width=100.0 * (x2 - x1) / width,
        height=100.0 * (y2 - y1) / height,
    )


def percent_to_corners(rect: PercentRect, width: int, height: int) -> np.ndarray:
    """Label Studio percent rectangle -> its 4 corners in original pixels (``4x2``),
    clockwise from the top-left, rotation applied about the top-left corner."""
    x0 = rect.x * width / 100.0
    y0 = rect.y * height / 100.0
    w = rect.width * width / 100.0
    h = rect.height * height / 100.0
    theta = math.radians(rect.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    local = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    rot = np.array([[cos, -sin], [sin, cos]])
    return local @ rot.T + np.array([x0, y0])


def percent_to_pixel(rect: PercentRect, width: int, height: int) -> np.ndarray:
    """Label Studio percent rectangle -> original-pixel xyxy of its (rotated) extent."""
    corners = percent_to_corners(rect, width, height)
    return np.array(
        [corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()]
    )


def points_percent_to_pixel(points: Any, width: int, height: int) -> np.ndarray:
    """Label Studio polygon points ``[[x%, y%], ...]`` -> original pixels ``Nx2``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width / 100.0, height / 100.0])


def points_pixel_to_percent(points: Any, width: int, height: int) -> np.ndarray:
    """Original-pixel polygon points ``Nx2`` -> Label Studio percent ``Nx2``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([100.0 / width, 100.0 / height])


def corners_to_percent(corners: Any, width: int, height: int) -> PercentRect:
    """Inverse of :func:`percent_to_corners`: the 4 corners of a (possibly rotated)
    rectangle in original pixels (``4x2``, clockwise from the rectangle's own top-left
    corner, as ``percent_to_corners`` returns them) -> Label Studio percent rectangle.

    The rotation is the direction of the first edge (corner 0 -> corner 1), in degrees
    clockwise in ``[0, 360)``; width and height are the lengths of the first two edges.
    """
    pts = np.asarray(corners, dtype=np.float64)
    if pts.shape != (4, 2):
        raise ValueError(f"corners must be 4x2 (x, y) in original pixels, got shape {pts.shape}")
    x0, y0 = pts[0]
    edge_w = pts[1] - pts[0]
    edge_h = pts[3] - pts[0]
    rotation = math.degrees(math.atan2(edge_w[1], edge_w[0])) % 360.0
    if math.isclose(rotation, 360.0):
        rotation = 0.0
    return PercentRect(
        x=100.0 * x0 / width,
        y=100.0 * y0 / height,
        width=100.0 * float(np.hypot(*edge_w)) / width,
        height=100.0 * float(np.hypot(*edge_h)) / height,
        rotation=rotation,
    )


# ------------------------------------------------------------------------- COCO boxes


def xyxy_to_xywh(box_xyxy: Any) -> list[float]:
    """Original-pixel ``[x1, y1, x2, y2]`` -> COCO ``bbox`` ``[x, y, width, height]``
    (absolute original pixels, top-left corner)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return [x1, y1, x2 - x1, y2 - y1]


def xywh_to_xyxy(box_xywh: Any) -> np.ndarray:
    """COCO ``bbox`` ``[x, y, width, height]`` (absolute original pixels) -> original-pixel
    ``[x1, y1, x2, y2]``."""
    x, y, w, h = (float(v) for v in box_xywh)
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def box_iou(a: Any, b: Any) -> float:
    """IoU of two original-pixel (or any common frame) xyxy boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (
        max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
        + max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
        - inter
    )
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------ helpers


def _maximum(a: Any, b: Any) -> Any:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return max(a, b)
    if hasattr(a, "clamp"):  # torch
        import torch

        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return np.maximum(a, b)


def _minimum(a: Any, b: Any) -> Any:
    if hasattr(a, "clamp"):  # torch
        import torch

        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return np.minimum(a, b)


def _floor(a: Any) -> Any:
    if isinstance(a, int | float):
        return math.floor(a)
    if hasattr(a, "clamp"):
        return a.floor()
    return np.floor(a)


def _clamp(a: Any, lo: Any, hi: Any) -> Any:
    if hasattr(a, "clamp"):
        import torch

        return torch.minimum(
            torch.maximum(a, torch.as_tensor(lo, dtype=a.dtype)), torch.as_tensor(hi, dtype=a.dtype)
        )
    return np.minimum(np.maximum(a, lo), hi)
