"""Pre-labeling a whole Label Studio project on workers (``nextchat prelabel``,
``POST /prelabel``): distributed, resumable, written straight into Label Studio.

Label Studio's own "Retrieve predictions" sends every selected task to ``/predict`` in ONE
request and gives up after 100 s (``ML_TIMEOUT_PREDICT``), losing the work. Here:

1. **Plan** (:func:`plan`; the CLI runs it itself, ``POST /prelabel`` hands it to a
   worker): list the project's tasks with label-studio-sdk (a Data Manager view narrows
   them; ``unannotated`` keeps tasks without a submitted annotation), leave out those that
   already have a prediction of the run's ``model_version``, and split the rest into
   chunks (``PRELABEL_CHUNK_SIZE``) recorded in :class:`training.prelabel_runs.PrelabelStore`.
2. **Chunks** (:func:`run_chunk`) run on Celery workers of the pre-labeling queue
   (``PRELABEL_QUEUE``, the retraining broker): claim the chunk's tasks (a lease, renewed
   by a heartbeat), predict them exactly as ``/predict`` does (:class:`NextChatBackend`:
   the same prompt resolution, image fetch rules and batched ``predict_batch``), and
   write the predictions with one bulk ``import_predictions`` per model batch, with
   ``model_version`` and scores.
3. **Dead workers**: Celery acknowledges late and requeues a chunk whose pool process is
   lost; when a whole worker dies its chunk is found by :func:`sweep` (the backend runs it
   every few seconds, so does a watching CLI) once the lease has run out, and enqueued
   again; so is a chunk whose worker died after taking its message but before claiming
   (none of its tasks claimed a lease after it was sent, and the queue is empty). The new
   owner looks in Label Studio for this version's prediction of every task it took over
   before writing, so nothing is written twice.
4. A task whose image cannot be fetched (or whose prompt is unusable) fails alone, with
   its reason; the chunk goes on. The next run of the same selection retries it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labelstudio.projects import ProjectStore
from training.celery_app import (
    PRELABEL_CHUNK_TASK,
    PRELABEL_PLAN_TASK,
    get_app,
    prelabel_queue,
    waiting_messages,
)
from training.prelabel_runs import ClaimedTask, PrelabelStore, Run, RunOptions
from training.versions import ModelVersion, stored_version

from .model import BackendError, NextChatBackend
from .model_cache import ModelCache
from .settings import Settings

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

log = logging.getLogger(__name__)


# ----------------------------------------------------------------- Label Studio access


def connection(settings: Settings, project_id: str) -> tuple[str, str]:
    """The Label Studio address and token to use for ``project_id``: the pair ``/setup``
    stored for it, else ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (the rule image
    fetching follows). ``ValueError`` saying what to set when there is none."""
    options = settings.fetch_options(ProjectStore(settings.model_dir).get(project_id))
    if not options.hostname or not options.access_token:
        raise ValueError(
            f"pre-labeling project {project_id} needs Label Studio's address and an access "
            "token: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or connect the backend to "
            "the project in Label Studio, whose /setup sends both)"
        )
    return options.hostname, options.access_token


def client_for(url: str, api_key: str) -> LabelStudio:
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=api_key, timeout=120)


def _ls_error(exc: Exception, url: str, what: str) -> RuntimeError:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, ApiError):
        return RuntimeError(
            f"Label Studio at {url} answered {exc.status_code} to {what}: {str(exc.body)[:300]} "
            "(check the project id, the view id and the API key)"
        )
    return RuntimeError(f"cannot reach Label Studio at {url} ({what}): {exc}")


def resolve_version(cache: ModelCache, name: str | None) -> ModelVersion:
    """The model version a run predicts with: ``name`` (the base checkpoint's name or a
    version under ``MODEL_DIR/versions``), default the one served now."""
    if name is None:
        return cache.current_version()
    base = cache.base_version()
    if name == base.name:
        return base
    try:
        return stored_version(cache.settings.model_dir, name)
    except (FileNotFoundError, ValueError):
        known = cache.versions()["versions"]
        raise ValueError(
            f"no model version {name!r}: expected one of {', '.join(known)} (`nextchat versions`)"
        ) from None


# ---------------------------------------------------------------------------- planning


def begin(
    settings: Settings,
    project_id: str,
    options: RunOptions,
    *,
    version: str | None = None,
    plan_here: bool,
    cache: ModelCache | None = None,
) -> Run:
    """Start a run of ``project_id``: plan it in this process (``plan_here``, the CLI:
    listing errors show at once) or on a pre-labeling worker (``POST /prelabel``)."""
    from training.prelabel_runs import start_run

    connection(settings, project_id)  # fail now, not on a worker, when Label Studio is unknown
    resolved = resolve_version(cache or _cache(settings), version)
    if not plan_here:
        return start_run(settings.model_dir, project_id, resolved.name, options)
    store = PrelabelStore(settings.model_dir)
    run = store.create_run(project_id, resolved.name, options)
    return plan(run.run_id, settings)


def plan(run_id: str, settings: Settings) -> Run:
    """List the run's tasks in Label Studio, record its chunks and enqueue them. A
    failure marks the run failed with the reason, and is raised."""
    store = PrelabelStore(settings.model_dir)
    run = store.run(run_id)
    if run.state != "planning":
        log.info("run %s is %s: nothing to plan", run_id, run.state)
        return run
    try:
        url, key = connection(settings, run.project_id)
        client = client_for(url, key)
        todo, skipped = _select(client, url, run)
        chunk_size = run.options.chunk_size
        n_chunks = store.add_tasks(run_id, todo, skipped=skipped, chunk_size=chunk_size)
    except Exception as exc:
        store.fail_run(run_id, f"planning failed: {exc}")
        raise
    log.info(
        "run %s: project %s, %d task(s) to pre-label with %s in %d chunk(s), %d skipped "
        "(already predicted by this version)",
        run_id,
        run.project_id,
        len(todo),
        run.model_version,
        n_chunks,
        skipped,
    )
    for chunk in range(n_chunks):
        enqueue_chunk(run_id, chunk, settings)
    return store.run(run_id)


def _select(client: LabelStudio, url: str, run: Run) -> tuple[list[dict[str, Any]], int]:
    """The tasks of ``run``'s selection without a prediction of its version, and how many
    were left out for having one."""
    todo: list[dict[str, Any]] = []
    skipped = 0
    try:
        pager: Any = client.tasks.list(
            project=int(run.project_id), view=run.options.view, fields="all", page_size=100
        )
        for task in pager:
            if task.id is None:
                continue
            if run.options.selection == "unannotated" and any(
                not a.get("was_cancelled") for a in task.annotations or []
            ):
                continue
            if any(p.model_version == run.model_version for p in task.predictions or []):
                skipped += 1
                continue
            todo.append({"id": task.id, "data": task.data})
    except Exception as exc:
        raise _ls_error(exc, url, f"listing the tasks of project {run.project_id}") from exc
    return todo, skipped


def enqueue_chunk(run_id: str, chunk: int, settings: Settings) -> None:
    get_app().send_task(
        PRELABEL_CHUNK_TASK,
        args=(run_id, chunk, str(settings.model_dir)),
        queue=prelabel_queue(),
        time_limit=settings.prelabel_time_limit,
        soft_time_limit=max(1, settings.prelabel_time_limit - 30),
    )
    # A planner that dies before this leaves the chunk for sweep() to enqueue.
    PrelabelStore(settings.model_dir).mark_enqueued(run_id, chunk)


def sweep(settings: Settings) -> int:
    """Enqueue again every chunk of a running run whose worker's lease ran out (the worker
    died); returns how many. Duplicates are harmless: a chunk claims only tasks nobody
    live holds."""
    store = PrelabelStore(settings.model_dir)
    sent = 0
    queue_empty: bool | None = None  # asked of the broker once, and only when it matters
    for run in store.active_runs():
        for chunk in store.stale_chunks(run.run_id, settings.prelabel_lease_s):
            log.warning(
                "run %s: chunk %d's worker stopped renewing its lease (or its planner died "
                "before enqueuing it): enqueued again",
                run.run_id,
                chunk,
            )
            enqueue_chunk(run.run_id, chunk, settings)
            sent += 1
        # A chunk nobody ever claimed, sent more than a lease ago, while no message waits
        # in the queue: the worker that took its message died before claiming, and the
        # broker would hand that message out again only after its visibility timeout.
        unclaimed = store.unclaimed_chunks(run.run_id, settings.prelabel_lease_s)
        if unclaimed and queue_empty is None:
            queue_empty = waiting_messages(prelabel_queue()) == 0
        for chunk in unclaimed if queue_empty else []:
            log.warning(
                "run %s: chunk %d was taken from the queue but never started (its worker "
                "died first): enqueued again",
                run.run_id,
                chunk,
            )
            enqueue_chunk(run.run_id, chunk, settings)
            sent += 1
        store.finish_if_complete(run.run_id)
    return sent


# ------------------------------------------------------------------------------ chunks


@functools.cache
def _cache(settings: Settings) -> ModelCache:
    """The process's weights cache (loaded once per worker process, like the backend's)."""
    return ModelCache(settings)


def run_chunk(run_id: str, chunk: int, settings: Settings) -> dict[str, Any]:
    """Pre-label chunk ``chunk`` of ``run_id``: claim, predict, write. Returns counts
    (``written``, ``failed``, ``already`` = found in Label Studio on a take-over)."""
    store = PrelabelStore(settings.model_dir)
    run = store.run(run_id)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    lease = settings.prelabel_lease_s
    claimed = store.claim(run_id, chunk, owner, lease)
    summary: dict[str, Any] = {"run": run_id, "chunk": chunk, "claimed": len(claimed)}
    summary.update(written=0, failed=0, already=0)
    if not claimed:
        store.finish_if_complete(run_id)
        return summary
    inflight = {c.task_id for c in claimed}
    with _LeaseKeeper(store, run_id, owner, inflight, lease):
        try:
            url, key = connection(settings, run.project_id)
            client = client_for(url, key)
            cache = _cache(settings)
            version = resolve_version(cache, run.model_version)
            backend_settings = settings
            if run.options.batch_size:
                backend_settings = replace(settings, batch_size=run.options.batch_size)
            backend = NextChatBackend(backend_settings, cache, ProjectStore(settings.model_dir))
            label_config = _label_config(client, url, run.project_id)
            verify = [c for c in claimed if c.verify]
            if verify:
                found = _already_written(client, url, [c.task_id for c in verify], version.name)
                if found:
                    store.mark_written(run_id, owner, found)
                    inflight.difference_update(found)
                    summary["already"] = len(found)
                    log.info(
                        "run %s chunk %d: %d task(s) a dead worker had already written",
                        run_id,
                        chunk,
                        len(found),
                    )
            todo = [c for c in claimed if c.task_id in inflight]
            size = backend_settings.batch_size
            for start in range(0, len(todo), size):
                if store.run(run_id).state != "running":  # cancelled
                    store.release(run_id, owner, sorted(inflight))
                    inflight.clear()
                    break
                batch = todo[start : start + size]
                written, failed = _predict_and_write(
                    backend, client, url, run, version, label_config, batch, store, owner, lease
                )
                inflight.difference_update(c.task_id for c in batch)
                summary["written"] += written
                summary["failed"] += failed
        except BaseException as exc:
            # Record why on every task still in flight, then re-raise (the worker logs it).
            if inflight:
                store.mark_failed(
                    run_id,
                    owner,
                    {tid: f"the chunk failed: {type(exc).__name__}: {exc}" for tid in inflight},
                    verify=True,
                )
            raise
    store.finish_if_complete(run_id)
    log.info("run %s chunk %d: %s", run_id, chunk, summary)
    return summary


def _predict_and_write(
    backend: NextChatBackend,
    client: LabelStudio,
    url: str,
    run: Run,
    version: ModelVersion,
    label_config: str,
    batch: Sequence[ClaimedTask],
    store: PrelabelStore,
    owner: str,
    lease: float,
) -> tuple[int, int]:
    """Predict ``batch`` as ``/predict`` would and bulk-write the predictions; returns
    (written, failed)."""
    from label_studio_sdk import PredictionRequest

    payload = {
        "tasks": [c.task for c in batch],
        "project": run.project_id,
        "label_config": label_config,
    }
    errors: dict[int, str] = {}
    try:
        reply = backend.predict(payload, version=version, prompt=run.options.prompt)
        results = reply["results"]
        for e in reply.get("errors", []):
            errors[int(e["task"])] = f"{e['kind']}: {e['detail']}"
    except BackendError as exc:  # every task of the batch failed: the same per-task reasons
        per_task = {
            int(e["task"]): f"{e['kind']}: {e['detail']}" for e in exc.extra.get("errors", [])
        }
        errors = {c.task_id: per_task.get(c.task_id, exc.detail) for c in batch}
        results = [[] for _ in batch]
    requests = []
    scores: dict[int, float | None] = {}
    for claimed, result in zip(batch, results, strict=True):
        if claimed.task_id in errors or not isinstance(result, dict):
            errors.setdefault(claimed.task_id, "no prediction for this task")
            continue
        requests.append(
            PredictionRequest(
                task=claimed.task_id,
                result=result["result"],
                score=result["score"],
                model_version=result["model_version"],
            )
        )
        scores[claimed.task_id] = result["score"]
    if errors:
        store.mark_failed(run.run_id, owner, errors)
        for tid, why in errors.items():
            log.warning("run %s: task %s failed: %s", run.run_id, tid, why)
    if requests:
        # Still ours? A worker slower than its lease may have lost tasks to another.
        mine = set(store.renew(run.run_id, owner, list(scores), lease))
        requests = [r for r in requests if r.task in mine]
        scores = {t: s for t, s in scores.items() if t in mine}
        try:
            client.projects.import_predictions(id=int(run.project_id), request=requests)
        except Exception as exc:
            error = _ls_error(exc, url, f"writing {len(requests)} prediction(s)")
            store.mark_failed(run.run_id, owner, dict.fromkeys(scores, str(error)), verify=True)
            log.error("run %s: %s", run.run_id, error)
            return 0, len(batch)
        store.mark_written(run.run_id, owner, scores)
    return len(scores), len(errors)


def _label_config(client: LabelStudio, url: str, project_id: str) -> str:
    try:
        project = client.projects.get(id=int(project_id))
    except Exception as exc:
        raise _ls_error(exc, url, f"reading project {project_id}") from exc
    if not project.label_config:
        raise ValueError(f"Label Studio project {project_id} has no label config: set one first")
    return project.label_config


def _already_written(
    client: LabelStudio, url: str, task_ids: Sequence[int], model_version: str
) -> dict[int, float | None]:
    """Of ``task_ids``, those that have a prediction of ``model_version`` in Label Studio
    (with its score)."""
    found: dict[int, float | None] = {}
    for tid in task_ids:
        try:
            predictions = client.predictions.list(task=tid)
        except Exception as exc:
            raise _ls_error(exc, url, f"listing the predictions of task {tid}") from exc
        for p in predictions:
            if p.model_version == model_version:
                found[tid] = p.score
                break
    return found


class _LeaseKeeper:
    """Renews ``owner``'s lease on the tasks still in flight every third of a lease, so a
    live worker keeps its tasks however long a batch takes."""

    def __init__(
        self, store: PrelabelStore, run_id: str, owner: str, inflight: set[int], lease: float
    ) -> None:
        self.store, self.run_id, self.owner = store, run_id, owner
        self.inflight, self.lease = inflight, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prelabel-lease", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.store.renew(self.run_id, self.owner, sorted(self.inflight), self.lease)
            except Exception as exc:  # a missed renewal is retried at the next beat
                log.warning("run %s: lease not renewed: %s", self.run_id, exc)


# ------------------------------------------------------------------------ Celery tasks


def _settings(model_dir: str) -> Settings:
    """A worker's settings: the backend's, on CUDA when present unless NEXTCHAT_DEVICE says
    otherwise (one worker per GPU: NEXTCHAT_DEVICE=cuda:N or CUDA_VISIBLE_DEVICES)."""
    settings = Settings.from_env(model_dir=Path(model_dir))
    return settings if settings.device else settings.with_overrides(device="auto")


@shared_task(name=PRELABEL_PLAN_TASK, acks_late=True, reject_on_worker_lost=True)
def plan_task(run_id: str, model_dir: str) -> dict[str, Any]:
    """List a run's tasks and enqueue its chunks (``POST /prelabel``, promotions)."""
    run = plan(run_id, _settings(model_dir))
    return {"run": run.run_id, "state": run.state, "planned": run.planned, "chunks": run.chunks}


@shared_task(name=PRELABEL_CHUNK_TASK, acks_late=True, reject_on_worker_lost=True)
def chunk_task(run_id: str, chunk: int, model_dir: str) -> dict[str, Any]:
    """Pre-label one chunk of a run (:func:`run_chunk`)."""
    return run_chunk(run_id, chunk, _settings(model_dir))


def follow(settings: Settings, run_id: str, *, every: float = 1.0) -> Iterator[dict[str, Any]]:
    """Yield the run's progress every ``every`` seconds until it ends, sweeping dead
    workers' chunks meanwhile (the CLI's progress bar)."""
    store = PrelabelStore(settings.model_dir)
    last_sweep = 0.0
    while True:
        if time.monotonic() - last_sweep >= max(every, settings.prelabel_lease_s / 4):
            sweep(settings)
            last_sweep = time.monotonic()
        progress = store.progress(run_id)
        yield progress.as_dict()
        if progress.state not in ("planning", "running"):
            return
        time.sleep(every)
