"""``nextchat serve``: the Label Studio ML backend under gunicorn (a real WSGI server).

Workers and threads come from ``WORKERS`` / ``THREADS`` (default 1 x 4): every worker
process loads the weights once, so one worker per device is the usual choice; its
threads keep ``/health`` and ``/webhook`` answering while a ``/predict`` runs.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the Label Studio ML backend (gunicorn) on a checkpoint",
        description=(
            "Serve the Label Studio ML backend protocol (/health, /setup, /predict, /webhook, "
            "/metrics, /versions) under gunicorn. Settings come from the environment "
            "(NEXTCHAT_CHECKPOINT, NEXTCHAT_DEVICE, MODEL_DIR, LABEL_STUDIO_URL, "
            "LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/BASIC_AUTH_PASS, WORKERS, THREADS, ...; "
            "see the README); the options below override them."
        ),
    )
    p.add_argument(
        "--host",
        default=os.environ.get("HOST", "0.0.0.0"),
        help="address to bind (default: $HOST or 0.0.0.0)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT", 9090)),
        help="port to listen on (default: $PORT or 9090)",
    )
    p.add_argument(
        "--checkpoint",
        help="base checkpoint directory (default: $NEXTCHAT_CHECKPOINT or the bundled demo model)",
    )
    p.add_argument("--device", help="cpu or cuda (default: $NEXTCHAT_DEVICE or cpu)")
    p.add_argument(
        "--model-dir",
        help="where versions, project state and webhook events live (default: $MODEL_DIR)",
    )
    p.add_argument("--workers", type=int, help="gunicorn worker processes (default: $WORKERS or 1)")
    p.add_argument("--threads", type=int, help="threads per worker (default: $THREADS or 4)")
    p.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from backend.settings import Settings
    from training.versions import resolve_checkpoint

    # Options become environment variables so that every gunicorn worker, which builds
    # its app from the environment, sees the same settings.
    if args.checkpoint:
        os.environ["NEXTCHAT_CHECKPOINT"] = str(resolve_checkpoint(args.checkpoint).resolve())
    for flag, var in (
        ("device", "NEXTCHAT_DEVICE"),
        ("model_dir", "MODEL_DIR"),
        ("workers", "WORKERS"),
        ("threads", "THREADS"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[var] = str(value)
    settings = Settings.from_env()  # fail fast on a bad setting, before forking
    resolve_checkpoint(settings.checkpoint)  # and on a missing model
    logging.getLogger().setLevel(args.log_level.upper())
    options = {
        "bind": f"{args.host}:{args.port}",
        "workers": settings.workers,
        "threads": settings.threads,
        "worker_class": "gthread",
        "timeout": settings.timeout,
        "graceful_timeout": 10,
        "loglevel": args.log_level,
        "accesslog": "-",
        # Keep the access log free of secrets: no query strings, no headers.
        "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss',
        "errorlog": "-",
        "limit_request_line": 8190,
        # gunicorn 27's control socket lives at one fixed path per user: two backends on
        # one machine would fight over it, and nothing here uses it.
        "control_socket_disable": True,
    }
    logger.info(
        "serving on %s with %d worker(s) x %d thread(s); checkpoint %s; MODEL_DIR %s",
        options["bind"],
        settings.workers,
        settings.threads,
        settings.checkpoint or "(bundled demo)",
        settings.model_dir,
    )
    from backend.server import GunicornServer

    GunicornServer(options).run()
    return 0
