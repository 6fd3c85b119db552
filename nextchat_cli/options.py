"""Command-line options several ``nextchat`` commands share (one definition each)."""

from __future__ import annotations

import argparse
import os


def add_label_studio_options(p: argparse.ArgumentParser) -> None:
    """``--url`` / ``--api-key``: where Label Studio is and the token to call it with
    (defaults ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``, as the backend reads them)."""
    p.add_argument(
        "--url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio URL (default: $LABEL_STUDIO_URL)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="Label Studio API key: Account & Settings -> Access Token "
        "(default: $LABEL_STUDIO_API_KEY)",
    )
