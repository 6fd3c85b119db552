"""Training throughput per stage: samples/s and peak memory for the small presets.

    python bench/train_throughput.py                       # tiny and demo on the CPU
    python bench/train_throughput.py --device cuda --lora  # on a GPU, stage 2 with LoRA too

One implementation of the measurement: :func:`bench.fullscale.bench_training` (the same
engine step the trainer runs), here for stages 0-3 of each preset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fullscale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora", action="store_true", help="also time stage 2 with LoRA on the LLM")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stages = [(0, False), (1, False), (2, False), (3, False)] + ([(2, True)] if args.lora else [])
    print(
        f"\ntraining throughput on {args.device} ({dtype}), batch {args.batch}, torch {torch.__version__}"
    )
    for preset in args.presets:
        ns = argparse.Namespace(
            preset=preset, iters=args.iters, train_batch=args.batch, attn="sdpa"
        )
        rows: list[tuple[str, str]] = []
        fullscale.bench_training(ns, device, dtype, rows, {}, stages=stages)
        for name, value in rows:
            print(f"{preset:>6} | {name:<55} | {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
