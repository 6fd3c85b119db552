"""Do ``/webhook`` and ``/health`` answer fast while ``/predict`` keeps the model busy?

    python bench/light_routes.py                      # bundled demo model, 16 predict clients
    python bench/light_routes.py --clients 32 --webhooks 400

Starts two real ``nextchat serve`` (gunicorn) processes in turn on the bundled model, each
with THREADS=8: the baseline lets ``/predict`` take every thread (``PREDICT_SLOTS=8``, what
the server did before admission control), the other keeps the default (``THREADS - 2``:
``/predict`` beyond that is answered 503 + Retry-After at once). For each, ``--clients``
threads post ``/predict`` in a loop (one task each, a real image over HTTP; a 503 is retried
after its Retry-After) while ``--webhooks`` ANNOTATION_CREATED webhooks and as many ``/health``
calls are sent one after the other. Prints p50 / p95 / p100 latency of each light route, the
predictions served per second and the ratio to the baseline. Label Studio gives a webhook
1 s and ``/health`` 1 s. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict_throughput import make_images, serve_folder  # noqa: E402

from nextchat_cli.loop_demo import start_backend  # noqa: E402

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="shape"/></RectangleLabels>'
    "</View>"
)


def run(slots: int, args: argparse.Namespace, images: list[str], tmp: Path) -> dict:
    env = {
        **__import__("os").environ,
        "MODEL_DIR": str(tmp / f"md-{slots}"),
        "THREADS": "8",
        "PREDICT_SLOTS": str(slots),
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",  # jobs stay recorded, never enqueued
        "RETRAIN_EVERY": "0",
    }
    proc, url = start_backend(env, tmp / f"backend-{slots}.log", timeout=300)
    stop = threading.Event()
    served, busy = [0], [0]

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while not stop.is_set():
            task = {"id": i, "data": {"image": images[i % len(images)], "prompt": "the shape"}}
            r = session.post(
                url + "/predict", json={"tasks": [task], "label_config": CONFIG}, timeout=120
            )
            if r.status_code == 503:
                busy[0] += 1
                time.sleep(float(r.headers.get("Retry-After", 1)))
                continue
            served[0] += r.ok
            i += args.clients

    try:
        threads = [
            threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(3)  # let the clients fill the server
        hook, health = [], []
        t0 = time.perf_counter()
        for n in range(args.webhooks):
            body = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "task": {"id": n, "data": {"image": images[0]}},
                "annotation": {"id": n, "result": []},
            }
            s = time.perf_counter()
            requests.post(url + "/webhook", data=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})  # fmt: skip
            hook.append(time.perf_counter() - s)
            s = time.perf_counter()
            requests.get(url + "/health", timeout=60)
            health.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(timeout=180)
    finally:
        proc.stop()
    return {"hook": hook, "health": health, "rate": served[0] / wall, "busy": busy[0]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--webhooks", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "img").mkdir()
        names = make_images(tmp / "img", 16, (320, 240))
        server, base = serve_folder(tmp / "img")
        images = [f"{base}/{n}" for n in names]
        rows = {}
        for name, slots in (
            ("baseline: /predict may hold all 8 threads", 8),
            ("default: 6 slots", 6),
        ):
            rows[name] = run(slots, args, images, tmp)
        server.shutdown()
    base = rows["baseline: /predict may hold all 8 threads"]
    print(
        f"\n{args.clients} predicting clients, {args.webhooks} webhooks + /health calls, THREADS=8\n"
    )
    print("| setting | webhook p50 / p95 / p100 s | /health p50 / p100 s | predictions/s | 503s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {statistics.median(r['hook']):.3f} / {pct(r['hook'], 0.95):.3f} / "
            f"{max(r['hook']):.3f} | {statistics.median(r['health']):.3f} / {max(r['health']):.3f} "
            f"| {r['rate']:.2f} | {r['busy']} |"
        )
    new = rows["default: 6 slots"]
    print(
        f"\nwebhook p100 ratio (default / baseline): {max(new['hook']) / max(base['hook']):.2f}; "
        f"predictions/s ratio: {new['rate'] / max(base['rate'], 1e-9):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
