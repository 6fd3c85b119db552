"""NExT-Chat's released checkpoint layout: its key names, its shapes and the config they imply.

A released directory (``AoZhang/nextchat-7b-336``, or anything written the same way by the
official code) holds a HF ``config.json`` (``model_type: nextchat``) that names only the
LLaMA sizes, ``pytorch_model-*.bin`` shards with every other part, and a SentencePiece
tokenizer with the five added tokens. :func:`released_config` derives this project's
config from all three, so a directory of any size loads through the plain user path; what
no file records is taken from a named source and reported (``DerivedConfig.sources``).
Nothing here reads weights: :mod:`nextchat_core.build` does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import NextChatConfig, get_preset

RELEASED_INDEX = "pytorch_model.bin.index.json"
RELEASED_VISION_PREFIX = "model.vision_tower.vision_model."
_VISION = "model.vision_tower."
_SAM = "sam.model."
# Buffers that old transformers versions saved and this model recomputes.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
    "embeddings.position_ids",
)
# Attention heads are the one size a state dict does not record. The released towers'
# own values (CLIP ViT-L/14: 16 heads of 64; segment-anything's mask decoder: 8 heads at
# width 256, hard-coded in its builders) are used for those widths.
_KNOWN_CLIP_HEADS = {1024: 16, 768: 12}
_SAM_DECODER_HEADS = {256: 8}


def map_released_key(key: str, own_keys: Iterable[str] | None = None) -> str | None:
    """Released NExT-Chat state-dict key -> this model's key; ``None`` for buffers this model
    recomputes (rotary caches, position ids).

    ``own_keys`` resolves the CLIP prefix, whose nesting differs across transformers
    versions (``vision_model.`` was flattened away in 5.x).
    """
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower.") :]
        candidates = [f"vision_tower.model.{rest}"]
        if rest.startswith("vision_model."):
            candidates.append(f"vision_tower.model.{rest[len('vision_model.') :]}")
        if own_keys is not None:
            own = set(own_keys)
            for c in candidates:
                if c in own:
                    return c
        return candidates[-1]
    if key.startswith("model.mm_projector."):
        return key[len("model.") :]
    if key.startswith("model."):
        return f"language_model.{key}"
    if key.startswith("lm_head."):
        return f"language_model.{key}"
    if key.startswith("sam.model."):
        return "sam." + key[len("sam.model.") :]
    if key.startswith(("loc_encoder.", "loc_decoder.", "seg_prompt_mlp.")):
        return key
    raise ValueError(f"unexpected key in a released NExT-Chat checkpoint: {key!r}")


@dataclass
class KeyReport:
    """How a released state dict (or manifest of shapes) covers this model."""

    mapped: int = 0
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # theirs, not in ours
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mapped": self.mapped,
            "ignored": len(self.ignored),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "missing_keys": self.missing[:20],
            "unexpected_keys": self.unexpected[:20],
            "mismatched_keys": self.mismatched[:20],
        }


def check_released_shapes(
    model: nn.Module, shapes: Mapping[str, Iterable[int]], *, include_vision: bool = True
) -> KeyReport:
    """Compare a released checkpoint's ``{key: shape}`` with this model's tensors.

    ``include_vision=False`` expects CLIP to come from elsewhere (its keys are neither
    required from ``shapes`` nor counted as missing).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = KeyReport()
    covered: set[str] = set()
    for key, shape in shapes.items():
        target = map_released_key(key, own)
        if target is None:
            report.ignored.append(key)
            continue
        if target not in own:
            report.unexpected.append(key)
            continue
        covered.add(target)
        if tuple(shape) != own[target]:
            report.mismatched.append(
                f"{key}: checkpoint {list(shape)} vs model {list(own[target])}"
            )
        else:
            report.mapped += 1
    for k in own:
        if k not in covered and (include_vision or not k.startswith("vision_tower.")):
            report.missing.append(k)
    return report


@dataclass
class DerivedConfig:
    """A released directory's config and, per derived field, where its value came from
    (``config.json``, ``shapes``, ``tokenizer``, ``clip config``, ``preset`` or
    ``assumed: ...``)."""

    config: NextChatConfig
    sources: dict[str, str] = field(default_factory=dict)
    clip_dir: Path | None = None  # the separate CLIP directory found, if any


def released_config(
    hf_config: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    clip_config: Mapping[str, Any] | None = None,
    token_ids: Mapping[str, int] | None = None,
) -> DerivedConfig:
    """This project's config for a released ``config.json`` (``model_type: nextchat``).

    ``shapes`` (``{released key: shape}``) give the CLIP, projector, location, SAM and
    ``seg_prompt_mlp`` sizes; ``clip_config`` (the separate CLIP directory's
    ``config.json``) gives CLIP's when the shards hold no CLIP; ``token_ids`` (the
    tokenizer's ``added_tokens.json``) the five added-token ids. Whatever is not given
    keeps the 7B-336 release's value.
    """
    if hf_config.get("model_type") != "nextchat":
        raise ValueError(
            f"expected a NExT-Chat config.json (model_type 'nextchat'), got "
            f"model_type {hf_config.get('model_type')!r}"
        )
    cfg = get_preset("nextchat-7b-336")
    src: dict[str, str] = {}

    def put(obj: Any, name: str, value: Any, source: str, where: str) -> None:
        if value is not None:
            setattr(obj, name, value)
            src[f"{where}.{name}"] = source

    llm = cfg.llm
    for name, key in [
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("vocab_size", "vocab_size"),
        ("max_position_embeddings", "max_position_embeddings"),
        ("rms_norm_eps", "rms_norm_eps"),
        ("rope_theta", "rope_theta"),
        ("tie_word_embeddings", "tie_word_embeddings"),
    ]:
        put(llm, name, hf_config.get(key), "config.json", "llm")
    put(
        llm,
        "num_kv_heads",
        hf_config.get("num_key_value_heads", hf_config.get("num_attention_heads")),
        "config.json",
        "llm",
    )
    tokens = cfg.tokens
    for name, key in [("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")]:
        put(tokens, name, hf_config.get(key), "config.json", "tokens")
    # The official code pads with <unk> (id 0); a null pad_token_id means just that.
    put(tokens, "pad_id", hf_config.get("pad_token_id") or 0, "config.json", "tokens")
    for text, name in zip(
        tokens.added_tokens(), ["im_patch", "im_start", "im_end", "at", "boxes"], strict=True
    ):
        put(tokens, f"{name}_id", (token_ids or {}).get(text), "tokenizer", "tokens")

    vision = cfg.vision
    put(vision, "select_layer", hf_config.get("mm_vision_select_layer"), "config.json", "vision")
    put(cfg.projector, "depth", hf_config.get("mm_depth"), "config.json", "projector")
    tower = str(hf_config.get("mm_vision_tower", ""))
    shapes = shapes or {}
    sam_head_dim = _derive_sam(cfg, shapes, put)
    if any(k.startswith(_VISION) for k in shapes):
        _derive_clip_from_shapes(cfg, shapes, put)
    elif clip_config is not None:
        for name, key in [
            ("hidden_size", "hidden_size"),
            ("num_layers", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"),
            ("intermediate_size", "intermediate_size"),
            ("image_size", "image_size"),
            ("patch_size", "patch_size"),
        ]:
            put(vision, name, clip_config.get(key), "clip config", "vision")
    else:
        put(vision, "hidden_size", hf_config.get("mm_hidden_size"), "config.json", "vision")
        if "224" in tower:  # AoZhang/nextchat-7b uses CLIP ViT-L/14 at 224 px
            put(vision, "image_size", 224, "config.json (mm_vision_tower name)", "vision")
    if clip_config is not None and clip_config.get("num_attention_heads"):
        put(vision, "num_heads", clip_config["num_attention_heads"], "clip config", "vision")
    elif vision.hidden_size in _KNOWN_CLIP_HEADS:
        put(vision, "num_heads", _KNOWN_CLIP_HEADS[vision.hidden_size], "preset", "vision")
    elif sam_head_dim and vision.hidden_size % sam_head_dim == 0:
        put(
            vision,
            "num_heads",
            vision.hidden_size // sam_head_dim,
            f"assumed: head width {sam_head_dim} of the SAM image encoder (no CLIP config)",
            "vision",
        )
    _derive_heads(cfg, shapes, put)
    if "projector.depth" not in src and shapes:
        depth = len({k for k in shapes if re.fullmatch(r"model\.mm_projector\.\d+\.weight", k)})
        put(cfg.projector, "depth", depth or None, "shapes", "projector")

    cfg.preset = "custom"
    for name in ("nextchat-7b-336",):
        if cfg.to_dict() | {"preset": name} == get_preset(name).to_dict():
            cfg.preset = name
    if cfg.preset == "custom" and vision.image_size == 224 and llm.hidden_size == 4096:
        cfg.preset = "nextchat-7b"
    cfg.validate()
    return DerivedConfig(cfg, src)


def _derive_clip_from_shapes(
    cfg: NextChatConfig, shapes: Mapping[str, Sequence[int]], put: Any
) -> None:
    prefix = (
        RELEASED_VISION_PREFIX
        if any(k.startswith(RELEASED_VISION_PREFIX) for k in shapes)
        else _VISION
    )
    patch = shapes.get(prefix + "embeddings.patch_embedding.weight")  # [width, 3, p, p]
    pos = shapes.get(prefix + "embeddings.position_embedding.weight")  # [1 + n, width]
    fc1 = shapes.get(prefix + "encoder.layers.0.mlp.fc1.weight")  # [inner, width]
    layers = _count(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    vision = cfg.vision
    if patch is not None:
        put(vision, "hidden_size", int(patch[0]), "shapes", "vision")
        put(vision, "patch_size", int(patch[2]), "shapes", "vision")
        if pos is not None:
            side = math.isqrt(int(pos[0]) - 1)
            put(vision, "image_size", side * int(patch[2]), "shapes", "vision")
    put(vision, "num_layers", layers or None, "shapes", "vision")
    put(vision, "intermediate_size", int(fc1[0]) if fc1 else None, "shapes", "vision")


def _derive_sam(cfg: NextChatConfig, shapes: Mapping[str, Sequence[int]], put: Any) -> int | None:
    """SAM and the location / prompt MLP sizes; returns the SAM encoder's head width."""
    sam = cfg.sam
    g = shapes.get
    proj = g(_SAM + "image_encoder.patch_embed.proj.weight")  # [embed, 3, p, p]
    pos = g(_SAM + "image_encoder.pos_embed")  # [1, grid, grid, embed]
    head_dim = None
    if proj is not None:
        put(sam, "encoder_embed_dim", int(proj[0]), "shapes", "sam")
        put(sam, "patch_size", int(proj[2]), "shapes", "sam")
        if pos is not None:
            put(sam, "image_size", int(pos[1]) * int(proj[2]), "shapes", "sam")
        depth = _count(shapes, re.escape(_SAM) + r"image_encoder\.blocks\.(\d+)\.")
        put(sam, "encoder_depth", depth or None, "shapes", "sam")
        rel = [g(_SAM + f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
        if rel and all(r is not None for r in rel):
            grid = sam.image_size // sam.patch_size
            head_dim = int(rel[0][1])  # type: ignore[index]
            put(sam, "encoder_num_heads", sam.encoder_embed_dim // head_dim, "shapes", "sam")
            glob = tuple(i for i, r in enumerate(rel) if int(r[0]) == 2 * grid - 1)  # type: ignore[index]
            put(sam, "encoder_global_attn_indexes", glob, "shapes", "sam")
            local = [int(r[0]) for r in rel if int(r[0]) != 2 * grid - 1]  # type: ignore[index]
            if local:
                put(sam, "window_size", (local[0] + 1) // 2, "shapes", "sam")
    neck = g(_SAM + "image_encoder.neck.0.weight")  # [prompt_dim, embed, 1, 1]
    put(sam, "prompt_dim", int(neck[0]) if neck else None, "shapes", "sam")
    depth = _count(shapes, re.escape(_SAM) + r"mask_decoder\.transformer\.layers\.(\d+)\.")
    put(sam, "decoder_depth", depth or None, "shapes", "sam")
    lin1 = g(_SAM + "mask_decoder.transformer.layers.0.mlp.lin1.weight")
    put(sam, "decoder_mlp_dim", int(lin1[0]) if lin1 else None, "shapes", "sam")
    iou = g(_SAM + "mask_decoder.iou_prediction_head.layers.0.weight")
    put(sam, "iou_head_hidden_dim", int(iou[0]) if iou else None, "shapes", "sam")
    down = g(_SAM + "prompt_encoder.mask_downscaling.3.weight")
    put(sam, "mask_in_chans", int(down[0]) if down else None, "shapes", "sam")
    mlp0, mlp2 = g("seg_prompt_mlp.0.weight"), g("seg_prompt_mlp.2.weight")
    put(sam, "prompt_mlp_hidden", int(mlp0[0]) if mlp0 else None, "shapes", "sam")
    if mlp2 is not None and int(mlp2[0]) % sam.prompt_dim == 0:
        put(sam, "num_prompt_tokens", int(mlp2[0]) // sam.prompt_dim, "shapes", "sam")
    loc = g("loc_encoder.0.weight")  # [hidden, 4]
    put(cfg.location, "hidden_size", int(loc[0]) if loc else None, "shapes", "location")
    return head_dim


def _derive_heads(cfg: NextChatConfig, shapes: Mapping[str, Sequence[int]], put: Any) -> None:
    sam = cfg.sam
    if sam.prompt_dim in _SAM_DECODER_HEADS:
        if shapes:
            put(sam, "decoder_num_heads", _SAM_DECODER_HEADS[sam.prompt_dim], "preset", "sam")
        return
    width = sam.encoder_embed_dim // sam.encoder_num_heads
    if sam.prompt_dim % width == 0:
        put(
            sam,
            "decoder_num_heads",
            sam.prompt_dim // width,
            f"assumed: head width {width} of the SAM image encoder (not recorded in any file)",
            "sam",
        )


def _count(shapes: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def read_added_tokens(path: Path) -> dict[str, int]:
    """``added_tokens.json`` of a released tokenizer (empty when absent)."""
    file = path / "added_tokens.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def find_clip_dir(
    path: Path, hf_config: Mapping[str, Any], clip_path: str | Path | None
) -> Path | None:
    """The separate CLIP directory the official loader reads: ``clip_path``, else
    ``mm_vision_tower`` when it names a local directory (as given, or beside the
    checkpoint), else that model in the local Hugging Face cache (never downloaded)."""
    if clip_path is not None:
        chosen = Path(clip_path)
        if not (chosen / "config.json").is_file():
            raise FileNotFoundError(
                f"clip_path {chosen} is not a CLIP directory (no config.json); pass the local "
                "openai/clip-vit-large-patch14-336 directory"
            )
        return chosen
    name = str(hf_config.get("mm_vision_tower") or "")
    if not name:
        return None
    for candidate in (Path(name), path / name, path.parent / name):
        if (candidate / "config.json").is_file():
            return candidate
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):  # not cached, or not a repo id
        return None
