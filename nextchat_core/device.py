"""Which torch device to run on: one rule for the predictor, the trainer, the backend and
the workers (each passes its own default, e.g. ``"auto"`` for training)."""

from __future__ import annotations

import torch


def resolve_device(name: str | None = None) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for ``name`` (``None``: cpu; ``"auto"``: cuda
    when torch sees one, else cpu). ``ValueError`` for another name, or for cuda when torch
    sees no CUDA device."""
    chosen = (name or "cpu").strip().lower()
    if chosen == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if chosen not in ("cpu", "cuda") and not chosen.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {chosen!r}")
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {chosen!r} was asked for but torch sees no CUDA device; use 'cpu' or 'auto'"
        )
    return chosen
