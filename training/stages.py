"""NExT-Chat's training stages as configuration: which modules train, which losses count.

| stage | what it is | trainable | losses |
|---|---|---|---|
| 0 | stand-in pre-training for small models with no pretrained CLIP/SAM | everything | all |
| 1 | pre-training: box decoding + chat | all but CLIP and SAM | LM + box + cycle |
| 2 | instruction tuning | all but CLIP and SAM | LM + box + cycle |
| 3 | segmentation | ``seg_prompt_mlp`` + SAM mask decoder | mask only |

(NExT-Chat: stages 1-2 train all but CLIP; SAM is unused there, so it is left frozen
rather than given optimizer state. Stage 3 freezes everything but the prompt MLP and
SAM's mask decoder.) A stage is a :class:`StageSpec`; nothing else in the trainer
branches on the stage number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from nextchat_core.config import LossConfig

_TEXT_BOX = {"focal": 0.0, "dice": 0.0, "iou": 0.0}
_MASK_ONLY = {"lm": 0.0, "l1": 0.0, "giou": 0.0, "cycle1": 0.0, "cycle2": 0.0}


@dataclass(frozen=True)
class StageSpec:
    """One stage. ``trainable``: module-name prefixes that train (all others frozen).
    ``loss``: overrides of :class:`LossConfig` weights. ``lr_scale``: per-prefix
    learning-rate multipliers. ``masks``: whether mask targets are fed."""

    stage: int
    description: str
    trainable: tuple[str, ...]
    loss: dict[str, float] = field(default_factory=dict)
    lr_scale: dict[str, float] = field(default_factory=dict)
    masks: bool = True

    def loss_weights(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(base, **self.loss)


STAGES: dict[int, StageSpec] = {
    0: StageSpec(
        0,
        "pre-train the small vision tower and SAM (stand-in for released weights)",
        trainable=(
            "vision_tower",
            "mm_projector",
            "language_model",
            "loc_encoder",
            "loc_decoder",
            "seg_prompt_mlp",
            "sam",
        ),
    ),
    1: StageSpec(
        1,
        "pre-train box decoding and chat (all but CLIP)",
        trainable=("mm_projector", "language_model", "loc_encoder", "loc_decoder"),
        loss=_TEXT_BOX,
        masks=False,
    ),
    2: StageSpec(
        2,
        "instruction tuning (all but CLIP)",
        trainable=("mm_projector", "language_model", "loc_encoder", "loc_decoder"),
        loss=_TEXT_BOX,
        masks=False,
    ),
    3: StageSpec(
        3,
        "segmentation: only seg_prompt_mlp and SAM's mask decoder",
        trainable=("seg_prompt_mlp", "sam.mask_decoder"),
        loss=_MASK_ONLY,
        masks=True,
    ),
}


def get_stage(stage: int) -> StageSpec:
    try:
        return STAGES[int(stage)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}") from None


def apply_stage(
    model: nn.Module, spec: StageSpec, *, lr: float, weight_decay: float = 0.0, lora: bool = False
) -> list[dict]:
    """Freeze ``model`` to the stage and return AdamW parameter groups (one per trainable
    prefix, each with its own learning rate; a parameter under two prefixes, e.g.
    ``language_model`` and ``language_model.model.embed_tokens``, belongs to the longer).

    With ``lora=True`` the language model's base weights stay frozen and only its LoRA
    adapters train (:mod:`training.lora` must have been applied first).
    """
    model.requires_grad_(False)

    def owner(name: str) -> str | None:  # the longest trainable prefix of ``name``
        hits = [p for p in spec.trainable if name == p or name.startswith(p + ".")]
        return max(hits, key=len) if hits else None

    names = [n for n, _ in model.named_parameters()]
    unknown = [
        p for p in (*spec.trainable, *spec.lr_scale) if not any(owner(n) == p for n in names)
    ]
    if unknown:  # a typo would otherwise train nothing there, silently
        top = sorted({n.split(".")[0] for n in names})
        raise ValueError(
            f"stage {spec.stage}: no parameter of the model is under {unknown} (trainable "
            f"{list(spec.trainable)}, lr scales {sorted(spec.lr_scale)}); module names start "
            f"with one of {top}"
        )
    groups = []
    for prefix in spec.trainable:
        params = []
        for name, p in model.named_parameters():
            if owner(name) != prefix:
                continue
            if lora and name.startswith("language_model.") and "lora_" not in name:
                continue
            p.requires_grad_(True)
            params.append(p)
        if params:
            groups.append(
                {
                    "name": prefix,
                    "params": params,
                    "lr": lr * spec.lr_scale.get(prefix, 1.0),
                    "weight_decay": weight_decay,
                }
            )
    if not groups:
        raise ValueError(f"stage {spec.stage} trains nothing: no parameters match {spec.trainable}")
    return groups
