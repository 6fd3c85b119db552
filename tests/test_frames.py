"""Round trips through the one coordinate-frame module, on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelstudio import results as ls_results
from nextchat_core import frames
from nextchat_core.frames import PercentRect, SamGeometry, SquareGeometry
from nextchat_core.masks import coco_segmentation_to_mask, mask_iou, mask_to_box, mask_to_coco_rle

SIZES = [(96, 64), (64, 96), (513, 160), (160, 160), (331, 517)]


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_pixel_square_sam_round_trips(w, h):
    rng = np.random.default_rng(w * 1000 + h)
    xy1 = rng.uniform(0, [w - 2, h - 2], size=(20, 2))
    xy2 = xy1 + rng.uniform(1, [w, h], size=(20, 2))
    boxes = np.concatenate([xy1, np.minimum(xy2, [w, h])], axis=1)
    sq = frames.pixel_to_square(boxes, w, h)
    assert sq.min() >= 0 and sq.max() <= 1
    np.testing.assert_allclose(frames.square_to_pixel(sq, w, h), boxes, atol=1e-9)
    for size in (64, 1024):
        sam = frames.square_to_sam(sq, w, h, size)
        np.testing.assert_allclose(frames.sam_to_pixel(sam, w, h, size), boxes, atol=1e-6)
        assert sam.min() >= 0 and sam.max() <= size
    # torch tensors go through the same functions
    t = torch.tensor(boxes)
    np.testing.assert_allclose(frames.pixel_to_square(t, w, h).numpy(), sq, atol=1e-9)


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_click_points_land_where_box_corners_do(w, h):
    """A click at a pixel and a box corner at that pixel reach SAM at the same place, and
    the SAM frame maps back to the click (points_pixel_to_sam)."""
    rng = np.random.default_rng(w + h)
    pts = rng.uniform(0, [w, h], size=(12, 2))
    for size in (64, 1024):
        sam = frames.points_pixel_to_sam(pts, w, h, size)
        corners = frames.pixel_to_sam(np.concatenate([pts, pts], axis=1), w, h, size)
        np.testing.assert_allclose(sam, corners[:, :2], atol=1e-9)
        back = frames.sam_to_pixel(np.concatenate([sam, sam], axis=1), w, h, size)[:, :2]
        np.testing.assert_allclose(back, pts, atol=1e-6)
        g = SamGeometry(w, h, size)  # the image's corners go to the resized image's corners
        np.testing.assert_allclose(
            frames.points_pixel_to_sam([[0, 0], [w, h]], w, h, size),
            [[g.pad_x, g.pad_y], [g.pad_x + g.new_width, g.pad_y + g.new_height]],
        )


def test_square_frame_is_centered_padding():
    g = SquareGeometry(96, 64)
    assert (g.side, g.pad_x, g.pad_y) == (96, 0, 16)
    # the full image is the central band of the square
    np.testing.assert_allclose(
        frames.pixel_to_square(np.array([0, 0, 96, 64.0]), 96, 64), [0, 16 / 96, 1, 80 / 96]
    )
    s = SamGeometry(96, 64, 1024)
    assert (s.new_width, s.new_height, s.pad_x, s.pad_y) == (1024, 683, 0, 170)
    np.testing.assert_allclose(
        frames.pixel_to_sam(np.array([0, 0, 96, 64.0]), 96, 64, 1024), [0, 170, 1024, 853]
    )


def test_sam_mask_crop_returns_original_resolution():
    w, h, size = 96, 64, 64
    g = SamGeometry(w, h, size)
    mask = np.zeros((h, w), dtype=bool)
    mask[10:40, 20:70] = True
    sam = frames.original_mask_to_sam(mask, g)
    assert sam.shape == (size, size) and sam[: g.pad_y].sum() == 0  # padding stays empty
    back = frames.sam_mask_to_original(torch.from_numpy(sam * 2 - 1)[None], g)[0] > 0
    assert back.shape == (h, w)
    assert mask_iou(back.numpy(), mask) > 0.9


def test_percent_round_trip_and_rotation():
    w, h = 640, 480
    box = np.array([64.0, 48.0, 320.0, 240.0])
    rect = frames.pixel_to_percent(box, w, h)
    assert rect == PercentRect(10.0, 10.0, 40.0, 40.0)
    np.testing.assert_allclose(frames.percent_to_pixel(rect, w, h), box)
    rotated = PercentRect(10.0, 10.0, 40.0, 40.0, rotation=90.0)
    corners = frames.percent_to_corners(rotated, w, h)
    # 90 degrees clockwise about the top-left corner (y grows downward)
    np.testing.assert_allclose(corners[1], [64.0, 48.0 + 256.0], atol=1e-9)
    np.testing.assert_allclose(
        frames.percent_to_pixel(rotated, w, h), [64 - 192, 48, 64, 48 + 256], atol=1e-9
    )
    pts = np.array([[10.0, 20.0], [300.0, 40.0], [200.0, 400.0]])
    np.testing.assert_allclose(
        frames.points_percent_to_pixel(frames.points_pixel_to_percent(pts, w, h), w, h), pts
    )


def test_rle_round_trips():
    h, w = 37, 53
    mask = np.zeros((h, w), dtype=bool)
    mask[5:20, 7:40] = True
    mask[25:30, 1:5] = True
    rle = mask_to_coco_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    assert np.array_equal(coco_segmentation_to_mask(rle, w, h), mask)
    ls = ls_results.mask_to_ls_rle(mask)
    assert np.array_equal(ls_results.ls_rle_to_mask(ls, w, h), mask)
    with pytest.raises(ValueError, match="another size"):
        ls_results.ls_rle_to_mask(ls, w + 1, h)
    with pytest.raises(ValueError, match="does not match the image"):
        coco_segmentation_to_mask(rle, w + 1, h)
    np.testing.assert_allclose(mask_to_box(mask), [1, 5, 40, 30])


def test_sort_corners_orders_inverted_boxes():
    boxes = np.array([[0.6, 0.2, 0.1, 0.5], [0.1, 0.9, 0.4, 0.3]])
    assert frames.sort_corners(boxes).tolist() == [[0.1, 0.2, 0.6, 0.5], [0.1, 0.3, 0.4, 0.9]]
    t = frames.sort_corners(torch.tensor([[3.0, 4.0, 1.0, 2.0]]))
    assert t.tolist() == [[1.0, 2.0, 3.0, 4.0]]
