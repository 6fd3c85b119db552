"""Backend settings, read from the environment once per process (documented in the README).

Every setting has a default that works on a fresh machine: the bundled demo checkpoint on
CPU, ``MODEL_DIR`` under the user's cache, no auth. ``Settings.from_env()`` validates every
value and raises ``ValueError`` naming the variable and what it expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from training.versions import default_model_dir

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """What one backend process runs with. Field comments name the environment variable."""

    checkpoint: str | None = None  # NEXTCHAT_CHECKPOINT: base model dir (default: bundled demo)
    device: str | None = None  # NEXTCHAT_DEVICE: cpu | cuda | cuda:N (default cpu)
    dtype: str | None = None  # NEXTCHAT_DTYPE: float32 | bfloat16 | float16 (cuda only)
    model_dir: Path = field(default_factory=lambda: default_model_dir())  # MODEL_DIR
    label_studio_url: str | None = None  # LABEL_STUDIO_URL: fetch uploads when /setup gave none
    label_studio_api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY
    basic_auth_user: str | None = None  # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS
    webhook_allow_unauthenticated: bool = False  # WEBHOOK_ALLOW_UNAUTHENTICATED
    score_threshold: float = 0.0  # SCORE_THRESHOLD: drop boxes whose <at> probability is lower
    mask_threshold: float | None = (
        None  # MASK_THRESHOLD: SAM IoU below which no mask (ckpt default)
    )
    dedup_iou: float = 0.9  # DEDUP_IOU: same-label boxes overlapping more are one region
    polygon_tolerance: float = 1.0  # POLYGON_TOLERANCE: pixels of polygon simplification
    batch_size: int = 8  # BATCH_SIZE: images (and prompts) per model call
    max_new_tokens: int = 48  # MAX_NEW_TOKENS: generation limit per prompt
    fetch_workers: int = 8  # FETCH_WORKERS: concurrent image downloads per request
    fetch_timeout: float = 20.0  # FETCH_TIMEOUT: seconds per image download
    max_download_mb: float = 200.0  # MAX_DOWNLOAD_MB: refuse larger image files
    local_files_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT: local paths allowed here
    workers: int = 1  # WORKERS: gunicorn processes (each loads the model once)
    threads: int = 4  # THREADS: gunicorn threads per process (model calls are serialized)
    timeout: int = 300  # GUNICORN_TIMEOUT: seconds before a silent worker is restarted
    preload_model: bool = True  # PRELOAD_MODEL: load weights when a worker starts
    torch_threads: int | None = None  # TORCH_THREADS: CPU threads per process (torch default)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default ``os.environ``); ``overrides`` win over both."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "checkpoint": _str(env, "NEXTCHAT_CHECKPOINT"),
            "device": _str(env, "NEXTCHAT_DEVICE"),
            "dtype": _choice(env, "NEXTCHAT_DTYPE", ("float32", "bfloat16", "float16")),
            "label_studio_url": _url(env, "LABEL_STUDIO_URL"),
            "label_studio_api_key": _str(env, "LABEL_STUDIO_API_KEY"),
            "basic_auth_user": _str(env, "BASIC_AUTH_USER"),
            "basic_auth_pass": _str(env, "BASIC_AUTH_PASS"),
            "webhook_allow_unauthenticated": _bool(env, "WEBHOOK_ALLOW_UNAUTHENTICATED", False),
            "score_threshold": _float(env, "SCORE_THRESHOLD", 0.0, lo=0.0, hi=1.0),
            "mask_threshold": _float(env, "MASK_THRESHOLD", None, lo=0.0, hi=1.0),
            "dedup_iou": _float(env, "DEDUP_IOU", 0.9, lo=0.0, hi=1.0),
            "polygon_tolerance": _float(env, "POLYGON_TOLERANCE", 1.0, lo=0.0, hi=100.0),
            "batch_size": _int(env, "BATCH_SIZE", 8, lo=1),
            "max_new_tokens": _int(env, "MAX_NEW_TOKENS", 48, lo=4),
            "fetch_workers": _int(env, "FETCH_WORKERS", 8, lo=1),
            "fetch_timeout": _float(env, "FETCH_TIMEOUT", 20.0, lo=0.1, hi=3600.0),
            "max_download_mb": _float(env, "MAX_DOWNLOAD_MB", 200.0, lo=0.001, hi=1e6),
            "workers": _int(env, "WORKERS", 1, lo=1),
            "threads": _int(env, "THREADS", 4, lo=1),
            "timeout": _int(env, "GUNICORN_TIMEOUT", 300, lo=1),
            "preload_model": _bool(env, "PRELOAD_MODEL", True),
            "torch_threads": _int(env, "TORCH_THREADS", 0, lo=0) or None,
        }
        model_dir = _str(env, "MODEL_DIR")
        if model_dir:
            values["model_dir"] = Path(model_dir)
        root = _str(env, "LOCAL_FILES_DOCUMENT_ROOT")
        if root:
            values["local_files_root"] = Path(root)
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
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)


def _str(env: Mapping[str, str], key: str) -> str | None:
    value = env.get(key)
    return value.strip() if value and value.strip() else None


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{key} must be true or false, got {raw!r}")


def _int(env: Mapping[str, str], key: str, default: int, *, lo: int) -> int:
    raw = _str(env, key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key} must be an integer >= {lo}, got {raw!r}") from None
    if value < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {value}")
    return value


def _float(
    env: Mapping[str, str], key: str, default: float | None, *, lo: float, hi: float
) -> float | None:
    raw = _str(env, key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number in [{lo}, {hi}], got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be a number in [{lo}, {hi}], got {value}")
    return value


def _choice(env: Mapping[str, str], key: str, options: tuple[str, ...]) -> str | None:
    raw = _str(env, key)
    if raw is not None and raw not in options:
        raise ValueError(f"{key} must be one of {', '.join(options)}, got {raw!r}")
    return raw


def _url(env: Mapping[str, str], key: str) -> str | None:
    raw = _str(env, key)
    if raw is not None and not raw.startswith(("http://", "https://")):
        raise ValueError(f"{key} must be a URL starting with http:// or https://, got {raw!r}")
    return raw.rstrip("/") if raw else None
