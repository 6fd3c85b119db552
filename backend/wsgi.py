"""WSGI entry point for running under any server: ``gunicorn 'backend.wsgi:app'``.

Settings come from the environment (see ``backend.settings``). ``nextchat serve`` is the
usual way to start the backend; this module is for deployments that bring their own
gunicorn command line.
"""

from __future__ import annotations

from .app import create_app

app = create_app()
