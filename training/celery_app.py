"""The Celery app of the retraining workers (``nextchat worker``), configured from the
environment.

``CELERY_BROKER_URL``: the broker, e.g. ``redis://127.0.0.1:6379/0`` (docker-compose).
Unset: Celery's SQLAlchemy transport on SQLite under ``MODEL_DIR`` (``celery-broker.sqlite``),
so a single machine needs no Redis. ``CELERY_RESULT_BACKEND``: default the Redis broker's
URL, else SQLite under ``MODEL_DIR``. ``CELERY_QUEUE`` (default ``nextchat``) names the
retraining queue, ``PRELABEL_QUEUE`` (default ``<CELERY_QUEUE>-prelabel``) pre-labeling's; ``CELERY_VISIBILITY_TIMEOUT`` (seconds, Redis; default ``RETRAIN_TIME_LIMIT`` + 5
min) is how long an unacknowledged job waits before it is handed to another worker (a
killed worker's job comes back then; workers look for such jobs every ~10 s after start,
then every ~100 s).

Tasks acknowledge late and are rejected (requeued) when their worker process is lost, so a
killed worker's job runs again; one job at a time per worker process (prefetch 1); a job
runs at most ``RETRAIN_TIME_LIMIT`` seconds.

Nothing happens at import: :func:`get_app` builds the app (and the SQLite broker's folder)
the first time a process needs it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from celery import Celery

from training.versions import default_model_dir

DEFAULT_QUEUE = "nextchat"
# The pre-labeling tasks (backend.prelabel), named here so that any process can send them
# by name: the backend, the CLI, and a retraining worker after a promotion.
PRELABEL_PLAN_TASK = "nextchat.prelabel.plan"
PRELABEL_CHUNK_TASK = "nextchat.prelabel.chunk"


def retrain_queue() -> str:
    """``CELERY_QUEUE`` (default ``nextchat``): the retraining jobs' queue."""
    return os.environ.get("CELERY_QUEUE", "").strip() or DEFAULT_QUEUE


def prelabel_queue() -> str:
    """``PRELABEL_QUEUE`` (default ``<CELERY_QUEUE>-prelabel``): pre-labeling's own queue on
    the same broker, so a long pre-labeling run and a retraining job never wait on each
    other (``nextchat worker --queues prelabel`` consumes it)."""
    return os.environ.get("PRELABEL_QUEUE", "").strip() or f"{retrain_queue()}-prelabel"


def model_dir_from_env() -> Path:
    return Path(os.environ.get("MODEL_DIR") or default_model_dir())


def broker_url() -> str:
    url = os.environ.get("CELERY_BROKER_URL", "").strip()
    if url:
        return url
    root = model_dir_from_env()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqla+sqlite:///{root / 'celery-broker.sqlite'}"


def result_backend(broker: str) -> str:
    url = os.environ.get("CELERY_RESULT_BACKEND", "").strip()
    if url:
        return url
    if broker.startswith(("redis://", "rediss://")):
        return broker
    return f"db+sqlite:///{model_dir_from_env() / 'celery-results.sqlite'}"


def make_app() -> Celery:
    from .retrain import RetrainSettings

    time_limit = RetrainSettings.from_env().time_limit
    broker = broker_url()
    app = Celery(
        "nextchat", broker=broker, backend=result_backend(broker), include=["training.tasks"]
    )
    queue = retrain_queue()
    transport: dict[str, object] = {}
    if broker.startswith(("redis://", "rediss://")):
        visibility = os.environ.get("CELERY_VISIBILITY_TIMEOUT", "").strip()
        # Default: longer than a job may run (RETRAIN_TIME_LIMIT), so a live job is not
        # handed to a second worker; a killed worker's job comes back after this long.
        transport["visibility_timeout"] = float(visibility) if visibility else time_limit + 300
        # Fail fast when Redis is down: the web process records the job and enqueues later.
        transport.update(socket_connect_timeout=2, socket_timeout=10)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_time_limit=time_limit,
        task_soft_time_limit=max(1, time_limit - 60),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
    )
    return app


@functools.cache
def get_app() -> Celery:
    """The process's Celery app, built from the environment on first use."""
    return make_app()


def waiting_messages(queue: str) -> int:
    """How many messages wait in ``queue`` on the broker (not those a worker has taken).
    A passive declare, which every kombu transport answers; a queue the broker does not
    know (Redis drops an empty list) waits for nothing."""
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    with get_app().connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except (NotFound, ChannelError):
            return 0
