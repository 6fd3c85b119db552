"""Every NExT-Chat loss, in one place.

Stages 1-2 (public code): ``lm + 2 * L1 + 0.2 * GIoU + cycle1 + cycle2``, where
``cycle1 = MSE(loc_encoder(pred_box), h_at)`` and
``cycle2 = L1(loc_decoder(loc_encoder(b)), b)`` over the input boxes. GIoU only on
boxes with ``x2 >= x1`` and ``y2 >= y1`` (the decoder has no sigmoid or clamp, so early
predictions can be inverted). Stage 3: ``20 * focal(alpha 0.8, gamma 2) + dice(smooth 1)
+ MSE(predicted IoU, actual IoU)``. Weights come from :class:`~nextchat_core.config.LossConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .conversation import IGNORE_INDEX


def lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module
) -> torch.Tensor | None:
    """Next-token cross-entropy, or ``None`` when no position carries a label.
    ``hidden``: ``BxTxH`` LLM outputs; ``labels``: ``BxT`` aligned with the inputs (shifted
    here), ``IGNORE_INDEX`` where no loss is taken. Logits are computed only where a label
    is taken: the 32k-vocab projection of every position would dominate memory for long
    image prompts."""
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    if not sel.any():
        return None
    logits = lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), target[sel])


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, GIoU-loss)`` means of ``Nx4`` square-frame xyxy boxes. GIoU is taken only on
    well-formed predicted boxes (x2 >= x1, y2 >= y1), zero when there are none."""
    pred = pred.float()
    target = target.float()
    l1 = F.l1_loss(pred, target)
    valid = (pred[:, 2] >= pred[:, 0]) & (pred[:, 3] >= pred[:, 1])
    if valid.any():
        giou = generalized_box_iou_loss(pred[valid], target[valid], reduction="mean")
    else:
        giou = pred.sum() * 0.0
    return l1, giou


def cycle1_loss(encoded_pred: torch.Tensor, h_at: torch.Tensor) -> torch.Tensor:
    """``MSE(loc_encoder(pred_box), h_at)``: the predicted box, encoded again, should give
    back the ``<at>`` hidden state it was decoded from (both ``MxH``)."""
    return F.mse_loss(encoded_pred.float(), h_at.float())


def cycle2_loss(round_trip: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``L1(loc_decoder(loc_encoder(b)), b)`` over the ``Mx4`` square-frame input boxes."""
    return F.l1_loss(round_trip.float(), boxes.float())


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss per mask, averaged. ``logits``/``targets``: ``NxHxW``."""
    probs = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    inter = (probs * t).sum(-1)
    return (1.0 - (2.0 * inter + smooth) / (probs.sum(-1) + t.sum(-1) + smooth)).mean()


def mask_iou_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU (``N``) of the binarized predicted masks (logit > 0) with ``NxHxW`` targets."""
    pred = logits > 0
    t = targets > 0.5
    inter = (pred & t).flatten(1).sum(-1).float()
    union = (pred | t).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    iou_pred: torch.Tensor,
    *,
    alpha: float = 0.8,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(focal, dice, iou_mse)`` for ``NxHxW`` mask logits in the SAM frame, ``NxHxW``
    0/1 targets and ``N`` predicted IoUs; the actual IoU target carries no gradient."""
    logits = logits.float()
    targets = targets.float()
    focal = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
    dice = dice_loss(logits, targets)
    with torch.no_grad():
        actual = mask_iou_from_logits(logits, targets)
    iou = F.mse_loss(iou_pred.float().reshape(-1), actual)
    return focal, dice, iou
