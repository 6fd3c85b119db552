"""The benchmark scripts run end to end at the tiny preset (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training import demo

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, **env: str) -> str:
    """``python bench/<script> args...`` from the repository root (``env`` on top of this
    process's); fails with its stderr unless it exits 0; returns its stdout."""
    out = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_fullscale_runs_at_tiny_on_cpu(tmp_path):
    stdout = run_bench(
        "fullscale.py",
        *("--preset", "tiny", "--device", "cpu", "--iters", "1", "--batches", "2"),
        *("--train-batch", "2", "--json", str(tmp_path / "r.json")),
    )
    for phase in (
        "SAM image encoder",
        "prefill",
        "decode per token via generate, static cache",
        "end to end, 1 image-prompt",
        "train stage 2",
        "train stage 3",
    ):
        assert phase in stdout, phase
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["e2e_batch1_ms"] > 0 and data["train_stage3"]["samples_per_s"] > 0


def test_train_throughput_runs_every_stage_at_tiny():
    stdout = run_bench("train_throughput.py", "--presets", "tiny", "--iters", "2", "--batch", "2")
    for stage in range(4):
        assert f"train stage {stage} " in stdout, stdout
    assert "samples/s" in stdout


def test_retrain_bench_runs_real_jobs_at_tiny(tmp_path, tiny_config, tiny_tokenizer):
    from nextchat_core.build import build_model, save_pretrained

    base = tmp_path / "tiny-base"
    save_pretrained(build_model(tiny_config), base, tiny_tokenizer)
    stdout = run_bench(
        "retrain.py",
        *("--checkpoint", str(base), "--sizes", "5", "6", "--steps", "2", "--batch", "2"),
        *("--feature-cache-mb", "0", "64", "--json", str(tmp_path / "rows.json")),
        TORCH_THREADS="1",
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    # each N without and with the feature cache (the setting reached the job)
    assert [(r["n"], r["cache_mb"]) for r in rows] == [(5, 0), (5, 64), (6, 0), (6, 64)]
    for r in rows:  # both stages ran (brush masks), each 2 steps, and the job promoted
        assert [(s["stage"], s["steps"]) for s in r["stages"]] == [(2, 2), (3, 2)]
        assert r["promoted"] and r["total_s"] >= sum(s["seconds"] for s in r["stages"])
        # the cached jobs computed the encoders' outputs once, in stage 2 (stage 3 added
        # SAM's embeddings); the others never
        filled = [s["feature_cache_s"] > 0 for s in r["stages"]]
        assert filled == ([True, True] if r["cache_mb"] else [False, False])
    assert "samples/s" in stdout and "fixed cost" in stdout and "job / baseline" in stdout
    # the baseline's own ratio is 1
    assert re.search(r"^\s+5\s+0\s+job\s+[\d.]+\s+1\.00\b", stdout, re.M), stdout


def test_click_latency_runs_on_the_bundled_model():
    stdout = run_bench("click_latency.py", "--images", "1", "--clicks", "2")
    # one image: its first click misses the embedding cache, the second click and the box hit
    assert "embedding cache 2 miss / 2 hit" in stdout  # the warm-up image is the other miss
    for row in ("first click on an image", "later clicks", "core: SAM image embedding alone"):
        assert row in stdout, row


def test_score_candidates_runs_on_the_bundled_model():
    stdout = run_bench("score_candidates.py", "--records", "8")
    assert "8 records:" in stdout
    for row in (
        "p(`<at>`) (the score before)",
        "p(yes) of 'Is there {expr}?'",
        "**the predictor's score**",
        "| p(yes) >= 0.5 |",
        "| CPU |",
    ):
        assert row in stdout, row


def test_interactive_latency_runs_two_real_backends():
    stdout = run_bench("interactive_latency.py", "--requests", "2", "--warmup", "1")
    for row in ("`SCORE_PRESENCE=at`", "`SCORE_PRESENCE=exists` (default)", "| ratio |"):
        assert row in stdout, row


def test_new_words_recipe_bench_smoke(tmp_path):
    # one real retraining job per row at a tiny size: copy-paste copies and replay reach
    # the job, both held-out sets and the absent new-word prompts are scored
    out = tmp_path / "r.json"
    run_bench(
        "new_words_recipe.py",
        *("--n", "10", "--eval", "4", "--replay", "0.5", "--epochs", "4"),
        *("--copy-paste", "1", "--stages", "2,3", "--regression", "4", "--point", "1"),
        *("--stage-epochs", "3=0.5"),
        *("--box-bias", "3", "-o", str(out)),
    )
    report = json.loads(out.read_text())
    (row,) = report["runs"]
    # the new version's box sizes on 3 of the scenes it trained on: each prompt whose box
    # is on or near its target counted once in "all" and once under its target's shape
    bias = row["box_bias_pool"]
    n_all = bias.get("all", {"n": 0})["n"]
    assert n_all <= 3
    assert sum(v["n"] for k, v in bias.items() if k.startswith("shape ")) == n_all
    assert row["point"] == 1.0  # RETRAIN_POINT reached the job (it trained with the loss)
    # per new word: Acc@0.5 and how many held-out tasks carry it, 4 tasks in all
    by_word = row["new_words"]["by_word"]
    assert by_word and all(0 <= acc <= 1 and 1 <= n <= 4 for acc, n in by_word.values())
    assert row["copy_paste"] == 1 and row["pasted_samples"] == 8  # 8 training corrections
    assert row["replay_samples"] == 8  # 0.5 x (8 corrections + 8 copies)
    assert [s["stage"] for s in row["stages"]] == [2, 3]
    # RETRAIN_EPOCHS for stage 2, RETRAIN_STAGE_EPOCHS's 0.5 for stage 3 (10 steps at least)
    for s, epochs in zip(row["stages"], (4, 0.5), strict=True):
        assert s["steps"] == max(10, math.ceil(epochs * s["samples"] / 8)), s
    assert row["stages"][0]["steps"] > 10
    assert row["new_words"]["n_records"] == 4 and row["new_words"]["absent_no_box_rate"] is not None
    assert report["before"]["original"]["n_records"] == 4


def test_new_words_probe_smoke():
    from training import synth

    stdout = run_bench("new_words_probe.py", "--train", "30", "--test", "10")
    rows = [line.split("|")[1].strip() for line in stdout.splitlines()[3:] if line.startswith("|")]
    assert {"cross", "heart", "pink", "cyan", "brown", "circle", "red"} <= set(rows), stdout
    # the box size read from the cell by a ridge fitted on the known shapes only
    sizes = stdout.split("Box size read from the cell")[1]
    table = [line.split("|") for line in sizes.splitlines() if line.startswith("| ")][1:]
    names = {r[1].strip() for r in table}
    assert "circle" in names and names & set(synth.NEW_SHAPES), stdout
    for r in table:
        width, height, mean_abs = float(r[4]), float(r[5]), float(r[6])
        assert mean_abs >= max(abs(width), abs(height)) / 2 - 1e-3, r


def test_new_words_errors_sorts_each_box_by_the_object_it_lands_on(tmp_path):
    import importlib.util

    from training import new_words

    spec = importlib.util.spec_from_file_location("errors", REPO / "bench/new_words_errors.py")
    assert spec is not None and spec.loader is not None
    errors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(errors)
    scene, _ = next(new_words.generate(2, 1))
    target = scene.objects[0].box
    assert errors.outcome(scene, target) == "target"
    x1, y1, x2, y2 = target
    loose = (x1 - (x2 - x1) * 0.4, y1 - (y2 - y1) * 0.4, x2 + (x2 - x1) * 0.4, y2 + (y2 - y1) * 0.4)
    assert errors.outcome(scene, loose) == "near the target"  # IoU 1 / 1.8^2 = 0.31
    other = scene.objects[1]
    shares = other.color == scene.objects[0].color or other.shape == scene.objects[0].shape
    kind = "same-word distractor" if shares else "other distractor"
    assert errors.outcome(scene, other.box) == kind
    # the real model on 6 held-out scenes: every prompt is counted once in "all"
    out = tmp_path / "e.json"
    stdout = run_bench("new_words_errors.py", "models/demo", "--n", "6", "-o", str(out))
    report = json.loads(out.read_text())
    assert report["scenes"] == "held-out"
    assert sum(report["outcomes"]["models/demo"]["all"].values()) == 6, stdout
    # the size of the boxes on or near their target: each such prompt counted once in
    # "all" and once under its target's shape
    bias = report["box_bias"]["models/demo"]
    n_all = bias.get("all", {"n": 0})["n"]
    assert n_all <= 6
    assert sum(v["n"] for k, v in bias.items() if k.startswith("shape ")) == n_all
    assert "log width ratio" in stdout


def test_language_trial_times_trains_and_prints_curves(tmp_path):
    root = str(tmp_path)
    small = "hidden_size=64,intermediate_size=128"
    args = ("--root", root, "time", "--variants", "recipe:", f"small:{small}")
    # 50 steps: the trainer logs every 25th (elapsed to 0.1 s), a step time is timed between
    # two logged rows - 25 steps apart, so that even the small LLM's is more than 0.0
    stdout = run_bench("language_trial.py", *args, "--steps", "50", "--pool", "4")
    table = [line.split("|") for line in stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[1].strip() for r in table] == ["recipe", "small"], stdout
    recipe, trial = (float(r[3].split()[0]) for r in table)
    assert trial < recipe and table[0][5].strip() == "1.00x", stdout  # LLM parameters, ratio
    assert all(float(r[4]) > 0 for r in table), stdout  # seconds per step
    # a trial: a fresh LLM on the bundled model's frozen tower, scored every 2 steps
    trial_args = ("--root", root, "train", "tiny", "--llm", small, "--steps", "4", "--pool", "4")
    lr = ("--lr", "2e-4", "--lm-scale", "0.5")  # the cycle's peak lr, the LLM's at 0.5x of it
    run_bench("language_trial.py", *trial_args, *lr, "--eval-every", "2", "--eval-max", "4")
    stdout = run_bench("language_trial.py", "--root", root, "curves", "tiny")
    steps = [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ")]
    assert steps[1:] == ["2", "4"], stdout
    assert '"hidden_size": 64' in stdout and '"tower": ' in stdout
    assert '"lr": 0.0002, "lm_scale": 0.5' in stdout
    ran = json.loads((tmp_path / "tiny" / "stage2" / "final" / "train_metrics.json").read_text())
    assert ran["config"]["lr"] == 2e-4 and ran["config"]["lr_scale"] == {"language_model": 0.5}
    # without --lr / --lm-scale a trial runs the recipe's cycle as the recipe has it
    recipe_cycle = next(p for p in demo.ninety_minute_phases() if p.name == "stage2")
    timed = json.loads((tmp_path / "time-small" / "trial.json").read_text())
    assert (timed["lr"], timed["lm_scale"]) == (
        recipe_cycle.lr,
        recipe_cycle.lr_scale["language_model"],
    )
    # the cached tower features are the tower's: their pool is named by its weights
    pools = sorted(p.name for p in tmp_path.glob("pool-4-*.pt"))
    assert len(pools) == 1 and re.fullmatch(r"pool-4-[0-9a-f]{10}\.pt", pools[0]), pools
    for llm, error in (
        ("hidden=1", "unknown LLM fields ['hidden']"),
        ("hidden_size=big", "like hidden_size=128, got 'hidden_size=big'"),
    ):
        bad = subprocess.run(
            [sys.executable, "bench/language_trial.py", "--root", root, "train", "x", "--llm", llm],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert bad.returncode != 0 and error in bad.stderr, bad.stderr


def test_precision_times_the_recipes_phases_in_float32_and_bf16(tmp_path):
    work = ("--work", str(tmp_path))
    vision = run_bench("precision.py", "--steps", "8", "--phases", "vision", *work)
    language = run_bench(
        "precision.py", "--steps", "50", "--phases", "language", "--pool", "4", *work
    )
    assert "GFLOP/s" in vision and "AMX bf16: " in vision, vision
    table = [stdout.splitlines()[-1].split("|") for stdout in (vision, language)]  # their rows
    assert [r[1].strip() for r in table] == ["vision", "language"], (vision, language)
    for row in table:
        fp32, bf16, ratio = (float(row[k].strip().rstrip("x")) for k in (2, 3, 4))
        assert fp32 > 0 and bf16 > 0 and ratio == pytest.approx(bf16 / fp32, abs=0.02), row
    # each phase ran both ways (its own run directory, its own log)
    assert {p.name for p in tmp_path.iterdir()} >= {"vision-fp32", "vision-bf16"}
    assert (tmp_path / "language-bf16" / "trial.json").read_text().count('"bf16"') == 1
