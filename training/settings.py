"""Settings shared by the backend and the retraining workers, read from the environment
when first needed (nothing here runs at import).

:class:`ServiceSettings` holds what both processes must agree on: ``MODEL_DIR``, the base
checkpoint, the device, how to reach Label Studio and how to fetch images. The backend's
:class:`backend.settings.Settings` and the workers' :class:`training.retrain.RetrainSettings`
extend it, so each variable is parsed and validated in one place; ``fetch_options`` gives
``/predict`` and a retraining job the same download rules.

Which model is served (the base checkpoint, the versions under ``MODEL_DIR``) is
:mod:`training.versions`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelstudio.images import DEFAULT_DENY_NETWORKS, FetchOptions, local_files_root_from_env
from labelstudio.projects import ProjectState

from .versions import default_model_dir

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ServiceSettings:
    """What the backend and the workers share. Field comments name the environment variable."""

    model_dir: Path = field(default_factory=lambda: default_model_dir())  # MODEL_DIR
    checkpoint: str | None = None  # NEXTCHAT_CHECKPOINT: base model dir (default: bundled demo)
    device: str | None = None  # NEXTCHAT_DEVICE: cpu | cuda | cuda:N (default: per process)
    label_studio_url: str | None = None  # LABEL_STUDIO_URL: fetch uploads when /setup gave none
    label_studio_api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY
    local_files_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT: local paths allowed under it
    fetch_workers: int = 8  # FETCH_WORKERS: concurrent image downloads per request
    fetch_timeout: float = 20.0  # FETCH_TIMEOUT: deadline per image download, seconds
    max_download_mb: float = 200.0  # MAX_DOWNLOAD_MB: stop reading an image at this size
    # FETCH_DENY_NETWORKS: comma-separated CIDRs never fetched from ("none": no list);
    # default link-local / cloud-metadata addresses. FETCH_ALLOW_NETWORKS: if set, images
    # are fetched only from these CIDRs (e.g. Label Studio's and the image store's).
    fetch_deny_networks: tuple[str, ...] = DEFAULT_DENY_NETWORKS
    fetch_allow_networks: tuple[str, ...] = ()
    torch_threads: int | None = None  # TORCH_THREADS: CPU threads per process (torch default)
    # Pre-labeling a whole project (backend.prelabel): tasks per worker job; how long a
    # worker's claim on its tasks lasts without a heartbeat (a dead worker's tasks are
    # taken over after this); seconds one chunk may run; and whether a promoted version
    # re-pre-labels the project's unannotated tasks.
    prelabel_chunk_size: int = 32  # PRELABEL_CHUNK_SIZE
    prelabel_lease_s: float = 60.0  # PRELABEL_LEASE_S
    prelabel_time_limit: int = 3600  # PRELABEL_TIME_LIMIT
    prelabel_on_promote: bool = False  # PRELABEL_ON_PROMOTE

    @staticmethod
    def values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
        """The shared fields found in ``env``, validated (``ValueError`` names the variable)."""
        values: dict[str, Any] = {
            "checkpoint": env_str(env, "NEXTCHAT_CHECKPOINT"),
            "device": env_str(env, "NEXTCHAT_DEVICE"),
            "label_studio_url": env_url(env, "LABEL_STUDIO_URL"),
            "label_studio_api_key": env_str(env, "LABEL_STUDIO_API_KEY"),
            "fetch_workers": env_int(env, "FETCH_WORKERS", 8, lo=1),
            "fetch_timeout": env_float(env, "FETCH_TIMEOUT", 20.0, lo=0.1, hi=3600.0),
            "max_download_mb": env_float(env, "MAX_DOWNLOAD_MB", 200.0, lo=0.001, hi=1e6),
            "torch_threads": env_int(env, "TORCH_THREADS", 0, lo=0) or None,
            "fetch_allow_networks": env_networks(env, "FETCH_ALLOW_NETWORKS") or (),
            "prelabel_chunk_size": env_int(env, "PRELABEL_CHUNK_SIZE", 32, lo=1),
            "prelabel_lease_s": env_float(env, "PRELABEL_LEASE_S", 60.0, lo=1.0, hi=86400.0),
            "prelabel_time_limit": env_int(env, "PRELABEL_TIME_LIMIT", 3600, lo=10),
            "prelabel_on_promote": env_bool(env, "PRELABEL_ON_PROMOTE", False),
        }
        deny = env_networks(env, "FETCH_DENY_NETWORKS")
        if deny is not None:
            values["fetch_deny_networks"] = deny
        model_dir = env_str(env, "MODEL_DIR")
        if model_dir:
            values["model_dir"] = Path(model_dir)
        root = local_files_root_from_env(env)
        if root is not None:
            values["local_files_root"] = root
        return values

    def fetch_options(
        self,
        project: ProjectState | None = None,
        *,
        task_data_login: str | None = None,
        task_data_password: str | None = None,
    ) -> FetchOptions:
        """How to fetch a project's images: the Label Studio address and token that
        ``/setup`` stored for ``project`` (else ``LABEL_STUDIO_URL`` / ``_API_KEY``), and
        this process's timeout, size limit, concurrency and local-files root."""
        # A token travels only with the host it was given for: the project's own pair from
        # /setup, else LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY.
        hostname: str | None
        token: str | None
        if project is not None and project.hostname:
            hostname, token = project.hostname, project.access_token
            if not token and hostname.rstrip("/") == (self.label_studio_url or "").rstrip("/"):
                token = self.label_studio_api_key
        else:
            hostname, token = self.label_studio_url, self.label_studio_api_key
        return FetchOptions(
            hostname=hostname,
            access_token=token,
            timeout=self.fetch_timeout,
            max_bytes=int(self.max_download_mb * 2**20),
            workers=self.fetch_workers,
            local_files_root=self.local_files_root,
            task_data_login=task_data_login or None,
            task_data_password=task_data_password or None,
            deny_networks=self.fetch_deny_networks,
            allow_networks=self.fetch_allow_networks,
        )


# ------------------------------------------------------------------ environment readers


def env_str(env: Mapping[str, str], key: str) -> str | None:
    value = env.get(key)
    return value.strip() if value and value.strip() else None


def env_bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{key} must be true or false, got {raw!r}")


def env_int(env: Mapping[str, str], key: str, default: int, *, lo: int) -> int:
    raw = env_str(env, key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key} must be an integer >= {lo}, got {raw!r}") from None
    if value < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {value}")
    return value


def env_float(
    env: Mapping[str, str], key: str, default: float | None, *, lo: float, hi: float
) -> float | None:
    raw = env_str(env, key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number in [{lo}, {hi}], got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be a number in [{lo}, {hi}], got {value}")
    return value


def env_choice(env: Mapping[str, str], key: str, options: tuple[str, ...]) -> str | None:
    raw = env_str(env, key)
    if raw is not None and raw not in options:
        raise ValueError(f"{key} must be one of {', '.join(options)}, got {raw!r}")
    return raw


def env_networks(env: Mapping[str, str], key: str) -> tuple[str, ...] | None:
    """Comma-separated CIDRs (``10.0.0.0/8,::1/128``); ``none`` for an empty list; ``None``
    when unset."""
    raw = env_str(env, key)
    if raw is None:
        return None
    if raw.lower() == "none":
        return ()
    nets = []
    for part in (p.strip() for p in raw.split(",")):
        try:
            nets.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(
                f"{key} must be comma-separated networks such as 10.0.0.0/8,192.168.1.5/32 "
                f"(or 'none'), got {part!r}"
            ) from None
    return tuple(nets)


def env_url(env: Mapping[str, str], key: str) -> str | None:
    raw = env_str(env, key)
    if raw is not None and not raw.startswith(("http://", "https://")):
        raise ValueError(f"{key} must be a URL starting with http:// or https://, got {raw!r}")
    return raw.rstrip("/") if raw else None
