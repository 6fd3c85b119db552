"""The demo recipe's parts: the robustness renderer, the generator's rendering variation
and absent-object task, the demo tower's stride-16 fusion and token merge, the task
scores of the evaluation, and the perception pre-training loops (resumable)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextchat_core.batch import collate
from nextchat_core.build import build_model, from_pretrained, save_pretrained
from nextchat_core.config import get_preset
from nextchat_core.image_processing import ImageProcessor
from nextchat_core.masks import coco_segmentation_to_mask, mask_to_box
from nextchat_core.predictor import Answer, Detection
from nextchat_core.tokenizer import train_bpe_tokenizer
from training import demo, demo_pretrain, robust_render, synth
from training.data import read_refexp_jsonl
from training.evaluation import evaluate_predictor
from training.trainer import TrainConfig, train

# ----------------------------------------------------------------- robustness renderer


def test_robust_split_is_deterministic_jpeg_with_consistent_records(tmp_path):
    a = robust_render.write_split(tmp_path / "a", 3, 12)
    b = robust_render.write_split(tmp_path / "b", 3, 12)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert rows and {r["task"] for r in rows} == {"rec"}
    for r in rows:
        data = (a.parent / r["image"]).read_bytes()
        assert data[:2] == b"\xff\xd8", "the split's images are the JPEG files themselves"
        assert data == (b.parent / r["image"]).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (r["width"], r["height"])
        w, h = r["width"], r["height"]
        assert max(w, h) / min(w, h) <= 3.0 + 1e-6 and min(w, h) >= 128 and max(w, h) <= 640
        for box, rle in zip(r["boxes"], r["masks"], strict=True):
            mask = coco_segmentation_to_mask(rle, w, h)
            assert mask.any() and list(mask_to_box(mask)) == box
        if not r["boxes"]:  # an absent object: a color + shape that is not in the scene
            assert r["answer"] == synth.ABSENT_ANSWER


def test_robust_renderer_draws_sizes_between_and_beyond_the_generators_ranges():
    fractions = []
    for i in range(40):
        _, _, extents = robust_render.render(
            robust_render.scene_rng(9, i), robust_render.RobustConfig()
        )
        fractions.extend(extents.values())
    f = np.array(fractions)
    cfg = synth.SynthConfig()
    assert (f < cfg.small_range[0]).any() and (f > cfg.large_range[1]).any()
    assert ((f > cfg.small_range[1]) & (f < cfg.large_range[0])).any()


# ---------------------------------------------------------------------- the generator


def test_default_scenes_are_unchanged_by_the_rendering_options():
    # The held-out split of every earlier demo model is scene i of EVAL_SEED with the
    # default config: the new options must not move a single pixel of it. (md5 of scene 0
    # of seed 1 as rendered before the options existed.)
    scene = synth.render_scene(synth.scene_rng(1, 0), synth.SynthConfig())
    assert hashlib.md5(scene.image.tobytes()).hexdigest() == "edf99431c3380ccc1de580e42e061943"


def test_varied_renderings_keep_masks_boxes_and_labels():
    cfg = demo.training_synth_config()
    kinds = set()
    for scene, records in synth.generate(5, 30, cfg):
        kinds.add(scene.background.kind)
        for o in scene.objects:
            assert o.mask.any() and list(mask_to_box(o.mask)) == list(o.box)
        for r in records:
            assert len(r["boxes"]) == len(r["masks"])
    assert "texture" in kinds
    # rendering variation really happens: anti-aliased edges have in-between colors
    aa = synth.render_scene(
        synth.scene_rng(0, 0), synth.SynthConfig(antialias_prob=1.0, backgrounds=("plain",))
    )
    flat = synth.render_scene(synth.scene_rng(0, 0), synth.SynthConfig(backgrounds=("plain",)))
    assert len(np.unique(aa.image.reshape(-1, 3), axis=0)) > len(
        np.unique(flat.image.reshape(-1, 3), axis=0)
    )


def test_absent_records_name_what_is_not_there_and_answer_without_at():
    cfg = synth.SynthConfig(task_mix={"absent": 1.0}, records_per_scene=2)
    mcfg = get_preset("demo")
    n = 0
    for scene, records in synth.generate(7, 20, cfg):
        present = {(o.color, o.shape) for o in scene.objects}
        for r, sample in zip(records, synth.to_samples(scene, records, mcfg), strict=True):
            n += 1
            assert r["task"] == "rec" and r["boxes"] == [] and r["answer"] == synth.ABSENT_ANSWER
            _, color, shape = r["expression"].split()
            assert (color, shape) not in present
            assert (
                sample.turns[-1].text == synth.ABSENT_ANSWER and "<at>" not in sample.turns[-1].text
            )
    assert n == 40


# ---------------------------------------------------------------------- the demo tower


def test_demo_tower_fuses_stride_16_and_merges_2x2_cells_per_token():
    torch.manual_seed(0)
    tower = build_model("demo").vision_tower.eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        fmap = tower.feature_map(x)  # B x 256 x 16 x 16
        tokens = tower(x)  # B x 64 x 1024
    assert fmap.shape == (2, 256, 16, 16) and tokens.shape == (2, 64, 1024)
    # token (row 2, col 3) = cells (4..5, 6..7), row-major within the block, + position code
    expected = torch.cat([fmap[:, :, 4 + dy, 6 + dx] for dy in (0, 1) for dx in (0, 1)], dim=1)
    got = tokens[:, 2 * 8 + 3] - tower.pos_embed[2 * 8 + 3]
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_released_preset_keeps_clip_without_fusion_or_merge():
    cfg = get_preset("nextchat-7b-336")
    assert cfg.vision.backbone == "clip" and not cfg.vision.fuse_previous_stage
    assert cfg.vision.token_merge == 1
    with pytest.raises(ValueError, match="conv backbones"):
        cfg.vision.token_merge = 2
        cfg.validate()


# -------------------------------------------------------------------- the task scores


class _ScriptedPredictor:
    """Answers chosen by the test (the scoring is what is under test, not a model)."""

    def __init__(self, reply):
        self.reply = reply

    def predict_batch(self, images, queries, **_):
        return [self.reply(q, images) for q in queries]


def _split(tmp_path: Path) -> Path:
    cfg = synth.SynthConfig(
        task_mix={"rec": 1.0, "absent": 1.0, "caption": 1.0, "chat": 1.0}, records_per_scene=4
    )
    return synth.write_dataset(tmp_path / "split", 3, 6, cfg).jsonl


def test_evaluation_scores_absent_prompts_captions_and_yes_no(tmp_path):
    samples = read_refexp_jsonl(_split(tmp_path), get_preset("demo"))

    def key(image, task, text, boxes):
        digest = hashlib.md5(np.asarray(image).tobytes()).hexdigest()
        return (digest, task, text if task != "caption" else tuple(map(tuple, boxes)))

    truth = {
        key(
            Image.open(r.image).convert("RGB"),
            {"rec": "ground"}.get(r.task, r.task),
            r.text,
            r.boxes,
        ): r
        for r in samples.records
    }

    def perfect(q, images):
        rec = truth[key(images[q.image_index], q.task, q.prompt, q.boxes)]
        dets = [Detection(np.asarray(b, dtype=float), 1.0) for b in rec.boxes if rec.task == "rec"]
        return Answer(q.prompt, rec.answer or "Answer: <at> <boxes> .", dets)

    report = evaluate_predictor(_ScriptedPredictor(perfect), samples, with_masks=False)
    assert report["n_absent"] and report["n_captions"] and report["n_yes_no"]
    assert report["absent_no_box_rate"] == 1.0
    assert report["caption_acc"] == 1.0 and report["yes_no_acc"] == 1.0
    assert report["rec_acc"] == 1.0
    assert report["present_with_region_rate"] == 1.0
    assert report["confidence"]["n_correct"] == report["confidence"]["n_regions"] > 0

    def always_a_box_and_yes(q, images):
        return Answer(
            q.prompt, "Yes, a large red star.", [Detection(np.array([0.0, 0, 9, 9]), 1.0)]
        )

    report = evaluate_predictor(_ScriptedPredictor(always_a_box_and_yes), samples, with_masks=False)
    assert report["absent_no_box_rate"] == 0.0 and report["caption_acc"] == 0.0
    # a region for every prompt, absent objects included, all of them wrong
    conf = report["confidence"]
    assert conf["n_regions"] == report["n_box_records"] + report["n_absent"]
    assert conf["n_correct"] == 0 and conf["auroc"] is None and conf["ece"] == 1.0
    yes = [r for r in samples.records if r.task == "chat" and r.answer.startswith("Yes")]
    assert report["yes_no_acc"] == pytest.approx(len(yes) / report["n_yes_no"])


# ----------------------------------------------------------- perception pre-training


def _init(tmp_path: Path) -> str:
    mcfg = get_preset("demo")
    texts = ["Where is the red circle?", "There is none.", "a small red circle", "Yes No"]
    torch.manual_seed(0)
    return str(
        save_pretrained(
            build_model(mcfg), tmp_path / "init", train_bpe_tokenizer(texts, config=mcfg)
        )
    )


@pytest.mark.timeout(600)
def test_vision_pretraining_trains_only_the_tower_and_resumes_bit_identically(tmp_path):
    init = _init(tmp_path)
    cfg = demo.training_synth_config()
    phase = demo_pretrain.PretrainPhase("vision", 4, 2e-3, batch_size=2, save_every=2, warmup=1)
    held_out = [synth.render_scene(synth.scene_rng(1, i), synth.SynthConfig()) for i in range(2)]
    whole = demo_pretrain.pretrain_vision(
        init, tmp_path / "whole", phase, cfg, eval_scenes=held_out
    )
    # the same phase, interrupted after 2 steps, then rerun
    demo_pretrain.pretrain_vision(init, tmp_path / "split", phase, cfg, stop_after=2)
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    resumed = demo_pretrain.pretrain_vision(
        init, tmp_path / "split", phase, cfg, eval_scenes=held_out
    )
    a, b, start = (from_pretrained(p).model.state_dict() for p in (whole, resumed, init))
    for key in a:
        assert torch.equal(a[key], b[key]), key
        if not key.startswith("vision_tower."):
            assert torch.equal(a[key], start[key]), f"{key} trained outside the tower"
    assert any(not torch.equal(a[k], start[k]) for k in a if k.startswith("vision_tower.model."))
    report = json.loads((tmp_path / "whole" / "readout.json").read_text())
    assert {"color", "shape", "size", "mean_iou", "recall"} <= set(report["large"])


@pytest.mark.timeout(600)
def test_pretraining_under_bf16_autocast_keeps_float32_weights_and_learns(tmp_path):
    # bf16 is the forward's arithmetic (CPU autocast), not what is stored: the tower's
    # weights stay float32, and the loss falls as it does in float32
    init = _init(tmp_path)
    cfg = demo.training_synth_config()
    phase = demo_pretrain.PretrainPhase(
        "vision", 8, 2e-3, batch_size=2, warmup=1, log_every=4, precision="bf16"
    )
    done = demo_pretrain.pretrain_vision(init, tmp_path / "bf16", phase, cfg)
    state = from_pretrained(done).model.state_dict()
    tower = [v for k, v in state.items() if k.startswith("vision_tower.")]
    assert {v.dtype for v in tower if v.is_floating_point()} == {torch.float32}
    start = from_pretrained(init).model.state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in state if k.startswith("vision_tower."))
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0]
    done = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["done"] and done["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision must be 'auto', 'fp32' or 'bf16', got 'fp16'"):
        demo_pretrain.pretrain_vision(
            init, tmp_path / "bad", dataclasses.replace(phase, precision="fp16"), cfg
        )


def test_vision_targets_put_each_object_at_its_centre_cell():
    scene = synth.render_scene(synth.scene_rng(2, 3), synth.SynthConfig())
    t = demo_pretrain.vision_targets(scene, 16)
    centres = np.nonzero(t.objectness > 0)[0]
    assert 1 <= len(centres) <= len(scene.objects)
    for k in centres:
        assert t.center_color[k] >= 0 and t.center_shape[k] >= 0 and (t.center_box[k] > 0).all()
    flipped = demo_pretrain.flip_scene(scene)
    for o, f in zip(scene.objects, flipped.objects, strict=True):
        assert list(mask_to_box(f.mask)) == [float(v) for v in f.box]
        assert o.shape == f.shape and o.color == f.color


def test_a_killed_run_keeps_the_wall_time_of_the_phase_it_was_in(tmp_path):
    # `kill` of a recipe run: the phase's minutes so far go into times.json, so that the
    # resumed run's phase_wall_s is the whole time (the default SIGTERM would lose them)
    previous = signal.getsignal(signal.SIGTERM)
    times = demo._Times(tmp_path / "times.json")
    try:
        demo.stop_cleanly_on_sigterm()
        with pytest.raises(SystemExit) as stopped, times("vision"):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises long before this ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert 0.2 <= times.load()["vision"] < 20


def test_blobs_are_unnamed_shapes_whose_pixels_train_the_tower_but_no_class():
    cfg = synth.SynthConfig(blob_prob=1.0, min_objects=3, max_objects=5)
    scenes = [synth.render_scene(synth.scene_rng(3, i), cfg, scene_id=i) for i in range(6)]
    outlines = set()
    for scene in scenes:
        for o in scene.objects:
            assert o.shape == synth.BLOB and o.mask.any()
            assert list(mask_to_box(o.mask)) == [float(v) for v in o.box]
            outlines.add(int(o.mask.sum()))
    assert len(outlines) > 10  # random outlines, not one polygon
    t = demo_pretrain.vision_targets(scenes[0], 16)
    centres = t.objectness > 0
    assert centres.any() and (t.center_shape[centres] == synth.IGNORE_CLASS).all()
    boxes = t.center_box[centres]  # distances from the cell centre: width and height > 0
    assert (t.center_color[centres] >= 0).all() and (boxes[:, [0, 1]] + boxes[:, [2, 3]] > 0).all()
    covered = t.cell_has > 0
    assert (t.cell_shape[covered] == synth.IGNORE_CLASS).all()
    assert (t.cell_shape[~covered] == demo_pretrain.N_SHAPES).all()
    # the loss learns colour, objectness and box from blobs, no shape class, and stays finite
    readout = demo_pretrain.VisionReadout(8)
    out = readout(torch.randn(len(scenes), 8, 16, 16))
    targets = demo_pretrain._stack([demo_pretrain.vision_targets(s, 16) for s in scenes])
    parts = demo_pretrain.vision_loss(out, targets)
    assert "center_shape" not in parts and {"center_color", "center_box", "cell_shape"} <= set(
        parts
    )
    assert all(torch.isfinite(v) for v in parts.values())
    # a mix names the shapes it knows; the default stream draws no blob (no extra draw)
    mixed = synth.SynthConfig(blob_prob=0.5, min_objects=4, max_objects=6)
    shapes = {
        o.shape for i in range(10) for o in synth.render_scene(synth.scene_rng(4, i), mixed).objects
    }
    assert synth.BLOB in shapes and shapes - {synth.BLOB}
    # records cannot name a blob
    with pytest.raises(ValueError, match=r"blob_prob=0\.5: blobs have no name"):
        next(synth.generate(0, 1, mixed))
    with pytest.raises(ValueError, match="blob_prob must lie in"):
        synth.SynthConfig(blob_prob=1.5)


# ---------------------------------------------------- language stages on cached features


def _demo_model():
    torch.manual_seed(0)
    return build_model("demo").eval()


def test_cached_features_are_the_frozen_towers_and_train_as_the_rendered_scene(tmp_path):
    model = _demo_model()
    mcfg = model.config
    texts = ["Where is the red circle?", "There is none.", "a small red circle", "Yes No"]
    tokenizer = train_bpe_tokenizer(texts, config=mcfg)
    scfg = demo.training_synth_config(task_mix=dict(demo.LANGUAGE_MIX), records_per_scene=3)
    pool = demo.CachedSynthStream(
        model, mcfg, seed=3, n_scenes=5, synth_config=scfg, grid=8, path=tmp_path / "pool.pt"
    )
    assert len(pool) > 5  # several records per scene
    processor = ImageProcessor(mcfg)
    picks = [0, len(pool) // 2, len(pool) - 1]
    rendered = []
    for i in picks:
        scene_id, record = pool.items[i]
        scene = synth.render_scene(synth.scene_rng(3, scene_id), scfg, scene_id=scene_id)
        with torch.no_grad():
            tower = model.vision_tower(processor.tensors([processor(scene.image)])[0])[0]
        cached = pool[i]
        # the tower's eval-mode output, kept in float16
        assert torch.allclose(cached.vision_features.float(), tower, atol=2e-2, rtol=1e-2)
        expected = demo.cell_targets(scene, demo.referred_objects(scene, record), 8)
        assert set(cached.extras) == set(expected)
        for key, value in expected.items():
            assert np.allclose(cached.extras[key], value), key
        sample = synth.to_samples(
            scene, [{**record, "masks": [None] * len(record["boxes"])}], mcfg
        )[0]
        assert [t.text for t in sample.turns] == [t.text for t in cached.turns]
        rendered.append(sample)
    # the same batch from the features and from the images: the same losses
    kwargs = {"tokenizer": tokenizer, "config": mcfg, "num_image_tokens": model.num_image_tokens}
    from_features = collate([pool[i] for i in picks], **kwargs)
    from_images = collate(rendered, **kwargs)
    assert "pixel_values" not in from_features and "vision_features" in from_features
    for key in ("input_ids", "labels", "boxes"):
        assert torch.equal(from_features[key], from_images[key]), key
    with torch.no_grad():
        a = model(**{k: v for k, v in from_features.items() if not k.startswith("aux_")})
        b = model(**{k: v for k, v in from_images.items() if not k.startswith("aux_")})
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-2)
    # a resumed phase reads the pool back; another pool's file is refused
    again = demo.CachedSynthStream(
        model, mcfg, seed=3, n_scenes=5, synth_config=scfg, grid=8, path=tmp_path / "pool.pt"
    )
    assert again.items == pool.items and torch.equal(again.features, pool.features)
    with pytest.raises(ValueError, match="delete it"):
        demo.CachedSynthStream(
            model, mcfg, seed=4, n_scenes=5, synth_config=scfg, grid=8, path=tmp_path / "pool.pt"
        )
    # a batch cannot mix the two kinds of samples
    with pytest.raises(ValueError, match="mixes"):
        collate([pool[0], rendered[0]], **kwargs)


def test_features_replace_pixels_only_for_a_frozen_tower():
    model = _demo_model()
    features = torch.zeros(1, model.num_image_tokens, model.config.vision.hidden_size)
    ids = torch.tensor([[model.config.tokens.bos_id] + [model.config.tokens.im_patch_id] * 64])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), vision_features=features)
    model.vision_tower.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen vision tower only"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), vision_features=features)


@pytest.mark.timeout(600)
def test_a_frozen_batchnorm_tower_keeps_its_statistics_through_training_and_evaluations(
    tmp_path,
):
    """The demo tower is a BatchNorm ResNet frozen after its pre-training: the language
    stages must neither normalize with each batch's statistics nor update the stored ones,
    also after a mid-stage evaluation (which once put the whole model back in train mode)."""
    init = _init(tmp_path)
    before = {
        k: v.clone()
        for k, v in from_pretrained(init).model.state_dict().items()
        if k.startswith("vision_tower.") and ("running_" in k or "num_batches" in k)
    }
    assert before
    scfg = demo.training_synth_config(task_mix={"rec": 1.0})
    mcfg = get_preset("demo")
    stream = demo.SynthStream(mcfg, seed=5, n=64, synth_config=scfg, grid=8)
    config = TrainConfig(
        stage=2,
        init=init,
        data=[],
        steps=3,
        batch_size=2,
        lr=1e-3,
        output_dir=str(tmp_path / "run"),
        eval_every=2,  # steps 1-2, an evaluation, step 3
        eval_max=1,
        save_every=100,
    )
    rec_only = synth.SynthConfig(task_mix={"rec": 1.0}, records_per_scene=1)
    held_out = read_refexp_jsonl(synth.write_dataset(tmp_path / "held", 3, 1, rec_only).jsonl, mcfg)
    result = train(config, samples=stream, eval_samples=held_out)
    after = from_pretrained(result.final_dir).model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed while the tower was frozen"


# ------------------------------------------------------------------ region captions


def test_a_caption_refers_to_the_object_of_its_input_region():
    scfg = synth.SynthConfig(task_mix={"caption": 1.0}, records_per_scene=3)
    seen = 0
    for scene, records in synth.generate(5, 6, scfg):
        for record in records:
            [box] = record["boxes"]
            [i] = demo.referred_objects(scene, record)
            assert [int(v) for v in scene.objects[i].box] == [int(v) for v in box]
            assert record["answer"] == synth.caption_of(scene.objects[i])
            cells = demo.cell_targets(scene, [i], 8)
            # the cells the answer must read describe that object, and they are flagged
            assert cells["point"].any() and (cells["ref"][cells["point"] > 0] == 1).all()
            seen += 1
    assert seen >= 6


def test_the_caption_pointing_loss_reads_the_regions_cells_from_the_answer_only():
    mcfg = get_preset("demo")
    aux = demo.DemoAux(mcfg)
    tok = mcfg.tokens
    q, a = 7, 9  # any text ids
    # a caption (region in the question, a text answer) and a referring expression
    # (its answer's <at> is after the image: the pointing loss's, not this one's)
    caption = [tok.bos_id, q, tok.at_id, tok.boxes_id, q] + [tok.im_patch_id] * 4 + [q, a, a, a]
    rec = [tok.bos_id, q, q, q, q] + [tok.im_patch_id] * 4 + [q, tok.at_id, tok.boxes_id, a]
    ids = torch.tensor([caption, rec])
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    patches = ids == tok.im_patch_id
    point = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    t = ids.shape[1]

    def loss(cells: list[int]) -> float:
        attention = torch.full((2, mcfg.llm.num_heads, t, t), 1e-3)
        attention[:, :, :, 5 + torch.tensor(cells)] = 1.0 / len(cells)
        out = aux._caption_point_loss(attention, ids, labels, patches, point)
        assert out is not None
        return float(out)

    assert loss([1, 2]) < 0.05  # all of the answer's attention on the region's cells
    assert loss([0, 3]) > 3.0  # on the other cells
    # the rec row is left to the <at> pointing loss; without a caption there is no term
    assert (
        aux._caption_point_loss(
            torch.ones(1, mcfg.llm.num_heads, t, t), ids[1:], labels[1:], patches[1:], point[1:]
        )
        is None
    )


def test_the_caption_read_loss_names_the_regions_colour_and_shape_from_the_head():
    mcfg = get_preset("demo")
    aux = demo.DemoAux(mcfg)
    tok = mcfg.tokens
    q, a = 7, 9
    caption = [tok.bos_id, q, tok.at_id, tok.boxes_id, q] + [tok.im_patch_id] * 4 + [q, a, a, a]
    ids = torch.tensor([caption])
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    patches = ids == tok.im_patch_id
    n_colors, n_shapes = len(synth.COLORS), len(synth.SHAPES)
    batch = {
        "aux_point": torch.tensor([[0.0, 1.0, 1.0, 0.0]]),
        "aux_color": torch.tensor([[n_colors, 3, 3, n_colors]]),
        "aux_shape": torch.tensor([[n_shapes, 2, 2, n_shapes]]),
    }
    heads = torch.randn(1, ids.shape[1], mcfg.llm.hidden_size)
    with torch.no_grad():
        got = aux._caption_read_loss(heads, ids, labels, patches, batch)
        logits = aux.read_class(heads[0, -4:-1, : aux.head_dim])
    # the three positions that predict the answer's tokens (the last three's predecessors)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :n_colors], torch.tensor([3, 3, 3])
    ) + torch.nn.functional.cross_entropy(logits[:, n_colors:], torch.tensor([2, 2, 2]))
    assert got is not None and got.item() == pytest.approx(expected.item(), rel=1e-5)
    # a row that refers to nothing (an absent prompt, a "No.") is no caption
    batch["aux_point"] = torch.zeros(1, 4)
    assert aux._caption_read_loss(heads, ids, labels, patches, batch) is None
