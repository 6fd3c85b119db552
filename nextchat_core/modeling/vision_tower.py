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
        self.fuse: StageFusion | None = None
        if config.fuse_previous_stage:
            sizes = list(getattr(auto_config, "hidden_sizes", []))
            if len(sizes) < 2:
                raise ValueError(
                    "vision.fuse_previous_stage needs a staged conv backbone whose config has "
                    f"hidden_sizes (>= 2 stages); {config.hf_model_type!r} has {sizes}"
                )
            # hidden_states = (stem, stage 1, ..., stage n): select_layer -1 is stage n.
            n = len(sizes)
            last = config.select_layer % (n + 1)
            if last < 2:
                raise ValueError(
                    f"vision.select_layer {config.select_layer} leaves no earlier stage to fuse"
                )
            self.fuse = StageFusion(sizes[last - 2], sizes[last - 1], self.map_channels)
        self.pos_embed: nn.Parameter | None = None
        if config.position_embedding:
            if config.backbone == "clip":
                raise ValueError(
                    "vision.position_embedding is for conv backbones; CLIP has its own"
                )
            grid = config.image_size // config.patch_size
            self.pos_embed = nn.Parameter(sincos_2d(grid, config.hidden_size))

    @property
    def map_channels(self) -> int:
        """Channels of the conv feature map before the token merge."""
        return self.config.hidden_size // self.config.token_merge**2

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

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Non-CLIP backbones: the selected hidden state before the token merge - for conv
        backbones the ``BxCxhxw`` map (``C`` = :attr:`map_channels`, 16x16 for the demo)."""
        if self.config.backbone == "clip":
            raise RuntimeError("feature_map is for conv backbones; CLIP yields tokens")
        pixel_values = channels_last_on_cpu(self, pixel_values)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.select_layer]
        if self.fuse is not None:
            previous = out.hidden_states[self.config.select_layer - 1]
            feats = self.fuse(previous, feats)  # B x C x 2h x 2w
        return feats

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.backbone == "clip":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            feats = out.hidden_states[self.config.select_layer]
        else:
            feats = self.feature_map(pixel_values)
        if feats.dim() == 4:  # conv backbones: BxCxhxw -> Bx(h*w)xC
            k = self.config.token_merge
            if k > 1:  # space-to-depth: B x C x h x w -> B x (C*k*k) x h/k x w/k
                b, c, h, w = feats.shape
                feats = feats.reshape(b, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)
                feats = feats.reshape(b, k * k * c, h // k, w // k)  # block-major channels
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


def channels_last_on_cpu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """On CPU, put ``module``'s 4-D weights and the ``BxCxHxW`` input ``x`` in channels-last
    memory format (once for the weights) and return ``x`` so. CPU conv kernels run several
    times faster so - measured here: the demo's ResNet 0.91 -> 0.51 s, its SAM encoder
    1.77 -> 0.40 s per batch of 8 - with the same numbers up to float rounding. Weights
    loaded from a checkpoint arrive contiguous, hence the check at call time."""
    if x.device.type != "cpu" or x.dim() != 4:
        return x
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous(memory_format=torch.channels_last):
        module.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


class StageFusion(nn.Module):
    """Stride-16 tokens from two conv stages: ``BxC1x2hx2w`` (the earlier stage) and
    ``BxC2xhxw`` (the later, upsampled x2 nearest) -> concatenated -> 3x3 conv + BatchNorm +
    ReLU -> 1x1 conv -> ``BxDx2hx2w``. (The perception trial's "stage-3 + stage-4 fusion":
    at stride 32 small objects lose their cell; at stride 16 alone they lose context.)"""

    def __init__(self, early_channels: int, late_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(early_channels + late_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1),
        )

    def forward(self, early: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(late, size=early.shape[-2:], mode="nearest")
        return self.mix(torch.cat([early, up], dim=1))


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
