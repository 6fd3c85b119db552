"""Pre-labeling a whole project on workers (backend.prelabel, training.prelabel_runs),
for real: a Label Studio 1.23.2 server (its own venv, the fixtures of
test_backend_labelstudio.py), Redis (127.0.0.1:6379), ``nextchat serve`` and ``nextchat
worker --queues prelabel`` processes; images from a local HTTP server. Nothing mocked.

The model is the tiny overfit checkpoint of test_backend_support.py (answers "all shapes"
with two boxes of the 96x64 scene), so the run's mechanics are under test, not accuracy.
:data:`N_TASKS` is the issue's 200 (chunks of 8, model batches of 4: 25 chunks, so every
worker runs several and the kill lands mid-run); the whole file took 96 s on 2 CPU cores
shared with one training run (43 s of it Label Studio's first start), 18 min when three
other engineers' test servers shared them too. The store's claim rules have fast tests of their own
at the end (no server).
"""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_backend_labelstudio import api, ls, ls_venv  # noqa: F401 - fixtures
from test_backend_support import image_server, overfit_checkpoint, png_bytes, scene

from nextchat_cli.loop_demo import REDIS_URL, Proc, start_backend
from training.prelabel_runs import MAX_CLAIMS, PrelabelStore, RunOptions

N_TASKS = 200
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Shape"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prelabel-images")
    img, _, _ = scene()
    (root / "scene.png").write_bytes(png_bytes(img))
    with image_server(root) as url:
        yield url


@pytest.fixture(scope="module")
def stack(ls, tmp_path_factory) -> Iterator[dict]:  # noqa: F811 - the ls fixture
    """``nextchat serve`` with Label Studio's address and token in its environment, and a
    factory of pre-labeling workers on the same MODEL_DIR and Redis queue."""
    import redis

    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()  # CI starts Redis
    ckpt = overfit_checkpoint(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("prelabel")
    env = {
        **os.environ,
        "MODEL_DIR": str(root / "models"),
        "NEXTCHAT_CHECKPOINT": str(ckpt),
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_QUEUE": f"prelabel-test-{uuid.uuid4().hex[:8]}",
        "LABEL_STUDIO_URL": ls["url"],
        "LABEL_STUDIO_API_KEY": ls["token"],
        "PRELABEL_LEASE_S": "4",  # a dead worker's tasks are taken over after 4 s
        "PRELABEL_CHUNK_SIZE": "8",
        "BATCH_SIZE": "4",
        "TORCH_THREADS": "1",
        "PRELOAD_MODEL": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PRELABEL_QUEUE"):
        env.pop(key, None)
    server, url = start_backend(env, root / "backend.log", extra=["--log-level", "info"])
    workers: list[Proc] = []

    def worker(name: str) -> Proc:
        argv = [sys.executable, "-m", "nextchat_cli", "worker", "--queues", "prelabel"]
        argv += ["--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h"]
        proc = Proc(argv, env, root / f"{name}.log")
        workers.append(proc)
        proc.wait_for_log("ready.", timeout=180)
        return proc

    try:
        yield {"url": url, "env": env, "root": root, "worker": worker, "server": server}
    finally:
        for w in workers:
            w.stop()
        server.stop()


def _project(ls: dict, tasks: list[dict]) -> int:  # noqa: F811
    pid = api(ls, "POST", "/api/projects", json={"title": "prelabel", "label_config": CONFIG})
    project = pid.json()["id"]
    api(ls, "POST", f"/api/projects/{project}/import", json=tasks)
    return project


def _predictions(ls: dict, project: int) -> dict[int, list[dict]]:  # noqa: F811
    by_task: dict[int, list[dict]] = collections.defaultdict(list)
    for p in api(ls, "GET", f"/api/predictions?project={project}").json():
        by_task[p["task"]].append(p)
    return by_task


def _task_ids(ls: dict, project: int) -> list[int]:  # noqa: F811
    reply = api(ls, "GET", f"/api/tasks?project={project}&page_size=1000").json()
    tasks = reply["tasks"] if isinstance(reply, dict) else reply
    return sorted(t["id"] for t in tasks)


def _wait(url: str, run_id: str, until, timeout: float, logs: list[Proc]) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = requests.get(f"{url}/prelabel", params={"run": run_id}, timeout=10).json()["runs"][0]
        if until(run):
            return run
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.log.name}\n{p.tail(30)}" for p in logs)
    raise AssertionError(f"run {run_id} stuck at {run}\n{tails}")


def _holds_claims(db_path: Path, run_id: str, proc: Proc) -> bool:
    """Does a process of ``proc``'s group (a worker and its pool child) hold claimed
    tasks of ``run_id``? Owners are ``host:pid:nonce`` (backend.prelabel.run_chunk)."""
    group = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == proc.popen.pid:  # the process group
            group.add(entry)
    with sqlite3.connect(db_path, timeout=10) as db:
        owners = db.execute(
            "SELECT DISTINCT owner FROM tasks WHERE run_id=? AND state='claimed'", (run_id,)
        ).fetchall()
    return any(o.split(":")[1] in group for (o,) in owners if o)


def _cli(stack: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nextchat_cli", *args],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.labelstudio
@pytest.mark.slow
def test_two_workers_a_sigkill_and_a_dead_image(ls, stack, images):  # noqa: F811
    tasks = [{"image": f"{images}/scene.png", "prompt": "all shapes"} for _ in range(N_TASKS)]
    dead_index = 13  # in the second chunk, between live tasks
    tasks[dead_index] = {"image": f"{images}/gone.png", "prompt": "all shapes"}
    project = _project(ls, tasks)
    ids = _task_ids(ls, project)
    dead_task = ids[dead_index]
    version = requests.get(stack["url"] + "/health", timeout=10).json()["model_version"]
    first, second = stack["worker"]("w1"), stack["worker"]("w2")

    reply = requests.post(stack["url"] + "/prelabel", json={"project": project}, timeout=10)
    assert reply.status_code == 202, reply.text
    run_id = reply.json()["run"]["run_id"]
    procs = [stack["server"], first, second]

    def both_wrote(run: dict) -> bool:
        chunks = [w.text().count("succeeded in") for w in (first, second)]
        return run["done"] >= 24 and min(chunks) >= 1

    # Kill one worker (SIGKILL: main process and pool child) once both have written, in
    # the middle of a chunk: stopped (SIGSTOP) while it holds claimed tasks, killed if it
    # still does (else let go and caught at a later chunk).
    _wait(stack["url"], run_id, both_wrote, 600, procs)
    db_path = Path(stack["env"]["MODEL_DIR"]) / "prelabel.sqlite"
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "w1 never held a claimed chunk"
        if _holds_claims(db_path, run_id, first):
            os.killpg(first.popen.pid, signal.SIGSTOP)
            if _holds_claims(db_path, run_id, first):
                break
            os.killpg(first.popen.pid, signal.SIGCONT)
        time.sleep(0.02)
    written_by_first = first.text().count("succeeded in")
    first.kill()
    run = _wait(stack["url"], run_id, lambda r: r["state"] != "running", 600, procs)

    assert run["state"] == "done", run
    assert run["options"]["chunk_size"] == 8  # the server's PRELABEL_CHUNK_SIZE
    assert (run["total"], run["done"], run["failed"]) == (N_TASKS, N_TASKS - 1, 1), run
    assert run["rate_per_s"] > 0 and run["eta_s"] is None
    # The dead image is reported with its reason and did not stop its chunk.
    [failure] = run["failures"]
    assert failure["task"] == dead_task and "gone.png" in failure["error"], failure
    assert "fetch" in failure["error"]
    # Exactly one prediction per task, this version's, with scores; none for the dead one.
    stored = _predictions(ls, project)
    assert sorted(stored) == sorted(set(ids) - {dead_task})
    assert all(len(p) == 1 for p in stored.values()), {t: len(p) for t, p in stored.items()}
    for [p] in stored.values():
        assert p["model_version"] == version
        boxes = [r for r in p["result"] if r["type"] == "rectanglelabels"]
        assert len(boxes) == 2 and all(0 < r["score"] <= 1 for r in boxes)
        # the task score: its least certain decision (every box shown: the weakest one)
        assert p["score"] == pytest.approx(min(r["score"] for r in boxes), abs=1e-4)
        assert all(r["value"]["rectanglelabels"] == ["Shape"] for r in boxes)
    # Both workers ran chunks; the killed one's chunk was taken over by the survivor.
    assert written_by_first >= 1 and second.text().count("succeeded in") >= 1
    assert "stopped renewing its lease" in stack["server"].text()
    with sqlite3.connect(db_path) as db:
        taken_over = db.execute(
            "SELECT COUNT(*) FROM tasks WHERE run_id=? AND claims>1", (run_id,)
        ).fetchone()[0]
    assert taken_over >= 1  # the kill landed mid-chunk

    # Listing like train-status: the run, its rate and the failed task with its reason.
    status = _cli(stack, "prelabel-status", "--project", str(project))
    assert status.returncode == 0, status.stderr
    assert f"{N_TASKS - 1}/{N_TASKS} written, 1 failed" in status.stdout
    assert f"task {dead_task}:" in status.stdout and "gone.png" in status.stdout


@pytest.mark.labelstudio
@pytest.mark.slow
def test_a_rerun_writes_nothing_and_retries_the_failed_task(ls, stack, images):  # noqa: F811
    tasks = [{"image": f"{images}/scene.png", "prompt": "all shapes"} for _ in range(10)]
    tasks.append({"image": f"{images}/missing.png", "prompt": "all shapes"})
    project = _project(ls, tasks)
    stack["worker"]("w3")
    first = _cli(stack, "prelabel", "--project", str(project), "--chunk-size", "4")
    assert first.returncode == 1, first.stderr  # one task failed: not a clean exit
    assert "11 task(s) to pre-label" in first.stdout
    assert "10/11 written, 1 failed" in first.stdout and "missing.png" in first.stdout
    before = _predictions(ls, project)
    assert len(before) == 10 and all(len(p) == 1 for p in before.values())

    again = _cli(stack, "prelabel", "--project", str(project))
    # Only the failed task is tried again (and fails again); nothing else is written.
    assert "1 task(s) to pre-label" in again.stdout and "10 already had" in again.stdout
    assert "0/1 written, 1 failed" in again.stdout, again.stdout + again.stderr
    after = _predictions(ls, project)
    assert {t: [p["id"] for p in ps] for t, ps in after.items()} == {
        t: [p["id"] for p in ps] for t, ps in before.items()
    }


@pytest.mark.labelstudio
@pytest.mark.slow
def test_cancel_then_restart_continues_where_it_stopped(ls, stack, images):  # noqa: F811
    n = 96
    tasks = [{"image": f"{images}/scene.png", "prompt": "all shapes"} for _ in range(n)]
    project = _project(ls, tasks)
    worker = stack["worker"]("w4")
    reply = requests.post(stack["url"] + "/prelabel", json={"project": project}, timeout=10)
    run_id = reply.json()["run"]["run_id"]
    _wait(stack["url"], run_id, lambda r: r["done"] >= 8, 300, [stack["server"], worker])
    cancel = requests.post(f"{stack['url']}/prelabel/{run_id}/cancel", timeout=10)
    assert cancel.status_code == 200 and cancel.json()["run"]["state"] == "cancelled"
    # Batches in flight finish (at most BATCH_SIZE tasks per worker); then nothing moves.
    counts = [-1]
    while True:
        time.sleep(2.0)
        counts.append(len(_predictions(ls, project)))
        if counts[-1] == counts[-2]:
            break
    run = requests.get(stack["url"] + "/prelabel", params={"run": run_id}, timeout=10).json()
    run = run["runs"][0]
    assert run["state"] == "cancelled" and run["done"] == counts[-1] < n, (run, counts)

    restart = _cli(stack, "prelabel", "--project", str(project))
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert f"{n - counts[-1]} task(s) to pre-label" in restart.stdout
    assert f"{counts[-1]} already had this version's prediction" in restart.stdout
    stored = _predictions(ls, project)
    assert len(stored) == n and all(len(p) == 1 for p in stored.values())


@pytest.mark.labelstudio
@pytest.mark.slow
def test_a_promoted_version_pre_labels_the_unannotated_tasks(ls, stack, images):  # noqa: F811
    tasks = [{"image": f"{images}/scene.png", "prompt": "all shapes"} for _ in range(6)]
    project = _project(ls, tasks)
    ids = _task_ids(ls, project)
    served_before = requests.get(stack["url"] + "/health", timeout=10).json()["model_version"]
    box = {"x": 12.5, "y": 12.5, "width": 33.3, "height": 50.0, "rotation": 0}
    annotation = {
        "result": [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": 96,
                "original_height": 64,
                "value": {**box, "rectanglelabels": ["Shape"]},
            }
        ]
    }
    annotated = ids[:2]
    for tid in annotated:
        api(ls, "POST", f"/api/tasks/{tid}/annotations", json=annotation)
    env = {
        **stack["env"],
        "PRELABEL_ON_PROMOTE": "1",
        "PROMOTE_POLICY": "always",
        "RETRAIN_EVERY": "0",
        "RETRAIN_MIN_TASKS": "1",
        "RETRAIN_STAGES": "2",
        "RETRAIN_MAX_STEPS": "3",
        "RETRAIN_BATCH_SIZE": "2",
    }
    worker = Proc(
        [sys.executable, "-m", "nextchat_cli", "worker", "--queues", "retrain,prelabel"],
        env,
        stack["root"] / "retrain-worker.log",
    )
    try:
        worker.wait_for_log("ready.", timeout=180)
        out = subprocess.run(
            [sys.executable, "-m", "nextchat_cli", "retrain", str(project)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        store = PrelabelStore(Path(env["MODEL_DIR"]))
        deadline = time.monotonic() + 400
        runs: list = []
        while time.monotonic() < deadline:
            runs = [r for r in store.runs(str(project)) if r.options.started_by == "promotion"]
            if runs and runs[0].state not in ("planning", "running"):
                break
            time.sleep(1.0)
        assert runs and runs[0].state == "done", (runs, worker.tail())
    finally:
        worker.stop()
    new_version = runs[0].model_version
    served = requests.get(stack["url"] + "/health", timeout=10).json()["model_version"]
    assert new_version == served != served_before
    assert runs[0].options.selection == "unannotated"
    stored = _predictions(ls, project)
    with_new = {t for t, ps in stored.items() if any(p["model_version"] == new_version for p in ps)}
    assert with_new == set(ids) - set(annotated)


@pytest.mark.labelstudio
@pytest.mark.slow
def test_a_view_and_a_typed_prompt(ls, stack, images):  # noqa: F811
    tasks = [{"image": f"{images}/scene.png", "prompt": "all shapes"} for _ in range(6)]
    project = _project(ls, tasks)
    ids = _task_ids(ls, project)
    view = api(
        ls,
        "POST",
        "/api/dm/views",
        json={
            "project": project,
            "data": {
                "title": "last three",
                "filters": {
                    "conjunction": "and",
                    "items": [
                        {
                            "filter": "filter:tasks:id",
                            "operator": "greater",
                            "type": "Number",
                            "value": ids[2],
                        }
                    ],
                },
            },
        },
    ).json()["id"]
    stack["worker"]("w5")
    # The typed prompt wins over the tasks' own "all shapes": one box (the red circle).
    out = _cli(
        stack,
        "prelabel",
        "--project",
        str(project),
        "--view",
        str(view),
        "--prompt",
        "the red circle",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 task(s) to pre-label" in out.stdout
    stored = _predictions(ls, project)
    assert sorted(stored) == ids[3:]
    for [p] in stored.values():
        assert [r["type"] for r in p["result"]] == ["rectanglelabels"], p["result"]


def test_post_prelabel_rejects_bad_requests(tmp_path, tiny_config, tiny_tokenizer):
    from backend.app import create_app
    from backend.prelabel import connection
    from backend.settings import Settings
    from nextchat_core.build import build_model, save_pretrained

    base = save_pretrained(build_model(tiny_config), tmp_path / "tiny", tiny_tokenizer)
    env = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "token"}
    settings = Settings.from_env(env, checkpoint=str(base), model_dir=tmp_path / "md")
    client = create_app(settings, preload=False, enqueue_retry_s=None).test_client()
    cases = [
        ({}, "'project'"),
        ({"project": 1, "selection": "some"}, "selection must be one of all, unannotated"),
        ({"project": 1, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"project": 1, "colour": "red"}, "unknown pre-labeling option"),
        ({"project": 1, "version": "nope"}, "no model version 'nope'"),
    ]
    for body, message in cases:
        reply = client.post("/prelabel", json=body)
        assert reply.status_code == 400 and message in reply.get_json()["detail"], (
            body,
            reply.text,
        )
    missing = client.get("/prelabel", query_string={"run": "nope"})
    assert missing.status_code == 404 and "unknown pre-labeling run" in missing.get_json()["detail"]
    assert client.get("/prelabel").get_json() == {"runs": []}
    bare = Settings.from_env({}, checkpoint=str(base), model_dir=tmp_path / "md")
    with pytest.raises(ValueError, match="set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        connection(bare, "1")


# ------------------------------------------------------- the store's rules (no server)


def _planned(tmp_path: Path, n: int = 4, chunk_size: int = 2) -> tuple[PrelabelStore, str]:
    store = PrelabelStore(tmp_path)
    run = store.create_run("5", "v1", RunOptions(chunk_size=chunk_size))
    tasks = [{"id": i, "data": {"image": f"/img/{i}.png"}} for i in range(1, n + 1)]
    n_chunks = store.add_tasks(run.run_id, tasks, skipped=0, chunk_size=chunk_size)
    assert n_chunks == -(-n // chunk_size)
    for chunk in range(n_chunks):  # as the planner does once it handed them to the broker
        store.mark_enqueued(run.run_id, chunk)
    return store, run.run_id


def test_claims_are_exclusive_and_a_dead_owners_tasks_are_taken_over_with_a_check(tmp_path):
    store, run = _planned(tmp_path)
    a = store.claim(run, 0, "a", lease_s=0.2)
    assert [c.task_id for c in a] == [1, 2] and not any(c.verify for c in a)
    assert store.claim(run, 0, "b", lease_s=0.2) == []  # a live owner keeps them
    time.sleep(0.3)  # a's lease runs out: a died
    assert store.stale_chunks(run, lease_s=0.0) == [0]
    b = store.claim(run, 0, "b", lease_s=5)
    assert [c.task_id for c in b] == [1, 2] and all(c.verify for c in b)
    assert store.renew(run, "a", [1, 2], 5) == []  # a cannot write what it lost
    store.mark_written(run, "a", {1: 0.5})  # a late write by the old owner changes nothing
    assert store.progress(run).done == 0
    store.mark_written(run, "b", {1: 0.5})
    store.mark_failed(run, "b", {2: "fetch: gone.png: 404"})
    p = store.progress(run)
    assert (p.done, p.failed, p.pending, p.state) == (1, 1, 2, "running")
    assert p.failures == [{"task": 2, "error": "fetch: gone.png: 404"}]


def test_chunks_a_dead_planner_never_enqueued_are_found(tmp_path):
    store = PrelabelStore(tmp_path)
    run = store.create_run("5", "v1", RunOptions(chunk_size=2))
    tasks = [{"id": i, "data": {}} for i in range(1, 6)]
    assert store.add_tasks(run.run_id, tasks, skipped=0, chunk_size=2) == 3
    store.mark_enqueued(run.run_id, 0)  # the planner died after enqueuing chunk 0
    assert store.stale_chunks(run.run_id, lease_s=60) == []  # planning was just now
    assert store.stale_chunks(run.run_id, lease_s=0.0) == [1, 2]
    assert store.stale_chunks(run.run_id, lease_s=0.0) == []  # handed over once


def test_a_chunk_whose_worker_died_before_claiming_is_sent_again(tmp_path, monkeypatch):
    """Real Redis. The chunks are recorded as sent but no message is in the queue: as if
    workers had taken them and died before claiming (with a late acknowledgement Redis
    hands such a message out again only after its visibility timeout)."""
    import redis

    from backend.prelabel import sweep
    from backend.settings import Settings
    from training import celery_app

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    client.ping()  # CI starts Redis
    queue = f"prelabel-lost-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CELERY_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("PRELABEL_QUEUE", queue)
    celery_app.get_app.cache_clear()
    try:
        store, run = _planned(tmp_path, n=6, chunk_size=2)  # chunks 0, 1, 2 "sent"
        settings = Settings.from_env(model_dir=tmp_path, prelabel_lease_s=1.0)
        assert sweep(settings) == 0  # sent just now: a worker may be about to claim
        assert [c.task_id for c in store.claim(run, 0, "live", lease_s=60)] == [1, 2]
        store.mark_written(run, "live", {1: 0.9})  # chunk 1 started, partly written
        store.claim(run, 1, "live", lease_s=60)
        store.mark_written(run, "live", {3: 0.9, 4: 0.8})
        time.sleep(1.1)
        assert store.unclaimed_chunks(run, lease_s=1.0) == [2]
        assert sweep(settings) == 1  # chunk 2 only: 0 is claimed by a live worker, 1 done
        assert celery_app.waiting_messages(queue) == 1
        time.sleep(1.1)
        assert sweep(settings) == 0  # its message waits in the queue: nothing lost
        client.delete(queue)  # taken again by a worker that died again
        time.sleep(1.1)
        assert sweep(settings) == 1 and celery_app.waiting_messages(queue) == 1
        assert [c.task_id for c in store.claim(run, 2, "next", lease_s=60)] == [5, 6]
        time.sleep(1.1)
        assert store.unclaimed_chunks(run, lease_s=1.0) == []  # claimed now: the lease rules
    finally:
        client.delete(queue)
        celery_app.get_app.cache_clear()


def test_a_task_whose_worker_keeps_dying_fails_after_max_claims(tmp_path):
    store, run = _planned(tmp_path, n=1, chunk_size=1)
    for attempt in range(MAX_CLAIMS):
        assert len(store.claim(run, 0, f"w{attempt}", lease_s=0.0)) == 1
        time.sleep(0.01)
    assert store.claim(run, 0, "last", lease_s=5) == []
    p = store.progress(run)
    assert p.failed == 1 and "never finished" in p.failures[0]["error"]
    assert store.finish_if_complete(run) and store.run(run).state == "done"


def test_cancel_stops_claims_and_a_new_run_takes_the_rest(tmp_path):
    store, run = _planned(tmp_path, n=4, chunk_size=2)
    assert [c.task_id for c in store.claim(run, 0, "a", lease_s=5)] == [1, 2]
    store.mark_written(run, "a", {1: 0.9, 2: 0.8})
    assert store.cancel(run).state == "cancelled"
    assert store.claim(run, 1, "a", lease_s=5) == []
    again = store.create_run("5", "v1", RunOptions(chunk_size=2))
    left = [{"id": 3, "data": {}}, {"id": 4, "data": {}}]  # what Label Studio still lacks
    assert store.add_tasks(again.run_id, left, skipped=2, chunk_size=2) == 1
    assert [c.task_id for c in store.claim(again.run_id, 0, "b", lease_s=5)] == [3, 4]
    assert store.progress(again.run_id).skipped == 2


def test_run_options_are_validated():
    with pytest.raises(ValueError, match="selection must be one of"):
        RunOptions(selection="annotated")
    with pytest.raises(ValueError, match="view must be a Data Manager view id"):
        RunOptions(view=0)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        RunOptions(prompt="  ")
    with pytest.raises(ValueError, match="unknown pre-labeling option"):
        RunOptions.from_dict({"size": 3})
