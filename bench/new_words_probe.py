"""Can the frozen vision tower tell the new words apart? A linear probe per object.

    python bench/new_words_probe.py                      # bundled model, 400 + 150 scenes
    python bench/new_words_probe.py --train 40 --test 20 # smoke run

Retraining on corrections trains the projector, the LLM and the box decoder, never the
tower (it stays frozen, as CLIP does in NExT-Chat). If the tower's features do not
separate a new color or shape from the known ones, no amount of corrections teaches the
LLM to find it. This fits one linear classifier for the shape and one for the color
(known and new words together) on the tower's feature map at each object's centre cell
(``vision_tower.feature_map``, the map the image tokens are merged from) of new-words
scenes (:mod:`training.new_words`: targets with new words among known distractors), and
prints held-out accuracy per word against chance: how clearly the frozen tower shows each
word at the object's own cell (not a strict ceiling - the projector and the LLM are not
linear and see every cell), not a measure of the LLM.

It then fits a ridge regression from the same cell to the object's box size (log width and
height in the padded square) on the KNOWN shapes' objects only, as the language stage only
ever boxes those, and prints per shape the mean log ratio of the read size to the true one
on held-out objects: does the tower's cell carry the extent of a shape it was not
pre-trained on (a crescent read as the disc it is cut from: width ratio > 0)?
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def features(model, processor, seed: int, n: int):
    """Centre-cell feature, shape index, color index and log box size (width, height in the
    padded square) of every object of ``n`` scenes."""
    import numpy as np
    import torch

    from nextchat_core.frames import SquareGeometry
    from training import new_words, synth

    shapes, colors = list(synth.SHAPES + synth.NEW_SHAPES), list(synth.ALL_COLORS)
    x, s, c, size = [], [], [], []
    scenes = [scene for scene, _ in new_words.generate(seed, n)]
    for start in range(0, n, 16):
        chunk = scenes[start : start + 16]
        pixels, _ = processor.tensors([processor(sc.image) for sc in chunk], sam=False)
        with torch.no_grad():
            fmap = model.vision_tower.feature_map(pixels)  # B x C x g x g
        g = fmap.shape[-1]
        for b, scene in enumerate(chunk):
            geo = SquareGeometry(scene.width, scene.height)
            for o in scene.objects:
                # the object's box in the padded square, normalized: its centre's cell
                box = (np.asarray(o.box, float) + [geo.pad_x, geo.pad_y] * 2) / float(geo.side)
                col = min(g - 1, int((box[0] + box[2]) / 2 * g))
                row = min(g - 1, int((box[1] + box[3]) / 2 * g))
                x.append(fmap[b, :, row, col].numpy())
                s.append(shapes.index(o.shape))
                c.append(colors.index(o.color))
                size.append(np.log([box[2] - box[0], box[3] - box[1]]))
    return (
        torch.tensor(np.array(x)),
        torch.tensor(s),
        torch.tensor(c),
        torch.tensor(np.array(size), dtype=torch.float32),
    )


def probe(x_train, y_train, x_test, y_test, k: int):
    """Held-out predictions of a multinomial logistic regression (torch LBFGS, L2)."""
    import torch

    lin = torch.nn.Linear(x_train.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x_train), y_train)
        loss = loss + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(x_test).argmax(1)


def ridge(x_train, y_train, x_test, alpha: float = 10.0):
    """Held-out predictions of a ridge regression with an intercept (closed form; written
    here because the project has no scikit-learn, and one solve is all it takes)."""
    import torch

    xa = torch.cat([x_train, torch.ones(len(x_train), 1)], 1).double()
    xb = torch.cat([x_test, torch.ones(len(x_test), 1)], 1).double()
    reg = alpha * torch.eye(xa.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0
    w = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y_train.double())
    return (xb @ w).float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the bundled demo")
    p.add_argument("--train", type=int, default=400, help="scenes to fit the probes on")
    p.add_argument("--test", type=int, default=150, help="held-out scenes")
    args = p.parse_args(argv)

    import torch

    from nextchat_core.build import from_pretrained
    from nextchat_core.image_processing import ImageProcessor
    from training import synth
    from training.versions import resolve_checkpoint

    torch.manual_seed(0)
    model = from_pretrained(resolve_checkpoint(args.checkpoint)).model.eval()
    processor = ImageProcessor(model.config)
    xa, sa, ca, za = features(model, processor, 5, args.train)
    xb, sb, cb, zb = features(model, processor, 6, args.test)
    mu, sd = xa.mean(0), xa.std(0) + 1e-5
    xa, xb = (xa - mu) / sd, (xb - mu) / sd
    new = set(synth.NEW_SHAPES) | set(synth.NEW_COLORS)
    print(f"{len(xa)} objects to fit, {len(xb)} held out; {xa.shape[1]} features per cell")
    print("| word | new | held-out objects | probe accuracy | chance |")
    print("|---|---|---|---|---|")
    for names, y_train, y_test in (
        (list(synth.SHAPES + synth.NEW_SHAPES), sa, sb),
        (list(synth.ALL_COLORS), ca, cb),
    ):
        pred = probe(xa, y_train, xb, y_test, len(names))
        for i, name in enumerate(names):
            m = y_test == i
            if m.any():
                acc = float((pred[m] == i).float().mean())
                print(
                    f"| {name} | {'yes' if name in new else ''} | {int(m.sum())} | {acc:.2f} "
                    f"| {1 / len(names):.2f} |"
                )
    shapes = list(synth.SHAPES + synth.NEW_SHAPES)
    known = sa < len(synth.SHAPES)
    read = ridge(xa[known], za[known], xb)
    err = read - zb  # log ratios: read / true
    print()
    print(f"Box size read from the cell (ridge fitted on {int(known.sum())} known-shape objects):")
    print("| shape | new | held-out objects | log width ratio | log height ratio | mean abs |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(shapes):
        m = sb == i
        if m.any():
            w, h = err[m].mean(0).tolist()
            print(
                f"| {name} | {'yes' if name in new else ''} | {int(m.sum())} | {w:+.3f} "
                f"| {h:+.3f} | {float(err[m].abs().mean()):.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
