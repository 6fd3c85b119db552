"""Evaluation: COCO bbox/segm AP/AR and the NExT-Chat paper's referring-expression metrics.

**COCO mode** (:func:`evaluate_coco`): detections (a COCO results list, or an instances
export with scored predictions) against ground-truth instances, with pycocotools'
``COCOeval``; the 12 standard numbers per IoU type plus a per-category table. ``segm``
uses only annotations that have a segmentation on each side (a file's rectangles with
``"segmentation": []`` are left out of it; this project's exports give box-only objects
their box outline, which counts, as in stock ``COCOeval``); undefined numbers (no ground
truth in an area range) are ``None``.

**Referring-expression mode** (:func:`evaluate_refexp`): one record per expression, in
original pixels. Record format (one JSON object per line in a ``.jsonl`` file)::

    {"image": "val/0001.jpg",            # image reference (informational)
     "expression": "the dog on the left", # the referring expression
     "boxes": [[x1, y1, x2, y2], ...],    # ground-truth boxes, original-pixel xyxy
     "mask": {"size": [h, w], "counts": "..."},       # optional GT mask, COCO RLE
     "pred_boxes": [[x1, y1, x2, y2], ...],           # predictions, best first
     "pred_mask": {"size": [h, w], "counts": "..."}}  # optional predicted mask

Metrics (``iou_threshold`` 0.5 by default):

* ``rec_acc``: REC Acc@0.5, the fraction of records whose top predicted box has IoU >=
  0.5 with a ground-truth box (the best-matching one when there are several); a record
  without predictions counts as a miss.
* ``mean_box_iou``: mean over records of that top-box IoU (0 without predictions).
* ``mask_miou`` / ``mask_ciou``: over records with a GT mask, the mean per-record mask IoU
  and the cumulative IoU (sum of intersections / sum of unions over the split, the RES
  metric the paper reports); a missing ``pred_mask`` is an empty mask.
* ``multi_instance_recall``: the fraction of all GT boxes that some predicted box of the
  same record overlaps with IoU >= 0.5 (not one-to-one: one predicted box may cover two
  GT boxes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nextchat_core import frames
from nextchat_core.masks import coco_segmentation_to_mask, mask_intersection_union, mask_to_box

from .common import CocoLike, ResultsLike, load_instances, load_results

logger = logging.getLogger(__name__)

IouType = Literal["bbox", "segm"]

# COCOeval.stats order (pycocotools cocoeval.py, summarize()).
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


# ------------------------------------------------------------------------------ COCO


def evaluate_coco(
    gt: CocoLike,
    dt: ResultsLike,
    *,
    iou_types: Sequence[IouType] = ("bbox", "segm"),
) -> dict[str, Any]:
    """COCO AP/AR of detections ``dt`` against ground truth ``gt`` (dicts or file paths).

    Returns a JSON-ready report: ``{"n_images", "n_gt", "n_dt", "bbox": {...}, "segm":
    {...}}`` where each IoU type holds the 12 COCO numbers (``AP``, ``AP50``, ...,
    ``ARl``), ``per_category`` rows (``id``, ``name``, ``n_gt``, ``n_dt``, ``AP``,
    ``AP50``, ``AR100``) and the pycocotools summary text; an IoU type that cannot be
    evaluated (no segmentations) holds ``{"skipped": reason}``.
    """
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"iou_types must be 'bbox' and/or 'segm', got {t!r}")
    gt_data = load_instances(gt, role="ground truth")
    dets = load_results(dt, gt_data)
    report: dict[str, Any] = {
        "n_images": len(gt_data["images"]),
        "n_gt": len(gt_data["annotations"]),
        "n_dt": len(dets),
    }
    for iou_type in iou_types:
        if iou_type == "segm":
            gt_anns = [a for a in gt_data["annotations"] if a.get("segmentation")]
            dt_anns = [d for d in dets if d.get("segmentation")]
            if not gt_anns or not dt_anns:
                side = "ground truth" if not gt_anns else "detections"
                report["segm"] = {"skipped": f"the {side} have no segmentations"}
                continue
        else:
            gt_anns = [a for a in gt_data["annotations"] if a.get("bbox") or a.get("segmentation")]
            dt_anns = [d for d in dets if d.get("bbox") or d.get("segmentation")]
        report[iou_type] = _coco_eval(gt_data, gt_anns, dt_anns, iou_type)
    return report


def format_coco_report(report: dict[str, Any]) -> str:
    """A plain-text table of a :func:`evaluate_coco` report (for the CLI)."""
    lines = [
        f"images {report['n_images']}, ground-truth annotations {report['n_gt']}, "
        f"detections {report['n_dt']}"
    ]
    for iou_type in ("bbox", "segm"):
        part = report.get(iou_type)
        if part is None:
            continue
        if "skipped" in part:
            lines.append(f"\n{iou_type}: skipped ({part['skipped']})")
            continue
        lines.append(f"\n{iou_type}: " + "  ".join(f"{k} {_fmt(part[k])}" for k in COCO_STAT_NAMES))
        width = max([len("category")] + [len(r["name"]) for r in part["per_category"]])
        lines.append(
            f"  {'category':<{width}}  {'n_gt':>6} {'n_dt':>6} {'AP':>6} {'AP50':>6} {'AR100':>6}"
        )
        for r in part["per_category"]:
            lines.append(
                f"  {r['name']:<{width}}  {r['n_gt']:>6} {r['n_dt']:>6} {_fmt(r['AP']):>6} "
                f"{_fmt(r['AP50']):>6} {_fmt(r['AR100']):>6}"
            )
    return "\n".join(lines)


def _coco_eval(
    gt_data: dict[str, Any],
    gt_anns: list[dict[str, Any]],
    dt_anns: list[dict[str, Any]],
    iou_type: IouType,
) -> dict[str, Any]:
    from pycocotools.cocoeval import COCOeval

    images = gt_data["images"]
    categories = gt_data["categories"]
    sizes = {im["id"]: (int(im["width"]), int(im["height"])) for im in images}
    gts = _prepare(gt_anns, sizes, iou_type, role="ground truth", detections=False)
    dts = _prepare(dt_anns, sizes, iou_type, role="detection", detections=True)
    coco_gt = _coco({"images": images, "categories": categories, "annotations": gts})
    coco_dt = _coco({"images": images, "categories": categories, "annotations": dts})
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):  # pycocotools prints progress and the table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    out: dict[str, Any] = {
        name: _none_if_undefined(v)
        for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)
    }
    precision = evaluator.eval[
        "precision"
    ]  # (T iou thresholds, R recalls, K cats, A areas, M maxdets)
    recall = evaluator.eval["recall"]  # (T, K, A, M)
    n_gt = _count(gts, "category_id")
    n_dt = _count(dts, "category_id")
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        name = next(c["name"] for c in categories if c["id"] == cat_id)
        rows.append(
            {
                "id": cat_id.item() if isinstance(cat_id, np.generic) else cat_id,
                "name": name,
                "n_gt": n_gt.get(cat_id, 0),
                "n_dt": n_dt.get(cat_id, 0),
                "AP": _mean_defined(precision[:, :, k, 0, -1]),
                "AP50": _mean_defined(precision[0, :, k, 0, -1]),
                "AR100": _mean_defined(recall[:, k, 0, -1]),
            }
        )
    out["per_category"] = rows
    out["summary"] = summary.getvalue().strip().splitlines()[-12:]
    return out


def _coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _prepare(
    anns: list[dict[str, Any]],
    sizes: dict[Any, tuple[int, int]],
    iou_type: IouType,
    *,
    role: str,
    detections: bool,
) -> list[dict[str, Any]]:
    """Copies with the fields COCOeval reads: fresh ``id``s, ``iscrowd``, ``area`` and a
    ``bbox`` (from the mask when missing); segmentations are decoded once here so a bad
    one fails with its image named instead of deep inside pycocotools."""
    out = []
    for i, ann in enumerate(anns):
        a = {"iscrowd": 0, **ann, "id": i + 1}
        if detections:
            a["iscrowd"] = 0
        mask = None
        if iou_type == "segm" or a.get("bbox") is None:
            w, h = sizes[a["image_id"]]
            try:
                mask = coco_segmentation_to_mask(a["segmentation"], w, h)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"{role} {ann.get('id', i)} on image {a['image_id']}: bad segmentation: {exc}"
                ) from exc
        if a.get("bbox") is None:
            box = mask_to_box(mask) if mask is not None else None
            a["bbox"] = frames.xyxy_to_xywh(box) if box is not None else [0.0, 0.0, 0.0, 0.0]
        # Detections' areas decide their area range (small/medium/large), as in loadRes:
        # mask pixels for segm, box area for bbox.
        if detections or "area" not in a:
            a["area"] = (
                float(mask.sum()) if mask is not None else float(a["bbox"][2] * a["bbox"][3])
            )
        out.append(a)
    return out


def _count(anns: list[dict[str, Any]], key: str) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for a in anns:
        out[a[key]] = out.get(a[key], 0) + 1
    return out


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def _none_if_undefined(v: float) -> float | None:
    return None if v < 0 else float(v)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# ------------------------------------------------------------ referring expressions


@dataclass
class ScoredRefExp:
    """One referring expression with its ground truth and predictions (original pixels):
    what :func:`evaluate_refexp` scores. Training records (expression + ground truth, no
    predictions) are another format, read by :func:`training.data.read_refexp_jsonl`."""

    image: str
    expression: str
    boxes: np.ndarray  # (N, 4) ground-truth xyxy, original pixels; N may be 0 for RES-only
    pred_boxes: np.ndarray  # (M, 4) predicted xyxy, original pixels, best first
    mask: np.ndarray | None = None  # HxW bool ground truth
    pred_mask: np.ndarray | None = None  # HxW bool prediction


def parse_scored_refexp(obj: Any, *, where: str = "record") -> ScoredRefExp:
    """A record dict (the format in this module's docstring) -> :class:`ScoredRefExp`.
    Raises ``ValueError`` naming ``where`` and the field when a field is malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    boxes = _boxes(obj.get("boxes", []), f"{where}: 'boxes'")
    pred_boxes = _boxes(obj.get("pred_boxes", []), f"{where}: 'pred_boxes'")
    mask = _mask(obj.get("mask"), f"{where}: 'mask'")
    pred_mask = _mask(obj.get("pred_mask"), f"{where}: 'pred_mask'")
    if mask is not None and pred_mask is not None and mask.shape != pred_mask.shape:
        raise ValueError(
            f"{where}: 'pred_mask' size {list(pred_mask.shape)} differs from the ground-truth "
            f"'mask' size {list(mask.shape)} ([height, width]); predict at original resolution"
        )
    if len(boxes) == 0 and mask is None:
        raise ValueError(f"{where}: needs ground truth: 'boxes' (xyxy pixels) and/or 'mask'")
    return ScoredRefExp(
        image=str(obj.get("image", "")),
        expression=str(obj.get("expression", "")),
        boxes=boxes,
        pred_boxes=pred_boxes,
        mask=mask,
        pred_mask=pred_mask,
    )


def load_scored_refexps(path: str | os.PathLike[str]) -> list[ScoredRefExp]:
    """Read a ``.jsonl`` file of records (blank lines ignored); ``ValueError`` naming the
    line of a malformed one."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            records.append(parse_scored_refexp(obj, where=where))
    if not records:
        raise ValueError(f"{path} holds no records (expected one JSON object per line)")
    return records


def top_box_ious(pred_boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Per record: IoU of the top predicted box (``pred_boxes[i][0]``, xyxy pixels) with
    the best-matching ground-truth box; 0 when there is no prediction."""
    out = np.zeros(len(gt_boxes))
    for i, (preds, gts) in enumerate(zip(pred_boxes, gt_boxes, strict=True)):
        if len(preds) and len(gts):
            out[i] = max(frames.box_iou(preds[0], g) for g in gts)
    return out


def rec_accuracy(
    pred_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    *,
    iou_threshold: float = 0.5,
) -> float:
    """REC Acc@``iou_threshold``: fraction of records whose top box has IoU >= threshold
    with a ground-truth box (boxes xyxy in original pixels)."""
    ious = top_box_ious(pred_boxes, gt_boxes)
    return float((ious >= iou_threshold).mean()) if len(ious) else 0.0


def mean_box_iou(pred_boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray]) -> float:
    """Mean over records of the top box's IoU with its best ground-truth box."""
    ious = top_box_ious(pred_boxes, gt_boxes)
    return float(ious.mean()) if len(ious) else 0.0


def mask_iou_scores(
    pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]
) -> tuple[float, float]:
    """``(mIoU, cIoU)`` of binary ``HxW`` masks: the mean of per-record IoUs, and the
    cumulative intersection over the cumulative union. ``None`` predictions are empty."""
    ious, inter_sum, union_sum = [], 0, 0
    for pred, gt in zip(pred_masks, gt_masks, strict=True):
        pred = np.zeros_like(gt, dtype=bool) if pred is None else pred
        inter, union = mask_intersection_union(pred, gt)
        inter_sum += inter
        union_sum += union
        ious.append(inter / union if union else 1.0)
    if not ious:
        return 0.0, 0.0
    return float(np.mean(ious)), (inter_sum / union_sum if union_sum else 1.0)


def multi_instance_recall(
    pred_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    *,
    iou_threshold: float = 0.5,
) -> float:
    """Fraction of all ground-truth boxes that some predicted box of the same record
    overlaps with IoU >= threshold (xyxy pixels; not a one-to-one matching)."""
    hit = total = 0
    for preds, gts in zip(pred_boxes, gt_boxes, strict=True):
        for g in gts:
            total += 1
            hit += any(frames.box_iou(p, g) >= iou_threshold for p in preds)
    return hit / total if total else 0.0


def evaluate_refexp(
    records: Iterable[ScoredRefExp | dict[str, Any]], *, iou_threshold: float = 0.5
) -> dict[str, Any]:
    """Referring-expression report for records whose predictions are filled in (dicts in
    the module's record format, or :class:`ScoredRefExp`).

    Returns ``{"n_records", "iou_threshold", "n_box_records", "rec_acc", "mean_box_iou",
    "n_gt_boxes", "multi_instance_recall", "n_mask_records", "mask_miou", "mask_ciou"}``;
    box metrics are ``None`` without box ground truth, mask metrics without masks.
    """
    parsed = [
        r if isinstance(r, ScoredRefExp) else parse_scored_refexp(r, where=f"record {i}")
        for i, r in enumerate(records)
    ]
    boxed = [r for r in parsed if len(r.boxes)]
    masked = [r for r in parsed if r.mask is not None]
    report: dict[str, Any] = {
        "n_records": len(parsed),
        "iou_threshold": iou_threshold,
        "n_box_records": len(boxed),
        "rec_acc": None,
        "mean_box_iou": None,
        "n_gt_boxes": int(sum(len(r.boxes) for r in boxed)),
        "multi_instance_recall": None,
        "n_mask_records": len(masked),
        "mask_miou": None,
        "mask_ciou": None,
    }
    if boxed:
        preds = [r.pred_boxes for r in boxed]
        gts = [r.boxes for r in boxed]
        report["rec_acc"] = rec_accuracy(preds, gts, iou_threshold=iou_threshold)
        report["mean_box_iou"] = mean_box_iou(preds, gts)
        report["multi_instance_recall"] = multi_instance_recall(
            preds, gts, iou_threshold=iou_threshold
        )
    if masked:
        miou, ciou = mask_iou_scores(
            [r.pred_mask for r in masked], [r.mask for r in masked if r.mask is not None]
        )
        report["mask_miou"], report["mask_ciou"] = miou, ciou
    return report


def format_refexp_report(report: dict[str, Any]) -> str:
    """A few lines of text for a :func:`evaluate_refexp` report (for the CLI)."""
    t = report["iou_threshold"]
    return "\n".join(
        [
            f"records {report['n_records']} (with boxes {report['n_box_records']}, "
            f"with masks {report['n_mask_records']})",
            f"REC Acc@{t:g}            {_fmt(report['rec_acc'])}",
            f"mean box IoU           {_fmt(report['mean_box_iou'])}",
            f"multi-instance recall  {_fmt(report['multi_instance_recall'])} "
            f"({report['n_gt_boxes']} GT boxes, IoU >= {t:g})",
            f"mask mIoU              {_fmt(report['mask_miou'])}",
            f"mask cIoU              {_fmt(report['mask_ciou'])}",
        ]
    )


def _boxes(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a list of [x1, y1, x2, y2] pixel boxes") from exc
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise ValueError(
            f"{where} must be a list of [x1, y1, x2, y2] boxes in original pixels, got "
            f"{str(value)[:80]}"
        )
    if ((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])).any():
        raise ValueError(
            f"{where}: boxes must be xyxy with x2 >= x1 and y2 >= y1, got {arr.tolist()[:3]}"
        )
    return arr


def _mask(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("size"), list)
        or len(value["size"]) != 2
    ):
        raise ValueError(f"{where} must be a COCO RLE {{'size': [h, w], 'counts': ...}}")
    h, w = (int(v) for v in value["size"])
    try:
        return coco_segmentation_to_mask(value, w, h)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


# ------------------------------------------------------------------ score quality


def score_quality(
    scores: Sequence[float], correct: Sequence[bool], *, bins: int = 10
) -> dict[str, Any]:
    """How well region scores predict correctness: ``auroc`` (the probability that a right
    region outscores a wrong one, ties counting half; ``None`` without both kinds), ``ece``
    (expected calibration error over ``bins`` equal-width score bins: the bins' mean
    |accuracy - mean score|, weighted by their share of regions) and the ``reliability``
    table behind it (``[lo, hi, n, mean score, accuracy]`` per non-empty bin).

    Written out here rather than taken from scikit-learn, which the project does not
    otherwise need: both are a few lines of rank statistics over at most thousands of
    regions.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} correctness values")
    out: dict[str, Any] = {"n_regions": len(s), "n_correct": int(y.sum())}
    pos, neg = s[y], s[~y]
    if len(pos) and len(neg):
        # Mann-Whitney U: for each right region, the wrong ones below it (+ half the ties)
        neg_sorted = np.sort(neg)
        below = np.searchsorted(neg_sorted, pos, side="left")
        ties = np.searchsorted(neg_sorted, pos, side="right") - below
        out["auroc"] = float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))
    else:
        out["auroc"] = None
    table = []
    ece = 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1], right=False), 0, bins - 1)
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        if not n:
            continue
        mean_score, accuracy = float(s[members].mean()), float(y[members].mean())
        ece += n / max(len(s), 1) * abs(accuracy - mean_score)
        table.append([float(edges[b]), float(edges[b + 1]), n, mean_score, accuracy])
    out["ece"] = float(ece) if len(s) else None
    out["reliability"] = table
    return out


def reliability_diagram(quality: dict[str, Any], path: str | os.PathLike[str], title: str) -> None:
    """A reliability diagram PNG of a :func:`score_quality` report: per score bin, the
    accuracy (bar) against the diagonal of perfect calibration, with n per bin, the AUROC
    and the ECE. Drawn with Pillow (no plotting library is a dependency)."""
    from PIL import Image, ImageDraw

    size, margin = 480, 56
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = margin, 36, size - 20, size - margin

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * (x1 - x0), y1 - v * (y1 - y0)

    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.line([px(0, 0), px(1, 1)], fill=(150, 150, 150), width=1)
    for lo, hi, n, _mean, acc in quality["reliability"]:
        a, b = px(lo, 0), px(hi, acc)
        draw.rectangle([a[0] + 2, b[1], b[0] - 2, a[1]], fill=(77, 150, 255), outline="black")
        draw.text((a[0] + 3, a[1] - 12), str(n), fill="black")
    for t in (0.0, 0.5, 1.0):
        draw.text((px(t, 0)[0] - 8, y1 + 6), f"{t:.1f}", fill="black")
        draw.text((x0 - 30, px(0, t)[1] - 6), f"{t:.1f}", fill="black")
    draw.text((x0, y1 + 24), "region score (bins)   bars: share right, n per bin", fill="black")
    auroc = quality.get("auroc")
    ece = quality.get("ece")
    summary = (
        f"{title}: {quality['n_regions']} regions, AUROC "
        f"{'n/a' if auroc is None else f'{auroc:.2f}'}, ECE {'n/a' if ece is None else f'{ece:.2f}'}"
    )
    draw.text((x0, 12), summary, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
