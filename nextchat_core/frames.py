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

    Polygons are flat ``[x1, y1, x2, y2, ...]`` lists in original pixels (pixel-edge
    coordinates), at least 3 points each; several polygons are united. Raises
    ``ValueError`` when an RLE's size disagrees with the image or a polygon is malformed.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        polygons = []
        for i, poly in enumerate(segmentation):
            if (
                not isinstance(poly, list | tuple | np.ndarray)
                or len(poly) < 6
                or len(poly) % 2
                or not all(isinstance(v, int | float | np.number) for v in poly)
            ):
                # pycocotools would read a 4-number "polygon" as a bbox, so check here.
                raise ValueError(
                    f"polygon {i} of the segmentation must be a flat list of at least 6 numbers "
                    f"[x1, y1, x2, y2, x3, y3, ...] in original pixels, got {str(poly)[:80]}"
                )
            polygons.append([float(v) for v in poly])
        rles = mask_utils.frPyObjects(polygons, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        size = list(segmentation.get("size", []))
        if size != [height, width]:
            raise ValueError(
                f"RLE size {size} does not match the image [height, width] = [{height}, {width}]"
            )
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(
                    f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width} "
                    f"for its size [{height}, {width}]"
                )
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str | bytes):
            rle = {
                "size": size,
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        else:
            raise ValueError(
                "RLE 'counts' must be a string (compressed) or a list of ints (uncompressed), "
                f"got {type(counts).__name__}"
            )
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
    """Label Studio brush RLE -> binary ``HxW`` mask (alpha > 127). Raises ``ValueError``
    when the RLE is malformed or does not hold exactly ``height x width`` RGBA pixels.

    The size is checked on the RLE header (its first 32 bits count the RGBA bytes) before
    decoding, so an RLE from another image fails fast instead of decoding megabytes.
    """
    from label_studio_sdk.converter.brush import decode_rle

    if (
        not isinstance(rle, list | tuple | np.ndarray)
        or len(rle) < 4
        or not all(isinstance(v, int | np.integer) and 0 <= v <= 255 for v in rle)
    ):
        raise ValueError(
            "a Label Studio brush RLE must be a list of byte values (ints 0-255) with a "
            f"4-byte header, got {str(rle)[:80]}"
        )
    expected = width * height * 4
    num = int.from_bytes(bytes(int(v) for v in rle[:4]), "big")
    if num != expected:
        raise ValueError(
            f"brush RLE holds {num} bytes, expected {expected} for a {width}x{height} RGBA "
            "image: the RLE belongs to an image of another size"
        )
    try:
        flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    except (ValueError, IndexError) as exc:  # the SDK's bit reader on truncated data
        raise ValueError(f"brush RLE is truncated or corrupt: {exc}") from exc
    if flat.size != expected:
        raise ValueError(
            f"brush RLE decodes to {flat.size} bytes, expected {expected} for a "
            f"{width}x{height} RGBA image: the RLE belongs to an image of another size"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def polygon_to_mask(points_px: Any, width: int, height: int) -> np.ndarray:
    """Polygon in original pixels (``Nx2``) -> binary ``HxW`` mask (pycocotools rasterizer)."""
    flat = np.asarray(points_px, dtype=np.float64).reshape(-1).tolist()
    return coco_segmentation_to_mask([flat], width, height)


def mask_to_polygons(mask: np.ndarray, *, min_points: int = 3) -> list[np.ndarray]:
    """Binary ``HxW`` mask -> outer boundaries as original-pixel polygons (list of ``Nx2``).

    The boundary is traced exactly along pixel edges (a pixel ``(x, y)`` spans
    ``[x, x+1] x [y, y+1]``), so each polygon re-rasterizes (``polygon_to_mask``) to its
    4-connected component exactly, concave shapes and 1-pixel lines included. Only the
    vertices where the boundary turns are kept. Holes cannot be expressed by COCO polygons
    (pycocotools unites them) and are dropped: a mask with holes comes back filled.
    Polygons are listed in the order of their top-left-most pixel; polygons with fewer
    than ``min_points`` vertices are dropped (a traced polygon always has at least 4).
    """
    m = np.pad(np.asarray(mask) > 0, 1)
    fg = m[1:-1, 1:-1]
    # Directed boundary edges on the (H+1)x(W+1) vertex grid, oriented clockwise on screen
    # (y down) around the foreground: top edges run +x, right +y, bottom -x, left -y.
    starts, ends = [], []
    for neighbor, (sx, sy), (ex, ey) in (
        (m[:-2, 1:-1], (0, 0), (1, 0)),  # top
        (m[1:-1, 2:], (1, 0), (1, 1)),  # right
        (m[2:, 1:-1], (1, 1), (0, 1)),  # bottom
        (m[1:-1, :-2], (0, 1), (0, 0)),  # left
    ):
        ys, xs = np.nonzero(fg & ~neighbor)
        starts.append(np.stack([xs + sx, ys + sy], 1))
        ends.append(np.stack([xs + ex, ys + ey], 1))
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    if len(start) == 0:
        return []
    direction = end - start
    stride = mask.shape[1] + 1
    start_key = start[:, 1] * stride + start[:, 0]
    end_key = end[:, 1] * stride + end[:, 0]
    # A vertex has one outgoing edge, or two at a saddle (diagonal pixels touching).
    outgoing: dict[int, list[int]] = {}
    for i, k in enumerate(start_key.tolist()):
        outgoing.setdefault(k, []).append(i)
    used = np.zeros(len(start), dtype=bool)
    polygons = []
    # Start each loop at its top-left-most edge so the output order is deterministic.
    for first in np.lexsort((start[:, 0], start[:, 1])).tolist():
        if used[first]:
            continue
        loop = []
        edge = first
        while not used[edge]:
            used[edge] = True
            loop.append(edge)
            options = [e for e in outgoing[int(end_key[edge])] if not used[e]]
            if not options:
                break
            if len(options) > 1:
                # Saddle: turn right (toward the current pixel) so diagonal neighbours
                # stay separate loops, matching 4-connectivity.
                dx, dy = direction[edge]
                right = (-dy, dx)
                options = [e for e in options if tuple(direction[e]) == right] or options
            edge = options[0]
        pts = start[loop].astype(np.float64)
        dirs = direction[loop]
        turn = np.any(dirs != np.roll(dirs, 1, axis=0), axis=1)
        pts = pts[turn]
        x, y = pts[:, 0], pts[:, 1]
        signed_area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        if signed_area > 0 and len(pts) >= min_points:  # clockwise on screen: an outer boundary
            polygons.append(pts)
    return polygons


def polygon_area(points_px: Any) -> float:
    """Area of a simple polygon (``Nx2``, any frame), shoelace formula, always >= 0. For
    polygons traced by :func:`mask_to_polygons` it is the component's pixel count."""
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    return abs(0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


def simplify_polygon(points_px: Any, tolerance: float = 1.0) -> np.ndarray:
    """Fewer vertices for a closed polygon in original pixels (``Nx2`` -> ``Mx2``,
    ``M <= N``, at least 3 when ``N >= 3``): Ramer-Douglas-Peucker with ``tolerance``
    pixels of maximum deviation. Pixel-edge traces from :func:`mask_to_polygons` have a
    vertex at every step of a staircase; Label Studio's editor gets slow with thousands.
    """
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if len(pts) <= 3 or tolerance == 0:
        return pts.copy()
    # Split the closed ring at its two mutually farthest-apart vertices (vertex 0 and the
    # one farthest from it) and simplify each open chain.
    far = int(np.argmax(np.hypot(*(pts - pts[0]).T)))
    if far == 0:
        return pts[:1].repeat(3, axis=0)  # all points coincide
    ring = np.concatenate([pts, pts[:1]])
    keep = np.zeros(len(ring), dtype=bool)
    keep[[0, far, len(ring) - 1]] = True
    stack = [(0, far), (far, len(ring) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = ring[i], ring[j]
        seg = ring[i + 1 : j]
        ab = b - a
        norm = float(np.hypot(*ab))
        if norm == 0.0:
            dist = np.hypot(*(seg - a).T)
        else:
            dist = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / norm
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    out = ring[:-1][keep[:-1]]
    if len(out) < 3:  # a sliver thinner than the tolerance: keep its extreme points
        order = np.argsort(np.hypot(*(pts - pts[0]).T))
        out = pts[np.sort(np.concatenate([[0], order[-2:]]))]
    return out


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


def mask_intersection_union(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Pixel counts ``(intersection, union)`` of two binary masks of the same shape (the
    terms of cIoU, which sums them over a split before dividing)."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a > 0
    b = b > 0
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks of the same shape (1.0 when both are empty)."""
    inter, union = mask_intersection_union(a, b)
    if union == 0:
        return 1.0
    return inter / union


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
