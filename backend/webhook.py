"""Label Studio webhook events: validation, and the one entry point for training events.

Label Studio's auto-created webhook posts every project event to ``/webhook`` and gives
up after 1 s (``WEBHOOK_TIMEOUT``), so nothing slow may happen here: training events
are recorded (and, with the active-learning worker, enqueued) and the reply goes back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .projects import project_key
from .settings import Settings

logger = logging.getLogger(__name__)

# Label Studio 1.23: annotation events carry "annotation", "task" and "project";
# deletions are sent as ANNOTATIONS_DELETED (plural, with "annotations");
# START_TRAINING (the "Start training" button, POST /api/ml/{id}/train) only "project".
TRAINING_EVENTS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"}
)
EVENTS_FILE = "webhook-events.jsonl"


def validate_webhook_payload(payload: Any) -> str:
    """The event's ``action`` after checking the payload's shape; ``ValueError`` naming
    the field that is missing or of the wrong type."""
    if not isinstance(payload, dict):
        raise ValueError(f"the webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise ValueError(
            "the webhook body needs 'action': the event name, e.g. 'ANNOTATION_CREATED'"
        )
    if action not in TRAINING_EVENTS:
        return action
    project = payload.get("project")
    if not isinstance(project, dict) or project_key(project) is None:
        raise ValueError(f"{action} needs 'project': an object with the project 'id'")
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation = payload.get("annotation")
        if not isinstance(annotation, dict) or "id" not in annotation:
            raise ValueError(f"{action} needs 'annotation': an object with its 'id' and 'result'")
        if not isinstance(annotation.get("result", []), list):
            raise ValueError(f"{action}: 'annotation.result' must be a list")
        task = payload.get("task")
        if task is not None and not isinstance(task, dict):
            raise ValueError(f"{action}: 'task' must be an object")
    if action == "ANNOTATIONS_DELETED":
        annotations = payload.get("annotations")
        if annotations is not None and not isinstance(annotations, list):
            raise ValueError("ANNOTATIONS_DELETED: 'annotations' must be a list")
    return action


def handle_training_event(
    payload: dict[str, Any], *, model_dir: Path | None = None
) -> dict[str, Any]:
    """Record one training event (``TRAINING_EVENTS``) and return the reply body.

    Called by ``POST /webhook`` with a payload :func:`validate_webhook_payload` accepted.
    Appends one JSON line ``{"event_id", "received_at", "action", "project",
    "annotation_id", "task_id", "payload"}`` to ``MODEL_DIR/webhook-events.jsonl`` under an
    exclusive file lock (several gunicorn workers append safely) and fsyncs it, so an
    acknowledged event survives a crash. Must return well under Label Studio's 1 s webhook
    timeout: anything slow (training) belongs to a worker this only enqueues for.

    The active-learning issue extends this function (record in its job table + enqueue a
    Celery task); the reply's ``status`` and ``event_id`` keys stay.
    """
    model_dir = Path(model_dir) if model_dir is not None else Settings.from_env().model_dir
    action = payload["action"]
    raw_annotation, raw_task = payload.get("annotation"), payload.get("task")
    annotation: dict[str, Any] = raw_annotation if isinstance(raw_annotation, dict) else {}
    task: dict[str, Any] = raw_task if isinstance(raw_task, dict) else {}
    event = {
        "event_id": uuid.uuid4().hex,
        "received_at": time.time(),
        "action": action,
        "project": project_key(payload.get("project")),
        "annotation_id": annotation.get("id"),
        "task_id": task.get("id", annotation.get("task")),
        "payload": payload,
    }
    line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / EVENTS_FILE
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    logger.info(
        "recorded %s for project %s (event %s)", action, event["project"], event["event_id"]
    )
    return {"status": "recorded", "action": action, "event_id": event["event_id"]}


def read_events(model_dir: Path) -> list[dict[str, Any]]:
    """Every recorded event of ``MODEL_DIR/webhook-events.jsonl``, oldest first (a torn
    last line from a crash mid-write is skipped)."""
    path = Path(model_dir) / EVENTS_FILE
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping an unreadable event line", path, n)
    return out
