"""Fidelity to the released NExT-Chat: the official code's own outputs, reproduced.

``tests/data/parity/`` (copied from the project's shared data; its README explains it) holds a
tiny checkpoint with random weights written by the official code (NExT-ChatV/NExT-Chat at
1e6c20f, transformers 4.31) in the released layout, three images and what the official demo
inference path answered for them. It is loaded here exactly as a user loads
``AoZhang/nextchat-7b-336``: ``NextChatPredictor.from_pretrained(dir)``, greedy, nothing
passed but ``max_new_tokens``. The token rules themselves are tested on conversations the
fixture does not contain (region input, captions, multi-turn training targets).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nextchat_core.build import derive_released, from_pretrained, inspect_checkpoint
from nextchat_core.conversation import (
    IGNORE_INDEX,
    Turn,
    caption_turns,
    encode_conversation,
    grounding_turns,
    refer_regions,
)
from nextchat_core.predictor import NextChatPredictor

FIXTURE = Path(__file__).resolve().parent / "data" / "parity"
CHECKPOINT = FIXTURE / "checkpoint"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CASES = EXPECTED["cases"]


@pytest.fixture(scope="module")
def predictor() -> NextChatPredictor:
    return NextChatPredictor.from_pretrained(CHECKPOINT, max_new_tokens=EXPECTED["max_new_tokens"])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_official_outputs_are_reproduced(predictor, case, monkeypatch):
    # Record what reaches model.generate (a pass-through spy: the real call runs).
    calls = []
    generate = predictor.model.generate

    def spy(ids, mask, feats, **kwargs):
        out = generate(ids, mask, feats, **kwargs)
        calls.append((ids, mask, out))
        return out

    monkeypatch.setattr(predictor.model, "generate", spy)
    predictor.set_image(FIXTURE / case["image"])
    (answer,) = predictor.predict(case["query"]["expression"])

    ids, mask, out = calls[0]
    assert ids[0][mask[0].bool()].tolist() == case["input_ids"]
    assert out.sequences[0] == case["generated_ids"]
    assert answer.text == case["response"]

    tol = EXPECTED["tolerances"]
    assert len(answer.detections) == len(case["boxes_px"])
    for det, want in zip(answer.detections, case["boxes_px"], strict=True):
        assert np.abs(det.box - np.asarray(want)).max() <= tol["box_px"], (det.box, want)

    n, h, w = case["mask_shape"]
    masks = np.unpackbits(np.load(FIXTURE / "masks.npz")[case["mask_npz_key"]], axis=-1, count=w)
    masks = masks.astype(bool).reshape(n, h, w)
    for det, kept, want in zip(answer.detections, case["mask_kept"], masks, strict=True):
        if kept:
            assert det.mask is not None and _iou(det.mask, want) >= tol["mask_iou"]
        else:
            assert det.mask is None
    # No case of the fixture ends with </s>: every answer was cut off by max_new_tokens,
    # and says so.
    assert answer.truncated


def test_the_released_tokenizer_loads_and_plain_transformers_5_would_differ(predictor):
    case = CASES[0]
    # Plain transformers 5 on the official prompt string keeps a standalone '▁' before
    # <im_start>: why nextchat_core.tokenizer.encode_text writes the 4.31 rule out.
    plain = predictor.tokenizer(case["prompt"])["input_ids"]
    assert plain != case["input_ids"]
    assert "▁" in predictor.tokenizer.convert_ids_to_tokens(plain[:40])


def test_a_broken_tokenizer_file_is_named(tmp_path):
    from nextchat_core.tokenizer import load_tokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(CHECKPOINT / name, tmp_path / name)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"cannot load the tokenizer of .*tokenizer\.model"):
        load_tokenizer(tmp_path, derive_released(CHECKPOINT).config)


def test_the_architecture_is_derived_from_the_directory():
    derived = derive_released(CHECKPOINT)
    cfg, model = derived.config, EXPECTED["model"]
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (336, 14)
    assert (cfg.vision.hidden_size, cfg.vision.num_layers) == (64, 3)
    assert cfg.vision.num_heads == model["clip"]["num_attention_heads"]
    assert cfg.llm.vocab_size == EXPECTED["tokens"]["vocab_size"]
    assert cfg.tokens.at_id == EXPECTED["tokens"]["at"]
    assert cfg.tokens.pad_id == EXPECTED["tokens"]["pad"]
    sam = model["sam"]
    assert cfg.sam.encoder_embed_dim == sam["encoder_embed_dim"]
    assert cfg.sam.encoder_num_heads == sam["encoder_num_heads"]
    assert cfg.sam.encoder_global_attn_indexes == tuple(sam["encoder_global_attn_indexes"])
    assert cfg.sam.decoder_num_heads == sam["decoder_num_heads"]
    assert cfg.sam.num_prompt_tokens == model["seg_prompt_tokens"]
    assert cfg.location.hidden_size == model["loc_hidden_size"]
    assert cfg.vision.pad_color == (255, 255, 255)
    # The two head counts no file records are named as assumptions.
    assert set(k for k, v in derived.sources.items() if v.startswith("assumed")) == {
        "vision.num_heads",
        "sam.decoder_num_heads",
    }
    report = inspect_checkpoint(CHECKPOINT)
    assert report["missing"] == report["mismatched"] == report["unexpected"] == 0
    assert report["vision_source"].startswith("shards")
    assert set(report["assumed"]) == {"vision.num_heads", "sam.decoder_num_heads"}


def test_the_pad_colour_is_white_for_a_released_checkpoint(predictor):
    processed = predictor.processor(FIXTURE / "images" / "landscape.png")  # 320x200
    assert processed.vision[0, 0].tolist() == [255, 255, 255]  # top band is padding
    assert processed.vision[-1, -1].tolist() == [255, 255, 255]


def test_the_clip_directory_wins_over_the_shards_and_a_difference_is_reported(
    predictor, tmp_path, caplog
):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    clip_dir = tmp_path / hf["mm_vision_tower"]  # the name the official loader reads
    tower = predictor.model.vision_tower.model
    tower.save_pretrained(str(clip_dir))
    clip_weights = {k: v.clone() for k, v in tower.state_dict().items()}
    key = next(k for k in clip_weights if k.endswith("fc1.weight"))
    clip_weights[key] += 1.0
    tower_copy = type(tower)(tower.config)
    tower_copy.load_state_dict(clip_weights)
    tower_copy.save_pretrained(str(clip_dir))

    with caplog.at_level(logging.WARNING):
        loaded = from_pretrained(ckpt)
    assert loaded.vision_source.startswith("clip directory")
    assert "differ" in caplog.text
    mine = loaded.model.vision_tower.model.state_dict()
    assert torch.equal(mine[key], clip_weights[key])
    # the head count now comes from the CLIP directory's config, not an assumption
    assert derive_released(ckpt).sources["vision.num_heads"] == "clip config"
    assert inspect_checkpoint(ckpt)["vision_source"].startswith("clip directory")


# ------------------------------------------------------------------ the token rules


def _pieces(predictor, enc):
    return predictor.tokenizer.convert_ids_to_tokens(enc.input_ids)


def test_training_targets_and_multi_turn_ids_follow_the_official_rule(predictor):
    cfg, tok = predictor.config, predictor.tokenizer
    turns = [
        *grounding_turns("the red box", cfg, num_boxes=2),
        Turn("user", "What is in the region <at> <boxes>?"),
        Turn("assistant", "A red box."),
    ]
    enc = encode_conversation(turns, tok, cfg, num_image_tokens=2)
    pieces = _pieces(predictor, enc)
    start = pieces.index("<im_start>")
    assert pieces[start - 2 : start] == ["▁USER", ":"]  # no '▁' before <im_start>
    assert pieces[start + 4 :] == [
        "▁Where", "▁is", "▁the", "▁red", "▁box", "▁in", "▁the", "▁image", "?",
        "▁ASSISTANT", ":", "▁Answer", ":", "<at>", "<boxes>", "<at>", "<boxes>", "▁.", "</s>",
        "▁USER", ":", "▁W", "hat", "▁is", "▁in", "▁the", "▁region", "<at>", "<boxes>",
        "▁", "?",  # SentencePiece's dummy prefix before a piece that starts with '?'
        "▁ASSISTANT", ":", "▁A", "▁red", "▁box", ".", "</s>",
    ]  # fmt: skip
    targets = [p for p, lab in zip(pieces, enc.labels, strict=True) if lab != IGNORE_INDEX]
    # the answers and their </s>; <boxes> never takes LM loss
    assert targets == [
        "▁Answer",
        ":",
        "<at>",
        "<at>",
        "▁.",
        "</s>",
        "▁A",
        "▁red",
        "▁box",
        ".",
        "</s>",
    ]
    assert enc.num_boxes == 3


def test_region_inputs_by_index_and_captions_use_the_same_rule(predictor):
    cfg, tok = predictor.config, predictor.tokenizer
    text, boxes = refer_regions("Is [1] left of [0]?", [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert text == "Is <at> <boxes> left of <at> <boxes>?"
    assert boxes == [[5, 6, 7, 8], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match=r"region \[2\] but 2 input box"):
        refer_regions("what is [2]?", [[1, 2, 3, 4], [5, 6, 7, 8]])
    enc = encode_conversation(
        caption_turns(cfg), tok, cfg, num_image_tokens=1, add_generation_prompt=True
    )
    pieces = _pieces(predictor, enc)
    i = pieces.index("<at>")
    assert pieces[i - 1] == "▁region" and pieces[i + 1] == "<boxes>"
    assert pieces[-2:] == ["▁ASSISTANT", ":"]

    # through the predictor: "[0]" becomes a region slot filled by the input box
    from nextchat_core.predictor import Query

    turns, in_boxes = predictor._turns(Query(0, "What is [0]?", "chat", [[40, 40, 120, 120]]))
    assert "What is <at> <boxes>?" in turns[0].text and in_boxes == [[40.0, 40.0, 120.0, 120.0]]
    predictor.set_image(FIXTURE / "images" / "square.png", with_masks=False)
    (a,) = predictor.predict(
        "What is [0]?", task="chat", boxes=[[40, 40, 120, 120]], with_masks=False
    )
    assert a.prompt == "What is [0]?"  # the answer keeps the user's own prompt


# ------------------------------------------------------------------ decoding rules


def _run(predictor, forced: dict[int, int], **kwargs):
    """Generate for the square case with the tokens at some steps forced."""
    tk = predictor.config.tokens

    def processor(step, logits):
        if step in forced:
            logits = torch.full_like(logits, -1e9)
            logits[:, forced[step]] = 0.0
        return logits

    predictor.set_image(FIXTURE / "images" / "square.png", with_masks=False)
    (a,) = predictor.predict("the red box", with_masks=False, logits_processor=processor, **kwargs)
    return a, tk


def test_eos_right_after_at_ends_the_answer_and_keeps_its_box(predictor):
    tk = predictor.config.tokens
    a, _ = _run(predictor, {0: tk.at_id, 1: tk.eos_id})
    assert a.text == "<at> <boxes>" and len(a.detections) == 1 and not a.truncated


def test_at_right_after_at_is_a_box_slot_not_a_second_trigger(predictor):
    tk = predictor.config.tokens
    a, _ = _run(predictor, {0: tk.at_id, 1: tk.at_id, 2: tk.eos_id})
    # the official loop would decode a second box here; this one writes one <at> <boxes>
    assert a.text == "<at> <boxes>" and len(a.detections) == 1


def test_beam_search_with_one_beam_is_greedy_and_wider_beams_keep_the_box_rule(predictor):
    model = predictor.model
    case = CASES[1]
    predictor.set_image(FIXTURE / case["image"], with_masks=False)
    feats = predictor._image.features
    ids = torch.tensor([case["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        greedy = model.generate(ids, mask, feats, max_new_tokens=18)
        one = model._beam_search(
            ids, mask, feats, input_boxes=None, max_new_tokens=18, num_beams=1, length_penalty=1.0
        )
        wide = model.generate(ids, mask, feats, max_new_tokens=18, num_beams=4)
    assert one.sequences == greedy.sequences == [case["generated_ids"]]
    assert torch.allclose(one.boxes[0], greedy.boxes[0])
    tk = predictor.config.tokens
    seq = wide.sequences[0]
    ats = [i for i, t in enumerate(seq) if t == tk.at_id]
    assert all(seq[i + 1] == tk.boxes_id for i in ats)
    assert len(wide.boxes[0]) == len(ats) and wide.truncated[0] == (tk.eos_id not in seq)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, mask, feats, num_beams=2, do_sample=True)
