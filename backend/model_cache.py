"""The once-per-process weights cache of the backend, over the model versions of
:mod:`training.versions` (``MODEL_DIR/versions/<name>`` + the ``current`` pointer).

Without ``current`` the backend serves the base checkpoint (``--checkpoint``,
``NEXTCHAT_CHECKPOINT`` or the bundled demo), named ``<dir name>-<fingerprint>``.

Weights are loaded once per process and kept in a cache keyed by (checkpoint path,
version). Every request reads the ``current`` pointer (one ``stat`` when unchanged), so a
new version is served from the next request on, without a restart; the version it
replaces is dropped from the cache once no request uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from nextchat_core.device import resolve_device
from nextchat_core.predictor import NextChatPredictor
from training.versions import (
    CURRENT_FILE,
    ModelVersion,
    base_version,
    list_versions,
    read_current_version,
    stored_version,
)

from .settings import Settings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelCache:
    """Resolves the version to serve and holds its predictor, loaded once per process.

    ``loads`` counts checkpoint loads (tests assert weights are not loaded per request).
    Model calls go through :meth:`use`, which serializes them per predictor: one model
    call at a time makes the best use of one device, and gunicorn threads stay free to
    answer ``/health`` and ``/webhook`` meanwhile.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loads = 0
        self._lock = threading.Lock()  # guards _cache (held only briefly)
        self._load_lock = threading.Lock()  # one checkpoint load at a time
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._newest: tuple[str, str] | None = None
        self._base: ModelVersion | None = None
        self._pointer_stamp: tuple[int, int] | None = None
        self._pointer_name: str | None = None

    # ------------------------------------------------------------------ versions
    def base_version(self) -> ModelVersion:
        """The configured checkpoint (``--checkpoint`` / ``NEXTCHAT_CHECKPOINT`` / demo)."""
        if self._base is None:
            self._base = base_version(self.settings.checkpoint)
        return self._base

    def current_version(self) -> ModelVersion:
        """The version to serve now (:func:`training.versions.served_version`, with the
        ``current`` pointer read only when its file changed)."""
        name = self._current_name()
        if name is None:
            return self.base_version()
        return stored_version(self.settings.model_dir, name)

    def versions(self) -> dict[str, Any]:
        """``GET /versions``: every version name (base first), the current one, details."""
        details = [
            {"name": v["name"], "path": v["path"], "source": "model_dir", **v}
            for v in list_versions(self.settings.model_dir)
        ]
        try:
            base = self.base_version()
            details.insert(0, {"name": base.name, "path": str(base.path), "source": "base"})
        except FileNotFoundError as exc:
            logger.warning("no base checkpoint: %s", exc)
        current = self.current_version().name
        for d in details:
            d["current"] = d["name"] == current
        return {"versions": [d["name"] for d in details], "current": current, "details": details}

    def _current_name(self) -> str | None:
        pointer = self.settings.model_dir / CURRENT_FILE
        try:
            st = pointer.stat()
        except FileNotFoundError:
            self._pointer_stamp = self._pointer_name = None
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._pointer_stamp:
            self._pointer_name = read_current_version(self.settings.model_dir)
            self._pointer_stamp = stamp
        return self._pointer_name

    # ------------------------------------------------------------------- weights
    def get(self, version: ModelVersion | None = None) -> tuple[ModelVersion, NextChatPredictor]:
        """The predictor of ``version`` (default: the current one), loaded on first use."""
        with self.use(version, exclusive=False) as got:
            return got

    @contextmanager
    def use(
        self, version: ModelVersion | None = None, *, exclusive: bool = True
    ) -> Iterator[tuple[ModelVersion, NextChatPredictor]]:
        """``with store.use() as (version, predictor):`` the current version's predictor,
        loaded on first use, kept in the cache while the block runs and (``exclusive``)
        used by this block alone. Versions other than the newest loaded one leave the
        cache when their last user is done."""
        version = version or self.current_version()
        key = (str(version.path), version.name)
        entry = self._acquire(key)
        if entry is None:
            with self._load_lock:  # one load at a time; others wait here, not on _lock
                entry = self._acquire(key)
                if entry is None:
                    loaded = _Entry(self._load(version))
                    with self._lock:
                        loaded.users += 1
                        self._cache[key] = loaded
                        self._newest = key
                        self._evict_unused()
                    entry = loaded
        try:
            if exclusive:
                with entry.call_lock:
                    yield version, entry.predictor
            else:
                yield version, entry.predictor
        finally:
            with self._lock:
                entry.users -= 1
                self._evict_unused()

    def _acquire(self, key: tuple[str, str]) -> _Entry | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                entry.users += 1
            return entry

    def _evict_unused(self) -> None:
        for key in [k for k, e in self._cache.items() if e.users == 0 and k != self._newest]:
            logger.info("dropping model version %s from the cache", key[1])
            del self._cache[key]

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return [name for _, name in self._cache]

    def warm_up_in_background(self) -> threading.Thread:
        """Load the current version in a daemon thread (worker start), so the first
        ``/predict`` does not pay for it and ``/health`` answers meanwhile."""

        def run() -> None:
            try:
                self.get()
            except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
                # Not fatal: the first /predict raises the same error as a JSON reply.
                logger.error("could not preload the model: %s", exc)

        thread = threading.Thread(target=run, name="nextchat-model-preload", daemon=True)
        thread.start()
        return thread

    def _load(self, version: ModelVersion) -> NextChatPredictor:
        s = self.settings
        device = resolve_device(s.device)
        dtype = _DTYPES[s.dtype] if s.dtype and device != "cpu" else None
        if s.torch_threads:
            # Process-wide. More threads than free cores makes CPU inference many times
            # slower (threads spin at every op's barrier): measured 27x on 2 busy cores.
            torch.set_num_threads(s.torch_threads)
        t0 = time.perf_counter()
        predictor = NextChatPredictor.from_pretrained(
            version.path,
            device=device,
            dtype=dtype,
            max_new_tokens=s.max_new_tokens,
            mask_iou_threshold=s.mask_threshold,
            presence=s.score_presence,
            presence_threshold=s.presence_threshold,
        )
        self.loads += 1
        logger.info(
            "loaded model version %s from %s on %s in %.1f s",
            version.name,
            version.path,
            device,
            time.perf_counter() - t0,
        )
        return predictor


class _Entry:
    def __init__(self, predictor: NextChatPredictor) -> None:
        self.predictor = predictor
        self.users = 0
        self.call_lock = threading.Lock()
