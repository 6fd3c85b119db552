"""Region-score candidates side by side (issue 16): how well each separates right regions
from wrong ones, and what it costs on the CPU.

    python bench/score_candidates.py                          # the bundled model, 240 records
    python bench/score_candidates.py --checkpoint DIR --records 100 --split SPLIT/data.jsonl

For each ``rec`` record of the split (default: the robustness split of the second renderer,
written to a temp folder; present and absent objects), one ``predict`` (boxes only) and one
``exists`` ("Is there {expr}?": p(yes) / (p(yes) + p(no))). A record's best region is right
when its box IoU with a true box is >= 0.5; any region for an absent object is wrong; a
record without a region counts with score 0. Prints AUROC and ECE per candidate, the share
of present objects kept and of absent ones dropped at thresholds, and the median time of
``predict`` alone against ``predict`` + ``exists`` (the ratio is the cost of the score).
Asserts nothing. Run it under the CPU load you want to report (say which).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from labelstudio.coco.evaluate import score_quality
    from nextchat_core.frames import box_iou
    from nextchat_core.predictor import NextChatPredictor
    from training import robust_render
    from training.data import read_refexp_jsonl
    from training.versions import resolve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled demo model")
    ap.add_argument("--split", type=Path, help="refexp jsonl (default: a robustness split)")
    ap.add_argument("--records", type=int, default=240)
    ap.add_argument("--seed", type=int, default=20261201)
    args = ap.parse_args(argv)

    predictor = NextChatPredictor.from_pretrained(resolve_checkpoint(args.checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        split = args.split
        if split is None:
            out = Path(tmp) / "robust"
            robust_render.write_split(out, args.seed, max(4, args.records // 2), overwrite=True)
            split = out / "data.jsonl"
        records = [r for r in read_refexp_jsonl(split, predictor.config).records if r.task == "rec"]
        records = records[: args.records]
        rows, t_predict, t_exists = [], [], []
        for rec in records:
            predictor.set_image(Image.open(rec.image).convert("RGB"), with_masks=False)
            t0 = time.perf_counter()
            (answer,) = predictor.predict(rec.text, with_masks=False)
            t1 = time.perf_counter()
            (p_yes,) = predictor.exists(rec.text)
            t2 = time.perf_counter()
            t_predict.append(t1 - t0)
            t_exists.append(t2 - t1)
            present = bool(rec.boxes)
            if not answer.detections:
                rows.append((p_yes, 0.0, present, False))
                continue
            best = max(answer.detections, key=lambda d: d.score)
            right = present and max(box_iou(best.box, b) for b in rec.boxes) >= 0.5
            rows.append((p_yes, float(best.score), present, right))
    data = np.array(rows, dtype=float)
    p_yes, p_at, present, right = data[:, 0], data[:, 1], data[:, 2] > 0, data[:, 3] > 0
    print(f"{len(data)} records: {int(present.sum())} present, {int((~present).sum())} absent")
    print("\n| score | AUROC right vs wrong | ECE | AUROC present vs absent |")
    print("|---|---|---|---|")
    for name, s in (("p(`<at>`) (today's score)", p_at), ("p(yes) of 'Is there {expr}?'", p_yes)):
        q, qa = score_quality(s, right), score_quality(s, present)
        print(f"| {name} | {_f(q['auroc'])} | {_f(q['ece'])} | {_f(qa['auroc'])} |")
    print("\n| p(yes) threshold | present objects kept | absent objects dropped |")
    print("|---|---|---|")
    for t in (0.3, 0.5, 0.7):
        kept = float(((p_yes >= t) & present).sum() / max(present.sum(), 1))
        dropped = float(((p_yes < t) & ~present).sum() / max((~present).sum(), 1))
        print(f"| {t} | {kept:.2f} | {dropped:.2f} |")
    base = statistics.median(t_predict) * 1000
    both = statistics.median([a + b for a, b in zip(t_predict, t_exists, strict=True)]) * 1000
    print("\n| per prompt (median ms) | predict | predict + exists | ratio |")
    print("|---|---|---|---|")
    print(f"| CPU | {base:.1f} | {both:.1f} | {both / base:.2f}x |")
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"  # n/a: only one kind of region


if __name__ == "__main__":
    sys.exit(main())
