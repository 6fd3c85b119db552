"""Retraining cost of the active-learning loop: wall time and samples/s per stage, and the
whole job, for N = 50, 100, 200 corrected annotations.

    python bench/retrain.py                                   # the bundled demo model, CPU
    python bench/retrain.py --checkpoint DIR --device cuda    # a real checkpoint on a GPU
    python bench/retrain.py --sizes 4 --steps 2               # smoke run (the tests do this)
    python bench/retrain.py --feature-cache-mb 0 2048         # encoders every step vs cached

Each N runs one real retraining job (training.retrain.run_job: the worker's code without
the broker) in a fresh MODEL_DIR: annotations with brush masks from the synthetic domain,
stages 2 then 3, the held-out gate, publish and promote. The baseline row of each N is the
job's own evaluation of the served model on the held-out slice, so the job's total minus
its stages is the fixed cost (image fetch, two evaluations, publish). With several
``--feature-cache-mb`` values each N runs once per value and the table gives each job's
time as a ratio to the first value's (the baseline, same run, same data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nextchat_cli.loop_demo import make_tasks  # noqa: E402
from training.retrain import RetrainSettings, run_job  # noqa: E402
from training.store import AnnotationStore  # noqa: E402
from training.versions import resolve_checkpoint  # noqa: E402


def bench_one(
    n: int, base: Path, root: Path, args: argparse.Namespace, cache_mb: float | None
) -> dict:
    model_dir = root / f"n{n}-cache{cache_mb}" / "model_dir"
    tasks = make_tasks(
        root / f"n{n}" / "images", n, seed=41, masks=True, min_side=160, max_side=512
    )
    store = AnnotationStore(model_dir)
    for task in tasks:
        annotation = task["annotations"][0]
        store.upsert_annotation("1", {"id": task["id"], "data": task["data"]}, annotation)
    job, _ = store.request_job("1", "bench")
    overrides = {
        "model_dir": model_dir,
        "checkpoint": str(base),
        "device": args.device,
        "stages": (2, 3),
        "epochs": args.epochs,
        "batch_size": args.batch,
        "policy": "always",
        "local_files_root": root,
    }
    if args.steps:
        overrides["max_steps"] = args.steps
    if args.lr:
        overrides["lr"] = args.lr
    if cache_mb is not None:
        overrides["feature_cache_mb"] = cache_mb
    if os.environ.get("TORCH_THREADS"):
        overrides["torch_threads"] = int(os.environ["TORCH_THREADS"])
    settings = RetrainSettings.from_env({}, **overrides)
    t0 = time.perf_counter()
    result = run_job(job.job_id, settings)
    total = time.perf_counter() - t0
    return {"n": n, "cache_mb": settings.feature_cache_mb, "total_s": round(total, 1), **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint", default=None, help="base checkpoint (default: the bundled demo)"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="RETRAIN_LR (default: the setting's)")
    ap.add_argument("--steps", type=int, default=0, help="cap steps per stage (0: by epochs)")
    ap.add_argument(
        "--feature-cache-mb",
        type=float,
        nargs="+",
        default=[None],
        help="RETRAIN_FEATURE_CACHE_MB values (default: the setting's; 0: every step runs "
        "the encoders); the first is the baseline of the ratio column",
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    base = resolve_checkpoint(args.checkpoint).resolve()
    threads = os.environ.get("TORCH_THREADS", "torch default")
    print(
        f"\nretraining from {base.name} on {args.device}, batch {args.batch}, {args.epochs} epochs/stage, threads {threads}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="nextchat-bench-retrain-") as tmp:
        for n in args.sizes:
            for cache_mb in args.feature_cache_mb:
                rows.append(bench_one(n, base, Path(tmp), args, cache_mb))
    print(
        f"\n{'N':>5} {'cache MB':>9} {'stage':>5} {'steps':>6} {'wall s':>8} {'samples/s':>10} {'job / baseline':>15}"
    )
    baseline: dict[int, float] = {}
    for r in rows:
        cache = f"{r['cache_mb']:g}"
        for s in r["stages"]:
            print(
                f"{r['n']:>5} {cache:>9} {s['stage']:>5} {s['steps']:>6} {s['seconds']:>8.1f} {s['samples_per_s']:>10.2f}"
            )
        staged = sum(s["seconds"] for s in r["stages"])
        ratio = r["total_s"] / baseline.setdefault(r["n"], r["total_s"])
        print(
            f"{r['n']:>5} {cache:>9} {'job':>5} {'':>6} {r['total_s']:>8.1f} {'':>10} {ratio:>15.2f}"
            f"   (fixed cost {r['total_s'] - staged:.1f} s: fetch, 2 evaluations, publish)"
        )
    print(
        f"\n{'N':>5} {'cache MB':>9} {'held-out Acc@0.5 old':>21} {'new':>6} {'ratio job/N (s per annotation)':>32}"
    )
    for r in rows:
        old, new = (
            r["eval_old"].get("rec_acc", float("nan")),
            r["eval_new"].get("rec_acc", float("nan")),
        )
        print(
            f"{r['n']:>5} {r['cache_mb']:>9g} {old:>21.3f} {new:>6.3f} {r['total_s'] / r['n']:>32.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
