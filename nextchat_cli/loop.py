"""The active-learning loop's commands: ``nextchat worker``, ``train-status``, ``retrain``
and ``loop-demo``. All read ``MODEL_DIR`` (``--model-dir`` wins); the model versions'
commands are :mod:`nextchat_cli.versions`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from nextchat_cli import versions as versions_commands


def add_model_dir_command(
    sub: argparse._SubParsersAction, name: str, help: str, func: Any
) -> argparse.ArgumentParser:
    """A subcommand with ``--model-dir`` (the ``MODEL_DIR`` shared with the backend)."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--model-dir", help="MODEL_DIR shared with the backend (default: $MODEL_DIR)")
    p.set_defaults(func=func)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = add_model_dir_command(
        sub,
        "worker",
        "start a retraining worker (Celery; broker from CELERY_BROKER_URL, else SQLite "
        "under MODEL_DIR; CUDA when present)",
        _worker,
    )
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    p.add_argument(
        "--queues",
        default="retrain",
        help="what this worker runs: retrain, prelabel, or retrain,prelabel (default retrain; "
        "one pre-labeling worker per GPU, or several on CPU)",
    )
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", help="worker name (default nextchat@<host>)")
    p = add_model_dir_command(
        sub, "train-status", "show retraining jobs and their progress", _status
    )
    p.add_argument("--project", help="only this project's jobs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add_model_dir_command(
        sub, "retrain", "request a retraining job for a project (as START_TRAINING does)", _retrain
    )
    p.add_argument("project", help="Label Studio project id")
    p = sub.add_parser(
        "next-tasks",
        help="list a project's unannotated tasks, most worth annotating first",
        description=(
            "Unannotated tasks of a Label Studio project ordered by their prediction's score, "
            "lowest first (the pre-labels most likely to need a correction; tasks without a "
            "prediction first of all): the order uncertainty-first active learning annotates "
            "in (labelstudio/selection.py). Reads the project through label-studio-sdk "
            "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), or a JSON export with predictions."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--project", type=int, help="Label Studio project id")
    source.add_argument("--export", type=Path, help="a Label Studio JSON export instead")
    p.add_argument("--version", help="score by this model version's predictions (default newest)")
    p.add_argument("--limit", type=int, default=20, help="how many to list (0: all; default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_next_tasks)
    versions_commands.register(sub)
    p = sub.add_parser(
        "loop-demo",
        help="run the active-learning loop end to end on a new domain and measure it",
        description=(
            "Start a backend and a worker (embedded SQLite broker unless --broker), pre-label "
            "held-out tasks, send corrected annotations through /webhook, retrain, promote, "
            "pre-label again; prints Acc@0.5 before and after (see nextchat_cli/loop_demo.py). "
            "--domain new-words: new shape and color words among known distractors, 50/100/"
            "200 corrections chosen uncertainty-first and at random, forgetting measured on "
            "the original vocabulary (nextchat_cli/new_words_demo.py; its run time on 2 cores: README)."
        ),
    )
    # "the-part" stays the default: the quick (~1 min) smoke run whose report the README's
    # first table is generated from; "new-words" is the long benchmark of issue #21.
    p.add_argument(
        "--domain",
        choices=("the-part", "new-words"),
        default="the-part",
        help="the-part (default: one team's framing, ~1 min) or new-words (the benchmark)",
    )
    p.add_argument("--checkpoint", default=None, help="base checkpoint (default: the bundled demo)")
    p.add_argument(
        "--out",
        default=None,
        help="work directory (MODEL_DIR, images, logs; default runs/loop-demo or "
        "runs/loop-new-words)",
    )
    p.add_argument(
        "--annotations", type=int, default=150, help="the-part: corrected annotations to send"
    )
    p.add_argument("--eval", type=int, default=100, help="held-out tasks pre-labeled before/after")
    p.add_argument("--broker", default=None, help="CELERY_BROKER_URL (default: embedded SQLite)")
    p.add_argument(
        "--budgets",
        default="50,100,200",
        help="new-words: total corrections after each round (comma-separated)",
    )
    p.add_argument(
        "--pool", type=int, default=300, help="new-words: unannotated tasks to pick from"
    )
    p.add_argument(
        "--strategies",
        default="uncertainty,random",
        help="new-words: selection strategies to run (uncertainty, random)",
    )
    p.add_argument(
        "--plot", type=Path, default=None, help="new-words: write the learning curve PNG here"
    )
    p.add_argument(
        "--readme",
        metavar="REPORT_JSON",
        type=Path,
        help="print the README's table from this report (either domain's) and exit",
    )
    p.set_defaults(func=_loop_demo)


def settings_for(args: argparse.Namespace):  # -> RetrainSettings (lazy import: fast --help)
    from training.retrain import RetrainSettings

    if args.model_dir:
        os.environ["MODEL_DIR"] = str(Path(args.model_dir).resolve())
    return RetrainSettings.from_env()


def _worker(args: argparse.Namespace) -> int:
    settings = settings_for(args)  # validates the environment before Celery starts
    from training.celery_app import get_app, prelabel_queue, retrain_queue

    names = {"retrain": retrain_queue(), "prelabel": prelabel_queue()}
    wanted = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not wanted or any(q not in names for q in wanted):
        raise ValueError(
            f"--queues must list retrain and/or prelabel (comma-separated), got {args.queues!r}"
        )
    app = get_app()
    if "prelabel" in wanted:
        import backend.prelabel  # registers the pre-labeling tasks  # noqa: F401

    argv = ["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}"]
    argv.append("--queues=" + ",".join(names[q] for q in wanted))
    argv += ["--pool=prefork", "--without-gossip", "--without-mingle"]
    argv.append(f"--hostname={args.hostname or 'nextchat@%h'}")
    print(
        f"worker on MODEL_DIR {settings.model_dir}, broker {_redact(app.conf.broker_url)}, "
        f"queues {', '.join(names[q] for q in wanted)}"
    )
    app.worker_main(argv)
    return 0


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def _status(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    jobs = settings.store.jobs(args.project)
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2, default=str))
        return 0
    if not jobs:
        print(f"no retraining jobs in {settings.model_dir}")
        return 0
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at))
        line = f"{j.job_id[:12]}  project {j.project_id}  {j.state:<9} {when}  ({j.reason})"
        if j.state == "queued" and not j.enqueued:
            line += "  not yet handed to the broker"
        p = j.progress or {}
        if j.state == "running" and p:
            bits = [str(p.get("phase", ""))]
            if "step" in p:
                bits.append(f"step {p['step']}/{p.get('steps', '?')}")
            if "loss" in p:
                bits.append(f"loss {p['loss']:.4f}")
            if "eta_s" in p:
                bits.append(f"ETA {p['eta_s']:.0f} s")
            line += "  " + ", ".join(b for b in bits if b)
        if j.result:
            r = j.result
            line += (
                f"  -> {r.get('version')} {'promoted' if r.get('promoted') else 'not promoted'}"
                f" ({r.get('reason')})"
            )
        if j.error:
            line += f"  error: {j.error}"
        print(line)
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from training.tasks import enqueue

    settings = settings_for(args)
    job, created = settings.store.request_job(str(args.project), "manual")
    sent = job.enqueued or enqueue(settings.store, job, settings.model_dir)
    state = "created" if created else "already active"
    broker = "enqueued" if sent else "broker unreachable: enqueued when it is back"
    print(f"job {job.job_id} {state} for project {job.project_id} ({broker})")
    return 0


def _next_tasks(args: argparse.Namespace) -> int:
    from labelstudio.selection import next_tasks

    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all), got {args.limit}")
    if args.export is not None:
        if not args.export.is_file():
            raise FileNotFoundError(f"Label Studio export not found: {args.export}")
        try:
            tasks = json.loads(args.export.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.export} is not a Label Studio JSON export: {exc}") from None
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise ValueError(f"{args.export}: expected a JSON list of Label Studio tasks")
    else:
        from labelstudio.coco.export import fetch_project

        tasks, _ = fetch_project(
            args.project,
            base_url=os.environ.get("LABEL_STUDIO_URL"),
            api_key=os.environ.get("LABEL_STUDIO_API_KEY"),
        )
    ranked = next_tasks(tasks, model_version=args.version)
    shown = ranked[: args.limit] if args.limit else ranked
    if args.json:
        print(json.dumps([{"task": k, "score": s} for k, s in shown], indent=2))
        return 0
    print(f"{len(ranked)} unannotated task(s), most worth annotating first:")
    for task_id, score in shown:
        print(f"task {task_id}  score {'none' if score is None else f'{score:.4f}'}")
    return 0


def _loop_demo(args: argparse.Namespace) -> int:
    import shutil

    from nextchat_cli import new_words_demo
    from nextchat_cli.loop_demo import readme_table, run_demo
    from training.versions import resolve_checkpoint

    if args.readme is not None:
        report = json.loads(args.readme.read_text())
        table = new_words_demo.readme_table if report.get("domain") == "new-words" else readme_table
        print(table(report))
        return 0
    new_words = args.domain == "new-words"
    out = Path(args.out or ("runs/loop-new-words" if new_words else "runs/loop-demo")).resolve()
    if out.exists():
        shutil.rmtree(out)  # a fresh MODEL_DIR: "before" is the base checkpoint
    if new_words:
        try:
            budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        except ValueError:
            raise ValueError(
                f"--budgets must be comma-separated numbers of corrections like 50,100,200, "
                f"got {args.budgets!r}"
            ) from None
        report = new_words_demo.run_new_words(
            out,
            resolve_checkpoint(args.checkpoint).resolve(),
            budgets=budgets,
            pool_size=args.pool,
            n_eval=args.eval,
            strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
            broker=args.broker,
        )
        if args.plot is not None:
            new_words_demo.plot_curve(report, args.plot)
        print(new_words_demo.readme_table(report))
        print(f"report: {out / 'loop-new-words.json'}")
        return 0
    report = run_demo(
        out,
        resolve_checkpoint(args.checkpoint).resolve(),
        n_train=args.annotations,
        n_eval=args.eval,
        broker=args.broker,
    )
    print(json.dumps(report, indent=2))
    return 0
