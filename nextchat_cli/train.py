"""``nextchat train``: run one NExT-Chat training stage from a config file."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run a training stage (0: small-model pre-training, 1, 2: boxes + chat, 3: masks)",
        description=(
            "Train NExT-Chat through one stage from a JSON/YAML config (data sources, "
            "init checkpoint or preset, steps, learning rates, LoRA, precision). Reruns resume "
            "from the newest checkpoint in output_dir. Multi-GPU: `accelerate launch -m "
            "nextchat_cli train ...`."
        ),
    )
    p.add_argument("--config", required=True, help="train config file (.json or .yaml)")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="override the config's stage")
    p.add_argument("--steps", type=int, help="override the number of optimizer steps")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--init", help="override init (preset name or checkpoint directory)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from training.trainer import TrainConfig, train

    config = TrainConfig.load(args.config)
    for field in ("stage", "steps", "output_dir", "init"):
        value = getattr(args, field)
        if value is not None:
            setattr(config, field, value)
    config.validate()
    result = train(config)
    print(
        json.dumps(
            {"final": str(result.final_dir), "steps": result.steps, "metrics": result.metrics},
            indent=2,
            default=str,
        )
    )
    return 0
