"""``nextchat export-coco``, ``nextchat import-coco`` and ``nextchat evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from nextchat_cli.options import add_label_studio_options

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the COCO subcommands to the ``nextchat`` parser."""
    p = sub.add_parser(
        "export-coco",
        help="Label Studio JSON export or project -> COCO instances (brush masks included)",
        description=(
            "Write a COCO instances file from a Label Studio JSON export (INPUT) or straight "
            "from a project (--project ID with LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY). "
            "Boxes are absolute xywh pixels; brush masks become RLE or polygons."
        ),
    )
    p.add_argument("input", nargs="?", type=Path, help="Label Studio JSON export (a task list)")
    p.add_argument("--project", type=int, help="export this Label Studio project instead")
    add_label_studio_options(p)
    p.add_argument(
        "--config",
        type=Path,
        help="label config XML file: categories in its order (default: labels seen, sorted; "
        "with --project, the project's config)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output COCO JSON file")
    p.add_argument("--masks", choices=("rle", "polygon"), default="rle", help="brush mask format")
    p.add_argument(
        "--source",
        choices=("annotations", "predictions", "both"),
        default="annotations",
        help="which results to export (predictions carry 'score')",
    )
    p.add_argument(
        "--format",
        choices=("instances", "results"),
        default="instances",
        help="'results' writes only the scored predictions as a COCO results list",
    )
    p.add_argument(
        "--image-root", type=Path, help="folder of the images, to size tasks without results"
    )
    p.add_argument(
        "--all-annotations",
        action="store_true",
        help="keep every annotator's annotation (default: the ground-truth or latest one per task)",
    )
    p.add_argument("--model-version", help="export predictions of this model version only")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad tasks/regions (listed on stderr) and write the rest",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "import-coco",
        help="COCO instances (+ results) -> Label Studio tasks JSON with predictions",
        description=(
            "Write Label Studio tasks (import JSON) from COCO instances and an optional COCO "
            "results file: boxes become rectangles, masks brushes, polygons polygons. With "
            "--results, the instances become annotations and the results predictions."
        ),
    )
    p.add_argument("instances", type=Path, help="COCO instances JSON")
    p.add_argument("--results", type=Path, help="COCO results JSON (detections with scores)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output Label Studio tasks JSON")
    p.add_argument(
        "--image-prefix",
        default="/data/local-files/?d=",
        help="prepended to each file_name to form the task's image URL/path "
        "(default: %(default)s, Label Studio local files)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="label config XML: its control names and image key are used (checked against "
        "the COCO categories)",
    )
    p.add_argument("--config-out", type=Path, help="also write a matching label config XML here")
    p.add_argument(
        "--instances-as",
        choices=("auto", "annotations", "predictions"),
        default="auto",
        help="auto: annotations when --results is given, else predictions",
    )
    p.add_argument("--polygons-as", choices=("polygon", "brush"), default="polygon")
    p.add_argument("--also-boxes", action="store_true", help="add boxes of masked instances too")
    p.add_argument("--include-crowd", action="store_true", help="keep iscrowd=1 annotations")
    p.add_argument("--min-score", type=float, default=0.0, help="drop detections below this score")
    p.add_argument("--model-version", default="coco-import", help="predictions' model_version")
    p.set_defaults(func=_import)

    p = sub.add_parser(
        "evaluate",
        help="COCO AP/AR (--gt/--dt) or referring-expression metrics (--refexp)",
        description=(
            "COCO mode: bbox and segm AP/AR of --dt (results list, or an export with "
            "predictions) against --gt, with a per-category table. Referring-expression mode: "
            "REC Acc@0.5, mean box IoU, multi-instance recall, mask mIoU and cIoU over a "
            "JSONL of records {image, expression, boxes, mask?, pred_boxes, pred_mask?} "
            "(see labelstudio.coco.evaluate); with --checkpoint, the records need no "
            "predictions (the training pipeline's referring-expression jsonl) and the model "
            "predicts them."
        ),
    )
    p.add_argument("--gt", type=Path, help="ground-truth COCO instances")
    p.add_argument("--dt", type=Path, help="detections: COCO results list or instances export")
    p.add_argument("--iou-types", nargs="+", choices=("bbox", "segm"), default=["bbox", "segm"])
    p.add_argument("--refexp", type=Path, help="referring-expression records (.jsonl)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="refexp IoU threshold")
    p.add_argument(
        "--checkpoint",
        help="run this model on the --refexp records (default: predictions in the file)",
    )
    p.add_argument(
        "--device",
        default=os.environ.get("NEXTCHAT_DEVICE"),
        help="cpu or cuda, with --checkpoint (default: $NEXTCHAT_DEVICE or cpu)",
    )
    p.add_argument(
        "--max-records", type=int, default=None, help="evaluate at most this many records"
    )
    p.add_argument("-o", "--out", type=Path, help="write the JSON report here")
    p.add_argument(
        "--reliability",
        type=Path,
        metavar="PNG",
        help="with --checkpoint: write the region scores' reliability diagram here",
    )
    p.set_defaults(func=_evaluate)


def _export(args: argparse.Namespace) -> int:
    from labelstudio.coco.export import (
        coco_results,
        describe_skipped,
        export_coco,
        fetch_project,
        load_tasks,
        write_json,
    )
    from labelstudio.config import parse_label_config

    if (args.input is None) == (args.project is None):
        raise ValueError("give either a Label Studio JSON export file or --project ID (not both)")
    if args.format == "results" and args.source == "annotations":
        raise ValueError("--format results needs predictions: add --source predictions")
    config_xml = args.config.read_text(encoding="utf-8") if args.config else None
    fetch = None
    if args.project is not None:
        from training.settings import ServiceSettings

        tasks, project_config = fetch_project(args.project, base_url=args.url, api_key=args.api_key)
        config_xml = config_xml or project_config or None
        # Images no result sizes are downloaded from the project, with the backend's
        # fetch rules (FETCH_*, MAX_DOWNLOAD_MB, LOCAL_FILES_DOCUMENT_ROOT).
        values = ServiceSettings.values_from_env(os.environ)
        values.update(label_studio_url=args.url, label_studio_api_key=args.api_key)
        fetch = ServiceSettings(**values).fetch_options()
    else:
        tasks = load_tasks(args.input)
    result = export_coco(
        tasks,
        label_config=parse_label_config(config_xml) if config_xml else None,
        masks=args.masks,
        source=args.source,
        skip_bad=args.skip_bad,
        image_root=args.image_root,
        all_annotations=args.all_annotations,
        model_version=args.model_version,
        fetch=fetch,
    )
    coco = result.coco
    if args.format == "results" and config_xml is None:
        # A results list carries category ids but not names: they must match the ground
        # truth's, which only a shared label config guarantees.
        logger.warning(
            "results without a label config number categories by sorted label name "
            "(%s); pass the same --config as for the ground truth so the ids match",
            ", ".join(f"{c['id']}={c['name']}" for c in coco["categories"]),
        )
    write_json(coco_results(coco) if args.format == "results" else coco, args.out)
    for error in result.errors:
        print(f"skipped: {error}", file=sys.stderr)
    left_out = describe_skipped(result.skipped)
    print(
        f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} "
        f"annotations, {len(coco['categories'])} categories"
        + (f"; {left_out}" if left_out else "")
        + (f"; skipped {len(result.errors)} bad task(s)/region(s)" if result.errors else "")
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from labelstudio.coco.common import load_instances
    from labelstudio.coco.export import write_json
    from labelstudio.coco.importer import import_coco, label_config_for

    config_xml = args.config.read_text(encoding="utf-8") if args.config else None
    gt = load_instances(args.instances)
    tasks = import_coco(
        gt,
        args.results,
        image_prefix=args.image_prefix,
        label_config=config_xml,
        instances_as=args.instances_as,
        polygons_as=args.polygons_as,
        also_boxes=args.also_boxes,
        include_crowd=args.include_crowd,
        min_score=args.min_score,
        model_version=args.model_version,
    )
    write_json(tasks, args.out)
    if args.config_out:
        names = [c["name"] for c in gt["categories"]]
        args.config_out.parent.mkdir(parents=True, exist_ok=True)
        args.config_out.write_text(label_config_for(names), encoding="utf-8")
    n_pred = sum(len(p["result"]) for t in tasks for p in t.get("predictions", []))
    n_ann = sum(len(a["result"]) for t in tasks for a in t.get("annotations", []))
    print(
        f"wrote {args.out}: {len(tasks)} tasks, {n_ann} annotation and {n_pred} prediction results"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from labelstudio.coco.evaluate import (
        evaluate_coco,
        evaluate_refexp,
        format_coco_report,
        format_refexp_report,
        load_scored_refexps,
    )

    if args.reliability is not None and args.checkpoint is None:
        raise ValueError("--reliability needs --checkpoint (the scores of a model's regions)")
    coco_mode = args.gt is not None or args.dt is not None
    if coco_mode == (args.refexp is not None):
        raise ValueError("give either --gt and --dt (COCO mode) or --refexp RECORDS.jsonl")
    if coco_mode:
        if args.gt is None or args.dt is None:
            raise ValueError("COCO mode needs both --gt (instances) and --dt (detections)")
        report = evaluate_coco(args.gt, args.dt, iou_types=args.iou_types)
        text = format_coco_report(report)
    elif args.checkpoint is not None:
        # The model-running path lives with the training pipeline's reader and evaluation
        # loop (one implementation, shared with training and the retraining gate).
        from nextchat_core.device import resolve_device
        from nextchat_core.predictor import NextChatPredictor
        from training.data import read_refexp_jsonl
        from training.evaluation import evaluate_predictor, format_task_report
        from training.versions import resolve_checkpoint

        predictor = NextChatPredictor.from_pretrained(
            resolve_checkpoint(args.checkpoint), device=resolve_device(args.device)
        )
        samples = read_refexp_jsonl(args.refexp, predictor.config)
        report = evaluate_predictor(predictor, samples, max_records=args.max_records)
        text = format_refexp_report(report) + "\n" + format_task_report(report)
        if args.reliability is not None:
            from labelstudio.coco.evaluate import reliability_diagram

            reliability_diagram(report["confidence"], args.reliability, args.refexp.name)
            text += f"\nwrote {args.reliability}"
    else:
        records = load_scored_refexps(args.refexp)
        report = evaluate_refexp(records, iou_threshold=args.iou_threshold)
        text = format_refexp_report(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
