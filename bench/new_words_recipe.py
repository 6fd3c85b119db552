"""Sizing the retraining recipe for new words (issue #21): replay, learning rate, epochs,
copy-paste, whether the vision tower trains, the pointing loss.

    python bench/new_words_recipe.py --n 200 --replay 0.5 --copy-paste 0,3 -o runs/recipe.json
    python bench/new_words_recipe.py --n 8 --eval 4 --steps 2     # smoke run

For each combination of the comma-separated values one real retraining job
(training.retrain.run_job, the worker's code without the broker) runs from the bundled
model on the same ``n`` new-words corrections (boxes + masks, ``--stages``, policy 'always'
so every candidate is scored), then the new version is scored in-process on held-out
new-word tasks, on absent new-word prompts (a near miss not in the scene: it should get no
region) and on held-out tasks of the original vocabulary
(training.evaluation.evaluate_predictor: Acc@0.5, mask mIoU, the share of present prompts
that kept a region, the share of absent ones that got none). The job's own gate numbers
(held-out corrections, regression slice) and its wall time are in the output too; with
``--box-bias N`` also the new version's box sizes on the first N scenes of the loop's pool,
which the job trained on (bench/new_words_errors.py: a new shape whose boxes stay too wide
or too small there is underfit, not unseen)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from new_words_errors import errors  # noqa: E402  (bench/, beside this script)

from nextchat_cli.new_words_demo import (  # noqa: E402
    held_out_seed,
    new_word_tasks,
    original_tasks,
    pool_seed,
)
from training.retrain import RetrainSettings, run_job  # noqa: E402
from training.stages import get_stage  # noqa: E402
from training.versions import resolve_checkpoint, version_dir  # noqa: E402


def score(predictor, tasks: list[dict], absent: list | None = None) -> dict:
    from training.data import SampleSet, read_label_studio
    from training.evaluation import evaluate_predictor

    config = predictor.config
    samples = read_label_studio(tasks, config) + SampleSet(absent or [], config)
    report = evaluate_predictor(predictor, samples)
    keys = ("rec_acc", "mask_miou", "n_records", "present_with_region_rate")
    out = {
        **{k: report[k] for k in keys},
        **({"absent_no_box_rate": report["absent_no_box_rate"]} if absent else {}),
    }
    words = sorted({w for t in tasks for w in t["data"].get("new_words", [])})
    if words:  # Acc@0.5 of the tasks whose prompt carries each new word (n in brackets)
        out["by_word"] = {}
        for word in words:
            some = [t for t in tasks if word in t["data"]["new_words"]]
            got = evaluate_predictor(predictor, read_label_studio(some, config))
            out["by_word"][word] = [round(got["rec_acc"], 3), len(some)]
    return out


def load(path: Path):
    from nextchat_core.predictor import NextChatPredictor

    return NextChatPredictor.from_pretrained(path)


def absent_records(seed: int, n: int) -> list:
    """Prompts for a new-word near miss that is not in the scene (new_words.absent_expression)
    on ``n`` fresh new-words scenes: a retrained model must still give them no region."""
    from training import new_words
    from training.data import Record

    out = []
    for scene, _ in new_words.generate(seed, n):
        expr = new_words.absent_expression(
            scene, new_words.scene_rng(seed, 10_000 + scene.scene_id)
        )
        if expr:
            out.append(
                Record(scene.image, "rec", expr, None, [], None, scene.width, scene.height, expr)
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="base (default: the bundled demo)")
    p.add_argument("--n", type=int, default=200, help="corrections")
    p.add_argument("--eval", type=int, default=60, help="held-out tasks of each kind")
    p.add_argument("--replay", default="0,0.5", help="RETRAIN_REPLAY values")
    p.add_argument("--lr", default="1e-4", help="RETRAIN_LR values")
    p.add_argument("--epochs", default="4", help="RETRAIN_EPOCHS values")
    p.add_argument(
        "--tower", default="0", help="0/1 values: also train the vision tower in stage 2"
    )
    p.add_argument(
        "--stage-epochs", default="", help="RETRAIN_STAGE_EPOCHS, e.g. 2=6,3=1 (one value)"
    )
    p.add_argument("--copy-paste", default="0", help="RETRAIN_COPY_PASTE values")
    p.add_argument("--stages", default="2,3", help="RETRAIN_STAGES (masks need 3)")
    p.add_argument("--steps", type=int, default=2000, help="RETRAIN_MAX_STEPS")
    p.add_argument("--regression", type=int, default=48, help="RETRAIN_REGRESSION")
    p.add_argument("--loss", default="", help="RETRAIN_LOSS, e.g. cycle1=0")
    p.add_argument("--point", default="0", help="RETRAIN_POINT values (pointing loss weight)")
    p.add_argument(
        "--feature-cache-mb",
        default="2048",
        help="RETRAIN_FEATURE_CACHE_MB values (0: every step runs the frozen encoders)",
    )
    p.add_argument("--precision", default="auto", help="RETRAIN_PRECISION values")
    p.add_argument(
        "--box-bias",
        type=int,
        default=0,
        help="also measure each version's box size on this many scenes of the loop's pool "
        "(bench/new_words_errors.py: log width/height ratio to the target's, per word)",
    )
    p.add_argument("-o", "--out", type=Path, default=None, help="write the JSON here")
    p.add_argument(
        "--skip-before", action="store_true", help="do not score the base (known from a run)"
    )
    args = p.parse_args(argv)
    base = resolve_checkpoint(args.checkpoint).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nw-recipe-") as tmp:
        root = Path(tmp)
        # the new-words loop's pool and held-out scenes (nextchat_cli/new_words_demo.py)
        train = new_word_tasks(
            root / "images", args.n, first_id=1, seed=pool_seed(), config=_config()
        )
        held_new = new_word_tasks(
            root / "images", args.eval, first_id=100_000, seed=held_out_seed(), config=_config()
        )
        held_old = original_tasks(root / "images", args.eval, first_id=200_000, seed=3)
        absent = absent_records(4, args.eval)
        before = (
            None
            if args.skip_before
            else {
                "new_words": score(predictor := load(base), held_new, absent),
                "original": score(predictor, held_old),
            }
        )
        print(json.dumps({"before": before}), flush=True)
        for k, (replay, lr, epochs, paste, tower, point, cache_mb, precision) in enumerate(
            itertools.product(
                [float(x) for x in args.replay.split(",")],
                [float(x) for x in args.lr.split(",")],
                [float(x) for x in args.epochs.split(",")],
                [int(x) for x in args.copy_paste.split(",")],
                [bool(int(x)) for x in args.tower.split(",")],
                [float(x) for x in args.point.split(",")],
                [float(x) for x in args.feature_cache_mb.split(",")],
                args.precision.split(","),
            )
        ):
            settings = RetrainSettings.from_env(
                {"RETRAIN_LOSS": args.loss, "RETRAIN_STAGE_EPOCHS": args.stage_epochs},
                model_dir=root / f"md{k}",
                checkpoint=str(base),
                local_files_root=root,
                stages=tuple(int(x) for x in args.stages.split(",")),
                epochs=epochs,
                max_steps=args.steps,
                lr=lr,
                replay=replay,
                copy_paste=paste,
                # stage 2's own modules and the vision tower
                trainable=("vision_tower", *get_stage(2).trainable) if tower else (),
                regression=args.regression,
                point=point,
                feature_cache_mb=cache_mb,
                precision=precision,
                policy="always",
            )
            for task in train:
                settings.store.upsert_annotation("1", task, task["annotations"][0])
            job, _ = settings.store.request_job("1", "bench")
            t0 = time.perf_counter()
            result = run_job(job.job_id, settings)
            job_s = time.perf_counter() - t0
            path = version_dir(settings.model_dir, result["version"])
            row = {
                "replay": replay,
                "lr": lr,
                "epochs": epochs,
                "stage_epochs": settings.stage_epochs,
                "copy_paste": paste,
                "tower": tower,
                "point": point,
                "feature_cache_mb": cache_mb,
                "precision": precision,
                "loss": settings.loss,
                "job_s": round(job_s, 1),
                "stages": result["stages"],
                "replay_samples": result["replay_samples"],
                "pasted_samples": result["pasted_samples"],
                "gate_held_out": {"old": result["eval_old"], "new": result["eval_new"]},
                "gate_regression": result["regression"],
                "new_words": score(predictor := load(path), held_new, absent),
                "original": score(predictor, held_old),
            }
            if args.box_bias:
                _, bias = errors(predictor, args.box_bias, pool_seed())
                row["box_bias_pool"] = bias
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"n": args.n, "eval": args.eval, "stages": args.stages, "before": before, "runs": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    return 0


def _config():
    from training.new_words import NewWordsConfig

    return NewWordsConfig()


if __name__ == "__main__":
    sys.exit(main())
