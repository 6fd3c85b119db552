"""The backend against a real Label Studio 1.23.2 server (its own venv under ``.lsenv/``).

Everything runs for real, as separate processes: ``label-studio start`` (SQLite in a temp
dir) and ``nextchat serve`` (gunicorn) on the tiny overfit checkpoint; images come from a
local HTTP server and from a Label Studio upload. Plain HTTP against Label Studio's API
(the SDK's action calls return ``None``, see the facts file).

Skipped only when pip cannot install ``label-studio`` (the reason carries pip's error).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement
from test_backend_support import (
    BOX1,
    REPO,
    H,
    W,
    image_server,
    label_config,
    overfit_checkpoint,
    png_bytes,
    scene,
)

from labelstudio import results as ls_results
from nextchat_cli.loop_demo import Proc, free_port, start_backend
from nextchat_core import frames
from training.store import AnnotationStore

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

LS_VERSION = "1.23.2"
LS_VENV = REPO / ".lsenv"
# Label Studio 1.23.2 asks for sentry-sdk>=2.16 with no upper bound; sentry-sdk 3.0 (2026-12)
# refuses its `send_default_pii` option and the server exits at start. Installed beside it.
LS_PINS = (f"label-studio=={LS_VERSION}", "sentry-sdk>=2.16,<3")
USER, PASSWORD = "admin@example.com", "nextchat-test-pass"


def _ls_installed() -> bool:
    """``.lsenv`` holds versions that satisfy every one of ``LS_PINS``."""
    exe = LS_VENV / "bin" / "python"
    if not exe.exists():
        return False
    pins = [Requirement(pin) for pin in LS_PINS]
    probe = subprocess.run(
        [
            str(exe),
            "-c",
            "import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
            *(pin.name for pin in pins),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return False  # a package is missing: install
    installed = json.loads(probe.stdout)
    return all(pin.specifier.contains(installed[pin.name], prereleases=True) for pin in pins)


@pytest.fixture(scope="session")
def ls_venv() -> Path:
    """``.lsenv/`` with label-studio installed (reused when present). Label Studio pins
    redis<5.3, which breaks Celery in the project venv: it must live in its own."""
    if not _ls_installed():
        shutil.rmtree(LS_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(LS_VENV)], check=True, timeout=300)
        pip = subprocess.run(
            [
                str(LS_VENV / "bin" / "pip"),
                "install",
                "-q",
                "--disable-pip-version-check",
                *LS_PINS,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if pip.returncode != 0 or not _ls_installed():
            error = [
                line for line in (pip.stderr or pip.stdout).splitlines() if line.startswith("ERROR")
            ] or (pip.stderr or pip.stdout).splitlines()[-3:]
            pytest.skip(f"pip cannot install label-studio=={LS_VERSION}: {' | '.join(error)[:500]}")
    return LS_VENV


@pytest.fixture(scope="module")
def ls(ls_venv, tmp_path_factory) -> Iterator[dict]:
    """A Label Studio server on a free port, data and HOME in a temp dir."""
    home = tmp_path_factory.mktemp("ls-home")
    port = free_port()
    token = secrets.token_hex(20)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "POSTGRE"))
        and k not in ("USERNAME", "PASSWORD")
    }
    env.update(
        HOME=str(home),
        LABEL_STUDIO_BASE_DATA_DIR=str(home / "data"),
        ML_BLOCK_LOCAL_IP="false",
        USE_DEFAULT_BANNED_SUBNETS="false",
    )
    server = Proc(
        [
            str(ls_venv / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--port",
            str(port),
            "--internal-host",
            "127.0.0.1",
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--user-token",
            token,
            "--enable-legacy-api-token",
        ],
        env,
        home / "label-studio.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_for_url(f"{url}/health", timeout=240)
        yield {
            "url": url,
            "token": token,
            "headers": {"Authorization": f"Token {token}"},
            "process": server,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def backend(ls, tmp_path_factory) -> Iterator[dict]:
    """``nextchat serve`` on the tiny overfit checkpoint, debug logging to a file."""
    ckpt = overfit_checkpoint(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("backend")
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(root / "models"),
        "THREADS": "4",
        # the active-learning loop, for real: Redis broker, a worker started by the test
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        "CELERY_QUEUE": f"ls-test-{port}",
        "RETRAIN_EVERY": "0",
        "RETRAIN_MIN_TASKS": "1",
        "RETRAIN_STAGES": "2",
        "RETRAIN_MAX_STEPS": "3",
        "RETRAIN_BATCH_SIZE": "2",
        "PROMOTE_POLICY": "always",
        "TORCH_THREADS": "1",
    }
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(key, None)
    server, url = start_backend(
        env, root / "backend.log", checkpoint=ckpt, extra=["--log-level", "debug"]
    )
    try:
        yield {
            "url": url,
            "model_dir": root / "models",
            "process": server,
            "env": env,
            "root": root,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("ls-images")
    img, _, _ = scene()
    (root / "scene.png").write_bytes(png_bytes(img))
    with image_server(root) as url:
        yield {"url": url, "file": root / "scene.png"}


def api(ls: dict, method: str, path: str, **kwargs) -> requests.Response:
    reply = requests.request(method, ls["url"] + path, headers=ls["headers"], timeout=120, **kwargs)
    assert reply.status_code < 400, f"{method} {path}: {reply.status_code} {reply.text[:500]}"
    return reply


def connect_backend(ls: dict, project: int, backend_url: str) -> dict:
    """Connect the backend to ``project`` as a user does in Settings -> Model (interactive
    pre-annotation on); Label Studio's reply, which must say the backend answered (CO)."""
    ml = api(
        ls,
        "POST",
        "/api/ml",
        json={"url": backend_url, "project": project, "title": "nextchat", "is_interactive": True},
    )
    assert ml.status_code == 201 and ml.json()["state"] == "CO", ml.json()
    return ml.json()


def wait_for_project_version(ls: dict, project: int, version: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    seen = None
    while time.time() < deadline:
        seen = api(ls, "GET", f"/api/projects/{project}").json()["model_version"]
        if seen == version:
            return
        time.sleep(0.3)
    raise AssertionError(f"project {project} model_version is {seen!r}, expected {version!r}")


def project_tasks(ls: dict, project: int) -> list[dict]:
    reply = api(ls, "GET", f"/api/tasks?project={project}&page_size=100").json()
    return reply["tasks"] if isinstance(reply, dict) else reply


SHIPPED_CONFIGS = sorted(p.stem for p in (REPO / "label_configs").glob("*.xml"))


def test_every_shipped_config_takes_image_only_tasks_and_uploads(ls, images):
    """Each shipped config is accepted, and takes tasks that hold only an image: a JSON
    import without a prompt key and a direct file upload (which refuses configs with more
    than one data key)."""
    assert {"boxes", "boxes_masks", "chat", "click_masks", "per_label_prompts"} <= set(
        SHIPPED_CONFIGS
    )
    for name in SHIPPED_CONFIGS:
        reply = api(
            ls,
            "POST",
            "/api/projects",
            json={"title": f"config {name}", "label_config": label_config(name)},
        )
        assert reply.status_code == 201, name
        project = reply.json()["id"]
        api(
            ls,
            "POST",
            f"/api/projects/{project}/import",
            json=[{"image": f"{images['url']}/scene.png"}],
        )
        with open(images["file"], "rb") as f:
            api(
                ls,
                "POST",
                f"/api/projects/{project}/import",
                files={"file": ("scene.png", f, "image/png")},
            )
        assert len(project_tasks(ls, project)) == 2, name


def test_predictions_stored_in_label_studio(ls, backend, images):
    project = api(
        ls,
        "POST",
        "/api/projects",
        json={"title": "nextchat boxes+masks", "label_config": label_config("boxes_masks")},
    ).json()["id"]
    with open(images["file"], "rb") as f:  # fetched by the backend with /setup's token
        api(
            ls,
            "POST",
            f"/api/projects/{project}/import",
            files={"file": ("scene.png", f, "image/png")},
        )
    # two tasks by URL, with a prompt field
    api(
        ls,
        "POST",
        f"/api/projects/{project}/import",
        json=[
            {"image": f"{images['url']}/scene.png", "prompt": "all shapes"},
            {"image": f"{images['url']}/scene.png", "prompt": "the red circle"},
        ],
    )
    ml_id = connect_backend(ls, project, backend["url"])["id"]
    version = requests.get(f"{backend['url']}/health", timeout=10).json()["model_version"]

    reply = api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert reply.status_code == 200
    upload, *by_url = sorted(project_tasks(ls, project), key=lambda t: t["id"])
    tasks = [*by_url, upload]
    assert len(tasks) == 3
    assert upload["data"]["image"].startswith("/data/upload/")
    stored = {}
    for t in tasks:
        predictions = api(ls, "GET", f"/api/predictions?task={t['id']}").json()
        assert len(predictions) == 1, (t, predictions)
        stored[t["id"]] = predictions[0]
    for t, expected_boxes in zip(tasks, (2, 1, None), strict=True):
        p = stored[t["id"]]
        assert p["model_version"] == version
        rects = [r for r in p["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in p["result"] if r["type"] == "brushlabels"]
        if expected_boxes is not None:
            assert len(rects) == expected_boxes and len(brushes) == expected_boxes
        assert rects and brushes
        for r in rects + brushes:
            assert r["value"][r["type"]][0] in ("Car", "Person")
            assert (r["original_width"], r["original_height"]) == (W, H)
            assert 0 < r["score"] <= 1
        for b in brushes:  # the stored RLE decodes to a mask of this image
            mask = ls_results.ls_rle_to_mask(b["value"]["rle"], W, H)
            assert mask.any()
        # every box shown, none held back (the tiny preset has no presence gate): the task
        # score is the weakest box's
        assert p["score"] == pytest.approx(min(r["score"] for r in rects), abs=1e-4)
    one = next(r for r in stored[tasks[1]["id"]]["result"] if r["type"] == "rectanglelabels")
    v = one["value"]
    box = frames.percent_to_pixel(frames.PercentRect(v["x"], v["y"], v["width"], v["height"]), W, H)
    assert frames.box_iou(box, BOX1) > 0.8
    # Label Studio set the project's model_version to the backend's title; once this
    # version's predictions are stored the backend points it at the served version, which
    # the editor and the Data Manager's "Prediction score" column filter by
    wait_for_project_version(ls, project, version)
    listed = api(ls, "GET", f"/api/tasks?project={project}&fields=all&page_size=100").json()
    scores = {t["id"]: t.get("predictions_score") for t in listed["tasks"]}
    for t in tasks:
        assert scores[t["id"]] == pytest.approx(stored[t["id"]]["score"], abs=1e-4), scores
    # a second "retrieve" skips tasks already predicted with this model version
    api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert all(len(api(ls, "GET", f"/api/predictions?task={t['id']}").json()) == 1 for t in tasks)

    # interactive pre-annotation with a typed prompt: regions come back, nothing stored
    context = {
        "result": [
            {
                "from_name": "prompt",
                "to_name": "image",
                "type": "textarea",
                "value": {"text": ["all shapes"]},
            }
        ]
    }
    reply = api(
        ls,
        "POST",
        f"/api/ml/{ml_id}/interactive-annotating",
        json={"task": tasks[2]["id"], "context": context},
    ).json()
    data = reply["data"]
    assert data["model_version"] == version
    assert len([r for r in data["result"] if r["type"] == "rectanglelabels"]) == 2
    assert len(api(ls, "GET", f"/api/predictions?task={tasks[2]['id']}").json()) == 1

    # the webhook Label Studio created on connect: annotation and training events recorded
    annotation = {
        "result": [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": W,
                "original_height": H,
                "value": {
                    "x": 10,
                    "y": 10,
                    "width": 30,
                    "height": 40,
                    "rotation": 0,
                    "rectanglelabels": ["Car"],
                },
            }
        ]
    }
    api(ls, "POST", f"/api/tasks/{tasks[0]['id']}/annotations", json=annotation)
    # The worker pulls the project from Label Studio (label-studio-sdk) before training.
    worker_env = {
        **backend["env"],
        "LABEL_STUDIO_URL": ls["url"],
        "LABEL_STUDIO_API_KEY": ls["token"],
    }
    worker = Proc(
        [sys.executable, "-m", "nextchat_cli", "worker"],
        worker_env,
        backend["root"] / "worker.log",
    )
    try:
        api(ls, "POST", f"/api/ml/{ml_id}/train", json={})
        store = AnnotationStore(backend["model_dir"])
        deadline = time.time() + 240
        jobs = []
        while time.time() < deadline:
            jobs = store.jobs(str(project))
            if jobs and jobs[0].state in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert jobs and jobs[0].state == "succeeded", (
            jobs,
            worker.tail(),
            backend["process"].tail(),
        )
    finally:
        worker.stop()
    # the webhook's annotation (with the task's data) is what the job trained on
    stored_tasks = store.export_tasks(str(project))
    assert [t["id"] for t in stored_tasks] == [tasks[0]["id"]]
    assert stored_tasks[0]["data"]["image"] == tasks[0]["data"]["image"]
    assert jobs[0].reason == "START_TRAINING" and jobs[0].result["promoted"]
    assert jobs[0].result["synced_from_label_studio"] == {
        "tasks": 1,
        "annotations": 1,
        "removed": 0,
    }
    new_version = requests.get(f"{backend['url']}/health", timeout=10).json()["model_version"]
    assert new_version == jobs[0].result["version"] != version
    # the new model_version makes Label Studio predict again: a second prediction per task
    api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    for t in tasks:
        versions_seen = {
            p["model_version"] for p in api(ls, "GET", f"/api/predictions?task={t['id']}").json()
        }
        assert versions_seen == {version, new_version}, (t["id"], versions_seen)
    wait_for_project_version(ls, project, new_version)  # the editor shows the new ones
    # a version chosen by hand in Label Studio (here: imported predictions) is left alone
    api(
        ls,
        "POST",
        "/api/predictions",
        json={"task": tasks[0]["id"], "result": [], "score": 0.5, "model_version": "imported-v1"},
    )
    api(ls, "PATCH", f"/api/projects/{project}", json={"model_version": "imported-v1"})
    api(ls, "GET", f"/api/ml?project={project}")  # Label Studio calls /setup again
    time.sleep(2)
    assert api(ls, "GET", f"/api/projects/{project}").json()["model_version"] == "imported-v1"

    # the access token /setup received was used (the upload) but never logged
    log = backend["process"].log.read_text()
    assert "access token received" in log
    assert ls["token"] not in log


def _interactive(ls: dict, ml_id: int, task_id: int, *prompts: str) -> list[dict]:
    context = {
        "result": [
            {
                "from_name": "prompt",
                "to_name": "image",
                "type": "textarea",
                "value": {"text": list(prompts)},
            }
        ]
    }
    reply = api(
        ls,
        "POST",
        f"/api/ml/{ml_id}/interactive-annotating",
        json={"task": task_id, "context": context},
    ).json()
    return reply["data"]["result"]


def test_team_flow_editor_and_exports(ls, backend, images, tmp_path, monkeypatch, capsys):
    """A team's day in a real Label Studio: image-only tasks, prompts typed in the editor,
    suggestions accepted and submitted, then COCO exports of labels and pre-labels."""
    from nextchat_cli import main as cli

    project = api(
        ls,
        "POST",
        "/api/projects",
        json={"title": "team flow", "label_config": label_config("boxes_masks")},
    ).json()["id"]
    url = f"{images['url']}/scene.png"
    api(ls, "POST", f"/api/projects/{project}/import", json=[{"image": url} for _ in range(3)])
    annotated, empty, fresh = sorted(t["id"] for t in project_tasks(ls, project))
    ml_id = connect_backend(ls, project, backend["url"])["id"]

    # prompt after prompt in the editor: the newest prompt is asked, each region keeps it
    found = _interactive(ls, ml_id, annotated, "the red circle")
    rect = next(r for r in found if r["type"] == "rectanglelabels")
    mask = next(r for r in found if r["type"] == "brushlabels")
    assert rect["meta"] == {"text": ["the red circle"]} and mask["parentID"] == rect["id"]
    second = _interactive(ls, ml_id, annotated, "the red circle", "all shapes")
    assert {tuple(r["meta"]["text"]) for r in second} == {("all shapes",)}
    # accepted and submitted: Label Studio keeps each region's prompt and the box-mask link
    prompt_area = {
        "id": "typed",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["the red circle", "all shapes"]},
    }
    api(ls, "POST", f"/api/tasks/{annotated}/annotations", json={"result": [*found, prompt_area]})
    api(ls, "POST", f"/api/tasks/{empty}/annotations", json={"result": []})  # nothing there
    (saved,) = api(ls, "GET", f"/api/tasks/{annotated}/annotations").json()
    kept = {r["id"]: r for r in saved["result"]}
    assert kept[mask["id"]]["parentID"] == rect["id"]
    assert kept[rect["id"]]["meta"] == {"text": ["the red circle"]}

    # "Retrieve predictions" asks again with no prompt: the last typed prompt pre-labels
    # the task nobody annotated, and puts nothing on the annotated ones
    api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    regions = {
        t: [r for p in api(ls, "GET", f"/api/predictions?task={t}").json() for r in p["result"]]
        for t in (annotated, empty, fresh)
    }
    assert regions[annotated] == [] and regions[empty] == []
    assert len([r for r in regions[fresh] if r["type"] == "rectanglelabels"]) == 2  # all shapes

    # exports: what is annotated (URL-hosted, unannotated tasks no longer stop it), the
    # box and its mask as one object, full predictions through the API
    monkeypatch.setenv("LABEL_STUDIO_URL", ls["url"])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls["token"])
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    assert cli.main(["export-coco", "--project", str(project), "-o", str(gt_path)]) == 0
    assert "left out 1 task(s) not annotated" in capsys.readouterr().out
    gt = json.loads(gt_path.read_text())
    assert sorted(im["id"] for im in gt["images"]) == [annotated, empty]
    sizes = {(im["width"], im["height"]) for im in gt["images"]}
    assert sizes == {(W, H)}  # the empty annotation's image was downloaded to size it
    (obj,) = gt["annotations"]  # one object: its rectangle and its mask
    assert obj["ls_region_id"] == rect["id"] and obj["ls_shape_region_ids"] == [mask["id"]]
    assert obj["prompt"] == "the red circle"
    args = ["export-coco", "--project", str(project), "-o", str(dt_path), "--source", "predictions"]
    assert cli.main(args) == 0
    dt = json.loads(dt_path.read_text())
    # every task holds a prediction of this version; only the fresh one has regions
    assert sorted(im["id"] for im in dt["images"]) == [annotated, empty, fresh]
    assert {a["image_id"] for a in dt["annotations"]} == {fresh}
    assert len(dt["annotations"]) == 2 and all(0 < a["score"] <= 1 for a in dt["annotations"])
    results_path = tmp_path / "results.json"
    args = [*args[:-2], "--source", "predictions", "--format", "results", "-o", str(results_path)]
    assert cli.main(args) == 0
    results = json.loads(results_path.read_text())
    assert len(results) == 2 and all(r["segmentation"] and r["image_id"] == fresh for r in results)


def test_demo_project_in_one_command(ls, backend):
    from nextchat_cli.demo_project import create_demo_project
    from training import synth

    made = create_demo_project(ls["url"], ls["token"], backend_url=backend["url"], scenes=3)
    assert made.tasks == 3 and made.url == f"{ls['url']}/projects/{made.project_id}/data"
    tasks = project_tasks(ls, made.project_id)
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)  # no CORS
    project = api(ls, "GET", f"/api/projects/{made.project_id}").json()
    for shape in synth.SHAPES:
        assert f'value="{shape}"' in project["label_config"]
    (ml,) = api(ls, "GET", f"/api/ml?project={made.project_id}").json()
    assert ml["is_interactive"] and ml["url"] == backend["url"] and ml["state"] == "CO"
