"""``nextchat loop-demo --domain new-words``: active learning that teaches new words.

The same real processes as :mod:`nextchat_cli.loop_demo` (gunicorn backend, Celery worker,
one ``MODEL_DIR``, driven over HTTP as Label Studio drives them), on the new-words domain
(:mod:`training.new_words`): 3-6 objects per scene, the referred one named by a shape
and/or color word the bundled model never saw, among distractors of the words it knows.
Corrections carry a rectangle and its brush mask, so the worker retrains through stage 2
(boxes) and stage 3 (masks), with replay and the two-slice gate (training.forgetting).

For each selection strategy (``uncertainty``: the unannotated pool's tasks with the lowest
``/predict`` score first, re-scored by the served version before every round; ``random``)
on a fresh ``MODEL_DIR`` from the same base: corrections are sent for 50, then 100, then
200 tasks in all (each round a START_TRAINING), and after each round two held-out sets are
pre-labeled: new-word tasks, and tasks of the original vocabulary (forgetting). The report
(``loop-new-words.json``) holds every number; :func:`readme_table` and :func:`plot_curve`
are generated from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from labelstudio.selection import STRATEGIES, select
from training import forgetting, new_words, synth

from .loop_demo import Loop, annotation_event, prelabel_accuracy

PROJECT = 7
# Rectangles with their brush masks nested (as label_configs/boxes_masks.xml), the typed
# prompt in a TextArea: what the annotators of this benchmark correct.
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Object"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <TextArea name="prompt" toName="image" value="$prompt" rows="1" maxSubmissions="1"/>
</View>"""
# The retraining recipe of the benchmark (the worker's environment): stages 2 then 3,
# three copy-paste copies of each correction, replay of the base domain (with its yes/no
# questions) as large as the corrections and their copies, the regression slice in the
# gate, no cycle1 loss, 2.5 epochs - measured by bench/new_words_recipe.py
# (bench/RESULTS.md: at 200 corrections copy-paste took new words 0.24 -> 0.39-0.41;
# replay 1 against 0.5 lost 4 points of the regression slice instead of 6.5, held back
# 0.71 of the absent new words instead of 0.55; 2.5 epochs keep the job within 3 minutes).
# 5.5 epochs of stage 2 and 1 of stage 3 (RETRAIN_STAGE_EPOCHS) did better in single jobs
# but not in the loop: versions at 50 and 100 corrections forgot and were refused, 200
# ended where 2.5 does, in 184-185 s (docs/loop-new-words-epochs-5.5-1.json, README).
RECIPE = {
    "RETRAIN_STAGES": "2,3",
    "RETRAIN_COPY_PASTE": "3",
    "RETRAIN_REPLAY": "1",
    "RETRAIN_LOSS": "cycle1=0",
    "RETRAIN_EPOCHS": "2.5",
    "RETRAIN_REGRESSION": "200",
    "PROMOTE_POLICY": "not_worse",
}
BUDGETS = (50, 100, 200)


def _task(record: dict[str, Any], task_id: int, path: Path, **data: Any) -> dict[str, Any]:
    task = synth.label_studio_task(record, task_id, str(path), masks=True, boxes=True)
    task["data"].update(prompt=record["expression"], **data)
    return task


def new_word_tasks(
    root: Path, n: int, *, first_id: int, seed: int, config: new_words.NewWordsConfig
) -> list[dict[str, Any]]:
    """``n`` corrected tasks of the new-words domain (images under ``root``): one
    rectangle + nested brush mask and the expression as the prompt."""
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for k, (scene, record) in enumerate(new_words.generate(seed, n, config)):
        path = root / f"new-{seed}-{scene.scene_id}.png"
        Image.fromarray(scene.image).save(path)
        words = new_words.new_words_of(record["expression"])
        tasks.append(_task(record, first_id + k, path, new_words=words))
    return tasks


def original_tasks(root: Path, n: int, *, first_id: int, seed: int) -> list[dict[str, Any]]:
    """``n`` corrected single-object tasks of the original vocabulary (the base domain's
    renderer, :data:`training.forgetting.BASE_DOMAIN`): what forgetting would show on."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(
        forgetting.BASE_DOMAIN, task_mix={"rec": 1.0, "multi": 0.0, "caption": 0.0, "chat": 0.0}
    )
    tasks: list[dict[str, Any]] = []
    index = 0
    while len(tasks) < n:
        scene, records = next(synth.generate(seed, 1, cfg, start=index))
        index += 1
        if not records:
            continue
        path = root / f"old-{seed}-{scene.scene_id}.png"
        Image.fromarray(scene.image).save(path)
        tasks.append(_task(records[0], first_id + len(tasks), path))
    return tasks


def _scores(loop: Loop, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Pre-label ``tasks`` through ``/predict``: Acc@0.5, mean IoU, mask mIoU, seconds."""
    t0 = time.perf_counter()
    out = prelabel_accuracy(tasks, loop.predict(tasks, label_config=LABEL_CONFIG))
    return {**out, "prelabel_s": round(time.perf_counter() - t0, 1)}


def _evaluate(loop: Loop, held_new: list[dict], held_old: list[dict]) -> dict[str, Any]:
    return {"new_words": _scores(loop, held_new), "original": _scores(loop, held_old)}


def run_strategy(
    out: Path,
    base: Path,
    strategy: str,
    *,
    pool: list[dict[str, Any]],
    held_new: list[dict[str, Any]],
    held_old: list[dict[str, Any]],
    budgets: Sequence[int],
    before: dict[str, Any] | None,
    broker: str | None,
    env: dict[str, str],
    seed: int,
) -> dict[str, Any]:
    """One strategy's rounds on a fresh ``MODEL_DIR`` (``out``): select, correct through
    ``/webhook``, START_TRAINING, wait for the job, pre-label both held-out sets."""
    loop = Loop(out, base, broker=broker, **env)
    by_id = {t["id"]: t for t in pool}
    annotated: list[int] = []
    rounds = []
    try:
        loop.serve()
        base_version = loop.health()["model_version"]
        if before is None:
            before = _evaluate(loop, held_new, held_old)
        loop.worker()
        for budget in budgets:
            done = set(annotated)
            rest = [t for t in pool if t["id"] not in done]
            t0 = time.perf_counter()
            if strategy == "uncertainty":
                # the served version's /predict score: lowest = most worth correcting
                preds = loop.predict(rest, label_config=LABEL_CONFIG)
                scored = [(t["id"], p.get("score")) for t, p in zip(rest, preds, strict=True)]
            else:
                scored = [(t["id"], None) for t in rest]
            select_s = time.perf_counter() - t0
            picked = select(scored, budget - len(annotated), strategy, seed=seed + budget)
            score_of = dict(scored)
            chosen = set(picked)
            left = [v for k, v in scored if k not in chosen]
            for task_id in picked:
                loop.post(annotation_event(by_id[task_id], PROJECT))
            annotated += picked
            t0 = time.perf_counter()
            job_id = loop.post({"action": "START_TRAINING", "project": {"id": PROJECT}})["job"]
            job = loop.wait_job(
                job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=3 * 3600
            )
            job_s = time.perf_counter() - t0
            if job["state"] != "succeeded":
                raise RuntimeError(f"retraining at {budget} corrections failed: {job['error']}")
            result = job["result"]
            rounds.append(
                {
                    "corrections": len(annotated),
                    "picked": picked,
                    # the /predict scores of the picked tasks, and the lowest score left
                    # in the pool (uncertainty-first: none picked above it)
                    "picked_scores": [score_of[k] for k in picked],
                    "lowest_score_left": min((v for v in left if v is not None), default=None),
                    "selected_new_words": sorted(
                        {w for i in picked for w in by_id[i]["data"]["new_words"]}
                    ),
                    "select_s": round(select_s, 1),
                    "retrain_job_s": round(job_s, 1),
                    "version": result["version"],
                    "promoted": result["promoted"],
                    "gate": result["reason"],
                    "stages": result["stages"],
                    "replay_samples": result.get("replay_samples", 0),
                    "pasted_samples": result.get("pasted_samples", 0),
                    "gate_held_out": {"old": result["eval_old"], "new": result["eval_new"]},
                    "gate_regression": result.get("regression"),
                    "served": loop.health()["model_version"],
                    **_evaluate(loop, held_new, held_old),
                }
            )
    finally:
        loop.close()
    return {"strategy": strategy, "base_version": base_version, "before": before, "rounds": rounds}


def pool_seed(seed: int = 0) -> int:
    """The scene seed of the pool a run of ``seed`` picks its corrections from
    (``bench/new_words_errors.py --scenes pool`` scores the same scenes)."""
    return seed + 1


def held_out_seed(seed: int = 0) -> int:
    """The scene seed of the held-out new-word tasks of a run of ``seed``
    (``bench/new_words_errors.py`` scores the same scenes)."""
    return seed + 2


def run_new_words(
    out: Path,
    base: Path,
    *,
    budgets: Sequence[int] = BUDGETS,
    pool_size: int = 300,
    n_eval: int = 100,
    strategies: Sequence[str] = STRATEGIES,
    config: new_words.NewWordsConfig | None = None,
    broker: str | None = None,
    env: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The benchmark of the module docstring; writes and returns ``loop-new-words.json``."""
    budgets = sorted(budgets)
    if not budgets or budgets[0] < 1 or budgets[-1] > pool_size:
        raise ValueError(
            f"budgets must be corrections between 1 and the pool size {pool_size}, got {budgets}"
        )
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ValueError(f"strategies must be among {STRATEGIES}, got {list(strategies)}")
    config = config or new_words.NewWordsConfig()
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    pool = new_word_tasks(images, pool_size, first_id=1, seed=pool_seed(seed), config=config)
    held_new = new_word_tasks(
        images, n_eval, first_id=100_000, seed=held_out_seed(seed), config=config
    )
    held_old = original_tasks(images, n_eval, first_id=200_000, seed=seed + 3)
    env = {**RECIPE, **(env or {})}
    runs = []
    before = None
    for strategy in strategies:
        run = run_strategy(
            out / strategy,  # its own MODEL_DIR and logs; the images are shared
            base,
            strategy,
            pool=pool,
            held_new=held_new,
            held_old=held_old,
            budgets=budgets,
            before=before,
            broker=broker,
            env={**env, "LOCAL_FILES_DOCUMENT_ROOT": str(out)},
            seed=seed,
        )
        before = run["before"]  # the same base for every strategy: measured once
        runs.append(run)
    report = {
        "domain": "new-words",
        "new_words": list(config.words),
        "pool": pool_size,
        "held_out": {"new_words": len(held_new), "original": len(held_old)},
        "budgets": budgets,
        "recipe": {k: v for k, v in env.items() if k.startswith(("RETRAIN_", "PROMOTE_"))},
        "before": before,
        "strategies": runs,
    }
    (out / "loop-new-words.json").write_text(json.dumps(report, indent=2))
    return report


def readme_table(report: dict[str, Any]) -> str:
    """The README's new-words table, generated from a ``loop-new-words.json`` report
    (``nextchat loop-demo --domain new-words --readme REPORT``)."""
    b = report["before"]

    def cells(e: dict[str, Any]) -> str:
        n, o = e["new_words"], e["original"]
        return (
            f"{n['acc50']:.2f} | {n.get('mask_miou', float('nan')):.2f} | "
            f"{o['acc50']:.2f} | {o.get('mask_miou', float('nan')):.2f}"
        )

    def trained(r: dict[str, Any]) -> str:
        """The version the round trained, as the gate saw it: Acc@0.5 on the job's held-out
        corrections (served -> new) and on the regression slice (base -> new)."""
        held, reg = r["gate_held_out"], r.get("gate_regression")
        out = f"{held['old']['rec_acc']:.2f} -> {held['new']['rec_acc']:.2f}"
        if reg:
            ref = reg.get("base", reg["old"])
            out += f" / {ref['rec_acc']:.3f} -> {reg['new']['rec_acc']:.3f}"
        return out

    lines = [
        "| selection | corrections | new words Acc@0.5 | new words mask mIoU | original "
        "Acc@0.5 | original mask mIoU | trained version: held-out corrections / regression "
        "slice | promoted | retraining job |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| (bundled model) | 0 | {cells(b)} | | | |",
    ]
    for run in report["strategies"]:
        for r in run["rounds"]:
            lines.append(
                f"| {run['strategy']} | {r['corrections']} | {cells(r)} | {trained(r)} | "
                f"{'yes' if r['promoted'] else 'no'} | {r['retrain_job_s']} s |"
            )
    held = report["held_out"]
    recipe = ", ".join(f"`{k}={v}`" for k, v in sorted(report["recipe"].items()))
    lines += [
        "",
        f"Corrections chosen from a pool of {report['pool']} tasks; held out: "
        f"{held['new_words']} new-word tasks and {held['original']} tasks of the original "
        f"vocabulary; new words: {', '.join(report['new_words'])}; recipe: {recipe}. "
        "Acc@0.5 and mask mIoU are the served version's after each round (a version the "
        "gate refused leaves the one before it served); the trained version's own scores "
        "are the gate's: its job's held-out corrections (the version served then -> the "
        "new one) and the regression slice of the original vocabulary (the base "
        "checkpoint -> the new one).",
    ]
    return "\n".join(lines)


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """The learning curve as a PNG (PIL; no plotting library is a dependency): Acc@0.5 on
    the held-out new-word tasks (solid) and on the original vocabulary (dashed) against
    the number of corrections, one color per strategy."""
    from PIL import ImageDraw

    w, h, left, right, top, bottom = 720, 420, 70, 180, 30, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max(report["budgets"])

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x / xmax * (w - left - right), h - bottom - y * (h - top - bottom)

    d.rectangle([xy(0, 1), xy(xmax, 0)], outline="black")
    for y in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        d.line([xy(0, y), xy(xmax, y)], fill=(225, 225, 225))
        d.text((left - 30, xy(0, y)[1] - 6), f"{y:.1f}", fill="black")
    for x in [0, *report["budgets"]]:
        d.text((xy(x, 0)[0] - 8, h - bottom + 6), str(x), fill="black")
    d.text((left + 120, h - 24), "corrections sent through /webhook", fill="black")
    d.text((left, 8), "held-out Acc@0.5", fill="black")
    colors = {"uncertainty": (200, 40, 40), "random": (40, 80, 200)}
    legend_y = top + 10
    before = report["before"]
    for run in report["strategies"]:
        color = colors.get(run["strategy"], (0, 0, 0))
        for key, dashed in (("new_words", False), ("original", True)):
            pts = [xy(0, before[key]["acc50"])] + [
                xy(r["corrections"], r[key]["acc50"]) for r in run["rounds"]
            ]
            for a, b in itertools.pairwise(pts):
                if dashed:  # dashes: every other tenth of the segment
                    for k in range(0, 10, 2):
                        p = (a[0] + (b[0] - a[0]) * k / 10, a[1] + (b[1] - a[1]) * k / 10)
                        q = (
                            a[0] + (b[0] - a[0]) * (k + 1) / 10,
                            a[1] + (b[1] - a[1]) * (k + 1) / 10,
                        )
                        d.line([p, q], fill=color, width=2)
                else:
                    d.line([a, b], fill=color, width=3)
            for p in pts:
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
            label = f"{run['strategy']}: {'original' if dashed else 'new words'}"
            d.text((w - right + 12, legend_y), ("- - " if dashed else "--- ") + label, fill=color)
            legend_y += 18
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
