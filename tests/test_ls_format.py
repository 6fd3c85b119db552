"""Label Studio JSON <-> pixel-frame regions (labelstudio.results), and the frame
conversions added for it (nextchat_core.frames). Everything real: no mocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from labelstudio import results as ls_results
from labelstudio.config import parse_label_config
from labelstudio.images import image_file_name, read_image_size, resolve_local_image
from labelstudio.results import (
    LabelStudioFormatError,
    brush_result,
    parse_results,
    parse_task,
    polygon_result,
    rectangle_result,
    region_to_result,
    textarea_result,
)
from nextchat_core import frames
from nextchat_core.masks import (
    coco_segmentation_to_mask,
    mask_intersection_union,
    mask_iou,
    mask_to_box,
    mask_to_coco_rle,
    mask_to_polygons,
    polygon_to_mask,
)

W, H = 60, 40  # original image size (pixels) of the fixtures

CONFIG = """<View>
  <Image name="image" value="$photo"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Car"/><Label value="Person"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image">
    <Label value="Person"/><Label value="Tree"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Road"/></PolygonLabels>
  <Choices name="weather" toName="image"><Choice value="sunny"/></Choices>
  <TextArea name="prompt" toName="image"/>
</View>"""


def disk(cx: float = 30, cy: float = 20, r: float = 9) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def rect(rid: str, x: float, y: float, w: float, h: float, labels: list[str], **extra):
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": extra.pop("rotation", 0)}
    value["rectanglelabels"] = labels
    return {
        "id": rid,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": value,
        **extra,
    }


# ----------------------------------------------------------------------- label config


def test_label_config_categories_in_config_order_and_controls():
    cfg = parse_label_config(CONFIG)
    # Person appears in two controls; it keeps its first position. Choices are not regions.
    assert cfg.categories == ["Car", "Person", "Tree", "Road"]
    assert cfg.image_key() == "photo"
    assert cfg.control_for("brush").name == "brush"
    assert cfg.control_for("polygon").name == "poly"
    assert cfg.control_for("textarea").name == "prompt"
    assert [c.tag for c in cfg.controls] == [
        "rectanglelabels",
        "brushlabels",
        "polygonlabels",
        "textarea",
    ]


def test_label_config_generic_labels_and_alias():
    cfg = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        '<Labels name="lab" toName="img"><Label value="Dog" alias="dog"/><Label value="Cat"/>'
        '</Labels><Rectangle name="r" toName="img"/></View>'
    )
    assert cfg.categories == ["dog", "Cat"]  # results store the alias
    assert cfg.control_for("rectangle").name == "lab"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Image name='i'", "not valid XML"),
        ("", "non-empty XML"),
        ("<View><Text name='t' value='$t'/></View>", "no <Image"),
    ],
)
def test_label_config_bad(xml, message):
    with pytest.raises(ValueError, match=message):
        parse_label_config(xml)


# --------------------------------------------------------------------------- parsing


def test_rectangle_percent_to_original_pixels():
    (r,) = parse_results([rect("r1", 10, 25, 50, 50, ["Car"], score=0.7)], task_id=5)
    np.testing.assert_allclose(r.box_xyxy, [6, 10, 36, 30])
    assert (r.kind, r.label, r.width, r.height, r.score) == ("rectangle", "Car", W, H, 0.7)
    assert r.polygon is None and r.task_id == 5 and r.region_id == "r1"


def test_rotated_rectangle_corners_and_extent():
    # 12x10 px rectangle at (30, 10), rotated 90 degrees clockwise about its top-left corner:
    # it then spans x in [20, 30], y in [10, 22].
    (r,) = parse_results([rect("r2", 50, 25, 20, 25, ["Person"], rotation=90)], task_id=1)
    np.testing.assert_allclose(r.box_xyxy, [20, 10, 30, 22], atol=1e-9)
    np.testing.assert_allclose(r.polygon, [[30, 10], [30, 22], [20, 22], [20, 10]], atol=1e-9)
    assert r.rotation == 90
    assert r.to_mask().sum() == 120


def test_polygon_brush_labels_and_prompts():
    mask = disk()
    results = [
        {
            "id": "p1",
            "from_name": "poly",
            "to_name": "image",
            "type": "polygonlabels",
            "original_width": W,
            "original_height": H,
            "value": {"points": [[10, 10], [50, 10], [50, 50]], "polygonlabels": ["Road"]},
        },
        brush_result(mask, ["Tree"], region_id="b1"),
        # generic <Labels> + <Rectangle>: geometry and labels in two results with one id
        {
            "id": "g1",
            "type": "rectangle",
            "from_name": "rect",
            "to_name": "image",
            "original_width": W,
            "original_height": H,
            "value": {"x": 0, "y": 0, "width": 50, "height": 50},
        },
        {"id": "g1", "type": "labels", "from_name": "lab", "value": {"labels": ["Car"]}},
        textarea_result("the tree", region_id="b1"),  # per-region text
        textarea_result(["find", "the road"], region_id="zz"),  # annotation-level text
        {"id": "c1", "type": "choices", "from_name": "weather", "value": {"choices": ["sunny"]}},
    ]
    p, b, g = parse_results(results, task_id=3)
    np.testing.assert_allclose(p.polygon, [[6, 4], [30, 4], [30, 20]])
    np.testing.assert_allclose(p.box_xyxy, [6, 4, 30, 20])
    assert b.kind == "brush" and (b.mask == mask).all()
    np.testing.assert_allclose(b.box_xyxy, mask_to_box(mask))
    assert g.labels == ["Car"] and g.kind == "rectangle"
    assert b.prompt == "the tree"
    # two prompts typed on the annotation: which one found a region is unknown, so the
    # regions without their own prompt take none (retraining falls back to the label)
    assert p.prompt is None and g.prompt is None
    (one,) = parse_results([results[0], textarea_result(["the road"])], task_id=3)
    assert one.prompt == "the road"


def test_labels_result_with_geometry_is_a_region():
    (r,) = parse_results(
        [
            {
                "id": "x",
                "type": "labels",
                "original_width": W,
                "original_height": H,
                "value": {"x": 50, "y": 50, "width": 50, "height": 50, "labels": ["Car"]},
            }
        ]
    )
    np.testing.assert_allclose(r.box_xyxy, [30, 20, 60, 40])
    assert r.labels == ["Car"]


def test_image_size_from_argument_when_results_lack_it():
    r0 = rect("r1", 10, 10, 10, 10, ["Car"])
    del r0["original_width"], r0["original_height"]
    with pytest.raises(LabelStudioFormatError, match="task 9, region r1: missing image size"):
        parse_results([r0], task_id=9)
    (r,) = parse_results([r0], task_id=9, image_size=(200, 100))
    np.testing.assert_allclose(r.box_xyxy, [20, 10, 40, 20])


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"id": "u", "type": "sparkles", "value": {}}, "unknown result type 'sparkles'"),
        (
            {"id": "u", "type": "ellipselabels", "value": {"x": 1}},
            "'ellipselabels' cannot become a box",
        ),
        ({"id": "u", "value": {}}, "no 'type'"),
        ({"id": "u", "type": "rectanglelabels", "value": [1]}, "'value' must be an object"),
        (
            {**rect("u", 10, 10, 10, 10, ["Car"]), "value": {"x": 1, "y": 2, "width": "3"}},
            "missing or not a finite number",
        ),
        (rect("u", 10, 10, 0, 10, ["Car"]), "zero or negative size"),
        (rect("u", 120, 10, 10, 10, ["Car"]), "outside the image"),
        ({**rect("u", 1, 1, 1, 1, ["A"]), "original_width": -3}, "positive integers"),
        (
            {**brush_result(disk(), ["Tree"], region_id="u"), "original_width": W + 1},
            "RLE belongs to an image of another size",
        ),
        (brush_result(np.zeros((H, W), bool), ["Tree"], region_id="u"), "brush mask is empty"),
        (
            {
                "id": "u",
                "type": "polygonlabels",
                "original_width": W,
                "original_height": H,
                "value": {"points": [[1, 2], [3, 4]], "polygonlabels": ["Road"]},
            },
            "at least 3",
        ),
        (
            {**brush_result(disk(), ["Tree"], region_id="u"), "value": {"format": "png"}},
            "format 'rle'",
        ),
    ],
)
def test_bad_results_name_task_and_region(result, message):
    with pytest.raises(LabelStudioFormatError, match=message) as info:
        parse_results([result], task_id=42)
    assert str(info.value).startswith("task 42, region u: ")
    assert info.value.task_id == 42 and info.value.region_id == "u"


def test_errors_list_collects_and_keeps_going():
    errors: list[LabelStudioFormatError] = []
    regions = parse_results(
        [
            {"id": "bad", "type": "sparkles", "value": {}},
            rect("good", 10, 10, 10, 10, ["Car"]),
            {**brush_result(disk(), ["Tree"], region_id="bad2"), "original_height": H * 2},
        ],
        task_id=7,
        errors=errors,
    )
    assert [r.region_id for r in regions] == ["good"]
    assert [(e.task_id, e.region_id) for e in errors] == [(7, "bad"), (7, "bad2")]


def test_parse_task_picks_annotations_and_predictions():
    task = {
        "id": 11,
        "data": {"photo": "x.png"},
        "annotations": [
            {"id": 1, "updated_at": "2024-01-02", "result": [rect("old", 0, 0, 10, 10, ["Car"])]},
            {"id": 2, "updated_at": "2024-03-01", "result": [rect("new", 0, 0, 20, 20, ["Car"])]},
            {
                "id": 3,
                "updated_at": "2024-05-01",
                "was_cancelled": True,
                "result": [rect("skip", 0, 0, 5, 5, ["Car"])],
            },
        ],
        "predictions": [
            {
                "id": 8,
                "model_version": "v1",
                "score": 0.4,
                "result": [rect("p1", 0, 0, 5, 5, ["Car"])],
            },
            {
                "id": 9,
                "model_version": "v2",
                "score": 0.6,
                "result": [
                    rect("p2", 0, 0, 6, 6, ["Car"], score=0.9),
                    rect("p3", 1, 1, 6, 6, ["Car"]),
                ],
            },
        ],
    }
    assert [r.region_id for r in parse_task(task)] == ["new"]
    got = parse_task(task, all_annotations=True)
    assert [r.region_id for r in got] == ["old", "new"]
    preds = parse_task(task, source="predictions")
    assert [(r.region_id, r.score, r.source) for r in preds] == [
        ("p2", 0.9, "prediction"),
        ("p3", 0.6, "prediction"),  # the prediction's score fills in
    ]
    assert [r.region_id for r in parse_task(task, source="predictions", model_version="v1")] == [
        "p1"
    ]
    both = parse_task(task, source="both")
    assert [r.source for r in both] == ["annotation", "prediction", "prediction"]
    task["annotations"][0]["ground_truth"] = True
    assert [r.region_id for r in parse_task(task)] == ["old"]


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ([1, 2], "a task must be an object"),
        ({"id": 4, "image": "a.png"}, "task 4: task has no 'data' object"),
        ({"id": 4, "data": {}, "annotations": {"result": []}}, "'annotations' must be a list"),
        ({"id": 4, "data": {}, "predictions": [17]}, "full annotation and prediction objects"),
    ],
)
def test_parse_task_bad_structure(task, message):
    with pytest.raises(LabelStudioFormatError, match=message):
        parse_task(task, source="both")


# --------------------------------------------------------------------- round trips


def test_build_then_parse_round_trip_every_kind():
    mask = disk(20, 15, 7)
    corners = frames.percent_to_corners(frames.PercentRect(40, 20, 30, 25, 33.0), W, H)
    built = [
        rectangle_result([6.5, 4.25, 30, 20], ["Car"], width=W, height=H, region_id="a", score=0.3),
        rectangle_result(None, ["Person"], width=W, height=H, corners=corners, region_id="b"),
        polygon_result([[2, 3], [40, 5], [30, 35]], ["Road"], width=W, height=H, region_id="c"),
        brush_result(mask, ["Tree"], region_id="d"),
    ]
    regions = parse_results(built, task_id=1)
    again = parse_results([region_to_result(r) for r in regions], task_id=1)
    for a, b in zip(regions, again, strict=True):
        assert (a.kind, a.labels, a.region_id, a.score) == (b.kind, b.labels, b.region_id, b.score)
        np.testing.assert_allclose(a.box_xyxy, b.box_xyxy, atol=1e-9)
        assert mask_iou(a.to_mask(), b.to_mask()) == 1.0
    np.testing.assert_allclose(regions[0].box_xyxy, [6.5, 4.25, 30, 20])
    np.testing.assert_allclose(regions[1].polygon, corners, atol=1e-9)
    assert regions[1].rotation == pytest.approx(33.0)
    assert (regions[3].mask == mask).all()


# ------------------------------------------------------------ frames added for this


@pytest.mark.parametrize("rotation", [0.0, 15.0, 90.0, 180.0, 271.5, 359.0])
def test_corners_to_percent_inverts_percent_to_corners(rotation):
    r = frames.PercentRect(x=12.5, y=40.0, width=33.0, height=21.0, rotation=rotation)
    back = frames.corners_to_percent(frames.percent_to_corners(r, 640, 480), 640, 480)
    for name in ("x", "y", "width", "height"):
        assert getattr(back, name) == pytest.approx(getattr(r, name), abs=1e-9)
    assert math.isclose(back.rotation % 360, rotation, abs_tol=1e-9)


def test_xywh_xyxy_round_trip():
    box = np.array([3.5, 7.0, 20.25, 9.0])
    assert frames.xyxy_to_xywh(box) == [3.5, 7.0, 16.75, 2.0]
    np.testing.assert_allclose(frames.xywh_to_xyxy(frames.xyxy_to_xywh(box)), box)


def _shapes() -> dict[str, np.ndarray]:
    out = {}
    m = np.zeros((H, W), bool)
    m[5:35, 5:15] = m[25:35, 5:50] = m[5:35, 40:50] = True
    out["U (concave)"] = m
    m = np.zeros((H, W), bool)
    for i in range(30):
        m[5 + i // 2, 5 + i : 10 + i] = True
    out["staircase"] = m
    m = np.zeros((H, W), bool)
    m[10, 10:40] = True
    out["1-px line"] = m
    m = np.zeros((H, W), bool)
    m[3, 3] = m[4, 4] = True  # diagonal neighbours: two 4-connected components
    out["diagonal pixels"] = m
    out["disk"] = disk()
    out["full image"] = np.ones((H, W), bool)
    return out


@pytest.mark.parametrize("name", list(_shapes()))
def test_mask_to_polygons_rasterizes_back_exactly(name):
    mask = _shapes()[name]
    polys = mask_to_polygons(mask)
    back = coco_segmentation_to_mask([p.reshape(-1).tolist() for p in polys], W, H)
    assert (back == mask).all()


def test_mask_to_polygons_one_polygon_per_4_connected_component():
    m = np.zeros((H, W), bool)
    m[3, 3] = m[4, 4] = m[3, 5] = True  # touching only at corners
    assert len(mask_to_polygons(m)) == 3
    assert mask_to_polygons(np.zeros((H, W), bool)) == []


def test_mask_to_polygons_fills_holes_and_random_masks_match_filled():
    import cv2

    m = np.zeros((H, W), bool)
    m[5:30, 5:30] = True
    m[10:20, 10:20] = False
    (poly,) = mask_to_polygons(m)
    back = polygon_to_mask(poly, W, H)
    assert back.sum() == 25 * 25 and (back >= m).all()
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = rng.random((H, W)) > rng.uniform(0.3, 0.7)
        # the mask with its holes filled: background not 8-connected to the border
        canvas = np.pad(m, 1).astype(np.uint8)
        cv2.floodFill(canvas, None, (0, 0), 2, flags=8)
        filled = canvas[1:-1, 1:-1] != 2
        polys = mask_to_polygons(m)
        back = coco_segmentation_to_mask([p.reshape(-1).tolist() for p in polys], W, H)
        assert (back == filled).all()


def test_ls_rle_errors_and_round_trip():
    mask = disk()
    rle = ls_results.mask_to_ls_rle(mask)
    assert (ls_results.ls_rle_to_mask(rle, W, H) == mask).all()
    with pytest.raises(ValueError, match="another size"):
        ls_results.ls_rle_to_mask(rle, W, H + 1)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ls_results.ls_rle_to_mask(rle[:8], W, H)
    with pytest.raises(ValueError, match="byte values"):
        ls_results.ls_rle_to_mask([0, 0, 1, 300, 5], W, H)


def test_coco_segmentation_validation():
    with pytest.raises(ValueError, match="at least 6 numbers"):
        coco_segmentation_to_mask([[0, 0, 10, 10]], W, H)  # pycocotools: a bbox!
    rle = mask_to_coco_rle(disk())
    with pytest.raises(ValueError, match="does not match the image"):
        coco_segmentation_to_mask(rle, W + 2, H)
    with pytest.raises(ValueError, match="counts"):
        coco_segmentation_to_mask({"size": [H, W], "counts": 5}, W, H)
    with pytest.raises(ValueError, match="sum to"):
        coco_segmentation_to_mask({"size": [H, W], "counts": [3, 4]}, W, H)
    assert (coco_segmentation_to_mask(rle, W, H) == disk()).all()


def test_mask_intersection_union():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, 1 shared
    assert mask_intersection_union(a, b) == (1, 7)
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_intersection_union(a, b[:3])


# ------------------------------------------------------------------------ image files


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_read_image_size_applies_exif_orientation(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (30, 50), "red").save(path, exif=exif)
    expected = ImageOps.exif_transpose(Image.open(path)).size
    assert read_image_size(path) == expected
    assert expected == ((30, 50) if orientation == 1 else (50, 30))


def test_read_image_size_unreadable(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image size"):
        read_image_size(path)


def test_image_file_names_and_local_resolution(tmp_path, monkeypatch):
    assert image_file_name("/data/local-files/?d=coco/val/a%20b.jpg") == "coco/val/a b.jpg"
    assert image_file_name("/data/upload/3/1a2b3c4d-cat.png") == "1a2b3c4d-cat.png"
    assert image_file_name("https://host/imgs/cat.jpg?sig=1") == "cat.jpg"
    assert image_file_name("s3://bucket/x/dog.jpg") == "dog.jpg"
    assert image_file_name("images/cat.jpg") == "images/cat.jpg"
    (tmp_path / "coco").mkdir()
    img = tmp_path / "coco" / "a.png"
    Image.new("RGB", (4, 4)).save(img)
    assert resolve_local_image("/data/local-files/?d=coco/a.png", tmp_path) == img
    assert resolve_local_image("http://host/a.png", tmp_path / "coco") == img
    assert resolve_local_image(str(img)) == img
    assert resolve_local_image(img.as_uri()) == img
    assert resolve_local_image("http://host/a.png") is None
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    assert resolve_local_image("/data/local-files/?d=coco/a.png") == img
