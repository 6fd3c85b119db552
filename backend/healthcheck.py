"""Container health check: ``python -m backend.healthcheck`` exits 0 when ``/health`` of
the local backend answers ``UP`` (with the basic-auth credentials from the environment).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "9090")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            status = json.load(reply).get("status")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if status == "UP" else 1


if __name__ == "__main__":
    sys.exit(main())
