"""Shared pieces of the backend tests: a tiny model overfit to one scene (real weights
that emit real ``<at> <boxes>``), an HTTP image server, task JSON and the label configs.

Imported by ``test_backend*.py``; it holds no tests itself.
"""

from __future__ import annotations

import functools
import http.server
import io
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextchat_core.batch import Sample, collate
from nextchat_core.build import build_model, save_pretrained
from nextchat_core.config import get_preset
from nextchat_core.conversation import Turn, caption_turns, chat_turns, grounding_turns
from nextchat_core.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
LABEL_CONFIGS = REPO / "backend" / "label_configs"

W, H = 96, 64  # the scene, original pixels (not square: frames matter)
BOX1 = (12.0, 8.0, 44.0, 40.0)  # the red circle
BOX2 = (56.0, 20.0, 88.0, 56.0)  # a second shape (blue)
CAPTION = "a red circle"
CHAT_Q = "Is there a red circle?"

CORPUS = [
    "the red circle", "all shapes", "a red circle", "Is there a red circle?", "Yes",
    "a blue square", "Circle", "Shape", "the blue shape", "all cars",
]


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``HxWx3`` uint8 scene and the ``HxW`` bool masks of its two shapes."""
    img = np.full((H, W, 3), 90, dtype=np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    masks = []
    for box, color in ((BOX1, (220, 30, 30)), (BOX2, (30, 60, 220))):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
        m = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
        img[m] = color
        masks.append(m)
    return img, masks[0], masks[1]


def png_bytes(array: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def _train(steps: int = 300) -> tuple[torch.nn.Module, object]:
    config = get_preset("tiny")
    tokenizer = train_bpe_tokenizer(CORPUS * 4, config=config)
    torch.manual_seed(0)
    model = build_model(config)
    img, m1, m2 = scene()
    samples = [
        Sample(img, grounding_turns("the red circle", config, num_boxes=1), [BOX1], [m1]),
        Sample(img, grounding_turns("all shapes", config, num_boxes=2), [BOX1, BOX2], [m1, m2]),
        Sample(img, caption_turns(config, caption=CAPTION), [BOX1], [None]),
        Sample(img, chat_turns(CHAT_Q, config, answer="Yes <at> <boxes> ."), [BOX1], [m1]),
    ]
    batch = collate(samples, tokenizer=tokenizer, config=config, num_image_tokens=model.num_image_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, tokenizer


@functools.cache
def overfit_checkpoint(base: Path) -> Path:
    """A tiny checkpoint that answers the scene: "the red circle" -> BOX1, "all shapes"
    -> BOX1 and BOX2 (with masks), a caption for BOX1 and a grounded chat answer. Trained
    once per test session (~20 s on 2 CPUs) under ``base``."""
    torch.manual_seed(0)
    model, tokenizer = _train()
    return save_pretrained(model, Path(base) / "overfit-tiny", tokenizer)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@contextmanager
def image_server(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on a free port in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def label_config(name: str) -> str:
    return (LABEL_CONFIGS / f"{name}.xml").read_text()
