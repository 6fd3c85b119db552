"""The active-learning annotation store (real SQLite): idempotent upserts, deletions,
Label Studio export shape, one active retraining job per project."""

from __future__ import annotations

import threading

import pytest

from training.store import AnnotationStore


def ann(i: int, label: str = "Car") -> dict:
    return {
        "id": i,
        "result": [
            {
                "id": f"r{i}",
                "type": "rectanglelabels",
                "from_name": "label",
                "to_name": "image",
                "original_width": 100,
                "original_height": 80,
                "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": [label]},
            }
        ],
    }


def test_upserts_are_idempotent_and_deletions_apply(tmp_path):
    store = AnnotationStore(tmp_path)
    task = {"id": 7, "data": {"image": "http://x/a.png"}}
    assert store.upsert_annotation("1", task, ann(1)) is True
    assert store.upsert_annotation("1", task, ann(1)) is False  # the same webhook twice
    assert store.changes_since_training("1") == 1
    assert store.upsert_annotation("1", task, ann(1, "Truck")) is True  # ANNOTATION_UPDATED
    assert (
        store.upsert_annotation("1", {"id": 8, "data": {"image": "http://x/b.png"}}, ann(2)) is True
    )
    tasks = store.export_tasks("1")
    assert [t["id"] for t in tasks] == [7, 8]
    assert len(tasks[0]["annotations"]) == 1
    assert tasks[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"] == ["Truck"]
    assert store.delete_annotations("1", ["2", "99"]) == 1
    assert [t["id"] for t in store.export_tasks("1")] == [7]
    assert store.export_tasks("2") == []
    # durable: a new store object on the same directory sees the same state
    assert [t["id"] for t in AnnotationStore(tmp_path).export_tasks("1")] == [7]


def test_one_active_job_per_project_and_coalescing(tmp_path):
    store = AnnotationStore(tmp_path)
    store.upsert_annotation("1", {"id": 1, "data": {}}, ann(1))
    job, created = store.request_job("1", "START_TRAINING")
    assert created and job.state == "queued" and store.changes_since_training("1") == 0
    again, created2 = store.request_job("1", "threshold")
    assert not created2 and again.job_id == job.job_id
    other, created3 = store.request_job("2", "manual")
    assert created3 and other.job_id != job.job_id
    assert [j.job_id for j in store.unenqueued_jobs()] == [job.job_id, other.job_id]
    store.mark_enqueued(job.job_id, "celery-1")
    store.set_state(job.job_id, "running", progress={"step": 3})
    assert store.job(job.job_id).progress == {"step": 3}
    store.set_state(job.job_id, "succeeded", result={"promoted": True})
    newer, created4 = store.request_job("1", "threshold")
    assert created4 and newer.job_id != job.job_id


def test_concurrent_writers_do_not_lose_events(tmp_path):
    store = AnnotationStore(tmp_path)

    def write(base: int) -> None:
        s = AnnotationStore(tmp_path)
        for i in range(20):
            s.upsert_annotation("1", {"id": base + i, "data": {}}, ann(base + i))

    threads = [threading.Thread(target=write, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.export_tasks("1")) == 80
    assert store.changes_since_training("1") == 80


def test_sync_mirrors_a_label_studio_export(tmp_path):
    store = AnnotationStore(tmp_path)
    store.upsert_annotation("1", {"id": 7, "data": {"image": "a.png"}}, ann(1))
    store.upsert_annotation("1", {"id": 9, "data": {"image": "c.png"}}, ann(3))  # gone in LS
    store.upsert_annotation("2", {"id": 7, "data": {"image": "a.png"}}, ann(1))  # other project
    before = store.changes_since_training("1")
    export = [
        {"id": 7, "data": {"image": "a.png"}, "annotations": [ann(1, "Truck")], "predictions": []},
        {
            "id": 8,
            "data": {"image": "b.png"},
            "annotations": [ann(2), {**ann(4), "was_cancelled": True}],
        },
        {"id": 10, "data": {"image": "d.png"}, "annotations": []},
    ]
    assert store.sync_project("1", export) == {"tasks": 2, "annotations": 2, "removed": 1}
    tasks = store.export_tasks("1")
    assert [t["id"] for t in tasks] == [7, 8]
    assert tasks[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"] == ["Truck"]
    assert "predictions" not in tasks[0] and [a["id"] for a in tasks[1]["annotations"]] == [2]
    assert [t["id"] for t in store.export_tasks("2")] == [7]  # untouched
    assert store.changes_since_training("1") == before
    assert store.sync_project("1", export) == {"tasks": 2, "annotations": 2, "removed": 0}


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from nextchat_core.files import atomic_write, atomic_write_text

    path = tmp_path / "state.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_write(path, permissions=0o600) as f:
        f.write("new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600
