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
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RELEASED_INDEX = "pytorch_model.bin.index.json"

# Buffers that old transformers versions saved and this model recomputes.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
    "embeddings.position_ids",
)
RELEASED_VISION_PREFIX = "model.vision_tower.vision_model."


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

    ``config`` overrides the config derived from a released ``config.json`` (which names
    only the LLM sizes; CLIP and SAM sizes are those of the 7B-336 release).
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
        return released_config(json.loads((path / CONFIG_NAME).read_text()))
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {CONFIG_NAME} missing")
    return NextChatConfig.load(path / CONFIG_NAME)


# ------------------------------------------------------------------- released format


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


def released_config(hf_config: Mapping[str, Any]) -> NextChatConfig:
    """Our config for a released ``config.json`` (``model_type: nextchat``)."""
    if hf_config.get("model_type") != "nextchat":
        raise ValueError(
            f"expected a NExT-Chat config.json (model_type 'nextchat'), got "
            f"model_type {hf_config.get('model_type')!r}"
        )
    cfg = get_preset("nextchat-7b-336")
    llm = cfg.llm
    llm.hidden_size = hf_config.get("hidden_size", llm.hidden_size)
    llm.num_layers = hf_config.get("num_hidden_layers", llm.num_layers)
    llm.num_heads = hf_config.get("num_attention_heads", llm.num_heads)
    llm.num_kv_heads = hf_config.get("num_key_value_heads", llm.num_heads)
    llm.intermediate_size = hf_config.get("intermediate_size", llm.intermediate_size)
    llm.vocab_size = hf_config.get("vocab_size", llm.vocab_size)
    llm.max_position_embeddings = hf_config.get(
        "max_position_embeddings", llm.max_position_embeddings
    )
    llm.rms_norm_eps = hf_config.get("rms_norm_eps", llm.rms_norm_eps)
    cfg.vision.select_layer = hf_config.get("mm_vision_select_layer", cfg.vision.select_layer)
    cfg.projector.depth = hf_config.get("mm_depth", cfg.projector.depth)
    cfg.vision.hidden_size = hf_config.get("mm_hidden_size", cfg.vision.hidden_size)
    if "224" in str(hf_config.get("mm_vision_tower", "")):
        cfg.vision.image_size = 224  # AoZhang/nextchat-7b uses CLIP ViT-L/14 at 224 px
    cfg.preset = "nextchat-7b-336" if cfg.vision.image_size == 336 else "nextchat-7b"
    cfg.validate()
    return cfg


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


def _load_released(
    path: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype | None,
    clip_path: str | Path | None,
    config: NextChatConfig | None,
) -> LoadedCheckpoint:
    config = config or released_config(json.loads((path / CONFIG_NAME).read_text()))
    model = build_model(config, device="meta")
    raw = read_released_state_dict(path)
    has_vision = any(k.startswith("model.vision_tower.") for k in raw)
    report = check_released_shapes(
        model, {k: v.shape for k, v in raw.items()}, include_vision=has_vision
    )
    _raise_on_bad_report(report, str(path))
    own_keys = list(model.state_dict())
    state = {}
    for key, tensor in raw.items():
        target = map_released_key(key, own_keys)
        if target is not None:
            state[target] = tensor
    if not has_vision:
        if clip_path is None:
            raise ValueError(
                f"{path} has no CLIP weights (no '{RELEASED_VISION_PREFIX}' keys); pass "
                "clip_path=<local openai/clip-vit-large-patch14-336 directory>"
            )
        state.update(_read_clip(Path(clip_path), own_keys))
    _assign(model, state, source=str(path))
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device)
    model.eval()
    return LoadedCheckpoint(model, load_tokenizer(path, config), path, "released")


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
        config = released_config(json.loads((path / CONFIG_NAME).read_text()))
        raw = read_released_state_dict(path)
        shapes = {k: list(v.shape) for k, v in raw.items()}
        source = str(path)
    else:
        data = json.loads(Path(manifest).read_text())  # type: ignore[arg-type]
        if "tensors" not in data:
            raise ValueError(
                f"{manifest} is not a state-dict manifest: expected a 'tensors' object"
            )
        shapes = data["tensors"]
        config = get_preset("nextchat-7b-336")
        source = str(manifest)
    model = build_model(config, device="meta")
    has_vision = any(k.startswith("model.vision_tower.") for k in shapes)
    report = check_released_shapes(model, shapes, include_vision=has_vision)
    return {
        "path": source,
        "layout": "released",
        "preset": config.preset if not (report.missing or report.mismatched) else None,
        "parameters": sum(v.numel() for v in model.parameters()),
        "vision_tower_included": has_vision,
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
