"""Builders and checkpoints: the only place weights are loaded or saved.

Two checkpoint layouts:

* **own** - a directory with ``config.json`` (:class:`NextChatConfig`),
  ``model.safetensors`` and the tokenizer files; a bit-exact round trip.
* **released** - NExT-Chat's own release (``AoZhang/nextchat-7b-336``): sharded
  ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json`` and a HF
  ``config.json`` with ``model_type: nextchat``. The shards are pickles: they are read with
  ``torch.load(weights_only=True)`` only, and their keys are mapped onto this model
  (:func:`map_released_key`). CLIP may be absent from the shards and come from a local
  CLIP directory instead (``clip_path``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import PRESETS, NextChatConfig, get_preset
from .modeling import NextChatModel
from .released import (
    RELEASED_INDEX,
    RELEASED_VISION_PREFIX,
    DerivedConfig,
    KeyReport,
    check_released_shapes,
    find_clip_dir,
    map_released_key,
    read_added_tokens,
    released_config,
)
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_model(
    config: NextChatConfig | str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> NextChatModel:
    """A randomly initialized model for a config or preset name. ``device="meta"`` builds
    only shapes (no memory), e.g. to check the 7B layout."""
    if isinstance(config, str):
        config = get_preset(config)
    previous = torch.get_default_dtype()
    if dtype is not None:
        # Build directly in the target dtype: a 7B model built in float32 first would need
        # twice the memory for a moment.
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = NextChatModel(config)
    finally:
        torch.set_default_dtype(previous)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ------------------------------------------------------------------------ own format


def save_pretrained(
    model: NextChatModel, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer) into ``path``.

    The directory is written next to its final place and renamed into it, so a reader never
    sees a half-written checkpoint.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.save(tmp / CONFIG_NAME)
    save_model(
        model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "preset": model.config.preset}
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            _rmtree(old)
        path.rename(old)
        tmp.rename(path)
        _rmtree(old)
    else:
        tmp.rename(path)
    return path


@dataclass
class LoadedCheckpoint:
    """A model, its tokenizer and where they came from."""

    model: NextChatModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    layout: str  # "own" or "released"
    # Released layout: where CLIP's weights came from ("shards" or the CLIP directory) and
    # where each derived config value came from (see nextchat_core.released).
    vision_source: str = "checkpoint"
    config_sources: dict[str, str] = field(default_factory=dict)


def from_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    clip_path: str | Path | None = None,
    expected_preset: str | None = None,
    config: NextChatConfig | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint directory of either layout (detected from its files).

    A released directory's config is derived from the directory itself (``config.json``,
    the shards' shapes, the tokenizer's added tokens; see :func:`released_config`);
    ``config`` overrides it. ``clip_path`` names the separate CLIP directory (the official
    loader's source of CLIP weights; see :func:`~nextchat_core.released.find_clip_dir`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if (path / RELEASED_INDEX).exists():
        return _load_released(path, device=device, dtype=dtype, clip_path=clip_path, config=config)
    if not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint: expected {WEIGHTS_NAME} + {CONFIG_NAME} (own format) "
            f"or {RELEASED_INDEX} + shards (released NExT-Chat)"
        )
    config = NextChatConfig.load(path / CONFIG_NAME)
    if expected_preset and config.preset != expected_preset:
        raise ValueError(
            f"checkpoint {path} is of preset {config.preset!r}, expected {expected_preset!r}"
        )
    model = build_model(config, device="meta")
    state = load_file(str(path / WEIGHTS_NAME), device=str(device))
    _assign(model, state, source=str(path / WEIGHTS_NAME))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return LoadedCheckpoint(model, load_tokenizer(path, config), path, "own")


def load_config(path: str | Path) -> NextChatConfig:
    """The config of a checkpoint directory of either layout, without loading weights."""
    path = Path(path)
    if (path / RELEASED_INDEX).exists():
        return derive_released(path).config
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {CONFIG_NAME} missing")
    return NextChatConfig.load(path / CONFIG_NAME)


# ------------------------------------------------------------------- released format


def read_released_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded released checkpoint, read with ``weights_only=True``."""
    index = json.loads((path / RELEASED_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = path / shard
        if not file.exists():
            raise FileNotFoundError(f"{RELEASED_INDEX} names {shard}, which is missing from {path}")
        state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state


def read_released_shapes(path: Path) -> dict[str, list[int]]:
    """``{key: shape}`` of a sharded released checkpoint (memory-mapped, no copy)."""
    return {k: list(v.shape) for k, v in read_released_state_dict(path).items()}


def derive_released(
    path: Path,
    *,
    shapes: dict[str, list[int]] | None = None,
    clip_path: str | Path | None = None,
) -> DerivedConfig:
    """The config of a released directory, derived from its own files."""
    hf_config = json.loads((path / CONFIG_NAME).read_text())
    clip_dir = find_clip_dir(path, hf_config, clip_path)
    clip_config = json.loads((clip_dir / CONFIG_NAME).read_text()) if clip_dir else None
    if clip_config is not None:  # a full CLIPModel config nests the vision part
        clip_config = clip_config.get("vision_config", clip_config)
    derived = released_config(
        hf_config,
        shapes if shapes is not None else read_released_shapes(path),
        clip_config=clip_config,
        token_ids=read_added_tokens(path),
    )
    derived.clip_dir = clip_dir
    return derived


def _load_released(
    path: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype | None,
    clip_path: str | Path | None,
    config: NextChatConfig | None,
) -> LoadedCheckpoint:
    raw = read_released_state_dict(path)
    hf_config = json.loads((path / CONFIG_NAME).read_text())
    derived = derive_released(
        path, shapes={k: list(v.shape) for k, v in raw.items()}, clip_path=clip_path
    )
    config = config or derived.config
    model = build_model(config, device="meta")
    clip_dir = derived.clip_dir
    in_shards = any(k.startswith("model.vision_tower.") for k in raw)
    report = check_released_shapes(
        model, {k: v.shape for k, v in raw.items()}, include_vision=in_shards and clip_dir is None
    )
    _raise_on_bad_report(report, str(path))
    own_keys = list(model.state_dict())
    state = {}
    for key, tensor in raw.items():
        target = map_released_key(key, own_keys)
        if target is not None:
            state[target] = tensor
    if clip_dir is not None:
        # The official loader always reads CLIP from its own directory and ignores any
        # model.vision_tower.* in the shards; so does this one, and it says when they differ.
        clip = _read_clip(clip_dir, own_keys)
        differ = [k for k, v in clip.items() if k in state and not torch.equal(state[k], v)]
        if differ:
            log.warning(
                "%s: the shards' CLIP weights differ from %s in %d tensors (e.g. %s); using "
                "the CLIP directory, as the official loader does",
                path,
                clip_dir,
                len(differ),
                differ[0],
            )
        state.update(clip)
        vision_source = f"clip directory {clip_dir}"
    elif in_shards:
        vision_source = "shards (model.vision_tower.*)"
    else:
        raise ValueError(
            f"{path} has no CLIP weights (no '{RELEASED_VISION_PREFIX}' keys) and its CLIP "
            f"directory {hf_config.get('mm_vision_tower')!r} is not on this machine; pass "
            "clip_path=<local openai/clip-vit-large-patch14-336 directory>"
        )
    _assign(model, state, source=str(path))
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device)
    model.eval()
    return LoadedCheckpoint(
        model,
        load_tokenizer(path, config),
        path,
        "released",
        vision_source=vision_source,
        config_sources=derived.sources,
    )


def _read_clip(path: Path, own_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """CLIP vision weights from a local HF CLIP directory, keyed for this model."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(str(path))
    out = {}
    for key, tensor in clip.state_dict().items():
        target = map_released_key("model.vision_tower." + key, own_keys)
        if target is not None:
            out[target] = tensor
    return out


def _raise_on_bad_report(report: KeyReport, source: str) -> None:
    problems = []
    if report.mismatched:
        problems.append("shape mismatches: " + "; ".join(report.mismatched[:5]))
    if report.missing:
        problems.append(f"{len(report.missing)} model tensors missing, e.g. {report.missing[:5]}")
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected keys, e.g. {report.unexpected[:5]}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit this model: " + " | ".join(problems))


def _assign(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into a (meta) model with a shape check per key and clear errors."""
    own = model.state_dict()
    problems = []
    for key, tensor in state.items():
        if key not in own:
            problems.append(f"unexpected key {key!r}")
        elif tuple(tensor.shape) != tuple(own[key].shape):
            problems.append(
                f"{key}: checkpoint {list(tensor.shape)} vs model {list(own[key].shape)}"
            )
    missing = [k for k in own if k not in state]
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if problems:
        raise ValueError(
            f"checkpoint {source} does not fit this model: " + "; ".join(problems[:10])
        )
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq, SAM pixel mean/std, CLIP position ids) were
    # built on the meta device; recompute them for real.
    _materialize_buffers(model, device=next(iter(state.values())).device if state else "cpu")


def _materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers a meta-device build left without data."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config: NextChatConfig = model.config  # type: ignore[assignment]
    for name, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            full = f"{name}.{bname}" if name else bname
            if isinstance(module, LlamaRotaryEmbedding):
                with torch.device(device):
                    fresh = getattr(LlamaRotaryEmbedding(module.config), bname)
            elif full == "sam.pixel_mean":
                fresh = torch.tensor(config.sam.pixel_mean, device=device).view(-1, 1, 1)
            elif full == "sam.pixel_std":
                fresh = torch.tensor(config.sam.pixel_std, device=device).view(-1, 1, 1)
            elif bname == "position_ids":
                fresh = torch.arange(buf.shape[-1], device=device).expand(buf.shape).contiguous()
            else:
                raise RuntimeError(f"cannot materialize buffer {full}: no rule to recompute it")
            module._buffers[bname] = fresh


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# ----------------------------------------------------------------------- inspection


def inspect_checkpoint(
    path: str | Path | None = None, *, manifest: str | Path | None = None
) -> dict[str, Any]:
    """Which preset a checkpoint (or a released manifest of shapes) matches, its parameter
    count and the mapped / missing / unexpected key counts."""
    if path is None and manifest is None:
        raise ValueError("give a checkpoint PATH, --manifest FILE, or both")
    if path is not None:
        path = Path(path)
        if (path / WEIGHTS_NAME).exists():
            config = NextChatConfig.load(path / CONFIG_NAME)
            from safetensors import safe_open

            with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            model = build_model(config, device="meta")
            own = {k: list(v.shape) for k, v in model.state_dict().items()}
            missing = [k for k in own if k not in shapes]
            unexpected = [k for k in shapes if k not in own]
            mismatched = [k for k in shapes if k in own and list(shapes[k]) != own[k]]
            return {
                "path": str(path),
                "layout": "own",
                "preset": _matching_preset(own, config.preset),
                "parameters": sum(v.numel() for v in model.parameters()),
                "mapped": len(shapes) - len(unexpected) - len(mismatched),
                "missing": len(missing),
                "unexpected": len(unexpected),
                "mismatched": len(mismatched),
            }
        if not (path / RELEASED_INDEX).exists():
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {RELEASED_INDEX}")
        shapes = read_released_shapes(path)
        derived = derive_released(path, shapes=shapes)
        clip_dir = derived.clip_dir
        source = str(path)
    else:
        data = json.loads(Path(manifest).read_text())  # type: ignore[arg-type]
        if "tensors" not in data:
            raise ValueError(
                f"{manifest} is not a state-dict manifest: expected a 'tensors' object"
            )
        shapes = data["tensors"]
        derived = DerivedConfig(get_preset("nextchat-7b-336"), {})
        clip_dir = None
        source = str(manifest)
    config = derived.config
    model = build_model(config, device="meta")
    has_vision = any(k.startswith("model.vision_tower.") for k in shapes)
    report = check_released_shapes(model, shapes, include_vision=has_vision and clip_dir is None)
    if clip_dir is not None:
        vision_source = f"clip directory {clip_dir}" + (
            " (the shards' model.vision_tower.* are ignored, as by the official loader)"
            if has_vision
            else ""
        )
    elif has_vision:
        vision_source = "shards (model.vision_tower.*)"
    else:
        vision_source = "missing: pass clip_path (no CLIP in the shards, no CLIP directory)"
    derived_sizes = {
        "vision": f"{config.vision.image_size}px/{config.vision.patch_size} "
        f"width {config.vision.hidden_size} x{config.vision.num_layers} "
        f"heads {config.vision.num_heads}",
        "llm": f"hidden {config.llm.hidden_size} x{config.llm.num_layers} "
        f"vocab {config.llm.vocab_size}",
        "sam": f"{config.sam.image_size}px width {config.sam.encoder_embed_dim} "
        f"x{config.sam.encoder_depth} prompt {config.sam.prompt_dim}",
        "tokens": config.tokens.added_token_ids(),
        "pad_color": list(config.vision.pad_color),
    }
    return {
        "path": source,
        "layout": "released",
        "preset": config.preset if not (report.missing or report.mismatched) else None,
        "parameters": sum(v.numel() for v in model.parameters()),
        "vision_tower_included": has_vision,
        "vision_source": vision_source,
        "derived": derived_sizes,
        "assumed": {k: v for k, v in derived.sources.items() if v.startswith("assumed")},
        **report.as_dict(),
    }


def _matching_preset(own_shapes: Mapping[str, list[int]], declared: str) -> str | None:
    """The named preset whose tensor shapes equal these, if any (declared one first)."""
    names = (
        [declared] + [n for n in PRESETS if n != declared] if declared in PRESETS else list(PRESETS)
    )
    for name in names:
        ref = build_model(name, device="meta")
        if {k: list(v.shape) for k, v in ref.state_dict().items()} == dict(own_shapes):
            return name
    return None
