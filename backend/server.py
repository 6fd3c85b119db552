"""gunicorn, driven from Python: ``GunicornServer(options).run()`` (``nextchat serve``)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class GunicornServer(BaseApplication):
    """Runs ``backend.app.create_app()`` in every worker. No ``preload_app``: each worker
    process loads its own weights after the fork (CUDA cannot be forked)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from .app import create_app

        return create_app()
