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

Masks: binary ``HxW`` arrays at original resolution; COCO RLE (pycocotools) and Label
Studio brush RLE (label_studio_sdk.converter.brush) are encoded and decoded here too.

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


def pixel_to_sam(boxes: Any, width: Any, height: Any, sam_size: int) -> Any:
    """Original-pixel xyxy -> SAM input frame xyxy."""
    scale = sam_size / _maximum(width, height)
    new_w = _floor(width * scale + 0.5)
    new_h = _floor(height * scale + 0.5)
    pad_x = (sam_size - new_w) // 2
    pad_y = (sam_size - new_h) // 2
    return _xyxy_affine(boxes, new_w / width, new_h / height, pad_x, pad_y)


def sam_to_pixel(boxes: Any, width: Any, height: Any, sam_size: int) -> Any:
    """SAM input frame xyxy -> original-pixel xyxy."""
    scale = sam_size / _maximum(width, height)
    new_w = _floor(width * scale + 0.5)
    new_h = _floor(height * scale + 0.5)
    pad_x = (sam_size - new_w) // 2
    pad_y = (sam_size - new_h) // 2
    return _xyxy_affine(boxes, width / new_w, height / new_h, -pad_x * width / new_w, -pad_y * height / new_h)


def sam_mask_to_original(mask_logits: Any, geometry: SamGeometry) -> Any:
    """Crop SAM-frame masks (``...xSxS`` torch tensor, S = geometry.size) to the image and
    resize to original resolution (``...xHxW``), bilinear on logits."""
    import torch.nn.functional as F

    g = geometry
    cropped = mask_logits[..., g.pad_y : g.pad_y + g.new_height, g.pad_x : g.pad_x + g.new_width]
    lead = cropped.shape[:-2]
    flat = cropped.reshape(-1, 1, g.new_height, g.new_width)
    out = F.interpolate(flat.float(), size=(g.height, g.width), mode="bilinear", align_corners=False)
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
    out[g.pad_y : g.pad_y + g.new_height, g.pad_x : g.pad_x + g.new_width] = (
        np.asarray(small) > 127
    )
    return out


# ------------------------------------------------------------------- pixel <-> percent


def clip_boxes(boxes: Any, width: Any, height: Any) -> Any:
    """Clamp original-pixel xyxy boxes to ``[0, width] x [0, height]``."""
    out = boxes * 1.0
    out[..., 0] = _clamp(boxes[..., 0], 0, width)
    out[..., 2] = _clamp(boxes[..., 2], 0, width)
    out[..., 1] = _clamp(boxes[..., 1], 0, height)
    out[..., 3] = _clamp(boxes[..., 3], 0, height)
    return out


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


# --------------------------------------------------------------------------- masks


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight original-pixel xyxy box of a binary ``HxW`` mask (pixel edges, so a single
    pixel at (x, y) gives ``[x, y, x+1, y+1]``); ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary ``HxW`` mask -> COCO compressed RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_segmentation_to_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
    """COCO ``segmentation`` (polygon list, compressed or uncompressed RLE) -> binary ``HxW``.

    Raises ``ValueError`` when an RLE's size disagrees with the image.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        size = list(segmentation.get("size", []))
        if size != [height, width]:
            raise ValueError(
                f"RLE size {size} does not match the image [height, width] = [{height}, {width}]"
            )
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle.get("counts"), str):
            rle = {"size": size, "counts": rle["counts"].encode("ascii")}
    else:
        raise TypeError(
            f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"
        )
    return mask_utils.decode(rle).astype(bool)


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """Binary ``HxW`` mask -> Label Studio brush RLE (``value.rle``)."""
    from label_studio_sdk.converter.brush import mask2rle

    return list(mask2rle((mask > 0).astype(np.uint8) * 255))


def ls_rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE -> binary ``HxW`` mask. Raises ``ValueError`` when the RLE
    does not hold exactly ``height x width`` RGBA pixels."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    if flat.size != width * height * 4:
        raise ValueError(
            f"brush RLE decodes to {flat.size} bytes, expected {width * height * 4} for a "
            f"{width}x{height} RGBA image: the RLE belongs to an image of another size"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def polygon_to_mask(points_px: Any, width: int, height: int) -> np.ndarray:
    """Polygon in original pixels (``Nx2``) -> binary ``HxW`` mask (pycocotools rasterizer)."""
    flat = np.asarray(points_px, dtype=np.float64).reshape(-1).tolist()
    return coco_segmentation_to_mask([flat], width, height)


def mask_to_polygons(mask: np.ndarray, *, min_points: int = 3) -> list[np.ndarray]:
    """Binary ``HxW`` mask -> outer contours as original-pixel polygons (list of ``Nx2``),
    traced with OpenCV (pixel-edge coordinates, so they re-rasterize to the same mask)."""
    import cv2

    m = (mask > 0).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) < min_points:
            # A 1-2 pixel blob has a degenerate contour: use its pixel square instead.
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0) + 1
            pts = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
        else:
            # OpenCV traces pixel centers; shift to pixel edges around the centroid so
            # rasterizing the polygon covers the traced pixels.
            center = pts.mean(0)
            pts = pts + 0.5 + 0.5 * np.sign(pts - center)
        polys.append(pts)
    return polys


def box_iou(a: Any, b: Any) -> float:
    """IoU of two original-pixel (or any common frame) xyxy boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks of the same shape (1.0 when both are empty)."""
    a = a > 0
    b = b > 0
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


# ------------------------------------------------------------------------ helpers


def _maximum(a: Any, b: Any) -> Any:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return max(a, b)
    if hasattr(a, "clamp"):  # torch
        import torch

        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return np.maximum(a, b)


def _floor(a: Any) -> Any:
    if isinstance(a, int | float):
        return math.floor(a)
    if hasattr(a, "clamp"):
        return a.floor()
    return np.floor(a)


def _clamp(a: Any, lo: Any, hi: Any) -> Any:
    if hasattr(a, "clamp"):
        import torch

        return torch.minimum(torch.maximum(a, torch.as_tensor(lo, dtype=a.dtype)), torch.as_tensor(hi, dtype=a.dtype))
    return np.minimum(np.maximum(a, lo), hi)
