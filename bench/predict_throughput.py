"""The Label Studio backend's cost over the bare model: the same tasks through
``NextChatPredictor.predict_batch`` and through ``POST /predict`` of a real ``nextchat
serve`` (gunicorn) process, for 1, 8 and 64 tasks per request.

    python bench/predict_throughput.py                       # the bundled demo model, CPU
    python bench/predict_throughput.py --checkpoint DIR --device cuda
    python bench/predict_throughput.py --random-preset demo  # no trained model at hand

Both paths run in turn on the same machine (bare, HTTP, bare, HTTP, ...; medians), so a
busy machine slows both alike. Tasks: PNG images (synthetic shapes, --image-size) served by a local HTTP server, each
with a ``prompt`` field, predicted with a label config (default: boxes + masks). The bare
path loads the same files with ``load_image`` and runs the same queries in the same
chunks (BATCH_SIZE tasks per model call); the HTTP path adds JSON, image download,
result building (RLE, percent frames) and gunicorn. Prints a table; asserts nothing.
``--random-preset`` saves randomly initialized weights of a preset: they answer arbitrary
text (generation runs to MAX_NEW_TOKENS), so only the overhead ratio means anything then.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nextchat_cli.loop_demo import start_backend  # noqa: E402
from nextchat_core.image_processing import load_image  # noqa: E402
from nextchat_core.predictor import NextChatPredictor, Query  # noqa: E402
from training.versions import DEMO_CHECKPOINT  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(60, 200, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
            w, h = rng.integers(20, 80, 2)
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                [x, y, x + w, y + h], fill=color
            )
        name = f"img{i:03d}.png"
        img.save(folder / name)
        names.append(name)
    return names


def serve_folder(folder: Path) -> tuple[socketserver.TCPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingTCPServer):
        request_queue_size = 256  # the backend downloads FETCH_WORKERS images at once

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn master + workers)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint directory (default: the bundled demo model)"
    )
    parser.add_argument("--random-preset", help="save random weights of this preset and bench them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="1,8,64", help="tasks per request (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per size")
    parser.add_argument("--image-size", default="320x240", help="WxH of the synthetic images")
    parser.add_argument("--config", default="boxes_masks", help="label config from label_configs/")
    parser.add_argument("--prompt", default="all shapes")
    parser.add_argument("--batch-size", type=int, default=8, help="BATCH_SIZE of the backend")
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="MAX_NEW_TOKENS of the backend"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads of both paths (TORCH_THREADS of the backend); 0: torch's default",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nextchat-bench-"))
    if args.random_preset:
        import torch

        from nextchat_core.build import build_model, save_pretrained
        from nextchat_core.config import get_preset
        from nextchat_core.tokenizer import train_bpe_tokenizer

        config = get_preset(args.random_preset)
        torch.manual_seed(0)
        tokenizer = train_bpe_tokenizer(
            ["all shapes", "the red circle", "a blue square"] * 8, config=config
        )
        checkpoint = save_pretrained(
            build_model(config), work / f"random-{args.random_preset}", tokenizer
        )
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else DEMO_CHECKPOINT
        if not checkpoint.is_dir():
            parser.error(
                f"no checkpoint at {checkpoint}: pass --checkpoint DIR, --random-preset demo, "
                "or train the bundled demo (make demo-model)"
            )

    sizes = [int(s) for s in args.sizes.split(",")]
    width, height = (int(v) for v in args.image_size.split("x"))
    names = make_images(work, max(sizes), (width, height))
    image_server, base_url = serve_folder(work)
    xml = (REPO / "label_configs" / f"{args.config}.xml").read_text()
    with_masks = "Brush" in xml or "Polygon" in xml

    # ---- bare predictor: same files, same prompts, same chunking as the backend
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    predictor = NextChatPredictor.from_pretrained(
        checkpoint, device=args.device, max_new_tokens=args.max_new_tokens
    )

    def bare(n: int) -> None:
        for start in range(0, n, args.batch_size):
            chunk = names[start : min(n, start + args.batch_size)]
            images = [load_image(work / name) for name in chunk]
            queries = [Query(i, args.prompt) for i in range(len(chunk))]
            predictor.predict_batch(
                images, queries, with_masks=with_masks, batch_size=args.batch_size
            )

    bare(1)  # warm-up

    # ---- the real server
    env = {
        **os.environ,
        "MODEL_DIR": str(work / "models"),
        "BATCH_SIZE": str(args.batch_size),
        "MAX_NEW_TOKENS": str(args.max_new_tokens),
        "TORCH_THREADS": str(args.torch_threads),
        "NEXTCHAT_DEVICE": args.device,
    }
    try:  # waits until the weights are loaded (/health lists them)
        server, url = start_backend(
            env,
            work / "server.log",
            checkpoint=checkpoint,
            extra=["--log-level", "warning"],
            ready=lambda r: bool(r.json().get("loaded")),
        )
    except AssertionError as exc:
        print(exc)
        return 1
    proc = server.popen
    try:
        rss_idle = rss_mib(proc.pid)

        def http(n: int) -> None:
            tasks = [
                {"id": i + 1, "data": {"image": f"{base_url}/{names[i]}", "prompt": args.prompt}}
                for i in range(n)
            ]
            reply = requests.post(
                f"{url}/predict",
                json={
                    "tasks": tasks,
                    "label_config": xml,
                    "project": "1.1",
                    "params": {"context": None},
                },
                timeout=3600,
            )
            reply.raise_for_status()
            body = reply.json()
            if len(body["results"]) != n or body.get("errors"):
                raise RuntimeError(
                    f"{n} tasks: {len(body.get('errors', []))} failed, first: "
                    f"{(body.get('errors') or [{}])[0].get('detail')}"
                )

        http(1)  # warm-up
        # Interleaved (bare, HTTP, bare, HTTP, ...) so both paths see the same machine load.
        bare_s, http_s = {}, {}
        for n in sizes:
            runs: dict[str, list[float]] = {"bare": [], "http": []}
            for _ in range(args.repeats):
                runs["bare"].append(timed(lambda n=n: bare(n), 1))
                runs["http"].append(timed(lambda n=n: http(n), 1))
            bare_s[n], http_s[n] = statistics.median(runs["bare"]), statistics.median(runs["http"])
        rss_peak = rss_mib(proc.pid)
        regions = sum(
            len(r["result"])
            for r in requests.post(
                f"{url}/predict",
                timeout=3600,
                json={
                    "tasks": [
                        {
                            "id": 1,
                            "data": {"image": f"{base_url}/{names[0]}", "prompt": args.prompt},
                        }
                    ],
                    "label_config": xml,
                },
            ).json()["results"]
        )
    finally:
        server.stop()
        image_server.shutdown()

    print(
        f"\ncheckpoint {checkpoint} on {args.device}; {args.config} config; prompt {args.prompt!r}; "
        f"{width}x{height} PNGs over HTTP; BATCH_SIZE {args.batch_size}; "
        f"torch threads {args.torch_threads or 'default'}; median of {args.repeats}; "
        f"{regions} region(s) per task"
    )
    print(
        "\n| tasks / request | bare predictor | HTTP /predict | overhead (HTTP / bare) | tasks/s (HTTP) |"
    )
    print("|---|---|---|---|---|")
    for n in sizes:
        print(
            f"| {n} | {bare_s[n]:.3f} s | {http_s[n]:.3f} s | {http_s[n] / bare_s[n]:.3f} | {n / http_s[n]:.2f} |"
        )
    print(
        f"\nserver RSS (gunicorn master + 1 worker): {rss_idle:.0f} MiB after loading, "
        f"{rss_peak:.0f} MiB after the runs"
    )
    print(json.dumps({"bare_s": bare_s, "http_s": http_s, "rss_mib": [rss_idle, rss_peak]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
