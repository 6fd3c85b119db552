"""The active-learning loop with real processes: the backend (gunicorn), Celery workers,
a REAL Redis (127.0.0.1:6379, started by .ci/run when none answers; the broker-down test
starts its own redis-server on a free port) and, once, the embedded SQLite broker. No
eager mode, nothing mocked: webhooks go over HTTP exactly as Label Studio sends them.

Models are tiny (built from the ``tiny`` preset) and retraining is a few steps, so the
tests check the loop's mechanics; the loop's effect on accuracy is measured by
``test_loop_improves_a_new_domain`` and bench/retrain.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import readme_block

from backend.app import create_app
from backend.model_cache import ModelCache
from backend.settings import Settings
from labelstudio.projects import ProjectState
from nextchat_cli.loop_demo import REDIS_URL, Loop, annotation_event, free_port, make_tasks
from nextchat_core.build import build_model, save_pretrained
from training import versions
from training.retrain import RetrainSettings, gate, split_tasks
from training.store import AnnotationStore

PROJECT = 7


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny-base"
    save_pretrained(build_model(tiny_config), path, tiny_tokenizer)
    return path


@pytest.fixture()
def loop_factory(tmp_path, base):
    loops: list[Loop] = []

    def make(broker: str | None = REDIS_URL, **env) -> Loop:
        small = {  # tiny jobs: the mechanics, not the accuracy, are under test here
            "TORCH_THREADS": "1",
            "JOB_HEARTBEAT_S": "1",
            "RETRAIN_STAGES": "2",
            "RETRAIN_MAX_STEPS": "6",
            "RETRAIN_BATCH_SIZE": "4",
            "PROMOTE_POLICY": "always",
        }
        loop = Loop(tmp_path, base, broker=broker, **{**small, **env})
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def _redis_answers(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:  # a clear failure, not a skip: CI must start Redis
        raise AssertionError(
            f"no Redis at {url}: start one with `redis-server` (.ci/run does)"
        ) from exc


def _feed(loop: Loop, tasks: list[dict]) -> None:
    for task in tasks:
        reply = loop.post(annotation_event(task, PROJECT))
        assert reply["changed"] == 1 and reply["job"] is None


def _cli(loop: Loop, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "nextchat_cli", *args, "--model-dir", str(loop.model_dir)],
        env=loop.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# ------------------------------------------------------------ the loop, Redis broker


def test_webhooks_retrain_promote_and_hot_swap_with_redis(loop_factory, tmp_path):
    _redis_answers(REDIS_URL)
    loop = loop_factory(RETRAIN_STAGES="2,3")
    loop.serve()
    base_version = loop.health()["model_version"]
    tasks = make_tasks(tmp_path / "images", 8, masks=True)
    _feed(loop, tasks)
    # The same submission again (Label Studio retries webhooks): no duplicate sample.
    again = loop.post(annotation_event(tasks[0], PROJECT, "ANNOTATION_UPDATED"))
    assert again["changed"] == 0
    loop.worker()
    t0 = time.perf_counter()
    reply = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert time.perf_counter() - t0 < 1.0  # Label Studio's webhook timeout
    assert reply["enqueued"] is True and reply["job"]
    # A second trigger while the job is active coalesces into it.
    assert (
        loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"] == reply["job"]
    )
    seen_steps = []

    def done(job: dict) -> bool:
        if (job.get("progress") or {}).get("step"):
            seen_steps.append(job["progress"]["step"])
        return job["state"] in ("succeeded", "failed")

    job = loop.wait_job(reply["job"], done)
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["promoted"] is True
    assert [s["stage"] for s in result["stages"]] == [2, 3]  # brush masks: stage 3 ran
    assert all(s["steps"] == 6 and s["samples_per_s"] > 0 for s in result["stages"])
    assert (
        set(result["eval_old"]) >= {"rec_acc", "mask_miou"} and result["eval_new"]["n_records"] >= 1
    )
    # Served from the next request on, without a restart.
    assert loop.health()["model_version"] == result["version"] != base_version
    meta = json.loads(
        (versions.version_dir(loop.model_dir, result["version"]) / "version.json").read_text()
    )
    assert meta["parent"] == base_version and meta["tasks"] == 8
    assert meta["train_samples"] + meta["held_out_samples"] == 8
    assert not any((loop.model_dir / "staging").iterdir())  # nothing half-written left
    # Rollback and promote with one command each; the backend follows.
    assert "*" in _cli(loop, "versions") and result["version"] in _cli(loop, "versions")
    assert job["job_id"][:12] in _cli(loop, "train-status")
    _cli(loop, "rollback")
    assert loop.health()["model_version"] == base_version
    _cli(loop, "promote", result["version"])
    assert loop.health()["model_version"] == result["version"]


def test_killed_worker_job_is_redelivered_and_completes(loop_factory, tmp_path):
    _redis_answers(REDIS_URL)
    loop = loop_factory(
        RETRAIN_MAX_STEPS="1500", RETRAIN_EPOCHS="1500", CELERY_VISIBILITY_TIMEOUT="3"
    )
    loop.serve()
    base_version = loop.health()["model_version"]
    _feed(loop, make_tasks(tmp_path / "images", 6))
    first = loop.worker("w1")
    job_id = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"]
    # Kill it (SIGKILL, main process and pool child) once it has written a resumable
    # checkpoint (saved atomically: a half-written one is a dot-named .partial folder).
    work = loop.model_dir / "jobs" / job_id
    loop.wait_job(job_id, lambda j: any(work.glob("stage*/checkpoints/step-*")), timeout=300)
    first.kill()
    state = {j["job_id"]: j for j in loop.training()["jobs"]}[job_id]["state"]
    assert state not in ("succeeded", "failed"), state  # the kill landed mid-training
    assert loop.health()["model_version"] == base_version
    assert versions.list_versions(loop.model_dir) == []  # no partial version visible
    second = loop.worker("w2")
    job = loop.wait_job(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=420)
    assert job["state"] == "succeeded", job
    assert "resumed from" in second.text()  # continued from the killed run's checkpoint
    assert loop.health()["model_version"] == job["result"]["version"]
    assert len(versions.list_versions(loop.model_dir)) == 1


def test_broker_down_webhooks_recorded_and_job_runs_when_it_returns(loop_factory, tmp_path):
    port = free_port()
    loop = loop_factory(broker=f"redis://127.0.0.1:{port}/0")
    loop.serve()
    _feed(loop, make_tasks(tmp_path / "images", 5))
    t0 = time.perf_counter()
    reply = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert time.perf_counter() - t0 < 1.0
    assert reply["enqueued"] is False and reply["job"]
    jobs = loop.training()["jobs"]
    assert [(j["state"], j["enqueued"]) for j in jobs] == [("queued", False)]
    assert "not yet handed to the broker" in _cli(loop, "train-status")
    redis_server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        loop.worker()
        job = loop.wait_job(reply["job"], lambda j: j["state"] in ("succeeded", "failed"))
        assert job["state"] == "succeeded" and job["enqueued"], job
        assert loop.health()["model_version"] == job["result"]["version"]
    finally:
        loop.close()
        redis_server.terminate()
        redis_server.wait(timeout=10)


def test_training_error_fails_the_job_clearly_and_serves_the_old_version(loop_factory, tmp_path):
    _redis_answers(REDIS_URL)
    loop = loop_factory()
    loop.serve()
    base_version = loop.health()["model_version"]
    tasks = make_tasks(tmp_path / "images", 5)
    _feed(loop, tasks)
    gone = Path(tasks[2]["data"]["image"])
    gone.unlink()  # the annotated image disappeared before training
    worker = loop.worker()
    job_id = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"]
    job = loop.wait_job(job_id, lambda j: j["state"] in ("succeeded", "failed"))
    assert job["state"] == "failed"
    assert "cannot fetch image" in job["error"] and gone.name in job["error"], job["error"]
    assert gone.name in worker.text()  # and in the worker's log
    assert loop.health()["model_version"] == base_version
    assert versions.list_versions(loop.model_dir) == []


# ------------------------------------------------------------ embedded SQLite broker


def test_embedded_sqlite_broker_without_redis(loop_factory, tmp_path):
    loop = loop_factory(broker=None)  # no CELERY_BROKER_URL: SQLite under MODEL_DIR
    loop.serve()
    _feed(loop, make_tasks(tmp_path / "images", 5))
    loop.worker()
    job_id = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"]
    job = loop.wait_job(job_id, lambda j: j["state"] in ("succeeded", "failed"))
    assert job["state"] == "succeeded", job
    assert (loop.model_dir / "celery-broker.sqlite").is_file()
    assert loop.health()["model_version"] == job["result"]["version"]


# ------------------------------------------------- webhook handling (in-process app)


@pytest.fixture()
def webhook_client(base, tmp_path):
    settings = Settings.from_env({}, checkpoint=str(base), model_dir=tmp_path / "md")
    retrain = RetrainSettings.from_env({}, model_dir=tmp_path / "md", retrain_every=3)
    app = create_app(settings, preload=False, retrain=retrain, enqueue_retry_s=None)
    return app.test_client(), AnnotationStore(tmp_path / "md")


def test_duplicate_updated_deleted_and_threshold_webhooks(webhook_client, tmp_path):
    client, store = webhook_client
    tasks = make_tasks(tmp_path / "images", 3)

    def post(body):
        reply = client.post("/webhook", json=body)
        assert reply.status_code == 201, reply.get_json()
        return reply.get_json()

    assert post(annotation_event(tasks[0], PROJECT))["changed"] == 1
    assert post(annotation_event(tasks[0], PROJECT))["changed"] == 0  # duplicate
    edited = json.loads(json.dumps(tasks[0]))
    edited["annotations"][0]["result"][-1]["value"]["text"] = ["the corrected prompt"]
    assert post(annotation_event(edited, PROJECT, "ANNOTATION_UPDATED"))["changed"] == 1
    exported = store.export_tasks(str(PROJECT))
    assert len(exported) == 1 and len(exported[0]["annotations"]) == 1
    assert exported[0]["annotations"][0]["result"][-1]["value"]["text"] == ["the corrected prompt"]
    # The third change reaches RETRAIN_EVERY=3: a job, which waits for the (absent) broker.
    third = post(annotation_event(tasks[1], PROJECT))
    assert third["job"] and third["enqueued"] is False
    assert [j.state for j in store.jobs(str(PROJECT))] == ["queued"]
    deleted = post(
        {
            "action": "ANNOTATIONS_DELETED",
            "project": {"id": PROJECT},
            "annotations": [{"id": tasks[1]["annotations"][0]["id"]}],
        }
    )
    assert deleted["changed"] == 1 and len(store.export_tasks(str(PROJECT))) == 1
    skipped = annotation_event(tasks[2], PROJECT)
    skipped["annotation"] = {**skipped["annotation"], "was_cancelled": True}
    assert post(skipped)["changed"] == 0 and len(store.export_tasks(str(PROJECT))) == 1
    body = client.get("/training").get_json()
    assert body["jobs"][0]["job_id"] == third["job"] and body["retrain_every"] == 3


@pytest.mark.parametrize(
    "body, message",
    [
        ({"project": {"id": 3}}, "'action'"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 3}}, "'annotation'"),
        (
            {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 3},
                "annotation": {"id": 1, "result": []},
            },
            "'task'",
        ),
        (
            {
                "action": "ANNOTATION_UPDATED",
                "project": {"id": 3},
                "annotation": {"id": 1, "result": {}},
                "task": {"id": 1, "data": {}},
            },
            "'annotation.result' must be a list",
        ),
        (
            {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [1]},
            "'annotations'",
        ),
        ({"action": "START_TRAINING"}, "'project'"),
        ({"action": "START_TRAINING", "project": 3}, "'project'"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_webhooks_get_4xx_and_change_nothing(webhook_client, body, message):
    client, store = webhook_client
    reply = client.post("/webhook", json=body)
    assert reply.status_code == 400 and message in reply.get_json()["detail"], reply.get_json()
    assert store.export_tasks("3") == [] and store.jobs() == []


# ------------------------------------------------------- versions, gate, split (unit)


def _fake_version(model_dir: Path, name: str) -> None:
    staged = versions.staging_dir(model_dir, name)
    (staged / "config.json").write_text("{}")
    versions.publish_version(model_dir, staged, name, {"note": name})
    time.sleep(0.01)  # distinct creation times order the versions


def test_versions_publish_promote_rollback_prune(tmp_path):
    md = tmp_path / "md"
    for name in ("v1", "v2", "v3"):
        _fake_version(md, name)
    assert [v["name"] for v in versions.list_versions(md)] == ["v1", "v2", "v3"]
    with pytest.raises(FileExistsError):
        _fake_version(md, "v2")
    versions.promote(md, "v1")
    versions.promote(md, "v3")
    assert versions.read_current_version(md) == "v3"
    assert versions.rollback(md) == "v1"
    assert versions.read_current_version(md) == "v1"
    assert versions.rollback(md) is None and versions.read_current_version(md) is None
    with pytest.raises(ValueError, match="base checkpoint"):
        versions.rollback(md)
    versions.promote(md, "v2")
    versions.promote(md, "v3")
    assert versions.prune_versions(md, keep=1) == ["v1"]  # v2: the rollback target, kept
    assert {v["name"] for v in versions.list_versions(md)} == {"v2", "v3"}
    shutil.rmtree(versions.version_dir(md, "v2"))
    assert versions.rollback(md) is None  # a pruned target is skipped: back to the base
    with pytest.raises(ValueError, match="version name"):
        versions.version_dir(md, "../escape")


def test_gate_policies_and_stable_holdout():
    old, better, worse = (
        {"rec_acc": 0.5, "mask_miou": 0.4},
        {"rec_acc": 0.6, "mask_miou": 0.4},
        {"rec_acc": 0.45, "mask_miou": 0.5},
    )
    assert gate(old, better, "not_worse", 0.0)[0] is True
    ok, why = gate(old, worse, "not_worse", 0.0)
    assert ok is False and "rec_acc 0.500 -> 0.450" in why
    assert gate(old, worse, "not_worse", 0.1)[0] is True
    assert gate(old, worse, "always", 0.0)[0] is True
    assert gate(old, better, "manual", 0.0)[0] is False
    tasks = [{"id": i} for i in range(50)]
    train, held = split_tasks(tasks, 0.2)
    assert len(held) == 10 and len(train) == 40
    # Adding tasks never moves an earlier task to the other side.
    train2, held2 = split_tasks(tasks + [{"id": i} for i in range(50, 100)], 0.2)
    assert {t["id"] for t in held} <= {t["id"] for t in held2} | {t["id"] for t in train2}
    assert split_tasks(tasks, 0.2) == (train, held)


def test_retrain_settings_reject_bad_values():
    assert RetrainSettings.from_env({"RETRAIN_STAGE_EPOCHS": "2=6, 3=1"}).stage_epochs == {
        2: 6.0,
        3: 1.0,
    }
    for bad in ("5=1", "3=0"):
        with pytest.raises(ValueError, match="RETRAIN_STAGE_EPOCHS must give stages"):
            RetrainSettings.from_env({"RETRAIN_STAGE_EPOCHS": bad})
    with pytest.raises(ValueError, match=r"RETRAIN_STAGE_EPOCHS='3' is not valid.*'2=6,3=1'"):
        RetrainSettings.from_env({"RETRAIN_STAGE_EPOCHS": "3"})
    auto = RetrainSettings.from_env({})
    assert (auto.precision_on("cpu"), auto.precision_on("cuda")) == ("fp32", "bf16")
    bf16 = RetrainSettings.from_env({"RETRAIN_PRECISION": "bf16"})
    assert (bf16.precision_on("cpu"), bf16.precision_on("cuda")) == ("bf16", "bf16")
    with pytest.raises(ValueError, match="RETRAIN_PRECISION must be auto, fp32 or bf16"):
        RetrainSettings.from_env({"RETRAIN_PRECISION": "fp16"})
    with pytest.raises(ValueError, match="PROMOTE_POLICY"):
        RetrainSettings.from_env({"PROMOTE_POLICY": "sometimes"})
    with pytest.raises(ValueError, match="RETRAIN_STAGES"):
        RetrainSettings.from_env({"RETRAIN_STAGES": "2,5"})
    with pytest.raises(ValueError, match="RETRAIN_EVERY='many'"):
        RetrainSettings.from_env({"RETRAIN_EVERY": "many"})


def test_workers_fetch_images_with_the_backends_rules(tmp_path):
    # One parse of the shared variables and one fetch_options: a retraining job downloads
    # with the same timeout, size limit and Label Studio address as /predict.
    env = {
        "MODEL_DIR": str(tmp_path),
        "FETCH_TIMEOUT": "3",
        "MAX_DOWNLOAD_MB": "1.5",
        "LABEL_STUDIO_URL": "http://ls:8080/",
        "LABEL_STUDIO_API_KEY": "token",
        "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
    }
    worker = RetrainSettings.from_env(env).fetch_options(None)
    assert worker == Settings.from_env(env).fetch_options(None)
    assert (worker.timeout, worker.max_bytes) == (3.0, int(1.5 * 2**20))
    assert (worker.hostname, worker.access_token) == ("http://ls:8080", "token")
    assert worker.local_files_root == tmp_path
    state = ProjectState(project="7", hostname="http://other:8080", access_token="t7")
    assert RetrainSettings.from_env(env).fetch_options(state).hostname == "http://other:8080"
    with pytest.raises(ValueError, match="FETCH_TIMEOUT"):
        RetrainSettings.from_env({"FETCH_TIMEOUT": "soon"})


def test_backend_and_workers_agree_on_the_served_version(tmp_path, base):
    model_dir = tmp_path / "md"
    served = ModelCache(Settings.from_env({}, checkpoint=str(base), model_dir=model_dir))
    assert served.current_version() == versions.served_version(model_dir, str(base))
    assert served.current_version().source == "base"
    assert served.current_version().name.startswith("tiny-base-")
    shutil.copytree(base, versions.version_dir(model_dir, "p1-v1"))
    versions.set_current_version(model_dir, "p1-v1")
    assert served.current_version() == versions.served_version(model_dir, str(base))
    assert served.current_version().source == "model_dir"


def test_training_route_on_a_fresh_model_dir(webhook_client):
    client, _ = webhook_client
    body = client.get("/training").get_json()
    assert body["jobs"] == [] and body["model_version"].startswith("tiny-base-")
    assert body["policy"] == "not_worse"


def test_a_job_whose_worker_keeps_dying_fails_after_three_attempts(tmp_path, base):
    from training.retrain import JobBusy, run_job

    settings = RetrainSettings.from_env(
        {}, model_dir=tmp_path / "md", checkpoint=str(base), heartbeat_s=0.05
    )
    store = settings.store
    job, _ = store.request_job("9", "START_TRAINING")
    for _ in range(3):  # three deliveries whose worker died mid-job
        store.start_attempt(job.job_id)
    with pytest.raises(JobBusy):  # a fresh heartbeat: a live worker has it
        run_job(job.job_id, settings)
    time.sleep(0.2)  # the heartbeat goes stale: the worker is dead
    result = run_job(job.job_id, settings)
    stored = store.job(job.job_id)
    assert result["state"] == "failed" and stored.state == "failed" and stored.attempts == 4
    assert "started 3 times" in stored.error and "RETRAIN_TIME_LIMIT" in stored.error
    assert versions.read_current_version(settings.model_dir) is None


# ------------------------------------------------- the loop changes what is served


def test_loop_improves_held_out_prelabels_on_a_new_domain(loop_factory, tmp_path):
    from nextchat_cli.loop_demo import prelabel_accuracy, team_tasks

    loop = loop_factory(
        broker=None,  # the README's no-Redis setup
        RETRAIN_MAX_STEPS="400",
        RETRAIN_EPOCHS="25",
        RETRAIN_BATCH_SIZE="8",
        RETRAIN_LR="1e-3",
        PROMOTE_POLICY="not_worse",
    )
    loop.serve()
    # The tiny model was never trained: what it must learn here from the corrections is the
    # team's framing (nextchat_cli/loop_demo.py), measured on held-out images.
    train_tasks = team_tasks(tmp_path / "images", 150, first_id=1, seed=1)
    held_out = team_tasks(tmp_path / "images", 40, first_id=10_000, seed=2)
    before = prelabel_accuracy(held_out, loop.predict(held_out))
    _feed(loop, train_tasks)
    loop.worker()
    job_id = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"]
    job = loop.wait_job(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=600)
    assert job["state"] == "succeeded" and job["result"]["promoted"], job
    after = prelabel_accuracy(held_out, loop.predict(held_out))
    print(
        f"held-out Acc@0.5 {before['acc50']:.3f} -> {after['acc50']:.3f}", job["result"]["stages"]
    )
    assert after["acc50"] >= before["acc50"] + 0.30, (before, after)
    assert after["mean_iou"] > before["mean_iou"]


def test_the_readme_loop_demo_table_is_generated_from_its_report():
    # The README's loop-demo numbers and version names come from docs/loop-demo.json (a
    # `nextchat loop-demo` report), never typed by hand.
    from nextchat_cli.loop_demo import readme_table

    repo = Path(__file__).resolve().parents[1]
    report = json.loads((repo / "docs" / "loop-demo.json").read_text())
    block = readme_block("loop-demo")
    assert block == readme_table(report)
    assert report["before"]["version"] in block and report["after"]["version"] in block
