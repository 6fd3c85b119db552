"""The workers' Celery tasks (thin: ids and paths in, :mod:`training.retrain` does the
work) and the enqueue helpers the web process calls.

A job lives in the annotation store first (durable, answered to the webhook) and is
handed to the broker second; when the broker is down the job stays marked "not
enqueued" and :func:`enqueue_pending` hands it over later (the web process retries every
few seconds, and every worker does at start), so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from .celery_app import get_app
from .retrain import JobBusy, RetrainSettings, run_job
from .store import AnnotationStore, Job

log = logging.getLogger(__name__)

RETRAIN_TASK = "nextchat.retrain"


# The time limits (RETRAIN_TIME_LIMIT) are the app's (training.celery_app), read when
# the app is built, not here at import.
@shared_task(
    name=RETRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def retrain(self: Any, job_id: str, model_dir: str) -> dict[str, Any]:
    """Run retraining job ``job_id`` of ``MODEL_DIR`` ``model_dir``; progress (stage, step,
    loss, ETA) is published as the task's ``PROGRESS`` state and in the job's row."""
    settings = RetrainSettings.from_env(model_dir=Path(model_dir))
    last = [0.0]

    def progress(update: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:  # at most one result-backend write per second
            last[0] = now
            self.update_state(state="PROGRESS", meta=update)

    try:
        return run_job(job_id, settings, progress=progress)
    except JobBusy as exc:
        # A duplicate delivery while a live worker runs the job: look again later (the
        # job is then done, or its worker died and this delivery takes it over).
        raise self.retry(exc=exc, countdown=3 * settings.heartbeat_s) from None


def prepare_app() -> None:
    """Build the Celery app and register its task now: the web process calls this at start,
    so the first webhook (answered within Label Studio's 1 s) does not pay for it."""
    get_app().tasks[RETRAIN_TASK]


def enqueue(store: AnnotationStore, job: Job, model_dir: Path) -> bool:
    """Hand ``job`` to the broker; False (logged, job left for :func:`enqueue_pending`)
    when the broker cannot be reached."""
    app = get_app()
    try:
        with app.connection_for_write() as conn:
            # One quick attempt (kombu's default is ~100 retries): the webhook that calls
            # this must answer Label Studio within 1 s, broker or not.
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=1
            )
            result = app.tasks[RETRAIN_TASK].apply_async(
                args=(job.job_id, str(model_dir)), task_id=job.job_id, connection=conn, retry=False
            )
    except Exception as exc:  # kombu, redis, sqlalchemy raise many kinds
        log.warning("broker unreachable, job %s stays queued for later: %s", job.job_id, exc)
        return False
    store.mark_enqueued(job.job_id, result.id)
    log.info("enqueued retraining job %s (project %s)", job.job_id, job.project_id)
    return True


def enqueue_pending(store: AnnotationStore, model_dir: Path) -> int:
    """Enqueue every job never handed to the broker; returns how many went."""
    sent = 0
    for job in store.unenqueued_jobs():
        if not enqueue(store, job, model_dir):
            break
        sent += 1
    return sent


@worker_ready.connect
def _enqueue_on_start(**_: Any) -> None:
    settings = RetrainSettings.from_env()
    n = enqueue_pending(settings.store, settings.model_dir)
    if n:
        log.info("enqueued %d job(s) recorded while the broker was unreachable", n)
