"""Files written whole or not at all: the one atomic-write helper of the project."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, permissions: int = 0o644, **open_kw: Any
) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f:`` writes into a temp file beside ``path`` (unique
    per process and thread) and renames it over ``path`` when the block ends, so a reader
    sees the old file or the new one, never a partial write; when the block raises, the
    temp file is removed and ``path`` is untouched. ``permissions`` are the new file's mode
    (e.g. ``0o600`` for a file that holds a secret); ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if mode == "w":
        open_kw.setdefault("encoding", "utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, permissions)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, **kw: Any) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, **kw) as f:
        f.write(text)
