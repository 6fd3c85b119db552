"""Copy-paste augmentation of corrections (training.augment, RETRAIN_COPY_PASTE): the
pasted object is the corrected one, its box and mask follow it, the background is left
as it was elsewhere, and records it would make false are not pasted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextchat_core.build import load_config
from training.augment import absence_records, copy_paste, eligible
from training.data import Record, _decode_mask, record_to_sample
from training.retrain import RetrainSettings

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def _record(text: str, color: tuple[int, int, int], box: list[int], *, size=(64, 48), bg=0):
    """A ``size`` (w, h) image of one flat background value with a filled rectangle
    object of ``color`` at ``box`` (xyxy), its box and its mask."""
    w, h = size
    image = np.full((h, w, 3), bg, dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = color
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return Record(image, "rec", text, None, [[float(v) for v in box]], [mask], w, h, text)


def test_the_pasted_object_is_the_corrected_one_with_its_box_and_mask():
    pink = _record("the pink heart", (255, 105, 180), [10, 5, 30, 20], bg=10)
    other = _record("the red circle", (200, 0, 0), [40, 20, 60, 40], bg=50)
    out = copy_paste([pink, other], 3, seed=1)
    pasted = [r for r in out if r.text == "the pink heart"]
    assert len(out) == 6 and len(pasted) == 3
    for r in pasted:
        # built when the sample is made: until then the copy holds its block, not an image
        assert r.image.background is other.image and r.image.patch.shape == (15, 20, 3)
        image, m = r.image.load(), _decode_mask(r.masks[0], 64, 48, r.source)
        assert image.shape == other.image.shape and (r.width, r.height) == (64, 48)
        (x0, y0, x1, y1) = r.boxes[0]
        assert (x1 - x0, y1 - y0) == (20, 15)  # same short side: same size
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert (image[m] == (255, 105, 180)).all()  # the object's own pixels ...
        rest = image[~m]
        # ... and the background as it was wherever nothing was pasted (its own object
        # may be covered, never moved)
        original = other.image[~m]
        assert (rest == original).all()
    # the source images are not written into
    assert (other.image[other.masks[0]] == (200, 0, 0)).all()
    assert copy_paste([pink, other], 3, seed=1)[0].boxes == out[0].boxes  # deterministic
    assert copy_paste([pink, other], 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        copy_paste([pink, other], -1)


def test_scaled_to_the_background_and_kept_inside_it():
    big = _record("the cyan cross", (0, 255, 255), [20, 20, 60, 60], size=(200, 100))
    small = _record("the green star", (0, 200, 0), [5, 5, 10, 10], size=(80, 50))
    (r,) = [r for r in copy_paste([big, small], 1, seed=0) if r.text == "the cyan cross"]
    x0, y0, x1, y1 = r.boxes[0]
    assert (x1 - x0, y1 - y0) == (20, 20)  # 40 px of a 100-px short side -> 20 of 50
    assert x0 >= 0 and x1 <= 80 and y0 >= 0 and y1 <= 50
    assert _decode_mask(r.masks[0], 80, 50, r.source).sum() == 400
    sample = record_to_sample(r, load_config(DEMO))  # what the trainer gets: the built image
    assert sample.image.shape == (50, 80, 3) and sample.masks[0].sum() == 400


def test_what_would_become_false_is_not_pasted():
    cup = _record("the left pink cup", (255, 105, 180), [1, 1, 9, 9])
    assert not eligible(cup)  # "left" is where it was, not where it goes
    no_mask = _record("the pink cup", (255, 105, 180), [1, 1, 9, 9])
    no_mask.masks = [None]
    assert not eligible(no_mask)
    # a background annotated with a word of the expression would make it ambiguous
    a = _record("the pink shape", (255, 105, 180), [1, 1, 9, 9])
    b = _record("the pink square", (255, 100, 170), [20, 20, 30, 30])
    c = _record("the red circle", (200, 0, 0), [20, 20, 30, 30])
    out = copy_paste([a, b, c], 4, seed=2)
    assert len(out) == 12  # each has a background left: a and b only c's, c a's or b's
    for r in out:
        assert r.text in ("the pink shape", "the pink square", "the red circle")
        if r.text.startswith("the pink"):
            assert "pasted into the red circle" in r.source
        else:
            assert "pasted into the pink" in r.source
    assert copy_paste([a, b], 2) == []  # no background is allowed


def test_copy_paste_setting():
    assert RetrainSettings.from_env({"RETRAIN_COPY_PASTE": "2"}).copy_paste == 2
    assert RetrainSettings.from_env({}).copy_paste == 0
    with pytest.raises(ValueError, match="RETRAIN_COPY_PASTE"):
        RetrainSettings.from_env({"RETRAIN_COPY_PASTE": "-1"})


def test_absence_questions_are_asked_of_images_without_the_words():
    config = load_config(DEMO)
    a = _record("the pink heart", (255, 105, 180), [1, 1, 9, 9])
    b = _record("the pink square", (255, 100, 170), [20, 20, 30, 30])
    c = _record("the red circle", (200, 0, 0), [20, 20, 30, 30])
    out = absence_records([a, b, c], config, seed=0)
    asked = {r.text.removesuffix(" <image>"): r for r in out}  # the template's question
    # pink is annotated in a and b: each is asked only of c's image; c of a's or b's
    assert set(asked) == {
        "Is there a pink heart?",
        "Is there a pink square?",
        "Is there a red circle?",
    }
    for question in ("Is there a pink heart?", "Is there a pink square?"):
        r = asked[question]
        assert r.image is c.image and r.answer == "No." and r.boxes == [] and r.task == "chat"
    assert asked["Is there a red circle?"].image is not c.image
    sample = record_to_sample(out[0], config)  # a training conversation, no boxes
    assert sample.turns[-1].text == "No." and sample.boxes == []
    assert absence_records([a, b], config) == []  # nowhere to ask without ambiguity
