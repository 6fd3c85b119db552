"""Where a model's boxes for new-word prompts go (issue #21): on the target, on a
distractor (one that shares the target's known word, or another), or elsewhere - for the
regions it returns and for those its presence gate holds back - per new word; and, where
the box is on the target or near it, how its width and height compare with the target's
(the mean log ratio per word and per target shape: a shape whose boxes are systematically
too wide or too small).

    python bench/new_words_errors.py CHECKPOINT [CHECKPOINT ...] --n 100 -o runs/errors.json
    python bench/new_words_errors.py CHECKPOINT --scenes pool   # the scenes it trained on

The scenes are the new-words loop's held-out ones (``training.new_words.generate`` at the
loop demo's default ``held_out_seed``), or with ``--scenes pool`` those of its pool (the
corrections a loop run trained on are among them); each prompt's best region (the returned one with
the highest score, else the held-back one with the highest score) is compared with every
object's box by IoU (>= 0.5 is a hit on that object; under 0.5 for every object, a box at
>= 0.25 with the target is "near the target")."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from nextchat_cli.new_words_demo import held_out_seed, pool_seed  # noqa: E402
from nextchat_core.frames import box_iou  # noqa: E402
from nextchat_core.predictor import NextChatPredictor  # noqa: E402
from training import new_words  # noqa: E402


def outcome(scene, box) -> str:
    """``target``, ``same-word distractor``, ``other distractor``, ``near the target``
    (no object at IoU >= 0.5, the target at >= 0.25: a box in the right place, too loose or
    too tight) or ``elsewhere``."""
    target = scene.objects[0]
    ious = [float(box_iou(box, o.box)) for o in scene.objects]
    best = max(range(len(ious)), key=ious.__getitem__)
    if ious[best] < 0.5:
        return "near the target" if ious[0] >= 0.25 else "elsewhere"
    if best == 0:
        return "target"
    other = scene.objects[best]
    shares = other.color == target.color or other.shape == target.shape
    return "same-word distractor" if shares else "other distractor"


def errors(predictor, n: int, seed: int) -> tuple[dict, dict]:
    """Per word (and ``all``): how many prompts' best regions had each outcome; and per
    word and per target shape, over the prompts whose best box overlaps the target at IoU
    >= 0.25, ``n``, ``log_w`` and ``log_h`` (mean log of the box's width and height over
    the target's: 0 is the right size, +0.3 about 35 % too large)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    ratios: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for scene, record in new_words.generate(seed, n, new_words.NewWordsConfig()):
        predictor.set_image(scene.image, with_masks=False)
        (answer,) = predictor.predict(record["expression"], with_masks=False)
        kept = max(answer.detections, key=lambda d: d.score, default=None)
        held = max(answer.rejected, key=lambda d: d.score, default=None)
        words = new_words.new_words_of(record["expression"])
        best = kept or held
        if kept is not None:
            what = "returned: " + outcome(scene, kept.box)
        elif held is not None:
            what = "held back: " + outcome(scene, held.box)
        else:
            what = "no box"
        for word in ["all", *words]:
            counts[word][what] += 1
        target = scene.objects[0]
        if best is not None and float(box_iou(best.box, target.box)) >= 0.25:
            (x1, y1, x2, y2), (t1, u1, t2, u2) = best.box, target.box
            r = (float(np.log((x2 - x1) / (t2 - t1))), float(np.log((y2 - y1) / (u2 - u1))))
            for key in {"all", f"shape {target.shape}", *words}:
                ratios[key].append(r)
    bias = {
        key: {
            "n": len(v),
            "log_w": round(float(np.mean([w for w, _ in v])), 3),
            "log_h": round(float(np.mean([h for _, h in v])), 3),
        }
        for key, v in sorted(ratios.items())
    }
    return {word: dict(sorted(c.items())) for word, c in sorted(counts.items())}, bias


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=100, help="held-out scenes")
    p.add_argument(
        "--scenes",
        choices=("held-out", "pool"),
        default="held-out",
        help="the loop's held-out scenes (default) or its pool's (what a run trained on)",
    )
    p.add_argument("-o", "--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    seed = held_out_seed() if args.scenes == "held-out" else pool_seed()
    outcomes, box_bias = {}, {}
    for c in args.checkpoints:
        outcomes[str(c)], box_bias[str(c)] = errors(
            NextChatPredictor.from_pretrained(c), args.n, seed
        )
    for checkpoint, by_word in outcomes.items():
        print(f"\n{checkpoint} ({args.scenes} scenes)")
        kinds = sorted({k for c in by_word.values() for k in c})
        print("| word | n | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for word, c in by_word.items():
            total = sum(c.values())
            cells = " | ".join(f"{c.get(k, 0) / total:.2f}" for k in kinds)
            print(f"| {word} | {total} | {cells} |")
        print("\nbox on or near the target (IoU >= 0.25): log(width / true), log(height / true)")
        print("| word or target shape | n | log width ratio | log height ratio |")
        print("|---|---|---|---|")
        for key, b in box_bias[checkpoint].items():
            print(f"| {key} | {b['n']} | {b['log_w']:+.2f} | {b['log_h']:+.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"scenes": args.scenes, "outcomes": outcomes, "box_bias": box_bias}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
