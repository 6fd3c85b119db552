"""Label Studio webhook events: validation, and the one entry point for training events.

Label Studio's auto-created webhook posts every project event to ``/webhook`` and gives
up after 1 s (``WEBHOOK_TIMEOUT``), so nothing slow may happen here: a training event
updates the annotation store (SQLite under ``MODEL_DIR``), maybe creates a retraining job
(START_TRAINING, or ``RETRAIN_EVERY`` changed annotations; later triggers coalesce into
the project's active job) and hands it to the broker; the workers do the rest.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from labelstudio.projects import project_key
from labelstudio.results import LabelStudioFormatError, parse_results
from training.retrain import RetrainSettings
from training.store import AnnotationStore, Job
from training.tasks import enqueue

# How long a webhook waits for the broker (Label Studio gives up after 1 s); a slower
# hand-over goes on in the background and the pending-job enqueuer retries a failed one.
ENQUEUE_WAIT_S = 0.4

logger = logging.getLogger(__name__)

# Label Studio 1.23: annotation events carry "annotation", "task" and "project";
# deletions are sent as ANNOTATIONS_DELETED (plural, with "annotations");
# START_TRAINING (the "Start training" button, POST /api/ml/{id}/train) only "project".
TRAINING_EVENTS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"}
)


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
        if not isinstance(task, dict) or "id" not in task or not isinstance(task.get("data"), dict):
            raise ValueError(
                f"{action} needs 'task': an object with its 'id' and 'data' (the image to "
                "train on), as Label Studio sends it"
            )
        # Regions that could never be trained on (NaN, negative sizes, outside the image)
        # are refused here, with what and where, instead of failing a later job. The size
        # only scales pixels: results without their own original_width/height are checked
        # in percent, which does not depend on it.
        problems: list[LabelStudioFormatError] = []
        parse_results(
            annotation.get("result", []),
            task_id=task["id"],
            image_size=(1000, 1000),
            errors=problems,
        )
        if problems:
            raise ValueError(
                f"{action}: annotation {annotation['id']} has {len(problems)} unusable "
                f"region(s): " + "; ".join(str(p) for p in problems[:5])
            )
    if action == "ANNOTATIONS_DELETED":
        annotations = payload.get("annotations")
        if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and "id" in a for a in annotations
        ):
            raise ValueError(
                "ANNOTATIONS_DELETED needs 'annotations': a list of objects with their 'id'"
            )
    return action


def handle_training_event(payload: dict[str, Any], settings: RetrainSettings) -> dict[str, Any]:
    """Apply one training event (``TRAINING_EVENTS``, already validated) to the annotation
    store and return the reply body: ``{"status", "action", "project", "changed", "job",
    "enqueued"}``. A repeated event for the same annotation changes nothing."""
    store = settings.store
    action = payload["action"]
    project_raw = payload["project"]
    project = project_key(project_raw)
    assert project is not None  # validated
    label_config = project_raw.get("label_config") if isinstance(project_raw, dict) else None
    changed = 0
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation, task = payload["annotation"], payload["task"]
        if annotation.get("was_cancelled"):  # a skipped task teaches nothing: forget it
            changed = store.delete_annotations(project, [str(annotation["id"])])
        else:
            changed = int(
                store.upsert_annotation(project, task, annotation, label_config=label_config)
            )
    elif action == "ANNOTATIONS_DELETED":
        changed = store.delete_annotations(project, [str(a["id"]) for a in payload["annotations"]])
    job = None
    if action == "START_TRAINING":
        job, _ = store.request_job(project, "START_TRAINING")
    elif (
        changed
        and settings.retrain_every
        and store.changes_since_training(project) >= settings.retrain_every
    ):
        job, _ = store.request_job(project, "threshold")
    enqueued = False
    if job is not None:
        enqueued = job.enqueued or _enqueue_briefly(store, job, settings)
    logger.info(
        "%s for project %s: %d change(s)%s",
        action,
        project,
        changed,
        f", job {job.job_id} ({'enqueued' if enqueued else 'waiting for the broker'})"
        if job
        else "",
    )
    return {
        "status": "recorded",
        "action": action,
        "project": project,
        "changed": changed,
        "job": job.job_id if job else None,
        "enqueued": enqueued,
    }


def _enqueue_briefly(store: AnnotationStore, job: Job, settings: RetrainSettings) -> bool:
    """Hand ``job`` to the broker, waiting at most ``ENQUEUE_WAIT_S``: a broker that
    accepts TCP and never answers would otherwise hold the webhook for the Redis socket
    timeout (10 s). The attempt goes on in a daemon thread; the job is recorded already,
    so a slow or failed hand-over only delays it (duplicates run once)."""
    done: list[bool] = []
    thread = threading.Thread(
        target=lambda: done.append(enqueue(store, job, settings.model_dir)),
        name=f"enqueue-{job.job_id}",
        daemon=True,
    )
    thread.start()
    thread.join(ENQUEUE_WAIT_S)
    return bool(done and done[0])
