"""One retraining job of the active-learning loop, from stored annotations to a served
version. The Celery task (:mod:`training.tasks`) is a thin wrapper around :func:`run_job`.

    corrected annotations (AnnotationStore, per project)
      -> Label Studio export shape -> training samples (training.data.read_label_studio,
         images fetched like /predict does: labelstudio.images)
      -> split: a held-out slice of tasks (by a hash of the task id: stable across jobs)
      -> + replay of the base domain (RETRAIN_REPLAY, training.forgetting), if any
      -> the configured stages (default 2 then 3), continuing from the served version;
         LoRA + bf16 on CUDA for a large model; the pointing loss in the language stages
         (RETRAIN_POINT, training.pointing), if any; the frozen encoders' outputs of the
         job's images computed once and shared by the stages (RETRAIN_FEATURE_CACHE_MB,
         training.feature_cache)
      -> evaluate the served and the new version on the held-out slice (and on the fixed
         regression slice of the original vocabulary, RETRAIN_REGRESSION, if any)
      -> publish the new version (atomic rename into MODEL_DIR/versions)
      -> promote it when the gate passes (policy), prune old versions

A job is idempotent: a redelivered job (its worker was killed) resumes the trainer's last
resumable checkpoint in ``MODEL_DIR/jobs/<job_id>``, finds a version it already
published, and never promotes twice. A job whose heartbeat is fresh belongs to a live
worker; a duplicate delivery of it is retried later instead of running twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelstudio.results import LabelStudioFormatError
from nextchat_core.device import PRECISIONS, resolve_device
from training import versions
from training.settings import ServiceSettings

from .store import AnnotationStore, Job

if TYPE_CHECKING:  # imported where used: torch and the trainer are heavy
    from nextchat_core.config import NextChatConfig

    from .data import Record, SampleSet

log = logging.getLogger(__name__)

POLICIES = ("not_worse", "always", "manual")
MAX_ATTEMPTS = 3  # deliveries of one job (a worker killed mid-job counts one)
Progress = Callable[[dict[str, Any]], None]


class JobBusy(RuntimeError):
    """The job is running in a live worker (fresh heartbeat): try again later."""


@dataclass(frozen=True)
class RetrainSettings(ServiceSettings):
    """How workers retrain: the settings shared with the backend
    (:class:`training.settings.ServiceSettings`; ``NEXTCHAT_DEVICE`` defaults to cuda when
    present here) and the loop's own. Field comments name the environment variable."""

    retrain_every: int = 50  # RETRAIN_EVERY: changed annotations that trigger a job (0: off)
    stages: tuple[int, ...] = (2, 3)  # RETRAIN_STAGES: e.g. "2,3"; 3 runs only with masks
    epochs: float = 4.0  # RETRAIN_EPOCHS: passes over the training slice per stage
    # RETRAIN_STAGE_EPOCHS: RETRAIN_EPOCHS for some stages only, e.g. "2=6,3=1"
    stage_epochs: dict[int, float] = field(default_factory=dict)
    max_steps: int = 2000  # RETRAIN_MAX_STEPS: cap per stage
    batch_size: int = 8  # RETRAIN_BATCH_SIZE
    lr: float = 1e-4  # RETRAIN_LR
    # RETRAIN_LOSS: loss-weight overrides for every stage, e.g. "cycle1=0" (the demo
    # recipe trains its language stage without cycle1: training.demo.default_phases)
    loss: dict[str, float] = field(default_factory=dict)
    # RETRAIN_TRAINABLE: module prefixes stages 1-2 train instead of the stage's own, e.g.
    # "vision_tower,mm_projector,language_model,loc_encoder,loc_decoder" (training.stages)
    trainable: tuple[str, ...] = ()
    # RETRAIN_LR_SCALE: per-prefix learning-rate multipliers in stages 1-2, e.g.
    # "vision_tower=0.3" (a prefix they train)
    lr_scale: dict[str, float] = field(default_factory=dict)
    holdout: float = 0.2  # RETRAIN_HOLDOUT: fraction of tasks held out for the gate
    min_tasks: int = 4  # RETRAIN_MIN_TASKS: fewer annotated tasks fail the job clearly
    policy: str = "not_worse"  # PROMOTE_POLICY: not_worse | always | manual
    tolerance: float = 0.0  # PROMOTE_TOLERANCE: Acc@0.5 the new version may lose
    # Against forgetting (training.forgetting; the synthetic base domain, which the bundled
    # model was trained on - off by default, as it means nothing to other checkpoints):
    # RETRAIN_REPLAY: base-domain samples mixed in per correction (and per pasted copy)
    replay: float = 0.0
    # RETRAIN_COPY_PASTE: pasted copies of each correction (its masked objects moved into
    # another correction's image: training.augment; 0: off)
    copy_paste: int = 0
    regression: int = 0  # RETRAIN_REGRESSION: records of the fixed regression slice (0: none)
    # RETRAIN_POINT: weight of the pointing loss in the language stages (training.pointing:
    # the last layer's first head attends from each answer <at> to its corrected box's
    # cells, as the bundled model was trained; 0: off - it means nothing to a checkpoint
    # without such a head)
    point: float = 0.0
    # RETRAIN_FEATURE_CACHE_MB: the frozen encoders' outputs of the job's images are
    # computed once and reused by every step and stage (training.feature_cache), within
    # this much memory (float32, per image: README; 0: off)
    feature_cache_mb: float = 2048.0
    # RETRAIN_PRECISION: auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (bf16
    # autocast on the CPU too; the bundled model's job took 1.11x in it even with AMX, its
    # mask stage slower: bench/RESULTS.md)
    precision: str = "auto"
    # PROMOTE_FORGETTING_TOLERANCE: Acc@0.5 / mask mIoU the regression slice may lose
    forgetting_tolerance: float = 0.05
    keep_versions: int = 5  # KEEP_VERSIONS: retention (current and rollback target kept)
    lora: str = "auto"  # RETRAIN_LORA: auto (CUDA + a 7B-sized LLM) | on | off
    time_limit: int = 6 * 3600  # RETRAIN_TIME_LIMIT: seconds before a job is killed
    heartbeat_s: float = 10.0  # JOB_HEARTBEAT_S: a job's liveness beat; stale after 3 beats

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RetrainSettings:
        env = os.environ if env is None else env

        def get(key: str, cast: Callable[[str], Any], default: Any, like: str = "") -> Any:
            raw = env.get(key, "").strip()
            if not raw:
                return default
            try:
                return cast(raw)
            except ValueError:
                raise ValueError(
                    f"{key}={raw!r} is not valid: expected {cast.__name__} like "
                    f"{like or repr(default)}"
                ) from None

        def stages(raw: str) -> tuple[int, ...]:
            return tuple(int(x) for x in raw.replace(" ", "").split(",") if x)

        def names(raw: str) -> tuple[str, ...]:
            return tuple(x for x in raw.replace(" ", "").split(",") if x)

        def loss(raw: str) -> dict[str, float]:
            pairs = [p.split("=", 1) for p in raw.replace(" ", "").split(",") if p]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(raw)
            return {k: float(v) for k, v in pairs}

        def stage_pairs(raw: str) -> dict[int, float]:
            return {int(k): v for k, v in loss(raw).items()}

        s = cls(
            **ServiceSettings.values_from_env(env),
            retrain_every=get("RETRAIN_EVERY", int, 50),
            stages=get("RETRAIN_STAGES", stages, (2, 3)),
            epochs=get("RETRAIN_EPOCHS", float, 4.0),
            stage_epochs=get("RETRAIN_STAGE_EPOCHS", stage_pairs, {}, "'2=6,3=1'"),
            max_steps=get("RETRAIN_MAX_STEPS", int, 2000),
            batch_size=get("RETRAIN_BATCH_SIZE", int, 8),
            lr=get("RETRAIN_LR", float, 1e-4),
            loss=get("RETRAIN_LOSS", loss, {}, "'cycle1=0'"),
            trainable=get("RETRAIN_TRAINABLE", names, ()),
            lr_scale=get("RETRAIN_LR_SCALE", loss, {}, "'vision_tower=0.3'"),
            holdout=get("RETRAIN_HOLDOUT", float, 0.2),
            min_tasks=get("RETRAIN_MIN_TASKS", int, 4),
            policy=get("PROMOTE_POLICY", str, "not_worse"),
            tolerance=get("PROMOTE_TOLERANCE", float, 0.0),
            replay=get("RETRAIN_REPLAY", float, 0.0),
            copy_paste=get("RETRAIN_COPY_PASTE", int, 0),
            regression=get("RETRAIN_REGRESSION", int, 0),
            point=get("RETRAIN_POINT", float, 0.0),
            feature_cache_mb=get("RETRAIN_FEATURE_CACHE_MB", float, 2048.0),
            precision=get("RETRAIN_PRECISION", str, "auto"),
            forgetting_tolerance=get("PROMOTE_FORGETTING_TOLERANCE", float, 0.05),
            keep_versions=get("KEEP_VERSIONS", int, 5),
            lora=get("RETRAIN_LORA", str, "auto"),
            time_limit=get("RETRAIN_TIME_LIMIT", int, 6 * 3600),
            heartbeat_s=get("JOB_HEARTBEAT_S", float, 10.0),
        )
        s = replace(s, **overrides)
        s.validate()
        return s

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"PROMOTE_POLICY must be one of {POLICIES}, got {self.policy!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(
                f"RETRAIN_PRECISION must be auto, fp32 or bf16, got {self.precision!r}"
            )
        if self.lora not in ("auto", "on", "off"):
            raise ValueError(f"RETRAIN_LORA must be auto, on or off, got {self.lora!r}")
        bad = [s for s in self.stages if s not in (0, 1, 2, 3)]
        if not self.stages or bad:
            raise ValueError(
                f"RETRAIN_STAGES must list stages among 0-3 (e.g. '2,3'), got {self.stages}"
            )
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"RETRAIN_HOLDOUT must be in (0, 1), got {self.holdout}")
        for name in ("batch_size", "max_steps", "keep_versions", "min_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be >= 1, got {getattr(self, name)}")
        from nextchat_core.config import LossConfig

        known = {f.name for f in fields(LossConfig)}
        bad_loss = {k: v for k, v in self.loss.items() if k not in known or not v >= 0}
        if bad_loss:
            raise ValueError(
                f"RETRAIN_LOSS must set loss weights >= 0 among {sorted(known)} (like "
                f"'cycle1=0'), got {bad_loss}"
            )
        if not (
            self.replay >= 0 and self.regression >= 0 and self.copy_paste >= 0 and self.point >= 0
        ):
            raise ValueError(
                "RETRAIN_REPLAY (samples per correction), RETRAIN_COPY_PASTE (copies per "
                "correction), RETRAIN_REGRESSION (records) and RETRAIN_POINT (a loss weight) "
                f"must be >= 0, got {self.replay}, {self.copy_paste}, {self.regression} and "
                f"{self.point}"
            )
        if not 0.0 <= self.forgetting_tolerance <= 1.0:
            raise ValueError(
                f"PROMOTE_FORGETTING_TOLERANCE must be in [0, 1], got {self.forgetting_tolerance}"
            )
        if self.retrain_every < 0 or self.epochs <= 0 or self.lr <= 0 or self.heartbeat_s <= 0:
            raise ValueError(
                "RETRAIN_EVERY must be >= 0 and RETRAIN_EPOCHS, RETRAIN_LR, JOB_HEARTBEAT_S > 0"
            )
        bad_epochs = {
            k: v for k, v in self.stage_epochs.items() if k not in (0, 1, 2, 3) or not v > 0
        }
        if bad_epochs:
            raise ValueError(
                "RETRAIN_STAGE_EPOCHS must give stages among 0-3 epochs > 0 (like '2=6,3=1'), "
                f"got {bad_epochs}"
            )
        if not self.feature_cache_mb >= 0:
            raise ValueError(
                "RETRAIN_FEATURE_CACHE_MB must be >= 0 (megabytes; 0 turns the cache off), "
                f"got {self.feature_cache_mb}"
            )

    def precision_on(self, device: str) -> str:
        """The training precision on ``device`` ("cpu" or a CUDA device)."""
        if self.precision != "auto":
            return self.precision
        return "fp32" if device == "cpu" else "bf16"

    @functools.cached_property
    def store(self) -> AnnotationStore:
        """The annotation store under ``model_dir``, opened (schema checked) once."""
        return AnnotationStore(self.model_dir)


def version_name(job: Job) -> str:
    """The version a job publishes: stable for the job (a redelivery finds it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(job.created_at))
    return versions.check_version_name(f"p{job.project_id}-{stamp}-{job.job_id[:6]}")


def split_tasks(
    tasks: list[dict[str, Any]], holdout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)`` by a hash of each task id, so a task stays on its side in every
    job; at least one task on each side."""

    def bucket(task: dict[str, Any]) -> float:
        digest = hashlib.sha1(str(task.get("id")).encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32

    ranked = sorted(tasks, key=bucket)
    n_hold = min(len(tasks) - 1, max(1, round(holdout * len(tasks))))
    return ranked[n_hold:], ranked[:n_hold]


def run_job(
    job_id: str, settings: RetrainSettings, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip when done) retraining job ``job_id``; returns its result.

    Failures are recorded in the job (state ``failed`` + the message) and re-raised, so
    the worker's log and the Celery task state carry them too; the served version is
    unchanged unless the job reached promotion."""
    store = settings.store
    job = store.job(job_id)
    if job.state in ("succeeded", "failed"):
        log.info("job %s is already %s: nothing to do", job_id, job.state)
        return job.result or {"state": job.state, "error": job.error}
    stale_after = 3 * settings.heartbeat_s
    if job.state == "running" and time.time() - job.updated_at < stale_after:
        raise JobBusy(f"job {job_id} is running in another worker (heartbeat {stale_after:.0f} s)")
    attempt = store.start_attempt(job_id)
    if attempt > MAX_ATTEMPTS:
        message = (
            f"job {job_id} was started {attempt - 1} times and its worker died each time "
            f"(killed, out of memory, or over RETRAIN_TIME_LIMIT={settings.time_limit} s); "
            "giving up - see the worker logs, then `nextchat retrain PROJECT` to try again"
        )
        log.error(message)
        store.set_state(job_id, "failed", error=message)
        return {"state": "failed", "error": message}
    store.set_state(job_id, "running", progress={"phase": "preparing", "attempt": attempt})
    beat = _Heartbeat(store, job_id, settings.heartbeat_s)
    try:
        with beat:
            result = _run(job, settings, store, progress, beat)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("retraining job %s failed: %s", job_id, message)
        store.set_state(job_id, "failed", error=message)
        raise
    store.set_state(job_id, "succeeded", result=result, progress={"phase": "done"})
    return result


def _run(
    job: Job,
    settings: RetrainSettings,
    store: AnnotationStore,
    progress: Progress | None,
    beat: _Heartbeat,
) -> dict[str, Any]:
    """The steps of the module docstring, in order; each is one function below."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    def report(update: dict[str, Any]) -> None:
        beat.progress = {**update, "job_id": job.job_id}
        if progress is not None:
            progress(beat.progress)

    name = version_name(job)
    work = settings.model_dir / "jobs" / job.job_id
    work.mkdir(parents=True, exist_ok=True)
    published = versions.version_dir(settings.model_dir, name)
    parent = versions.served_version(settings.model_dir, settings.checkpoint)
    if (published / versions.VERSION_META).is_file():
        # A redelivery after the version was published: finish the promotion step only.
        meta = json.loads((published / versions.VERSION_META).read_text())
        return _gate_and_promote(settings, name, meta, already=True)

    synced = _pull_from_label_studio(job, settings, store, report)
    data = _training_data(job, settings, store, parent.path, work, report)
    # Workers train on CUDA when present (NEXTCHAT_DEVICE overrides), the backend on cpu.
    device = resolve_device(settings.device or "auto")
    final, timings = _train_stages(job, settings, data, parent.path, work, device, report)

    report({"phase": "evaluating", "held_out": len(data.held_out)})
    old = _evaluate(parent.path, data.held_out, device)
    new = _evaluate(final, data.held_out, device)
    regression: dict[str, Any] | None = None
    if settings.regression:
        from .forgetting import regression_set

        report({"phase": "evaluating the regression slice", "records": settings.regression})
        slice_ = regression_set(settings.regression, data.config)
        regression = {
            "old": _evaluate(parent.path, slice_, device),
            "new": _evaluate(final, slice_, device),
        }
        base = versions.base_version(settings.checkpoint)
        if base.path.resolve() != parent.path.resolve():
            # the lineage's origin too: small losses that each pass against the served
            # version must not add up (each round compared with the last only would let
            # the original vocabulary drift away, a tolerance at a time)
            regression["base"] = _regression_reference(settings, base, slice_, device)
    meta = {
        "job_id": job.job_id,
        "project": job.project_id,
        "parent": parent.name,
        "created_at": time.time(),
        "train_samples": len(data.train),
        "held_out_samples": len(data.held_out),
        "replay_samples": data.replay,
        "pasted_samples": data.pasted,
        "tasks": data.tasks,
        "synced_from_label_studio": synced,
        "stages": timings,
        "eval_old": old,
        "eval_new": new,
        "regression": regression,
    }
    staged = versions.staging_dir(settings.model_dir, name)
    staged.rmdir()
    os.rename(final, staged)  # same file system (MODEL_DIR): no copy of the weights
    versions.publish_version(settings.model_dir, staged, name, meta)
    outcome = _gate_and_promote(settings, name, meta, already=False)
    shutil.rmtree(work, ignore_errors=True)  # resumable checkpoints are not needed any more
    return outcome


def _pull_from_label_studio(
    job: Job, settings: RetrainSettings, store: AnnotationStore, report: Progress
) -> dict[str, Any] | None:
    """Pull mode (``LABEL_STUDIO_URL`` and ``_API_KEY`` set): Label Studio is the source of
    truth and the store mirrors the project (annotations made before this backend was
    connected are included). Returns what the sync changed, ``None`` without pull mode."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    from labelstudio.coco.export import fetch_project

    report({"phase": "pulling annotations from Label Studio"})
    exported, _ = fetch_project(
        int(job.project_id),
        base_url=settings.label_studio_url,
        api_key=settings.label_studio_api_key,
    )
    synced = store.sync_project(job.project_id, exported)
    log.info("job %s: synced project %s from Label Studio: %s", job.job_id, job.project_id, synced)
    return synced


@dataclass(frozen=True)
class _TrainingData:
    """A job's annotations as training samples, split by :func:`split_tasks`."""

    tasks: int  # annotated tasks in the store
    train: SampleSet  # the corrections' training slice + the replay samples
    held_out: SampleSet  # for the promotion gate
    config: NextChatConfig  # the served checkpoint's
    has_masks: bool  # any correction with a mask (stage 3 runs only then)
    replay: int = 0  # base-domain samples in ``train`` (RETRAIN_REPLAY)
    pasted: int = 0  # copy-paste samples in ``train`` (RETRAIN_COPY_PASTE)


def _training_data(
    job: Job,
    settings: RetrainSettings,
    store: AnnotationStore,
    parent_path: Path,
    work: Path,
    report: Progress,
) -> _TrainingData:
    """Stored annotations -> Label Studio export shape -> training samples, images fetched
    like ``/predict`` does, split into a training and a held-out slice."""
    from nextchat_core.build import load_config

    from .data import SampleSet, presence_records, read_label_studio

    tasks = store.export_tasks(job.project_id)
    if len(tasks) < settings.min_tasks:
        raise ValueError(
            f"project {job.project_id} has {len(tasks)} annotated task(s); retraining needs "
            f"at least {settings.min_tasks} (RETRAIN_MIN_TASKS) to hold some out for the gate"
        )
    report({"phase": "fetching images", "tasks": len(tasks)})
    resolve = _image_resolver(settings, job.project_id, work / "images")
    config = load_config(parent_path)
    train_tasks, held_tasks = split_tasks(tasks, settings.holdout)
    bad: list[LabelStudioFormatError] = []
    train_set = read_label_studio(train_tasks, config, resolve_image=resolve, errors=bad)
    held_set = read_label_studio(held_tasks, config, resolve_image=resolve, errors=bad)
    if bad:
        # Stored before the webhook checked them (or from a Label Studio pull): skipped,
        # counted, never the end of the job.
        log.warning(
            "job %s: %d annotation region(s) skipped as unusable, e.g. %s",
            job.job_id,
            len(bad),
            bad[0],
        )
        report({"phase": "fetching images", "skipped_regions": len(bad)})
    if len(train_set) == 0:
        raise ValueError(
            f"project {job.project_id}: the annotations hold no boxes, brushes or polygons to "
            "train on"
        )
    has_masks = any(_has_mask(r) for r in train_set.records)
    corrections = len(train_set)
    seed = int(hashlib.sha256(job.job_id.encode()).hexdigest()[:8], 16)  # the job's draws
    pasted: list[Record] = []
    if settings.copy_paste:
        from .augment import copy_paste

        pasted = copy_paste(train_set.records, settings.copy_paste, seed=seed)
        log.info("job %s: %d copy-paste samples of the corrections", job.job_id, len(pasted))
    if config.score.presence == "exists":
        # The region score asks "Is there ...?" of every prompt: corrected boxes also teach
        # the "Yes", or a new word stays held back by the presence gate (data.presence_records).
        # ... and the "No" asked of another correction's image (augment.absence_records),
        # or retraining teaches "Yes" to everything (measured: bench/RESULTS.md).
        from .augment import absence_records

        train_set = train_set + SampleSet(
            presence_records(train_set.records, config)
            + absence_records(train_set.records, config, seed=seed),
            config,
        )
    train_set = train_set + SampleSet(pasted, config)
    replay = 0
    if settings.replay:
        from .forgetting import replay_set

        extra = replay_set(corrections + len(pasted), settings.replay, config)
        train_set, replay = train_set + extra, len(extra)
        log.info("job %s: %d replay samples of the base domain mixed in", job.job_id, replay)
    return _TrainingData(len(tasks), train_set, held_set, config, has_masks, replay, len(pasted))


def _has_mask(record: Record) -> bool:
    return any(m is not None for m in (record.masks or []))


def _train_stages(
    job: Job,
    settings: RetrainSettings,
    data: _TrainingData,
    parent_path: Path,
    work: Path,
    device: str,
    report: Progress,
) -> tuple[Path, list[dict[str, Any]]]:
    """The configured stages, each continuing from the previous one (the first from the
    served version); LoRA + bf16 on CUDA for a large model. A stage a redelivered job
    finished before is not run again. Returns the last stage's final checkpoint and the
    stages' timings."""
    from .data import SampleSet
    from .feature_cache import FeatureCache
    from .pointing import PointingObjective
    from .trainer import TrainConfig, train

    big = data.config.llm.hidden_size >= 2048
    use_lora = settings.lora == "on" or (settings.lora == "auto" and device != "cpu" and big)
    init, timings = str(parent_path), []
    cache = FeatureCache(settings.feature_cache_mb)  # one per job: its stages share it
    for stage in settings.stages:
        if stage == 3 and not data.has_masks:
            log.info("job %s: no masks among the annotations: stage 3 skipped", job.job_id)
            continue
        samples = data.train
        if stage == 3:  # the mask stage learns only from masks: the rest has no loss there
            samples = SampleSet([r for r in samples.records if _has_mask(r)], data.config)
        epochs = settings.stage_epochs.get(stage, settings.epochs)
        steps = min(
            settings.max_steps,
            max(10, math.ceil(epochs * len(samples) / settings.batch_size)),
        )
        cfg = TrainConfig(
            stage=stage,
            init=init,
            steps=steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            output_dir=str(work / f"stage{stage}"),
            save_every=max(5, steps // 10),
            log_every=max(1, steps // 20),
            device=device,
            loss=dict(settings.loss),
            # RETRAIN_TRAINABLE / RETRAIN_LR_SCALE are the language stages'; stage 3 keeps its own
            trainable=list(settings.trainable) if settings.trainable and stage != 3 else None,
            lr_scale=dict(settings.lr_scale) if stage != 3 else {},
            precision=settings.precision_on(device),
            gradient_checkpointing=big,
            lora={"r": 16, "alpha": 32, "dropout": 0.05} if use_lora and stage != 3 else None,
            feature_cache_mb=settings.feature_cache_mb,
        )
        stage_final = work / f"stage{stage}" / "final"
        if (stage_final / "model.safetensors").is_file():  # a redelivered job: done before
            init = str(stage_final)
            continue
        t0 = time.perf_counter()

        def on_step(p: dict[str, Any], stage: int = stage) -> None:
            report({"phase": f"stage {stage}", **p})

        # The pointing loss supervises the LLM's attention: the language stages only.
        aux = (
            PointingObjective(data.config, settings.point)
            if settings.point and stage != 3
            else None
        )
        cached_before = cache.computed_s
        result = train(cfg, progress=on_step, samples=samples, aux=aux, feature_cache=cache)
        seconds = time.perf_counter() - t0
        timings.append(
            {
                "stage": stage,
                "samples": len(samples),
                "steps": steps,
                "seconds": round(seconds, 2),
                # of which computing the frozen encoders' outputs (training.feature_cache)
                "feature_cache_s": round(cache.computed_s - cached_before, 2),
                "samples_per_s": round(steps * settings.batch_size / max(seconds, 1e-9), 2),
            }
        )
        init = str(result.final_dir)
    if init == str(parent_path):
        raise ValueError(f"no stage of {settings.stages} could run on these annotations")
    return Path(init), timings


def _gate_and_promote(
    settings: RetrainSettings, name: str, meta: dict[str, Any], *, already: bool
) -> dict[str, Any]:
    old, new = meta["eval_old"], meta["eval_new"]
    regression = meta.get("regression")
    promote, why = gate(
        old,
        new,
        settings.policy,
        settings.tolerance,
        regression=(regression["old"], regression["new"]) if regression else None,
        regression_base=regression.get("base") if regression else None,
        forgetting_tolerance=settings.forgetting_tolerance,
    )
    served = versions.read_current_version(settings.model_dir)
    prelabel: dict[str, Any] | None = None
    if promote and served != name:
        versions.promote(settings.model_dir, name, reason=f"retrain job {meta['job_id']}: {why}")
        if settings.prelabel_on_promote:
            prelabel = _prelabel_unannotated(settings, str(meta["project"]), name)
    elif promote:
        log.info("version %s is already served", name)
    removed = versions.prune_versions(settings.model_dir, settings.keep_versions)
    log.info(
        "job %s: version %s %s (%s); Acc@0.5 %.3f -> %.3f",
        meta["job_id"],
        name,
        "promoted" if promote else "kept, not served",
        why,
        old.get("rec_acc", float("nan")),
        new.get("rec_acc", float("nan")),
    )
    return {
        "version": name,
        "promoted": promote,
        "reason": why,
        "eval_old": old,
        "eval_new": new,
        "regression": regression,
        "replay_samples": meta.get("replay_samples", 0),
        "pasted_samples": meta.get("pasted_samples", 0),
        "stages": meta.get("stages", []),
        "synced_from_label_studio": meta.get("synced_from_label_studio"),
        "pruned": removed,
        "resumed_after_publish": already,
        "prelabel": prelabel,
    }


def _prelabel_unannotated(settings: RetrainSettings, project: str, version: str) -> dict[str, Any]:
    """``PRELABEL_ON_PROMOTE``: pre-label the project's unannotated tasks with the version
    just promoted (a run planned by a pre-labeling worker). The job has succeeded either
    way; a run that cannot start is reported in its result and the run's record."""
    from .prelabel_runs import RunOptions, start_run

    options = RunOptions(
        selection="unannotated", chunk_size=settings.prelabel_chunk_size, started_by="promotion"
    )
    try:
        run = start_run(settings.model_dir, project, version, options)
    except RuntimeError as exc:
        log.error("version %s promoted, but pre-labeling could not start: %s", version, exc)
        return {"error": str(exc)}
    log.info("version %s promoted: pre-labeling run %s started", version, run.run_id)
    return {"run": run.run_id}


def gate(
    old: dict[str, Any],
    new: dict[str, Any],
    policy: str,
    tolerance: float,
    *,
    regression: tuple[dict[str, Any], dict[str, Any]] | None = None,
    regression_base: dict[str, Any] | None = None,
    forgetting_tolerance: float = 0.05,
) -> tuple[bool, str]:
    """Whether to serve the new version, and why. ``not_worse``: held-out Acc@0.5 and (when
    both have masks) mask mIoU may drop by at most ``tolerance``; and with a
    ``regression`` slice (the served and the new version's scores on the original
    vocabulary), neither may drop there by more than ``forgetting_tolerance``: a version
    that learns the project's data but forgets what the model knew is not served.
    ``regression_base`` (the base checkpoint's score there, when another version is
    served) holds the new version to the same tolerance from the origin, so losses do not
    add up over rounds."""
    if policy == "always":
        return True, "policy 'always'"
    if policy == "manual":
        return False, "policy 'manual': promote with `nextchat promote`"
    worse = _drops(old, new, tolerance)
    if worse:
        return False, "worse on the held-out slice: " + ", ".join(worse)
    why = (
        f"not worse on the held-out slice (Acc@0.5 {old.get('rec_acc', 0):.3f} -> "
        f"{new.get('rec_acc', 0):.3f})"
    )
    if regression is not None:
        r_old, r_new = regression
        forgot = _drops(r_old, r_new, forgetting_tolerance)
        if regression_base is not None:
            forgot += [
                f"{d} since the base checkpoint"
                for d in _drops(regression_base, r_new, forgetting_tolerance)
            ]
        n = r_new.get("n_records", "?")
        if forgot:
            return False, (
                f"{why}, but it forgets the original vocabulary: on the regression slice "
                f"({n} records) {', '.join(forgot)}, more than PROMOTE_FORGETTING_TOLERANCE="
                f"{forgetting_tolerance}"
            )
        since = (
            f" (base checkpoint {regression_base.get('rec_acc', 0):.3f})"
            if regression_base is not None
            else ""
        )
        why += (
            f"; regression slice ({n} records) Acc@0.5 {r_old.get('rec_acc', 0):.3f} -> "
            f"{r_new.get('rec_acc', 0):.3f}{since}, within {forgetting_tolerance}"
        )
    return True, why


def _regression_reference(
    settings: RetrainSettings, base: versions.ModelVersion, slice_: SampleSet, device: str
) -> dict[str, Any]:
    """The base checkpoint's score on the regression slice, computed once per MODEL_DIR and
    kept in ``MODEL_DIR/regression-base.json`` (keyed by the checkpoint's fingerprint and
    the slice's size: the slice is fixed by its seed)."""
    path = settings.model_dir / "regression-base.json"
    key = f"{versions.checkpoint_fingerprint(base.path)}:{len(slice_)}"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cached:
        cached[key] = _evaluate(base.path, slice_, device)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    return dict(cached[key])


def _drops(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> list[str]:
    """``"key a -> b"`` for each of Acc@0.5 and mask mIoU that fell by more than
    ``tolerance`` (a metric missing on either side is not compared)."""
    worse = []
    for key in ("rec_acc", "mask_miou"):
        a, b = old.get(key), new.get(key)
        if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
            continue
        if b < a - tolerance:
            worse.append(f"{key} {a:.3f} -> {b:.3f}")
    return worse


def _evaluate(path: Path, samples: Any, device: str) -> dict[str, Any]:
    from nextchat_core.predictor import NextChatPredictor

    from .evaluation import evaluate_predictor

    if not any(r.task == "rec" for r in samples.records):
        return {}
    predictor = NextChatPredictor.from_pretrained(path, device=device)
    report = evaluate_predictor(predictor, samples)
    keep = (
        "rec_acc",
        "mean_box_iou",
        "mask_miou",
        "mask_ciou",
        "n_records",
        "multi_instance_recall",
    )
    return {k: report[k] for k in keep if k in report}


def _image_resolver(
    settings: RetrainSettings, project_id: str, cache: Path
) -> Callable[[str, dict], str]:
    """Image references -> local files, fetched with the same rules as ``/predict`` and the
    Label Studio address/token that ``/setup`` stored for the project."""
    from labelstudio.images import fetch_image_file
    from labelstudio.projects import ProjectStore

    options = settings.fetch_options(ProjectStore(settings.model_dir).get(project_id))

    def resolve(ref: str, task: dict) -> str:
        return str(fetch_image_file(ref, task.get("id"), options, cache / str(task.get("id"))))

    return resolve


class _Heartbeat:
    """Touches the job's row every ``interval`` seconds (with the latest progress) while the
    job runs: a fresh heartbeat means a live worker owns the job."""

    def __init__(self, store: AnnotationStore, job_id: str, interval: float) -> None:
        self.store, self.job_id, self.interval = store, job_id, interval
        self.progress: dict[str, Any] = {"phase": "preparing"}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{job_id[:6]}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.set_state(self.job_id, "running", progress=self.progress)
            except Exception as exc:  # a missed beat must not kill training
                log.warning("job %s: heartbeat not recorded: %s", self.job_id, exc)
