"""The pointing loss a retraining job can add (RETRAIN_POINT, training/pointing.py): which
cells a box points at, the loss against a hand computation, and that training with it moves
the head's attention onto the boxes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import config_for, write_refexp

from nextchat_core.config import get_preset
from training.pointing import PointingObjective, box_cells
from training.retrain import RetrainSettings
from training.trainer import train


def test_a_box_points_at_the_cells_it_covers_and_a_tiny_box_at_one():
    cells = box_cells(torch.tensor([0.0, 0.0, 0.5, 0.5]), 4).reshape(4, 4)
    assert cells.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # a quarter of a cell or more counts (0.3 of the column, all of the row: 0.3 >= 0.25)
    cells = box_cells(torch.tensor([0.0, 0.0, 0.325, 0.25]), 4).reshape(4, 4)
    assert cells.nonzero().tolist() == [[0, 0], [0, 1]]
    # smaller than a quarter of any cell: the one it covers most
    cells = box_cells(torch.tensor([0.70, 0.47, 0.74, 0.57]), 4).reshape(4, 4)
    assert cells.nonzero().tolist() == [[2, 2]]


def test_the_pointing_loss_is_minus_log_of_the_heads_mass_on_each_answer_box():
    mcfg = get_preset("demo")
    tok = mcfg.tokens
    n = mcfg.vision.num_patches
    grid = math.isqrt(n)
    q = 7  # any text id
    # row 0: a region in the question (before the image: no term) and an answer <at>;
    # row 1: an answer <at>. Boxes in <at> order: question's, row 0's answer, row 1's.
    row0 = [tok.bos_id, tok.at_id, tok.boxes_id] + [tok.im_patch_id] * n + [q, tok.at_id]
    row1 = [tok.bos_id, q, q] + [tok.im_patch_id] * n + [q, tok.at_id]
    ids = torch.tensor([row0, row1])
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    t = ids.shape[1]
    attention = torch.zeros(2, mcfg.llm.num_heads, t, t)
    # head 0 at row 0's answer <at>: 0.6 on the first cell, 0.4 on the last
    attention[0, 0, -1, 3] = 0.6
    attention[0, 0, -1, 3 + n - 1] = 0.4
    attention[1, 0, -1, 3 : 3 + n] = 1.0 / n  # row 1: spread evenly, the box covers all
    attention[:, 1:] = 1.0 / t  # other heads are not supervised
    objective = PointingObjective(mcfg, weight=2.0)
    objective._attention = attention
    got = objective(None, {"input_ids": ids, "boxes": boxes}, {})  # type: ignore[arg-type]
    # row 0's box is the top-left quarter: the first cell is in it, the last is not
    expected = 2.0 * (-math.log(0.6 + 1e-6) - math.log(1.0 + 1e-6)) / 2
    assert got["aux_point"].item() == pytest.approx(expected, rel=1e-5)
    assert grid * grid == n
    # a batch without answer boxes (a "No." answer) adds nothing
    objective._attention = attention[:1, :, :-1, :-1]
    no_answer = {"input_ids": ids[:1, :-1], "boxes": boxes[:1]}
    assert objective(None, no_answer, {}) == {}  # type: ignore[arg-type]


def test_training_with_the_pointing_loss_moves_the_heads_attention_onto_the_boxes(tmp_path):
    data = write_refexp(tmp_path)
    cfg = config_for(tmp_path, data, steps=30, batch_size=3, log_every=1, lr=3e-3)
    # interrupted half way and resumed: the parameter-free objective saves and loads
    train(cfg, aux=PointingObjective(get_preset("tiny"), weight=1.0), stop_after=15)
    result = train(cfg, aux=PointingObjective(get_preset("tiny"), weight=1.0))
    rows = [json.loads(x) for x in result.log_path.read_text().splitlines()]
    point = [r["aux_point"] for r in rows if "aux_point" in r]
    assert len(point) == 30, rows[0]
    # -log(mass): the mass on the box's cells at least doubles over the run
    first, last = sum(point[:3]) / 3, sum(point[-3:]) / 3
    assert last < first - math.log(2), point


def test_the_pointing_weight_is_read_and_checked():
    assert RetrainSettings.from_env({"RETRAIN_POINT": "1.5"}).point == 1.5
    assert RetrainSettings.from_env({}).point == 0.0
    with pytest.raises(ValueError, match="RETRAIN_POINT"):
        RetrainSettings.from_env({"RETRAIN_POINT": "-1"})


def test_a_model_without_a_square_grid_of_image_tokens_is_refused_clearly():
    mcfg = get_preset("tiny")
    tok = mcfg.tokens
    ids = torch.tensor([[tok.bos_id] + [tok.im_patch_id] * 6 + [tok.at_id]])
    objective = PointingObjective(mcfg, weight=1.0)
    objective._attention = torch.full((1, mcfg.llm.num_heads, 8, 8), 1 / 8)
    with pytest.raises(ValueError, match=r"square grid of image tokens.*RETRAIN_POINT"):
        objective(None, {"input_ids": ids, "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}, {})  # type: ignore[arg-type]
