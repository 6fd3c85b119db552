"""The durable annotation store of the active-learning loop (SQLite under ``MODEL_DIR``).

Label Studio's webhooks say what changed; this store keeps the current state per project
and task: the latest corrected annotation of each task (``ANNOTATION_CREATED`` /
``ANNOTATION_UPDATED`` upsert it, keyed by annotation id so a repeated webhook never
duplicates a sample; ``ANNOTATIONS_DELETED`` removes it), the task JSON it belongs to,
and a per-project counter of changes since the last retraining. It also holds the retraining
jobs (at most one queued or running per project: later triggers coalesce into it).

SQLite in WAL mode with short transactions: several gunicorn workers and the Celery worker
share the file safely, and a write is durable once the webhook has answered.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_NAME = "annotations.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    project_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    annotation_id TEXT NOT NULL,
    task_json TEXT NOT NULL,
    annotation_json TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (project_id, annotation_id)
);
CREATE INDEX IF NOT EXISTS annotations_task ON annotations (project_id, task_id);
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    label_config TEXT,
    changes_since_training INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued | running | succeeded | failed
    reason TEXT NOT NULL,           -- START_TRAINING | threshold | manual
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    enqueued INTEGER NOT NULL DEFAULT 0,  -- handed to the broker
    celery_id TEXT,
    progress_json TEXT,
    result_json TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0   -- deliveries that started running it
);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs (project_id, state);
"""

ACTIVE_STATES = ("queued", "running")


@dataclass
class Job:
    job_id: str
    project_id: str
    state: str
    reason: str
    created_at: float
    updated_at: float
    enqueued: bool
    celery_id: str | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    attempts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def create_database(path: Path, schema: str) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``schema`` applied (``CREATE ... IF NOT EXISTS``
    statements); the caller closes the connection. Shared by the annotation store and the
    pre-labeling runs (training.prelabel_runs): several processes use each file."""
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)  # commits by itself
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One short write transaction on ``path`` (``BEGIN IMMEDIATE``, committed on exit,
    rolled back on any error; durable: ``synchronous=FULL``)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        db.close()


class AnnotationStore:
    """Annotations and retraining jobs of every project, in ``MODEL_DIR/annotations.sqlite``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.path = Path(model_dir) / STORE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = create_database(self.path, _SCHEMA)
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "attempts" not in columns:  # a store written before job attempts were counted
                db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
                db.commit()
        finally:
            db.close()

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    # ------------------------------------------------------------------ annotations
    def upsert_annotation(
        self,
        project_id: str,
        task: dict[str, Any],
        annotation: dict[str, Any],
        *,
        label_config: str | None = None,
    ) -> bool:
        """Insert or replace the annotation (by its id); returns True when it changed the
        stored state (a repeated identical webhook returns False and counts nothing)."""
        ann_id = str(annotation["id"])
        task_id = str(task.get("id", annotation.get("task")))
        ann_json = json.dumps(annotation, sort_keys=True)
        with self._connect() as db:
            row = db.execute(
                "SELECT annotation_json FROM annotations WHERE project_id=? AND annotation_id=?",
                (project_id, ann_id),
            ).fetchone()
            if row is not None and row[0] == ann_json:
                return False
            db.execute(
                "INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?)",
                (
                    project_id,
                    task_id,
                    ann_id,
                    json.dumps(task, sort_keys=True),
                    ann_json,
                    time.time(),
                ),
            )
            self._bump(db, project_id, label_config)
        return True

    def delete_annotations(self, project_id: str, annotation_ids: list[str]) -> int:
        """Remove annotations by id; returns how many were stored."""
        if not annotation_ids:
            return 0
        with self._connect() as db:
            marks = ",".join("?" * len(annotation_ids))
            n = db.execute(
                f"DELETE FROM annotations WHERE project_id=? AND annotation_id IN ({marks})",
                (project_id, *map(str, annotation_ids)),
            ).rowcount
            if n:
                self._bump(db, project_id, None, by=n)
        return n

    def _bump(
        self, db: sqlite3.Connection, project_id: str, label_config: str | None, by: int = 1
    ) -> None:
        db.execute("INSERT OR IGNORE INTO projects (project_id) VALUES (?)", (project_id,))
        db.execute(
            "UPDATE projects SET changes_since_training = changes_since_training + ? WHERE project_id=?",
            (by, project_id),
        )
        if label_config:
            db.execute(
                "UPDATE projects SET label_config=? WHERE project_id=?", (label_config, project_id)
            )

    def export_tasks(self, project_id: str) -> list[dict[str, Any]]:
        """The project's tasks in Label Studio's JSON export shape (``data`` +
        ``annotations``), one entry per task with its stored annotations, by task id."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT task_id, task_json, annotation_json FROM annotations WHERE project_id=? "
                "ORDER BY CAST(task_id AS INTEGER), task_id, annotation_id",
                (project_id,),
            ).fetchall()
        tasks: dict[str, dict[str, Any]] = {}
        for task_id, task_json, ann_json in rows:
            task = tasks.setdefault(task_id, {**json.loads(task_json), "annotations": []})
            task["annotations"].append(json.loads(ann_json))
        return list(tasks.values())

    def sync_project(self, project_id: str, tasks: list[dict[str, Any]]) -> dict[str, int]:
        """Make the project's stored annotations equal to a Label Studio JSON export
        (``tasks`` with ``annotations``): upsert each submitted one, drop cancelled ones
        and those Label Studio no longer has. Returns ``{"tasks", "annotations",
        "removed"}``. Does not count as changes toward ``RETRAIN_EVERY``."""
        keep: dict[str, tuple[str, str, str]] = {}
        n_tasks = 0
        for task in tasks:
            if not isinstance(task, dict) or "id" not in task:
                raise ValueError("a Label Studio export is a list of tasks with their 'id'")
            anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
            n_tasks += bool(anns)
            bare = {
                k: v for k, v in task.items() if k not in ("annotations", "predictions", "drafts")
            }
            for ann in anns:
                keep[str(ann["id"])] = (
                    str(task["id"]),
                    json.dumps(bare, sort_keys=True),
                    json.dumps(ann, sort_keys=True),
                )
        now = time.time()
        with self._connect() as db:
            stored = {
                r[0]
                for r in db.execute(
                    "SELECT annotation_id FROM annotations WHERE project_id=?", (project_id,)
                )
            }
            gone = sorted(stored - set(keep))
            for ann_id in gone:
                db.execute(
                    "DELETE FROM annotations WHERE project_id=? AND annotation_id=?",
                    (project_id, ann_id),
                )
            for ann_id, (task_id, task_json, ann_json) in keep.items():
                db.execute(
                    "INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?)",
                    (project_id, task_id, ann_id, task_json, ann_json, now),
                )
        return {"tasks": n_tasks, "annotations": len(keep), "removed": len(gone)}

    def changes_since_training(self, project_id: str) -> int:
        with self._connect() as db:
            row = db.execute(
                "SELECT changes_since_training FROM projects WHERE project_id=?", (project_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def label_config(self, project_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT label_config FROM projects WHERE project_id=?", (project_id,)
            ).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------------- jobs
    def request_job(self, project_id: str, reason: str) -> tuple[Job, bool]:
        """The project's active job, or a new queued one; ``(job, created)``. At most one
        job per project is queued or running: later triggers coalesce into it."""
        now = time.time()
        with self._connect() as db:
            row = db.execute(
                f"SELECT * FROM jobs WHERE project_id=? AND state IN {ACTIVE_STATES} ORDER BY created_at LIMIT 1",
                (project_id,),
            ).fetchone()
            if row is not None:
                return _job(row), False
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (job_id, project_id, state, reason, created_at, updated_at) "
                "VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, project_id, reason, now, now),
            )
            db.execute(
                "UPDATE projects SET changes_since_training = 0 WHERE project_id=?", (project_id,)
            )
            row = db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _job(row), True

    def start_attempt(self, job_id: str) -> int:
        """Mark the job running for one more delivery; returns how many have started."""
        with self._connect() as db:
            n = db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated_at=? WHERE job_id=?",
                (time.time(), job_id),
            ).rowcount
            if n == 0:
                raise ValueError(f"unknown retraining job {job_id!r}")
            return int(
                db.execute("SELECT attempts FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0]
            )

    def mark_enqueued(self, job_id: str, celery_id: str) -> None:
        self._update(job_id, enqueued=1, celery_id=celery_id)

    def unenqueued_jobs(self) -> list[Job]:
        """Queued jobs never handed to the broker (it was down): to enqueue again."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state='queued' AND enqueued=0 ORDER BY created_at"
            ).fetchall()
        return [_job(r) for r in rows]

    def set_state(
        self,
        job_id: str,
        state: str,
        *,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        changes: dict[str, Any] = {"state": state}
        if progress is not None:
            changes["progress_json"] = json.dumps(progress)
        if result is not None:
            changes["result_json"] = json.dumps(result, default=str)
        if error is not None:
            changes["error"] = error
        self._update(job_id, **changes)

    def _update(self, job_id: str, **changes: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in changes)
        with self._connect() as db:
            n = db.execute(
                f"UPDATE jobs SET {cols}, updated_at=? WHERE job_id=?",
                (*changes.values(), time.time(), job_id),
            ).rowcount
        if n == 0:
            raise ValueError(f"unknown retraining job {job_id!r}")

    def job(self, job_id: str) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise ValueError(f"unknown retraining job {job_id!r}")
        return _job(row)

    def jobs(self, project_id: str | None = None, limit: int = 50) -> list[Job]:
        with self._connect() as db:
            if project_id is None:
                rows = db.execute(
                    "SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE project_id=? ORDER BY created_at DESC LIMIT ?",
                    (project_id, limit),
                ).fetchall()
        return [_job(r) for r in rows]


def _job(row: tuple) -> Job:
    (
        job_id,
        project_id,
        state,
        reason,
        created,
        updated,
        enqueued,
        celery_id,
        progress,
        result,
        error,
        attempts,
    ) = row
    return Job(
        job_id,
        project_id,
        state,
        reason,
        created,
        updated,
        bool(enqueued),
        celery_id,
        json.loads(progress) if progress else None,
        json.loads(result) if result else None,
        error,
        int(attempts),
    )
