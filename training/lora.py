"""LoRA on the language model through ``peft`` (the public NExT-Chat code has none; it is
what makes retraining the 7B model on one GPU possible), and merging it back into a plain
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_TARGETS


def apply_lora(model: nn.Module, settings: LoraSettings = LoraSettings()) -> nn.Module:
    """Inject LoRA adapters into ``model.language_model`` in place (module names keep their
    places, so the NExT-Chat forward is unchanged). Returns ``model``."""
    if has_lora(model):
        raise RuntimeError("LoRA is already applied to this model")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
    )
    inject_adapter_in_model(config, model.get_submodule("language_model"))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base Linear (peft's ``merge``) and put the plain
    Linear back, so the state dict is the plain model's again. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
