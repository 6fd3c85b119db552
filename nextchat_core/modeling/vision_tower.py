"""The vision tower: a ``transformers`` encoder that yields patch features."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

from ..config import VisionConfig


class VisionTower(nn.Module):
    """CLIP (the released model) or any ``transformers`` vision backbone.

    ``forward``: ``Bx3xVxV`` normalized padded-square images -> ``BxNxC`` features of
    layer ``select_layer`` (CLS dropped for CLIP; conv feature maps flattened row-major).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "clip":
            hf = CLIPVisionConfig(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                image_size=config.image_size,
                patch_size=config.patch_size,
                **config.extra,
            )
            self.model = CLIPVisionModel(hf)
        else:
            hf = AutoConfig.for_model(config.hf_model_type, **config.extra)
            self.model = AutoModel.from_config(hf)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image (576 for CLIP ViT-L/14 at 336 px)."""
        if self.config.backbone == "clip":
            return self.config.num_patches + (0 if self.config.drop_cls else 1)
        with torch.no_grad():
            probe = torch.zeros(
                1,
                3,
                self.config.image_size,
                self.config.image_size,
                device=next(self.parameters()).device,
            )
            return int(self.forward(probe).shape[1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.select_layer]
        if feats.dim() == 4:  # conv backbones: BxCxhxw -> Bx(h*w)xC
            return feats.flatten(2).transpose(1, 2)
        if self.config.drop_cls:
            feats = feats[:, 1:]
        return feats
