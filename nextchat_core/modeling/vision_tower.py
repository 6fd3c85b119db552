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
            auto_config = AutoConfig.for_model(config.hf_model_type, **config.extra)
            self.model = AutoModel.from_config(auto_config)
        self.pos_embed: nn.Parameter | None = None
        if config.position_embedding:
            if config.backbone == "clip":
                raise ValueError(
                    "vision.position_embedding is for conv backbones; CLIP has its own"
                )
            grid = config.image_size // config.patch_size
            self.pos_embed = nn.Parameter(sincos_2d(grid, config.hidden_size))

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
            feats = feats.flatten(2).transpose(1, 2)
            if self.pos_embed is not None:
                if feats.shape[1] != self.pos_embed.shape[0]:
                    raise ValueError(
                        f"vision tower yields {feats.shape[1]} cells but its position embedding "
                        f"has {self.pos_embed.shape[0]}: vision.patch_size must be the "
                        "backbone's total stride"
                    )
                feats = feats + self.pos_embed.to(feats.dtype)
            return feats
        if self.config.drop_cls:
            feats = feats[:, 1:]
        return feats


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (MAE's), ``(grid*grid) x dim``, row-major,
    scaled by 1/4: the starting point of the learned embedding, so position is readable
    from step 0 while the cells' content still dominates what attention matches on."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    out = [f(c.reshape(-1, 1) * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    return 0.25 * torch.cat(out, dim=1)
