"""The frozen encoders' outputs cached for a training run (training/feature_cache.py,
RETRAIN_FEATURE_CACHE_MB): a cached step computes what an uncached one does, stages share
the cache, and what must not be cached (a tower that trains, a set that makes its samples as
it goes, more than the budget) is not."""

from __future__ import annotations

import logging

import pytest
import torch
from test_training import config_for, metrics, write_refexp

from nextchat_core.batch import collate
from nextchat_core.build import build_model
from nextchat_core.image_processing import ImageProcessor
from training.data import SampleSet, read_refexp_jsonl
from training.engine import prepare
from training.feature_cache import FeatureCache
from training.retrain import RetrainSettings
from training.stages import get_stage
from training.trainer import train


def _records(tmp_path, tiny_config) -> SampleSet:
    data = write_refexp(tmp_path)
    return read_refexp_jsonl(data, tiny_config)


def _frozen_for(model, stage: int):
    from training.engine import EngineSettings

    prepare(model, get_stage(stage), EngineSettings(lr=1e-3))
    model.train()
    return model


def _cached(tmp_path, tiny_config, stage: int, masks: bool):
    """A tiny model frozen as ``stage`` freezes it, the records, and their cached set."""
    torch.manual_seed(0)
    model = _frozen_for(build_model(tiny_config), stage)
    records = _records(tmp_path, tiny_config)
    cached = FeatureCache(64).samples(records, model, masks=masks)
    assert cached is not None
    return model, records, cached


def _loss(model, samples, tokenizer, config, masks):
    batch = collate(
        samples,
        tokenizer=tokenizer,
        config=config,
        num_image_tokens=model.num_image_tokens,
        processor=ImageProcessor(config),
        with_masks=masks,
    )
    return model(**batch), batch


@pytest.mark.parametrize("stage", [2, 3])
def test_a_cached_batch_computes_what_the_images_compute(
    tmp_path, tiny_config, tiny_tokenizer, stage
):
    torch.manual_seed(0)
    model = _frozen_for(build_model(tiny_config), stage)
    records = _records(tmp_path, tiny_config)
    masks = get_stage(stage).masks
    cache = FeatureCache(64)
    cached = cache.samples(records, model, masks=masks)
    assert cached is not None and len(cached) == len(records)
    # six scenes, and the chat record shares the first one's image: six entries
    assert len(cache) == 6
    picks = [0, 1, 2, 6]
    plain, batch_plain = _loss(
        model, [records[i] for i in picks], tiny_tokenizer, tiny_config, masks
    )
    fast, batch_fast = _loss(model, [cached[i] for i in picks], tiny_tokenizer, tiny_config, masks)
    assert "pixel_values" in batch_plain and "vision_features" in batch_fast
    assert "pixel_values" not in batch_fast
    assert ("sam_image_embeddings" in batch_fast) == masks
    assert "sam_pixel_values" not in batch_fast
    assert fast.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5, abs=1e-6)
    if masks:
        assert plain.mask_logits is not None and fast.mask_logits is not None
        assert torch.allclose(fast.mask_logits, plain.mask_logits, atol=1e-4)
        assert fast.dice_loss.item() == pytest.approx(plain.dice_loss.item(), rel=1e-5)
    else:
        assert fast.lm_loss.item() == pytest.approx(plain.lm_loss.item(), rel=1e-5)
        assert torch.allclose(fast.pred_boxes, plain.pred_boxes, atol=1e-5)


def test_a_training_run_with_the_cache_logs_the_losses_of_one_without(tmp_path, caplog):
    data = write_refexp(tmp_path)
    runs = {}
    for mb in (0, 64):
        cfg = config_for(  # as a train.yaml sets it
            tmp_path,
            data,
            steps=8,
            batch_size=3,
            output_dir=str(tmp_path / f"run{mb}"),
            feature_cache_mb=mb,
        )
        with caplog.at_level(logging.INFO, logger="training.feature_cache"):
            caplog.clear()
            result = train(cfg)
        runs[mb] = [r["loss"] for r in metrics(result.log_path)]
        used = "cached image features of 6 images" in caplog.text
        assert used == bool(mb), caplog.text
    assert len(runs[0]) == 8
    assert runs[64] == pytest.approx(runs[0], rel=1e-4)


def test_the_stages_of_a_job_share_the_cache_and_stage_3_adds_sams_embeddings(
    tmp_path, tiny_config
):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    records = _records(tmp_path, tiny_config)
    cache = FeatureCache(64)
    assert cache.samples(records, _frozen_for(model, 2), masks=False) is not None
    after_stage2 = cache.nbytes
    only_masked = SampleSet([r for r in records.records if r.masks], tiny_config)
    cached = cache.samples(only_masked, _frozen_for(model, 3), masks=True)
    assert cached is not None and len(cache) == 6
    # the tower's features were kept; SAM's embeddings of the six images were added
    side = tiny_config.sam.image_size // tiny_config.sam.patch_size
    sam_bytes = 6 * tiny_config.sam.prompt_dim * side * side * 4
    assert cache.nbytes == after_stage2 + sam_bytes
    assert cached[0].sam_embedding is not None and cached[0].masks is not None
    # a stage that changed the tower (a job that trains it) does not reuse stale features
    old = cached[0].vision_features.clone()
    with torch.no_grad():
        next(model.vision_tower.parameters()).mul_(1.5)
    again = cache.samples(only_masked, _frozen_for(model, 3), masks=True)
    assert again is not None
    assert not torch.allclose(again[0].vision_features, old)


def test_what_cannot_be_cached_is_trained_from_the_images(tmp_path, tiny_config, caplog):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    records = _records(tmp_path, tiny_config)
    with caplog.at_level(logging.INFO, logger="training.feature_cache"):
        # a tower that trains (stage 0 trains everything)
        assert FeatureCache(64).samples(records, _frozen_for(model, 0), masks=True) is None
        assert "the vision tower trains" in caplog.text
        model = _frozen_for(model, 2)
        # over the budget: the job still trains, uncached
        assert FeatureCache(0.01).samples(records, model, masks=False) is None
        assert "would need" in caplog.text and "over the cache's 0.01 MB" in caplog.text
        # off
        assert FeatureCache(0).samples(records, model, masks=False) is None
        assert "its budget is 0 MB" in caplog.text

        class Stream(SampleSet):  # makes its samples as it goes
            def __getitem__(self, i):
                return super().__getitem__(i)

        stream = Stream(records.records, tiny_config)
        assert FeatureCache(64).samples(stream, model, masks=False) is None
        assert "Stream makes its samples as it goes" in caplog.text


def test_the_model_refuses_cached_sam_embeddings_while_sams_encoder_trains(
    tmp_path, tiny_config, tiny_tokenizer
):
    model, _, cached = _cached(tmp_path, tiny_config, 3, masks=True)
    for p in model.sam.image_encoder.parameters():
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen SAM image encoder only"):
        _loss(model, [cached[0]], tiny_tokenizer, tiny_config, True)


def test_a_cached_sample_with_masks_but_no_sam_embedding_is_refused(
    tmp_path, tiny_config, tiny_tokenizer
):
    model, records, cached = _cached(tmp_path, tiny_config, 2, masks=False)
    sample = cached[0]
    sample.masks = records[0].masks  # the record's decoded mask, no SAM embedding
    assert sample.masks is not None and sample.sam_embedding is None
    with pytest.raises(ValueError, match="needs every sample's sam_embedding"):
        _loss(model, [sample], tiny_tokenizer, tiny_config, True)
    # without mask targets (stage 2) the same sample collates
    out, _ = _loss(model, [sample], tiny_tokenizer, tiny_config, False)
    assert torch.isfinite(out.loss)


def test_the_cache_budget_is_read_and_checked(tmp_path):
    data = write_refexp(tmp_path)
    with pytest.raises(ValueError, match="feature_cache_mb must be >= 0"):
        config_for(tmp_path, data, feature_cache_mb=-1).validate()
    assert RetrainSettings.from_env({}).feature_cache_mb == 2048.0
    assert RetrainSettings.from_env({"RETRAIN_FEATURE_CACHE_MB": "0"}).feature_cache_mb == 0.0
    with pytest.raises(ValueError, match="RETRAIN_FEATURE_CACHE_MB"):
        RetrainSettings.from_env({"RETRAIN_FEATURE_CACHE_MB": "-1"})
