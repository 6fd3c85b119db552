"""The active-learning loop end to end, with real processes: ``nextchat loop-demo``.

It deploys the loop as a user does - the backend (``nextchat serve``, gunicorn) and a
Celery worker (``nextchat worker``) sharing one ``MODEL_DIR`` and broker - and drives it
over HTTP exactly as Label Studio would: ``/predict`` to pre-label, ``/webhook`` with
corrected annotations and START_TRAINING, ``/training`` to follow the job.

The demo's new domain (:func:`team_tasks`) is one annotation team's images: one large
part per image that the team's camera always frames right of center, asked for as "the
part". Neither the tiny test model nor the bundled demo model has seen this framing; the
corrections teach it. It measures held-out Acc@0.5 of the pre-labels before, feeds the
corrected annotations, lets the worker retrain and promote, and measures again. The loop's
tests (tests/test_active_learning.py) use the same harness and domain.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image, ImageDraw

from labelstudio.results import pair_objects, parse_results, rectangle_result, textarea_result
from nextchat_core import frames
from nextchat_core.masks import mask_iou
from training import synth

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"  # .ci/run starts redis-server when none answers

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Object"/></RectangleLabels>
  <TextArea name="prompt" toName="image" value="$prompt" rows="1" maxSubmissions="1"/>
</View>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tasks(
    root: Path,
    n: int,
    *,
    seed: int = 5,
    first_id: int = 1,
    masks: bool = False,
    **cfg: Any,
) -> list[dict[str, Any]]:
    """``n`` annotated tasks of synthetic scenes (images written under ``root``), one
    referring expression each, in ``data.prompt`` too."""
    cfg = {"min_side": 64, "max_side": 96, **cfg}
    config = synth.SynthConfig(
        task_mix={"rec": 1.0, "multi": 0.0, "caption": 0.0, "chat": 0.0},
        records_per_scene=1,
        **cfg,
    )
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for scene, records in synth.generate(seed, n, config, start=first_id):
        path = root / f"scene-{seed}-{scene.scene_id}.png"
        Image.fromarray(scene.image).save(path)
        record = records[0]
        task = synth.label_studio_task(record, scene.scene_id, str(path), masks=masks)
        task["data"]["prompt"] = record["expression"]
        tasks.append(task)
    return tasks


def team_tasks(root: Path, n: int, *, first_id: int, seed: int) -> list[dict[str, Any]]:
    """``n`` annotated tasks of the demo team's domain (images under ``root``): one large
    light shape per dark image, centred right of the middle (jittered), "the part"."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(first_id, first_id + n):
        w, h = int(rng.integers(80, 112)), int(rng.integers(64, 96))
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 90, 3)))
        side = 0.45 * min(w, h) * rng.uniform(0.9, 1.1)
        cx, cy = w * rng.uniform(0.62, 0.7), h * rng.uniform(0.45, 0.55)
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        color = tuple(int(v) for v in rng.integers(150, 256, 3))
        ImageDraw.Draw(img).rectangle(box, fill=color)
        path = root / f"team-{i}.png"
        img.save(path)
        result = [
            rectangle_result(box, ["Object"], width=w, height=h, region_id=f"r{i}"),
            textarea_result("the part"),
        ]
        tasks.append(
            {
                "id": i,
                "data": {"image": str(path), "prompt": "the part"},
                "annotations": [{"id": 50_000 + i, "task": i, "result": result}],
            }
        )
    return tasks


def annotation_event(
    task: dict[str, Any], project: int, action: str = "ANNOTATION_CREATED"
) -> dict:
    """The webhook body Label Studio sends when an annotation is submitted."""
    annotation = task["annotations"][0]
    return {
        "action": action,
        "project": {"id": project, "title": f"project {project}"},
        "task": {"id": task["id"], "data": task["data"]},
        "annotation": annotation,
    }


class Proc:
    """A child process in its own session (so a SIGKILL reaches its whole tree), logging
    to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - held open for the child's lifetime
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def wait_for_url(
        self,
        url: str,
        timeout: float,
        ready: Callable[[requests.Response], bool] = lambda r: r.ok,
    ) -> None:
        """Poll ``url`` until ``ready(reply)``; an error with the log's tail if the
        process exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{url}: process exited ({self.popen.returncode}):\n{self.tail()}"
                )
            try:
                if ready(requests.get(url, timeout=10)):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} not ready within {timeout} s:\n{self.tail()}")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.popen.returncode}):\n{self.text()[-4000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not logged within {timeout} s:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group (worker main process + its pool children)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()


def start_backend(
    env: dict[str, str],
    log: Path,
    *,
    checkpoint: Path | None = None,
    extra: list[str] | None = None,
    timeout: float = 120,
    ready: Callable[[requests.Response], bool] = lambda r: r.ok,
) -> tuple[Proc, str]:
    """``nextchat serve`` (gunicorn) on a free local port, waited for until ``/health``
    is ``ready``; returns the process and its URL."""
    port = free_port()
    argv = [sys.executable, "-m", "nextchat_cli", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(port), *(["--checkpoint", str(checkpoint)] if checkpoint else [])]
    proc = Proc(argv + (extra or []), env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_for_url(url + "/health", timeout, ready)
    except BaseException:
        proc.stop()
        raise
    return proc, url


class Loop:
    """A backend + workers sharing one MODEL_DIR and broker, as a user deploys them."""

    def __init__(self, tmp: Path, base: Path, *, broker: str | None, **env: Any) -> None:
        self.tmp, self.model_dir = tmp, tmp / "model_dir"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "MODEL_DIR": str(self.model_dir),
            "NEXTCHAT_CHECKPOINT": str(base),
            "LOCAL_FILES_DOCUMENT_ROOT": str(tmp),
            "CELERY_QUEUE": f"loop-{uuid.uuid4().hex[:10]}",
            "PRELOAD_MODEL": "0",
            "RETRAIN_EVERY": "0",
            "PYTHONUNBUFFERED": "1",
            **{k: str(v) for k, v in env.items()},
        }
        self.env.pop("CELERY_BROKER_URL", None)
        if broker is not None:
            self.env["CELERY_BROKER_URL"] = broker
        self.procs: list[Proc] = []
        self.url: str | None = None

    def serve(self) -> str:
        proc, self.url = start_backend(self.env, self.tmp / f"serve-{len(self.procs)}.log")
        self.procs.append(proc)
        return self.url

    def worker(self, name: str = "w1") -> Proc:
        proc = self._start(["worker", "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h"], name)
        proc.wait_for_log("ready.", timeout=120)
        return proc

    def _start(self, args: list[str], name: str) -> Proc:
        argv = [sys.executable, "-m", "nextchat_cli", *args]
        proc = Proc(argv, self.env, self.tmp / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def post(self, body: Any, status: int | None = 201) -> dict[str, Any]:
        assert self.url
        reply = requests.post(self.url + "/webhook", json=body, timeout=5)
        if status is not None:
            assert reply.status_code == status, reply.text
        return reply.json()

    def training(self) -> dict[str, Any]:
        assert self.url
        return requests.get(self.url + "/training", timeout=5).json()

    def health(self) -> dict[str, Any]:
        assert self.url
        return requests.get(self.url + "/health", timeout=5).json()

    def wait_job(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            jobs = {j["job_id"]: j for j in self.training()["jobs"]}
            job = jobs.get(job_id, {})
            if job and until(job):
                return job
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.log.name}\n{p.text()[-3000:]}" for p in self.procs)
        raise AssertionError(f"job {job_id} stuck at {job}\n{logs}")

    def predict(
        self, tasks: list[dict[str, Any]], batch: int = 16, label_config: str = LABEL_CONFIG
    ) -> list[dict[str, Any]]:
        """Pre-labels as Label Studio requests them ("Retrieve predictions")."""
        assert self.url
        out = []
        for i in range(0, len(tasks), batch):
            chunk = [{"id": t["id"], "data": t["data"]} for t in tasks[i : i + batch]]
            body: dict[str, Any] = {
                "tasks": chunk,
                "project": "7.1700000000",
                "label_config": label_config,
            }
            reply = requests.post(self.url + "/predict", json=body, timeout=600)
            reply.raise_for_status()
            out.extend(reply.json()["results"])
        return out

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def prelabel_accuracy(tasks: list[dict[str, Any]], predictions: list[Any]) -> dict[str, float]:
    """Acc@0.5 of pre-labels: the best-scored rectangle of each task against its corrected
    box (tasks with one box). A task without a prediction counts as a miss. When every
    corrected box has its brush mask nested under it, also ``mask_miou``: the mean IoU of
    the best rectangle's predicted mask (none: 0) with the corrected one."""
    hits, ious, mask_ious = 0, [], []
    for task, pred in zip(tasks, predictions, strict=True):
        truth = [
            r
            for r in pair_objects(parse_results(task["annotations"][0]["result"]))
            if r.kind == "rectangle"
        ]
        assert len(truth) == 1, "one corrected box per task"
        true_mask = truth[0].to_mask() if truth[0].shapes else None
        regions = parse_results(pred.get("result", [])) if isinstance(pred, dict) else []
        boxes = [r for r in pair_objects(regions) if r.kind == "rectangle"]
        if not boxes:
            ious.append(0.0)
            mask_ious.append(0.0)
            continue
        best = max(boxes, key=lambda r: r.score if r.score is not None else 0.0)
        iou = frames.box_iou(best.box_xyxy, truth[0].box_xyxy)
        ious.append(iou)
        hits += iou >= 0.5
        if true_mask is not None:
            mask_ious.append(mask_iou(best.to_mask(), true_mask) if best.shapes else 0.0)
    out = {"acc50": hits / len(tasks), "mean_iou": sum(ious) / len(ious), "n": len(tasks)}
    if len(mask_ious) == len(tasks):
        out["mask_miou"] = sum(mask_ious) / len(mask_ious)
    return out


def run_demo(
    out: Path,
    base: Path,
    *,
    n_train: int = 150,
    n_eval: int = 100,
    broker: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The documented demo: pre-label the team's held-out tasks, feed ``n_train``
    corrected annotations through ``/webhook``, retrain in a real worker, pre-label again."""
    out.mkdir(parents=True, exist_ok=True)
    train_tasks = team_tasks(out / "images", n_train, first_id=1, seed=1)
    eval_tasks = team_tasks(out / "images", n_eval, first_id=100_000, seed=2)
    loop = Loop(out, base, broker=broker, **(env or {}))
    try:
        loop.serve()
        before_version = loop.health()["model_version"]
        t0 = time.perf_counter()
        before = prelabel_accuracy(eval_tasks, loop.predict(eval_tasks))
        predict_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for task in train_tasks:
            loop.post(annotation_event(task, 7))
        webhooks_s = time.perf_counter() - t0
        loop.worker()
        t0 = time.perf_counter()
        job_id = loop.post({"action": "START_TRAINING", "project": {"id": 7}})["job"]
        job = loop.wait_job(
            job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=3 * 3600
        )
        retrain_s = time.perf_counter() - t0
        if job["state"] != "succeeded":
            raise RuntimeError(f"retraining failed: {job['error']}")
        after_version = loop.health()["model_version"]
        after = prelabel_accuracy(eval_tasks, loop.predict(eval_tasks))
    finally:
        loop.close()
    report = {
        "annotations": n_train,
        "held_out_tasks": n_eval,
        "before": {"version": before_version, **before},
        "after": {"version": after_version, **after},
        "promoted": job["result"]["promoted"],
        "gate": job["result"]["reason"],
        "stages": job["result"]["stages"],
        "prelabel_s": round(predict_s, 1),
        "webhooks_s": round(webhooks_s, 2),
        "retrain_job_s": round(retrain_s, 1),
    }
    (out / "loop-demo.json").write_text(json.dumps(report, indent=2))
    return report


def readme_table(report: dict[str, Any]) -> str:
    """The README's loop-demo table, generated from a ``loop-demo.json`` report (never
    copied by hand: ``nextchat loop-demo --readme REPORT``)."""
    before, after = report["before"], report["after"]
    gain = 100 * (after["acc50"] - before["acc50"])
    promoted = "a new version, promoted by the gate" if report["promoted"] else "not promoted"
    stages = ", ".join(f"stage {s['stage']}: {s['steps']} steps" for s in report["stages"])
    return "\n".join(
        [
            "| | served version | held-out Acc@0.5 | mean IoU |",
            "|---|---|---|---|",
            f"| before | `{before['version']}` (bundled) | {before['acc50']:.2f} | "
            f"{before['mean_iou']:.2f} |",
            f"| after {report['annotations']} corrections | `{after['version']}` ({promoted}) "
            f"| **{after['acc50']:.2f}** | **{after['mean_iou']:.2f}** |",
            "",
            f"{gain:+.0f} points of Acc@0.5 on {report['held_out_tasks']} held-out tasks. The "
            f"retraining job took {report['retrain_job_s']} s ({stages}); the "
            f"{report['annotations']} webhooks were answered in {report['webhooks_s']} s in all.",
        ]
    )
