"""The model versions' commands: ``nextchat versions``, ``promote``, ``rollback`` (on
``MODEL_DIR``'s registry, :mod:`training.versions`; ``--model-dir`` wins)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from nextchat_cli.loop import add_model_dir_command

    p = add_model_dir_command(
        sub, "versions", "list model versions (the served one marked with *)", _versions
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add_model_dir_command(sub, "promote", "serve VERSION from the next request on", _promote)
    p.add_argument("version")
    add_model_dir_command(
        sub, "rollback", "serve the version promoted before the current one", _rollback
    )


def _versions(args: argparse.Namespace) -> int:
    from nextchat_cli.loop import settings_for
    from training import versions

    settings = settings_for(args)
    current = versions.read_current_version(settings.model_dir)
    listed = versions.list_versions(settings.model_dir)
    if args.json:
        print(json.dumps({"current": current, "versions": listed}, indent=2, default=str))
        return 0
    if current is None:
        print("* base checkpoint (nothing promoted)")
    for v in listed:
        mark = "*" if v["name"] == current else " "
        new = v.get("eval_new") or {}
        acc = f"held-out Acc@0.5 {new['rec_acc']:.3f}" if "rec_acc" in new else ""
        print(f"{mark} {v['name']}  {acc}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from nextchat_cli.loop import settings_for
    from training import versions

    settings = settings_for(args)
    versions.promote(settings.model_dir, args.version, reason="nextchat promote")
    print(f"serving {args.version} from the next request on")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from nextchat_cli.loop import settings_for
    from training import versions

    settings = settings_for(args)
    target = versions.rollback(settings.model_dir)
    print(f"serving {target or 'the base checkpoint'} from the next request on")
    return 0
