"""Interactive ``/predict`` latency (one task, a typed prompt, as Label Studio's
Auto-Annotation sends it) of a real ``nextchat serve`` process, with the region confidence's
presence pass (``SCORE_PRESENCE=exists``, the default for the demo and released presets)
and without it (``SCORE_PRESENCE=at``).

    python bench/interactive_latency.py                        # bundled model, 30 requests each
    python bench/interactive_latency.py --checkpoint DIR --requests 50 --config boxes

Two backends on the same checkpoint, asked in turn (at, exists, at, exists, ...), so a
busy machine slows both alike; images are fresh demo-domain scenes served over local HTTP
(each task a new image: the image download and encoding are in the time, as in the
editor). The config is a shipped one (default ``boxes_masks``: a box and a mask per
object). Prints p50 / p95 per mode and the ratio; asserts nothing. Run it under the CPU
load you want to report (say which).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from predict_throughput import serve_folder  # bench/, beside this script

    from nextchat_cli.loop_demo import start_backend
    from training import synth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled demo model")
    ap.add_argument("--requests", type=int, default=30, help="timed requests per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--config", default="boxes_masks", help="a label_configs/ file name")
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args(argv)

    config = (REPO / "label_configs" / f"{args.config}.xml").read_text()
    n = args.requests + args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = []
        cfg = synth.SynthConfig(task_mix={"rec": 1.0}, records_per_scene=1)
        for scene, (record,) in synth.generate(args.seed, n, cfg):
            Image.fromarray(scene.image).save(root / f"{scene.scene_id}.png")
            prompts.append((f"{scene.scene_id}.png", record["expression"]))
        server, images = serve_folder(root)
        env = {**os.environ, "WORKERS": "1"}
        backends = {}
        try:
            for mode in ("at", "exists"):
                proc, url = start_backend(
                    {**env, "SCORE_PRESENCE": mode, "MODEL_DIR": str(root / f"md-{mode}")},
                    root / f"{mode}.log",
                    checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                )
                backends[mode] = (proc, url)
            times: dict[str, list[float]] = {"at": [], "exists": []}
            for i, (name, prompt) in enumerate(prompts):
                for mode, (_, url) in backends.items():
                    body = {
                        "tasks": [{"id": i + 1, "data": {"image": f"{images}/{name}"}}],
                        "project": "1.1",
                        "label_config": config,
                        "params": {"context": _typed(prompt)},
                    }
                    t0 = time.perf_counter()
                    reply = requests.post(url + "/predict", json=body, timeout=120)
                    elapsed = time.perf_counter() - t0
                    reply.raise_for_status()
                    if i >= args.warmup:
                        times[mode].append(elapsed)
        finally:
            for proc, _ in backends.values():
                proc.stop()
            server.shutdown()
    p50 = {m: statistics.median(t) * 1000 for m, t in times.items()}
    p95 = {m: statistics.quantiles(t, n=20)[-1] * 1000 for m, t in times.items()}
    print(f"{args.requests} interactive /predict requests per mode ({args.config}), CPU")
    print("\n| scoring | p50 ms | p95 ms |")
    print("|---|---|---|")
    print(f"| `SCORE_PRESENCE=at` (no presence pass) | {p50['at']:.0f} | {p95['at']:.0f} |")
    print(f"| `SCORE_PRESENCE=exists` (default) | {p50['exists']:.0f} | {p95['exists']:.0f} |")
    print(f"| ratio | {p50['exists'] / p50['at']:.2f}x | {p95['exists'] / p95['at']:.2f}x |")
    return 0


def _typed(prompt: str) -> dict:
    return {
        "result": [
            {
                "from_name": "prompt",
                "to_name": "image",
                "type": "textarea",
                "value": {"text": [prompt]},
            }
        ]
    }


if __name__ == "__main__":
    sys.exit(main())
