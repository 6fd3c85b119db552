"""The bundled demo checkpoint (models/demo): it loads by default, answers generated
scenes through `nextchat predict` with boxes and an overlay, and the numbers it ships in
metrics.json are what its weights score on the held-out split (re-measured here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import readme_block
from PIL import Image
from safetensors.torch import load_file

from nextchat_core.build import from_pretrained
from nextchat_core.config import get_preset
from nextchat_core.frames import box_iou
from nextchat_core.predictor import NextChatPredictor, Query
from training import demo, robust_render, synth
from training.data import read_refexp_jsonl
from training.evaluation import evaluate_predictor
from training.versions import resolve_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# Of 20; measured for the shipped weights (stage2d + stage2e on top of stage2c) with the
# presence gate, 2026-12-01: 20 and 19 (the stage2c weights before them: 20 and 11).
# Re-measured 2026-12-02 after the longer SAM pre-training (sam-more, -more2, -more3, stage 3
# again): every count below the same (the boxes and the presence answer are the LLM's,
# which it did not change).
EASY_HITS, FULL_HITS = 20, 19
# Of 20 fresh scenes of the second renderer (training.robust_render, seed 424243); measured
# for the shipped weights on 2026-12-01: 15/20 (stage2c's: 12; the model before the
# perception-first recipe, which learned its own renderer: 9/20).
ROBUST_HITS = 15
# With the presence gate (the shipped weights, 2026-12-01): of seed 424244's 18 absent-object
# prompts 17 got no region, of its 22 present ones 20 kept theirs; per-label prompts on seed
# 424245's 10 scenes: 25 of 31 labels that are there got a region, 28 of 29 that are not,
# none (stage2c's: 24 and 25).
# Re-measured 2026-12-06 after the caption cycles (stage2g, -h, -i, stage 3 again): easy,
# full and robust hits, absent dropped and present kept the same; per-label prompts 27 of
# 31 present labels with a region, 27 of 29 absent ones without.
ABSENT_DROPPED, PRESENT_KEPT = 17, 20
PER_LABEL_PRESENT, PER_LABEL_ABSENT = 27, 27
# Of 20 regions of fresh scenes (seed 424246), captions that name size, colour and shape
# right: 18, measured 2026-12-06 (the model before the caption cycles: 2).
CAPTION_HITS = 18


def test_the_default_checkpoint_is_the_bundled_demo():
    assert resolve_checkpoint(None).resolve() == DEMO.resolve()
    assert (DEMO / "model.safetensors").stat().st_size < 40 * 2**20  # the budget


def test_nextchat_predict_on_a_generated_scene(tmp_path):
    scene, records = next(synth.generate(20261127, 1, synth.SynthConfig()))
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    prompt = next(r["expression"] for r in records if r["task"] == "rec")
    overlay = tmp_path / "overlay.png"
    argv = ["predict", str(tmp_path / "scene.png"), prompt, "--json", "--overlay", str(overlay)]
    out = subprocess.run(
        [sys.executable, "-m", "nextchat_cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answers = json.loads(out.stdout[: out.stdout.rindex("]") + 1])
    assert answers[0]["prompt"] == prompt and "<at>" in answers[0]["text"]
    (det,) = answers[0]["detections"][:1]
    x1, y1, x2, y2 = det["box"]
    assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
    with Image.open(overlay) as im:
        assert im.size == (scene.width, scene.height)


def test_the_bundled_demo_finds_the_referred_shape_in_fresh_scenes():
    # Scenes of a seed that neither training nor the held-out split uses; 1-2 large shapes
    # (the easy end of the domain) and the full domain (1-6 shapes, small ones included).
    predictor = NextChatPredictor.from_pretrained(DEMO)
    found = {}
    for name, easy in (("easy", True), ("full", False)):
        cfg = synth.SynthConfig(
            easy=easy,
            task_mix={"rec": 1.0, "multi": 0.0, "caption": 0.0, "chat": 0.0},
            records_per_scene=1,
        )
        hits = 0
        for scene, (record,) in synth.generate(424242, 20, cfg):
            predictor.set_image(Image.fromarray(scene.image), with_masks=False)
            (answer,) = predictor.predict(record["expression"], with_masks=False)
            boxes = [d.box for d in answer.detections]
            hits += bool(boxes) and box_iou(boxes[0], record["boxes"][0]) >= 0.5
        found[name] = hits
    # Measured with the shipped weights: EASY_HITS and FULL_HITS of 20 (see metrics.json for
    # the 300-scene numbers); a small margin for float rounding at the IoU 0.5 boundary.
    assert found["easy"] >= EASY_HITS - 1, found
    assert found["full"] >= FULL_HITS - 1, found


def test_the_bundled_demo_finds_the_referred_shape_in_differently_rendered_scenes():
    predictor = NextChatPredictor.from_pretrained(DEMO)
    cfg = robust_render.RobustConfig(task_mix={"rec": 1.0})
    hits = n = i = 0
    while n < 20:
        rng = robust_render.scene_rng(424243, i)
        scene, _, extents = robust_render.render(rng, cfg, scene_id=i)
        i += 1
        records = [r for r in robust_render.records(scene, extents, rng, cfg) if r["boxes"]]
        if not records:
            continue
        n += 1
        predictor.set_image(Image.fromarray(scene.image), with_masks=False)
        (answer,) = predictor.predict(records[0]["expression"], with_masks=False)
        boxes = [d.box for d in answer.detections]
        hits += bool(boxes) and box_iou(boxes[0], records[0]["boxes"][0]) >= 0.5
    assert hits >= ROBUST_HITS - 1, hits


@pytest.mark.timeout(600)
def test_shipped_metrics_are_what_the_weights_score(tmp_path):
    shipped = json.loads((DEMO / "metrics.json").read_text())
    assert shipped["eval_seed"] == demo.EVAL_SEED
    split = demo.eval_split(tmp_path, shipped["eval_records"])
    report = evaluate_predictor(
        NextChatPredictor.from_pretrained(DEMO), read_refexp_jsonl(split, get_preset("demo"))
    )
    # The same weights and scenes; thread counts may move a box by float rounding, so a
    # record may flip at the IoU 0.5 boundary.
    final = shipped["final"]
    assert report["n_gt_boxes"] == final["n_gt_boxes"]
    assert report["rec_acc"] == pytest.approx(final["rec_acc"], abs=1.01 / final["n_records"])
    assert report["mean_box_iou"] == pytest.approx(final["mean_box_iou"], abs=0.002)
    assert report["mask_miou"] == pytest.approx(final["mask_miou"], abs=0.002)
    # the region score and gate as shipped (calibrated by the recipe, in config.json)
    assert shipped["score"]["calibration"]["fitted"] is not None
    assert report["present_with_region_rate"] == pytest.approx(
        final["present_with_region_rate"], abs=1.01 / final["n_records"]
    )
    assert report["confidence"]["auroc"] == pytest.approx(final["confidence"]["auroc"], abs=0.01)


@pytest.mark.timeout(600)
def test_a_run_continues_a_shipped_model_at_a_later_phase(tmp_path):
    phases = demo.default_phases(scale=0.002)
    with pytest.raises(ValueError, match="no phase 'stage9'"):
        demo.continue_from(tmp_path / "run", DEMO, phases, "stage9")
    demo.continue_from(tmp_path / "run", DEMO, phases, "stage3")
    metrics = demo.run(tmp_path / "run", phases=phases, batch_size=2, eval_scenes=4)
    shipped = json.loads((DEMO / "metrics.json").read_text())
    earlier = [p.name for p in phases][:-1]
    assert earlier[-1] == "stage2i" and metrics["continued_from"]["phases"] == earlier
    # the shipped model's minutes and curve stand for the phases it was not trained again
    for name in earlier:
        assert metrics["phase_wall_s"].get(name) == shipped["phase_wall_s"].get(name), name
    kept = [c for c in shipped["curve"] if c["phase"] in earlier]
    assert kept and metrics["curve"][: len(kept)] == kept
    assert metrics["curve"][-1]["phase"] == "stage3"
    assert metrics["curve"][-1]["minutes"] >= kept[-1]["minutes"]
    assert metrics["vision_readout"] == shipped["vision_readout"]
    run_tokenizer = tmp_path / "run" / "stage3" / "final" / "tokenizer.json"
    assert run_tokenizer.read_bytes() == (DEMO / "tokenizer.json").read_bytes()
    # only stage 3's modules moved from the shipped weights
    before = from_pretrained(DEMO).model.state_dict()
    after = from_pretrained(tmp_path / "run" / "stage3" / "final").model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("seg_prompt_mlp", "sam.mask_decoder")) for k in moved)


@pytest.mark.timeout(900)
def test_the_recipe_runs_end_to_end_at_small_scale(tmp_path):
    phases = demo.default_phases(scale=0.002)  # 2 steps per phase
    metrics = demo.run(
        tmp_path / "run",
        phases=phases,
        batch_size=2,
        eval_scenes=4,
        eval_every=1000,
        ship=tmp_path / "shipped",
    )
    run = tmp_path / "run"
    assert [p.name for p in phases] == [
        "vision",
        "sam",
        "stage2",
        "stage2b",
        "stage2c",
        "stage2d",
        "stage2e",
        "sam-more",
        "sam-more2",
        "sam-more3",
        "stage2g",
        "stage2h",
        "stage2i",
        "stage3",
    ]
    assert metrics["final"]["n_records"] == 4
    # every split of the issue is scored: held-out, absent/captions/yes-no, robustness
    assert metrics["tasks"]["n_absent"] and metrics["tasks"]["n_captions"]
    assert metrics["tasks"]["n_yes_no"] and metrics["robust"]["n_box_records"]
    # the region score's calibration was fitted, or the run says why not (a 2-step model)
    calibration = metrics["score"]["calibration"]
    assert calibration["fitted"] is not None or "cannot fit" in calibration["why"]
    assert set(metrics["phase_wall_s"]) >= {"splits", "vision", "sam", "stage2", "stage3"}
    assert {"small", "large"} & set(metrics["vision_readout"])
    assert (tmp_path / "shipped" / "model.safetensors").is_file()
    shipped = json.loads((tmp_path / "shipped" / "metrics.json").read_text())
    assert shipped["final"] == metrics["final"]
    # the perception pre-trainings ran and logged their losses
    vision_rows = [
        json.loads(x) for x in (run / "vision" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("center_shape" in r for r in vision_rows)
    sam_rows = [json.loads(x) for x in (run / "sam" / "metrics.jsonl").read_text().splitlines()]
    assert any("focal" in r and "dice" in r for r in sam_rows)
    # the language stage: NExT-Chat's losses and the grounding stand-ins, no cycle1
    stage2 = [json.loads(x) for x in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in stage2 if not r.get("eval")]
    assert train_rows and all("l1_loss" in r for r in train_rows)
    assert not any(k == "cycle1_loss" for r in train_rows for k in r)
    for key in ("aux_ground", "aux_norm", "aux_cell_box"):
        assert any(key in r for r in train_rows), key
    # the caption cycle points its answers at the region's cells
    stage2g = [json.loads(x) for x in (run / "stage2g" / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_caption_point" in r for r in stage2g)
    # the tower is frozen after its pre-training (as CLIP), SAM's encoder after its own
    # (continued by sam-more, -more2 and -more3: the language phases between do not touch SAM)
    after_vision = from_pretrained(run / "vision" / "final").model.state_dict()
    first_sam = from_pretrained(run / "sam" / "final").model.state_dict()
    after_sam = from_pretrained(run / "sam-more3" / "final").model.state_dict()
    stage2e = from_pretrained(run / "stage2e" / "final").model.state_dict()
    for key, value in stage2e.items():
        if key.startswith("sam."):
            assert torch.equal(value, first_sam[key]), key
    assert not torch.equal(
        first_sam["sam.image_encoder.blocks.0.attn.qkv.weight"],
        after_sam["sam.image_encoder.blocks.0.attn.qkv.weight"],
    )
    final = from_pretrained(tmp_path / "shipped").model.state_dict()
    for key, value in final.items():
        if key.startswith("vision_tower."):
            assert torch.equal(value, after_vision[key]), key
        if key.startswith("sam.image_encoder."):
            assert torch.equal(value, after_sam[key]), key
    assert not torch.equal(
        after_sam["sam.mask_decoder.iou_prediction_head.layers.0.weight"],
        after_vision["sam.mask_decoder.iou_prediction_head.layers.0.weight"],
    )
    # stage 3 starts from SAM's box-prompt pre-training exactly: the prompt MLP outputs 0
    start3 = from_pretrained(run / "stage3-init").model
    assert not start3.seg_prompt_mlp[-1].weight.any() and not start3.seg_prompt_mlp[-1].bias.any()
    config = json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert config["vision"]["hf_model_type"] == "resnet" and config["vision"]["fuse_previous_stage"]
    assert config["vision"]["token_merge"] == 2 and config["vision"]["frozen"]


@pytest.mark.timeout(600)
def test_the_ninety_minute_recipe_runs_from_scratch_at_small_scale(tmp_path, capsys):
    # the CLI's --recipe 90min: one SAM cycle, one language cycle on cached features
    out = tmp_path / "run"
    args = ["--recipe", "90min", "--scale", "0.0002", "--out", str(out), "--steps", "stage2=3"]
    for bad, said in (
        ("stage9=3", r"phases \['stage9'\] that this recipe does not have; its phases: vision, "),
        ("stage2=many", "--steps wants PHASE=STEPS pairs like stage2=30000, got 'stage2=many'"),
    ):
        with pytest.raises(SystemExit, match=said):
            demo.main([*args[:-1], bad])
    assert not out.exists()  # refused before the run directory was claimed
    assert (
        demo.main([*args, "--batch-size", "2", "--eval-scenes", "4", "--eval-every", "1000"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["n_records"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["vision", "sam", "stage2", "stage3"]
    assert phase_names(metrics) == names
    # --steps set the language cycle's steps (2 at this scale), nothing else's
    assert [p["steps"] for p in metrics["phases"]] == [2, 2, 3, 2]
    assert metrics["recipe"] == {"recipe": "90min", "scale": 0.0002, "steps": "stage2=3"}
    assert set(metrics["machine"]) == {"cpu", "threads", "kernels", "amx_bf16"}
    # the tower's pre-training: bf16 autocast where the CPU has AMX, else float32
    assert metrics["phases"][0]["precision"] == "auto"
    done = json.loads((out / "vision" / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["precision"] == ("bf16" if metrics["machine"]["amx_bf16"] else "fp32")
    assert set(metrics["phase_wall_s"]) >= {"splits", *names, "calibration", "evaluation"}
    # the language cycle trained on the frozen tower's cached features, with every stand-in
    assert (out / "stage2" / "feature-pool.pt").is_file()
    rows = [json.loads(x) for x in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("eval")]
    for key in ("aux_ground", "aux_point", "aux_caption_point", "aux_caption_read", "giou_loss"):
        assert any(key in r for r in rows), key
    after_vision = from_pretrained(out / "vision" / "final").model.state_dict()
    final = from_pretrained(out / "stage3" / "final").model.state_dict()
    for key, value in final.items():
        if key.startswith("vision_tower."):
            assert torch.equal(value, after_vision[key]), key
    with pytest.raises(SystemExit):
        demo.main(["--recipe", "120min", "--out", str(out)])
    assert "invalid choice: '120min'" in capsys.readouterr().err
    # the run directory is this recipe's: the shipped recipe would reuse its phases by name
    with pytest.raises(SystemExit, match=r"holds a run of recipe '90min' at scale 0\.0002"):
        demo.main(["--recipe", "shipped", "--scale", "0.0002", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"with --steps stage2=3, not recipe '90min' at scale"):
        demo.main(args[:-2])  # the same recipe without its --steps
    assert not (out / "stage2b").exists()


@pytest.mark.timeout(600)
def test_minutes_fit_the_ninety_minute_recipe_to_this_machine(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--recipe", "90min", "--scale", "0.0002", "--out", str(out), "--batch-size", "2"]
    for extra, said in (
        (["--minutes", "0"], "--minutes wants minutes > 0"),
        (["--recipe", "shipped", "--minutes", "5"], "for --recipe shipped"),
        (["--minutes", "5", "--steps", "stage2=3"], "sets the steps of stage2: leave it out"),
    ):
        with pytest.raises(SystemExit):
            demo.main([*base, *extra])
        assert said in capsys.readouterr().err
    assert not out.exists()
    # 0.01 minutes are spent before the language cycle starts: it gets the probe's minimum
    args = [*base, "--eval-scenes", "4", "--eval-every", "1000", "--minutes", "0.01"]
    assert demo.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == {"recipe": "90min", "scale": 0.0002, "minutes": 0.01}
    fill = metrics["fill"]["stage2"]
    assert fill == json.loads((out / "stage2" / "fill.json").read_text())
    assert fill["steps"] == demo.FILL_PROBE_STEPS and fill["left_s"] < 0.6
    assert fill["step_s"] > 0 and fill["probe_s"] > 0 and fill["reserve_s"] == demo.FILL_RESERVE_S
    usable = fill["left_s"] - fill["probe_s"] - fill["reserve_s"]
    assert fill["steps"] == max(demo.FILL_PROBE_STEPS, int(usable / fill["step_s"]))
    assert "checked_at" not in fill  # too few steps to re-time
    rows = [json.loads(x) for x in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == fill["steps"]  # the cycle trained what it decided
    ran = {p["name"]: p["steps"] for p in metrics["phases"] if "name" in p}
    assert ran["stage2"] == fill["steps"] and ran["stage3"] == 2  # what ran, not the recipe's
    assert not (out / "stage2" / "probe").exists()  # the probe's weights are thrown away
    assert "(stage2 took the steps the run's --minutes left: 50 at the" in demo.readme_summary(
        metrics
    )
    # a resumed run keeps the steps decided, whatever the budget left says now
    phase = next(p for p in demo.ninety_minute_phases(0.0002) if p.name == "stage2")
    assert demo.fill_steps(phase, out / "stage2", "unused", {}, 1e9) == fill["steps"]
    # ten minutes beyond the reserve: a real probe's step time sizes the phase
    mcfg = get_preset("demo")
    setting = {
        "tokenizer_dir": None,
        "mcfg": mcfg,
        "grid": 8,
        "batch_size": 2,
        "eval_set": None,
        "eval_every": 0,
        "eval_max": 4,
    }
    left = demo.FILL_RESERVE_S + 600
    steps = demo.fill_steps(phase, tmp_path / "more", str(out / "sam" / "final"), setting, left)
    more = json.loads((tmp_path / "more" / "fill.json").read_text())
    usable = left - more["probe_s"] - demo.FILL_RESERVE_S
    assert steps == more["steps"]  # (probe_s is recorded to 0.1 s: a step or two either way)
    assert abs(steps - usable / more["step_s"]) <= 2
    # the probe's guess leaves out what the phase does beside its steps: evaluations every
    # 5 steps here, each longer than 2.5 steps. The phase re-times itself and still ends
    # in the budget; trained at the guess (the fill before train_filled) it overran
    left = demo.FILL_RESERVE_S + 90
    eval_set = demo.eval_sets(out, 4, mcfg)[0]
    scored = {**setting, "eval_set": eval_set, "eval_every": 5, "eval_max": 4}
    start = time.perf_counter()
    demo.train_filled(phase, tmp_path / "paced", str(out / "sam" / "final"), scored, left)
    wall = time.perf_counter() - start
    paced = json.loads((tmp_path / "paced" / "fill.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "paced" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == paced["steps"]  # trained what the check decided
    assert paced["checked_at"] == min(
        demo.FILL_CHECK_STEPS, paced["guess"] // 2 // demo.LOG_EVERY * demo.LOG_EVERY
    )
    evals = [r for r in rows if r.get("eval")]
    assert len(evals) == -(-paced["steps"] // 5) and all(r["seconds"] > 0 for r in evals)
    assert paced["eval_s"] > 2.5 * paced["pace_s"], paced  # an evaluation: over 2.5 steps
    assert paced["steps"] < 0.8 * paced["guess"]
    assert 0.6 * 90 < wall < 1.25 * 90, (wall, paced)
    guessed = paced["guess"] * (paced["pace_s"] + paced["eval_s"] / 5)
    assert guessed > 1.25 * 90, (guessed, paced)  # what the guess alone would have cost


def phase_names(metrics: dict) -> list[str]:
    """The phases a run's metrics.json lists, by name (a pre-training by its kind)."""
    return [p["name"] if "name" in p else p["kind"] for p in metrics["phases"]]


def test_the_readme_states_the_shipped_metrics():
    # The README's numbers are generated from metrics.json, never copied by hand.
    table = readme_block("demo-metrics")
    assert table == demo.readme_summary(json.loads((DEMO / "metrics.json").read_text()))


def test_the_readme_states_the_ninety_minute_run_from_its_metrics():
    run = Path(__file__).resolve().parents[1] / "docs" / "demo-run-2026-12-08-90min-paced.json"
    metrics = json.loads(run.read_text())
    assert readme_block("demo-90min") == demo.readme_summary(metrics)
    # it is the 90-minute recipe's run - every phase's settings (learning rates included)
    # as the recipe has them now, the steps those it ran (--steps, or a --minutes fill) -
    # from scratch (nothing continued), within 90 minutes
    recipe = demo.with_steps(
        demo.ninety_minute_phases(), metrics.get("recipe", {}).get("steps", "")
    )
    assert metrics["phases"] == demo.phase_records(recipe, metrics.get("fill", {}))
    assert "continued_from" not in metrics and sum(metrics["phase_wall_s"].values()) <= 90 * 60


def test_the_bundled_demo_leaves_absent_objects_without_a_region():
    """A prompt naming a colour + shape that is not in the scene gets no region (the
    presence gate: the model's own yes/no answer), while prompts for shapes that are
    there keep theirs. Fresh scenes of a seed no split uses."""
    predictor = NextChatPredictor.from_pretrained(DEMO)
    cfg = synth.SynthConfig(
        task_mix={"rec": 1.0, "absent": 1.0, "multi": 0.0, "caption": 0.0, "chat": 0.0},
        records_per_scene=2,
    )
    kept = dropped = n_present = n_absent = 0
    for scene, records in synth.generate(424244, 20, cfg):
        predictor.set_image(Image.fromarray(scene.image), with_masks=False)
        answers = predictor.predict([r["expression"] for r in records], with_masks=False)
        for record, answer in zip(records, answers, strict=True):
            if record["boxes"]:
                n_present += 1
                kept += bool(answer.detections)
            else:
                n_absent += 1
                dropped += not answer.detections
                assert answer.presence is not None  # the demo scores presence by p(yes)
    # Measured for the shipped weights and scoring (2026-12-01): ABSENT_DROPPED of the
    # absent prompts and PRESENT_KEPT of the present ones; one record of margin each.
    assert n_present >= 15 and n_absent >= 15, (n_present, n_absent)
    assert dropped >= ABSENT_DROPPED - 1, (dropped, n_absent)
    assert kept >= PRESENT_KEPT - 1, (kept, n_present)


def test_the_bundled_demo_captions_a_region_it_is_given():
    """Region captions ("What is in the region?" with a box): the size, colour and shape of
    the object in it, exactly. Fresh scenes of a seed no split uses, one region each."""
    predictor = NextChatPredictor.from_pretrained(DEMO)
    cfg = synth.SynthConfig(task_mix={"caption": 1.0}, records_per_scene=1)
    hits = 0
    for scene, (record,) in synth.generate(424246, 20, cfg):
        (answer,) = predictor.predict_batch(
            [Image.fromarray(scene.image)],
            [Query(0, "", "caption", record["boxes"])],
            with_masks=False,
        )
        assert not answer.detections  # a caption answers in text
        hits += (answer.text or "").strip().rstrip(".").lower() == record["answer"]
    assert hits >= CAPTION_HITS - 1, hits


def test_per_label_prompts_give_regions_only_for_the_labels_in_the_image(tmp_path):
    """What a team meets with per-label prompts (the demo project's config: one label per
    shape, hint "all circles" ...): through the backend as Label Studio calls it, the
    labels whose shape is in the scene get regions, the others none, and one object gets
    one label."""
    from test_backend_support import image_server

    from backend.app import create_app
    from backend.settings import Settings
    from nextchat_cli.demo_project import demo_label_config

    images = tmp_path / "images"
    images.mkdir()
    scenes = []
    cfg = synth.SynthConfig(task_mix={"rec": 1.0}, records_per_scene=1)
    for scene, _ in synth.generate(424245, 10, cfg):
        Image.fromarray(scene.image).save(images / f"{scene.scene_id}.png")
        scenes.append(scene)
    settings = Settings.from_env({}, checkpoint=str(DEMO), model_dir=tmp_path / "md")
    client = create_app(settings, preload=False).test_client()
    with image_server(images) as url:
        tasks = [{"id": s.scene_id, "data": {"image": f"{url}/{s.scene_id}.png"}} for s in scenes]
        reply = client.post(
            "/predict", json={"tasks": tasks, "project": "1.1", "label_config": demo_label_config()}
        )
    assert reply.status_code == 200, reply.get_json()
    present_hit = present = absent_quiet = absent = 0
    for scene, result in zip(scenes, reply.get_json()["results"], strict=True):
        rects = [r for r in result["result"] if r["type"] == "rectanglelabels"]
        found = {r["value"]["rectanglelabels"][0] for r in rects}
        there = {o.shape for o in scene.objects}
        for shape in synth.SHAPES:
            if shape in there:
                present += 1
                present_hit += shape in found
            else:
                absent += 1
                absent_quiet += shape not in found
        for i, r in enumerate(rects):  # one object, one label (CROSS_LABEL_IOU)
            for o in rects[i + 1 :]:
                if r["value"]["rectanglelabels"] != o["value"]["rectanglelabels"]:
                    assert box_iou(_box(r), _box(o)) <= settings.cross_label_iou
    # Measured for the shipped weights (2026-12-01): PER_LABEL_PRESENT of the labels that
    # are there got a region and PER_LABEL_ABSENT of the others none; one of margin.
    assert present_hit >= PER_LABEL_PRESENT - 1, (present_hit, present)
    assert absent_quiet >= PER_LABEL_ABSENT - 1, (absent_quiet, absent)


def _box(result: dict):
    """A rectanglelabels result's box in original pixels (through frames)."""
    from nextchat_core import frames

    v = result["value"]
    rect = frames.PercentRect(v["x"], v["y"], v["width"], v["height"], v.get("rotation", 0))
    return frames.percent_to_pixel(rect, result["original_width"], result["original_height"])


def test_a_phase_trains_the_same_whatever_the_process_drew_before(tmp_path):
    """The stand-in heads (DemoAux, built before the trainer seeds the generators) start
    from the run's seed, not from the global generator's state: a phase run after a
    probe, an earlier phase or in a fresh process (a resumed run) trains the same weights."""
    mcfg = get_preset("demo")
    phase = next(p for p in demo.ninety_minute_phases(0.0002) if p.name == "stage2")
    assert phase.aux
    finals = []
    for draw in (1, 2):  # what the process drew before the phase
        torch.manual_seed(draw)
        out = tmp_path / f"after-{draw}"
        demo.train_phase(
            phase, out, str(DEMO), None, mcfg, 8, 2, None, 0, 0, steps=3, easy=False,
            pool=tmp_path / "feature-pool.pt",
        )  # fmt: skip
        finals.append(load_file(str(out / "final" / "model.safetensors")))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
