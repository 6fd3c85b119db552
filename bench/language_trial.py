"""How fast does the 90-minute recipe's language cycle learn with another LLM size or LLM
learning rate? A trial of that ONE cycle, from a fresh LLM, on a fixed frozen tower.

    python bench/language_trial.py time                  # step time of each variant vs the recipe's LLM
    python bench/language_trial.py train h128 --llm hidden_size=128,intermediate_size=344
    python bench/language_trial.py train h128-lm03 --llm hidden_size=128,intermediate_size=344 --lm-scale 0.3
    python bench/language_trial.py train lr6 --lr 6e-4       # the recipe's cycle at another peak lr
    python bench/language_trial.py curves h128 h128-lm03  # their held-out curves, by step and minute

The vision tower and SAM are the bundled model's (``models/demo``; frozen, as in the recipe's
language cycle) or, with ``train --tower CHECKPOINT``, another checkpoint's (a tower
pre-trained otherwise); every other module is a fresh model's of the given LLM sizes (seed 0,
the bundled tokenizer). ``--precision bf16`` runs the cycle under bf16 autocast. The cycle is
``training.demo.ninety_minute_phases``' ``stage2``: cached tower features of a pool of scenes
(computed once under ``runs/language-trial/`` and shared by every trial of that pool size and
tower), every ``DemoAux`` stand-in, its task mix, lr and cosine
schedule; ``--steps`` sizes the schedule (the recipe's 13,000 by default). ``train`` scores the
first 100 held-out expressions every ``--eval-every`` steps (the recipe run's curve); its
``elapsed_s`` is the trainer's own clock (no model loading), so run one trial at a time for
minutes that mean something - the curve by step does not depend on it.

``time`` runs ``--steps`` (default 300) steps of each variant on a pool of 200 scenes, no
evaluation, one after the other in this process's threads, and prints seconds per step
(``training.demo.seconds_per_step``: first logged step to last, start-up left out, as
``--minutes`` times a phase) and the ratio to the recipe's LLM (the first row). Variants:
``NAME:key=value,...`` of ``LLMConfig`` (``num_kv_heads`` follows ``num_heads``); ``NAME:``
is the recipe's LLM.

The bundled tower is a 1,500-step one, not the 1,000-step tower a 90-minute run trains: a
trial compares settings with each other, not with a run from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROOT = REPO / "runs" / "language-trial"  # --root
BUNDLED = REPO / "models" / "demo"
DEFAULT_VARIANTS = [
    "recipe:",
    "hidden128:hidden_size=128,intermediate_size=344",
    "hidden192:hidden_size=192,intermediate_size=512",
    "layers2:num_layers=2",
]


def llm_overrides(spec: str) -> dict[str, int]:
    """``"hidden_size=128,intermediate_size=344"`` -> its dict (``num_kv_heads`` follows
    ``num_heads``)."""
    from training.demo import parse_int_pairs

    out = parse_int_pairs(spec, "--llm wants LLMConfig field=integer pairs like hidden_size=128")
    if "num_heads" in out:
        out.setdefault("num_kv_heads", out["num_heads"])
    return out


def trial_config(llm: dict[str, int]):
    from nextchat_core.config import get_preset

    base = get_preset("demo")
    fields = {f.name for f in dataclasses.fields(base.llm)}
    unknown = sorted(set(llm) - fields)
    if unknown:
        raise SystemExit(f"unknown LLM fields {unknown}; LLMConfig has {sorted(fields)}")
    config = dataclasses.replace(base, llm=dataclasses.replace(base.llm, **llm))
    config.llm.validate()
    return config


def initial_checkpoint(out: Path, config, tower: Path = BUNDLED) -> tuple[Path, int]:
    """A fresh model of ``config`` (seed 0) with the vision tower and SAM of ``tower`` (a
    checkpoint; the bundled model's by default); returns its directory and the LLM's
    parameter count."""
    import torch
    from safetensors.torch import load_file

    from nextchat_core.build import build_model, save_pretrained
    from nextchat_core.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model(config)
    path = out / "init"
    if not (path / "model.safetensors").exists():
        weights = load_file(str(tower / "model.safetensors"))
        for prefix, module in (("vision_tower.", model.vision_tower), ("sam.", model.sam)):
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            )
        save_pretrained(model, path, load_tokenizer(BUNDLED, config))
    return path, sum(p.numel() for p in model.language_model.parameters())


def weights_id(checkpoint: Path) -> str:
    """A short hash of a checkpoint's weights: cached tower features belong to one tower."""
    import hashlib

    return hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()[:10]


def run_trial(
    root: Path,
    name: str,
    llm: dict[str, int],
    *,
    steps: int,
    lm_scale: float | None,
    pool: int,
    eval_every: int,
    eval_max: int = 100,
    precision: str = "fp32",
    tower: Path = BUNDLED,
    lr: float | None = None,
) -> tuple[Path, int]:
    from training import demo

    config = trial_config(llm)
    out = root / name
    init, n_llm = initial_checkpoint(out, config, tower)
    phase = next(p for p in demo.ninety_minute_phases() if p.name == "stage2")
    phase = dataclasses.replace(
        phase,
        lr=phase.lr if lr is None else lr,
        lr_scale=phase.lr_scale if lm_scale is None else {"language_model": lm_scale},
        cache_scenes=pool,
        precision=precision,
    )
    eval_set = demo.read_refexp_jsonl(demo.eval_split(root / "splits", 300), config)
    grid = config.vision.image_size // config.vision.patch_size
    (out / "trial.json").write_text(
        json.dumps(
            {
                "llm": llm,
                "lr": phase.lr,
                "lm_scale": (phase.lr_scale or {}).get("language_model", 1.0),
                "steps": steps,
                "pool": pool,
                "precision": precision,
                "tower": str(tower),
            }
        )
    )
    demo.train_phase(
        phase, out / "stage2", str(init), tokenizer_dir=None, mcfg=config, grid=grid,
        batch_size=8, eval_set=eval_set, eval_every=eval_every, eval_max=eval_max,
        steps=steps, easy=False, pool=root / f"pool-{pool}-{weights_id(tower)}.pt",
    )  # fmt: skip
    return out / "stage2", n_llm


def eval_rows(phase_dir: Path) -> list[dict]:
    """The held-out evaluations a trial's phase logged."""
    lines = (phase_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("eval")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="where trials and pools are kept")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--pool", type=int, default=200)
    r = sub.add_parser("train")
    r.add_argument("name")
    r.add_argument("--llm", default="", help="LLMConfig overrides, e.g. hidden_size=128")
    r.add_argument(
        "--lr", type=float, default=None, help="the cycle's peak lr (default: the recipe's)"
    )
    r.add_argument(
        "--lm-scale",
        type=float,
        default=None,
        help="the LLM's lr multiplier (default: the recipe's)",
    )
    r.add_argument("--steps", type=int, default=13000)
    r.add_argument("--pool", type=int, default=8000)
    r.add_argument("--eval-every", type=int, default=1000)
    r.add_argument("--eval-max", type=int, default=100, help="held-out expressions scored")
    r.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    r.add_argument(
        "--tower",
        type=Path,
        default=BUNDLED,
        help="a checkpoint whose vision tower and SAM the trial uses (e.g. a pre-training's "
        "final/; default: the bundled model's)",
    )
    c = sub.add_parser("curves")
    c.add_argument("names", nargs="+")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.cmd == "time":
        from training import demo

        table = []
        for variant in args.variants:
            name, _, spec = variant.partition(":")
            shutil.rmtree(args.root / f"time-{name}", ignore_errors=True)  # time it afresh
            phase_dir, n_llm = run_trial(
                args.root, f"time-{name}", llm_overrides(spec), steps=args.steps, lm_scale=None,
                pool=args.pool, eval_every=0,
            )  # fmt: skip
            step_s = demo.seconds_per_step(phase_dir / "metrics.jsonl")
            table.append((name, spec or "(the recipe's)", n_llm, step_s))
        print(f"\n{args.steps} steps each, batch 8, cached features, every stand-in\n")
        print("| LLM | overrides | LLM parameters | s / step | vs the recipe's |")
        print("|---|---|---|---|---|")
        for name, spec, n_llm, s in table:
            print(f"| {name} | {spec} | {n_llm / 1e6:.2f} M | {s:.3f} | {s / table[0][3]:.2f}x |")
    elif args.cmd == "train":
        run_trial(
            args.root, args.name, llm_overrides(args.llm), steps=args.steps,
            lm_scale=args.lm_scale, pool=args.pool, eval_every=args.eval_every,
            eval_max=args.eval_max, precision=args.precision, tower=args.tower, lr=args.lr,
        )  # fmt: skip
    else:
        for name in args.names:
            phase_dir = args.root / name / "stage2"
            print(f"\n{name}: {(args.root / name / 'trial.json').read_text().strip()}\n")
            print("| step | minutes | Acc@0.5 | mean box IoU | mask mIoU | present: a region |")
            print("|---|---|---|---|---|---|")
            for e in eval_rows(phase_dir):
                print(
                    f"| {e['step']} | {e['elapsed_s'] / 60:.1f} | {e['rec_acc']:.2f} | "
                    f"{e['mean_box_iou']:.2f} | {e['mask_miou']:.2f} | "
                    f"{e['present_with_region_rate']:.2f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
