"""Pointing supervision: at each answer ``<at>``, one attention head of the LLM's last layer
puts its attention on the image tokens of the object the answer refers to.

The bundled demo model is trained with it (``training.demo.DemoAux``: its last layer's
first head is the one ``<at>`` reads the referred object's cells with); a retraining job
can keep teaching that routing from the corrected boxes (``RETRAIN_POINT``). It is a loss
on the attention weights, with no parameters of its own, and needs nothing the batch does
not hold: the cells come from each ``<at>``'s own box in the padded square frame.

Written here, not taken from a library: attention supervision of this kind has no
maintained implementation for a Hugging Face decoder (it is a few lines on the weights the
eager attention already returns).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nextchat_core.config import NextChatConfig
from nextchat_core.modeling import NextChatOutput


def at_positions(
    ids: torch.Tensor, patches: torch.Tensor, at_id: int
) -> list[tuple[int, int, int]]:
    """``(k, row, position)`` of every ``<at>`` after the image (the answer's; a region
    caption's ``<at>`` is in the question), ``k`` its index among all ``<at>`` in
    row-major order (the order of the batch's boxes)."""
    last_patch = [int(r.nonzero()[-1, 0]) for r in patches]
    return [
        (k, b, p) for k, (b, p) in enumerate((ids == at_id).nonzero().tolist()) if p > last_patch[b]
    ]


def pointing_loss(attention_row: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``-log`` of the attention mass (one query's weights over the image tokens) on
    ``cells`` (1 on the referred object's cells, 0 elsewhere)."""
    return -torch.log((attention_row.float() * cells).sum() + 1e-6)


def box_cells(box: torch.Tensor, grid: int, min_cover: float = 0.25) -> torch.Tensor:
    """The ``grid x grid`` cells (row-major, over the padded square) that a box in the
    square frame (``x1, y1, x2, y2`` in ``[0, 1]``) covers by at least ``min_cover`` of
    their area; for a box smaller than that, the one cell it covers most."""
    edges = torch.arange(grid + 1, device=box.device, dtype=torch.float32) / grid
    lo, hi = edges[:-1], edges[1:]
    x1, y1, x2, y2 = (float(v) for v in box)
    ox = (hi.clamp(max=x2) - lo.clamp(min=x1)).clamp(min=0)
    oy = (hi.clamp(max=y2) - lo.clamp(min=y1)).clamp(min=0)
    cover = (oy[:, None] * ox[None, :] * grid * grid).reshape(-1)
    cells = (cover >= min_cover).float()
    if cells.sum() == 0:
        cells[int(cover.argmax())] = 1.0
    return cells


class PointingObjective(nn.Module):
    """An auxiliary objective for :func:`training.trainer.train`: ``weight`` x the mean
    :func:`pointing_loss` of head ``head`` of the last LLM layer over every answer ``<at>``
    of the batch, its cells from that ``<at>``'s box (:func:`box_cells`). Training runs the
    LLM's attention in eager mode to have the weights (inference keeps SDPA)."""

    def __init__(self, config: NextChatConfig, weight: float, head: int = 0) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"the pointing weight must be > 0, got {weight}")
        if not 0 <= head < config.llm.num_heads:
            raise ValueError(f"head must be in [0, {config.llm.num_heads}), got {head}")
        self.weight, self.head = weight, head
        self.im_patch_id, self.at_id = config.tokens.im_patch_id, config.tokens.at_id
        self._attention: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        lm: Any = model.language_model
        lm.config._attn_implementation = "eager"

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._attention = output[1]

        lm.model.layers[-1].self_attn.register_forward_hook(keep)

    def forward(
        self, out: NextChatOutput, inputs: dict[str, torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        attention, self._attention = self._attention, None
        ids, boxes = inputs["input_ids"], inputs.get("boxes")
        if attention is None or boxes is None:
            return {}
        patches = ids == self.im_patch_id
        n = int(patches[0].sum())
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(
                f"pointing needs a square grid of image tokens, this model has {n}; "
                "unset RETRAIN_POINT for it"
            )
        terms = [
            pointing_loss(attention[b, self.head, p, patches[b]], box_cells(boxes[k], grid))
            for k, b, p in at_positions(ids, patches, self.at_id)
        ]
        if not terms:
            return {}
        return {"aux_point": self.weight * torch.stack(terms).mean()}
