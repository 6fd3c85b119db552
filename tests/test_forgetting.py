"""Against forgetting (training.forgetting, training.retrain): replay of the base domain,
the fixed regression slice, and the two-slice gate - down to a real retraining job on the
bundled model that is made to forget and is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelstudio.results import rectangle_result, textarea_result
from nextchat_core.build import load_config
from nextchat_core.masks import mask_to_box
from training import forgetting, synth, versions
from training.data import _decode_mask
from training.retrain import RetrainSettings, gate, run_job

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def test_gate_refuses_a_version_that_forgets_the_regression_slice():
    old, new = {"rec_acc": 0.2, "mask_miou": 0.1}, {"rec_acc": 0.9, "mask_miou": 0.6}
    kept = ({"rec_acc": 0.6, "n_records": 40}, {"rec_acc": 0.57, "n_records": 40})
    lost = ({"rec_acc": 0.6, "n_records": 40}, {"rec_acc": 0.5, "n_records": 40})
    ok, why = gate(old, new, "not_worse", 0.0, regression=kept, forgetting_tolerance=0.05)
    assert ok and "regression slice (40 records) Acc@0.5 0.600 -> 0.570" in why
    ok, why = gate(old, new, "not_worse", 0.0, regression=lost, forgetting_tolerance=0.05)
    assert not ok and "forgets the original vocabulary" in why and "rec_acc 0.600 -> 0.500" in why
    assert gate(old, new, "not_worse", 0.0, regression=lost, forgetting_tolerance=0.2)[0]
    assert gate(old, new, "always", 0.0, regression=lost)[0]  # 'always' means always
    # mask mIoU counts too, and a worse held-out slice is still refused first
    masks = ({"rec_acc": 0.6, "mask_miou": 0.5}, {"rec_acc": 0.6, "mask_miou": 0.3})
    assert not gate(old, new, "not_worse", 0.0, regression=masks)[0]
    assert "held-out" in gate(new, old, "not_worse", 0.0, regression=kept)[1]
    # Round after round: each version within 0.05 of the one served before it, and the
    # losses add up - the base checkpoint's score holds the lineage to the tolerance.
    base = {"rec_acc": 0.62, "n_records": 40}
    ok, why = gate(
        old, new, "not_worse", 0.0, regression=kept, regression_base=base, forgetting_tolerance=0.05
    )
    assert ok and "0.600 -> 0.570 (base checkpoint 0.620), within 0.05" in why
    crept = ({"rec_acc": 0.58, "n_records": 40}, {"rec_acc": 0.55, "n_records": 40})
    assert gate(old, new, "not_worse", 0.0, regression=crept, forgetting_tolerance=0.05)[0]
    ok, why = gate(
        old,
        new,
        "not_worse",
        0.0,
        regression=crept,
        regression_base=base,
        forgetting_tolerance=0.05,
    )
    assert not ok and "rec_acc 0.620 -> 0.550 since the base checkpoint" in why


def test_replay_and_regression_settings():
    s = RetrainSettings.from_env(
        {"RETRAIN_REPLAY": "0.5", "RETRAIN_REGRESSION": "40", "PROMOTE_FORGETTING_TOLERANCE": "0.1"}
    )
    assert (s.replay, s.regression, s.forgetting_tolerance) == (0.5, 40, 0.1)
    off = RetrainSettings.from_env({})
    assert (off.replay, off.regression, off.forgetting_tolerance) == (0.0, 0, 0.05)
    with pytest.raises(ValueError, match="RETRAIN_REPLAY"):
        RetrainSettings.from_env({"RETRAIN_REPLAY": "-1"})
    with pytest.raises(ValueError, match="RETRAIN_REGRESSION='some'"):
        RetrainSettings.from_env({"RETRAIN_REGRESSION": "some"})
    assert RetrainSettings.from_env({"RETRAIN_LOSS": "cycle1=0, giou=0.5"}).loss == {
        "cycle1": 0.0,
        "giou": 0.5,
    }
    with pytest.raises(ValueError, match="RETRAIN_LOSS must set loss weights"):
        RetrainSettings.from_env({"RETRAIN_LOSS": "cycle3=0"})
    with pytest.raises(ValueError, match="RETRAIN_LOSS='cycle1'"):
        RetrainSettings.from_env({"RETRAIN_LOSS": "cycle1"})
    with pytest.raises(ValueError, match="PROMOTE_FORGETTING_TOLERANCE"):
        RetrainSettings.from_env({"PROMOTE_FORGETTING_TOLERANCE": "2"})
    tower = RetrainSettings.from_env(
        {
            "RETRAIN_TRAINABLE": "vision_tower, mm_projector,language_model",
            "RETRAIN_LR_SCALE": "vision_tower=0.5",
        }
    )
    assert tower.trainable == ("vision_tower", "mm_projector", "language_model")
    assert tower.lr_scale == {"vision_tower": 0.5}
    assert (off.trainable, off.lr_scale) == ((), {})
    with pytest.raises(ValueError, match="RETRAIN_LR_SCALE='vision_tower'"):
        RetrainSettings.from_env({"RETRAIN_LR_SCALE": "vision_tower"})


def test_replay_and_regression_slices_are_fixed_valid_and_disjoint():
    config = load_config(DEMO)
    replay = forgetting.replay_set(40, 0.5, config)
    regression = forgetting.regression_set(20, config)
    assert len(replay) == 20 and len(regression) == 20
    assert len(forgetting.replay_set(40, 0.0, config)) == 0
    again = forgetting.regression_set(20, config)
    assert [r.text for r in again.records] == [r.text for r in regression.records]
    assert all(
        (a.image == b.image).all() for a, b in zip(again.records, regression.records, strict=True)
    )
    assert not any(
        a.image.shape == b.image.shape and (a.image == b.image).all()
        for a in replay.records
        for b in regression.records
    )
    # the bundled model scores presence with "Is there ...?": its replay rehearses the
    # domain's yes/no answers too (both of them), the regression slice stays referring
    assert config.score.presence == "exists"
    chats = [r for r in replay.records if r.task == "chat"]
    assert {r.answer.split(",")[0] for r in chats} == {"Yes", "No."}
    assert all(r.text.startswith("Is there") and not r.boxes for r in chats if r.answer == "No.")
    assert {r.task for r in regression.records} == {"rec"}
    for r in chats:
        assert not set(r.text.split()) & (set(synth.NEW_SHAPES) | set(synth.NEW_COLORS))
    for r in [r for r in replay.records if r.task == "rec"] + regression.records:
        words = set(r.text.split())
        assert not words & (set(synth.NEW_SHAPES) | set(synth.NEW_COLORS))  # the old words
        assert r.masks is not None and len(r.masks) == len(r.boxes) >= 1
        union = np.zeros((r.height, r.width), dtype=bool)
        for m, b in zip(r.masks, r.boxes, strict=True):
            mask = _decode_mask(m, r.width, r.height, r.source)
            assert list(mask_to_box(mask)) == b
            union |= mask
        assert union.sum() > 0
    # a training Sample: the image, its turns, boxes and masks
    sample = replay[[r.task for r in replay.records].index("rec")]
    assert sample.boxes and sample.masks and all(m is not None for m in sample.masks)


def _conflicting_tasks(root: Path, n: int) -> list[dict]:
    """Scenes of the ORIGINAL vocabulary whose corrections contradict it: every expression
    ("the red circle") boxed as the image's top-left quadrant, whatever is there. Learning
    these - which the held-out corrections reward - must unlearn the words."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = synth.SynthConfig(
        min_side=128, max_side=256, task_mix={"rec": 1.0, "multi": 0, "caption": 0, "chat": 0}
    )
    tasks = []
    for scene, records in synth.generate(77, n, cfg, start=1):
        if not records:
            continue
        path = root / f"conflict-{scene.scene_id}.png"
        Image.fromarray(scene.image).save(path)
        w, h = scene.width, scene.height
        result = [
            rectangle_result([0, 0, w / 2, h / 2], ["Object"], width=w, height=h, region_id="q"),
            textarea_result(records[0]["expression"]),
        ]
        i = scene.scene_id
        tasks.append(
            {
                "id": i,
                "data": {"image": str(path)},
                "annotations": [{"id": 90_000 + i, "task": i, "result": result}],
            }
        )
    return tasks


def test_a_retraining_job_that_forgets_is_not_promoted(tmp_path):
    # The bundled model knows the original vocabulary (most of the regression slice right);
    # 60 steps at lr 5e-4 without replay on the contradicting corrections lose the words
    # while the held-out corrections - which contradict them too - get no worse. The
    # held-out check then promotes, so only the regression slice can refuse: it must.
    # (Whether the held-out score also rises varies between machines: here 0.0 -> 0.875
    # on 2026-12-06; CI's run of 2026-12-07 stayed at 0.0 -> 0.0, the slice 0.83 -> 0.0.
    # Either way the held-out check passes, which is what this test needs.)
    settings = RetrainSettings.from_env(
        {},
        model_dir=tmp_path / "md",
        checkpoint=str(DEMO),
        local_files_root=tmp_path,
        stages=(2,),
        epochs=15.0,
        max_steps=60,
        lr=5e-4,
        batch_size=8,
        regression=24,
        replay=0.0,
        heartbeat_s=1.0,
    )
    store = settings.store
    for task in _conflicting_tasks(tmp_path / "images", 40):
        store.upsert_annotation("3", task, task["annotations"][0])
    job, _ = store.request_job("3", "START_TRAINING")
    result = run_job(job.job_id, settings)
    old, new = result["eval_old"], result["eval_new"]
    r_old, r_new = result["regression"]["old"], result["regression"]["new"]
    print(old["rec_acc"], new["rec_acc"], r_old["rec_acc"], r_new["rec_acc"], result["reason"])
    # the held-out slice alone would promote it (the gate's reason starts so) ...
    assert gate(old, new, settings.policy, settings.tolerance)[0]
    assert result["reason"].startswith("not worse on the held-out slice")
    assert r_new["rec_acc"] < r_old["rec_acc"] - 0.05  # ... but it forgot the words
    assert result["promoted"] is False
    assert "forgets the original vocabulary" in result["reason"]
    assert versions.read_current_version(settings.model_dir) is None  # the base is served
    assert [v["name"] for v in versions.list_versions(settings.model_dir)] == [result["version"]]


def test_the_base_checkpoints_regression_score_is_computed_once(tmp_path, monkeypatch):
    from training import retrain

    settings = RetrainSettings.from_env({}, model_dir=tmp_path / "md", checkpoint=str(DEMO))
    settings.model_dir.mkdir()
    base = versions.base_version(settings.checkpoint)
    slice_ = forgetting.regression_set(4, load_config(DEMO))
    first = retrain._regression_reference(settings, base, slice_, "cpu")  # the real model
    assert first["n_records"] == 4 and 0.0 <= first["rec_acc"] <= 1.0

    def no_second_evaluation(*args, **kwargs):
        raise AssertionError("the base checkpoint was evaluated again")

    monkeypatch.setattr(retrain, "_evaluate", no_second_evaluation)
    assert retrain._regression_reference(settings, base, slice_, "cpu") == first
    other = forgetting.regression_set(2, load_config(DEMO))  # another slice: another key
    with pytest.raises(AssertionError, match="evaluated again"):
        retrain._regression_reference(settings, base, other, "cpu")


def test_a_job_can_train_the_tower_at_its_own_rate(tmp_path):
    # RETRAIN_TRAINABLE / RETRAIN_LR_SCALE reach stage 2 (the tower's weights change) and
    # leave stage 3 its own modules; copy-paste copies are made from the masked corrections
    from safetensors.torch import load_file

    from nextchat_cli.new_words_demo import new_word_tasks
    from training.new_words import NewWordsConfig

    settings = RetrainSettings.from_env(
        {
            "RETRAIN_TRAINABLE": "vision_tower,mm_projector,language_model,loc_encoder,loc_decoder",
            "RETRAIN_LR_SCALE": "vision_tower=0.5",
            "RETRAIN_COPY_PASTE": "1",
        },
        model_dir=tmp_path / "md",
        checkpoint=str(DEMO),
        local_files_root=tmp_path,
        stages=(2, 3),
        max_steps=2,
        policy="always",
        heartbeat_s=1.0,
    )
    for task in new_word_tasks(
        tmp_path / "images", 10, first_id=1, seed=1, config=NewWordsConfig()
    ):
        settings.store.upsert_annotation("5", task, task["annotations"][0])
    job, _ = settings.store.request_job("5", "START_TRAINING")
    result = run_job(job.job_id, settings)
    assert [s["stage"] for s in result["stages"]] == [2, 3]
    assert result["pasted_samples"] == 8  # one copy of each of the 8 training corrections
    before = load_file(str(DEMO / "model.safetensors"))
    after = load_file(
        str(versions.version_dir(settings.model_dir, result["version"]) / "model.safetensors")
    )
    tower = [k for k in after if k.startswith("vision_tower.") and k.endswith("convolution.weight")]
    assert tower and any(not (after[k] == before[k]).all() for k in tower)
