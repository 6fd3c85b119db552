"""SAM image-encoder attention on PyTorch's fused ``scaled_dot_product_attention``.

segment-anything 1.0's ``Attention`` materializes the ``(B*heads) x HW x HW`` attention
matrix and adds its decomposed relative-position bias to it, which at SAM-H's global
blocks (64x64 = 4096 tokens, 16 heads) is several hundred MB of memory traffic per image.
The bias is ``rel_h[i, kh(j)] + rel_w[i, kw(j)]``, a sum of two terms that each depend on
one key coordinate, so it folds into the dot product: append ``rel_h`` and ``rel_w`` to
the query and one-hot key coordinates to the key, and the fused SDPA kernel computes
exactly ``softmax(scale * q.k + bias) v`` without the matrix (the approach of
pytorch-labs/segment-anything-fast). The relative positions come from the library's own
``get_rel_pos``; parameters and state-dict keys are the library's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


class SdpaAttention(Attention):
    """Drop-in for ``segment_anything.modeling.image_encoder.Attention`` (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x HW x C
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            c = q.shape[-1]
            rh = get_rel_pos(H, H, self.rel_pos_h).to(q.dtype)  # H x H x C
            rw = get_rel_pos(W, W, self.rel_pos_w).to(q.dtype)  # W x W x C
            r_q = q.reshape(B, heads, H, W, c)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(B, heads, H * W, H)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(B, heads, H * W, W)
            eye_h = torch.eye(H, dtype=q.dtype, device=q.device)
            eye_w = torch.eye(W, dtype=q.dtype, device=q.device)
            key_h = (
                eye_h[:, None, :].expand(H, W, H).reshape(1, 1, H * W, H).expand(B, heads, -1, -1)
            )
            key_w = (
                eye_w[None, :, :].expand(H, W, W).reshape(1, 1, H * W, W).expand(B, heads, -1, -1)
            )
            q_aug = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
            k_aug = torch.cat([k, key_h, key_w], dim=-1)
            # Fused kernels want q, k and v of one head size: pad v, drop the padding after.
            v_aug = F.pad(v, (0, q_aug.shape[-1] - c))
            out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :c]
        out = out.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def use_sdpa_attention(image_encoder: torch.nn.Module) -> int:
    """Switch every attention block of a SAM ``ImageEncoderViT`` to :class:`SdpaAttention`
    in place (parameters untouched). Returns how many blocks were switched."""
    n = 0
    for module in image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = SdpaAttention
            n += 1
    return n
