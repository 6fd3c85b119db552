"""``nextchat synth``: write a synthetic grounding dataset (images + ``data.jsonl``)."""

from __future__ import annotations

import argparse
import json

from training.synth import DEFAULT_TASK_MIX, TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic grounding dataset: shapes on backgrounds, images + data.jsonl",
        description=(
            "Render SCENES synthetic scenes (1-6 flat shapes on plain, gradient or noisy "
            "backgrounds, canvases of 160-512 px per side) and write OUT/images/*.png, "
            "OUT/data.jsonl (one referring-expression / caption / chat record per line, "
            "boxes in original pixels, COCO RLE masks) and OUT/synth.json. Deterministic "
            "from --seed; use a different seed for a held-out split."
        ),
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scenes", type=int, required=True, help="number of scenes")
    p.add_argument("--easy", action="store_true", help="curriculum scenes: 1-2 large objects")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=(
            f"comma-separated tasks from {','.join(TASKS)}, each optionally NAME=WEIGHT "
            f"(default weights {DEFAULT_TASK_MIX}); 'multi' is rec with several boxes"
        ),
    )
    p.add_argument("--records-per-scene", type=int, default=4, help="records per scene (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data.jsonl")
    p.set_defaults(func=_synth)


def parse_task_mix(text: str) -> dict[str, float]:
    """``"rec,chat"`` or ``"rec=0.7,chat=0.3"`` -> task weights (default weights for names
    given without one). Raises ``ValueError`` for unknown names or bad weights."""
    mix: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in TASKS:
            raise ValueError(
                f"unknown task {name!r} in --tasks {text!r}; expected names from {list(TASKS)}"
            )
        try:
            mix[name] = float(weight) if weight else DEFAULT_TASK_MIX[name]
        except ValueError:
            raise ValueError(
                f"task weight {weight!r} in --tasks {text!r} is not a number (expected NAME=WEIGHT)"
            ) from None
    if not mix:
        raise ValueError(f"--tasks names no task; expected names from {list(TASKS)}")
    return mix


def _synth(args: argparse.Namespace) -> int:
    from training.synth import SynthConfig, write_dataset

    if args.scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {args.scenes}")
    config = SynthConfig(
        seed=args.seed,
        easy=args.easy,
        task_mix=parse_task_mix(args.tasks),
        records_per_scene=args.records_per_scene,
    )
    summary = write_dataset(args.out, args.seed, args.scenes, config, overwrite=args.overwrite)
    print(
        json.dumps(
            {
                "jsonl": str(summary.jsonl),
                "scenes": summary.n_scenes,
                "records": summary.n_records,
                "tasks": summary.tasks,
                "seconds": round(summary.seconds, 2),
                "ms_per_scene": round(1000 * summary.seconds / summary.n_scenes, 2),
            },
            indent=2,
        )
    )
    return 0
