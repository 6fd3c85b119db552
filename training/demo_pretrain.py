"""The demo recipe's two perception pre-trainings, before any language stage.

NExT-Chat starts from a pretrained CLIP (frozen) and a pretrained SAM. The demo model has
neither, so it makes its own stand-ins on the synthetic domain, each trained ALONE:

* :func:`pretrain_vision` - the vision tower with dense, object-level supervision (what a
  detector learns) through a LINEAR read-out of its stride-16 feature map: at each
  object's centre cell its objectness, color, shape, size and box; at every cell the
  color and shape (or background) of the object covering it and that object's box edges.
  After it the tower is frozen for good (as CLIP is), so its tokens keep saying what they
  learned here. The read-out is dropped (it only shapes the tokens).
* :func:`pretrain_sam` - SAM as segment-anything was pre-trained: masks from (jittered)
  box prompts, focal + dice + IoU-prediction losses (NExT-Chat's stage-3 weights), with
  zeros in the 4 prompt slots that ``seg_prompt_mlp`` fills later (see
  :func:`zero_prompt_mlp`).

Both are resumable (a checkpoint every ``save_every`` steps holds the trained modules,
the optimizer, the schedule and the data position; a rerun continues) and log
``metrics.jsonl`` with the training time. Both write a full model checkpoint
(``final/``) that the next phase starts from. Data are fresh scenes: batch ``b`` of step
``s`` uses scenes ``s * b ... s * b + b - 1`` of the phase's seed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from nextchat_core import frames, losses
from nextchat_core.build import from_pretrained, save_pretrained
from nextchat_core.device import PRECISIONS, cpu_description
from nextchat_core.frames import SamGeometry, SquareGeometry
from nextchat_core.image_processing import ImageProcessor
from nextchat_core.modeling import NextChatModel

from . import synth

log = logging.getLogger(__name__)

N_COLORS, N_SHAPES, N_SIZES = len(synth.COLORS), len(synth.SHAPES), len(synth.SIZES)


# ------------------------------------------------------------------------- targets


def flip_scene(scene: synth.Scene) -> synth.Scene:
    """The scene mirrored left-right (every shape of the domain is mirror-symmetric, so
    the labels hold; vertical flips would not: triangle, star)."""
    w = scene.width
    objects = []
    for o in scene.objects:
        x1, y1, x2, y2 = (float(v) for v in o.box)
        objects.append(
            synth.SceneObject(
                shape=o.shape,
                color=o.color,
                size=o.size,
                mask=np.ascontiguousarray(o.mask[:, ::-1]),
                box=np.array([w - x2, y1, w - x1, y2]),
                center=(w - o.center[0], o.center[1]),
                extent=o.extent,
                drawn_area=o.drawn_area,
            )
        )
    return synth.Scene(
        scene.scene_id, np.ascontiguousarray(scene.image[:, ::-1]), objects, scene.background
    )


@dataclass
class VisionTargets:
    """Per-cell targets on the ``g x g`` map over the padded square (row-major, ``N = g*g``).

    ``objectness``: 1 at object centre cells, 0 on cells outside every box, -1 (ignored)
    elsewhere. ``center_color`` / ``center_shape`` / ``center_size``: the class of the
    object centred in the cell, -1 elsewhere. ``center_box``: that object's box as
    distances ``(left, top, right, bottom)`` from the cell centre, square-frame units.
    ``cell_color`` / ``cell_shape``: the object covering most of the cell (class N =
    background). ``cell_box`` / ``cell_has``: that object's box in the square frame (xyxy,
    ``[0, 1]``) and whether the cell has an object."""

    objectness: np.ndarray
    center_color: np.ndarray
    center_shape: np.ndarray
    center_size: np.ndarray
    center_box: np.ndarray
    cell_color: np.ndarray
    cell_shape: np.ndarray
    cell_box: np.ndarray
    cell_has: np.ndarray


def vision_targets(scene: synth.Scene, grid: int) -> VisionTargets:
    from .demo import cell_targets  # the per-cell targets the LLM stage also uses

    dense = cell_targets(scene, None, grid)
    g = SquareGeometry(scene.width, scene.height)
    side = float(g.side)
    n = grid * grid
    objectness = np.zeros(n, dtype=np.float32)
    center_color = np.full(n, -1, dtype=np.int64)
    center_shape = np.full(n, -1, dtype=np.int64)
    center_size = np.full(n, -1, dtype=np.int64)
    center_box = np.zeros((n, 4), dtype=np.float32)
    colors = list(synth.COLORS)
    centers = (np.arange(grid) + 0.5) / grid
    inside = np.zeros((grid, grid), dtype=bool)
    boxes = [
        (np.asarray(o.box, dtype=np.float64) + np.array([g.pad_x, g.pad_y] * 2)) / side
        for o in scene.objects
    ]
    for b in boxes:
        c0, c1 = int(b[0] * grid), min(grid - 1, int(b[2] * grid))
        r0, r1 = int(b[1] * grid), min(grid - 1, int(b[3] * grid))
        inside[r0 : r1 + 1, c0 : c1 + 1] = True
    objectness[inside.reshape(-1)] = -1.0
    # Larger objects first, so that the smaller one wins a shared centre cell.
    order = sorted(
        range(len(boxes)), key=lambda i: -(boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
    )
    for i in order:
        b, o = boxes[i], scene.objects[i]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        col, row = min(grid - 1, int(cx * grid)), min(grid - 1, int(cy * grid))
        k = row * grid + col
        objectness[k] = 1.0
        center_color[k] = colors.index(o.color)
        center_shape[k] = synth.shape_id(o.shape)  # a blob's: ignored
        center_size[k] = synth.SIZES.index(o.size)
        ccx, ccy = centers[col], centers[row]
        center_box[k] = [ccx - b[0], ccy - b[1], b[2] - ccx, b[3] - ccy]
    return VisionTargets(
        objectness,
        center_color,
        center_shape,
        center_size,
        center_box,
        dense["color"],
        dense["shape"],
        dense["box"],
        dense["has"],
    )


class VisionReadout(nn.Module):
    """A linear read-out per cell of the tower's map: objectness (1), color (N+1), shape
    (N+1), size (2), centre box distances (4, softplus), cell box (4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.sizes = (1, N_COLORS + 1, N_SHAPES + 1, N_SIZES, 4, 4)
        self.linear = nn.Linear(channels, sum(self.sizes))

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``BxCxgxg`` -> per-cell ``(objectness BxN, color BxNx9, shape BxNx7, size BxNx2,
        center_box BxNx4, cell_box BxNx4)``."""
        x = fmap.flatten(2).transpose(1, 2).float()  # B x N x C
        parts = self.linear(x).split(self.sizes, dim=-1)
        obj, color, shape, size, cbox, box = parts
        return obj[..., 0], color, shape, size, F.softplus(cbox), box.sigmoid()


def _giou_ltrb(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean GIoU loss of boxes given as distances from a common centre (``Kx4`` ltrb)."""

    def xyxy(d: torch.Tensor) -> torch.Tensor:
        return torch.stack([-d[:, 0], -d[:, 1], d[:, 2], d[:, 3]], dim=1)

    return losses.box_losses(xyxy(pred), xyxy(target))[1]


def vision_loss(
    out: tuple[torch.Tensor, ...], t: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    obj, color, shape, size, cbox, box = out
    keep = t["objectness"] >= 0
    pos = t["objectness"] > 0
    # Focal-style balance: positives are ~1-6 of 256 cells.
    w = torch.where(pos, torch.full_like(obj, 4.0), torch.ones_like(obj))
    parts = {
        "objectness": F.binary_cross_entropy_with_logits(
            obj[keep], t["objectness"][keep], weight=w[keep]
        ),
        "cell_color": F.cross_entropy(color.reshape(-1, N_COLORS + 1), t["cell_color"].reshape(-1)),
        "cell_shape": F.cross_entropy(shape.reshape(-1, N_SHAPES + 1), t["cell_shape"].reshape(-1)),
    }
    named = pos & (t["center_shape"] >= 0)  # blobs (synth.BLOB) have no shape class
    if named.any():
        parts["center_shape"] = 2.0 * F.cross_entropy(shape[named], t["center_shape"][named])
    if pos.any():
        parts["center_color"] = F.cross_entropy(color[pos], t["center_color"][pos])
        parts["center_size"] = F.cross_entropy(size[pos], t["center_size"][pos])
        parts["center_box"] = 5.0 * F.l1_loss(cbox[pos], t["center_box"][pos]) + 2.0 * _giou_ltrb(
            cbox[pos], t["center_box"][pos]
        )
    has = t["cell_has"] > 0
    if has.any():
        parts["cell_box"] = 2.0 * F.l1_loss(box[has], t["cell_box"][has])
    return parts


# --------------------------------------------------------------------------- loops


@dataclass
class PretrainPhase:
    """One perception pre-training: ``kind`` "vision" or "sam"."""

    kind: str
    steps: int
    lr: float
    batch_size: int = 16
    seed: int = 11
    weight_decay: float = 0.05
    warmup: int = 100
    save_every: int = 40
    log_every: int = 20
    tag: str = ""  # tells apart two pre-trainings of one kind in a recipe ("sam", "sam-more")
    # the share of objects drawn as unnamed random shapes (synth.BLOB): objectness, colour
    # and box learnt from pixels beyond the domain's six shapes
    blob_prob: float = 0.0
    # "bf16": the forward runs under CPU bf16 autocast (weights and the optimizer stay
    # float32); on a CPU with AMX the demo tower's step takes 0.64x (bench/precision.py).
    # "auto": bf16 where the CPU has AMX, else fp32 (without it bf16 is emulated)
    precision: str = "fp32"

    @property
    def name(self) -> str:
        """The phase's directory name in a recipe run."""
        return self.kind + self.tag


def _scene_batch(
    seed: int, step: int, batch: int, synth_cfg: synth.SynthConfig, *, flip: bool
) -> list[synth.Scene]:
    scenes = []
    for k in range(batch):
        i = step * batch + k
        rng = synth.scene_rng(seed, i)
        scene = synth.render_scene(rng, synth_cfg, scene_id=i)
        if flip and rng.random() < 0.5:
            scene = flip_scene(scene)
        scenes.append(scene)
    return scenes


def _stack(ts: list[VisionTargets]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.stack([getattr(t, name) for t in ts]))
        for name in VisionTargets.__dataclass_fields__
    }


def pretrain_vision(
    init: str | Path,
    out: Path,
    phase: PretrainPhase,
    synth_cfg: synth.SynthConfig,
    *,
    eval_scenes: list[synth.Scene] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train the vision tower (and its read-out) alone; write ``out/final`` (the whole
    model, tower trained) and ``out/readout.json`` (held-out read-out accuracy).
    ``stop_after`` ends this call after that many steps with a resumable checkpoint."""
    return _loop(init, out, phase, synth_cfg, eval_scenes=eval_scenes, stop_after=stop_after)


def pretrain_sam(
    init: str | Path,
    out: Path,
    phase: PretrainPhase,
    synth_cfg: synth.SynthConfig,
    *,
    stop_after: int | None = None,
) -> Path:
    """Train all of SAM on box prompts (jittered); write ``out/final``."""
    return _loop(init, out, phase, synth_cfg, stop_after=stop_after)


def _loop(
    init: str | Path,
    out: Path,
    phase: PretrainPhase,
    synth_cfg: synth.SynthConfig,
    *,
    eval_scenes: list[synth.Scene] | None = None,
    stop_after: int | None = None,
) -> Path:
    final = out / "final"
    if (final / "model.safetensors").exists():
        return final
    out.mkdir(parents=True, exist_ok=True)
    ckpt = from_pretrained(init)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    model.requires_grad_(False)
    processor = ImageProcessor(model.config)
    torch.manual_seed(phase.seed)
    if phase.kind == "vision":
        trained: nn.Module = model.vision_tower
        head: nn.Module = VisionReadout(model.vision_tower.map_channels)
    elif phase.kind == "sam":
        trained, head = model.sam, nn.Identity()
    else:
        raise ValueError(f"unknown pre-training kind {phase.kind!r}; expected 'vision' or 'sam'")
    if phase.precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {phase.precision!r}")
    bf16 = phase.precision == "bf16" or (
        phase.precision == "auto" and bool(cpu_description()["amx_bf16"])
    )
    trained.requires_grad_(True)
    trained.train()
    params = [p for p in [*trained.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(phase.warmup, phase.steps // 10), phase.steps)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0}
    resume = out / "checkpoint.pt"
    if resume.exists():
        saved = torch.load(resume, weights_only=False)  # our own file
        trained.load_state_dict(saved["trained"])
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        log.info("%s pre-training resumed at step %d", phase.kind, state["step"])
    grid = model.config.vision.image_size // (
        model.config.vision.patch_size // model.config.vision.token_merge
    )
    log_file = (out / "metrics.jsonl").open("a")
    tick = time.perf_counter()
    running: dict[str, list[float]] = {}
    end = phase.steps if stop_after is None else min(phase.steps, stop_after)
    while state["step"] < end:
        scenes = _scene_batch(
            phase.seed, int(state["step"]), phase.batch_size, synth_cfg, flip=phase.kind == "vision"
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if phase.kind == "vision":
                parts = _vision_step(model, head, processor, scenes, grid)
            else:
                rng = np.random.default_rng([phase.seed, int(state["step"])])
                parts = _sam_step(model, processor, scenes, rng)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state["step"] += 1
        now = time.perf_counter()
        state["elapsed_s"] += now - tick
        tick = now
        for k, v in parts.items():
            running.setdefault(k, []).append(float(v.detach()))
        if state["step"] % phase.log_every == 0 or state["step"] == phase.steps:
            row = {
                "step": state["step"],
                "elapsed_s": round(state["elapsed_s"], 1),
                "lr": sched.get_last_lr()[0],
                "loss": float(np.sum([np.mean(v) for v in running.values()])),
                **{k: float(np.mean(v)) for k, v in running.items()},
            }
            running = {}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            log.info(
                "%s pre-training step %d/%d %s", phase.kind, state["step"], phase.steps, row["loss"]
            )
        if (state["step"] % phase.save_every == 0 or state["step"] == end) and state[
            "step"
        ] < phase.steps:
            tmp = resume.with_suffix(".tmp")
            torch.save(
                {
                    "trained": trained.state_dict(),
                    "head": head.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "state": state,
                },
                tmp,
            )
            tmp.replace(resume)
            tick = time.perf_counter()
    if state["step"] < phase.steps:  # stopped on purpose (stop_after): resumable
        log_file.close()
        return final
    model.eval()
    if phase.kind == "vision" and eval_scenes:
        report = readout_report(model, head, processor, eval_scenes, grid)
        report["elapsed_s"] = round(state["elapsed_s"], 1)
        (out / "readout.json").write_text(json.dumps(report, indent=2))
        log.info("vision read-out on held-out scenes: %s", report)
    log_file.write(
        json.dumps(
            {
                "step": state["step"],
                "elapsed_s": round(state["elapsed_s"], 1),
                "precision": "bf16" if bf16 else "fp32",  # what "auto" chose on this CPU
                "done": True,
            }
        )
        + "\n"
    )
    log_file.close()
    save_pretrained(model, final, tokenizer)
    if resume.exists():
        resume.unlink()
    return final


def _vision_step(
    model: NextChatModel,
    head: nn.Module,
    processor: ImageProcessor,
    scenes: list[synth.Scene],
    grid: int,
) -> dict[str, torch.Tensor]:
    processed = [processor(s.image) for s in scenes]
    pixel_values, _ = processor.tensors(processed, sam=False)
    fmap = model.vision_tower.feature_map(pixel_values)
    t = _stack([vision_targets(s, grid) for s in scenes])
    return vision_loss(head(fmap), t)


def _sam_step(
    model: NextChatModel,
    processor: ImageProcessor,
    scenes: list[synth.Scene],
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Up to 3 objects per scene, each prompted by its box jittered by up to ~10 % of its
    side per edge (a quarter unjittered), masks supervised in the SAM frame."""
    cfg = model.config
    size = cfg.sam.image_size
    processed = [processor(s.image) for s in scenes]
    _, sam_pixels = processor.tensors(processed, sam=True)
    assert sam_pixels is not None
    emb = model.encode_sam_images(sam_pixels)
    all_logits, all_iou, targets = [], [], []
    for b, scene in enumerate(scenes):
        picks = rng.permutation(len(scene.objects))[:3]
        geo = SamGeometry(scene.width, scene.height, size)
        boxes = []
        for i in picks:
            o = scene.objects[int(i)]
            x1, y1, x2, y2 = (float(v) for v in o.box)
            if rng.random() > 0.25:
                bw, bh = x2 - x1, y2 - y1
                j = rng.normal(0.0, 0.1, size=4) * [bw, bh, bw, bh]
                x1, y1, x2, y2 = x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3]
            (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))
            boxes.append([x1, y1, x2, y2])
            targets.append(frames.original_mask_to_sam(o.mask, geo))
        sam_boxes = frames.pixel_to_sam(
            torch.tensor(boxes, dtype=torch.float32), scene.width, scene.height, size
        )
        sparse, dense = model.sam.prompt_encoder(points=None, boxes=sam_boxes, masks=None)
        # The slots NExT-Chat's seg_prompt_mlp fills, as zeros: stage 3 starts that MLP's
        # output at zero, so it starts from exactly what is learned here.
        slots = sparse.new_zeros(len(boxes), cfg.sam.num_prompt_tokens, cfg.sam.prompt_dim)
        sparse = torch.cat([sparse, slots], dim=1)
        low, iou = model.sam.mask_decoder(
            image_embeddings=emb[b : b + 1],
            image_pe=model.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        all_logits.append(
            F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        )
        all_iou.append(iou[:, 0])
    logits = torch.cat(all_logits)
    target = torch.from_numpy(np.stack(targets)).float()
    w = cfg.loss
    focal, dice, iou_loss = losses.mask_losses(
        logits, target, torch.cat(all_iou), alpha=w.focal_alpha, gamma=w.focal_gamma
    )
    return {"focal": w.focal * focal, "dice": w.dice * dice, "iou": w.iou * iou_loss}


@torch.no_grad()
def readout_report(
    model: NextChatModel,
    head: nn.Module,
    processor: ImageProcessor,
    scenes: list[synth.Scene],
    grid: int,
) -> dict[str, Any]:
    """What the linear read-out of the (trained) tower says about each held-out object at
    its centre cell: color / shape / size accuracy, box IoU (mean, share >= 0.7), and
    recall (objectness > 0.5 at the centre), by object size."""
    head.eval()
    rows: dict[str, list[list[float]]] = {"small": [], "large": []}
    for start in range(0, len(scenes), 16):
        chunk = scenes[start : start + 16]
        processed = [processor(s.image) for s in chunk]
        pixel_values, _ = processor.tensors(processed, sam=False)
        obj, color, shape, size, cbox, _ = head(model.vision_tower.feature_map(pixel_values))
        for b, scene in enumerate(chunk):
            t = vision_targets(scene, grid)
            for k in np.nonzero(t.objectness > 0)[0].tolist():
                centers = (np.array([k % grid, k // grid]) + 0.5) / grid
                d, dt = cbox[b, k].numpy(), t.center_box[k]
                pb = [centers[0] - d[0], centers[1] - d[1], centers[0] + d[2], centers[1] + d[3]]
                gb = [
                    centers[0] - dt[0],
                    centers[1] - dt[1],
                    centers[0] + dt[2],
                    centers[1] + dt[3],
                ]
                iou = frames.box_iou(pb, gb)
                name = synth.SIZES[int(t.center_size[k])]
                rows[name].append(
                    [
                        float(color[b, k].argmax() == t.center_color[k]),
                        float(shape[b, k].argmax() == t.center_shape[k]),
                        float(size[b, k].argmax() == t.center_size[k]),
                        iou,
                        float(iou >= 0.7),
                        float(obj[b, k] > 0),
                    ]
                )
    names = ("color", "shape", "size", "mean_iou", "iou_0.7", "recall")
    return {
        group: {
            "n": len(v),
            **{n: round(float(x), 4) for n, x in zip(names, np.mean(v, 0), strict=True)},
        }
        for group, v in rows.items()
        if v
    }


def zero_prompt_mlp(init: str | Path, out: Path) -> Path:
    """A copy of checkpoint ``init`` whose ``seg_prompt_mlp`` outputs zeros (last Linear
    zeroed): the SAM of :func:`pretrain_sam` exactly, at the start of stage 3, which then
    teaches the ``<at>`` prompt on top of it instead of from noise."""
    if not (out / "model.safetensors").exists():
        ckpt = from_pretrained(init)
        last = ckpt.model.seg_prompt_mlp[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        save_pretrained(ckpt.model, out, ckpt.tokenizer)
    return out
