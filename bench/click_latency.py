"""Milliseconds per click of click refinement (backend/refine.py) with the bundled model.

    python bench/click_latency.py                    # 5 images x 6 clicks, TORCH_THREADS=1
    python bench/click_latency.py --images 10 --clicks 8 --size 1024 768

Through the real backend app (Flask, in this process; the images over a local HTTP
server), as the editor sends them: on each image a first click (the image is fetched and
its SAM embedding computed), then ``--clicks - 1`` more points (alternately negative and
positive, each request carrying all the points so far, as the editor does), then a box.
The baseline is the first click; the ratio column is each row's median against it. Core
rows split the first click: the SAM image embedding alone and one mask decode alone.
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
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict_throughput import make_images, serve_folder  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.model_cache import ModelCache  # noqa: E402
from backend.settings import Settings  # noqa: E402

CONFIG = (REPO / "label_configs" / "click_masks.xml").read_text()


def keypoint(x: float, y: float, positive: bool) -> dict:
    return {
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Car"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=6, help="points per image (>= 2)")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    ap.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the backend")
    args = ap.parse_args(argv)
    if args.clicks < 2:
        ap.error("--clicks must be at least 2 (a first click and a cached one)")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_images(folder, args.images + 1, tuple(args.size))
        server, url = serve_folder(folder)
        settings = Settings.from_env(
            {"TORCH_THREADS": str(args.threads)}, model_dir=folder / "model_dir"
        )
        store = ModelCache(settings)
        version, predictor = store.get()  # load outside the timings
        client = create_app(settings, store=store, preload=False).test_client()
        refiner = client.application.extensions["nextchat_backend"].refiner

        def click(name: str, context: list[dict]) -> float:
            body = {
                "tasks": [{"id": 1, "data": {"image": f"{url}/{name}"}}],
                "project": "1.1700000000",
                "label_config": CONFIG,
                "params": {"context": {"result": context}},
            }
            t0 = time.perf_counter()
            reply = client.post("/predict", json=body)
            ms = (time.perf_counter() - t0) * 1e3
            if reply.status_code != 200:
                raise RuntimeError(f"/predict answered {reply.status_code}: {reply.get_json()}")
            return ms

        click(names[-1], [keypoint(50, 50, True)])  # warm-up: first-call allocations
        first, later, boxes = [], [], []
        for name in names[:-1]:
            points: list[dict] = []
            for k in range(args.clicks):
                x, y = rng.uniform(10, 90, 2)
                points.append(keypoint(float(x), float(y), k % 2 == 0))
                (first if k == 0 else later).append(click(name, list(points)))
            rect = {
                "from_name": "box",
                "to_name": "image",
                "type": "rectanglelabels",
                "value": {"x": 20, "y": 20, "width": 40, "height": 30, "rectanglelabels": ["Car"]},
            }
            boxes.append(click(name, [*points, rect]))
        misses, hits = refiner.cache.misses, refiner.cache.hits

        image = Image.open(folder / names[0]).convert("RGB")
        embed, decode = [], []
        for _ in range(args.images):
            t0 = time.perf_counter()
            sam = predictor.sam_image(image)
            embed.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            predictor.segment(sam, points=[[100.0, 100.0], [300.0, 200.0]], point_labels=[1, 0])
            decode.append((time.perf_counter() - t0) * 1e3)
        server.shutdown()

    base = statistics.median(first)
    rows = [
        ("first click on an image (fetch + SAM embedding + mask)", first),
        (f"later clicks, 2-{args.clicks} points (embedding cached)", later),
        ("box + points (embedding cached)", boxes),
        ("core: SAM image embedding alone", embed),
        ("core: one mask decode alone (2 points)", decode),
    ]
    print(
        f"\nclick refinement, model {version.name}, {args.size[0]}x{args.size[1]} images, "
        f"SAM {predictor.config.sam.image_size}px, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); embedding cache {misses} miss / {hits} hit"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}} | {'n':>3} | {'median ms':>9} | {'p90 ms':>7} | vs first click")
    print("-" * (width + 44))
    for label, values in rows:
        med = statistics.median(values)
        p90 = float(np.percentile(values, 90))
        print(f"{label:{width}} | {len(values):>3} | {med:9.1f} | {p90:7.1f} | {med / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
