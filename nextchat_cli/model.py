"""Core ``nextchat`` subcommands: ``inspect-checkpoint`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect-checkpoint",
        help="which preset a checkpoint matches, its size and key coverage (JSON)",
        description=(
            "Print, as JSON, the preset a checkpoint matches, its parameter count and the "
            "mapped / missing / unexpected key counts. PATH is a checkpoint directory (own "
            "format or the released NExT-Chat layout). With --manifest and no PATH, check a "
            "released state-dict manifest against the nextchat-7b-336 preset."
        ),
    )
    p.add_argument("path", nargs="?", help="checkpoint directory")
    p.add_argument(
        "--manifest", help="JSON manifest of a released state dict ({'tensors': {name: shape}})"
    )
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "predict",
        help="answer a prompt about an image: text, boxes, scores, masks, overlay PNG",
        description="Run the model on one image and print the answer, boxes in original pixels and scores.",
    )
    p.add_argument("image", help="image file")
    p.add_argument(
        "prompt", nargs="+", help="what to find, e.g. 'the blue triangle' (several allowed)"
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint directory (default: $NEXTCHAT_CHECKPOINT or the bundled demo model)",
    )
    p.add_argument(
        "--task",
        choices=["ground", "chat", "caption"],
        default="ground",
        help="ground: find objects (default); chat: answer a question; caption: describe --box",
    )
    p.add_argument(
        "--box",
        type=float,
        nargs=4,
        metavar=("X1", "Y1", "X2", "Y2"),
        help="input region in original pixels (for --task caption)",
    )
    p.add_argument("--no-masks", action="store_true", help="boxes only (skips SAM)")
    p.add_argument(
        "--device",
        default=os.environ.get("NEXTCHAT_DEVICE"),
        help="cpu or cuda (default: $NEXTCHAT_DEVICE or cpu)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--overlay", help="write a PNG of the image with boxes and masks drawn")
    p.set_defaults(func=_predict)


def _inspect(args: argparse.Namespace) -> int:
    from nextchat_core.build import inspect_checkpoint

    print(json.dumps(inspect_checkpoint(args.path, manifest=args.manifest), indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from nextchat_cli.overlay import draw_overlay
    from nextchat_core.device import resolve_device
    from nextchat_core.image_processing import load_image
    from nextchat_core.predictor import NextChatPredictor
    from training.versions import resolve_checkpoint

    predictor = NextChatPredictor.from_pretrained(
        resolve_checkpoint(args.checkpoint), device=resolve_device(args.device)
    )
    image = load_image(args.image)
    predictor.set_image(image, with_masks=not args.no_masks)
    boxes = [args.box] if args.box else None
    answers = predictor.predict(
        args.prompt, task=args.task, boxes=boxes, with_masks=not args.no_masks
    )
    if args.json:
        out = [
            {
                "prompt": a.prompt,
                "text": a.text,
                "score": round(a.score, 4),
                "presence": None if a.presence is None else round(a.presence, 4),
                "rejected": len(a.rejected),
                "detections": [
                    {
                        "box": [round(float(v), 1) for v in d.box],
                        "score": round(d.score, 4),
                        "mask_iou": None if d.mask_iou is None else round(d.mask_iou, 4),
                        "mask_area": None if d.mask is None else int(d.mask.sum()),
                    }
                    for d in a.detections
                ],
            }
            for a in answers
        ]
        print(json.dumps(out, indent=2))
    else:
        for a in answers:
            print(f"{a.prompt!r} -> {a.text}")
            if a.presence is not None:
                held = f"; {len(a.rejected)} box(es) held back" if a.rejected else ""
                print(f"  presence p(yes) {a.presence:.3f}{held}")
            for k, d in enumerate(a.detections):
                box = ", ".join(f"{v:.1f}" for v in d.box)
                mask = (
                    ""
                    if d.mask is None
                    else f"  mask {int(d.mask.sum())} px (SAM IoU {d.mask_iou:.3f})"
                )
                print(f"  [{k}] box [{box}]  score {d.score:.3f}{mask}")
    if args.overlay:
        draw_overlay(image, answers).save(args.overlay)
        print(f"overlay written to {Path(args.overlay)}")
    return 0
