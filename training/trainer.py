"""The training loop: a stage of NExT-Chat on data sources, resumable, logged, evaluated.

    nextchat train --stage 2 --config train.yaml          # the CLI
    training.trainer.train(TrainConfig(...))             # what workers and tests call

Resumable checkpoints (``output_dir/checkpoints/step-N``: the trainable tensors, optimizer,
scheduler, every RNG and the data position) are written atomically; a rerun of the same
config resumes from the newest one and ends bit-identical to an uninterrupted run. The
final model is written in the core's own format (``output_dir/final``), with LoRA merged.
Metrics go to ``output_dir/metrics.jsonl`` (one JSON object per log step / evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from nextchat_core.batch import collate
from nextchat_core.build import build_model, from_pretrained, save_pretrained
from nextchat_core.config import PRESETS, get_preset
from nextchat_core.device import PRECISIONS, resolve_device
from nextchat_core.files import atomic_write_text
from nextchat_core.image_processing import ImageProcessor
from nextchat_core.predictor import NextChatPredictor
from nextchat_core.tokenizer import load_tokenizer, train_bpe_tokenizer

from .data import SampleSet, corpus, read_coco, read_label_studio, read_refexp_jsonl
from .engine import EngineSettings, make_accelerator, prepare, training_step
from .evaluation import evaluate_predictor
from .feature_cache import FeatureCache
from .lora import LoraSettings, has_lora, merge_lora
from .stages import get_stage

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """One data source. ``kind``: ``refexp`` (jsonl), ``coco`` (instances json, optional
    ``refs``), ``label_studio`` (JSON export). Paths relative to the config file."""

    kind: str
    path: str
    image_root: str | None = None
    refs: str | None = None


@dataclass
class TrainConfig:
    """Everything a training run needs (a JSON or YAML file, or built in code)."""

    stage: int = 2
    init: str = "tiny"  # a preset name (random init) or a checkpoint directory
    tokenizer: str | None = None  # for a preset start: a tokenizer dir; default: train one
    data: list[DataSource] = field(default_factory=list)
    eval_data: list[DataSource] = field(default_factory=list)
    eval_max: int = 200  # records evaluated per evaluation
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # samples per micro-batch (per process)
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # NExT-Chat: 2e-5 cosine, warmup 0.03, no weight decay
    lr_scale: dict[str, float] = field(default_factory=dict)  # per-module lr multipliers
    trainable: list[str] | None = None  # override the stage's trainable module prefixes
    masks: bool | None = None  # feed mask targets (SAM runs); default: the stage's choice
    loss: dict[str, float] = field(default_factory=dict)  # loss-weight overrides (LossConfig)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast; on CPU it needs AMX/AVX512-BF16 to pay)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (pays off on CUDA for long runs)
    lora: dict[str, Any] | None = None  # {"r": 16, "alpha": 32, "dropout": 0.05}
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/train"
    save_every: int = 0  # steps between resumable checkpoints (0: at the end only)
    eval_every: int = 0  # steps between evaluations (0: at the end only, if eval_data)
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    # > 0: the frozen encoders' outputs of a record set are computed once and reused
    # (training.feature_cache), within this many MB; 0: every step runs them.
    feature_cache_mb: float = 0.0

    def validate(self) -> None:
        get_stage(self.stage)
        for name in ("steps", "batch_size", "accumulate", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.data:
            raise ValueError(
                "train config: 'data' needs at least one source, e.g. "
                "[{'kind': 'refexp', 'path': 'train.jsonl'}]"
            )
        for src in self.data + self.eval_data:
            if src.kind not in _READERS:
                raise ValueError(
                    f"train config: unknown data kind {src.kind!r}; expected one of {sorted(_READERS)}"
                )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"train config: precision must be 'fp32' or 'bf16', got {self.precision!r}"
            )
        if not self.feature_cache_mb >= 0:
            raise ValueError(
                "train config: feature_cache_mb must be >= 0 (megabytes for the frozen "
                f"encoders' outputs; 0: off), got {self.feature_cache_mb}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(
                f"train config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base_dir: Path | None = None) -> TrainConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a train config is a mapping, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(
                f"train config: unknown keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        kwargs = dict(raw)
        for key in ("data", "eval_data"):
            sources = []
            for i, s in enumerate(kwargs.get(key, []) or []):
                try:
                    src = DataSource(**s)
                except TypeError as exc:
                    raise ValueError(f"train config: {key}[{i}]: {exc}") from exc
                if base_dir is not None:
                    src.path = str(_relative(base_dir, src.path))
                    src.image_root = src.image_root and str(_relative(base_dir, src.image_root))
                    src.refs = src.refs and str(_relative(base_dir, src.refs))
                sources.append(src)
            kwargs[key] = sources
        if base_dir is not None:
            for key in ("output_dir", "tokenizer"):
                if kwargs.get(key):
                    kwargs[key] = str(_relative(base_dir, kwargs[key]))
            if kwargs.get("init") and kwargs["init"] not in PRESETS:
                kwargs["init"] = str(_relative(base_dir, kwargs["init"]))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, base_dir=path.parent)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _relative(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


_READERS: dict[str, Callable[..., SampleSet]] = {
    "refexp": lambda src, cfg: read_refexp_jsonl(src.path, cfg),
    "coco": lambda src, cfg: read_coco(src.path, cfg, image_root=src.image_root, refs=src.refs),
    "label_studio": lambda src, cfg: read_label_studio(src.path, cfg, image_root=src.image_root),
}


def load_sources(sources: list[DataSource], model_config) -> SampleSet:
    sets = [_READERS[s.kind](s, model_config) for s in sources]
    out = sets[0]
    for s in sets[1:]:
        out = out + s
    return out


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    metrics: dict[str, Any]
    log_path: Path


Progress = Callable[[dict[str, Any]], None]


def train(
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    stop_after: int | None = None,
    samples: SampleSet | None = None,
    eval_samples: SampleSet | None = None,
    aux: torch.nn.Module | None = None,
    feature_cache: FeatureCache | None = None,
) -> TrainResult:
    """Run (or resume) one stage. ``progress`` gets ``{"stage", "step", "steps", "loss",
    "eta_s", ...}`` after each optimizer step; ``stop_after`` ends this call after that many
    total steps with a resumable checkpoint (what an interruption leaves). ``samples`` /
    ``eval_samples`` replace the config's sources (in-memory data). ``aux`` is an auxiliary
    objective module (see :data:`training.engine.AuxObjective`); it trains with the model
    and is saved in the resumable checkpoints (not in the final model). ``feature_cache``:
    a :class:`training.feature_cache.FeatureCache` shared with earlier stages of the same
    records (default: a new one when ``config.feature_cache_mb`` > 0)."""
    if samples is None:
        config.validate()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_stage(config.stage)
    device = torch.device(resolve_device(config.device))
    _seed_everything(config.seed)
    if aux is not None:
        # the caller built it from whatever the process's generator held (a probe, earlier
        # stages, nothing in a fresh process): its initial weights are drawn again from
        # the run's seed, so a rerun is exact (a resumed run then loads its checkpoint's)
        for module in aux.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    loaded: dict[str, SampleSet] = {}

    def training_data(model_config) -> SampleSet:
        # Read once: a preset start also trains its tokenizer on these texts.
        if "train" not in loaded:
            loaded["train"] = (
                samples if samples is not None else load_sources(config.data, model_config)
            )
        return loaded["train"]

    model, tokenizer = _init_model(config, training_data)
    mcfg = model.config
    train_set = training_data(mcfg)
    if len(train_set) == 0:
        raise ValueError("the training data holds no samples")
    eval_set = (
        eval_samples
        if eval_samples is not None
        else (load_sources(config.eval_data, mcfg) if config.eval_data else None)
    )

    settings = EngineSettings(
        lr=config.lr,
        weight_decay=config.weight_decay,
        precision=config.precision,
        gradient_checkpointing=config.gradient_checkpointing,
        lora=LoraSettings(**config.lora) if config.lora else None,
        clip_norm=config.clip_norm,
        accumulate=config.accumulate,
        compile=config.compile,
    )
    spec = dataclasses.replace(
        spec,
        lr_scale={**spec.lr_scale, **config.lr_scale},
        loss={**spec.loss, **config.loss},
    )
    if config.trainable is not None:
        spec = dataclasses.replace(spec, trainable=tuple(config.trainable))
    model.to(device)
    groups = prepare(model, spec, settings)
    if aux is not None:
        aux.to(device).train()
        attach = getattr(aux, "attach", None)
        if callable(attach):  # e.g. forward hooks on the layers it supervises
            attach(model)
        aux_params = list(aux.parameters())
        if aux_params:  # a loss alone (training.pointing) has none
            groups.append(
                {
                    "name": "aux",
                    "params": aux_params,
                    "lr": config.lr,
                    "weight_decay": config.weight_decay,
                }
            )
    accelerator = make_accelerator(settings, cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * config.steps),
        num_training_steps=config.steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    weights = spec.loss_weights(mcfg.loss)

    state: dict[str, Any] = {"step": 0, "micro_step": 0, "elapsed_s": 0.0}
    resumed = _latest_checkpoint(out)
    if resumed is not None:
        state = _load_checkpoint(resumed, raw_model, optimizer, scheduler, aux)
        log.info("resumed from %s at step %d", resumed, state["step"])
    if feature_cache is None and config.feature_cache_mb > 0:
        feature_cache = FeatureCache(config.feature_cache_mb)
    with_masks = spec.masks if config.masks is None else config.masks
    if feature_cache is not None:
        train_set = feature_cache.samples(train_set, raw_model, masks=with_masks) or train_set

    processor = ImageProcessor(mcfg)
    num_image_tokens = raw_model.num_image_tokens
    world, rank = accelerator.num_processes, accelerator.process_index

    def batch_at(micro: int) -> dict[str, torch.Tensor]:
        base = (micro * world + rank) * config.batch_size
        n = len(train_set)
        picks = [
            _position(base + k, n, config.seed) if train_set.shuffle else (base + k) % n
            for k in range(config.batch_size)
        ]
        batch = collate(
            [train_set[i] for i in picks],
            tokenizer=tokenizer,
            config=mcfg,
            num_image_tokens=num_image_tokens,
            processor=processor,
            with_masks=with_masks,
        )
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    log_path = out / "metrics.jsonl"
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(
        total=config.steps,
        initial=state["step"],
        desc=f"stage {config.stage}",
        disable=not accelerator.is_main_process or not _tty(),
    )
    started, first_step = time.perf_counter(), state["step"]
    last_tick = started
    last_metrics: dict[str, Any] = {}
    running: dict[str, list[float]] = {}
    with log_path.open("a") as log_file:
        while state["step"] < end:
            for _ in range(config.accumulate):
                out_step = training_step(
                    accelerator,
                    model,
                    batch_at(state["micro_step"]),
                    optimizer,
                    scheduler,
                    loss_weights=weights,
                    clip_norm=config.clip_norm,
                    aux=aux,
                )
                state["micro_step"] += 1
                for k, v in out_step.parts().items():
                    running.setdefault(k, []).append(v)
            state["step"] += 1
            bar.update(1)
            now = time.perf_counter()
            state["elapsed_s"] = state.get("elapsed_s", 0.0) + (now - last_tick)
            last_tick = now
            elapsed = now - started
            done = state["step"] - first_step
            eta = elapsed / done * (config.steps - state["step"])
            loss = float(np.mean(running.get("loss", [float("nan")])))
            bar.set_postfix(loss=f"{loss:.4f}")
            if progress is not None:
                progress(
                    {
                        "stage": config.stage,
                        "step": state["step"],
                        "steps": config.steps,
                        "loss": loss,
                        "eta_s": round(eta, 1),
                    }
                )
            if state["step"] % config.log_every == 0 or state["step"] == end:
                record = {
                    "step": state["step"],
                    "stage": config.stage,
                    "elapsed_s": round(state["elapsed_s"], 1),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": done
                    * config.batch_size
                    * config.accumulate
                    * world
                    / max(elapsed, 1e-9),
                    **{k: float(np.mean(v)) for k, v in running.items()},
                }
                running = {}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                last_metrics = record
            evaluate_now = config.eval_every and state["step"] % config.eval_every == 0
            if evaluate_now and eval_set is not None and state["step"] < config.steps:
                last_metrics = _evaluate(raw_model, tokenizer, eval_set, config, log_file, state)
                raw_model.train()  # a frozen tower stays in eval mode (NextChatModel.train)
                last_tick = time.perf_counter()  # evaluation time is not training time
            if (
                accelerator.is_main_process
                and (
                    (config.save_every and state["step"] % config.save_every == 0)
                    or state["step"] == end
                )
                and state["step"] < config.steps
            ):
                _save_checkpoint(
                    out, raw_model, optimizer, scheduler, state, config.keep_checkpoints, aux
                )
        bar.close()
        if state["step"] < config.steps:  # interrupted on purpose (stop_after)
            return TrainResult(out / "final", state["step"], last_metrics, log_path)
        if eval_set is not None:
            last_metrics = {
                **last_metrics,
                **_evaluate(raw_model, tokenizer, eval_set, config, log_file, state),
            }
    if has_lora(raw_model):
        merge_lora(raw_model)
    raw_model.eval()
    final = (
        save_pretrained(raw_model, out / "final", tokenizer)
        if accelerator.is_main_process
        else out / "final"
    )
    _write_json(
        out / "final" / "train_metrics.json", {"config": config.to_dict(), "metrics": last_metrics}
    )
    return TrainResult(final, state["step"], last_metrics, log_path)


# ------------------------------------------------------------------------ helpers


def _tty() -> bool:
    return os.isatty(2)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _position(global_index: int, n: int, seed: int) -> int:
    """Dataset index of the ``global_index``-th sample drawn: a fresh permutation per epoch,
    a pure function of (seed, epoch), so the data position is just a counter."""
    epoch, offset = divmod(global_index, n)
    return int(_permutation(n, seed, epoch)[offset])


@functools.lru_cache(maxsize=2)  # this epoch's and the next (a batch may straddle them)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # drawn once an epoch, not once a sample: a 48,000-record pool's permutation took
    # 0.94 ms on a 2-core EPYC, and a language step of 0.2 s draws 8 samples
    return np.random.default_rng([seed, epoch]).permutation(n)


def _init_model(config: TrainConfig, training_data: Callable[..., SampleSet]):
    init = config.init
    if init in PRESETS:
        torch.manual_seed(config.seed)
        mcfg = get_preset(init)
        model = build_model(mcfg)
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer, mcfg)
        else:
            tokenizer = train_bpe_tokenizer(corpus(training_data(mcfg)), config=mcfg)
        return model, tokenizer
    ckpt = from_pretrained(init)
    return ckpt.model, ckpt.tokenizer


def _evaluate(
    model, tokenizer, eval_set: SampleSet, config: TrainConfig, log_file, state: dict
) -> dict[str, Any]:
    model.eval()
    predictor = NextChatPredictor(model, tokenizer)
    report = evaluate_predictor(predictor, eval_set, max_records=config.eval_max)
    record = {
        "step": state["step"],
        "stage": config.stage,
        "elapsed_s": round(state.get("elapsed_s", 0.0), 1),
        "eval": True,
        **report,
    }
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    return record


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def _save_checkpoint(
    out: Path,
    model,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    aux: torch.nn.Module | None = None,
) -> Path:
    root = out / "checkpoints"
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".step-{state['step']:08d}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # Only the trainable tensors: frozen ones equal the init (a 7B LoRA run saves MBs).
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    if aux is not None:
        save_file(
            {k: v.contiguous().cpu() for k, v in aux.state_dict().items()},
            str(tmp / "aux.safetensors"),
        )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _save_rng(tmp)
    _write_json(tmp / "trainer_state.json", state)
    tmp.rename(final)  # atomic: a checkpoint directory is complete or absent
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def _load_checkpoint(
    path: Path, model, optimizer, scheduler, aux: torch.nn.Module | None = None
) -> dict:
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable parameters (missing {missing[:3]}, "
            f"unexpected {unknown[:3]}): was it written by another stage or LoRA setting? "
            "Use another output_dir or delete the checkpoints folder."
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    if aux is not None:
        aux.load_state_dict(
            load_file(str(path / "aux.safetensors"))  # load_state_dict copies to its device
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng(path)
    return json.loads((path / "trainer_state.json").read_text())


def _save_rng(path: Path) -> None:
    """The random states as ``rng.safetensors`` (torch, CUDA, numpy's key array) and
    ``rng.json`` (the rest): files that load without unpickling anything."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    save_file(tensors, str(path / "rng.safetensors"))
    version, py_state, gauss = random.getstate()
    _write_json(
        path / "rng.json",
        {
            "python": [version, list(py_state), gauss],
            "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        },
    )


def _load_rng(path: Path) -> None:
    if not (path / "rng.safetensors").is_file():
        raise ValueError(
            f"checkpoint {path} has no rng.safetensors (written by an older version, which "
            "pickled its random state): delete its checkpoints folder to start over"
        )
    tensors = load_file(str(path / "rng.safetensors"))
    meta = json.loads((path / "rng.json").read_text())
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state(
        (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
