"""Evaluating a model on a split of records: run the predictor, score each task.

* ``rec`` records with boxes: :func:`labelstudio.coco.evaluate.evaluate_refexp` (the one
  implementation of REC Acc@0.5, mean IoU, mask mIoU / cIoU and multi-instance recall);
* ``rec`` records WITHOUT boxes (an expression naming something that is not there, e.g.
  the synthetic domain's ``absent`` task): ``absent_no_box_rate``, the share answered
  without any box;
* ``caption`` records (one input box): ``caption_acc``, exact match of the answer text
  (case, surrounding space and a final period ignored);
* ``chat`` records whose answer starts with "Yes" or "No": ``yes_no_acc``, whether the
  model's answer starts with the same word.

A split without records of a kind reports ``None`` and a count of 0 for it, so the
numbers of a ``rec``-only split are exactly those it always had.

:func:`fit_calibration` fits a checkpoint's region-score calibration (``score.calibration``
of its config) on a split of the same kinds of records.
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import torch

from labelstudio.coco.evaluate import ScoredRefExp, evaluate_refexp, score_quality
from nextchat_core import frames
from nextchat_core.image_processing import load_image
from nextchat_core.predictor import NextChatPredictor, Query, Task, logit

from .data import Record, SampleSet, _decode_mask, _size


def evaluate_predictor(
    predictor: NextChatPredictor,
    samples: SampleSet,
    *,
    max_records: int | None = None,
    batch_size: int = 16,
    with_masks: bool = True,
) -> dict[str, Any]:
    """Predict the records of ``samples`` (the first ``max_records`` of each kind) and
    score them (see the module docstring). Multi-box records compare the union of
    ground-truth masks with the union of predicted masks. Returns the
    :func:`evaluate_refexp` report of the boxed ``rec`` records plus the task scores
    (``n_absent``/``absent_no_box_rate``, ``n_captions``/``caption_acc``,
    ``n_yes_no``/``yes_no_acc``) and ``seconds``."""
    limit = max_records or None
    recs = [r for r in samples.records if r.task == "rec" and r.boxes][:limit]
    absent = [r for r in samples.records if r.task == "rec" and not r.boxes][:limit]
    captions = [r for r in samples.records if r.task == "caption" and r.boxes][:limit]
    yes_no = [r for r in samples.records if r.task == "chat" and _yes_no(r.answer)][:limit]
    if not (recs or absent or captions or yes_no):
        raise ValueError(
            "the evaluation split has no records to score: expected 'rec' records (with or "
            "without boxes), 'caption' records or yes/no 'chat' records"
        )
    start = time.perf_counter()
    regions: list[tuple[float, bool]] = []  # (best region's score, right?) per prompt
    report: dict[str, Any] = (
        _score_rec(predictor, recs, batch_size=batch_size, with_masks=with_masks, regions=regions)
        if recs
        else evaluate_refexp([])
    )
    report["present_with_region_rate"] = (
        len(regions) / len(recs) if recs else None
    )  # prompts for objects that are there which got at least one region
    # scored as the present ones are (with masks when they are): one score, one meaning
    answers = _answers(predictor, absent, "ground", batch_size, with_masks=with_masks)
    report["n_absent"] = len(absent)
    report["absent_no_box_rate"] = (
        float(np.mean([not a.detections for a in answers])) if absent else None
    )
    # any region for an object that is not there is a wrong one
    regions += [(max(d.score for d in a.detections), False) for a in answers if a.detections]
    report["confidence"] = score_quality([r[0] for r in regions], [r[1] for r in regions])
    answers = _answers(predictor, captions, "caption", batch_size)
    report["n_captions"] = len(captions)
    report["caption_acc"] = (
        float(
            np.mean(
                [
                    _norm(a.text) == _norm(r.answer or "")
                    for r, a in zip(captions, answers, strict=True)
                ]
            )
        )
        if captions
        else None
    )
    answers = _answers(predictor, yes_no, "chat", batch_size)
    report["n_yes_no"] = len(yes_no)
    report["yes_no_acc"] = (
        float(
            np.mean(
                [_yes_no(a.text) == _yes_no(r.answer) for r, a in zip(yes_no, answers, strict=True)]
            )
        )
        if yes_no
        else None
    )
    report["seconds"] = time.perf_counter() - start
    return report


def format_task_report(report: dict[str, Any]) -> str:
    """Lines for the task scores of an :func:`evaluate_predictor` report (for the CLI)."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    conf = report.get("confidence") or {}

    return "\n".join(
        [
            f"absent: no box        {fmt(report.get('absent_no_box_rate'))} "
            f"({report.get('n_absent', 0)} prompts naming nothing in the image)",
            f"caption exact match   {fmt(report.get('caption_acc'))} "
            f"({report.get('n_captions', 0)} regions)",
            f"yes/no chat           {fmt(report.get('yes_no_acc'))} "
            f"({report.get('n_yes_no', 0)} questions)",
            f"present: a region     {fmt(report.get('present_with_region_rate'))} "
            "(prompts for objects that are there)",
            f"score AUROC / ECE     {fmt(conf.get('auroc'))} / {fmt(conf.get('ece'))} "
            f"({conf.get('n_regions', 0)} best regions: right = IoU >= 0.5, any for an absent "
            "object is wrong)",
        ]
    )


def _score_rec(
    predictor: NextChatPredictor,
    recs: list[Record],
    *,
    batch_size: int,
    with_masks: bool,
    regions: list[tuple[float, bool]],
) -> dict[str, Any]:
    """Score the boxed ``rec`` records; appends to ``regions`` each answered record's
    best-scored region with whether it is right (box IoU >= 0.5 with a true box)."""
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
            if ans.detections:
                best = max(ans.detections, key=lambda d: d.score)
                truth = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
                right = max(frames.box_iou(best.box, t) for t in truth) >= 0.5
                regions.append((float(best.score), bool(right)))
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
    return evaluate_refexp(scored)


def fit_calibration(
    predictor: NextChatPredictor, samples: SampleSet, *, batch_size: int = 16
) -> dict[str, list[float]]:
    """Platt scaling of the region score (``nextchat_core.config.ScoreConfig.calibration``)
    fitted on the ``rec`` records of ``samples``, present and absent: for each prompt's
    best box (presence gate off), whether it is right (box IoU >= 0.5 with a true box;
    any box for an absent object is wrong) from logit(presence) and logit(SAM's predicted
    IoU) - ``"masks"`` - or logit(presence) alone - ``"boxes"``. Logistic regression by
    ``torch.optim.LBFGS`` (the project has no scikit-learn; three weights need no more).
    Fit it on a split that no reported figure is measured on."""
    ungated = NextChatPredictor(
        predictor.model, predictor.tokenizer, presence=predictor.presence, presence_threshold=0.0
    )
    records = [r for r in samples.records if r.task == "rec"]
    if not records:
        raise ValueError("fit_calibration needs 'rec' records (with and without boxes)")
    rows: list[tuple[float, float, bool]] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        images = [load_image(r.image) for r in chunk]
        queries = [Query(k, r.text) for k, r in enumerate(chunk)]
        for rec, ans in zip(chunk, ungated.predict_batch(images, queries), strict=True):
            if not ans.detections:
                continue
            best = max(ans.detections, key=lambda d: d.score)
            presence = ans.presence if ans.presence is not None else best.at_score
            truth = np.asarray(rec.boxes or [], dtype=np.float64).reshape(-1, 4)
            right = any(frames.box_iou(best.box, t) >= 0.5 for t in truth)
            rows.append((logit(float(presence or 0.0)), logit(best.mask_iou or 0.0), right))
    if len({r[2] for r in rows}) < 2:
        raise ValueError(
            f"cannot fit a calibration on {len(rows)} regions that are all "
            f"{'right' if rows and rows[0][2] else 'wrong'}: use a split with both"
        )
    data = torch.tensor(rows, dtype=torch.float64)
    return {
        "masks": _platt(data[:, :2], data[:, 2]),
        "boxes": _platt(data[:, :1], data[:, 2]),
    }


def _platt(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Weights then bias of a logistic regression of ``y`` on ``x`` (tiny L2)."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [round(float(v), 4) for v in w.detach()]


def _answers(
    predictor: NextChatPredictor,
    records: list[Record],
    task: str,
    batch_size: int,
    *,
    with_masks: bool = False,
) -> list[Any]:
    """The predictor's answers to ``records`` as ``task`` queries (boxes only unless
    ``with_masks``)."""
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        images = [load_image(r.image) for r in chunk]
        queries = [
            Query(
                k,
                "" if task == "caption" else r.text,
                cast(Task, task),
                r.boxes if task == "caption" else None,
            )
            for k, r in enumerate(chunk)
        ]
        out.extend(
            predictor.predict_batch(images, queries, with_masks=with_masks, batch_size=batch_size)
        )
    return out


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def _yes_no(text: str | None) -> str | None:
    """``"yes"``/``"no"`` when ``text`` starts with that word, else ``None``."""
    words = (text or "").strip().lower().replace(",", " ").replace(".", " ").split()
    return words[0] if words and words[0] in ("yes", "no") else None
