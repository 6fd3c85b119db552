"""Pre-labeling runs: the durable record of a batch pre-annotation of a Label Studio
project (SQLite ``MODEL_DIR/prelabel.sqlite``), shared by the backend, the CLI and the
workers. The work itself (listing tasks, inference, writing predictions) is
:mod:`backend.prelabel`; this module holds the state every process agrees on, and
:func:`start_run`, which the backend, the CLI and a promotion (``PRELABEL_ON_PROMOTE``)
call to begin one.

One row per (project, model version, task) is the idempotency key: a task is written at
most once per version, whichever run, chunk or worker gets to it. A worker *claims* the
pending tasks of its chunk with a lease (``PRELABEL_LEASE_S``) that its heartbeat renews;
a task whose lease ran out belongs to a dead worker and the next claimer takes it over.
A taken-over task may have been written just before its worker died, so it is marked
``verify``: the new owner looks for this version's prediction in Label Studio before
writing. Task states: ``pending`` -> ``claimed`` -> ``written`` | ``failed`` (with the
error; the next run retries it). Run states: ``planning`` -> ``running`` -> ``done``, or
``cancelled`` / ``failed`` (planning failed: the error says why).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .store import create_database, transaction

STORE_NAME = "prelabel.sqlite"
MAX_CLAIMS = 3  # a task claimed this often without finishing fails (its worker keeps dying)
SELECTIONS = ("all", "unannotated")  # which tasks of the project (a view narrows them)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    state TEXT NOT NULL,              -- planning | running | done | cancelled | failed
    options_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,                  -- planning finished, chunks enqueued
    finished_at REAL,
    planned INTEGER NOT NULL DEFAULT 0,   -- tasks this run has to pre-label
    skipped INTEGER NOT NULL DEFAULT 0,   -- selected tasks that had this version's prediction
    chunks INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_project ON runs (project_id, created_at);
CREATE TABLE IF NOT EXISTS tasks (
    project_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    task_json TEXT NOT NULL,
    state TEXT NOT NULL,              -- pending | claimed | written | failed
    owner TEXT,
    lease_until REAL,
    claims INTEGER NOT NULL DEFAULT 0,
    verify INTEGER NOT NULL DEFAULT 0,    -- look in Label Studio before writing
    error TEXT,
    score REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (project_id, model_version, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id, chunk, state);
CREATE TABLE IF NOT EXISTS chunks (
    run_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    enqueued_at REAL,                 -- NULL: recorded, not yet handed to the broker
    PRIMARY KEY (run_id, chunk)
);
"""


@dataclass(frozen=True)
class RunOptions:
    """What a run pre-labels and how. Validated when created (``ValueError``)."""

    selection: str = "all"  # all | unannotated (tasks without a submitted annotation)
    view: int | None = None  # a Data Manager view (tab) id: its filters narrow the tasks
    prompt: str | None = None  # one typed prompt for every task (None: as /predict resolves)
    batch_size: int | None = None  # images per model call (None: the backend's BATCH_SIZE)
    chunk_size: int = 32  # tasks per worker job
    started_by: str = "cli"  # cli | http | promotion

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if self.view is not None and (
            isinstance(self.view, bool) or not isinstance(self.view, int) or self.view < 1
        ):
            raise ValueError(
                f"view must be a Data Manager view id (an integer >= 1), got {self.view!r}"
            )
        if self.prompt is not None and (
            not isinstance(self.prompt, str) or not self.prompt.strip()
        ):
            raise ValueError(
                "prompt must be a non-empty string (or omitted to use per-task prompts)"
            )
        for name, value in (("batch_size", self.batch_size), ("chunk_size", self.chunk_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown pre-labeling option(s) {sorted(unknown)}; expected some of "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


@dataclass
class Run:
    run_id: str
    project_id: str
    model_version: str
    state: str
    options: RunOptions
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    planned: int
    skipped: int
    chunks: int
    error: str | None


@dataclass
class Progress:
    """A run as a person watches it: counts, rate, ETA, failures (``as_dict`` for JSON)."""

    run_id: str
    project_id: str
    model_version: str
    state: str
    total: int  # tasks to pre-label (selected minus those with this version's prediction)
    done: int  # written to Label Studio
    failed: int
    pending: int  # not started, or in flight
    skipped: int  # selected tasks that already had this version's prediction
    elapsed_s: float
    rate_per_s: float | None  # tasks written per second since the first chunk started
    eta_s: float | None
    error: str | None
    options: dict[str, Any]
    created_at: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClaimedTask:
    task_id: int
    task: dict[str, Any]  # {"id", "data"} as listed from Label Studio
    verify: bool  # taken over from a dead worker (or retried after a failed write)


class PrelabelStore:
    """Runs and per-task claims in ``MODEL_DIR/prelabel.sqlite`` (WAL, short transactions:
    the backend, the CLI and several workers share it)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.path = Path(model_dir) / STORE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_database(self.path, _SCHEMA).close()

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    # ------------------------------------------------------------------------- runs
    def create_run(self, project_id: str, model_version: str, options: RunOptions) -> Run:
        run_id = uuid.uuid4().hex[:16]
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (run_id, project_id, model_version, state, options_json, "
                "created_at, updated_at) VALUES (?, ?, ?, 'planning', ?, ?, ?)",
                (run_id, project_id, model_version, json.dumps(asdict(options)), now, now),
            )
        return self.run(run_id)

    def run(self, run_id: str) -> Run:
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id=?", (run_id,)
            ).fetchone()
        if row is None:
            raise ValueError(f"unknown pre-labeling run {run_id!r}: see `nextchat prelabel-status`")
        return _run(row)

    def runs(self, project_id: str | None = None, limit: int = 20) -> list[Run]:
        where, args = ("WHERE project_id=?", (project_id,)) if project_id else ("", ())
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs {where} ORDER BY created_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_run(r) for r in rows]

    def active_runs(self) -> list[Run]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE state='running' ORDER BY created_at"
            ).fetchall()
        return [_run(r) for r in rows]

    def fail_run(self, run_id: str, error: str) -> None:
        self._set_run(run_id, state="failed", error=error, finished_at=time.time())

    def cancel(self, run_id: str) -> Run:
        """Stop ``run_id``: no chunk claims more of its tasks; tasks in flight finish.
        Run the same selection again to continue where it stopped."""
        run = self.run(run_id)
        if run.state in ("planning", "running"):
            self._set_run(run_id, state="cancelled", finished_at=time.time())
        return self.run(run_id)

    def _set_run(self, run_id: str, **changes: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in changes)
        with self._connect() as db:
            n = db.execute(
                f"UPDATE runs SET {cols}, updated_at=? WHERE run_id=?",
                (*changes.values(), time.time(), run_id),
            ).rowcount
        if n == 0:
            raise ValueError(f"unknown pre-labeling run {run_id!r}")

    # ------------------------------------------------------------------- planning
    def add_tasks(
        self,
        run_id: str,
        tasks: Sequence[dict[str, Any]],
        *,
        skipped: int,
        chunk_size: int,
    ) -> int:
        """Put ``tasks`` (``{"id", "data"}``, none with this version's prediction in Label
        Studio) into ``run_id``'s chunks of ``chunk_size`` and mark the run running;
        returns the number of chunks. A task claimed by a live worker of another run
        stays with that run; a failed or earlier-written one (its prediction has since
        gone from Label Studio) is pre-labeled again."""
        run = self.run(run_id)
        now = time.time()
        chunk = n_rows = 0
        with self._connect() as db:
            if (
                db.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
                != "planning"
            ):
                return 0  # cancelled while listing
            for task in tasks:
                tid = int(task["id"])
                row = db.execute(
                    "SELECT state, lease_until, verify FROM tasks WHERE project_id=? AND model_version=? "
                    "AND task_id=?",
                    (run.project_id, run.model_version, tid),
                ).fetchone()
                if row is not None and row[0] == "claimed" and (row[1] or 0) > now:
                    continue  # a live worker of another run is on it
                # A write may have reached Label Studio after it listed the task: look first.
                verify = row is not None and (row[0] in ("claimed", "written") or bool(row[2]))
                db.execute(
                    "INSERT OR REPLACE INTO tasks (project_id, model_version, task_id, run_id, "
                    "chunk, task_json, state, claims, verify, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                    (
                        run.project_id,
                        run.model_version,
                        tid,
                        run_id,
                        n_rows // chunk_size,
                        json.dumps({"id": tid, "data": task.get("data")}),
                        int(verify),
                        now,
                    ),
                )
                n_rows += 1
            chunk = -(-n_rows // chunk_size)
            db.execute(
                "UPDATE runs SET state=?, planned=?, skipped=?, chunks=?, started_at=?, "
                "finished_at=?, updated_at=? WHERE run_id=?",
                (
                    "running" if n_rows else "done",
                    n_rows,
                    skipped,
                    chunk,
                    now,
                    None if n_rows else now,
                    now,
                    run_id,
                ),
            )
            for i in range(chunk):
                db.execute(
                    "INSERT OR REPLACE INTO chunks (run_id, chunk, enqueued_at) VALUES (?, ?, NULL)",
                    (run_id, i),
                )
        return chunk

    def mark_enqueued(self, run_id: str, chunk: int) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE chunks SET enqueued_at=? WHERE run_id=? AND chunk=?",
                (time.time(), run_id, chunk),
            )

    # ---------------------------------------------------------------- the workers
    def claim(self, run_id: str, chunk: int, owner: str, lease_s: float) -> list[ClaimedTask]:
        """Claim ``chunk``'s pending tasks (and those whose worker's lease ran out) for
        ``owner``; none when the run is no longer running. A task claimed
        :data:`MAX_CLAIMS` times without finishing fails instead."""
        now = time.time()
        with self._connect() as db:
            state = db.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if state is None or state[0] != "running":
                return []
            rows = db.execute(
                "SELECT project_id, model_version, task_id, task_json, state, claims, verify "
                "FROM tasks WHERE run_id=? AND chunk=? AND (state='pending' OR "
                "(state='claimed' AND lease_until<?)) ORDER BY task_id",
                (run_id, chunk, now),
            ).fetchall()
            out = []
            for project, version, tid, task_json, st, claims, verify in rows:
                key = (project, version, tid)
                if claims >= MAX_CLAIMS:
                    db.execute(
                        "UPDATE tasks SET state='failed', owner=NULL, error=?, updated_at=? "
                        "WHERE project_id=? AND model_version=? AND task_id=?",
                        (
                            f"claimed {claims} times and never finished: its worker died each "
                            "time (out of memory? PRELABEL_TIME_LIMIT too short?); see the "
                            "workers' logs",
                            now,
                            *key,
                        ),
                    )
                    continue
                taken_over = st == "claimed"
                db.execute(
                    "UPDATE tasks SET state='claimed', owner=?, lease_until=?, claims=claims+1, "
                    "verify=?, updated_at=? WHERE project_id=? AND model_version=? AND task_id=?",
                    (owner, now + lease_s, int(bool(verify) or taken_over), now, *key),
                )
                out.append(ClaimedTask(tid, json.loads(task_json), bool(verify) or taken_over))
        return out

    def renew(self, run_id: str, owner: str, task_ids: Sequence[int], lease_s: float) -> list[int]:
        """Extend ``owner``'s lease on ``task_ids``; returns the ids it still owns."""
        if not task_ids:
            return []
        now = time.time()
        marks = ",".join("?" * len(task_ids))
        with self._connect() as db:
            db.execute(
                f"UPDATE tasks SET lease_until=? WHERE run_id=? AND owner=? AND state='claimed' "
                f"AND task_id IN ({marks})",
                (now + lease_s, run_id, owner, *task_ids),
            )
            rows = db.execute(
                f"SELECT task_id FROM tasks WHERE run_id=? AND owner=? AND state='claimed' "
                f"AND task_id IN ({marks})",
                (run_id, owner, *task_ids),
            ).fetchall()
        return [r[0] for r in rows]

    def mark_written(self, run_id: str, owner: str, scores: dict[int, float | None]) -> None:
        now = time.time()
        with self._connect() as db:
            for tid, score in scores.items():
                db.execute(
                    "UPDATE tasks SET state='written', owner=NULL, lease_until=NULL, error=NULL, "
                    "verify=0, score=?, updated_at=? WHERE run_id=? AND owner=? AND task_id=?",
                    (score, now, run_id, owner, tid),
                )

    def mark_failed(
        self, run_id: str, owner: str, errors: dict[int, str], *, verify: bool = False
    ) -> None:
        """Record why each task failed (``verify``: a write may have reached Label Studio)."""
        now = time.time()
        with self._connect() as db:
            for tid, error in errors.items():
                db.execute(
                    "UPDATE tasks SET state='failed', owner=NULL, lease_until=NULL, error=?, "
                    "verify=?, updated_at=? WHERE run_id=? AND owner=? AND task_id=?",
                    (error, int(verify), now, run_id, owner, tid),
                )

    def release(self, run_id: str, owner: str, task_ids: Sequence[int]) -> None:
        """Hand claimed tasks back (cancelled mid-chunk): pending again."""
        with self._connect() as db:
            for tid in task_ids:
                db.execute(
                    "UPDATE tasks SET state='pending', owner=NULL, lease_until=NULL, "
                    "claims=MAX(claims-1, 0) WHERE run_id=? AND owner=? AND task_id=? "
                    "AND state='claimed'",
                    (run_id, owner, tid),
                )

    def finish_if_complete(self, run_id: str) -> bool:
        """Mark a running run done when none of its tasks is pending or claimed."""
        now = time.time()
        with self._connect() as db:
            left = db.execute(
                "SELECT COUNT(*) FROM tasks WHERE run_id=? AND state IN ('pending', 'claimed')",
                (run_id,),
            ).fetchone()[0]
            if left:
                return False
            db.execute(
                "UPDATE runs SET state='done', finished_at=?, updated_at=? "
                "WHERE run_id=? AND state='running'",
                (now, now, run_id),
            )
        return True

    def stale_chunks(self, run_id: str, lease_s: float) -> list[int]:
        """Chunks to hand to the broker again: those holding a task whose worker's lease
        ran out (not re-enqueued within a lease), and those a planner recorded but died
        before enqueuing (a lease after planning). Marked enqueued now."""
        now = time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT DISTINCT t.chunk FROM tasks t JOIN chunks c ON c.run_id=t.run_id AND "
                "c.chunk=t.chunk WHERE t.run_id=? AND t.state='claimed' AND t.lease_until<? "
                "AND c.enqueued_at<?",
                (run_id, now, now - lease_s),
            ).fetchall()
            rows += db.execute(
                "SELECT c.chunk FROM chunks c JOIN runs r ON r.run_id=c.run_id WHERE "
                "c.run_id=? AND c.enqueued_at IS NULL AND r.started_at<?",
                (run_id, now - lease_s),
            ).fetchall()
            chunks = sorted({r[0] for r in rows})
            for c in chunks:
                db.execute(
                    "UPDATE chunks SET enqueued_at=? WHERE run_id=? AND chunk=?", (now, run_id, c)
                )
        return chunks

    def unclaimed_chunks(self, run_id: str, lease_s: float) -> list[int]:
        """Chunks handed to the broker more than a lease ago of which no task was ever
        claimed: their message was taken by a worker that died before claiming (with a
        late acknowledgement the broker hands it out again only after its visibility
        timeout, an hour or more). Not marked: :meth:`mark_enqueued` once sent again.
        Only the caller knows whether such a chunk is merely waiting in the queue."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.chunk FROM chunks c JOIN tasks t ON t.run_id=c.run_id AND "
                "t.chunk=c.chunk WHERE c.run_id=? AND c.enqueued_at<? GROUP BY c.chunk "
                "HAVING MAX(t.claims)=0 ORDER BY c.chunk",  # never claimed: all still pending
                (run_id, time.time() - lease_s),
            ).fetchall()
        return [r[0] for r in rows]

    # -------------------------------------------------------------------- progress
    def progress(self, run_id: str, *, failures: int = 50) -> Progress:
        """Counts, rate (tasks written per second since planning finished), ETA and the
        first ``failures`` failed tasks with their errors."""
        run = self.run(run_id)
        with self._connect() as db:
            counts = dict(
                db.execute(
                    "SELECT state, COUNT(*) FROM tasks WHERE run_id=? GROUP BY state", (run_id,)
                ).fetchall()
            )
            failed_rows = db.execute(
                "SELECT task_id, error FROM tasks WHERE run_id=? AND state='failed' "
                "ORDER BY task_id LIMIT ?",
                (run_id, failures),
            ).fetchall()
        done, failed = counts.get("written", 0), counts.get("failed", 0)
        pending = counts.get("pending", 0) + counts.get("claimed", 0)
        total = done + failed + pending
        end = run.finished_at or time.time()
        elapsed = max(0.0, end - (run.started_at or run.created_at))
        rate = (done + failed) / elapsed if run.started_at and elapsed > 0 else None
        eta = pending / rate if rate and run.state == "running" else None
        return Progress(
            run_id=run.run_id,
            project_id=run.project_id,
            model_version=run.model_version,
            state=run.state,
            total=total,
            done=done,
            failed=failed,
            pending=pending,
            skipped=run.skipped,
            elapsed_s=round(elapsed, 2),
            rate_per_s=round(rate, 3) if rate is not None else None,
            eta_s=round(eta, 1) if eta is not None else None,
            error=run.error,
            options=asdict(run.options),
            created_at=run.created_at,
            failures=[{"task": tid, "error": err} for tid, err in failed_rows],
        )


_RUN_COLUMNS = (
    "run_id, project_id, model_version, state, options_json, created_at, updated_at, "
    "started_at, finished_at, planned, skipped, chunks, error"
)


def _run(row: tuple) -> Run:
    (
        rid,
        project,
        version,
        state,
        options,
        created,
        updated,
        started,
        finished,
        planned,
        skipped,
        chunks,
        error,
    ) = row
    return Run(
        rid,
        project,
        version,
        state,
        RunOptions(**json.loads(options)),
        created,
        updated,
        started,
        finished,
        planned,
        skipped,
        chunks,
        error,
    )


def start_run(model_dir: Path, project_id: str, model_version: str, options: RunOptions) -> Run:
    """Record a new run and hand its planning (list the tasks, enqueue the chunks) to a
    pre-labeling worker; returns the run (state ``planning``). The backend's
    ``POST /prelabel`` and a promotion with ``PRELABEL_ON_PROMOTE`` call this; the CLI
    plans in its own process instead (it shows listing errors at once)."""
    from .celery_app import PRELABEL_PLAN_TASK, get_app, prelabel_queue

    store = PrelabelStore(model_dir)
    run = store.create_run(project_id, model_version, options)
    try:
        get_app().send_task(
            PRELABEL_PLAN_TASK, args=(run.run_id, str(model_dir)), queue=prelabel_queue()
        )
    except Exception as exc:  # kombu, redis, sqlalchemy raise many kinds
        store.fail_run(run.run_id, f"the broker cannot be reached: {exc}; start the run again")
        raise RuntimeError(f"cannot hand the pre-labeling run to the broker: {exc}") from exc
    return run
