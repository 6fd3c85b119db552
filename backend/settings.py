"""Backend settings, read from the environment once per process (documented in the README).

Every setting has a default that works on a fresh machine: the bundled demo checkpoint on
CPU, ``MODEL_DIR`` under the user's cache, no auth. ``Settings.from_env()`` validates every
value and raises ``ValueError`` naming the variable and what it expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from training.settings import (
    ServiceSettings,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_str,
)


@dataclass(frozen=True)
class Settings(ServiceSettings):
    """What one backend process runs with: the settings it shares with the workers
    (:class:`training.settings.ServiceSettings`: ``MODEL_DIR``, checkpoint, device, Label
    Studio address, image fetching) and its own. Field comments name the variable."""

    dtype: str | None = None  # NEXTCHAT_DTYPE: float32 | bfloat16 | float16 (cuda only)
    basic_auth_user: str | None = None  # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS
    webhook_allow_unauthenticated: bool = False  # WEBHOOK_ALLOW_UNAUTHENTICATED
    score_threshold: float = 0.0  # SCORE_THRESHOLD: drop regions whose score is lower
    # SCORE_PRESENCE: exists | at - how a region's presence is scored (nextchat_core.predictor:
    # p(yes) of "Is there ...?", one extra batched pass per prompt, or the <at> probability);
    # PRESENCE_THRESHOLD: under "exists", prompts whose p(yes) is lower get no region.
    # Both default to the checkpoint's config ("score" section).
    score_presence: Literal["exists", "at"] | None = None
    presence_threshold: float | None = None
    mask_threshold: float | None = (
        None  # MASK_THRESHOLD: SAM IoU below which no mask (ckpt default)
    )
    dedup_iou: float = 0.9  # DEDUP_IOU: same-label boxes overlapping more are one region
    # CROSS_LABEL_IOU: boxes of different labels overlapping more are one object, found by
    # two labels' prompts: only the higher-scored is kept (1 keeps both).
    cross_label_iou: float = 0.7
    polygon_tolerance: float = 1.0  # POLYGON_TOLERANCE: pixels of polygon simplification
    batch_size: int = 8  # BATCH_SIZE: images (and prompts) per model call
    max_new_tokens: int = 48  # MAX_NEW_TOKENS: generation limit per prompt
    workers: int = 1  # WORKERS: gunicorn processes (each loads the model once)
    threads: int = 8  # THREADS: gunicorn threads per process (model calls are serialized)
    timeout: int = 300  # GUNICORN_TIMEOUT: seconds before a silent worker is restarted
    preload_model: bool = True  # PRELOAD_MODEL: load weights when a worker starts
    max_request_mb: float = 20.0  # MAX_REQUEST_MB: larger request bodies get 413 unread
    max_tasks: int = 5000  # MAX_TASKS: tasks per /predict request (more: 413)
    # PREDICT_SLOTS: /predict requests let in at once (they wait for the model, which runs
    # one call at a time); more get 503 + Retry-After at once, so the other THREADS stay
    # free for /health and /webhook (default: THREADS - 2, at least 1).
    predict_slots: int | None = None
    # SYNC_PROJECT_VERSION: on /setup, point the project's model_version at the served
    # version (Label Studio sets it to the backend's title, which no prediction carries:
    # the editor and the Data Manager's score column then show nothing of this backend's).
    sync_project_version: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default ``os.environ``); ``overrides`` win over both."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            **ServiceSettings.values_from_env(env),
            "dtype": env_choice(env, "NEXTCHAT_DTYPE", ("float32", "bfloat16", "float16")),
            "basic_auth_user": env_str(env, "BASIC_AUTH_USER"),
            "basic_auth_pass": env_str(env, "BASIC_AUTH_PASS"),
            "webhook_allow_unauthenticated": env_bool(env, "WEBHOOK_ALLOW_UNAUTHENTICATED", False),
            "score_threshold": env_float(env, "SCORE_THRESHOLD", 0.0, lo=0.0, hi=1.0),
            "mask_threshold": env_float(env, "MASK_THRESHOLD", None, lo=0.0, hi=1.0),
            "score_presence": env_choice(env, "SCORE_PRESENCE", ("exists", "at")),
            "presence_threshold": env_float(env, "PRESENCE_THRESHOLD", None, lo=0.0, hi=1.0),
            "cross_label_iou": env_float(env, "CROSS_LABEL_IOU", 0.7, lo=0.0, hi=1.0),
            "dedup_iou": env_float(env, "DEDUP_IOU", 0.9, lo=0.0, hi=1.0),
            "polygon_tolerance": env_float(env, "POLYGON_TOLERANCE", 1.0, lo=0.0, hi=100.0),
            "batch_size": env_int(env, "BATCH_SIZE", 8, lo=1),
            "max_new_tokens": env_int(env, "MAX_NEW_TOKENS", 48, lo=4),
            "workers": env_int(env, "WORKERS", 1, lo=1),
            "threads": env_int(env, "THREADS", 8, lo=1),
            "timeout": env_int(env, "GUNICORN_TIMEOUT", 300, lo=1),
            "preload_model": env_bool(env, "PRELOAD_MODEL", True),
            "max_request_mb": env_float(env, "MAX_REQUEST_MB", 20.0, lo=0.01, hi=10000.0),
            "max_tasks": env_int(env, "MAX_TASKS", 5000, lo=1),
            "predict_slots": env_int(env, "PREDICT_SLOTS", 0, lo=0) or None,
            "sync_project_version": env_bool(env, "SYNC_PROJECT_VERSION", True),
        }
        values.update(overrides)
        settings = cls(**{k: v for k, v in values.items() if v is not None or k in overrides})
        settings.validate()
        return settings

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, the ``serve`` command)."""
        out = replace(self, **changes)
        out.validate()
        return out

    def validate(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError(
                "set both BASIC_AUTH_USER and BASIC_AUTH_PASS (or neither): only one is set"
            )

    @property
    def predict_concurrency(self) -> int:
        """How many ``/predict`` requests are let in at once (``PREDICT_SLOTS``)."""
        return self.predict_slots or max(1, self.threads - 2)

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)
