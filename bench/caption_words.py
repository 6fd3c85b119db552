"""Which words of a region caption the demo model gets right (issue 15): captions are
``a|an {size} {color} {shape}``; exact match needs all three, so this says which one is
missed. The size follows from the region's box alone (it is the model's input); colour and
shape must be read from the image at that region.

    python bench/caption_words.py                                   # the bundled model
    python bench/caption_words.py --checkpoint A --checkpoint B     # side by side
    python bench/caption_words.py --renderer robust                 # the second renderer

Records: the held-out task split's captions (``training.demo.tasks_split``, seed
``EVAL_SEED + 1``, one per scene), or captions of the second renderer's scenes (seed
``ROBUST_SEED``, up to 3 per scene, ambiguous sizes left out as in its split). Prints, per checkpoint, exact match and the
share of captions naming the right size, colour and shape, for all regions and by object
size (small: the caption says "small"). Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("size", "color", "shape")


def caption_records(renderer: str, n: int, out: Path) -> list:
    from nextchat_core.config import get_preset
    from training import demo, robust_render
    from training.data import read_refexp_jsonl

    if renderer == "robust":
        cfg = robust_render.RobustConfig(task_mix={"caption": 1.0})
        split = robust_render.write_split(out / "robust", demo.ROBUST_SEED, n, cfg)
    else:
        split = demo.tasks_split(out, n)
    records = read_refexp_jsonl(split, get_preset("demo"))
    return [r for r in records.records if r.task == "caption" and r.boxes]


def words(text: str) -> dict[str, str]:
    """``{"size": ..., "color": ..., "shape": ...}`` of a caption (the article dropped)."""
    w = text.strip().rstrip(".").lower().split()
    if w and w[0] in ("a", "an"):
        w = w[1:]
    return dict(zip(PARTS, w, strict=False))


def main(argv: list[str] | None = None) -> int:
    from nextchat_core.predictor import NextChatPredictor
    from training.evaluation import _answers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", default=None)
    ap.add_argument("--renderer", choices=("generator", "robust"), default="generator")
    ap.add_argument("--scenes", type=int, default=150)
    args = ap.parse_args(argv)
    checkpoints = args.checkpoint or [str(REPO / "models" / "demo")]
    with tempfile.TemporaryDirectory() as tmp:
        records = caption_records(args.renderer, args.scenes, Path(tmp))
        print(f"{len(records)} captions ({args.renderer})")
        print("| checkpoint | regions | exact | size | colour | shape |")
        print("|---|---|---|---|---|---|")
        for ckpt in checkpoints:
            predictor = NextChatPredictor.from_pretrained(ckpt)
            answers = _answers(predictor, records, "caption", 8)
            for group in ("all", "small", "large"):
                rows = [
                    (words(r.answer or ""), words(a.text or ""))
                    for r, a in zip(records, answers, strict=True)
                    if group == "all" or words(r.answer or "").get("size") == group
                ]
                if not rows:
                    continue
                exact = sum(t == p for t, p in rows) / len(rows)
                parts = [sum(t.get(k) == p.get(k) for t, p in rows) / len(rows) for k in PARTS]
                print(
                    f"| {Path(ckpt).name} | {group} ({len(rows)}) | {exact:.2f} | "
                    + " | ".join(f"{v:.2f}" for v in parts)
                    + " |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
