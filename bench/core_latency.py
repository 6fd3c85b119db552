"""Per-phase latency and peak memory of the small presets (``tiny``, ``demo``) on CPU.

    python bench/core_latency.py                 # both presets on the CPU
    python bench/core_latency.py --device cuda   # on a GPU

The measurement is :mod:`bench.fullscale`'s inference part (one implementation); this
script runs it for the small presets and prints them side by side.
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
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tables = {}
    for preset in args.presets:
        ns = argparse.Namespace(
            preset=preset, iters=args.iters, batches=[8], attn="sdpa", no_compile=True
        )
        rows: list[tuple[str, str]] = []
        fullscale.bench_inference(ns, device, dtype, rows, {})
        tables[preset] = dict(rows)
    keys = list(next(iter(tables.values())))
    width = max(len(k) for k in keys)
    print(f"\ncore latency on {args.device} ({dtype}), torch {torch.__version__}")
    print(" | ".join(["phase".ljust(width), *(p.ljust(28) for p in tables)]))
    print("-" * (width + 31 * len(tables)))
    for k in keys:
        print(" | ".join([k.ljust(width), *(tables[p].get(k, "-").ljust(28) for p in tables)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
