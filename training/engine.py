"""The optimization step, on ``accelerate`` (one CPU process, one GPU, or several GPUs with
FSDP through ``accelerate launch``): precision, freezing, LoRA, gradient checkpointing.

The trainer, the benchmarks and the retraining workers all step the model through
:func:`prepare` and :func:`training_step`; nothing else calls ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from nextchat_core.config import LossConfig
from nextchat_core.device import PRECISIONS
from nextchat_core.modeling import NextChatModel, NextChatOutput

from .lora import LoraSettings, apply_lora
from .stages import StageSpec, apply_stage


@dataclass(frozen=True)
class EngineSettings:
    """How to run a stage. ``precision``: ``"fp32"`` or ``"bf16"`` (autocast; the frozen
    base weights may be stored in bf16, trainable ones are kept in float32)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None
    clip_norm: float = 1.0
    accumulate: int = 1
    compile: bool = False  # torch.compile the model (accelerate's dynamo backend "inductor")


def make_accelerator(settings: EngineSettings, *, cpu: bool = False) -> Accelerator:
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {settings.precision!r}")
    mixed = "bf16" if settings.precision == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed and state.get("num_processes", 1) == 1:
        # accelerate keeps ONE mixed precision per process and refuses another; a single
        # process (a worker, a bench) may train in both, so its state is started afresh.
        # (A launch of several processes has one precision, set by its launcher.)
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=settings.accumulate,
        cpu=cpu,
        dynamo_backend="inductor" if settings.compile else "no",
    )


def prepare(model: NextChatModel, spec: StageSpec, settings: EngineSettings) -> list[dict]:
    """Freeze ``model`` to ``spec``, add LoRA and gradient checkpointing if asked, upcast
    trainable weights to float32, and return the optimizer's parameter groups."""
    if settings.lora is not None:
        apply_lora(model, settings.lora)
    groups = apply_stage(
        model,
        spec,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        lora=settings.lora is not None,
    )
    for group in groups:
        for p in group["params"]:
            if p.dtype != torch.float32:
                p.data = p.data.float()  # master weights in fp32; autocast computes in bf16
    if settings.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()  # frozen towers stay in eval mode (NextChatModel.train)
    return groups


# An auxiliary objective: (model output, the ``aux_*`` batch tensors) -> weighted losses.
# An nn.Module objective may define ``attach(model)``; the trainer calls it once first.
AuxObjective = Callable[
    [NextChatOutput, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]
]


def training_step(
    accelerator: Accelerator,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    loss_weights: LossConfig,
    clip_norm: float | None,
    aux: AuxObjective | None = None,
) -> NextChatOutput:
    """One forward/backward (one micro-batch); the optimizer steps when accelerate's
    gradient accumulation says so. ``aux`` (small-model pre-training only) gets the output
    with hidden states and the ``aux_*`` tensors of the batch, and its losses are added."""
    aux_batch = {k: batch[k] for k in batch if k.startswith("aux_")}
    inputs = {k: v for k, v in batch.items() if not k.startswith("aux_")}
    with accelerator.accumulate(model):
        with accelerator.autocast():
            out: NextChatOutput = model(
                **inputs, loss_weights=loss_weights, return_hidden=aux is not None
            )
            if aux is not None:
                out.extra_losses = aux(out, inputs, aux_batch)
                out.loss = out.loss + sum(out.extra_losses.values())
        accelerator.backward(out.loss)
        if accelerator.sync_gradients and clip_norm:
            accelerator.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], clip_norm
            )
        optimizer.step()
        if scheduler is not None and accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out
