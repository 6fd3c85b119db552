"""Where a model's boxes for new-word prompts go (issue #21): on the target, on a
distractor (one that shares the target's known word, or another), or elsewhere - for the
regions it returns and for those its presence gate holds back - per new word.

    python bench/new_words_errors.py CHECKPOINT [CHECKPOINT ...] --n 100 -o runs/errors.json

The scenes are the new-words loop's held-out ones (``training.new_words.generate`` at the
loop demo's default ``held_out_seed``); each prompt's best region (the returned one with
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

from nextchat_cli.new_words_demo import held_out_seed  # noqa: E402
from nextchat_core.frames import box_iou  # noqa: E402
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


def errors(checkpoint: Path, n: int) -> dict:
    from nextchat_core.predictor import NextChatPredictor

    predictor = NextChatPredictor.from_pretrained(checkpoint)
    counts: dict[str, Counter] = defaultdict(Counter)
    for scene, record in new_words.generate(held_out_seed(), n, new_words.NewWordsConfig()):
        predictor.set_image(scene.image, with_masks=False)
        (answer,) = predictor.predict(record["expression"], with_masks=False)
        kept = max(answer.detections, key=lambda d: d.score, default=None)
        held = max(answer.rejected, key=lambda d: d.score, default=None)
        if kept is not None:
            what = "returned: " + outcome(scene, kept.box)
        elif held is not None:
            what = "held back: " + outcome(scene, held.box)
        else:
            what = "no box"
        for word in ["all", *new_words.new_words_of(record["expression"])]:
            counts[word][what] += 1
    return {word: dict(sorted(c.items())) for word, c in sorted(counts.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=100, help="held-out scenes")
    p.add_argument("-o", "--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    report = {str(c): errors(c, args.n) for c in args.checkpoints}
    for checkpoint, by_word in report.items():
        print(f"\n{checkpoint}")
        kinds = sorted({k for c in by_word.values() for k in c})
        print("| word | n | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for word, c in by_word.items():
            total = sum(c.values())
            cells = " | ".join(f"{c.get(k, 0) / total:.2f}" for k in kinds)
            print(f"| {word} | {total} | {cells} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
