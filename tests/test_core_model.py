"""The NExT-Chat core on the tiny preset: shapes, learning, generation, checkpoints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_scene

from nextchat_core import frames, masks
from nextchat_core.batch import collate, grounding_sample
from nextchat_core.build import (
    build_model,
    check_released_shapes,
    from_pretrained,
    inspect_checkpoint,
    map_released_key,
    save_pretrained,
)
from nextchat_core.config import NextChatConfig, get_preset
from nextchat_core.conversation import Turn, encode_conversation, grounding_turns
from nextchat_core.predictor import NextChatPredictor, Query, logit

# A copy of ../shared/data/nextchat-7b-336-state-dict.json (every tensor name and shape of
# the released NExT-Chat-7B-336 state dict), kept in the repo so CI has it.
MANIFEST = Path(__file__).resolve().parent / "data" / "nextchat-7b-336-state-dict.json"

BOX = (20.0, 10.0, 60.0, 50.0)  # original pixels in a 96x64 (non-square) image


def _batch(model, tokenizer, config, *, with_masks=True):
    img, mask = make_scene(box=tuple(int(v) for v in BOX))
    sample = grounding_sample(img, "the red circle", [BOX], config, masks=[mask])
    return (
        collate(
            [sample],
            tokenizer=tokenizer,
            config=config,
            num_image_tokens=model.num_image_tokens,
            with_masks=with_masks,
        ),
        img,
        mask,
    )


def test_forward_output_shapes(tiny_model, tiny_tokenizer, tiny_config):
    batch, _, _ = _batch(tiny_model, tiny_tokenizer, tiny_config)
    out = tiny_model(**batch, return_logits=True)
    b, t = batch["input_ids"].shape
    s = tiny_config.sam.image_size
    assert out.logits.shape == (b, t, tiny_config.llm.vocab_size)
    assert out.pred_boxes.shape == (1, 4)
    assert out.at_hidden.shape == (1, tiny_config.llm.hidden_size)
    assert out.mask_logits.shape == (1, s, s)
    assert out.iou_predictions.shape == (1,)
    for part in (
        "lm_loss",
        "l1_loss",
        "giou_loss",
        "cycle1_loss",
        "cycle2_loss",
        "focal_loss",
        "dice_loss",
        "iou_loss",
    ):
        value = getattr(out, part)
        assert value is not None and value.ndim == 0 and torch.isfinite(value), part
    assert torch.isfinite(out.loss)
    feats = tiny_model.encode_images(batch["pixel_values"])
    assert feats.shape == (1, tiny_model.num_image_tokens, tiny_config.llm.hidden_size)
    emb = tiny_model.encode_sam_images(batch["sam_pixel_values"])
    g = tiny_config.sam.embedding_size
    assert emb.shape == (1, tiny_config.sam.prompt_dim, g, g)


def test_labels_only_on_assistant_turns_and_not_on_boxes(tiny_tokenizer, tiny_config):
    enc = encode_conversation(
        grounding_turns("the red circle", tiny_config, num_boxes=2),
        tiny_tokenizer,
        tiny_config,
        num_image_tokens=16,
    )
    tk = tiny_config.tokens
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100]
    assert tk.at_id in labelled and tk.boxes_id not in labelled
    assert labelled[-1] == tk.eos_id
    assert tk.im_patch_id not in labelled
    assert enc.input_ids.count(tk.im_patch_id) == 16 and enc.num_boxes == 2
    decoded = tiny_tokenizer.decode(labelled)
    assert "Answer:" in decoded and "Where is" not in decoded


@pytest.fixture(scope="module")
def overfit(tiny_config, tiny_tokenizer):
    """The tiny model trained on one sample until it has memorized box and mask."""
    torch.manual_seed(0)
    model = build_model(tiny_config)
    batch, img, mask = _batch(model, tiny_tokenizer, tiny_config)
    steps = 200
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gt = batch["boxes"][0]
    history = []
    for step in range(steps):
        out = model(**batch)
        box_iou = frames.box_iou(out.pred_boxes[0].tolist(), gt.tolist())
        target = batch["mask_targets"][0] > 0.5
        mask_iou = masks.mask_iou((out.mask_logits[0] > 0).numpy(), target.numpy())
        history.append((step, box_iou, mask_iou, float(out.lm_loss.detach())))
        # Stop on the forward that measured the targets (no step after it); a margin
        # above the asserted 0.9 / 0.8 leaves room for the generation-path checks.
        if box_iou > 0.93 and mask_iou > 0.85 and out.lm_loss < 0.15:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, history, img, mask


def test_single_sample_overfit_reaches_box_and_mask_iou(overfit):
    _, history, _, _ = overfit
    step, box_iou, mask_iou, _ = history[-1]
    assert box_iou > 0.9, history[-5:]
    assert mask_iou > 0.8, history[-5:]
    assert step < 199, "did not converge within the step budget"
    assert history[0][1] < 0.9 or history[0][2] < 0.8  # it really had to learn


def test_generation_emits_at_boxes_and_a_box(overfit, tiny_tokenizer):
    model, _, img, mask = overfit
    predictor = NextChatPredictor(model, tiny_tokenizer)
    predictor.set_image(img)
    (answer,) = predictor.predict("the red circle")
    assert "<at> <boxes>" in answer.text, answer.text
    assert len(answer.detections) == 1
    det = answer.detections[0]
    assert frames.box_iou(det.box, BOX) > 0.85, det.box
    # the box-in path: a region caption needs no prompt text, only the region
    (caption,) = predictor.predict("", task="caption", boxes=[list(BOX)])
    assert isinstance(caption.text, str) and caption.prompt == ""
    assert 0.0 < det.score <= 1.0
    assert det.mask is not None and det.mask.shape == mask.shape
    assert masks.mask_iou(det.mask, mask) > 0.7
    assert det.mask_iou is not None and 0.0 <= det.mask_iou <= 1.0
    assert det.score == pytest.approx(det.at_score * det.mask_iou)  # one region, one score


def test_batch_of_prompts_equals_one_by_one(overfit, tiny_tokenizer):
    model, _, img, _ = overfit
    predictor = NextChatPredictor(model, tiny_tokenizer, max_new_tokens=12)
    img2 = np.ascontiguousarray(img[:, ::-1])  # mirrored, so the two images differ
    prompts = ["the red circle", "a blue square on the left side", "all shapes"]
    queries = [Query(i % 2, p) for i, p in enumerate(prompts)]
    batched = predictor.predict_batch([img, img2], queries, batch_size=3)
    for q, got in zip(queries, batched, strict=True):
        (single,) = predictor.predict_batch([[img, img2][q.image_index]], [Query(0, q.prompt)])
        assert got.text == single.text
        assert len(got.detections) == len(single.detections)
        for a, b in zip(got.detections, single.detections, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            assert abs(a.score - b.score) < 1e-4
            assert (a.mask is None) == (b.mask is None)
            if a.mask is not None:
                assert (a.mask != b.mask).mean() < 1e-3


def test_presence_scores_regions_and_gates_absent_prompts(overfit, tiny_tokenizer):
    """Under "exists" scoring a region's score is its prompt's p(yes) (the same number
    ``exists`` gives, batched over images) times SAM's predicted IoU; a prompt under the
    presence threshold returns no region, its boxes held back in ``rejected``."""
    model, _, img, _ = overfit
    img2 = np.ascontiguousarray(img[:, ::-1])
    prompts = ["the red circle", "all shapes"]
    queries = [Query(i, p) for i in (0, 1) for p in prompts]
    scored = NextChatPredictor(model, tiny_tokenizer, presence="exists", presence_threshold=0.0)
    answers = scored.predict_batch([img, img2], queries, batch_size=3)
    plain = NextChatPredictor(model, tiny_tokenizer).predict_batch([img, img2], queries)
    for i, image in enumerate((img, img2)):
        scored.set_image(image, with_masks=False)
        pairs = zip(answers[2 * i : 2 * i + 2], plain[2 * i : 2 * i + 2], strict=True)
        for p_yes, (got, base) in zip(scored.exists(prompts), pairs, strict=True):
            assert got.presence == pytest.approx(p_yes, abs=1e-5)
            assert len(got.detections) == len(base.detections) and got.detections
            for det, ref in zip(got.detections, base.detections, strict=True):
                np.testing.assert_allclose(det.box, ref.box, atol=1e-3)  # same boxes
                assert det.at_score == pytest.approx(ref.at_score, abs=1e-4)
                assert det.score == pytest.approx(p_yes * det.mask_iou, abs=1e-5)
            assert got.score == pytest.approx(min(d.score for d in got.detections))
    # the tiny preset scores by the <at> probability (it never learned yes/no)
    assert plain[0].presence is None
    assert all(d.score == pytest.approx(d.at_score * d.mask_iou) for d in plain[0].detections)
    # the gate: a threshold above every p(yes) holds every box back
    gated = NextChatPredictor(model, tiny_tokenizer, presence="exists", presence_threshold=1.0)
    gated.set_image(img)
    (answer,) = gated.predict("the red circle")
    assert answer.detections == [] and len(answer.rejected) == len(plain[0].detections)
    assert answer.score == pytest.approx(1.0 - answer.presence)
    np.testing.assert_allclose(answer.rejected[0].box, plain[0].detections[0].box, atol=1e-3)
    # captions and chat are not asked whether they exist
    (caption,) = gated.predict("", task="caption", boxes=[list(BOX)])
    assert caption.presence is None
    # a calibration fitted for "exists" (Platt scaling of both logits) replaces the product
    model.config.score.calibration = {"masks": [2.0, 1.5, -0.5], "boxes": [1.0, 0.25]}
    model.config.score.presence = "exists"
    try:
        for with_masks in (True, False):
            scored.set_image(img, with_masks=with_masks)
            (a,) = scored.predict("the red circle", with_masks=with_masks)
            d = a.detections[0]
            z = (
                2.0 * logit(a.presence) + 1.5 * logit(d.mask_iou) - 0.5
                if with_masks
                else 1.0 * logit(a.presence) + 0.25
            )
            assert d.score == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-6)
        # fitted for "exists": a predictor told to score by <at> keeps the product
        at = NextChatPredictor(model, tiny_tokenizer, presence="at")
        at.set_image(img)
        (a,) = at.predict("the red circle")
        d = a.detections[0]
        assert d.score == pytest.approx(d.at_score * d.mask_iou)
    finally:
        model.config.score.calibration = None
        model.config.score.presence = "at"
    with pytest.raises(ValueError, match="presence must be"):
        NextChatPredictor(model, tiny_tokenizer, presence="maybe")  # type: ignore[arg-type]


def test_exists_question_asks_for_an_object_not_the_object(tiny_config):
    from nextchat_core.conversation import chat_turns, exists_turns

    def asked(expr: str) -> str:
        return exists_turns(expr, tiny_config)[0].text

    def want(expr: str) -> str:  # the template's question about ``expr``
        question = tiny_config.template.exists_question.format(expr=expr)
        return chat_turns(question, tiny_config)[0].text

    assert asked("the red circle") == want("a red circle")
    assert asked("The orange star") == want("an orange star")
    assert asked(" all red shapes ") == want("a red shape")
    assert asked("all people on the left") == want("a person on the left")
    assert asked("all of it") == want("all of it")  # no plural after "all": as typed
    assert asked("red circles") == want("red circles")
    assert asked("the") == want("the")  # nothing after it: left as typed


def test_static_cache_decoding_equals_dynamic(overfit, tiny_tokenizer):
    """The fixed-shape decoding path (what CUDA graphs capture on a GPU) gives the same
    answers as the dynamic KV cache, left padding included."""
    model, _, img, _ = overfit
    predictor = NextChatPredictor(model, tiny_tokenizer, max_new_tokens=10)
    queries = [
        Query(0, "the red circle"),
        Query(0, "a blue square on the left side"),
        Query(0, "all shapes"),
    ]
    dynamic = predictor.predict_batch([img], queries, batch_size=3)
    static = predictor.predict_batch([img], queries, batch_size=3, static_cache=True)
    for a, b in zip(dynamic, static, strict=True):
        assert a.text == b.text
        assert len(a.detections) == len(b.detections)
        for da, db in zip(a.detections, b.detections, strict=True):
            np.testing.assert_allclose(da.box, db.box, atol=1e-4)


def test_save_load_is_bit_exact(tiny_model, tiny_tokenizer, tmp_path):
    path = save_pretrained(tiny_model, tmp_path / "ckpt", tiny_tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    loaded = from_pretrained(path)
    a, b = tiny_model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (name, buf_a), (_, buf_b) in zip(
        tiny_model.named_buffers(), loaded.model.named_buffers(), strict=True
    ):
        assert torch.equal(buf_a, buf_b), name
    assert (
        loaded.tokenizer("the red circle")["input_ids"]
        == tiny_tokenizer("the red circle")["input_ids"]
    )
    # same outputs, not only the same tensors
    img, _ = make_scene()
    p1, p2 = (
        NextChatPredictor(tiny_model, tiny_tokenizer, max_new_tokens=6),
        NextChatPredictor(loaded.model, loaded.tokenizer, max_new_tokens=6),
    )
    p1.set_image(img)
    p2.set_image(img)
    assert p1.predict("the red circle")[0].text == p2.predict("the red circle")[0].text
    assert inspect_checkpoint(path)["preset"] == "tiny"


def test_checkpoint_of_another_preset_is_a_clear_error(tiny_model, tiny_tokenizer, tmp_path):
    path = save_pretrained(tiny_model, tmp_path / "tiny", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"preset 'tiny', expected 'demo'"):
        from_pretrained(path, expected_preset="demo")
    # weights of one preset under the config of another: a shape error naming the key
    cfg = json.loads((path / "config.json").read_text())
    cfg["llm"]["hidden_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"language_model\.model\.embed_tokens\.weight: checkpoint \[512, 64\] vs model \[512, 128\]",
    ):
        from_pretrained(path)


def test_released_manifest_maps_onto_the_7b_preset_exactly():
    data = json.loads(MANIFEST.read_text())
    model = build_model("nextchat-7b-336", device="meta")
    assert sum(p.numel() for p in model.parameters()) == data["num_parameters"] == 7_741_812_788
    full = check_released_shapes(model, data["tensors"])
    assert (len(full.missing), len(full.unexpected), len(full.mismatched)) == (0, 0, 0)
    assert full.mapped + len(full.ignored) == data["num_tensors"] == 1324
    assert all(k.endswith("rotary_emb.inv_freq") for k in full.ignored)
    no_clip = {k: v for k, v in data["tensors"].items() if not k.startswith("model.vision_tower.")}
    assert len(data["tensors"]) - len(no_clip) == 391
    part = check_released_shapes(model, no_clip, include_vision=False)
    assert (len(part.missing), len(part.unexpected), len(part.mismatched)) == (0, 0, 0)
    own = set(model.state_dict())
    assert part.mapped == len([k for k in own if not k.startswith("vision_tower.")])
    # a mis-shaped key is reported with both shapes
    bad = dict(data["tensors"], **{"loc_decoder.0.weight": [2048, 4000]})
    report = check_released_shapes(model, bad)
    assert report.mismatched == [
        "loc_decoder.0.weight: checkpoint [2048, 4000] vs model [2048, 4096]"
    ]
    assert (
        map_released_key("sam.model.mask_decoder.iou_token.weight")
        == "sam.mask_decoder.iou_token.weight"
    )
    assert map_released_key("model.layers.3.self_attn.rotary_emb.inv_freq") is None
    assert inspect_checkpoint(manifest=MANIFEST)["missing"] == 0


def _write_released_layout(model, tokenizer, path: Path, *, with_vision: bool = True) -> None:
    """Save ``model`` the way the NExT-Chat release is laid out: keys renamed to the
    release's names, two pickled ``.bin`` shards, an index and a HF-style config.json."""
    from nextchat_core.build import RELEASED_INDEX

    released = {}
    own = model.state_dict()
    for key, tensor in own.items():
        if key.startswith("vision_tower.model."):
            if not with_vision:
                continue
            name = "model.vision_tower.vision_model." + key[len("vision_tower.model.") :]
        elif key.startswith("mm_projector."):
            name = "model." + key
        elif key.startswith("language_model."):
            name = key[len("language_model.") :]
        elif key.startswith("sam."):
            name = "sam.model." + key[len("sam.") :]
        else:
            name = key
        assert map_released_key(name, own.keys()) == key
        released[name] = tensor.clone()
    # persistent in transformers 4.31, so the real shards carry them; the loader skips them
    released["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(released)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    path.mkdir(parents=True, exist_ok=True)
    for shard, keys in shards.items():
        torch.save({k: released[k] for k in keys}, path / shard)
    index = {"weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (path / RELEASED_INDEX).write_text(json.dumps(index))
    (path / "config.json").write_text(
        json.dumps({"model_type": "nextchat", "architectures": ["NextChatForSegLM"]})
    )
    tokenizer.save_pretrained(str(path))


def test_released_layout_loads_with_weights_only(tiny_model, tiny_tokenizer, tiny_config, tmp_path):
    _write_released_layout(tiny_model, tiny_tokenizer, tmp_path / "rel")
    loaded = from_pretrained(tmp_path / "rel", config=tiny_config)
    assert loaded.layout == "released"
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[key]), key
    img, _ = make_scene()
    a = NextChatPredictor(tiny_model, tiny_tokenizer, max_new_tokens=5)
    b = NextChatPredictor(loaded.model, loaded.tokenizer, max_new_tokens=5)
    a.set_image(img)
    b.set_image(img)
    assert a.predict("the red circle")[0].text == b.predict("the red circle")[0].text

    # without CLIP in the shards it needs a local CLIP directory
    _write_released_layout(tiny_model, tiny_tokenizer, tmp_path / "noclip", with_vision=False)
    with pytest.raises(ValueError, match="has no CLIP weights"):
        from_pretrained(tmp_path / "noclip", config=tiny_config)
    tiny_model.vision_tower.model.save_pretrained(str(tmp_path / "clip"))
    loaded = from_pretrained(tmp_path / "noclip", config=tiny_config, clip_path=tmp_path / "clip")
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[key]), key

    # a checkpoint of other sizes: a clear error naming a key and both shapes
    other = get_preset("tiny")
    other.llm.intermediate_size = 96
    with pytest.raises(
        ValueError, match=r"mlp\.(gate|up|down)_proj\.weight: checkpoint \[\d+, \d+\] vs model"
    ):
        from_pretrained(tmp_path / "rel", config=other)


def test_released_config_json_gives_the_7b_preset():
    from nextchat_core.released import released_config

    hf = {
        "model_type": "nextchat",
        "architectures": ["NextChatForSegLM"],
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32005,
        "mm_depth": 2,
        "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }
    assert released_config(hf).config == get_preset("nextchat-7b-336")
    # the released state dict's own shapes derive the same sizes, heads from the preset
    shapes = json.loads(MANIFEST.read_text())["tensors"]
    derived = released_config(hf, shapes, token_ids={"<at>": 32003, "<boxes>": 32004})
    assert derived.config == get_preset("nextchat-7b-336")
    assert derived.sources["sam.encoder_global_attn_indexes"] == "shapes"
    assert not [k for k, v in derived.sources.items() if v.startswith("assumed")]
    with pytest.raises(ValueError, match="model_type 'nextchat'"):
        released_config({"model_type": "llava"})


def test_clear_errors_for_bad_inputs(tiny_model, tiny_tokenizer, tiny_config):
    predictor = NextChatPredictor(tiny_model, tiny_tokenizer)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict("x")
    with pytest.raises(TypeError, match=r"path, bytes, a file object, a PIL\.Image"):
        predictor.set_image(12345)
    with pytest.raises(TypeError, match="HxWx3 uint8"):
        predictor.set_image(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="cannot decode image"):
        predictor.set_image(b"not an image at all")
    img, _ = make_scene()
    predictor.set_image(img)
    with pytest.raises(ValueError, match="prompt is empty"):
        predictor.predict("   ")
    with pytest.raises(ValueError, match="characters"):
        predictor.predict("x" * 5000)
    with pytest.raises(ValueError, match=r"input box .* outside the 96x64 image"):
        predictor.predict("x", task="caption", boxes=[[0, 0, 200, 10]])
    with pytest.raises(ValueError, match=r"0 image\(s\)|1 image\(s\)"):
        encode_conversation(
            [Turn("user", "Where is the red circle?")],
            tiny_tokenizer,
            tiny_config,
            num_image_tokens=16,
        )
    with pytest.raises(ValueError, match="must be followed by <boxes>"):
        encode_conversation(
            [Turn("user", "<image> a <at> b")], tiny_tokenizer, tiny_config, num_image_tokens=16
        )
    img_box = grounding_sample(
        img, "the red circle", [(10, 10, 500, 20)], tiny_config, source="refs.jsonl:7"
    )
    with pytest.raises(ValueError, match=r"refs\.jsonl:7: box 0"):
        collate([img_box], tokenizer=tiny_tokenizer, config=tiny_config, num_image_tokens=16)


def test_config_validation_and_round_trip(tmp_path):
    for name in ("tiny", "demo", "nextchat-7b-336"):
        cfg = get_preset(name)
        cfg.save(tmp_path / f"{name}.json")
        assert NextChatConfig.load(tmp_path / f"{name}.json") == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    data = get_preset("tiny").to_dict()
    data["llm"]["hidden_size"] = 66
    with pytest.raises(ValueError, match="divisible"):
        NextChatConfig.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["llm"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"unknown keys in config.llm: \['bogus'\]"):
        NextChatConfig.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["vision"]["select_layer"] = -9
    with pytest.raises(ValueError, match="select_layer"):
        NextChatConfig.from_dict(data)


def test_sam_sdpa_attention_matches_segment_anything():
    """The fused-attention SAM encoder gives segment-anything's outputs (same weights)."""
    import copy

    from segment_anything.modeling.image_encoder import Attention

    from nextchat_core.modeling.sam_attention import SdpaAttention

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    encoder = model.sam.image_encoder
    assert any(type(m) is SdpaAttention for m in encoder.modules())
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, Attention):
                m.rel_pos_h.normal_()
                m.rel_pos_w.normal_()
        reference = copy.deepcopy(encoder)
        for m in reference.modules():
            if type(m) is SdpaAttention:
                m.__class__ = Attention  # back to the library's own forward
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(encoder(x), reference(x), atol=1e-5, rtol=1e-4)


def test_exists_is_the_yes_share_of_the_first_answer_token(tiny_model, tiny_tokenizer, tiny_config):
    """``NextChatPredictor.exists`` (the yes/no signal for region confidence) equals
    p(yes) / (p(yes) + p(no)) read off a plain teacher-forced forward pass of each prompt
    alone, although it batches prompts of different lengths with left padding. A referring
    expression's "the" is asked as "a" (POPE's form)."""
    from nextchat_core.batch import Sample
    from nextchat_core.conversation import IGNORE_INDEX, chat_turns

    img, _ = make_scene()
    predictor = NextChatPredictor(tiny_model, tiny_tokenizer)
    predictor.set_image(img, with_masks=False)
    asked = {
        "a red circle": "a red circle",
        "the blue square on the left of everything": "a blue square on the left of everything",
    }
    got = predictor.exists(list(asked))
    tpl = tiny_config.template
    for expr, p_yes in zip(asked.values(), got, strict=True):
        question = tpl.exists_question.format(expr=expr)
        batch = collate(
            [Sample(img, chat_turns(question, tiny_config, answer=tpl.yes_answer))],
            tokenizer=tiny_tokenizer,
            config=tiny_config,
            num_image_tokens=tiny_model.num_image_tokens,
            with_masks=False,
        )
        with torch.no_grad():  # one right-padded row, the model's own embedding path
            feats = tiny_model.encode_images(batch["pixel_values"])
            embeds = tiny_model.embed_inputs(batch["input_ids"], feats, None)
            h = tiny_model._llm(embeds, batch["attention_mask"])[0]
            logits = tiny_model.language_model.get_output_embeddings()(h).float()
        first = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
        yes = int(batch["labels"][0, first])
        no = predictor._answer_token(tpl.no_answer)
        want = logits[first - 1, [yes, no]].softmax(-1)[0]
        assert p_yes == pytest.approx(float(want), abs=1e-5)
    assert all(0.0 < p < 1.0 for p in got)
