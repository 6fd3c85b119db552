"""Where the model comes from: the checkpoint and device settings, resolved in one place.

Order: an explicit argument, then ``NEXTCHAT_CHECKPOINT`` / ``NEXTCHAT_DEVICE``, then the
bundled demo checkpoint / CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The small demo model shipped with the product (trained by `make demo-model`).
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "demo"


def resolve_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory to use; ``FileNotFoundError`` with a fix when none exists."""
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


def resolve_device(device: str | None = None) -> str:
    """``cpu`` or ``cuda`` (from the argument or ``NEXTCHAT_DEVICE``; default ``cpu``)."""
    chosen = (device or os.environ.get("NEXTCHAT_DEVICE") or "cpu").lower()
    if chosen not in ("cpu", "cuda") and not chosen.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {chosen!r}")
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {chosen!r} was asked for but torch sees no CUDA device; use cpu")
    return chosen
