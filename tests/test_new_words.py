"""The new-words domain (training.new_words): scenes of 3-6 objects where one target
carries a word the bundled model never saw, among distractors of the original vocabulary;
real shapes and masks; and the bundled tokenizer encodes every new word."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nextchat_core.build import load_config
from nextchat_core.masks import coco_segmentation_to_mask, mask_to_box
from nextchat_core.tokenizer import decode_text, encode_text, load_tokenizer
from training import new_words, synth

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
NEW = set(synth.NEW_SHAPES) | set(synth.NEW_COLORS)


def test_the_bundled_tokenizer_encodes_every_new_word_without_unk():
    config = load_config(DEMO)
    tokenizer = load_tokenizer(DEMO, config)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for word in sorted(NEW):
        text = f"Where is the {word} in the image?"
        ids = [i for i, _ in encode_text(text, tokenizer, config.tokens)]
        assert unk not in ids, (word, ids)
        assert decode_text(ids, tokenizer, config.tokens) == text  # nothing lost
    # The words are new to the model: the demo tokenizer was trained on the original
    # vocabulary, so each new word is split into pieces, while the old ones are whole.
    vocab = tokenizer.get_vocab()
    assert all(f"Ġ{w}" in vocab or w in vocab for w in ("circle", "red", "hexagon"))
    assert not any(f"Ġ{w}" in vocab for w in ("heart", "crescent", "cyan"))
    # (README, new words) after a space every known word is one piece, every new word
    # several (letters and pairs: " pink" -> "Ġ p i n k")
    assert all(f"Ġ{w}" in vocab for w in (*synth.SHAPES, *synth.COLORS))
    assert not any(f"Ġ{w}" in vocab for w in sorted(NEW))


def test_new_words_never_in_the_original_vocabulary_and_colors_far_apart():
    assert not NEW & (set(synth.SHAPES) | set(synth.COLORS))
    rgb = {n: np.asarray(c, dtype=float) for n, c in synth.ALL_COLORS.items()}
    for new in synth.NEW_COLORS:
        closest = min(np.linalg.norm(rgb[new] - rgb[o]) for o in rgb if o != new)
        assert closest >= 100, new


def _unit_mask(shape: str) -> np.ndarray:
    img = Image.new("1", (64, 64), 0)
    synth._draw_shape(ImageDraw.Draw(img), shape, 32, 32, 28)
    return np.asarray(img, dtype=bool)


def test_new_shapes_are_real_distinct_polygons():
    masks = {s: _unit_mask(s) for s in synth.ALL_SHAPES}
    for s in synth.NEW_SHAPES:
        fill = masks[s].mean()
        assert 0.15 < fill < 0.8, (s, fill)  # a shape, not a speck or the whole square
        for other, m in masks.items():
            if other != s:
                iou = (masks[s] & m).sum() / (masks[s] | m).sum()
                assert iou < 0.8, (s, other, iou)
    # each has its characteristic part: the crescent's bite, the cross's empty corners,
    # the arrow's head right of its tail, the heart's notch at the top
    assert not masks["crescent"][32, 40] and masks["crescent"][32, 8]
    assert not masks["cross"][8, 8] and masks["cross"][32, 32]
    assert masks["arrow"][16, 40] and not masks["arrow"][16, 16]
    assert not masks["heart"][10, 32] and masks["heart"][14, 20]


def test_scenes_hold_a_new_word_target_among_known_distractors():
    config = new_words.NewWordsConfig(new_distractor_prob=0.5)
    kinds, hard, extra = set(), 0, 0
    scenes = list(new_words.generate(3, 80, config))
    for scene, record in scenes:
        objs = scene.objects
        assert 3 <= len(objs) <= 6 or len(objs) >= 2  # a crowded canvas may keep fewer
        target = objs[0]
        words = new_words.new_words_of(record["expression"])
        assert words and set(words) <= {target.shape, target.color}, record["expression"]
        # the rec record: the target's box and its visible mask, as synth writes them
        assert record["boxes"] == [[int(v) for v in target.box]]
        mask = coco_segmentation_to_mask(record["masks"][0], scene.width, scene.height)
        assert mask.sum() >= 0.75 * target.drawn_area and (mask == target.mask).all()
        assert list(mask_to_box(mask)) == record["boxes"][0]
        new_in_distractors = [o for o in objs[1:] if {o.shape, o.color} & NEW]
        assert len(new_in_distractors) <= 1
        for o in new_in_distractors:  # another new word, never the target's
            assert not {o.shape, o.color} & set(words)
            extra += 1
        kinds.add(
            ("shape" if target.shape in NEW else "") + ("color" if target.color in NEW else "")
        )
        hard += any(o.shape == target.shape or o.color == target.color for o in objs[1:])
    assert kinds == {"shape", "color", "shapecolor"}
    assert hard >= 30 and extra >= 15  # hard negatives and new-word distractors do occur
    again = list(new_words.generate(3, 80, config))
    assert all(
        (a.image == b.image).all() and ra == rb
        for (a, ra), (b, rb) in zip(scenes, again, strict=True)
    )


def test_one_new_word_and_bad_configs():
    config = new_words.NewWordsConfig(new_shapes=("heart",), new_colors=(), kinds={"shape": 1})
    for scene, record in new_words.generate(0, 20, config):
        assert scene.objects[0].shape == "heart" and "heart" in record["expression"]
    with pytest.raises(ValueError, match="new_shapes must list"):
        new_words.NewWordsConfig(new_shapes=("circle",))
    with pytest.raises(ValueError, match="'color' needs"):
        new_words.NewWordsConfig(new_colors=(), kinds={"color": 1})
    with pytest.raises(ValueError, match="3 <= min_objects"):
        new_words.NewWordsConfig(min_objects=1)
    with pytest.raises(ValueError, match="objects must be"):
        synth.render_scene(np.random.default_rng(0), synth.SynthConfig(), objects=[("x", "red")])


def test_label_studio_task_with_boxes_and_nested_masks():
    from labelstudio.results import pair_objects, parse_task

    scene, record = next(new_words.generate(1, 1))
    task = synth.label_studio_task(record, 5, "img.png", masks=True, boxes=True)
    regions = pair_objects(parse_task(task, image_size=(scene.width, scene.height)))
    assert len(regions) == 1 and [s.kind for s in regions[0].shapes] == ["brush"]
    assert list(regions[0].box_xyxy) == record["boxes"][0]
    truth = coco_segmentation_to_mask(record["masks"][0], scene.width, scene.height)
    assert (regions[0].shapes[0].mask == truth).all()
