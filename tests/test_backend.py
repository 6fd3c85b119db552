"""The Label Studio ML backend through Flask's test client: real label configs, real task
JSON, images over a real local HTTP server, a real (tiny, overfit) model. Nothing mocked."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_backend_support import (
    BOX1,
    BOX2,
    CAPTION,
    CHAT_Q,
    H,
    W,
    image_server,
    label_config,
    overfit_checkpoint,
    png_bytes,
    scene,
)

from backend.app import create_app
from backend.label_config import plan_for
from backend.model_cache import ModelCache
from backend.settings import Settings
from labelstudio.config import parse_label_config
from nextchat_core import frames
from nextchat_core.masks import (
    mask_iou,
    mask_to_polygons,
    polygon_area,
    polygon_to_mask,
    simplify_polygon,
)
from nextchat_core.predictor import NextChatPredictor
from training.versions import set_current_version, version_dir

CONFIGS = ["boxes", "boxes_masks", "polygons", "per_label_prompts", "region_caption", "chat"]
TOKEN = "ls-token-0123456789abcdef"  # the Label Studio access token /setup hands over


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return overfit_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Every kind of image file a task may point at, good and bad."""
    root = tmp_path_factory.mktemp("images")
    img, _, _ = scene()
    (root / "scene.png").write_bytes(png_bytes(img))
    pil = Image.fromarray(img)
    # EXIF orientation 6 ("rotate 90 CW to display"): stored sideways, shown as the scene.
    exif = Image.Exif()
    exif[0x0112] = 6
    pil.transpose(Image.Transpose.ROTATE_90).save(root / "rotated.png", exif=exif)
    arr16 = (np.asarray(pil.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(root / "gray16.png")
    pil.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    pil.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    full = png_bytes(img)
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    # 9000 x 9000 = 81 M pixels (above the 64 M guard) in a few kB: a decompression bomb.
    Image.new("1", (9000, 9000)).save(root / "huge.png")
    # A 40000 x 40 strip: a few kB, 1.6 M pixels, but a 40000^2 square once padded.
    Image.new("RGB", (40000, 40), (200, 30, 30)).save(root / "strip.png")
    # 20000 x 20000: above Pillow's own bomb guard, which fires before ours can look.
    Image.new("1", (20000, 20000)).save(root / "bomb20k.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(images):
    with image_server(images, token=TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def store_settings(ckpt, tmp_path_factory) -> Settings:
    return Settings.from_env(
        {}, checkpoint=str(ckpt), model_dir=tmp_path_factory.mktemp("model_dir")
    )


@pytest.fixture(scope="module")
def store(store_settings) -> ModelCache:
    return ModelCache(store_settings)


@pytest.fixture()
def client(store, store_settings):
    return create_app(store_settings, store=store, preload=False).test_client()


@pytest.fixture(scope="module")
def predictor(ckpt) -> NextChatPredictor:
    return NextChatPredictor.from_pretrained(ckpt)


def task(server: str, tid: int, name: str = "scene.png", **data) -> dict:
    return {"id": tid, "data": {"image": f"{server}/{name}", **data}, "project": 7}


def predict(client, tasks, config: str, *, context=None, project="7.1700000000", status=200):
    body = {
        "tasks": tasks,
        "project": project,
        "label_config": label_config(config),
        "params": {"login": None, "password": None, "context": context},
    }
    reply = client.post("/predict", json=body)
    assert reply.status_code == status, reply.get_json()
    return reply.get_json()


def typed(text: str, from_name: str = "prompt") -> dict:
    return {
        "result": [
            {
                "from_name": from_name,
                "to_name": "image",
                "type": "textarea",
                "value": {"text": [text]},
            }
        ]
    }


def regions_of(result: dict, rtype: str) -> list[dict]:
    return [r for r in result["result"] if r["type"] == rtype]


def percent_box(r: dict) -> np.ndarray:
    """A rectanglelabels result -> original-pixel xyxy (through frames)."""
    v = r["value"]
    rect = frames.PercentRect(v["x"], v["y"], v["width"], v["height"], v.get("rotation", 0))
    return frames.percent_to_pixel(rect, r["original_width"], r["original_height"])


def check_common(result: dict, config: str, version: str) -> None:
    """What every prediction must carry, whatever the config."""
    plan = plan_for(label_config(config))
    controls = {c.name: c for c in plan.config.controls}
    assert result["model_version"] == version
    assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0
    rect_scores = [r["score"] for r in result["result"] if r["type"] == "rectanglelabels"]
    if rect_scores:  # every box shown, none held back: the task score is the weakest one's
        assert result["score"] == pytest.approx(min(rect_scores), abs=1e-6)
    for r in result["result"]:
        assert r["to_name"] == plan.image and r["from_name"] in controls
        if r["type"] == "textarea":
            assert all(isinstance(t, str) and t for t in r["value"]["text"])
            continue
        assert r["original_width"] == W and r["original_height"] == H
        assert 0.0 < r["score"] <= 1.0
        labels = r["value"][r["type"]]
        assert len(labels) == 1 and labels[0] in controls[r["from_name"]].labels
        if r["type"] == "rectanglelabels":
            v = r["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100
            assert v["width"] > 0 and v["x"] + v["width"] <= 100 + 1e-6
            assert v["height"] > 0 and v["y"] + v["height"] <= 100 + 1e-6
        if r["type"] == "polygonlabels":
            pts = np.asarray(r["value"]["points"])
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            assert (pts >= 0).all() and (pts <= 100).all()


# ---------------------------------------------------------------------- protocol


def test_health_setup_metrics_versions(client, store):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "UP" and body["model_class"] == "NextChatBackend"
    assert client.get("/").get_json()["status"] == "UP"
    setup = client.post(
        "/setup",
        json={
            "project": "7.1700000000",
            "schema": label_config("boxes"),
            "hostname": "http://127.0.0.1:8080",
            "access_token": TOKEN,
            "extra_params": None,
        },
    )
    assert setup.status_code == 200
    assert setup.get_json() == {"model_version": body["model_version"]}
    assert body["model_version"].startswith("overfit-tiny-")
    assert client.get("/metrics").get_json() == {}
    versions = client.get("/versions").get_json()
    assert (
        versions["versions"] == [body["model_version"]]
        and versions["current"] == body["model_version"]
    )
    assert client.get("/nope").get_json()["status"] == "error"


@pytest.mark.parametrize("config", CONFIGS)
def test_predict_every_label_config(client, server, store, predictor, config):
    """ "Retrieve predictions" (no context) with two tasks, one per config: the results
    Label Studio stores, checked field by field."""
    version = store.current_version().name
    out = predict(client, [task(server, 1), task(server, 2)], config)
    assert len(out["results"]) == 2 and "errors" not in out
    for result in out["results"]:
        check_common(result, config, version)
    first = out["results"][0]
    rects, brushes = regions_of(first, "rectanglelabels"), regions_of(first, "brushlabels")
    polys, texts = regions_of(first, "polygonlabels"), regions_of(first, "textarea")
    plan = plan_for(label_config(config))
    if plan.rectangles is not None:
        assert rects, first
    assert bool(brushes) == (config == "boxes_masks")
    assert bool(polys) == (config == "polygons")
    if config == "boxes_masks":
        # Each brush decodes (the SDK's decoder, as Label Studio does) to exactly the mask
        # the predictor gives for that label's prompt.
        from label_studio_sdk.converter.brush import decode_rle

        img, _, _ = scene()
        for brush in brushes:
            label = brush["value"]["brushlabels"][0]
            (answer,) = predictor.predict_batch([img], [_query(label)])
            decoded = decode_rle(brush["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127
            assert any(
                d.mask is not None and np.array_equal(decoded, d.mask) for d in answer.detections
            )
    if config == "polygons":
        # a trained prompt: one polygon per shape, re-rasterizing onto the shape
        out = predict(client, [task(server, 1)], config, context=typed("all shapes"))
        polys = regions_of(out["results"][0], "polygonlabels")
        _, m1, m2 = scene()
        assert len(polys) == 2
        for poly, truth in zip(
            sorted(polys, key=lambda p: min(x for x, _ in p["value"]["points"])),
            (m1, m2),
            strict=True,
        ):
            pts = frames.points_percent_to_pixel(poly["value"]["points"], W, H)
            assert mask_iou(polygon_to_mask(pts, W, H), truth) > 0.8
    if config == "per_label_prompts":
        # Labels' prompts that find one object are resolved to the surest label: no two
        # boxes of different labels overlap more than CROSS_LABEL_IOU.
        for i, r in enumerate(rects):
            for o in rects[i + 1 :]:
                if r["value"]["rectanglelabels"] != o["value"]["rectanglelabels"]:
                    iou = frames.box_iou(percent_box(r), percent_box(o))
                    assert iou <= store.settings.cross_label_iou, (r, o)
        # The tiny model draws about the same boxes whatever the prompt: with the
        # resolution off, one prompt per label (hint, predicted_values, value) labels each.
        keep_all = store.settings.with_overrides(cross_label_iou=1.0)
        app = create_app(keep_all, store=store, preload=False).test_client()
        out = predict(app, [task(server, 1)], config)
        labels = {r["value"]["rectanglelabels"][0] for r in out["results"][0]["result"]}
        assert labels == {"Car", "Person", "Traffic light"}
        assert len(rects) < len(out["results"][0]["result"])
    if config == "region_caption":
        # Every detected box gets its caption, attached to it by region id.
        assert {t["id"] for t in texts} == {r["id"] for r in rects}
        assert all(t["value"]["text"] == [CAPTION] for t in texts)


def _query(prompt: str):
    from nextchat_core.predictor import Query

    return Query(0, prompt)


def test_typed_prompt_finds_every_instance_with_the_matching_label(client, server):
    out = predict(client, [task(server, 1)], "boxes", context=typed("all shapes"))
    (result,) = out["results"]
    rects = regions_of(result, "rectanglelabels")
    assert len(rects) == 2  # several instances of one prompt
    boxes = sorted((percent_box(r) for r in rects), key=lambda b: b[0])
    for got, want in zip(boxes, (BOX1, BOX2), strict=True):
        assert frames.box_iou(got, want) > 0.85, (got, want)
    # "all shapes" names none of Car/Person/Animal: the first label (documented rule).
    assert {r["value"]["rectanglelabels"][0] for r in rects} == {"Car"}
    # a prompt naming a label (plural, any case) gets that label
    out = predict(client, [task(server, 1)], "boxes", context=typed("all Persons"))
    labels = {
        r["value"]["rectanglelabels"][0] for r in regions_of(out["results"][0], "rectanglelabels")
    }
    assert labels == {"Person"}


def test_last_typed_prompt_is_remembered_across_restarts(server, store, store_settings, tmp_path):
    # The tiny model draws about the same boxes for every label's prompt: overlap
    # resolution across labels (CROSS_LABEL_IOU) would keep one label of three.
    settings = store_settings.with_overrides(model_dir=tmp_path / "md", cross_label_iou=1.0)
    client = create_app(settings, store=store, preload=False).test_client()
    predict(client, [task(server, 1)], "boxes", context=typed("the animals"), project="31.1")
    state = json.loads((tmp_path / "md" / "projects" / "31.json").read_text())
    assert state["last_prompt"] == "the animals"
    # a new app on the same MODEL_DIR (a restart): "Retrieve predictions" uses that prompt
    client = create_app(settings, store=store, preload=False).test_client()
    out = predict(client, [task(server, 2)], "boxes", project="31.1")
    labels = {r["value"]["rectanglelabels"][0] for r in out["results"][0]["result"]}
    assert labels == {"Animal"}
    # another project does not share it: one prompt per label instead
    out = predict(client, [task(server, 2)], "boxes", project="32.1")
    labels = {r["value"]["rectanglelabels"][0] for r in out["results"][0]["result"]}
    assert labels == {"Car", "Person", "Animal"}


def test_prompt_after_prompt_uses_the_newest_and_adds_only_new_regions(client, server):
    """The prompt TextArea keeps every prompt typed on the annotation (no maxSubmissions):
    the newest one is asked; regions the annotation already holds (its draft, as Label
    Studio sends it with an interactive request) are not suggested again."""
    first = predict(client, [task(server, 1)], "boxes_masks", context=typed("the red circle"))
    (rect,) = regions_of(first["results"][0], "rectanglelabels")
    (mask,) = regions_of(first["results"][0], "brushlabels")
    # each region carries its own prompt; the mask points at its rectangle
    assert rect["meta"] == {"text": ["the red circle"]} == mask["meta"]
    assert mask["parentID"] == rect["id"] and "parentID" not in rect
    # the annotator accepted them (now in the draft) and typed a second prompt
    both = {"result": [{**typed("the red circle")["result"][0]}]}
    both["result"][0]["value"] = {"text": ["the red circle", "all shapes"]}
    with_draft = task(server, 1)
    with_draft["drafts"] = [{"id": 3, "result": [rect, mask]}]
    out = predict(client, [with_draft], "boxes_masks", context=both)
    rects = regions_of(out["results"][0], "rectanglelabels")
    assert len(rects) == 1  # "all shapes" finds 2; the one already there is not repeated
    assert frames.box_iou(percent_box(rects[0]), BOX2) > 0.85
    assert rects[0]["meta"] == {"text": ["all shapes"]}
    # without the draft both come back
    out = predict(client, [task(server, 1)], "boxes_masks", context=both)
    assert len(regions_of(out["results"][0], "rectanglelabels")) == 2


def test_fallback_prompts_only_for_tasks_nobody_annotated(client, server):
    """Label Studio re-asks about a task after Submit, with no prompt: the project's last
    typed prompt must not put a new suggestion on the saved annotation."""
    predict(client, [task(server, 1)], "boxes", context=typed("all shapes"), project="44.1")
    done = task(server, 1)
    done["annotations"] = [{"id": 9, "result": [], "was_cancelled": False}]
    skipped = task(server, 2)
    skipped["annotations"] = [{"id": 10, "result": [], "was_cancelled": True}]
    out = predict(client, [done, skipped, task(server, 3)], "boxes", project="44.1")
    counts = [len(regions_of(r, "rectanglelabels")) for r in out["results"]]
    assert counts == [0, 2, 2]  # the skipped task counts as not annotated
    assert out["results"][0]["result"] == [] and out["results"][0]["model_version"]
    # a prompt stated for the task itself still applies to an annotated one
    done["data"]["prompt"] = "the red circle"
    out = predict(client, [done], "boxes", project="44.1")
    assert len(regions_of(out["results"][0], "rectanglelabels")) == 1


def test_prompt_order_context_then_task_field(client, server):
    # the task's $prompt field drives it when nothing was typed ...
    out = predict(client, [task(server, 1, prompt="the red circle")], "boxes", project="41.1")
    rects = regions_of(out["results"][0], "rectanglelabels")
    assert len(rects) == 1 and frames.box_iou(percent_box(rects[0]), BOX1) > 0.85
    # ... and the typed context wins over it
    out = predict(
        client,
        [task(server, 1, prompt="the red circle")],
        "boxes",
        context=typed("all shapes"),
        project="41.1",
    )
    assert len(regions_of(out["results"][0], "rectanglelabels")) == 2


def test_region_caption_for_the_annotators_rectangle(client, server):
    rect = frames.pixel_to_percent(BOX1, W, H)
    drawn = {
        "id": "r-drawn",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": rect.x,
            "y": rect.y,
            "width": rect.width,
            "height": rect.height,
            "rotation": 0,
            "rectanglelabels": ["Object"],
        },
    }
    out = predict(client, [task(server, 1)], "region_caption", context={"result": [drawn]})
    (result,) = out["results"]
    assert [r["type"] for r in result["result"]] == ["rectanglelabels", "textarea"]
    assert result["result"][0] == drawn  # echoed, so the caption has its region
    caption = result["result"][1]
    assert caption["id"] == "r-drawn" and caption["from_name"] == "caption"
    assert caption["value"]["text"] == [CAPTION]


def test_chat_question_gets_an_answer_and_its_boxes(client, server):
    out = predict(client, [task(server, 1)], "chat", context=typed(CHAT_Q, from_name="question"))
    (result,) = out["results"]
    (answer,) = regions_of(result, "textarea")
    assert answer["from_name"] == "answer" and answer["value"]["text"] == ["Yes [1]."]
    (rect,) = regions_of(result, "rectanglelabels")
    assert rect["value"]["rectanglelabels"] == ["Object"]
    assert frames.box_iou(percent_box(rect), BOX1) > 0.85
    # the question may also come from the task ($question)
    out = predict(client, [task(server, 2, question=CHAT_Q)], "chat", project="42.1")
    assert regions_of(out["results"][0], "textarea")[0]["value"]["text"] == ["Yes [1]."]


def test_exif_rotated_image_uses_the_displayed_frame(client, server):
    out = predict(
        client, [task(server, 1, "rotated.png")], "boxes", context=typed("the red circle")
    )
    (rect,) = regions_of(out["results"][0], "rectanglelabels")
    assert (rect["original_width"], rect["original_height"]) == (W, H)  # stored as 64x96
    assert frames.box_iou(percent_box(rect), BOX1) > 0.8


# -------------------------------------------------------------------- bad inputs


def test_one_bad_task_never_fails_the_batch(client, server):
    names = [
        "scene.png",
        "missing.png",
        "private/scene.png",
        "corrupt.png",
        "truncated.png",
        "huge.png",
        "notes.txt",
        "gray16.png",
        "cmyk.jpg",
        "palette.png",
        "strip.png",
        "bomb20k.png",
    ]
    tasks = [task(server, i, n) for i, n in enumerate(names)]
    tasks.append({"id": 99, "data": {"text": "a text task"}})  # no image at all
    tasks.append({"id": 100, "data": {"image": "ftp://example.com/a.png"}})
    tasks.append({"id": 101, "data": {"image": "/etc/hostname"}})  # local path: refused
    out = predict(client, tasks, "boxes", context=typed("the red circle"))
    results = out["results"]
    assert len(results) == len(tasks)
    good = {0, 7, 8, 9}  # 16-bit, CMYK and palette images are converted, not refused
    for i, r in enumerate(results):
        if i in good:
            assert isinstance(r, dict) and regions_of(r, "rectanglelabels"), (i, r)
        else:
            assert r == [], (i, r)  # "no prediction for this task"
    errors = {e["task"]: e for e in out["errors"]}
    assert set(errors) == {tasks[i]["id"] for i in range(len(tasks)) if i not in good}
    assert "HTTP 404" in errors[1]["detail"] and errors[1]["kind"] == "fetch"
    assert "HTTP 401" in errors[2]["detail"] and "token" in errors[2]["detail"]
    assert errors[3]["kind"] == errors[4]["kind"] == errors[6]["kind"] == "decode"
    assert "above the limit" in errors[5]["detail"]
    assert errors[99]["kind"] == "no_image" and "image" in errors[99]["detail"]
    assert "unsupported image reference scheme" in errors[100]["detail"]
    assert "LOCAL_FILES_DOCUMENT_ROOT" in errors[101]["detail"]
    # the strip is refused before a pixel is allocated, as an image problem
    assert errors[10]["kind"] == "decode" and "aspect ratio of 1000:1" in errors[10]["detail"]
    assert "NEXTCHAT_MAX_IMAGE_PIXELS" in errors[10]["detail"]
    # the product's limit and setting, not only Pillow's message
    assert "NEXTCHAT_MAX_IMAGE_PIXELS" in errors[11]["detail"]


def test_a_request_whose_every_task_fails_is_an_error(client, server):
    out = predict(client, [task(server, 1, "missing.png")], "boxes", status=502)
    assert out["status"] == "error" and "HTTP 404" in out["detail"]
    assert out["errors"][0]["task"] == 1
    out = predict(
        client, [task(server, 1, "corrupt.png"), task(server, 2, "notes.txt")], "boxes", status=422
    )
    assert "none of the 2 tasks" in out["detail"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "body is empty"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"tasks": {}}', 400, "'tasks' must be a list"),
        (b'{"tasks": [1]}', 400, "tasks[0] must be an object"),
        (b'{"tasks": []}', 400, "no label config"),
        (
            b'{"tasks": [], "label_config": "<View><Text name=\\"t\\" value=\\"$t\\"/></View>"}',
            400,
            "no <Image",
        ),
        (b'{"tasks": [], "label_config": "<View"}', 400, "not valid XML"),
        (
            json.dumps(
                {
                    "tasks": [],
                    "label_config": '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
                }
            ).encode(),
            400,
            "no control this backend can fill",
        ),
        (
            json.dumps({"tasks": [], "label_config": "<View/>", "project": "../../etc"}).encode(),
            400,
            "project id",
        ),
        (
            json.dumps({"tasks": [], "label_config": label_config("boxes"), "params": []}).encode(),
            400,
            "'params' must be an object",
        ),
        (
            json.dumps(
                {
                    "tasks": [],
                    "label_config": label_config("boxes"),
                    "params": {"context": {"result": "x"}},
                }
            ).encode(),
            400,
            "context.result",
        ),
    ],
)
def test_bad_requests_get_json_errors(client, body, status, message):
    reply = client.post("/predict", data=body, content_type="application/json")
    assert reply.status_code == status
    out = reply.get_json()
    assert out["status"] == "error" and message in out["detail"], out


def test_empty_and_too_long_prompts(client, server):
    out = predict(client, [task(server, 1)], "boxes", context=typed("   "), status=400)
    assert "prompt is empty" in out["detail"]
    out = predict(client, [task(server, 1)], "boxes", context=typed("x" * 5000), status=400)
    assert "5000 characters" in out["detail"]
    # from a task field, only that task fails; a prompt too long for the model in tokens
    # (but not in characters) too
    out = predict(
        client,
        [
            task(server, 1, prompt="y" * 3000),
            task(server, 2, prompt="the red circle"),
            task(server, 3, prompt="x " * 900),
        ],
        "boxes",
        project="43.1",
    )
    assert out["results"][0] == [] and out["results"][2] == []
    assert regions_of(out["results"][1], "rectanglelabels")
    details = {e["task"]: e["detail"] for e in out["errors"]}
    assert "3000 characters" in details[1] and "tokens" in details[3]


def test_setup_rejects_bad_configs(client):
    reply = client.post(
        "/setup", json={"project": "7.1", "schema": "<View><Image name='i' value='$i'/></View>"}
    )
    assert (
        reply.status_code == 400
        and "no control this backend can fill" in reply.get_json()["detail"]
    )
    reply = client.post(
        "/setup", json={"project": "7.1", "schema": label_config("boxes"), "hostname": "ftp://x"}
    )
    assert reply.status_code == 400 and "hostname" in reply.get_json()["detail"]


# ------------------------------------------------------------ security and auth


def test_uploads_fetched_with_the_setup_token_which_is_never_logged(
    store, store_settings, server, tmp_path, caplog
):
    settings = store_settings.with_overrides(model_dir=tmp_path / "md")
    client = create_app(settings, store=store, preload=False).test_client()
    caplog.set_level(logging.DEBUG)
    setup = client.post(
        "/setup",
        json={
            "project": "51.1",
            "schema": label_config("boxes"),
            "hostname": server,
            "access_token": TOKEN,
        },
    )
    assert setup.status_code == 200
    upload = {"id": 5, "data": {"image": "/data/upload/51/scene.png"}}
    out = predict(client, [upload], "boxes", context=typed("the red circle"), project="51.1")
    assert regions_of(out["results"][0], "rectanglelabels")
    # the project state file holds the token (mode 0600), the logs never do
    path = tmp_path / "md" / "projects" / "51.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # a wrong token: Label Studio answers 401, the task fails with a hint
    client.post(
        "/setup", json={"project": "52.1", "hostname": server, "access_token": "wrong-token-42"}
    )
    out = predict(
        client, [upload, task(server, 6)], "boxes", context=typed("the red circle"), project="52.1"
    )
    assert out["results"][0] == [] and "HTTP 401" in out["errors"][0]["detail"]
    for secret in (TOKEN, "wrong-token-42"):
        assert secret not in caplog.text
    assert "access token received" in caplog.text


def test_basic_auth_on_every_route_and_the_webhook_exception(
    store, store_settings, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    settings = store_settings.with_overrides(
        model_dir=tmp_path / "md", basic_auth_user="ls", basic_auth_pass="s3cret-pass"
    )
    client = create_app(settings, store=store, preload=False).test_client()
    event = {"action": "START_TRAINING", "project": {"id": 3}}
    for method, path in (
        ("get", "/health"),
        ("get", "/metrics"),
        ("get", "/versions"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
    ):
        reply = getattr(client, method)(path, json=event)
        assert reply.status_code == 401, path
        assert reply.get_json()["status"] == "error" and "WWW-Authenticate" in reply.headers
    wrong = client.get("/health", auth=("ls", "nope"))
    assert wrong.status_code == 401
    assert client.get("/health", auth=("ls", "s3cret-pass")).status_code == 200
    assert client.post("/webhook", json=event, auth=("ls", "s3cret-pass")).status_code == 201
    # Label Studio's auto-created webhook sends no credentials: allowed only when configured
    open_hook = settings.with_overrides(webhook_allow_unauthenticated=True)
    client = create_app(open_hook, store=store, preload=False).test_client()
    assert client.post("/webhook", json=event).status_code == 201
    assert client.get("/health").status_code == 401
    assert "s3cret-pass" not in caplog.text
    assert "s3cret-pass" not in repr(settings) and TOKEN not in repr(settings)
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "only-user"})


# ------------------------------------------------------------------------ webhook


def test_webhook_events(store, store_settings, tmp_path):
    settings = store_settings.with_overrides(model_dir=tmp_path / "md")
    client = create_app(settings, store=store, preload=False).test_client()
    reply = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    assert reply.status_code == 200 and reply.get_json() == {"status": "Unknown event"}
    annotation = {"id": 11, "task": 5, "result": []}
    t0 = time.perf_counter()
    for body in (
        {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 3},
            "task": {"id": 5, "data": {"image": "x.png"}},
            "annotation": annotation,
        },
        {
            "action": "ANNOTATION_UPDATED",
            "project": {"id": 3},
            "task": {"id": 5, "data": {"image": "x.png"}},
            "annotation": annotation,
        },
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"id": 11}]},
        {"action": "START_TRAINING", "project": {"id": 3, "title": "p"}},
    ):
        reply = client.post("/webhook", json=body)
        assert reply.status_code == 201, reply.get_json()
        assert reply.get_json()["status"] == "recorded"
    assert (time.perf_counter() - t0) / 4 < 0.5  # Label Studio gives up after 1 s
    from training.store import AnnotationStore

    stored = AnnotationStore(tmp_path / "md")
    assert stored.export_tasks("3") == []  # created, updated, then deleted
    assert [j.reason for j in stored.jobs("3")] == ["START_TRAINING"]
    for body, message in (
        ({"project": {"id": 3}}, "'action'"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 3}}, "'annotation'"),
        ({"action": "START_TRAINING"}, "'project'"),
        ({"action": "START_TRAINING", "project": 3}, "'project'"),
    ):
        reply = client.post("/webhook", json=body)
        assert reply.status_code == 400 and message in reply.get_json()["detail"], body
    assert client.post("/webhook", data=b"nope", content_type="application/json").status_code == 400


# --------------------------------------------------------------- model lifecycle


def test_weights_load_once_and_a_new_version_is_picked_up(ckpt, server, tmp_path):
    settings = Settings.from_env({}, checkpoint=str(ckpt), model_dir=tmp_path / "md")
    store = ModelCache(settings)
    client = create_app(settings, store=store, preload=False).test_client()
    base = client.get("/health").get_json()["model_version"]
    replies: list[int] = []

    def call() -> None:
        body = {
            "tasks": [task(server, 1)],
            "label_config": label_config("boxes"),
            "params": {"context": typed("the red circle")},
        }
        replies.append(client.post("/predict", json=body).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    call()
    assert replies == [200] * 5 and store.loads == 1
    # a trainer publishes v2 under MODEL_DIR: served from the next request, no restart
    shutil.copytree(ckpt, version_dir(settings.model_dir, "v2"))
    set_current_version(settings.model_dir, "v2")
    assert client.post("/setup", json={"project": "7.1"}).get_json() == {"model_version": "v2"}
    out = predict(client, [task(server, 1)], "boxes", context=typed("the red circle"))
    assert out["results"][0]["model_version"] == "v2" and store.loads == 2
    assert store.loaded_versions() == ["v2"]  # the old version left the cache
    versions = client.get("/versions").get_json()
    assert versions["versions"] == [base, "v2"] and versions["current"] == "v2"
    # a pointer to a missing version: a clear 503, not a crash
    (settings.model_dir / "current").write_text("v3\n")
    reply = client.post(
        "/predict", json={"tasks": [task(server, 1)], "label_config": label_config("boxes")}
    )
    assert reply.status_code == 503 and "holds no checkpoint" in reply.get_json()["detail"]
    with pytest.raises(FileNotFoundError):
        set_current_version(settings.model_dir, "v3")
    with pytest.raises(ValueError, match="version name"):
        version_dir(settings.model_dir, "../evil")


def test_settings_from_env_validates(tmp_path):
    s = Settings.from_env(
        {
            "MODEL_DIR": str(tmp_path),
            "THREADS": "8",
            "SCORE_THRESHOLD": "0.3",
            "WEBHOOK_ALLOW_UNAUTHENTICATED": "true",
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "TORCH_THREADS": "1",
        }
    )
    assert (s.model_dir, s.threads, s.score_threshold) == (tmp_path, 8, 0.3)
    assert s.torch_threads == 1 and Settings.from_env({}).torch_threads is None
    assert s.webhook_allow_unauthenticated and s.label_studio_url == "http://ls:8080"
    for env, message in (
        ({"THREADS": "many"}, "THREADS must be an integer"),
        ({"SCORE_THRESHOLD": "2"}, r"SCORE_THRESHOLD must be a number in \[0.0, 1.0\]"),
        ({"WEBHOOK_ALLOW_UNAUTHENTICATED": "maybe"}, "true or false"),
        ({"LABEL_STUDIO_URL": "ls:8080"}, "http:// or https://"),
        ({"NEXTCHAT_DTYPE": "int8"}, "NEXTCHAT_DTYPE must be one of"),
        ({"SCORE_PRESENCE": "maybe"}, "SCORE_PRESENCE must be one of exists, at"),
        ({"PRESENCE_THRESHOLD": "-1"}, r"PRESENCE_THRESHOLD must be a number in \[0.0, 1.0\]"),
        ({"CROSS_LABEL_IOU": "x"}, "CROSS_LABEL_IOU must be a number"),
    ):
        with pytest.raises(ValueError, match=message):
            Settings.from_env(env)


def test_score_threshold_drops_low_boxes(ckpt, server, tmp_path, store):
    settings = Settings.from_env({}, checkpoint=str(ckpt), model_dir=tmp_path)
    client = create_app(settings, store=store, preload=False).test_client()
    out = predict(client, [task(server, 1)], "boxes", context=typed("the red circle"))
    scores = [r["score"] for r in out["results"][0]["result"]]
    assert scores and max(scores) < 0.999
    client = create_app(
        settings.with_overrides(score_threshold=0.999), store=store, preload=False
    ).test_client()
    out = predict(client, [task(server, 1)], "boxes", context=typed("the red circle"))
    # every box held back: the task's score is how sure the model is that none is there
    assert out["results"][0]["result"] == []
    assert out["results"][0]["score"] == pytest.approx(min(1 - s for s in scores), abs=1e-6)


def test_presence_settings_reach_the_served_model(ckpt, server, tmp_path):
    """SCORE_PRESENCE / PRESENCE_THRESHOLD override the checkpoint's scoring: the tiny
    checkpoint scores by <at> (no gate); asked to score by p(yes) with a threshold no
    answer reaches, every prompt's boxes are held back and the task's score says how sure
    the model is that nothing is there."""
    settings = Settings.from_env(
        {"SCORE_PRESENCE": "exists", "PRESENCE_THRESHOLD": "1.0"},
        checkpoint=str(ckpt),
        model_dir=tmp_path,
    )
    store = ModelCache(settings)
    _, predictor = store.get()
    assert (predictor.presence, predictor.presence_threshold) == ("exists", 1.0)
    client = create_app(settings, store=store, preload=False).test_client()
    out = predict(client, [task(server, 1)], "boxes", context=typed("the red circle"))
    (result,) = out["results"]
    assert result["result"] == []
    img, _, _ = scene()
    predictor.set_image(img, with_masks=False)
    (p_yes,) = predictor.exists("the red circle")
    assert result["score"] == pytest.approx(1 - p_yes, abs=1e-4)


def test_task_score_is_the_least_certain_decision():
    """The prediction's score (Data Manager sorting): shown boxes count with their score,
    boxes held back (presence gate, SCORE_THRESHOLD) and prompts without any box with the
    confidence that nothing is there; duplicates decide nothing."""
    from backend.results import task_score
    from nextchat_core.predictor import Answer, Detection

    def det(score: float) -> Detection:
        return Detection(box=np.array([0.0, 0.0, 10.0, 10.0]), score=score)

    sure, fair, duplicate, low = det(0.95), det(0.7), det(0.9), det(0.1)
    found = Answer("the cat", "", detections=[sure, fair, duplicate, low], presence=0.9)
    assert task_score([found], [sure, fair], score_threshold=0.3) == pytest.approx(0.7)
    # a box under SCORE_THRESHOLD is "not there", as sure as its score is low: 1 - 0.1
    assert task_score([found], [sure], score_threshold=0.3) == pytest.approx(0.9)
    gated = Answer("the dog", "", rejected=[det(0.2), det(0.3)], presence=0.2)
    assert task_score([gated], [], score_threshold=0.0) == pytest.approx(0.7)
    nothing = Answer("the bird", "", presence=0.6)  # no box, yet the model leans "yes"
    assert task_score([found, gated, nothing], [sure, fair], 0.0) == pytest.approx(0.4)
    assert task_score([found, gated], [sure, fair], 0.0) == pytest.approx(0.7)
    # a checkpoint without presence scoring says nothing about a prompt without a box
    assert task_score([Answer("the bird", "")], [], 0.0) == 0.0


# ------------------------------------------------- label config roles, small helpers


def test_label_plan_roles_and_label_matching():
    plan = plan_for(label_config("per_label_prompts"))
    assert [(p.prompt, p.label) for p in plan.label_prompts()] == [
        ("all cars", "Car"),
        ("person", "Person"),
        ("pedestrian", "Person"),
        ("Traffic light", "Traffic light"),
    ]
    c = plan.rectangles
    assert plan.label_for("all red cars", c) == "Car"
    assert plan.label_for("pedestrians crossing", c) == "Person"
    assert plan.label_for("the traffic lights", c) == "Traffic light"
    assert plan.label_for("a dog", c) == "Car"  # no word in common: the first label
    assert plan.label_for("a dog", c, preferred="Person") == "Person"
    chat = plan_for(label_config("chat"))
    assert (chat.prompt_area.name, chat.answer_area.name, chat.task_prompt_keys()) == (
        "question",
        "answer",
        ["question", "prompt"],
    )
    caption = plan_for(label_config("region_caption"))
    assert caption.caption_area.name == "caption" and caption.prompt_area is None
    masks = plan_for(label_config("boxes_masks"))
    assert (
        masks.needs_masks
        and masks.brushes.name == "mask"
        and masks.task_prompt_keys() == ["prompt"]
    )
    with pytest.raises(ValueError, match="question"):
        plan_for('<View><Image name="i" value="$i"/><TextArea name="answer" toName="i"/></View>')


def test_ls_format_label_attributes():
    cfg = parse_label_config(
        '<View><Image name="i" value="$i"/><TextArea name="p" toName="i" value="$q" perRegion="true"/>'
        '<RectangleLabels name="r" toName="i"><Label value="Car" alias="car" hint="all cars"/>'
        '<Label value="Bus" predicted_values="bus, coach ,"/><Label value="Van"/></RectangleLabels></View>'
    )
    area, rect = cfg.controls[0], cfg.controls[1]
    assert area.attrs["value"] == "$q" and area.attrs["perRegion"] == "true"
    assert rect.labels == ("car", "Bus", "Van")
    assert rect.label_attrs["car"]["value"] == "Car"
    assert rect.label_prompts("car") == ["all cars"]
    assert rect.label_prompts("Bus") == ["bus", "coach"]
    assert rect.label_prompts("Van") == ["Van"]


def test_simplify_polygon_keeps_the_shape():
    _, m1, _ = scene()
    (poly,) = mask_to_polygons(m1)
    assert polygon_area(poly) == m1.sum()  # traced along pixel edges: exact
    simple = simplify_polygon(poly, 1.0)
    assert 3 <= len(simple) < len(poly) / 2
    assert mask_iou(polygon_to_mask(simple, W, H), m1) > 0.9
    assert np.array_equal(simplify_polygon(poly, 0.0), poly)
    square = np.array([[0, 0], [5, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    assert len(simplify_polygon(square, 0.5)) == 4  # the collinear point goes
    with pytest.raises(ValueError, match="tolerance"):
        simplify_polygon(square, -1)


# --------------------------------------------------------------- deployment files


def test_docker_compose_and_dockerfile():
    import yaml

    repo = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"label-studio", "postgres", "redis", "backend", "worker"} <= set(services)
    ls = services["label-studio"]
    assert ls["image"].startswith("heartexlabs/label-studio:1.23.2")
    assert "postgres" in ls["depends_on"]
    env = _env(ls)
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "postgres"
    backend = services["backend"]
    assert (repo / backend["build"]["context"] / backend["build"]["dockerfile"]).is_file()
    benv = _env(backend)
    for key in (
        "NEXTCHAT_CHECKPOINT",
        "NEXTCHAT_DEVICE",
        "MODEL_DIR",
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_API_KEY",
        "BASIC_AUTH_USER",
        "BASIC_AUTH_PASS",
        "WEBHOOK_ALLOW_UNAUTHENTICATED",
        "WORKERS",
        "THREADS",
    ):
        assert key in benv, key
    assert benv["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    worker = services["worker"]
    assert worker["command"][:2] == ["nextchat", "worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert _env(worker)["NEXTCHAT_DEVICE"] == "cuda"
    prelabel = services["prelabel-worker"]
    assert prelabel["command"] == ["nextchat", "worker", "--queues", "prelabel"]
    assert _env(prelabel)["NEXTCHAT_DEVICE"] == "cuda"
    named = set(compose["volumes"])
    for name in ("backend", "worker", "prelabel-worker", "label-studio"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert source in named or source.startswith("./"), volume
    models = {v.split(":")[1] for v in backend["volumes"]} & {
        v.split(":")[1] for v in worker["volumes"]
    }
    assert benv["MODEL_DIR"] in models  # backend and worker share the model versions
    assert benv["MODEL_DIR"] in {v.split(":")[1] for v in prelabel["volumes"]}
    assert backend["healthcheck"]["test"]
    dockerfile = (repo / backend["build"]["context"] / backend["build"]["dockerfile"]).read_text()
    assert "nextchat" in dockerfile and "serve" in dockerfile and "EXPOSE 9090" in dockerfile


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# ------------------------------------------------------- the real server command


def test_nextchat_serve_runs_under_gunicorn(ckpt, server, tmp_path):
    """``nextchat serve`` as a subprocess: gunicorn answers /health and /predict."""
    import requests

    from nextchat_cli.loop_demo import start_backend

    env = {**os.environ, "MODEL_DIR": str(tmp_path / "md"), "THREADS": "2"}
    proc, url = start_backend(env, tmp_path / "serve.log", checkpoint=ckpt, timeout=60)
    try:
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "UP"
        body = {
            "tasks": [task(server, 1)],
            "label_config": label_config("boxes_masks"),
            "params": {"context": typed("all shapes")},
        }
        reply = requests.post(f"{url}/predict", json=body, timeout=60)
        assert reply.status_code == 200
        result = reply.json()["results"][0]
        assert len(regions_of(result, "rectanglelabels")) == 2
        assert len(regions_of(result, "brushlabels")) == 2
    finally:
        proc.stop()
    out = proc.text()
    assert "Booting worker" in out and "gthread" in out


# ------------------------------------------------- faults from a sweep of the running service


def test_bad_input_is_a_4xx_naming_the_problem_and_never_fails_its_batch(client, server):
    # a lone surrogate typed as the prompt (JSON "\ud800" escapes decode to one)
    body = json.dumps(
        {
            "tasks": [task(server, 1)],
            "label_config": label_config("boxes"),
            "params": {"context": typed("green \ud800 square")},
        }
    )
    reply = client.post("/predict", data=body, content_type="application/json")
    assert reply.status_code == 400 and "surrogate" in reply.get_json()["detail"]
    # ... or in a task's own prompt field; a task whose data is a string; one with no data
    tasks = [
        task(server, 1),
        task(server, 2, prompt="green \ud800 square"),
        {"id": 3, "data": "scene.png"},
        {"id": 4},
    ]
    body = json.dumps({"tasks": tasks, "label_config": label_config("boxes")})
    out = client.post("/predict", data=body, content_type="application/json")
    assert out.status_code == 200, out.get_json()
    out = out.get_json()
    assert isinstance(out["results"][0], dict) and out["results"][1:] == [[], [], []]
    errors = {e["task"]: e["detail"] for e in out["errors"]}
    assert "surrogate" in errors[2]
    assert "'data' must be an object" in errors[3] and "got str" in errors[3]
    assert "no 'data' object" in errors[4]
    # JSON nested 100,000 deep
    deep = b"[" * 100_000 + b"]" * 100_000
    reply = client.post("/predict", data=deep, content_type="application/json")
    assert reply.status_code == 400 and "too deeply" in reply.get_json()["detail"]
    # a project id that is a path
    reply = client.get("/training?project=../x")
    assert reply.status_code == 400 and "project" in reply.get_json()["detail"]
    # a project object without its id
    reply = client.post("/setup", json={"project": {"a": 1}, "schema": label_config("boxes")})
    assert reply.status_code == 400 and "'id'" in reply.get_json()["detail"]
    # a Choices-only config is named as such
    choices = (
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
        '<Choice value="a"/></Choices></View>'
    )
    reply = client.post("/setup", json={"project": "7.1", "schema": choices})
    assert reply.status_code == 400 and "found: Choices" in reply.get_json()["detail"]


def test_body_size_and_task_count_are_limited(store, store_settings, server):
    settings = store_settings.with_overrides(max_request_mb=0.5, max_tasks=3)
    client = create_app(settings, store=store, preload=False).test_client()
    big = json.dumps({"tasks": [{}] * 200_000, "label_config": label_config("boxes")})
    reply = client.post("/predict", data=big, content_type="application/json")
    assert reply.status_code == 413
    tasks = [task(server, i) for i in range(4)]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": label_config("boxes")})
    assert reply.status_code == 413 and "MAX_TASKS" in reply.get_json()["detail"]


def test_a_token_only_goes_to_the_host_it_came_with(client, store_settings):
    from labelstudio.projects import ProjectStore

    first = {"project": "41.1", "hostname": "http://ls.example:8080", "access_token": "secret"}
    assert client.post("/setup", json=first).status_code == 200
    assert (
        client.post("/setup", json={"project": "41.1", "hostname": "http://evil:1"}).status_code
        == 200
    )
    state = ProjectStore(store_settings.model_dir).get("41")
    assert state.hostname == "http://evil:1" and state.access_token is None
    options = store_settings.with_overrides(
        label_studio_url="http://ls.example:8080", label_studio_api_key="env-key"
    ).fetch_options(state)
    assert options.hostname == "http://evil:1" and options.access_token is None


def test_health_is_readiness_and_livez_is_liveness(store, store_settings, tmp_path):
    settings = store_settings.with_overrides(model_dir=tmp_path / "md")
    client = create_app(settings, preload=False).test_client()
    assert client.get("/health").status_code == 200
    (tmp_path / "md").mkdir(exist_ok=True)
    (tmp_path / "md" / "current").write_text("gone-version\n")  # names a missing version
    reply = client.get("/health")
    assert reply.status_code == 503 and reply.get_json()["status"] == "DOWN"
    assert client.get("/livez").get_json() == {"status": "UP"}
    for d in (
        create_app(store_settings, store=store, preload=False)
        .test_client()
        .get("/versions")
        .get_json()["details"]
    ):
        assert "path" not in d


def test_an_unwritable_model_dir_is_named_and_predictions_go_on(
    store, store_settings, server, tmp_path
):
    md = tmp_path / "md"
    md.mkdir()
    (md / "projects").write_text("not a folder")  # the prompt memory cannot be written
    (md / "annotations.sqlite").mkdir()  # nor can the annotation store be opened
    settings = store_settings.with_overrides(model_dir=md)
    client = create_app(settings, store=store, preload=False, enqueue_retry_s=None).test_client()
    out = predict(client, [task(server, 1)], "boxes", context=typed("the red circle"))
    assert regions_of(out["results"][0], "rectanglelabels")
    health = client.get("/health").get_json()
    assert "prompt_memory" in health["storage"]
    reply = client.post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": 3, "title": "p"}}
    )
    assert reply.status_code == 503 and "annotation store" in reply.get_json()["detail"]
    assert reply.get_json()["detail"].startswith("storage")
    assert not list(md.glob("**/*.tmp"))


def test_invalid_annotations_are_refused_at_the_webhook(store, store_settings, tmp_path):
    settings = store_settings.with_overrides(model_dir=tmp_path / "md")
    client = create_app(settings, store=store, preload=False).test_client()
    rect = {"x": 150, "y": 10, "width": 10, "height": 10, "rectanglelabels": ["Car"]}
    for value, message in (
        (rect, "outside the image"),
        ({**rect, "x": float("nan")}, "finite number"),
        ({**rect, "x": 10, "width": -5}, "negative size"),
    ):
        body = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 3},
            "task": {"id": 5, "data": {"image": "x.png"}},
            "annotation": {
                "id": 12,
                "result": [
                    {"id": "r1", "type": "rectanglelabels", "from_name": "label",
                     "to_name": "image", "original_width": 96, "original_height": 64,
                     "value": value}
                ],
            },
        }  # fmt: skip
        reply = client.post(
            "/webhook", data=json.dumps(body), content_type="application/json"
        )  # NaN goes out as the JavaScript literal, as Label Studio's JSON can
        assert reply.status_code == 400, reply.get_json()
        assert message in reply.get_json()["detail"] and "r1" in reply.get_json()["detail"]


def test_a_hung_broker_does_not_hold_a_webhook(store, store_settings, tmp_path, monkeypatch):
    import socket

    from training import celery_app

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never answers: a hung broker
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    celery_app.get_app.cache_clear()
    try:
        settings = store_settings.with_overrides(model_dir=tmp_path / "md")
        client = create_app(
            settings, store=store, preload=False, enqueue_retry_s=None
        ).test_client()
        t0 = time.perf_counter()
        reply = client.post(
            "/webhook", json={"action": "START_TRAINING", "project": {"id": 3, "title": "p"}}
        )
        took = time.perf_counter() - t0
        assert reply.status_code == 201 and reply.get_json()["enqueued"] is False
        assert took < 1.0, took  # Label Studio gives up on a webhook after 1 s
    finally:
        silent.close()
        celery_app.get_app.cache_clear()


def test_light_routes_answer_while_predictions_fill_the_slots(store, store_settings, server):
    settings = store_settings.with_overrides(predict_slots=1)
    app = create_app(settings, store=store, preload=False)
    slow_done = threading.Event()

    def slow() -> None:
        # holds the only slot: its image comes from a host that answers after 1.5 s
        app.test_client().post(
            "/predict",
            json={
                "tasks": [task(server, 1, "slow/scene.png")],
                "label_config": label_config("boxes"),
            },
        )
        slow_done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    client = app.test_client()
    t0 = time.perf_counter()
    busy = client.post(
        "/predict", json={"tasks": [task(server, 2)], "label_config": label_config("boxes")}
    )
    health = client.get("/health")
    took = time.perf_counter() - t0
    thread.join()
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert "PREDICT_SLOTS" in busy.get_json()["detail"]
    assert health.status_code == 200 and took < 0.5, took
    assert slow_done.is_set()
