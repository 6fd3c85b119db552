"""The Label Studio editor driven in headless Chromium, against the real backend.

Everything real, as a team meets it: ``label-studio start`` 1.23.2 and ``nextchat serve``
(the fixtures of ``test_backend_labelstudio.py``), Debian's ``/usr/bin/chromium`` driven by
playwright with a fresh profile (playwright's own browser download is never used). An
annotator logs in, opens a task, turns on Auto-Annotation, types a prompt (or clicks the
object with the smart keypoint tool), sees the suggested regions, accepts and submits;
the annotation then reaches the backend's store through the webhook Label Studio made
when the backend was connected.

Screenshots of every step go to ``test-artifacts/browser/<test>/`` (``BROWSER_ARTIFACTS``
overrides the folder); the path is printed. Skipped only when Chromium is missing and
cannot be installed (the reason carries apt's error).
"""

# ruff: noqa: F811 - the Label Studio fixtures are imported from test_backend_labelstudio
# and requested by name, which ruff reads as a redefinition.
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_backend_labelstudio import (  # noqa: F401 - fixtures, used by name
    PASSWORD,
    USER,
    api,
    backend,
    ls,
    ls_venv,
)
from test_backend_support import REPO, H, W, label_config, png_bytes, scene

from labelstudio.results import ls_rle_to_mask
from training.store import AnnotationStore

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# A direct upload needs a config with one data key; the project switches to its real
# config afterwards (as test_backend_labelstudio does).
SINGLE_KEY = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" '
    'toName="image"><Label value="Car"/></RectangleLabels></View>'
)


def _chromium_path() -> str | None:
    found = shutil.which("chromium")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt when missing (``.ci/run`` does the same)."""
    path = _chromium_path()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env)
            if done.returncode != 0:
                pytest.skip(
                    f"chromium is missing and `{' '.join(step)}` failed: "
                    f"{(done.stderr or done.stdout).strip()[-400:]}"
                )
        path = _chromium_path()
    if path is None:
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get)")
    return path


@pytest.fixture()
def artifacts(request, capsys) -> Path:
    root = Path(os.environ.get("BROWSER_ARTIFACTS", REPO / "test-artifacts" / "browser"))
    folder = root / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with capsys.disabled():
        print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture()
def page(request, chromium, tmp_path, artifacts) -> Iterator[Any]:
    """A logged-out page of a fresh Chromium profile (its own user-data dir); on failure
    the page's last state is kept as ``failure.png`` and ``failure.html``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(90_000)  # a loaded 2-core machine: be patient
            yield page
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                page.screenshot(path=str(artifacts / "failure.png"))
                (artifacts / "failure.html").write_text(page.content())
        finally:
            context.close()


def _project(ls: dict, backend: dict, config: str, tmp_path: Path) -> dict[str, int]:
    """A project with ``config``, one uploaded scene (served by Label Studio itself, so the
    browser shows it without CORS), the backend connected for interactive pre-annotation.
    Predictions are not shown on open (the editor is what suggests here)."""
    project = api(
        ls,
        "POST",
        "/api/projects",
        json={
            "title": f"browser {config}",
            "label_config": SINGLE_KEY,
            "show_collab_predictions": False,
        },
    ).json()["id"]
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(scene()[0]))
    with open(image, "rb") as f:
        api(
            ls,
            "POST",
            f"/api/projects/{project}/import",
            files={"file": ("scene.png", f, "image/png")},
        )
    api(ls, "PATCH", f"/api/projects/{project}", json={"label_config": label_config(config)})
    # Label Studio gives /health 1 s and /setup 3 s when connecting: wait until the
    # backend's model is loaded (its background preload competes for the CPU otherwise).
    deadline = time.time() + 120
    while not requests.get(f"{backend['url']}/health", timeout=10).json()["loaded"]:
        assert time.time() < deadline, backend["process"].tail()
        time.sleep(0.5)
    body = {"url": backend["url"], "project": project, "title": "nextchat", "is_interactive": True}
    for attempt in range(3):
        # Label Studio gives /setup 3 s; a backend starved of CPU (a loaded machine, tests
        # at nice 19) can miss that once. Anything else fails at once.
        reply = requests.post(f"{ls['url']}/api/ml", json=body, headers=ls["headers"], timeout=120)
        if reply.status_code != 400 or "Read timed out" not in reply.text or attempt == 2:
            break
    assert reply.status_code == 201, reply.text[:500]
    ml = reply.json()
    listed = api(ls, "GET", f"/api/tasks?project={project}").json()
    tasks = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(tasks) == 1
    return {"project": project, "task": tasks[0]["id"], "ml": ml["id"]}


def _open_task(page: Any, ls: dict, ids: dict[str, int], shots: Path) -> None:
    """Log in, open the task in the editor, turn Auto-Annotation on."""
    page.goto(f"{ls['url']}/user/login/")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"^(?!.*/user/login).*$"))
    page.goto(f"{ls['url']}/projects/{ids['project']}/data?task={ids['task']}")
    page.locator("img[src^='blob:']").first.wait_for()  # the editor shows the image
    page.screenshot(path=str(shots / "1-task-open.png"))
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    toggle.check(force=True)  # the input hides behind its styled switch
    assert toggle.is_checked()
    page.screenshot(path=str(shots / "2-auto-annotation-on.png"))


def _suggestions(page: Any) -> int:
    from playwright.sync_api import expect

    info = page.locator(".lsf-auto-accept__info")
    expect(info).to_contain_text(re.compile(r"[1-9]\d* suggestions?"))
    return int(re.search(r"(\d+) suggestion", info.inner_text()).group(1))  # type: ignore[union-attr]


def _accept_and_submit(page: Any, shots: Path, n: int) -> dict:
    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    page.screenshot(path=str(shots / f"{n}-accepted.png"))
    with page.expect_response(
        lambda r: re.search(r"/api/tasks/\d+/annotations", r.url) and r.request.method == "POST"
    ) as created:
        page.get_by_test_id("bottombar-submit-button").click()
    assert created.value.status == 201, created.value.text()
    # the toast itself; Label Studio also announces it in an aria-live status element,
    # whose text ("Notification Annotation saved successfully") would match too
    page.get_by_text("Annotation saved successfully", exact=True).wait_for()
    page.screenshot(path=str(shots / f"{n + 1}-submitted.png"))
    return created.value.json()


def _stored(backend: dict, project: int, task: int, timeout: float = 60) -> dict:
    """The task as the backend's store has it once the webhook arrived."""
    store = AnnotationStore(backend["model_dir"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        for t in store.export_tasks(str(project)):
            if t["id"] == task and t.get("annotations"):
                return t
        time.sleep(0.5)
    raise AssertionError(f"task {task} never reached the store:\n{backend['process'].tail()}")


def test_prompt_suggest_accept_submit_reaches_the_store(ls, backend, page, artifacts, tmp_path):
    ids = _project(ls, backend, "boxes_masks", tmp_path)
    _open_task(page, ls, ids, artifacts)
    page.get_by_placeholder("what to find").fill("all shapes")
    with page.expect_response(lambda r: "/interactive-annotating" in r.url) as asked:
        page.get_by_role("button", name="Add").click()
    assert asked.value.status == 200, asked.value.text()
    suggested = asked.value.json()["data"]["result"]
    n = _suggestions(page)
    page.screenshot(path=str(artifacts / "3-suggestions.png"))
    # the overfit model finds both shapes: a rectangle and a mask each
    kinds = sorted(r["type"] for r in suggested)
    assert kinds == ["brushlabels"] * 2 + ["rectanglelabels"] * 2 and n == len(suggested)
    annotation = _accept_and_submit(page, artifacts, 4)

    saved = {r["id"]: r for r in annotation["result"]}
    assert {r["id"] for r in suggested} <= set(saved)  # the accepted regions, as suggested
    assert any(r["type"] == "textarea" for r in saved.values())  # and the typed prompt
    task = _stored(backend, ids["project"], ids["task"])
    [stored] = task["annotations"]
    assert stored["id"] == annotation["id"]
    assert sorted(r["id"] for r in stored["result"]) == sorted(saved)
    for r in stored["result"]:
        if r["type"] == "brushlabels":
            assert ls_rle_to_mask(r["value"]["rle"], W, H).any()


def test_clicks_in_the_editor_get_sam_masks(ls, backend, page, artifacts, tmp_path):
    ids = _project(ls, backend, "click_masks", tmp_path)
    _open_task(page, ls, ids, artifacts)
    # the "Click" row's Car label, then the smart keypoint tool (the smart tools share one
    # toolbar button: a click moves to the next smart tool)
    page.locator(".lsf-label", has_text="Car").nth(1).click()
    for _ in range(4):
        if page.locator(".lsf-tool_smart.lsf-tool_active[aria-label='key-point-tool']").count():
            break
        page.locator(".lsf-tool_smart:visible").first.click()
    assert page.locator(".lsf-tool_smart.lsf-tool_active[aria-label='key-point-tool']").count()
    shown = page.locator("img[src^='blob:']").first.bounding_box()

    def click(x_px: float, y_px: float, *, alt: bool = False) -> tuple[dict, dict]:
        # Label Studio unselects the label after each new point: pick it again, as an
        # annotator does (or keeps it with the editor setting "Keep label selected").
        chip = page.locator(".lsf-label", has_text="Car").nth(1)
        if "lsf-label_selected" not in (chip.get_attribute("class") or ""):
            chip.click()
        x = shown["x"] + shown["width"] * x_px / W
        y = shown["y"] + shown["height"] * y_px / H
        with page.expect_response(lambda r: "/interactive-annotating" in r.url) as asked:
            if alt:
                page.keyboard.down("Alt")
            page.mouse.click(x, y)
            if alt:
                page.keyboard.up("Alt")
        assert asked.value.status == 200, asked.value.text()
        return asked.value.request.post_data_json, asked.value.json()["data"]

    sent, data = click(28, 24)  # on the red circle
    [point] = sent["context"]["result"]
    assert point["type"] == "keypointlabels" and point["is_positive"] is True
    assert point["value"]["x"] == pytest.approx(100 * 28 / W, abs=1.0)
    [mask] = data["result"]
    assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Car"]
    assert ls_rle_to_mask(mask["value"]["rle"], W, H).shape == (H, W)
    assert _suggestions(page) == 1
    page.screenshot(path=str(artifacts / "3-first-click.png"))

    sent, data = click(70, 40, alt=True)  # Alt + click: a point to leave out
    points = sent["context"]["result"]
    assert [p["type"] for p in points] == ["keypointlabels"] * 2
    assert points[-1]["is_positive"] is False
    [mask] = data["result"]
    page.screenshot(path=str(artifacts / "4-negative-click.png"))
    annotation = _accept_and_submit(page, artifacts, 5)

    masks = [r for r in annotation["result"] if r["type"] == "brushlabels"]
    assert [m["id"] for m in masks] == [mask["id"]]  # the last suggestion was kept
    task = _stored(backend, ids["project"], ids["task"])
    stored_masks = [r for r in task["annotations"][0]["result"] if r["type"] == "brushlabels"]
    assert [m["value"]["brushlabels"] for m in stored_masks] == [["Car"]]


def test_interactive_click_through_label_studio_answers_a_mask(ls, backend, tmp_path):
    """Without a browser: the editor's request as Label Studio forwards it."""
    ids = _project(ls, backend, "click_masks", tmp_path)
    context = {
        "result": [
            {
                "from_name": "box",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": W,
                "original_height": H,
                "value": {
                    "x": 12.5,
                    "y": 12.5,
                    "width": 33.3,
                    "height": 50,
                    "rectanglelabels": ["Person"],
                },
            }
        ]
    }
    reply = requests.post(
        f"{ls['url']}/api/ml/{ids['ml']}/interactive-annotating",
        json={"task": ids["task"], "context": context},
        headers=ls["headers"],
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    [mask] = reply.json()["data"]["result"]
    assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Person"]
    assert ls_rle_to_mask(mask["value"]["rle"], W, H).any()
    # nothing is stored: interactive answers go back to the editor only
    assert api(ls, "GET", f"/api/predictions?task={ids['task']}").json() == []
