"""float32 against bf16 autocast on this CPU: the demo recipe's steps, timed both ways.

    python bench/precision.py                 # 60 steps of each phase each way
    python bench/precision.py --steps 100 --phases vision language

A CPU with AMX (``amx_bf16`` in /proc/cpuinfo; Intel Sapphire Rapids and later) multiplies
bf16 matrices several times faster than float32; what that buys a training step depends on
how much of the step is matrix products. Each row runs the real phase code
(``training.demo_pretrain.pretrain_vision`` / ``pretrain_sam`` with the 90-minute recipe's
phase, ``bench/language_trial.py``'s cached language cycle) for ``--steps`` steps from the
bundled model, once per precision, one after the other in this process's threads, and
reads seconds per step off the phase's own log (the steps after the first log row: no
start-up). Weights and the optimizer stay float32 under autocast: bf16 is the arithmetic
of the forward (and so of the backward), not what is stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def cpu_line() -> str:
    from nextchat_core.device import cpu_description

    d = cpu_description()
    return (
        f"{d['cpu']}, {d['threads']} threads, kernels {d['kernels']}, "
        f"AMX bf16: {'yes' if d['amx_bf16'] else 'no'}"
    )


def matmul_gflops(dtype_name: str, m: int = 688, k: int = 256, n: int = 688) -> float:
    """GFLOP/s of an ``m x k @ k x n`` product (the demo LLM's MLP at batch 8)."""
    import torch

    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(20):
        a @ b
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def time_pretrain(kind: str, precision: str, steps: int, work: Path) -> float:
    from training import demo
    from training.demo_pretrain import pretrain_sam, pretrain_vision

    phase = next(p for p in demo.ninety_minute_phases() if getattr(p, "kind", None) == kind)
    phase = dataclasses.replace(
        phase, steps=steps, precision=precision, log_every=max(1, steps // 4), save_every=steps
    )
    out = work / f"{kind}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    synth_cfg = demo.training_synth_config(blob_prob=phase.blob_prob)
    run = pretrain_vision if kind == "vision" else pretrain_sam
    run(REPO / "models" / "demo", out, phase, synth_cfg)
    return demo.seconds_per_step(out / "metrics.jsonl")


def time_language(precision: str, steps: int, work: Path, pool: int) -> float:
    import language_trial

    from training import demo

    name = f"language-{precision}"
    shutil.rmtree(work / name, ignore_errors=True)
    phase_dir, _ = language_trial.run_trial(
        work, name, {}, steps=steps, lm_scale=0.3, pool=pool, eval_every=0, precision=precision
    )
    return demo.seconds_per_step(phase_dir / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--phases", nargs="+", default=["vision", "sam", "language"],
        choices=["vision", "sam", "language"],
    )  # fmt: skip
    ap.add_argument("--pool", type=int, default=200, help="scenes cached for the language step")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: temp)")
    args = ap.parse_args(argv)
    if args.steps < 8 or ("language" in args.phases and args.steps <= 25):
        raise SystemExit(
            "--steps must be >= 8, and > 25 with the language phase (seconds per step are "
            "read between a phase's log rows; the language cycle logs every 25 steps)"
        )
    import logging

    logging.basicConfig(level=logging.WARNING)
    from nextchat_core.device import PRECISIONS  # ("fp32", "bf16"): the baseline first

    table: list[tuple[str, float, float]] = []
    fp32, bf16 = (matmul_gflops(p) for p in PRECISIONS)
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        work = args.work or Path(tmp)
        for phase in args.phases:
            times = []
            for precision in PRECISIONS:
                if phase == "language":
                    times.append(time_language(precision, args.steps, work, args.pool))
                else:
                    times.append(time_pretrain(phase, precision, args.steps, work))
            table.append((phase, times[0], times[1]))
    print(f"\n{cpu_line()}\n")
    print(f"matrix product 688x256 @ 256x688: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s "
          f"({bf16 / fp32:.1f}x)\n")  # fmt: skip
    print(f"{args.steps} steps of each phase each way (the 90-minute recipe's phases)\n")
    print("| phase | fp32 s / step | bf16 s / step | bf16 vs fp32 |")
    print("|---|---|---|---|")
    for phase, a, b in table:
        print(f"| {phase} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
