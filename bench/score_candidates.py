"""Region-score candidates side by side (issue 16): how well each separates right regions
from wrong ones and present objects from absent ones, and what the score costs on the CPU.

    python bench/score_candidates.py                          # the bundled model, 240 records
    python bench/score_candidates.py --checkpoint DIR --records 100 --split SPLIT/data.jsonl

For each ``rec`` record of the split (default: the robustness split of the second renderer,
written to a temp folder; present and absent objects), one ``predict`` with masks and the
presence pass, its gate off (``presence_threshold=0``) so that every candidate is seen on
every box. Candidates, of the best-scored box: the ``<at>`` probability, p(yes) of "Is
there {expr}?" (``conversation.exists_turns``), SAM's predicted IoU, the IoU of the box
with its mask's extent, and products. A record's best region is right when its box IoU
with a true box is >= 0.5; any region for an absent object is wrong; a record without a
region counts with score 0. Prints AUROC and ECE per candidate, the share of present
objects kept and of absent ones dropped at thresholds of the predictor's score, and the
median time of ``predict`` without the presence pass (``presence="at"``) against with it
(the ratio is the cost of the score). Asserts nothing. Run it under the CPU load you want
to report (say which).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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

    predictor = NextChatPredictor.from_pretrained(
        resolve_checkpoint(args.checkpoint), presence="exists", presence_threshold=0.0
    )
    with tempfile.TemporaryDirectory() as tmp:
        split = args.split
        if split is None:
            out = Path(tmp) / "robust"
            robust_render.write_split(out, args.seed, max(4, args.records // 2), overwrite=True)
            split = out / "data.jsonl"
        records = [r for r in read_refexp_jsonl(split, predictor.config).records if r.task == "rec"]
        records = records[: args.records]
        rows, t_plain, t_scored = [], [], []  # the score as shipped: calibrated if fitted
        for rec in records:
            predictor.set_image(Image.open(rec.image).convert("RGB"), with_masks=True)
            predictor.presence = "at"
            t0 = time.perf_counter()
            predictor.predict(rec.text, with_masks=True)
            t1 = time.perf_counter()
            predictor.presence = "exists"
            (answer,) = predictor.predict(rec.text, with_masks=True)
            t2 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_scored.append(t2 - t1)
            present = bool(rec.boxes)
            p_yes = float(answer.presence or 0.0)
            if not answer.detections:
                rows.append((p_yes, 0.0, 0.0, 0.0, 0.0, present, False))
                continue
            best = max(answer.detections, key=lambda d: d.score)
            right = present and max(box_iou(best.box, b) for b in rec.boxes) >= 0.5
            rows.append(
                (
                    p_yes,
                    best.at_score or 0.0,
                    best.mask_iou or 0.0,
                    _agreement(best),
                    best.score,
                    present,
                    right,
                )
            )
    data = np.array(rows, dtype=float)
    p_yes, p_at, sam_iou, agree, score = (data[:, i] for i in range(5))
    present, right = data[:, 5] > 0, data[:, 6] > 0
    print(f"{len(data)} records: {int(present.sum())} present, {int((~present).sum())} absent")
    print("\n| score of the best box | AUROC right vs wrong | ECE | AUROC present vs absent |")
    print("|---|---|---|---|")
    candidates = {
        "p(`<at>`) (the score before)": p_at,
        "p(yes) of 'Is there {expr}?'": p_yes,
        "SAM's predicted IoU": sam_iou,
        "box-mask agreement": agree,
        "p(yes) x box-mask agreement": p_yes * agree,
        "p(yes) x SAM IoU": p_yes * sam_iou,
        "**the predictor's score**: p(yes) x SAM IoU, calibrated": score,
    }
    for name, s in candidates.items():
        q, qa = score_quality(s, right), score_quality(s, present)
        print(f"| {name} | {_f(q['auroc'])} | {_f(q['ece'])} | {_f(qa['auroc'])} |")
    print("\n| gate | present objects kept | absent objects dropped | kept regions right |")
    print("|---|---|---|---|")
    for name, s in (("p(yes)", p_yes), ("score", score)):
        for t in (0.3, 0.5, 0.7):
            keep = s >= t
            kept = float((keep & present).sum() / max(present.sum(), 1))
            dropped = float((~keep & ~present).sum() / max((~present).sum(), 1))
            precision = float((keep & right).sum() / max(keep.sum(), 1))
            print(f"| {name} >= {t} | {kept:.2f} | {dropped:.2f} | {precision:.2f} |")
    base = statistics.median(t_plain) * 1000
    both = statistics.median(t_scored) * 1000
    print("\n| per prompt, masks on (median ms) | without presence pass | with | ratio |")
    print("|---|---|---|---|")
    print(f"| CPU | {base:.1f} | {both:.1f} | {both / base:.2f}x |")
    return 0


def _agreement(det: Any) -> float:
    """IoU of the box with the tight box around its mask (0 without a mask)."""
    from nextchat_core.frames import box_iou

    if det.mask is None or not det.mask.any():
        return 0.0
    ys, xs = np.nonzero(det.mask)
    return float(box_iou(det.box, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])))


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"  # n/a: only one kind of region


if __name__ == "__main__":
    sys.exit(main())
