"""COCO export / import / evaluation (labelstudio.coco) on Label Studio JSON that the
tests build: real pycocotools, real image files with EXIF rotation, the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from labelstudio import results as ls_results
from labelstudio.coco.evaluate import (
    evaluate_coco,
    evaluate_refexp,
    mask_iou_scores,
    mean_box_iou,
    multi_instance_recall,
    rec_accuracy,
)
from labelstudio.coco.export import coco_results, export_coco, load_tasks
from labelstudio.coco.importer import import_coco, label_config_for
from labelstudio.config import parse_label_config
from labelstudio.results import brush_result
from nextchat_cli import main as cli
from nextchat_core import frames
from nextchat_core.masks import mask_iou, mask_to_box, mask_to_coco_rle, polygon_to_mask

W, H = 60, 40  # original size of images a.png and c.png
RAW_W, RAW_H = 30, 50  # stored size of the EXIF-rotated photos; shown as 50x30

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Car"/><Label value="Person"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image">
    <Label value="Person"/><Label value="Tree"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Road"/></PolygonLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
CATEGORIES = ["Car", "Person", "Tree", "Road"]  # config order -> ids 1..4


def disk(cx: float, cy: float, r: float, w: int = W, h: int = H) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


TREE = disk(40, 22, 9)
PERSON_MASK = disk(12, 28, 6) | disk(20, 30, 4)  # two overlapping blobs, concave outline
ROAD_PX = np.array([[2.0, 30.0], [20.0, 38.0], [40.0, 32.0], [10.0, 26.0]])  # concave? no: 4 pts
EXIF_TREE = disk(25, 10, 6, 50, 30)


def rect(rid, box_px, label, *, w=W, h=H, rotation=0.0, score=None):
    """A rectanglelabels result written by hand from an original-pixel box."""
    x1, y1, x2, y2 = box_px
    r = {
        "id": rid,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": 100 * x1 / w,
            "y": 100 * y1 / h,
            "width": 100 * (x2 - x1) / w,
            "height": 100 * (y2 - y1) / h,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }
    if score is not None:
        r["score"] = score
    return r


def brush(rid, mask, label):
    return brush_result(mask, [label], from_name="brush", region_id=rid)


def polygon(rid, points_px, label, *, w=W, h=H):
    return {
        "id": rid,
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": w,
        "original_height": h,
        "value": {
            "points": [[100 * x / w, 100 * y / h] for x, y in points_px],
            "polygonlabels": [label],
            "closed": True,
        },
    }


def write_exif_photo(path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (RAW_W, RAW_H), "green").save(path, exif=exif)


@pytest.fixture
def project(tmp_path):
    """A Label Studio JSON export: 5 tasks covering every region kind, EXIF-rotated photos
    (orientations 6 and 8), a task without annotations and one with an empty result."""
    write_exif_photo(tmp_path / "b.jpg", 6)
    write_exif_photo(tmp_path / "d.jpg", 8)
    Image.new("RGB", (W, H)).save(tmp_path / "c.png")
    tasks = [
        {
            "id": 101,
            "data": {"image": "/data/local-files/?d=imgs/a.png"},
            "annotations": [
                {
                    "id": 1,
                    "result": [
                        rect("car", [6, 4, 30, 20], "Car"),
                        # 12x10 px at (40, 8) rotated 30 degrees about its top-left corner
                        rect("rot", [40, 8, 52, 18], "Person", rotation=30.0),
                        brush("tree", TREE, "Tree"),
                        brush("pm", PERSON_MASK, "Person"),
                        polygon("road", ROAD_PX, "Road"),
                        {
                            "id": "txt",
                            "from_name": "prompt",
                            "to_name": "image",
                            "type": "textarea",
                            "value": {"text": ["cars and trees"]},
                        },
                    ],
                }
            ],
            "predictions": [
                {
                    "model_version": "m1",
                    "score": 0.5,
                    "result": [
                        rect("pcar", [8, 4, 32, 20], "Car", score=0.9),
                        brush("ptree", TREE, "Tree"),
                    ],
                }
            ],
        },
        {
            "id": 102,
            "data": {"image": "b.jpg"},  # EXIF 6: stored 30x50, shown 50x30
            "annotations": [
                {
                    "id": 2,
                    "result": [
                        rect("car2", [5, 5, 25, 15], "Car", w=50, h=30),
                        brush_result(EXIF_TREE, ["Tree"], from_name="brush", region_id="t2"),
                    ],
                }
            ],
        },
        # EXIF 8, annotated with nothing in it: exported, sized from the file
        {"id": 103, "data": {"image": "d.jpg"}, "annotations": [{"id": 3, "result": []}]},
        {"id": 104, "data": {"image": "c.png"}, "annotations": [{"id": 4, "result": []}]},
        {"id": 105, "data": {"image": "d.jpg"}},  # not annotated: left out, counted
        {
            "id": 106,
            "data": {"image": "d.jpg"},
            "annotations": [{"id": 6, "result": [], "was_cancelled": True}],
        },
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def load_coco(tmp_path, coco) -> COCO:
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return COCO(str(path))


def anns_by_region(coco):
    return {a["ls_region_id"]: a for a in coco["annotations"]}


# --------------------------------------------------------------------------- export


def test_export_loads_in_pycocotools_and_masks_boxes_match(project, tmp_path):
    out = export_coco(project, label_config=CONFIG, image_root=tmp_path)
    assert out.errors == []
    api = load_coco(tmp_path, out.coco)
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == CATEGORIES
    assert api.getCatIds() == [1, 2, 3, 4]
    images = {im["id"]: im for im in out.coco["images"]}
    assert sorted(images) == [101, 102, 103, 104]  # task ids are the image ids
    assert out.skipped == {"not annotated": 2}  # 105 (none), 106 (skipped by the annotator)
    assert images[101]["file_name"] == "imgs/a.png"
    # EXIF-transposed sizes: from results (102) and from the file (103: orientation 8)
    for image_id in (102, 103):
        assert (images[image_id]["width"], images[image_id]["height"]) == (50, 30)
    assert ImageOps.exif_transpose(Image.open(tmp_path / "d.jpg")).size == (50, 30)
    assert (images[104]["width"], images[104]["height"]) == (W, H)
    assert api.getAnnIds(imgIds=[103, 104]) == []

    anns = anns_by_region(out.coco)
    assert set(anns) == {"car", "rot", "tree", "pm", "road", "car2", "t2"}
    cat = {a: out.coco["categories"][anns[a]["category_id"] - 1]["name"] for a in anns}
    assert cat == {
        "car": "Car",
        "rot": "Person",
        "tree": "Tree",
        "pm": "Person",
        "road": "Road",
        "car2": "Car",
        "t2": "Tree",
    }
    # boxes: absolute xywh within half a pixel of the originals
    np.testing.assert_allclose(anns["car"]["bbox"], [6, 4, 24, 16], atol=0.5)
    np.testing.assert_allclose(anns["car2"]["bbox"], [5, 5, 20, 10], atol=0.5)
    assert anns["car"]["area"] == pytest.approx(24 * 16)
    assert anns["car"]["segmentation"] == [[6, 4, 30, 4, 30, 20, 6, 20]]  # its outline
    corners = frames.percent_to_corners(
        frames.PercentRect(100 * 40 / W, 100 * 8 / H, 100 * 12 / W, 100 * 10 / H, 30.0), W, H
    )
    np.testing.assert_allclose(
        anns["rot"]["bbox"], frames.xyxy_to_xywh([*corners.min(0), *corners.max(0)]), atol=0.5
    )
    np.testing.assert_allclose(
        anns["road"]["bbox"], [2, 26, 38, 12], atol=0.5
    )  # extent of the polygon points
    # masks decode back (pycocotools annToMask) to the originals
    assert mask_iou(api.annToMask(api.loadAnns(_id(anns, "tree"))[0]), TREE) >= 0.99
    assert mask_iou(api.annToMask(api.loadAnns(_id(anns, "pm"))[0]), PERSON_MASK) >= 0.99
    assert mask_iou(api.annToMask(api.loadAnns(_id(anns, "t2"))[0]), EXIF_TREE) >= 0.99
    assert isinstance(anns["tree"]["segmentation"]["counts"], str)
    assert anns["tree"]["area"] == TREE.sum()
    np.testing.assert_allclose(anns["tree"]["bbox"], frames.xyxy_to_xywh(mask_to_box(TREE)))
    road = polygon_to_mask(ROAD_PX, W, H)
    assert mask_iou(api.annToMask(api.loadAnns(_id(anns, "road"))[0]), road) >= 0.99
    rot = polygon_to_mask(corners, W, H)
    assert mask_iou(api.annToMask(api.loadAnns(_id(anns, "rot"))[0]), rot) >= 0.99
    assert all(a["iscrowd"] == 0 and "score" not in a for a in out.coco["annotations"])
    assert anns["car"]["prompt"] == "cars and trees"


def _id(anns, region):
    return [anns[region]["id"]]


def test_export_brush_as_polygons_decodes_back(project, tmp_path):
    out = export_coco(project, label_config=CONFIG, masks="polygon", image_root=tmp_path)
    api = load_coco(tmp_path, out.coco)
    anns = anns_by_region(out.coco)
    for region, original in (("tree", TREE), ("pm", PERSON_MASK), ("t2", EXIF_TREE)):
        seg = anns[region]["segmentation"]
        assert isinstance(seg, list) and all(len(p) >= 8 for p in seg)
        decoded = api.annToMask(api.loadAnns(_id(anns, region))[0])
        assert mask_iou(decoded, original) >= 0.99
        assert anns[region]["area"] == original.sum()


def test_export_predictions_are_coco_results(project, tmp_path):
    out = export_coco(project, label_config=CONFIG, source="predictions", image_root=tmp_path)
    anns = anns_by_region(out.coco)
    assert set(anns) == {"pcar", "ptree"}
    assert anns["pcar"]["score"] == 0.9
    assert anns["ptree"]["score"] == 0.5  # the prediction's score fills in
    results = coco_results(out.coco)
    assert len(results) == 2 and all("score" in r for r in results)
    gt = load_coco(tmp_path, export_coco(project, label_config=CONFIG, image_root=tmp_path).coco)
    dt = gt.loadRes(results)  # pycocotools accepts the list as detections
    assert len(dt.getAnnIds()) == 2


def test_export_both_marks_the_source(project, tmp_path):
    out = export_coco(project, label_config=CONFIG, source="both", image_root=tmp_path)
    sources = {a["ls_region_id"]: a["source"] for a in out.coco["annotations"]}
    assert sources["car"] == "annotation" and sources["pcar"] == "prediction"
    assert all(("score" in a) == (a["source"] == "prediction") for a in out.coco["annotations"])


def test_export_without_config_sorts_labels_and_numbers_images(tmp_path):
    tasks = [
        {
            "data": {"image": "x.png"},
            "annotations": [{"result": [rect("a", [0, 0, 5, 5], "Zebra")]}],
        },
        {"data": {"image": "y.png"}, "annotations": [{"result": [rect("b", [0, 0, 5, 5], "Ant")]}]},
    ]
    out = export_coco(tasks)
    assert [(c["id"], c["name"]) for c in out.coco["categories"]] == [(1, "Ant"), (2, "Zebra")]
    assert [im["id"] for im in out.coco["images"]] == [1, 2]  # tasks without ids


# ------------------------------------------------------------------------ bad input


def test_malformed_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"data": {"image": "a.png"},]')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON .*line 1"):
        load_tasks(path)
    path.write_text('{"tasks": []}')
    with pytest.raises(ValueError, match="expected a Label Studio JSON export"):
        load_tasks(path)


def _bad_tasks():
    good = rect("ok", [1, 1, 10, 10], "Car")
    no_size = rect("nosize", [1, 1, 10, 10], "Car")
    del no_size["original_width"], no_size["original_height"]
    return [
        {"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [good]}]},
        {
            "id": 2,
            "data": {"image": "a.png"},
            "annotations": [{"result": [good, {"id": "weird", "type": "sparkles", "value": {}}]}],
        },
        {
            "id": 3,
            "data": {"image": "http://host/remote.png"},
            "annotations": [{"result": [no_size]}],
        },
        {
            "id": 4,
            "data": {"image": "a.png"},
            "annotations": [
                {
                    "result": [
                        {
                            **brush("wrong", TREE, "Tree"),
                            "original_width": 30,
                            "original_height": 20,
                        }
                    ]
                }
            ],
        },
        {
            "id": 5,
            "data": {"image": "a.png"},
            "annotations": [{"result": [rect("x", [1, 1, 9, 9], "Bus")]}],
        },
    ]


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError) as info:
        export_coco(_bad_tasks(), label_config=CONFIG, image_root=tmp_path)
    msg = str(info.value)
    assert "4 bad task(s)/region(s)" in msg and "--skip-bad" in msg
    assert "task 2, region weird: unknown result type 'sparkles'" in msg
    assert "task 3: missing image size" in msg and "remote.png" in msg
    assert "task 4, region wrong: brush RLE holds" in msg and "another size" in msg
    assert "task 5, region x: label 'Bus' is not in the label config" in msg


def test_skip_bad_writes_the_rest(tmp_path):
    out = export_coco(_bad_tasks(), label_config=CONFIG, skip_bad=True, image_root=tmp_path)
    assert [(e.task_id, e.region_id) for e in out.errors] == [
        (2, "weird"),
        (3, None),
        (4, "wrong"),
        (5, "x"),
    ]
    assert [im["id"] for im in out.coco["images"]] == [1, 2, 4, 5]  # task 3 has no size
    assert sorted((a["image_id"], a["ls_region_id"]) for a in out.coco["annotations"]) == [
        (1, "ok"),
        (2, "ok"),
    ]
    load_coco(tmp_path, out.coco)


# ---------------------------------------------------------------------- import/export


def test_import_then_export_round_trip(project, tmp_path):
    first = export_coco(project, label_config=CONFIG, image_root=tmp_path).coco
    tasks = import_coco(first, instances_as="annotations", image_prefix="/data/local-files/?d=")
    assert len(tasks) == 4
    results = tasks[0]["annotations"][0]["result"]
    assert {r["type"] for r in results} == {"rectanglelabels", "brushlabels", "polygonlabels"}
    # boxes in percent, brushes as Label Studio RLE at the original size
    car = next(r for r in results if r["id"] == f"coco-{anns_by_region(first)['car']['id']}")
    assert car["value"]["x"] == pytest.approx(10) and car["value"]["width"] == pytest.approx(40)
    assert car["original_width"] == W and car["original_height"] == H

    config = label_config_for(CATEGORIES)
    second = export_coco(tasks, label_config=config, image_root=tmp_path).coco
    assert [c["name"] for c in second["categories"]] == CATEGORIES
    api1 = load_coco(tmp_path, first)
    api2 = COCO()
    api2.dataset = second
    api2.createIndex()
    by_name = {im["file_name"]: im for im in second["images"]}
    for im in first["images"]:
        other = by_name[im["file_name"]]
        assert (other["width"], other["height"]) == (im["width"], im["height"])
        a1 = sorted(api1.loadAnns(api1.getAnnIds(imgIds=[im["id"]])), key=lambda a: a["bbox"])
        a2 = sorted(api2.loadAnns(api2.getAnnIds(imgIds=[other["id"]])), key=lambda a: a["bbox"])
        assert len(a1) == len(a2)
        for x, y in zip(a1, a2, strict=True):
            assert x["category_id"] == y["category_id"]
            np.testing.assert_allclose(x["bbox"], y["bbox"], atol=0.5)
            if x["segmentation"]:
                assert mask_iou(api1.annToMask(x), api2.annToMask(y)) >= 0.99


def test_import_results_become_predictions(tmp_path):
    gt = {
        "images": [{"id": 7, "file_name": "cat.jpg", "width": 100, "height": 50}],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [10, 5, 20, 10],
                "area": 200,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [0, 0, 100, 50],
                "area": 5000,
                "iscrowd": 1,
                "segmentation": mask_to_coco_rle(np.ones((50, 100), bool)),
            },
        ],
    }
    mask = np.zeros((50, 100), bool)
    mask[5:15, 10:30] = True
    dets = [
        {
            "image_id": 7,
            "category_id": 3,
            "bbox": [10, 5, 20, 10],
            "score": 0.8,
            "segmentation": mask_to_coco_rle(mask),
        },
        {"image_id": 7, "category_id": 3, "bbox": [50, 5, 20, 10], "score": 0.1},
    ]
    (task,) = import_coco(gt, dets, image_prefix="http://host/", min_score=0.05)
    assert task["data"] == {"image": "http://host/cat.jpg"}
    (ann,) = task["annotations"]
    assert [r["type"] for r in ann["result"]] == ["rectanglelabels"]  # crowd left out
    (pred,) = task["predictions"]
    assert [r["type"] for r in pred["result"]] == ["brushlabels", "rectanglelabels"]
    assert [r["score"] for r in pred["result"]] == [0.8, 0.1]
    assert pred["score"] == pytest.approx(0.1)  # the least certain detection (sort by it)
    brush_mask = ls_results.ls_rle_to_mask(pred["result"][0]["value"]["rle"], 100, 50)
    assert (brush_mask == mask).all()
    (task,) = import_coco(gt, dets, min_score=0.5)
    assert len(task["predictions"][0]["result"]) == 1
    with pytest.raises(ValueError, match="not labels of the label config"):
        import_coco(gt, label_config=CONFIG)
    bad = [{**dets[0], "segmentation": mask_to_coco_rle(np.ones((10, 10), bool))}]
    with pytest.raises(ValueError, match="image 7: bad segmentation: RLE size"):
        import_coco(gt, bad)
    with pytest.raises(ValueError, match="not among the images"):
        import_coco(gt, [{**dets[0], "image_id": 99}])


def test_import_uses_label_config_names():
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "Tree"}],
        "annotations": [
            {
                "id": 5,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 4, 4],
                "area": 16,
                "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
            },
        ],
    }
    (task,) = import_coco(gt, label_config=CONFIG)
    (r,) = task["predictions"][0]["result"]
    assert (r["type"], r["from_name"], r["to_name"]) == ("polygonlabels", "poly", "image")
    parse_label_config(label_config_for(["a&b", 'q"x']))  # escaped labels stay valid XML


# ------------------------------------------------------------------------- evaluate


def _gt_and_dets(shift: float):
    mask = np.zeros((H, W), bool)
    mask[10:20, 10:20] = True
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Tree"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": mask_to_coco_rle(mask),
            },
        ],
    }
    moved = np.roll(mask, int(shift), axis=1)
    dets = [
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [10 + shift, 10, 10, 10],
            "score": 0.9,
            "segmentation": mask_to_coco_rle(moved),
        },
    ]
    return gt, dets


def test_coco_perfect_prediction_is_ap_one():
    gt, dets = _gt_and_dets(0)
    report = evaluate_coco(gt, dets)
    for t in ("bbox", "segm"):
        assert report[t]["AP"] == pytest.approx(1.0)
        assert report[t]["AP50"] == pytest.approx(1.0)
        assert report[t]["APl"] is None  # no large objects: undefined, not -1
        car, tree = report[t]["per_category"]
        assert (car["name"], car["n_gt"], car["n_dt"]) == ("Car", 1, 1)
        assert car["AP"] == pytest.approx(1.0)
        assert tree["AP"] is None and tree["n_gt"] == 0


def test_coco_shifted_box_ap_by_hand():
    # Shift by 2 px: IoU = 80 / 120 = 0.667, a match at thresholds 0.50 .. 0.65 (4 of 10).
    gt, dets = _gt_and_dets(2)
    report = evaluate_coco(gt, dets, iou_types=["bbox"])
    assert report["bbox"]["AP50"] == pytest.approx(1.0)
    assert report["bbox"]["AP75"] == pytest.approx(0.0)
    assert report["bbox"]["AP"] == pytest.approx(0.4)
    assert "segm" not in report
    # Shift by 5 px: IoU = 50 / 150 = 1/3, no match at all.
    gt, dets = _gt_and_dets(5)
    report = evaluate_coco(gt, dets)
    assert report["bbox"]["AP"] == 0.0 and report["segm"]["AP"] == 0.0


def test_coco_eval_of_two_exports_lines_up_by_name(project, tmp_path):
    gt = export_coco(project, label_config=CONFIG, image_root=tmp_path).coco
    # predictions exported without a config: category ids differ from gt's (sorted names)
    pred = export_coco(project, source="predictions", image_root=tmp_path).coco
    assert [c["name"] for c in pred["categories"]] == ["Car", "Tree"]
    report = evaluate_coco(gt, pred)
    rows = {r["name"]: r for r in report["bbox"]["per_category"]}
    # Two cars and two trees in the ground truth, one of each predicted (task 101): the
    # precision is 1 up to recall 1/2, so AP = 51/101 on COCO's 101-point recall grid.
    half = 51 / 101
    # pcar [8,4,32,20] vs car [6,4,30,20]: IoU = 22*16 / (26*16) = 0.846, a match at the
    # thresholds 0.50 .. 0.80 (7 of 10); the tree mask is exact (10 of 10).
    assert rows["Car"]["n_gt"] == 2 and rows["Car"]["n_dt"] == 1
    assert rows["Car"]["AP50"] == pytest.approx(half)
    assert rows["Car"]["AP"] == pytest.approx(0.7 * half)
    assert rows["Tree"]["AP"] == pytest.approx(half)
    assert rows["Person"]["n_dt"] == 0 and rows["Person"]["AP"] == 0.0
    assert report["segm"]["per_category"][2]["name"] == "Tree"
    assert report["segm"]["per_category"][2]["AP"] == pytest.approx(half)


def test_coco_eval_bad_results():
    gt, dets = _gt_and_dets(0)
    with pytest.raises(ValueError, match="no numeric 'score'"):
        evaluate_coco(gt, [{k: v for k, v in dets[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="category_id 9"):
        evaluate_coco(gt, [{**dets[0], "category_id": 9}])
    with pytest.raises(ValueError, match="bad segmentation: RLE size"):
        evaluate_coco(gt, [{**dets[0], "segmentation": mask_to_coco_rle(np.ones((5, 5)))}])


def test_refexp_metrics_by_hand():
    gt_mask = np.zeros((10, 10), bool)
    gt_mask[:, :4] = True  # 40 px
    pred_mask = np.zeros((10, 10), bool)
    pred_mask[:, 2:6] = True  # 40 px, 20 shared: IoU 20/60
    big_gt = np.zeros((20, 20), bool)
    big_gt[:10, :10] = True  # 100 px, predicted exactly: IoU 1
    records = [
        {
            "image": "a",
            "expression": "left",
            "boxes": [[0, 0, 10, 10]],
            "pred_boxes": [[5, 0, 15, 10]],  # IoU 50/150 = 1/3: a miss
            "mask": mask_to_coco_rle(gt_mask),
            "pred_mask": mask_to_coco_rle(pred_mask),
        },
        {
            "image": "b",
            "expression": "both",
            "boxes": [[0, 0, 10, 10], [20, 0, 30, 10]],
            "pred_boxes": [[20, 0, 30, 10], [0, 0, 4, 10]],  # top box: IoU 1 with the 2nd GT box
            "mask": mask_to_coco_rle(big_gt),
            "pred_mask": mask_to_coco_rle(big_gt),
        },
        {"image": "c", "expression": "none", "boxes": [[0, 0, 2, 2]], "pred_boxes": []},
    ]
    report = evaluate_refexp(records)
    assert report["rec_acc"] == pytest.approx(1 / 3)
    assert report["mean_box_iou"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    # GT boxes: r0 one (missed), r1 two (one hit; [0,0,4,10] has IoU 0.4), r2 one (missed)
    assert report["multi_instance_recall"] == pytest.approx(1 / 4)
    assert report["n_gt_boxes"] == 4 and report["n_mask_records"] == 2
    assert report["mask_miou"] == pytest.approx((20 / 60 + 1.0) / 2)
    assert report["mask_ciou"] == pytest.approx((20 + 100) / (60 + 100))
    # the plain functions agree
    preds = [np.array(r["pred_boxes"]).reshape(-1, 4) for r in records]
    gts = [np.array(r["boxes"]) for r in records]
    assert rec_accuracy(preds, gts) == report["rec_acc"]
    assert mean_box_iou(preds, gts) == report["mean_box_iou"]
    assert multi_instance_recall(preds, gts, iou_threshold=0.3) == pytest.approx(3 / 4)
    assert mask_iou_scores([None], [gt_mask]) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"boxes": [[0, 0, 1]], "pred_boxes": []}, "'boxes' must be a list of"),
        ({"boxes": [[5, 0, 1, 1]]}, "x2 >= x1"),
        ({"pred_boxes": [[0, 0, 1, 1]]}, "needs ground truth"),
        (
            {
                "boxes": [[0, 0, 1, 1]],
                "mask": mask_to_coco_rle(np.ones((4, 4), bool)),
                "pred_mask": mask_to_coco_rle(np.ones((4, 5), bool)),
            },
            "differs from the ground-truth",
        ),
    ],
)
def test_refexp_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        evaluate_refexp([record])


# ------------------------------------------------------------------------------ CLI


def test_cli_export_import_evaluate(project, tmp_path, capsys):
    coco_path = tmp_path / "out" / "coco.json"
    assert (
        cli.main(
            [
                "export-coco",
                str(project),
                "--config",
                _write(tmp_path / "c.xml", CONFIG),
                "-o",
                str(coco_path),
                "--image-root",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (
        "4 images, 7 annotations, 4 categories; left out 2 task(s) not annotated"
        in capsys.readouterr().out
    )
    COCO(str(coco_path))

    res_path = tmp_path / "out" / "results.json"
    args = [
        "export-coco",
        str(project),
        "-o",
        str(res_path),
        "--source",
        "predictions",
        "--format",
        "results",
        "--image-root",
        str(tmp_path),
        "--masks",
        "polygon",
        "--config",
        str(tmp_path / "c.xml"),
    ]
    assert cli.main(args) == 0
    assert len(json.loads(res_path.read_text())) == 2

    tasks_path = tmp_path / "out" / "tasks.json"
    cfg_path = tmp_path / "out" / "config.xml"
    assert (
        cli.main(
            [
                "import-coco",
                str(coco_path),
                "--results",
                str(res_path),
                "-o",
                str(tasks_path),
                "--config-out",
                str(cfg_path),
            ]
        )
        == 0
    )
    tasks = json.loads(tasks_path.read_text())
    assert len(tasks) == 4 and len(tasks[0]["predictions"][0]["result"]) == 2
    assert parse_label_config(cfg_path.read_text()).categories == CATEGORIES
    capsys.readouterr()

    report_path = tmp_path / "out" / "report.json"
    args = ["evaluate", "--gt", str(coco_path), "--dt", str(res_path), "-o", str(report_path)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "bbox:" in text and "Car" in text
    report = json.loads(report_path.read_text())
    assert report["n_dt"] == 2
    assert report["bbox"]["per_category"][0]["AP50"] == pytest.approx(51 / 101)  # 1 of 2 cars

    records = tmp_path / "refexp.jsonl"
    records.write_text(
        json.dumps(
            {
                "image": "a",
                "expression": "x",
                "boxes": [[0, 0, 10, 10]],
                "pred_boxes": [[0, 0, 10, 10]],
            }
        )
        + "\n\n"
    )
    assert cli.main(["evaluate", "--refexp", str(records)]) == 0
    assert "REC Acc@0.5            1.000" in capsys.readouterr().out


def test_cli_bad_input_and_skip_bad(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bad_tasks()))
    out = tmp_path / "coco.json"
    cfg = _write(tmp_path / "c.xml", CONFIG)
    assert cli.main(["export-coco", str(bad), "--config", cfg, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "task 2, region weird: unknown result type" in err and not out.exists()
    assert cli.main(["export-coco", str(bad), "--config", cfg, "-o", str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped: task 4, region wrong" in captured.err
    assert "skipped 4 bad task(s)/region(s)" in captured.out
    assert len(COCO(str(out)).getAnnIds()) == 2

    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert cli.main(["export-coco", str(broken), "-o", str(out)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert cli.main(["evaluate", "--gt", str(out)]) == 1
    assert "needs both --gt" in capsys.readouterr().err
    lines = tmp_path / "r.jsonl"
    lines.write_text('{"boxes": [[0,0,1,1]]}\nnot json\n')
    assert cli.main(["evaluate", "--refexp", str(lines)]) == 1
    assert "line 2: not valid JSON" in capsys.readouterr().err


def _write(path, text) -> str:
    path.write_text(text)
    return str(path)


def test_export_from_a_project_over_http(project, tmp_path, monkeypatch, capsys):
    """``--project`` through the real label-studio-sdk client against a local HTTP server
    that answers Label Studio's two routes (no Label Studio server runs here)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    # As Label Studio 1.23.2 answers: the JSON export lists predictions as ids only; the
    # predictions API has them in full (with their task's id).
    tasks = json.loads(project.read_text())
    predictions = []
    for task in tasks:
        for k, pred in enumerate(task.get("predictions", [])):
            predictions.append({"id": 50 + k, "task": task["id"], **pred})
        task["predictions"] = [p["id"] for p in predictions if p["task"] == task["id"]]
    export = json.dumps(tasks).encode()
    seen: list[tuple[str, dict, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            seen.append((url.path, parse_qs(url.query), self.headers.get("Authorization")))
            if url.path == "/api/projects/3/":
                body = json.dumps({"id": 3, "title": "p", "label_config": CONFIG}).encode()
            elif url.path == "/api/projects/3/export":
                body = export
            elif url.path == "/api/predictions/" and parse_qs(url.query)["project"] == ["3"]:
                body = json.dumps(predictions).encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-token")
        out = tmp_path / "p.json"
        args = ["export-coco", "--project", "3", "-o", str(out), "--image-root", str(tmp_path)]
        assert cli.main(args) == 0
        # the predictions API fills what the export lists as ids
        out_p = tmp_path / "preds.json"
        args = ["export-coco", "--project", "3", "-o", str(out_p), "--source", "predictions"]
        assert cli.main([*args, "--image-root", str(tmp_path)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == CATEGORIES  # the project's config
    assert len(coco["annotations"]) == 7
    preds = json.loads(out_p.read_text())
    assert sorted(a["score"] for a in preds["annotations"]) == [0.5, 0.9]
    assert [im["id"] for im in preds["images"]] == [101]  # the only predicted task
    export_call = next(s for s in seen if s[0].endswith("/export"))
    assert export_call[1]["export_type"] == ["JSON"]  # the SDK's spelling; JSON is the default
    assert export_call[1]["download_all_tasks"] == ["true"]
    assert all(auth and "secret-token" in auth for _, _, auth in seen)

    monkeypatch.delenv("LABEL_STUDIO_URL")
    assert cli.main(["export-coco", "--project", "3", "-o", str(out)]) == 1
    assert "LABEL_STUDIO_URL" in capsys.readouterr().err


# ---------------------------------------------------------- one object, one annotation


def _person_task(results, predictions=None):
    task = {"id": 7, "data": {"image": "a.png"}, "annotations": [{"id": 70, "result": results}]}
    if predictions is not None:
        task["predictions"] = [{"id": 71, "model_version": "m", "result": predictions}]
    return task


def test_box_and_its_mask_are_one_coco_annotation():
    box = mask_to_box(PERSON_MASK)
    person_rect = rect("r1", box, "Person")
    linked = brush_result(
        PERSON_MASK, ["Person"], from_name="brush", region_id="m1", parent_id="r1", prompt="p"
    )
    # the link the backend writes (parentID) pairs them whatever their overlap
    far = rect("r2", [40, 2, 58, 12], "Person")
    far_mask = brush_result(TREE, ["Person"], from_name="brush", region_id="m2", parent_id="r2")
    out = export_coco([_person_task([person_rect, linked, far, far_mask])], label_config=CONFIG)
    assert len(out.coco["annotations"]) == 2
    by_id = anns_by_region(out.coco)
    assert by_id["r1"]["ls_shape_region_ids"] == ["m1"] and by_id["r2"]["ls_shape_region_ids"] == [
        "m2"
    ]
    np.testing.assert_allclose(by_id["r1"]["bbox"], frames.xyxy_to_xywh(box), atol=0.5)
    assert by_id["r1"]["area"] == PERSON_MASK.sum()  # the mask's, not the box's
    assert by_id["r1"]["prompt"] == "p"  # the mask's prompt when the box has none

    # human annotations: unlinked, matched by the documented rule (same labels, IoU >= 0.5)
    hand_rect = rect("h1", [box[0] - 1, box[1], box[2] + 1, box[3]], "Person")
    hand_mask = brush("h2", PERSON_MASK, "Person")
    other_label = brush("h3", PERSON_MASK & disk(12, 28, 6), "Tree")  # same place, Tree
    out = export_coco([_person_task([hand_rect, hand_mask, other_label])], label_config=CONFIG)
    by_id = anns_by_region(out.coco)
    assert set(by_id) == {"h1", "h3"} and by_id["h1"]["ls_shape_region_ids"] == ["h2"]
    # too little overlap: two objects
    small = rect("s1", [box[0], box[1], box[0] + 3, box[1] + 3], "Person")
    out = export_coco([_person_task([small, hand_mask])], label_config=CONFIG)
    assert len(out.coco["annotations"]) == 2
    assert ls_results.PAIR_IOU == 0.5


def test_stock_cocoeval_runs_bbox_and_segm_on_an_export(tmp_path):
    """Stock pycocotools COCOeval, both IoU types, on ground truth with box-only, box+mask
    and mask-only objects: identical predictions score AP 1.0 (it used to raise
    IndexError on box-only annotations' empty segmentation)."""
    from pycocotools.cocoeval import COCOeval

    box = mask_to_box(PERSON_MASK)
    results = [
        rect("b1", [2, 2, 20, 14], "Car"),  # box only
        rect("p1", box, "Person"),
        brush_result(PERSON_MASK, ["Person"], from_name="brush", region_id="p2", parent_id="p1"),
        brush("t1", TREE, "Tree"),  # mask only
    ]
    scored = [dict(r, score=0.9) for r in results]
    task = _person_task(results, predictions=scored)
    gt = export_coco([task], label_config=CONFIG).coco
    dt = export_coco([task], label_config=CONFIG, source="predictions")
    assert len(gt["annotations"]) == 3 and all(a["segmentation"] for a in gt["annotations"])
    car = next(a for a in gt["annotations"] if a["ls_region_id"] == "b1")
    assert car["box_only"] is True
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    coco_gt = COCO(str(gt_path))
    for iou_type in ("bbox", "segm"):
        coco_dt = coco_gt.loadRes(dt.results)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type
    # and a box-only annotation imports back as a rectangle, not a polygon
    (back,) = import_coco(gt, instances_as="annotations")
    kinds = sorted(r["type"] for r in back["annotations"][0]["result"])
    assert kinds == ["brushlabels", "brushlabels", "rectanglelabels"]


def test_score_quality_auroc_ece_and_diagram(tmp_path):
    from labelstudio.coco.evaluate import reliability_diagram, score_quality

    # perfectly separating and calibrated-ish: right ones score high
    q = score_quality([0.95, 0.9, 0.85, 0.2, 0.1], [True, True, True, False, False])
    assert q["auroc"] == 1.0 and q["n_regions"] == 5 and q["n_correct"] == 3
    # every score the same (today's p(<at>) of about 1): chance, and badly calibrated
    q = score_quality([1.0] * 4, [True, False, False, False])
    assert q["auroc"] == 0.5 and q["ece"] == pytest.approx(0.75)
    # reversed: 0
    assert score_quality([0.1, 0.9], [True, False])["auroc"] == 0.0
    assert score_quality([0.5], [True])["auroc"] is None  # one kind only
    q = score_quality([0.05, 0.15, 0.95], [False, False, True], bins=10)
    assert [row[2] for row in q["reliability"]] == [1, 1, 1]
    assert q["ece"] == pytest.approx((0.05 + 0.15 + 0.05) / 3)
    path = tmp_path / "rel.png"
    reliability_diagram(q, path, "test")
    assert Image.open(path).size == (480, 480)
    with pytest.raises(ValueError, match="2 scores for 1"):
        score_quality([0.1, 0.2], [True])
