"""Shared pieces of the active-learning tests: a tiny base checkpoint, synthetic
annotated tasks, and REAL processes: the backend (`nextchat serve`, gunicorn) and Celery
workers (`nextchat worker`), each with its own environment (broker, MODEL_DIR, ...).

Imported by ``test_active_learning.py``; it holds no tests itself.
"""

from __future__ import annotations

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

import requests
from PIL import Image

from training import synth

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"  # .ci/run starts redis-server when none answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tasks(
    root: Path, n: int, *, seed: int = 5, first_id: int = 1, masks: bool = False, **cfg: Any
) -> list[dict[str, Any]]:
    """``n`` annotated tasks of synthetic scenes (images written under ``root``)."""
    config = synth.SynthConfig(
        min_side=64,
        max_side=96,
        task_mix={"rec": 1.0, "multi": 0.0, "caption": 0.0, "chat": 0.0},
        records_per_scene=1,
        **cfg,
    )
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for scene, records in synth.generate(seed, n, config, start=first_id):
        path = root / f"scene-{seed}-{scene.scene_id}.png"
        Image.fromarray(scene.image).save(path)
        tasks.append(synth.label_studio_task(records[0], scene.scene_id, str(path), masks=masks))
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
            "CELERY_QUEUE": f"test-{uuid.uuid4().hex[:10]}",
            "TORCH_THREADS": "1",
            "PRELOAD_MODEL": "0",
            "JOB_HEARTBEAT_S": "1",
            "RETRAIN_STAGES": "2",
            "RETRAIN_MAX_STEPS": "6",
            "RETRAIN_BATCH_SIZE": "4",
            "RETRAIN_EVERY": "0",
            "PROMOTE_POLICY": "always",
            "PYTHONUNBUFFERED": "1",
            **{k: str(v) for k, v in env.items()},
        }
        self.env.pop("CELERY_BROKER_URL", None)
        if broker is not None:
            self.env["CELERY_BROKER_URL"] = broker
        self.procs: list[Proc] = []
        self.url: str | None = None

    def serve(self) -> str:
        port = free_port()
        proc = self._start(["serve", "--host", "127.0.0.1", "--port", str(port)], "serve")
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=10).ok:
                    return self.url
            except (requests.ConnectionError, requests.Timeout):
                pass
            if proc.popen.poll() is not None:
                raise AssertionError(f"backend exited:\n{proc.text()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"backend did not answer /health:\n{proc.text()[-4000:]}")

    def worker(self, name: str = "w1") -> Proc:
        proc = self._start(["worker", "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h"], name)
        proc.wait_for_log("ready.", timeout=120)
        return proc

    def _start(self, args: list[str], name: str) -> Proc:
        argv = [sys.executable, "-m", "nextchat_core.cli", *args]
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

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
