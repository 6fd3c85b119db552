"""Model versions under ``MODEL_DIR``: the one registry the backend serves from and the
retraining worker writes to.

Layout::

    MODEL_DIR/
      versions/<name>/      a complete checkpoint directory (config.json,
                            model.safetensors, tokenizer files) + version.json metadata
      staging/<name>/       a version being written; moved into versions/ in one rename
      current               one line: the <name> to serve; written atomically
                            (temp file + rename) AFTER versions/<name>/ is complete
      history.jsonl         promotions and rollbacks, oldest first (rollback replays it)

A reader never sees a half-written version: ``versions/<name>`` appears by an atomic
rename of a finished ``staging/<name>``, and ``current`` changes by another rename. Without
``current`` the base checkpoint is served (:func:`served_version`: the one answer to "which
version is served" for the backend and the workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextchat_core.files import atomic_write_text

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
CURRENT_FILE = "current"
VERSION_META = "version.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HISTORY_FILE = "history.jsonl"
STAGING_DIR = "staging"

# The small demo model shipped with the product (trained by `make demo-model`).
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "demo"


@dataclass(frozen=True)
class ModelVersion:
    """A servable model: its Label Studio ``model_version`` name and checkpoint dir."""

    name: str
    path: Path
    source: str  # "base" (the configured checkpoint) or "model_dir" (MODEL_DIR/versions)


def resolve_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """The base checkpoint directory: ``path``, else ``NEXTCHAT_CHECKPOINT``, else the
    bundled demo model; ``FileNotFoundError`` with a fix when none exists."""
    chosen = path or os.environ.get("NEXTCHAT_CHECKPOINT") or DEMO_CHECKPOINT
    chosen = Path(chosen)
    if not chosen.is_dir():
        hint = (
            "the bundled demo model is missing: run `make demo-model` to train it"
            if chosen == DEMO_CHECKPOINT
            else "pass --checkpoint DIR or set NEXTCHAT_CHECKPOINT to a checkpoint directory"
        )
        raise FileNotFoundError(f"no checkpoint at {chosen}: {hint}")
    return chosen


def base_version(checkpoint: str | os.PathLike | None = None) -> ModelVersion:
    """The base checkpoint (:func:`resolve_checkpoint`) as a version named
    ``<dir name>-<fingerprint>``."""
    path = resolve_checkpoint(checkpoint).resolve()
    return ModelVersion(f"{path.name}-{checkpoint_fingerprint(path)}", path, "base")


def stored_version(model_dir: str | os.PathLike[str], name: str) -> ModelVersion:
    """Version ``name`` under ``MODEL_DIR/versions``; ``FileNotFoundError`` when it holds
    no checkpoint."""
    path = version_dir(model_dir, name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{Path(model_dir) / CURRENT_FILE} names version {name!r} but {path} holds no "
            "checkpoint: fix the pointer or delete it to serve the base model"
        )
    return ModelVersion(name, path.resolve(), "model_dir")


def served_version(
    model_dir: str | os.PathLike[str], checkpoint: str | os.PathLike | None = None
) -> ModelVersion:
    """The version served now: the one ``MODEL_DIR/current`` names, else the base
    checkpoint ``checkpoint`` (:func:`base_version`)."""
    name = read_current_version(model_dir)
    return base_version(checkpoint) if name is None else stored_version(model_dir, name)


def default_model_dir() -> Path:
    """``MODEL_DIR`` when unset: ``$XDG_CACHE_HOME/nextchat-studio/models`` (the backend
    and the workers must agree on it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nextchat-studio" / "models"


def check_version_name(name: str) -> str:
    """``name`` if it is a safe version name (a directory name, no path tricks)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"version name {name!r} must be 1-128 characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def version_dir(model_dir: str | os.PathLike[str], name: str) -> Path:
    """``MODEL_DIR/versions/<name>``: where a trainer writes the checkpoint of ``name``."""
    return Path(model_dir) / VERSIONS_DIR / check_version_name(name)


def set_current_version(model_dir: str | os.PathLike[str], name: str) -> None:
    """Point ``MODEL_DIR/current`` at ``versions/<name>`` atomically (temp file + rename,
    so a reader sees the old name or the new one, never a partial write). Raises
    ``FileNotFoundError`` when that version has no checkpoint yet."""
    target = version_dir(model_dir, name)
    if not (target / "config.json").is_file():
        raise FileNotFoundError(
            f"{target} holds no checkpoint (config.json missing): write the version first"
        )
    atomic_write_text(Path(model_dir) / CURRENT_FILE, name + "\n")


def read_current_version(model_dir: str | os.PathLike[str]) -> str | None:
    """The version name ``MODEL_DIR/current`` points at, or ``None`` without a pointer."""
    pointer = Path(model_dir) / CURRENT_FILE
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    try:
        return check_version_name(text)
    except ValueError as exc:
        raise ValueError(f"{pointer}: {exc}; write a version name there") from None


def list_versions(model_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The checkpoints under ``MODEL_DIR/versions``, oldest first, each as
    ``{"name", "path", "created_at", **version.json}``."""
    root = Path(model_dir) / VERSIONS_DIR
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and _NAME.match(d.name) and (d / "config.json").is_file():
                meta: dict[str, Any] = {}
                if (d / VERSION_META).is_file():
                    try:
                        meta = json.loads((d / VERSION_META).read_text())
                    except (json.JSONDecodeError, OSError) as exc:
                        logger.warning("ignoring unreadable %s: %s", d / VERSION_META, exc)
                created = d.stat().st_mtime
                out.append({**meta, "name": d.name, "path": str(d), "created_at": created})
    out.sort(key=lambda v: (v["created_at"], v["name"]))
    return out


def checkpoint_fingerprint(path: Path) -> str:
    """8 hex digits that change when the checkpoint's files change (names, sizes,
    modification times): part of the base version name, so a retrained base checkpoint
    gets re-predicted by Label Studio."""
    h = hashlib.sha1()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:8]


def publish_version(
    model_dir: str | os.PathLike[str], staged: Path, name: str, meta: dict[str, Any]
) -> Path:
    """Move the finished checkpoint ``staged`` (under ``MODEL_DIR/staging``, the same file
    system) to ``versions/<name>`` in one rename, with ``meta`` as its version.json."""
    target = version_dir(model_dir, name)
    if target.exists():
        raise FileExistsError(f"model version {name!r} already exists at {target}")
    if not (staged / "config.json").is_file():
        raise FileNotFoundError(f"{staged} holds no checkpoint (config.json missing)")
    (staged / VERSION_META).write_text(json.dumps({**meta, "name": name}, indent=2, default=str))
    _fsync_tree(staged)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, target)
    return target


def staging_dir(model_dir: str | os.PathLike[str], name: str) -> Path:
    """``MODEL_DIR/staging/<name>``, emptied: where a version is written before it is
    published (a crash leaves it here, never in ``versions/``)."""
    path = Path(model_dir) / STAGING_DIR / check_version_name(name)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def promote(model_dir: str | os.PathLike[str], name: str, *, reason: str = "manual") -> None:
    """Serve version ``name`` from the next request on, and record it in the history."""
    set_current_version(model_dir, name)
    _append_history(model_dir, {"action": "promote", "name": name, "reason": reason})


def rollback(model_dir: str | os.PathLike[str]) -> str | None:
    """Serve the version promoted before the current one (skipping pruned ones), or the
    base checkpoint when there is none; returns the name now served (``None``: base)."""
    stack = promotion_stack(model_dir)
    current = read_current_version(model_dir)
    if current is None:
        raise ValueError("nothing to roll back: the base checkpoint is being served")
    while stack and stack[-1] == current:
        stack.pop()
    target = next(
        (n for n in reversed(stack) if (version_dir(model_dir, n) / "config.json").is_file()), None
    )
    if target is None:
        (Path(model_dir) / CURRENT_FILE).unlink(missing_ok=True)
    else:
        set_current_version(model_dir, target)
    _append_history(model_dir, {"action": "rollback", "name": target, "from": current})
    return target


def promotion_stack(model_dir: str | os.PathLike[str]) -> list[str]:
    """The history replayed: each promotion pushes its version, each rollback pops back to
    its target; the last entry is what ``current`` should name."""
    stack: list[str] = []
    for event in history(model_dir):
        if event.get("action") == "promote":
            stack.append(event["name"])
        elif event.get("action") == "rollback":
            target = event.get("name")
            while stack and stack[-1] != target:
                stack.pop()
    return stack


def history(model_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Promotions and rollbacks, oldest first."""
    path = Path(model_dir) / HISTORY_FILE
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping an unreadable line", path, n)
    return out


def prune_versions(model_dir: str | os.PathLike[str], keep: int) -> list[str]:
    """Delete the oldest versions beyond the newest ``keep`` (``keep`` >= 1), never the
    current one nor the one a rollback would return to; returns the names removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 version, got {keep}")
    current = read_current_version(model_dir)
    stack = [n for n in promotion_stack(model_dir) if n != current]
    protected = {current, stack[-1] if stack else None}
    versions = list_versions(model_dir)
    removable = [v["name"] for v in versions[: max(0, len(versions) - keep)]]
    removed = []
    for name in removable:
        if name in protected:
            continue
        shutil.rmtree(version_dir(model_dir, name))
        removed.append(name)
    if removed:
        logger.info("pruned model versions %s (keeping %d)", removed, keep)
    return removed


def _append_history(model_dir: str | os.PathLike[str], event: dict[str, Any]) -> None:
    path = Path(model_dir) / HISTORY_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({**event, "at": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
