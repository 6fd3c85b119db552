"""The benchmark scripts run end to end at the tiny preset (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fullscale_runs_at_tiny_on_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "bench/fullscale.py",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--batches",
            "2",
            "--train-batch",
            "2",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for phase in (
        "SAM image encoder",
        "prefill",
        "decode per token via generate, static cache",
        "end to end, 1 image-prompt",
        "train stage 2",
        "train stage 3",
    ):
        assert phase in out.stdout, phase
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["e2e_batch1_ms"] > 0 and data["train_stage3"]["samples_per_s"] > 0


def test_train_throughput_runs_every_stage_at_tiny():
    out = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--presets", "tiny", "--iters", "2", "--batch", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in range(4):
        assert f"train stage {stage} " in out.stdout, out.stdout
    assert "samples/s" in out.stdout
