"""Binary masks: their codecs and polygon geometry.

A mask is a binary ``HxW`` array at original-image resolution (EXIF-transposed), ``True``
inside the object. Polygons are ``Nx2`` arrays of original-pixel ``(x, y)`` points on
pixel edges. COCO RLE goes through pycocotools (imported where used); Label Studio's
brush RLE is a Label Studio format and lives in :mod:`labelstudio.results`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
