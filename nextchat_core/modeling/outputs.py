"""Named outputs of :class:`~nextchat_core.modeling.NextChatModel`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class NextChatOutput:
    """Teacher-forced training forward.

    ``loss``: the weighted total (scalar). The parts are unweighted means; a part with no
    targets in the batch (no boxes, no masks) is ``None``.
    ``pred_boxes``: ``Mx4`` square-frame xyxy decoded at every ``<at>`` (row-major order,
    matching the ``<boxes>`` placeholders). ``at_hidden``: ``MxH`` the trigger hidden states.
    ``mask_logits``: ``KxSxS`` SAM-frame logits for the boxes that had mask targets;
    ``iou_predictions``: ``K``. ``logits``: ``BxTxV`` only when asked for.
    ``hidden_states`` (``BxTxH``, last layer, post-norm) and ``vision_features`` (``BxNxC``,
    the tower's selected layer) only with ``return_hidden``.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor | None = None
    l1_loss: torch.Tensor | None = None
    giou_loss: torch.Tensor | None = None
    cycle1_loss: torch.Tensor | None = None
    cycle2_loss: torch.Tensor | None = None
    focal_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    iou_loss: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    at_hidden: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    iou_predictions: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    # Weighted losses added by objectives outside the model (already included in ``loss``).
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def parts(self) -> dict[str, float]:
        """Loss parts as floats (for logs), skipping absent ones."""
        names = [
            "loss",
            "lm_loss",
            "l1_loss",
            "giou_loss",
            "cycle1_loss",
            "cycle2_loss",
            "focal_loss",
            "dice_loss",
            "iou_loss",
        ]
        out = {n: float(getattr(self, n).detach()) for n in names if getattr(self, n) is not None}
        out.update({n: float(v.detach()) for n, v in self.extra_losses.items()})
        return out


@dataclass
class GenerationOutput:
    """Greedy/sampled/beam generation for a batch of B prompts.

    ``sequences``: per row, the generated token ids (``<boxes>`` written after each
    ``<at>``, stopping at and including ``</s>``).
    ``boxes``: per row, ``kx4`` square-frame xyxy boxes in generation order.
    ``at_hidden``: per row, ``kxH`` trigger hidden states (for the mask path).
    ``box_scores``: per row, ``k`` probabilities of the ``<at>`` token at the step that
    produced it (the box confidence).
    ``truncated``: per row, whether ``max_new_tokens`` ended it before the model chose
    ``</s>`` (an answer that may have had more instances to list).
    """

    sequences: list[list[int]]
    boxes: list[torch.Tensor] = field(default_factory=list)
    at_hidden: list[torch.Tensor] = field(default_factory=list)
    box_scores: list[torch.Tensor] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)


@dataclass
class MaskOutput:
    """Masks for k boxes of one image: ``logits`` ``kxSxS`` in the SAM frame,
    ``iou_predictions`` ``k`` (SAM's IoU head)."""

    logits: torch.Tensor
    iou_predictions: torch.Tensor
