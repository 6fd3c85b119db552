"""Shared pieces of the backend tests: a tiny model overfit to one scene (real weights
that emit real ``<at> <boxes>``), an HTTP image server, task JSON and the label configs.

Imported by ``test_backend*.py``; it holds no tests itself.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextchat_core.batch import Sample, collate
from nextchat_core.build import build_model, from_pretrained, save_pretrained
from nextchat_core.config import get_preset
from nextchat_core.conversation import caption_turns, chat_turns, grounding_turns
from nextchat_core.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
LABEL_CONFIGS = REPO / "label_configs"

W, H = 96, 64  # the scene, original pixels (not square: frames matter)
BOX1 = (12.0, 8.0, 44.0, 40.0)  # the red circle
BOX2 = (56.0, 20.0, 88.0, 56.0)  # a second shape (blue)
CAPTION = "a red circle"
CHAT_Q = "Is there a red circle?"

CORPUS = [
    "the red circle",
    "all shapes",
    "a red circle",
    "Is there a red circle?",
    "Yes",
    "a blue square",
    "Circle",
    "Shape",
    "the blue shape",
    "all cars",
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


def _train(max_steps: int = 300) -> tuple[torch.nn.Module, object]:
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
    batch = collate(
        samples, tokenizer=tokenizer, config=config, num_image_tokens=model.num_image_tokens
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_steps)
    model.train()
    # One thread: on a small machine whose other core is busy, two torch threads spin at
    # every op's barrier (measured 20-30x slower on 2 cores, see the backend's TORCH_THREADS).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(model, batch, opt, sched, max_steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tokenizer


def _fit(model, batch, opt, sched, max_steps: int) -> None:
    for _ in range(max_steps):
        out = model(**batch)
        # Memorized: text, boxes and masks (measured: 182 steps from this seed).
        if out.lm_loss < 0.05 and out.giou_loss < 0.05 and out.dice_loss < 0.06:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()


# nextchat_core files that play no part in building, training or saving the model: editing
# them does not invalidate the cached checkpoint.
_NOT_IN_TRAINING = frozenset({"predictor.py"})


@functools.cache
def overfit_checkpoint(base: Path) -> Path:
    """A tiny checkpoint that answers the scene: "the red circle" -> BOX1, "all shapes"
    -> BOX1 and BOX2 (with masks), a caption for BOX1 and a grounded chat answer.

    Training takes ~180 steps (30-60 s on 2 CPUs), so the result is kept in
    ``.pytest_cache/nextchat-overfit/<key>/`` where the key hashes this file, the
    ``nextchat_core`` sources that build / train / save models and the torch version: any
    change there retrains. A
    cached checkpoint that fails to load is retrained too. ``base`` is unused when cached.
    """
    h = hashlib.sha1(torch.__version__.encode())
    for f in [Path(__file__), *sorted((REPO / "nextchat_core").rglob("*.py"))]:
        if f.name not in _NOT_IN_TRAINING:
            h.update(f.read_bytes())
    cached = REPO / ".pytest_cache" / "nextchat-overfit" / h.hexdigest()[:16] / "overfit-tiny"
    if cached.is_dir():
        try:
            from_pretrained(cached)
            return cached
        except (OSError, ValueError) as exc:
            shutil.rmtree(cached, ignore_errors=True)
            print(f"retraining the overfit test model: cached copy unusable ({exc})")
    model, tokenizer = _train()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        return save_pretrained(model, cached, tokenizer)
    except OSError:  # a read-only checkout: keep it for this session only
        return save_pretrained(model, Path(base) / "overfit-tiny", tokenizer)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus two Label Studio look-alikes: ``/private/...`` answers 401, and
    ``/data/upload/...`` / ``/storage-data/uploaded/?filepath=upload/...`` need
    ``Authorization: Token <token>`` (the file is looked up by its name under the root)."""

    token = "unset"

    def do_GET(self) -> None:
        if self.path.startswith("/private/"):
            self.send_error(401, "Unauthorized")
            return
        if self.path.startswith("/slow/"):  # a slow image host: answers after 1.5 s
            time.sleep(1.5)
            self.path = self.path[len("/slow") :]
        if self.path.startswith(("/data/upload/", "/storage-data/uploaded/")):
            if self.headers.get("Authorization") != f"Token {self.token}":
                self.send_error(401, "Unauthorized")
                return
            self.path = "/" + self.path.split("?")[-1].rsplit("/", 1)[-1]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def image_server(root: Path, token: str = "unset") -> Iterator[str]:
    """Serve ``root`` over HTTP on a free port in a thread (see ``_Handler``); yields the
    base URL."""
    handler_cls = type("Handler", (_Handler,), {"token": token})
    handler = functools.partial(handler_cls, directory=str(root))
    # A listen backlog above the backend's FETCH_WORKERS (socketserver's default is 5).
    server_cls = type("Server", (socketserver.ThreadingTCPServer,), {"request_queue_size": 128})
    server = server_cls(("127.0.0.1", 0), handler)
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
