"""Evaluating a model on a referring-expression split: run the predictor, score with
:func:`labelstudio.coco.evaluate.evaluate_refexp` (the one implementation of REC
Acc@0.5, mean IoU, mask mIoU / cIoU and multi-instance recall)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from labelstudio.coco.evaluate import ScoredRefExp, evaluate_refexp
from nextchat_core.image_processing import load_image
from nextchat_core.predictor import NextChatPredictor, Query

from .data import SampleSet, _decode_mask, _size


def evaluate_predictor(
    predictor: NextChatPredictor,
    samples: SampleSet,
    *,
    max_records: int | None = None,
    batch_size: int = 16,
    with_masks: bool = True,
) -> dict[str, Any]:
    """Predict every ``rec`` record of ``samples`` (up to ``max_records``) and score it.

    Multi-box records compare the union of ground-truth masks with the union of
    predicted masks. Returns the :func:`evaluate_refexp` report plus ``seconds``.
    """
    recs = [r for r in samples.records if r.task == "rec"][: max_records or None]
    if not recs:
        raise ValueError("the evaluation split has no referring-expression ('rec') records")
    start = time.perf_counter()
    scored: list[ScoredRefExp] = []
    for i in range(0, len(recs), batch_size):
        chunk = recs[i : i + batch_size]
        images = [load_image(r.image) for r in chunk]
        answers = predictor.predict_batch(
            images,
            [Query(k, r.text) for k, r in enumerate(chunk)],
            with_masks=with_masks,
            batch_size=batch_size,
        )
        for rec, img, ans in zip(chunk, images, answers, strict=True):
            w, h = _size(rec)
            gt_mask = None
            if with_masks and rec.masks is not None and all(m is not None for m in rec.masks):
                gt_mask = np.zeros((h, w), dtype=bool)
                for m in rec.masks:
                    gt_mask |= _decode_mask(m, w, h, rec.source)
            pred_mask = None
            if gt_mask is not None:
                pred_mask = np.zeros((img.height, img.width), dtype=bool)
                for d in ans.detections:
                    if d.mask is not None:
                        pred_mask |= d.mask
            scored.append(
                ScoredRefExp(
                    image=str(rec.image),
                    expression=rec.text,
                    boxes=np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4),
                    pred_boxes=np.array([d.box for d in ans.detections], dtype=np.float64).reshape(
                        -1, 4
                    ),
                    mask=gt_mask,
                    pred_mask=pred_mask,
                )
            )
    report = evaluate_refexp(scored)
    report["seconds"] = time.perf_counter() - start
    return report
