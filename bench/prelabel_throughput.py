"""Pre-labeling a project on workers (``nextchat prelabel``) against Label Studio's own
"Retrieve predictions" (one ``/predict`` request with every selected task), same tasks,
same model, same machine, one run.

    python bench/prelabel_throughput.py                 # the bundled demo model, CPU, 200 tasks
    python bench/prelabel_throughput.py --tasks 400 --torch-threads 1

It starts everything for real: a Label Studio 1.23.2 server (``.lsenv/``, data in a temp
dir), ``nextchat serve`` (gunicorn) connected to the project as its ML backend, and 1 then
2 ``nextchat worker --queues prelabel`` processes on Redis (``127.0.0.1:6379``). The
images (synthetic shapes, PNG, ``--image-size``) come from a local HTTP server; each task
has a ``prompt`` field. Three projects hold the same tasks:

1. "Retrieve predictions": first the request that action sends (one ``/predict`` with every
   task), posted by the bench without a time limit, which gives the one-request path's
   rate; then the action itself (``POST /api/dm/actions?id=retrieve_tasks_predictions``,
   all tasks selected), which stores the results, or gives up after 100 s and stores
   nothing (the table says which; the bench then waits for the backend to finish the
   abandoned request). The backend is warmed up first.
2. ``POST /prelabel`` on the backend with 1 worker, then with 2 (warmed up on a small
   project first): from the request until the run is done, planning included.

Every process gets ``--torch-threads`` CPU threads. Prints a table with throughput
ratios and the selection size at which one ``/predict`` would hit Label Studio's
``ML_TIMEOUT_PREDICT`` (100 s) at the measured rate. The CPU load of other processes is
printed too: numbers measured on a shared machine say so.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict_throughput import make_images, serve_folder  # noqa: E402

from nextchat_cli.loop_demo import REDIS_URL, Proc, free_port, start_backend  # noqa: E402
from training.versions import DEMO_CHECKPOINT  # noqa: E402

ML_TIMEOUT_PREDICT = 100.0  # Label Studio 1.23: seconds before it gives up on /predict
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Shape"/></RectangleLabels>
</View>"""


class LabelStudio:
    """A Label Studio server in a temp dir, and the few API calls the bench makes."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(20)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LABEL_STUDIO_", "DJANGO_")) and k not in ("USERNAME", "PASSWORD")
        }
        env.update(
            HOME=str(root),
            LABEL_STUDIO_BASE_DATA_DIR=str(root / "data"),
            ML_BLOCK_LOCAL_IP="false",
            USE_DEFAULT_BANNED_SUBNETS="false",
        )
        exe = REPO / ".lsenv" / "bin" / "label-studio"
        if not exe.exists():
            raise SystemExit(f"no Label Studio at {exe}: `make test` installs it into .lsenv/")
        argv = [str(exe), "start", "--no-browser", "--port", str(port)]
        argv += ["--internal-host", "127.0.0.1", "--username", "bench@example.com"]
        argv += ["--password", secrets.token_hex(8), "--user-token", self.token]
        argv += ["--enable-legacy-api-token"]
        self.proc = Proc(argv, env, root / "label-studio.log")
        self.proc.wait_for_url(self.url + "/health", timeout=300)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Token {self.token}"}
        reply = requests.request(method, self.url + path, headers=headers, timeout=900, **kwargs)
        if reply.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {reply.status_code} {reply.text[:300]}")
        return reply

    def project(self, title: str, tasks: list[dict]) -> int:
        body = {"title": title, "label_config": CONFIG}
        project = self.api("POST", "/api/projects", json=body).json()["id"]
        self.api("POST", f"/api/projects/{project}/import", json=tasks)
        return project

    def predictions(self, project: int) -> list[dict]:
        return self.api("GET", f"/api/predictions?project={project}").json()


def wait_run(backend: str, run_id: str, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = requests.get(f"{backend}/prelabel", params={"run": run_id}, timeout=30).json()
        run = run["runs"][0]
        if run["state"] not in ("planning", "running"):
            return run
        time.sleep(0.25)
    raise RuntimeError(f"run {run_id} did not finish within {timeout} s")


def prelabel(backend: str, project: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    reply = requests.post(f"{backend}/prelabel", json={"project": project}, timeout=60)
    reply.raise_for_status()
    run = wait_run(backend, reply.json()["run"]["run_id"])
    return time.perf_counter() - t0, run


def cpu_ticks(sessions: set[int]) -> dict[int, int]:
    """CPU ticks (user + system) of every process outside ``sessions`` (the bench's own
    process trees: each :class:`Proc` is a session) and outside this process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) not in sessions:  # fields[3]: the session id
            out[int(d.name)] = int(fields[11]) + int(fields[12])
    return out


def cores_used_elsewhere(start: dict[int, int], end: dict[int, int], seconds: float) -> float:
    ticks = sum(t - start.get(pid, 0) for pid, t in end.items())
    return ticks / os.sysconf("SC_CLK_TCK") / seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--image-size", default="160x120", help="WxH of the synthetic images")
    parser.add_argument("--prompt", default="all shapes")
    parser.add_argument("--batch-size", type=int, default=8, help="BATCH_SIZE")
    parser.add_argument("--chunk-size", type=int, default=16, help="PRELABEL_CHUNK_SIZE")
    parser.add_argument("--torch-threads", type=int, default=1, help="TORCH_THREADS per process")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nextchat-prelabel-bench-"))
    width, height = (int(v) for v in args.image_size.split("x"))
    (work / "images").mkdir()
    names = make_images(work / "images", args.tasks, (width, height))
    server, images = serve_folder(work / "images")
    tasks = [{"image": f"{images}/{n}", "prompt": args.prompt} for n in names]
    procs: list[Proc] = []
    print(f"work dir {work}; starting Label Studio ...", file=sys.stderr)
    ls = LabelStudio(work / "ls")
    procs.append(ls.proc)
    env = {
        **os.environ,
        "MODEL_DIR": str(work / "models"),
        "NEXTCHAT_CHECKPOINT": str(Path(args.checkpoint).resolve()),
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "BATCH_SIZE": str(args.batch_size),
        "PRELABEL_CHUNK_SIZE": str(args.chunk_size),
        "TORCH_THREADS": str(args.torch_threads),
        "MAX_TASKS": str(max(5000, args.tasks)),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PRELABEL_QUEUE", None)
    rows: list[tuple[str, int, float, float | None, str]] = []
    try:
        backend_proc, backend = start_backend(env, work / "backend.log", timeout=300)
        procs.append(backend_proc)
        sessions = {p.popen.pid for p in procs}
        t_start, others_start = time.monotonic(), cpu_ticks(sessions)

        # 1. Retrieve predictions: Label Studio's action (one /predict with every task, given
        # up after 100 s), and the same request sent by the bench without a time limit.
        project = ls.project("retrieve", tasks)
        body = {"url": backend, "project": project, "title": "nextchat", "is_interactive": False}
        ls.api("POST", "/api/ml", json=body)
        warm = {"tasks": [{"id": 0, "data": tasks[0]}], "label_config": CONFIG}
        requests.post(f"{backend}/predict", json=warm, timeout=300).raise_for_status()
        print("one /predict with every task ...", file=sys.stderr)
        listed = ls.api("GET", f"/api/tasks?project={project}&page_size=100000").json()
        listed = listed["tasks"] if isinstance(listed, dict) else listed
        one = {
            "tasks": [{"id": t["id"], "data": t["data"]} for t in listed],
            "project": f"{project}.0",
            "label_config": CONFIG,
        }
        t0 = time.perf_counter()
        requests.post(f"{backend}/predict", json=one, timeout=None).raise_for_status()
        wall = time.perf_counter() - t0
        rows.append(
            ("one /predict with every task (no time limit)", 1, wall, args.tasks / wall, "")
        )
        print("Retrieve predictions (Label Studio) ...", file=sys.stderr)
        done_before = backend_proc.text().count(f"{args.tasks} task(s)")
        t0 = time.perf_counter()
        ls.api(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        wall = time.perf_counter() - t0
        stored = len(ls.predictions(project))
        if stored == args.tasks:
            rows.append(("Retrieve predictions (Label Studio)", 1, wall, args.tasks / wall, ""))
        else:
            note = f"gave up after {wall:.0f} s, {stored} of {args.tasks} stored"
            rows.append(("Retrieve predictions (Label Studio)", 1, wall, None, note))
            # The backend goes on with the abandoned request: let it finish first.
            deadline = time.monotonic() + 1800
            while backend_proc.text().count(f"{args.tasks} task(s)") <= done_before:
                if time.monotonic() > deadline:
                    raise RuntimeError("the abandoned /predict did not finish within 30 min")
                time.sleep(1.0)

        # 2. nextchat prelabel with 1, then 2 workers (each warmed up on a small project).
        workers: list[Proc] = []
        for n in (1, 2):
            while len(workers) < n:
                argv = [sys.executable, "-m", "nextchat_cli", "worker", "--queues", "prelabel"]
                argv += ["--hostname", f"bench{len(workers)}-{uuid.uuid4().hex[:4]}@%h"]
                w = Proc(argv, env, work / f"worker{len(workers)}.log")
                procs.append(w)
                sessions.add(w.popen.pid)
                workers.append(w)
                w.wait_for_log("ready.", timeout=300)
            warmup = ls.project(f"warm-up {n}", tasks[: 2 * n * args.chunk_size])
            prelabel(backend, warmup)
            print(f"prelabel, {n} worker(s) ...", file=sys.stderr)
            project = ls.project(f"prelabel {n}", tasks)
            wall, run = prelabel(backend, project)
            if (run["state"], run["done"]) != ("done", args.tasks):
                raise RuntimeError(f"the run did not pre-label every task: {run}")
            if len(ls.predictions(project)) != args.tasks:
                raise RuntimeError("Label Studio does not hold one prediction per task")
            rows.append((f"nextchat prelabel, {n} worker(s)", n, wall, args.tasks / wall, ""))
        others = cores_used_elsewhere(others_start, cpu_ticks(sessions), time.monotonic() - t_start)
    finally:
        for p in reversed(procs):
            p.stop()
        server.shutdown()

    base = rows[0][3]
    assert base is not None
    print(
        f"\n{args.tasks} tasks, {width}x{height} PNGs over HTTP, prompt {args.prompt!r}, "
        f"checkpoint {Path(args.checkpoint).name}, CPU, TORCH_THREADS {args.torch_threads} "
        f"per process, BATCH_SIZE {args.batch_size}, chunk {args.chunk_size}\n"
    )
    action = rows[1][3]  # None when Label Studio gave up
    print("| path | processes | wall s | tasks/s | vs one /predict | vs Retrieve predictions |")
    print("|---|---|---|---|---|---|")
    for name, n, wall, rate, note in rows:
        if rate is None:
            cells = f"- ({note}) | - | -"
        else:
            vs_action = f"{rate / action:.2f}x" if action else "- (it gave up)"
            cells = f"{rate:.2f} | {rate / base:.2f}x | {vs_action}"
        print(f"| {name} | {n} | {wall:.1f} | {cells} |")
    one_worker, two_workers = rows[-2][3], rows[-1][3]
    assert one_worker and two_workers
    print(f"\n2 workers / 1 worker: {two_workers / one_worker:.2f}x (linear: 2.00x)")
    print(
        f"one /predict at {base:.2f} tasks/s reaches Label Studio's ML_TIMEOUT_PREDICT "
        f"({ML_TIMEOUT_PREDICT:.0f} s) at about {int(base * ML_TIMEOUT_PREDICT)} selected tasks; "
        "pre-labeling on workers has no such limit (each chunk is its own job)"
    )
    shared = others > 0.1
    print(
        f"CPU: {os.cpu_count()} cores; other processes used {others:.2f} cores on average "
        "while this ran" + (": numbers measured under sharing" if shared else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
