"""What the demo LLM's image tokens carry (issue 15, region captions): a linear probe of each
LLM layer's output at the image tokens for the colour and the shape of the object each
token's cell describes (``training.demo.cell_targets``), on caption prompts of fresh
training-renderer scenes. If the probe reads them and the captions do not name them, the
information is there and the answer does not read it.

    python bench/llm_cell_probe.py                         # the bundled model, 240 scenes
    python bench/llm_cell_probe.py --checkpoint DIR --scenes 480

Per layer: accuracy on the held-out 30 % of the object cells (a cell with no object is
class "background" in training, left out of the score). Multinomial logistic regression on
standardized states, 300 Adam steps; a probe is a lower bound of what is there. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def probe(x: torch.Tensor, y: torch.Tensor, scored: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier fitted on the first 70 % of ``x``."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    n = int(len(x) * 0.7)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(x[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        pred = lin(x[n:]).argmax(-1)
    keep = scored[n:]
    return float((pred[keep] == y[n:][keep]).float().mean())


def main(argv: list[str] | None = None) -> int:
    from nextchat_core.batch import collate
    from nextchat_core.build import from_pretrained
    from training import demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(REPO / "models" / "demo"))
    ap.add_argument("--scenes", type=int, default=240)
    args = ap.parse_args(argv)
    ckpt = from_pretrained(args.checkpoint)
    model, mcfg = ckpt.model.eval(), ckpt.model.config
    scfg = demo.training_synth_config(task_mix={"caption": 1.0}, records_per_scene=1)
    stream = demo.SynthStream(mcfg, seed=777, n=args.scenes, synth_config=scfg, grid=8)
    layers = model.language_model.model.layers
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(
            lambda _m, _i, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    states: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    colors, shapes = [], []
    for lo in range(0, args.scenes, 16):
        samples = [stream[i] for i in range(lo, min(lo + 16, args.scenes))]
        batch = collate(
            samples, tokenizer=ckpt.tokenizer, config=mcfg, num_image_tokens=model.num_image_tokens
        )
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if not k.startswith("aux_")})
        patches = batch["input_ids"] == mcfg.tokens.im_patch_id
        for i in states:
            states[i].append(seen[i][patches].float())
        colors.append(batch["aux_color"].reshape(-1))
        shapes.append(batch["aux_shape"].reshape(-1))
    color, shape = torch.cat(colors), torch.cat(shapes)
    scored = color < demo.N_COLORS
    print(f"{args.checkpoint}: {int(scored.sum())} object cells of {len(color)}")
    print("| LLM layer output | colour | shape |")
    print("|---|---|---|")
    for i, parts in states.items():
        x = torch.cat(parts)
        print(f"| {i} | {probe(x, color, scored):.3f} | {probe(x, shape, scored):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
