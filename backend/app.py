"""The Flask app: Label Studio's ML backend protocol (2.x) on NExT-Chat.

Routes (request / reply shapes as Label Studio 1.23 sends and expects them):

* ``GET /health``, ``GET /`` -> ``{"status": "UP", "model_class", "model_version"}``
* ``POST /setup`` -> ``{"model_version"}``
* ``POST /predict`` -> ``{"results": [one per task, in order]}``
* ``POST /webhook`` -> 200 ``{"status": "Unknown event"}``, or 201 for training events
* ``GET /metrics`` -> ``{}``
* ``GET /versions`` -> ``{"versions": [names], "current", "details"}``
* ``POST /prelabel`` ``{project, selection?, view?, prompt?, version?, batch_size?,
  chunk_size?}`` -> 202 ``{"run": {...progress}}``: pre-label a whole project on the
  workers (:mod:`backend.prelabel`); ``GET /prelabel[?project=ID|run=ID]`` -> ``{"runs":
  [progress]}``; ``POST /prelabel/<run>/cancel``

Errors are JSON ``{"status": "error", "detail": ...}`` with a 4xx status for a bad
request and 5xx for a server-side failure. With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``
set every route needs them, except ``/webhook`` when ``WEBHOOK_ALLOW_UNAUTHENTICATED``
(Label Studio's auto-created webhook sends no credentials).
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import sqlite3
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from labelstudio.projects import ProjectStore, project_key
from training.prelabel_runs import PrelabelStore, RunOptions
from training.retrain import RetrainSettings
from training.store import STORE_NAME
from training.tasks import enqueue_pending, prepare_app

from .model import BackendError, NextChatBackend, redact_paths
from .model_cache import ModelCache
from .prelabel import begin as begin_prelabel
from .prelabel import sweep as sweep_prelabel
from .settings import Settings
from .webhook import TRAINING_EVENTS, handle_training_event, validate_webhook_payload

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    store: ModelCache | None = None,
    preload: bool | None = None,
    retrain: RetrainSettings | None = None,
    enqueue_retry_s: float | None = 5.0,
) -> Flask:
    """The WSGI app. ``settings`` default to the environment; ``store`` lets tests share
    one model cache between apps; ``preload`` (default ``settings.preload_model``) starts
    loading the weights in the background right away. ``retrain``: the active-learning
    settings (default from the environment, on the same ``MODEL_DIR``);
    ``enqueue_retry_s``: how often jobs recorded while the broker was down are handed
    to it again (``None``: never)."""
    settings = settings or Settings.from_env()
    store = store or ModelCache(settings)
    backend = NextChatBackend(settings, store, ProjectStore(settings.model_dir))
    app = Flask("nextchat_backend")
    app.extensions["nextchat_backend"] = backend  # for tests and benches: its caches
    app.config["JSON_SORT_KEYS"] = False
    # Werkzeug refuses a larger body with 413 before it is read.
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 2**20)
    predict_slots = threading.BoundedSemaphore(settings.predict_concurrency)
    app.extensions["nextchat"] = backend
    retrain = retrain or RetrainSettings.from_env(model_dir=settings.model_dir)
    prelabel_runs = PrelabelStore(settings.model_dir)
    if settings.preload_model if preload is None else preload:
        store.warm_up_in_background()
    prepare_app()
    if enqueue_retry_s:
        _start_pending_enqueuer(retrain, settings, enqueue_retry_s)

    @app.before_request
    def _authenticate() -> Response | None:
        if not settings.basic_auth_enabled:
            return None
        if request.path.rstrip("/") == "/webhook" and settings.webhook_allow_unauthenticated:
            return None
        auth = request.authorization
        user, password = settings.basic_auth_user or "", settings.basic_auth_pass or ""
        # compare_digest: the time taken does not tell how much of a guess was right
        ok = (
            auth is not None
            and auth.type == "basic"
            and hmac.compare_digest((auth.username or "").encode(), user.encode())
            and hmac.compare_digest((auth.password or "").encode(), password.encode())
        )
        if ok:
            return None
        logger.warning("rejected %s %s: missing or wrong basic auth", request.method, request.path)
        reply = _error(
            401, "basic auth required: configure the ML backend's user and password in Label Studio"
        )
        reply.headers["WWW-Authenticate"] = 'Basic realm="nextchat-backend"'
        return reply

    @app.get("/")
    @app.get("/health")
    def health() -> Response | tuple[Response, int]:
        """Readiness (what Label Studio and the compose health check ask): UP only when a
        model version can be served; 503 DOWN with the reason otherwise. It touches no
        model and no lock, so it answers at once whatever /predict is doing."""
        body: dict[str, Any] = {"status": "UP", "model_class": NextChatBackend.model_class}
        try:
            body["model_version"] = store.current_version().name
        except (FileNotFoundError, ValueError) as exc:
            body.update(status="DOWN", model_version=None, detail=redact_paths(str(exc)))
        body["loaded"] = store.loaded_versions()
        problems = backend.storage_problems()
        if problems:
            body["storage"] = problems  # e.g. the prompt memory cannot be written
        return jsonify(body), 200 if body["status"] == "UP" else 503

    @app.get("/livez")
    def livez() -> Response:
        """Liveness: the process answers (restart it only when this fails)."""
        return jsonify({"status": "UP"})

    @app.post("/setup")
    def setup() -> Response:
        return jsonify(backend.setup(_json_object()))

    @app.post("/predict")
    def predict() -> Response:
        if not predict_slots.acquire(blocking=False):
            reply = _error(
                503,
                f"busy: {settings.predict_concurrency} predictions are already waiting for the "
                "model; retry shortly (raise PREDICT_SLOTS/THREADS to queue more, WORKERS to "
                "serve more)",
            )
            reply.headers["Retry-After"] = "1"
            return reply
        try:
            payload = _json_object()
            tasks = payload.get("tasks")
            if isinstance(tasks, list) and len(tasks) > settings.max_tasks:
                raise BackendError(
                    413,
                    f"{len(tasks)} tasks in one request, more than MAX_TASKS "
                    f"({settings.max_tasks}); select fewer tasks or use batch pre-labeling",
                )
            return jsonify(backend.predict(payload))
        finally:
            predict_slots.release()

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        payload = _json_object()
        try:
            action = validate_webhook_payload(payload)
        except ValueError as exc:
            raise BackendError(400, str(exc)) from None
        if action not in TRAINING_EVENTS:
            return jsonify({"status": "Unknown event"}), 200
        return jsonify(handle_training_event(payload, retrain)), 201

    @app.get("/training")
    def training() -> Response:
        project = request.args.get("project")
        try:
            key = project_key(project) if project else None
        except ValueError as exc:
            raise BackendError(400, f"'project': {exc}") from None
        jobs = retrain.store.jobs(key)
        return jsonify(
            {
                "jobs": [job.as_dict() for job in jobs],
                "model_version": store.current_version().name,
                "retrain_every": retrain.retrain_every,
                "policy": retrain.policy,
            }
        )

    @app.post("/prelabel")
    def prelabel_start() -> tuple[Response, int]:
        """Start pre-labeling a project on the workers; answers at once (a worker lists
        the tasks), follow it with ``GET /prelabel?run=ID``."""
        body = _json_object()
        try:
            project = project_key(body.pop("project", None))
            if project is None:
                raise ValueError("'project' (the Label Studio project id) is required")
            version = body.pop("version", None)
            if version is not None and not isinstance(version, str):
                raise ValueError("'version' must be a model version name (GET /versions)")
            options = RunOptions.from_dict(
                {"chunk_size": settings.prelabel_chunk_size, **body, "started_by": "http"}
            )
            run = begin_prelabel(
                settings, project, options, version=version, plan_here=False, cache=store
            )
        except ValueError as exc:
            raise BackendError(400, str(exc)) from None
        except RuntimeError as exc:  # the broker cannot be reached
            raise BackendError(503, str(exc)) from None
        return jsonify({"run": prelabel_runs.progress(run.run_id).as_dict()}), 202

    @app.get("/prelabel")
    def prelabel_status() -> Response:
        """Progress of the latest runs (``?project=ID``) or of one (``?run=ID``): done /
        total, rate, ETA, failures with their reasons."""
        run_id = request.args.get("run")
        try:
            if run_id:
                return jsonify({"runs": [prelabel_runs.progress(run_id).as_dict()]})
            project = request.args.get("project")
            key = project_key(project) if project else None
        except ValueError as exc:
            raise BackendError(404 if run_id else 400, str(exc)) from None
        runs = prelabel_runs.runs(key)
        return jsonify(
            {"runs": [prelabel_runs.progress(r.run_id, failures=10).as_dict() for r in runs]}
        )

    @app.post("/prelabel/<run_id>/cancel")
    def prelabel_cancel(run_id: str) -> Response:
        try:
            run = prelabel_runs.cancel(run_id)
        except ValueError as exc:
            raise BackendError(404, str(exc)) from None
        return jsonify({"run": prelabel_runs.progress(run.run_id).as_dict()})

    @app.get("/metrics")
    def metrics() -> Response:
        return jsonify({})

    @app.get("/versions")
    def versions() -> Response:
        body = store.versions()
        for d in body["details"]:
            d.pop("path", None)  # server paths are the operator's business, not the client's
        return jsonify(body)

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError) -> Response:
        return _error(exc.status, exc.detail, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(FileNotFoundError)
    def _missing(exc: FileNotFoundError) -> Response:
        # The model checkpoint or version pointer is missing: a server-side setup problem.
        logger.error("%s", exc)
        return _error(503, redact_paths(str(exc)))

    @app.errorhandler(sqlite3.Error)
    def _storage(exc: sqlite3.Error) -> Response:
        # The annotation store under MODEL_DIR cannot be read or written (read-only,
        # full, missing): say so, with the real cause, instead of a bare 500.
        logger.error("annotation store %s: %s", retrain.model_dir / STORE_NAME, exc)
        return _error(
            503,
            f"storage: the annotation store (MODEL_DIR/{STORE_NAME}) cannot be used: {exc}; "
            "check that MODEL_DIR is writable and not full",
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The last resort for a bug or a device failure (e.g. CUDA out of memory): logged
        # with its traceback and answered as Label Studio expects errors (500 + JSON).
        logger.exception("unhandled error on %s %s", request.method, request.path)
        if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES):
            return _error(503, f"storage: {exc.strerror} writing under MODEL_DIR")
        return _error(500, f"internal error: {type(exc).__name__}: {redact_paths(str(exc))}")

    return app


def _start_pending_enqueuer(
    retrain: RetrainSettings, settings: Settings, every: float
) -> threading.Thread:
    """A daemon thread that hands jobs recorded while the broker was down to it once it
    is back (duplicates are harmless: a job runs once, see training.retrain), and enqueues
    again the pre-labeling chunks of dead workers (:func:`backend.prelabel.sweep`)."""

    def run() -> None:
        while True:
            time.sleep(every)
            try:
                if retrain.store.unenqueued_jobs():
                    enqueue_pending(retrain.store, retrain.model_dir)
            except Exception as exc:  # keep retrying: the store or broker may come back
                logger.warning("pending-job enqueuer: %s", exc)
            try:
                sweep_prelabel(settings)
            except Exception as exc:  # the same: the next sweep tries again
                logger.warning("pre-labeling sweep: %s", exc)

    thread = threading.Thread(target=run, name="nextchat-enqueuer", daemon=True)
    thread.start()
    return thread


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise BackendError(400, "the request body is empty: send a JSON object")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackendError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BackendError(
            400, "the request body nests JSON too deeply to parse; Label Studio never sends that"
        ) from None
    if not isinstance(payload, dict):
        raise BackendError(
            400, f"the request body must be a JSON object, got {type(payload).__name__}"
        )
    return payload


def _error(status: int, detail: str, **extra: Any) -> Response:
    response = jsonify({"status": "error", "detail": detail, **extra})
    response.status_code = status
    return response
