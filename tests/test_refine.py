"""Click refinement (backend/refine.py): points and boxes from the editor -> SAM masks.

The core path is checked against segment-anything's own ``SamPredictor`` prompt path on
the same weights; the backend through Flask's test client with the real label config,
a real image server and the tiny overfit model. Nothing mocked.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from test_backend_support import BOX1, BOX2, H, W, image_server, label_config, png_bytes, scene

from backend.app import create_app
from backend.label_config import plan_for
from backend.model_cache import ModelCache
from backend.refine import EmbeddingCache, click_prompts, wants_refinement
from backend.settings import Settings
from labelstudio.results import ls_rle_to_mask
from nextchat_core import frames
from nextchat_core.build import build_model
from nextchat_core.config import get_preset
from nextchat_core.predictor import NextChatPredictor, SamImage
from nextchat_core.tokenizer import train_bpe_tokenizer

CONFIG = "click_masks"


def keypoint(x: float, y: float, label: str = "Car", *, positive: bool | None = None) -> dict:
    """A smart keypoint as the editor sends it (percent of the image)."""
    r = {
        "id": f"k{x:.0f}{y:.0f}",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
    }
    if positive is not None:
        r["is_positive"] = positive
    return r


def box(x: float, y: float, w: float, h: float, label: str = "Car") -> dict:
    return {
        "id": "b1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def pct(x_px: float, y_px: float) -> tuple[float, float]:
    return 100.0 * x_px / W, 100.0 * y_px / H


# ------------------------------------------------------------------------------ core


@pytest.fixture(scope="module")
def tiny() -> NextChatPredictor:
    config = get_preset("tiny")
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(["a red circle"] * 4, config=config)
    return NextChatPredictor(build_model(config).eval(), tokenizer)


def test_segment_is_segment_anythings_prompt_path(tiny):
    """Same weights, same SAM-frame prompts: our masks and IoU scores equal
    segment-anything's ``SamPredictor.predict_torch`` (points with labels, box, both)."""
    img, _, _ = scene()
    image = tiny.sam_image(Image.fromarray(img))
    assert image.embedding.shape[0] == 1 and (image.width, image.height) == (W, H)
    size = tiny.config.sam.image_size
    ref = SamPredictor(tiny.model.sam)
    ref.features, ref.is_image_set = image.embedding, True
    ref.original_size = ref.input_size = (size, size)  # compare in the SAM frame
    g = frames.SamGeometry(W, H, size)
    cases = [
        dict(points=[[28.0, 24.0]], point_labels=[1]),
        dict(points=[[28.0, 24.0], [70.0, 40.0]], point_labels=[1, 0]),
        dict(box=list(BOX2)),
        dict(points=[[70.0, 40.0]], point_labels=[1], box=list(BOX2)),
    ]
    for case in cases:
        got = tiny.segment(image, **case)
        coords = labels = boxes = None
        if "points" in case:
            coords = torch.tensor(frames.points_pixel_to_sam(case["points"], W, H, size)[None])
            labels = torch.tensor([case["point_labels"]])
        if "box" in case:
            boxes = torch.tensor(frames.pixel_to_sam(np.array(case["box"]), W, H, size)[None])
        multimask = boxes is None and len(case.get("points", [])) == 1
        with torch.inference_mode():
            masks, iou, _ = ref.predict_torch(
                coords.float() if coords is not None else None,
                labels,
                boxes.float() if boxes is not None else None,
                multimask_output=multimask,
                return_logits=True,
            )
        best = int(iou[0].argmax())
        assert got.score == pytest.approx(float(iou[0, best].clamp(0, 1)), abs=1e-5)
        full = frames.sam_mask_to_original(masks[0, best], g) > 0
        assert (full.numpy() == got.mask).mean() > 0.999, case


def test_positive_and_negative_clicks_are_different_prompts(tiny):
    img, _, _ = scene()
    image = tiny.sam_image(Image.fromarray(img))
    pos = tiny.segment(image, points=[[28, 24], [70, 40]], point_labels=[1, 1])
    neg = tiny.segment(image, points=[[28, 24], [70, 40]], point_labels=[1, 0])
    assert not np.array_equal(pos.mask, neg.mask) or pos.score != neg.score
    assert pos.mask.shape == (H, W) and pos.mask.dtype == bool


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "at least one point or a box"),
        (dict(points=[[1, 2, 3]], point_labels=[1]), "Nx2"),
        (dict(points=[[1, 2]], point_labels=[1, 1]), "N point_labels"),
        (dict(points=[[1, 2]], point_labels=[2]), r"1 \(positive\) or 0 \(negative\)"),
        (dict(points=[[W + 5, 2]], point_labels=[1]), "outside the 96x64 image"),
        (dict(box=[10, 10, 5, 20]), "box prompt"),
    ],
)
def test_segment_says_what_is_wrong(tiny, kwargs, message):
    image = SamImage(torch.zeros(1, tiny.config.sam.prompt_dim, 4, 4), W, H)
    with pytest.raises(ValueError, match=message):
        tiny.segment(image, **kwargs)


# ----------------------------------------------------------------- context parsing


def test_click_prompts_from_the_editors_context():
    plan = plan_for(label_config(CONFIG))
    ctx = [
        keypoint(*pct(30, 20), "Person"),  # another object, pending: left out
        keypoint(*pct(28, 24)),  # no is_positive: positive
        keypoint(*pct(40, 30), positive=False),  # Alt + click
        box(*pct(12, 8), 100 * 32 / W, 100 * 32 / H),
        keypoint(*pct(20, 16), positive=True),
    ]
    p = click_prompts(ctx, plan, width=W, height=H)
    np.testing.assert_allclose(p.points, [[28, 24], [40, 30], [20, 16]], atol=1e-9)
    assert p.labels == [1, 0, 1]
    np.testing.assert_allclose(p.box, BOX1, atol=1e-9)
    assert p.label == "Car"
    only_person = click_prompts(ctx[:1], plan, width=W, height=H)
    assert only_person.label == "Person" and only_person.box is None
    assert wants_refinement(plan, ctx)
    assert not wants_refinement(plan, [{"type": "textarea", "value": {"text": ["x"]}}])
    # a config without KeyPointLabels never refines: its rectangles mean something else
    assert not wants_refinement(plan_for(label_config("region_caption")), [ctx[3]])
    bad = keypoint(10, 10)
    bad["value"]["x"] = "10"
    with pytest.raises(ValueError, match=r"number value\.x in percent"):
        click_prompts([bad], plan, width=W, height=H)
    bad = keypoint(10, 10)
    bad["is_positive"] = "no"
    with pytest.raises(ValueError, match="'is_positive' must be true or false"):
        click_prompts([bad], plan, width=W, height=H)


def test_embedding_cache_is_a_bounded_lru():
    cache = EmbeddingCache(capacity=2)
    items = {k: SamImage(torch.zeros(1), 1, 1) for k in "abc"}
    cache.put(("a",), items["a"])
    cache.put(("b",), items["b"])
    assert cache.get(("a",)) is items["a"]  # a is now the newest
    cache.put(("c",), items["c"])  # evicts b, the least recently used
    assert cache.get(("b",)) is None and cache.get(("a",)) is items["a"]
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 1)
    with pytest.raises(ValueError, match="at least 1"):
        EmbeddingCache(capacity=0)


# ----------------------------------------------------------------- through the app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("click-images")
    img, _, _ = scene()
    (root / "scene.png").write_bytes(png_bytes(img))
    (root / "again.png").write_bytes(png_bytes(img))
    with image_server(root) as url:
        yield url, root


@pytest.fixture(scope="module")
def app_store(tmp_path_factory):
    from test_backend_support import overfit_checkpoint

    ckpt = overfit_checkpoint(tmp_path_factory.getbasetemp())
    settings = Settings.from_env({}, checkpoint=str(ckpt), model_dir=tmp_path_factory.mktemp("md"))
    return settings, ModelCache(settings)


def _click(client, url: str, context: list[dict], *, tid: int = 1, status: int = 200) -> dict:
    body = {
        "tasks": [{"id": tid, "data": {"image": url}}],
        "project": "3.1700000000",
        "label_config": label_config(CONFIG),
        "params": {"login": None, "password": None, "context": {"result": context}},
    }
    reply = client.post("/predict", json=body)
    assert reply.status_code == status, reply.get_json()
    return reply.get_json()


def test_clicks_answer_a_mask_from_the_cached_embedding(served, app_store):
    url, root = served
    settings, store = app_store
    app = create_app(settings, store=store, preload=False)
    client = app.test_client()
    refiner = app.extensions["nextchat_backend"].refiner
    version, predictor = store.get()
    img, _, _ = scene()
    image = predictor.sam_image(Image.fromarray(img))

    first = _click(client, f"{url}/again.png", [keypoint(*pct(28, 24))])
    assert (refiner.cache.misses, refiner.cache.hits) == (1, 0)
    [task] = first["results"]
    assert task["model_version"] == version.name == first["model_version"]
    [mask] = task["result"]
    assert mask["type"] == "brushlabels" and mask["from_name"] == "mask"
    assert mask["to_name"] == "image" and mask["value"]["brushlabels"] == ["Car"]
    assert (mask["original_width"], mask["original_height"]) == (W, H)
    assert 0.0 <= mask["score"] <= 1.0 and task["score"] == mask["score"]
    got = ls_rle_to_mask(mask["value"]["rle"], W, H)
    want = predictor.segment(image, points=[[28, 24]], point_labels=[1])
    np.testing.assert_array_equal(got, want.mask)  # percent -> pixel -> SAM, as the core

    # The next clicks on that image: the embedding is reused and the image is not even
    # fetched again (it is gone from the server now).
    (root / "again.png").unlink()
    ctx = [keypoint(*pct(28, 24)), keypoint(*pct(70, 40), "Car", positive=False)]
    second = _click(client, f"{url}/again.png", ctx)
    assert (refiner.cache.misses, refiner.cache.hits) == (1, 1)
    got = ls_rle_to_mask(second["results"][0]["result"][0]["value"]["rle"], W, H)
    want = predictor.segment(image, points=[[28, 24], [70, 40]], point_labels=[1, 0])
    np.testing.assert_array_equal(got, want.mask)

    # A box prompt, labelled Person: the mask gets that label.
    drawn = box(*pct(*BOX2[:2]), 100 * 32 / W, 100 * 36 / H, "Person")
    third = _click(client, f"{url}/again.png", [drawn])
    [mask] = third["results"][0]["result"]
    assert mask["value"]["brushlabels"] == ["Person"]
    want = predictor.segment(image, box=list(BOX2))
    np.testing.assert_array_equal(ls_rle_to_mask(mask["value"]["rle"], W, H), want.mask)
    shutil.copy(root / "scene.png", root / "again.png")


def test_bad_clicks_and_missing_images_are_clear_errors(served, app_store):
    url, _ = served
    settings, store = app_store
    client = create_app(settings, store=store, preload=False).test_client()
    bad = keypoint(10, 10)
    bad["value"]["y"] = None
    reply = _click(client, f"{url}/scene.png", [bad], status=400)
    assert "number value.y in percent" in reply["detail"]
    outside = keypoint(130, 10)
    reply = _click(client, f"{url}/scene.png", [outside], status=400)
    assert "outside the 96x64 image" in reply["detail"]
    reply = _click(client, f"{url}/missing.png", [keypoint(10, 10)], tid=9, status=502)
    assert "404" in reply["detail"]


def test_an_annotation_made_by_clicks_is_stored_for_retraining(app_store, tmp_path):
    """The accepted mask keeps its clicks beside it in the annotation: the webhook takes it
    (the points are SAM prompts, not regions), the mask and the box are what is trained on."""
    from labelstudio.results import brush_result, parse_results
    from training.store import AnnotationStore

    settings, store = app_store
    settings = settings.with_overrides(model_dir=tmp_path / "md")
    client = create_app(settings, store=store, preload=False).test_client()
    _, circle, _ = scene()
    mask = brush_result(circle, ["Car"], from_name="mask", region_id="m1")
    result = [
        keypoint(*pct(28, 24)),
        keypoint(*pct(70, 40), positive=False),
        box(10, 10, 40, 60),
        mask,
    ]
    regions = parse_results(result, task_id=5)
    assert sorted(r.kind for r in regions) == ["brush", "rectangle"]
    body = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 3, "label_config": label_config(CONFIG)},
        "task": {"id": 5, "data": {"image": "scene.png"}},
        "annotation": {"id": 12, "result": result},
    }
    reply = client.post("/webhook", json=body)
    assert reply.status_code == 201, reply.get_json()
    [task] = AnnotationStore(settings.model_dir).export_tasks("3")
    assert [a["id"] for a in task["annotations"]] == [12]
