"""Which torch device to run on: one rule for the predictor, the trainer, the backend and
the workers (each passes its own default, e.g. ``"auto"`` for training)."""

from __future__ import annotations

import torch

# Training precisions: float32, or bf16 autocast (weights and optimizer stay float32) - on
# CUDA, or on a CPU, where it pays with AMX (bench/precision.py)
PRECISIONS = ("fp32", "bf16")


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


def cpu_description() -> dict[str, object]:
    """What a CPU timing was measured on: the model name, torch's threads, the kernels
    torch picked (``AVX512`` ...) and whether the CPU has AMX for bf16 (a bf16 matrix
    product several times a float32 one's speed there; ``bench/precision.py``)."""
    model = "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:  # not Linux: the model name stays unknown, the rest is torch's
        pass
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags,
    }
