"""The frozen encoders' outputs, computed once per image for a training run.

NExT-Chat never trains CLIP, and SAM's image encoder trains in no stage: for a fixed set of
records (a retraining job's corrections, their pasted copies, the replay buffer) the vision
tower's output and SAM's image embedding of an image are the same at every step. A
:class:`FeatureCache` computes them once - in batches, in eval mode, as the training forward
runs a frozen tower (``NextChatModel.train``) - and :meth:`FeatureCache.samples` serves them
in place of the pixels: a step then decodes, resizes and encodes no image (the demo recipe's
``CachedSynthStream`` does the same for its synthetic pools).

One cache serves the stages of a job: stage 2 fills the tower's features, stage 3 adds SAM's
embeddings of its masked records and reuses the rest. Entries are keyed by the record's image
(a path by value, an array or lazily built image by identity) and belong to the encoders'
weights they were computed with: a fingerprint of those weights is kept, and a stage whose
encoders differ (a job that trains the tower) empties the cache first. Features are kept in
float32 on the CPU, so a cached step computes what an uncached one does (up to the batched
convolutions' rounding); ``budget_mb`` caps the memory, and a set that does not fit trains
uncached (logged).

Written here rather than taken from a library: the encoders are NExT-Chat's own modules, and
what may be cached (frozen in this stage, same weights as when computed) is a fact of this
model's stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from nextchat_core.batch import Sample, process_image
from nextchat_core.image_processing import ImageProcessor

from .data import Record, SampleSet, image_key, load_record_image, record_to_sample

log = logging.getLogger(__name__)


def _frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _fingerprint(module: torch.nn.Module) -> tuple[float, ...]:
    """A cheap summary of a module's weights (buffers included: BatchNorm statistics)."""
    with torch.no_grad():
        return tuple(
            float(t.detach().double().sum()) + float(t.detach().double().abs().sum())
            for t in (*module.parameters(), *module.buffers())
            if t.is_floating_point()
        )


class FeatureCache:
    """Per-image frozen-encoder outputs for the records of one training job (see the module
    docstring). ``budget_mb`` <= 0 disables it."""

    def __init__(self, budget_mb: float) -> None:
        self.budget_mb = budget_mb
        self._vision: dict[Any, torch.Tensor] = {}
        self._sam: dict[Any, torch.Tensor] = {}
        self._size: dict[Any, tuple[int, int]] = {}  # the original (width, height)
        self._keep: dict[Any, Any] = {}  # an image kept by identity stays alive (ids unique)
        self._prints: dict[str, tuple[float, ...]] = {}
        self.computed_s = 0.0

    def __len__(self) -> int:
        return len(self._vision)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for d in (self._vision, self._sam) for t in d.values()
        )

    def samples(
        self,
        train_set: SampleSet,
        model: Any,
        *,
        masks: bool,
        batch_size: int = 16,
    ) -> SampleSet | None:
        """``train_set`` served from the cache (filled first for what it lacks), or ``None``
        when it cannot be: the cache is off, the set is not a plain list of records, the
        tower (or, for a stage with masks, SAM's image encoder) trains, or the features
        would not fit ``budget_mb``. The reason is logged."""
        why = self._refusal(train_set, model, masks)
        if why:
            log.info("training without cached image features: %s", why)
            return None
        records = train_set.records
        self._check_weights("vision", model.vision_tower)
        if masks:
            self._check_weights("sam", model.sam.image_encoder)
        need_vision = self._missing(records, self._vision)
        need_sam = self._missing(records, self._sam) if masks else {}
        estimate = self.nbytes + self._bytes_per_image(model, need_vision, need_sam)
        if estimate > self.budget_mb * 2**20:
            log.info(
                "training without cached image features: %d images would need %.0f MB, "
                "over the cache's %g MB (RETRAIN_FEATURE_CACHE_MB, or feature_cache_mb of "
                "a training config: raise it, or 0 to turn the cache off)",
                len(set(need_vision) | set(need_sam)) + len(self),
                estimate / 2**20,
                self.budget_mb,
            )
            return None
        t0 = time.perf_counter()
        self._fill(model, need_vision, need_sam, batch_size)
        seconds = time.perf_counter() - t0
        self.computed_s += seconds
        log.info(
            "cached image features of %d images (%d SAM embeddings) in %.1f s: %.0f MB",
            len(need_vision),
            len(need_sam),
            seconds,
            self.nbytes / 2**20,
        )
        return CachedSampleSet(records, train_set.config, self, masks=masks)

    def sample(self, record: Record, config: Any, *, masks: bool) -> Sample:
        k = image_key(record)
        sample = record_to_sample(record, config, image=self._size[k])
        sample.vision_features = self._vision[k]
        if masks:
            sample.sam_embedding = self._sam[k]
        else:
            sample.masks = None
        return sample

    # ------------------------------------------------------------------ internals
    def _refusal(self, train_set: SampleSet, model: Any, masks: bool) -> str:
        if self.budget_mb <= 0:
            return "its budget is 0 MB (RETRAIN_FEATURE_CACHE_MB / feature_cache_mb)"
        if type(train_set) not in (SampleSet, CachedSampleSet):
            return f"{type(train_set).__name__} makes its samples as it goes"
        if not _frozen(model.vision_tower):
            return "the vision tower trains in this stage"
        if masks and not _frozen(model.sam.image_encoder):
            return "SAM's image encoder trains in this stage"
        return ""

    def _check_weights(self, name: str, module: torch.nn.Module) -> None:
        now = _fingerprint(module)
        if name in self._prints and self._prints[name] != now:
            log.info("the %s changed since its features were cached: computing them again", name)
            (self._vision if name == "vision" else self._sam).clear()
        self._prints[name] = now

    def _missing(
        self, records: Iterable[Record], have: dict[Any, torch.Tensor]
    ) -> dict[Any, Record]:
        out: dict[Any, Record] = {}
        for r in records:
            k = image_key(r)
            if k not in have and k not in out:
                out[k] = r
        return out

    @staticmethod
    def _bytes_per_image(model: Any, vision: dict, sam: dict) -> int:
        cfg = model.config
        v = model.num_image_tokens * model.mm_projector[0].in_features * 4
        side = cfg.sam.image_size // cfg.sam.patch_size  # SAM's embedding grid
        s = cfg.sam.prompt_dim * side * side * 4
        return len(vision) * v + len(sam) * s

    def _fill(self, model: Any, vision: dict, sam: dict, batch_size: int) -> None:
        processor = ImageProcessor(model.config)
        device = next(model.parameters()).device
        keys = list(dict.fromkeys([*vision, *sam]))
        records = {**sam, **vision}
        tower, encoder = model.vision_tower, model.sam.image_encoder
        modes = tower.training, encoder.training
        tower.eval(), encoder.eval()
        try:
            for lo in range(0, len(keys), batch_size):
                chunk = keys[lo : lo + batch_size]
                images = []
                for k in chunk:
                    r = records[k]
                    images.append(process_image(processor, load_record_image(r), r.source))
                with_sam = any(k in sam for k in chunk)
                pixel_values, sam_pixel_values = processor.tensors(images, sam=with_sam)
                with torch.no_grad():
                    if any(k in vision for k in chunk):
                        feats = tower(pixel_values.to(device)).float().cpu()
                    if sam_pixel_values is not None:  # processor.tensors(sam=True)
                        emb = model.encode_sam_images(sam_pixel_values.to(device)).float().cpu()
                for i, k in enumerate(chunk):
                    if k in vision:
                        self._vision[k] = feats[i].clone()
                    if k in sam:
                        self._sam[k] = emb[i].clone()
                    self._size[k] = (images[i].width, images[i].height)
                    if not isinstance(k, str):
                        self._keep[k] = records[k].image
        finally:
            tower.train(modes[0]), encoder.train(modes[1])


class CachedSampleSet(SampleSet):
    """The records of a :class:`SampleSet` whose samples carry the cached encoder outputs
    instead of their images (``masks``: whether the stage feeds mask targets)."""

    def __init__(self, records: list[Record], config: Any, cache: FeatureCache, *, masks: bool):
        super().__init__(records, config)
        self.cache, self.masks = cache, masks

    def __getitem__(self, i: int) -> Sample:
        return self.cache.sample(self.records[i], self.config, masks=self.masks)
