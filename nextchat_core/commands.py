"""Core ``nextchat`` subcommands (model inspection and prediction)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: ARG001 - filled in below
    pass
