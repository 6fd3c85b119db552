"""The synthetic grounding domain: exact masks and boxes, unambiguous expressions,
deterministic output, the jsonl format on disk, the CLI and the in-memory Samples.

Expressions are checked by a resolver written here from the grammar in the module
docstring, independently of the generator's own logic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nextchat_cli import main as cli
from nextchat_cli.synth import parse_task_mix
from nextchat_core import frames
from nextchat_core.batch import collate
from nextchat_core.config import get_preset
from nextchat_core.conversation import box_pairs, encode_conversation
from nextchat_core.masks import coco_segmentation_to_mask, mask_to_box
from nextchat_core.tokenizer import train_bpe_tokenizer
from training.synth import (
    COLORS,
    POSITION_WORDS,
    SHAPES,
    SIZES,
    Background,
    Scene,
    SynthConfig,
    background_contrast,
    contrast_ok,
    dense_annotations,
    generate,
    to_samples,
    write_dataset,
)

CONFIG = SynthConfig()
N_SCENES = 80


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Scene, list[dict]]]:
    return list(generate(0, N_SCENES, CONFIG))


def _records(scenes, task=None):
    return [(s, r) for s, recs in scenes for r in recs if task is None or r["task"] == task]


def _object_index(scene: Scene, record: dict, k: int) -> int:
    """The object whose visible mask is the record's k-th mask (decoded from its RLE)."""
    mask = coco_segmentation_to_mask(record["masks"][k], scene.width, scene.height)
    hits = [i for i, o in enumerate(scene.objects) if np.array_equal(o.mask, mask)]
    assert len(hits) == 1, f"mask {k} of {record} matches objects {hits}"
    return hits[0]


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0


def _filter(scene, color=None, shape=None, size=None) -> list[int]:
    return [
        i
        for i, o in enumerate(scene.objects)
        if (color is None or o.color == color)
        and (shape is None or o.shape == shape)
        and (size is None or o.size == size)
    ]


def _lead(scene: Scene, word: str, group: list[int]) -> tuple[int, float]:
    """The extreme object of ``group`` for a position word and its lead over the runner-up
    (original pixels; -inf when alone)."""
    axis, sign = POSITION_WORDS[word]
    vals = sorted(((sign * _centre(scene.objects[i].mask)[axis], i) for i in group), reverse=True)
    lead = vals[0][0] - vals[1][0] if len(vals) > 1 else float("-inf")
    return vals[0][1], lead


def _parse(words: list[str]) -> dict:
    """``[position] [size] [color] noun`` -> the words found (noun: shape, plural or
    'shape(s)'); fails on anything else."""
    out: dict = {"position": None, "size": None, "color": None, "shape": None}
    for key, vocab in (("position", POSITION_WORDS), ("size", SIZES), ("color", COLORS)):
        if words and words[0] in vocab:
            out[key] = words.pop(0)
    assert len(words) == 1, f"unparsed words {words}"
    noun = words[0]
    if noun not in ("shape", "shapes"):
        out["shape"] = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
        assert out["shape"] in SHAPES, f"unknown noun {noun!r}"
    return out


def resolve(scene: Scene, expression: str) -> list[int]:
    """Indices of the objects an expression selects (raises when it selects none
    unambiguously)."""
    words = expression.split()
    det = words.pop(0)
    assert det in ("the", "all"), expression
    p = _parse(words)
    group = _filter(scene, p["color"], p["shape"], p["size"])
    if det == "all":
        assert p["position"] is None and len(group) >= 2, (expression, group)
        return group
    if p["position"]:
        axis = POSITION_WORDS[p["position"]][0]
        best, lead = _lead(scene, p["position"], group)
        side = (scene.width, scene.height)[axis]
        assert lead >= CONFIG.position_margin * side, f"{expression!r}: lead {lead} too small"
        return [best]
    assert len(group) == 1, f"{expression!r} matches {group}"
    return group


# ------------------------------------------------------------------------ rendering


def test_canvas_sizes_vary_and_are_not_square(scenes):
    sizes = [(s.width, s.height) for s, _ in scenes]
    assert all(160 <= w <= 512 and 160 <= h <= 512 for w, h in sizes)
    assert sum(w != h for w, h in sizes) > N_SCENES * 0.9
    ws, hs = zip(*sizes, strict=True)
    assert min(ws) < 250 and max(ws) > 420 and min(hs) < 250 and max(hs) > 420
    for s, _ in scenes:
        assert s.image.shape == (s.height, s.width, 3) and s.image.dtype == np.uint8


def test_masks_are_exact_visible_pixels_and_boxes_are_tight(scenes):
    counts = set()
    for s, _ in scenes:
        counts.add(len(s.objects))
        union = np.zeros((s.height, s.width), dtype=int)
        for o in s.objects:
            assert o.mask.shape == (s.height, s.width) and o.mask.dtype == bool
            # every visible pixel has exactly the object's color (no anti-aliasing)
            assert (s.image[o.mask] == np.array(o.rgb, dtype=np.uint8)).all()
            assert np.array_equal(o.box, mask_to_box(o.mask))
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            # limited overlap: most of what was drawn stays visible
            assert o.mask.sum() >= CONFIG.min_visible * o.drawn_area
            union += o.mask
        assert union.max() <= 1, "visible masks must be disjoint"
    assert counts == {1, 2, 3, 4, 5, 6}


def test_same_color_objects_never_touch(scenes):
    for s, _ in scenes:
        for i, a in enumerate(s.objects):
            grown = a.mask.copy()  # 8-neighbourhood dilation
            grown[1:] |= a.mask[:-1]
            grown[:-1] |= a.mask[1:]
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
            for b in s.objects[i + 1 :]:
                if a.color == b.color:
                    assert not (grown & b.mask).any(), f"two {a.color} objects touch"


def test_sizes_are_separated_by_a_gap(scenes):
    for s, _ in scenes:
        short = min(s.width, s.height)
        for o in s.objects:
            frac = o.extent / short
            if o.size == "small":
                assert 0.06 <= frac < 0.15
            else:
                assert 0.20 < frac <= 0.35
    assert {o.size for s, _ in scenes for o in s.objects} == set(SIZES)
    assert {o.shape for s, _ in scenes for o in s.objects} == set(SHAPES)
    assert {o.color for s, _ in scenes for o in s.objects} == set(COLORS)
    assert {s.background.kind for s, _ in scenes} == {"plain", "gradient", "noise"}


def test_dense_annotations_match_the_objects(scenes):
    s = max((s for s, _ in scenes), key=lambda s: len(s.objects))
    dense = dense_annotations(s)
    assert dense.label_map.shape == (s.height, s.width)
    assert set(np.unique(dense.label_map)) == {-1, *range(len(s.objects))}
    for i, o in enumerate(s.objects):
        assert np.array_equal(dense.label_map == i, o.mask)
        assert dense.attributes[i] == o.attributes
        assert SHAPES[dense.shape_ids[i]] == o.shape and SIZES[dense.size_ids[i]] == o.size
        assert list(COLORS)[dense.color_ids[i]] == o.color
        assert np.array_equal(dense.boxes[i], o.box)


def test_contrast_check_rejects_colors_close_to_the_background():
    gray = Background("plain", ((128, 128, 128),))
    assert not contrast_ok((140, 120, 130), gray, 80.0)
    assert contrast_ok(COLORS["red"], gray, 80.0)
    noise = Background("noise", ((128, 128, 128),), noise_amplitude=24)
    assert background_contrast((128 + 30, 128, 128), noise) == pytest.approx(6.0)
    ramp = Background("gradient", ((0, 0, 0), (255, 255, 255)))
    assert not contrast_ok((60, 60, 60), ramp, 80.0)  # a gray lies on the ramp
    assert contrast_ok(COLORS["red"], ramp, 80.0)
    with pytest.raises(ValueError, match="background kind"):
        background_contrast((0, 0, 0), Background("stripes", ((0, 0, 0),)))


def test_rendered_backgrounds_keep_contrast_with_every_object(scenes):
    for s, _ in scenes[:25]:
        bg = s.image[dense_annotations(s).label_map < 0].astype(np.float64)
        for o in s.objects:
            dist = np.linalg.norm(bg - np.array(o.rgb, dtype=np.float64), axis=1).min()
            assert dist >= CONFIG.min_contrast, (s.scene_id, s.background, o.color, dist)


def test_easy_mode_has_one_or_two_large_objects():
    for s, _ in generate(1, 20, SynthConfig(easy=True)):
        assert 1 <= len(s.objects) <= 2
        assert all(o.size == "large" for o in s.objects)


# --------------------------------------------------------------------------- records


def test_rec_expressions_select_exactly_the_referred_objects(scenes):
    forms = {"size": 0, "position": 0, "shape": 0, "color": 0, "multi": 0}
    for s, r in _records(scenes, "rec"):
        assert r["question"] is None and r["answer"] is None
        referred = [_object_index(s, r, k) for k in range(len(r["boxes"]))]
        assert resolve(s, r["expression"]) == sorted(referred)
        for k, i in enumerate(referred):
            assert r["boxes"][k] == [int(v) for v in s.objects[i].box]
            assert r["attributes"][k] == s.objects[i].attributes
        words = r["expression"].split()
        if words[0] == "all":
            forms["multi"] += 1
            continue
        p = _parse(words[1:])
        o = s.objects[referred[0]]
        if p["size"] or p["position"]:  # only when color + shape is ambiguous
            assert p["color"] == o.color and p["shape"] == o.shape
            assert len(_filter(s, o.color, o.shape)) >= 2, r["expression"]
            forms["size" if p["size"] else "position"] += 1
        if p["size"] and p["position"]:  # neither word alone would do
            assert len(_filter(s, o.color, o.shape, o.size)) >= 2
            for word in POSITION_WORDS:
                best, lead = _lead(s, word, _filter(s, o.color, o.shape))
                axis = POSITION_WORDS[word][0]
                assert (
                    best != referred[0] or lead < CONFIG.position_margin * (s.width, s.height)[axis]
                )
        forms["shape"] += p["color"] is None
        forms["color"] += p["shape"] is None
    assert all(n > 0 for n in forms.values()), forms


def test_multi_instance_boxes_are_sorted_left_to_right(scenes):
    multi = [(s, r) for s, r in _records(scenes, "rec") if r["expression"].startswith("all ")]
    assert len(multi) >= 10
    for _, r in multi:
        assert len(r["boxes"]) >= 2 and len(r["masks"]) == len(r["attributes"]) == len(r["boxes"])
        keys = [(b[0], b[1]) for b in r["boxes"]]
        assert keys == sorted(keys)


def _chat_query(question: str) -> dict:
    assert question.startswith("Is there ") and question.endswith("?"), question
    words = question[len("Is there ") : -1].split()
    det = words.pop(0)
    assert det == ("an" if words[0][0] in "aeiou" else "a"), question
    return _parse(words)


def test_chat_answers_yes_with_every_match_or_no_with_none(scenes):
    answers = {"yes": 0, "no": 0}
    for s, r in _records(scenes, "chat"):
        p = _chat_query(r["question"])
        assert p["size"] is None and p["position"] is None
        matches = _filter(s, p["color"], p["shape"])
        if r["answer"] == "No.":
            answers["no"] += 1
            assert r["boxes"] == [] and r["masks"] == [] and matches == []
        else:
            answers["yes"] += 1
            assert r["answer"] == f"Yes, {box_pairs(len(r['boxes']))}."
            referred = [_object_index(s, r, k) for k in range(len(r["boxes"]))]
            assert sorted(referred) == matches
            keys = [(b[0], b[1]) for b in r["boxes"]]
            assert keys == sorted(keys)
    assert answers["yes"] >= 10 and answers["no"] >= 10, answers


def test_captions_describe_the_object_of_the_input_box(scenes):
    captions = _records(scenes, "caption")
    assert len(captions) >= 10
    for s, r in captions:
        assert len(r["boxes"]) == 1 and r["expression"] is None and r["question"] is None
        i = _object_index(s, r, 0)
        o = s.objects[i]
        assert r["boxes"][0] == [int(v) for v in o.box]
        article = "an" if o.size[0] in "aeiou" else "a"
        assert r["answer"] == f"{article} {o.size} {o.color} {o.shape}"
        for j, other in enumerate(s.objects):
            if j != i:
                assert frames.box_iou(o.box, other.box) <= 0.5


def test_task_mix_restricts_tasks_and_records_are_distinct():
    cfg = SynthConfig(task_mix={"chat": 1.0}, records_per_scene=3)
    for _, recs in generate(2, 10, cfg):
        assert [r["task"] for r in recs] == ["chat"] * 3
        assert len({r["question"] for r in recs}) == 3
    assert parse_task_mix("rec=2,chat") == {"rec": 2.0, "chat": 0.2}
    with pytest.raises(ValueError, match="unknown task 'foo'"):
        parse_task_mix("rec,foo")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_side": 10}, "min_side"),
        ({"min_side": 300, "max_side": 200}, "min_side"),
        ({"max_objects": 0}, "max_objects"),
        ({"small_range": (0.06, 0.25)}, "small_range"),
        ({"shapes": ("circle", "blob")}, "shapes"),
        ({"colors": ()}, "colors"),
        ({"task_mix": {"rec": 0.0}}, "task_mix"),
        ({"task_mix": {"detect": 1.0}}, "task_mix"),
        ({"min_visible": 0.0}, "min_visible"),
        ({"small_prob": 1.5}, "small_prob"),
    ],
)
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


# --------------------------------------------------------------------- determinism


def test_generation_is_deterministic_and_seed_dependent(tmp_path: Path):
    a = write_dataset(tmp_path / "a", 7, 4)
    b = write_dataset(tmp_path / "b", 7, 4)
    c = write_dataset(tmp_path / "c", 8, 4)
    assert a.jsonl.read_bytes() == b.jsonl.read_bytes()
    assert a.jsonl.read_bytes() != c.jsonl.read_bytes()
    for i in range(4):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # scene i does not depend on how many scenes are generated before it
    tail = list(generate(7, 2, start=2))
    full = list(generate(7, 4))
    for (s1, r1), (s2, r2) in zip(tail, full[2:], strict=True):
        assert np.array_equal(s1.image, s2.image) and r1 == r2
    with pytest.raises(ValueError, match="already exists"):
        write_dataset(tmp_path / "a", 7, 1)


def test_jsonl_round_trips(tmp_path: Path):
    summary = write_dataset(tmp_path, 3, 5)
    expected = list(generate(3, 5))
    lines = summary.jsonl.read_text().splitlines()
    assert len(lines) == summary.n_records == sum(len(r) for _, r in expected)
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["seed"] == 3 and SynthConfig(**meta["config"]) == CONFIG
    by_scene = {s.scene_id: s for s, _ in expected}
    for line in lines:
        r = json.loads(line)
        assert list(r) == [
            "image", "width", "height", "task", "expression", "question", "answer",
            "boxes", "masks", "attributes", "scene_id",
        ]  # fmt: skip
        img = np.asarray(Image.open(tmp_path / r["image"]))
        assert img.shape == (r["height"], r["width"], 3)
        scene = by_scene[r["scene_id"]]
        assert np.array_equal(img, scene.image)
        for box, rle in zip(r["boxes"], r["masks"], strict=True):
            mask = coco_segmentation_to_mask(rle, r["width"], r["height"])
            assert mask_to_box(mask).tolist() == box
            assert (img[mask] == img[mask][0]).all()
    # the training pipeline's reader consumes the same file
    from training.data import read_refexp_jsonl

    samples = read_refexp_jsonl(summary.jsonl, get_preset("tiny"))
    assert len(samples) == len(lines)


def test_cli_writes_a_dataset(tmp_path: Path, capsys):
    out = tmp_path / "ds"
    rc = cli.main(
        [
            "synth",
            "--out",
            str(out),
            "--seed",
            "4",
            "--scenes",
            "3",
            "--easy",
            "--tasks",
            "rec,chat",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scenes"] == 3 and report["records"] > 0
    records = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(records) == report["records"]
    assert {r["task"] for r in records} <= {"rec", "chat"}
    assert all(a["size"] == "large" for r in records for a in r["attributes"])
    assert len(list((out / "images").glob("*.png"))) == 3
    assert cli.main(["synth", "--out", str(out), "--scenes", "1", "--tasks", "nope"]) == 1


# ----------------------------------------------------------------------- samples


def test_to_samples_feed_the_tokenizer_and_the_collator(scenes):
    config = get_preset("tiny")
    texts = [r["expression"] or r["question"] or r["answer"] or "" for _, r in _records(scenes)]
    tokenizer = train_bpe_tokenizer(texts, config=config)
    samples = []
    for s, recs in scenes[:12]:
        out = to_samples(s, recs, config)
        assert len(out) == len(recs)
        for sample, r in zip(out, recs, strict=True):
            enc = encode_conversation(sample.turns, tokenizer, config, num_image_tokens=4)
            assert enc.num_boxes == len(sample.boxes) == len(r["boxes"])
            assert sample.image is s.image
            for box, mask in zip(sample.boxes, sample.masks, strict=True):
                assert mask_to_box(mask).tolist() == box
        samples.extend(out)
    assert {s.turns[0].text.split()[0] for s in samples} == {"<image>"}
    batch = collate(samples[:6], tokenizer=tokenizer, config=config, num_image_tokens=4)
    assert batch["boxes"].shape == (sum(len(s.boxes) for s in samples[:6]), 4)
    assert float(batch["boxes"].min()) >= 0.0 and float(batch["boxes"].max()) <= 1.0
