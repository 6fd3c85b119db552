"""``nextchat prelabel``, ``prelabel-status`` and ``prelabel-cancel``: pre-label a whole
Label Studio project on the workers (:mod:`backend.prelabel`) and watch it.

Label Studio's address and token come from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``
(or what the project's ``/setup`` stored under ``MODEL_DIR``), the broker from
``CELERY_BROKER_URL``, as for retraining; ``nextchat worker --queues prelabel`` runs the
chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from nextchat_cli.loop import add_model_dir_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_model_dir_command(
        sub,
        "prelabel",
        "pre-label a whole Label Studio project on the workers (resumable; writes the "
        "predictions into Label Studio)",
        _prelabel,
    )
    p.add_argument("--project", required=True, type=int, help="Label Studio project id")
    p.add_argument(
        "--tasks",
        choices=("all", "unannotated"),
        default="all",
        help="all tasks, or those without a submitted annotation (default all); tasks that "
        "already have this version's prediction are always skipped",
    )
    p.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab id)")
    p.add_argument(
        "--prompt",
        help="one typed prompt for every task (default: each task's prompts as /predict "
        "resolves them: task field, per-label prompts, last typed prompt, label values)",
    )
    p.add_argument("--version", help="model version to predict with (default: the served one)")
    p.add_argument("--batch-size", type=int, help="images per model call (default $BATCH_SIZE)")
    p.add_argument(
        "--chunk-size", type=int, help="tasks per worker job (default $PRELABEL_CHUNK_SIZE or 32)"
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="start the run and return (follow it with prelabel-status)",
    )
    p = add_model_dir_command(
        sub, "prelabel-status", "show pre-labeling runs: progress, rate, ETA, failures", _status
    )
    p.add_argument("--run", help="one run, with every failed task and its error")
    p.add_argument("--project", help="only this project's runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add_model_dir_command(sub, "prelabel-cancel", "cancel a pre-labeling run", _cancel)
    p.add_argument("run", help="run id (from prelabel-status)")


def _settings(args: argparse.Namespace):  # -> backend Settings (lazy import: fast --help)
    import os
    from pathlib import Path

    from backend.settings import Settings

    if args.model_dir:
        os.environ["MODEL_DIR"] = str(Path(args.model_dir).resolve())
    return Settings.from_env()


def _prelabel(args: argparse.Namespace) -> int:
    from backend.prelabel import begin, follow
    from training.prelabel_runs import RunOptions

    settings = _settings(args)
    options = RunOptions(
        selection=args.tasks,
        view=args.view,
        prompt=args.prompt,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size or settings.prelabel_chunk_size,
        started_by="cli",
    )
    print(f"listing the tasks of project {args.project} ...", file=sys.stderr)
    run = begin(settings, str(args.project), options, version=args.version, plan_here=True)
    print(
        f"run {run.run_id}: {run.planned} task(s) to pre-label with {run.model_version} in "
        f"{run.chunks} chunk(s); {run.skipped} already had this version's prediction"
    )
    if args.no_wait or run.state != "running":
        return 0
    from tqdm import tqdm

    bar = tqdm(total=run.planned, unit="task", file=sys.stderr, dynamic_ncols=True)
    last: dict[str, Any] = {}
    try:
        for progress in follow(settings, run.run_id):
            bar.update(progress["done"] + progress["failed"] - bar.n)
            bar.set_postfix(failed=progress["failed"], refresh=False)
            last = progress
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\nstopped watching; run {run.run_id} goes on on the workers "
            f"(`nextchat prelabel-cancel {run.run_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    bar.close()
    print(_line(last))
    for f in last.get("failures", []):
        print(f"  task {f['task']}: {f['error']}")
    return 0 if last.get("state") == "done" and not last.get("failed") else 1


def _line(p: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["created_at"]))
    line = (
        f"{p['run_id']}  project {p['project_id']}  {p['state']:<9} {when}  "
        f"{p['done']}/{p['total']} written, {p['failed']} failed, {p['skipped']} skipped"
        f"  version {p['model_version']}"
    )
    if p.get("rate_per_s"):
        line += f"  {p['rate_per_s']:.2f} tasks/s"
    if p.get("eta_s") is not None:
        line += f"  ETA {p['eta_s']:.0f} s"
    if p.get("error"):
        line += f"  error: {p['error']}"
    return line


def _status(args: argparse.Namespace) -> int:
    from training.prelabel_runs import PrelabelStore

    store = PrelabelStore(_settings(args).model_dir)
    if args.run:
        runs = [store.progress(args.run, failures=10_000)]
    else:
        runs = [store.progress(r.run_id, failures=5) for r in store.runs(args.project)]
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no pre-labeling runs in {store.path.parent}")
    for r in runs:
        p = r.as_dict()
        print(_line(p))
        for f in p["failures"]:
            print(f"  task {f['task']}: {f['error']}")
        if not args.run and p["failed"] > len(p["failures"]):
            print(f"  ... `nextchat prelabel-status --run {p['run_id']}` lists all {p['failed']}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from training.prelabel_runs import PrelabelStore

    store = PrelabelStore(_settings(args).model_dir)
    run = store.cancel(args.run)
    print(f"run {run.run_id} {run.state}; run `nextchat prelabel` again to continue it")
    return 0
