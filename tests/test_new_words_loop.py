"""The new-words loop on the tiny preset with real processes (gunicorn backend, Celery
worker, embedded SQLite broker), driven over HTTP as Label Studio drives it: one new word,
corrections with boxes and masks, both selection strategies, replay and the two-slice
gate; and the ordering by confidence (labelstudio.selection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import readme_block
from PIL import Image

from labelstudio.selection import (
    prediction_score,
    random_order,
    select,
    task_score,
    uncertainty_first,
)
from nextchat_cli import new_words_demo
from nextchat_core.build import build_model, save_pretrained
from training import new_words


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny-base"
    save_pretrained(build_model(tiny_config), path, tiny_tokenizer)
    return path


def test_uncertainty_first_orders_by_prediction_score_lowest_first():
    scored = [(1, 0.9), (2, None), (3, 0.1), (4, 0.5), (5, 0.1), (6, None)]
    assert uncertainty_first(scored) == [2, 6, 3, 5, 4, 1]  # no score, then low; stable
    assert select(scored, 3, "uncertainty") == [2, 6, 3]
    assert select(scored, 3, "random", seed=4) == random_order([k for k, _ in scored], 4)[:3]
    assert random_order(list(range(20)), 1) == random_order(list(range(20)), 1)
    assert random_order(list(range(20)), 1) != random_order(list(range(20)), 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        select(scored, 1, "margin")
    # scores as /predict and Label Studio's API give them
    assert prediction_score({"result": [], "score": 0.25}) == 0.25
    assert prediction_score({"result": []}) is None
    assert prediction_score({"score": float("nan")}) is None and prediction_score(None) is None
    task = {
        "id": 9,
        "predictions": [
            {"score": 0.2, "model_version": "a", "created_at": "2026-12-01T10:00:00Z"},
            {"score": 0.7, "model_version": "b", "created_at": "2026-12-01T11:00:00Z"},
        ],
    }
    assert task_score(task) == 0.7 and task_score(task, "a") == 0.2
    assert task_score(task, "c") is None and task_score({"id": 1}) is None
    with pytest.raises(ValueError, match="'predictions' must be a list"):
        task_score({"id": 3, "predictions": {"score": 1}})


def test_new_words_loop_with_one_new_word_on_the_tiny_preset(tmp_path, base):
    config = new_words.NewWordsConfig(new_shapes=("heart",), new_colors=(), kinds={"shape": 1})
    small = {
        "TORCH_THREADS": "1",
        "JOB_HEARTBEAT_S": "1",
        "RETRAIN_MAX_STEPS": "3",
        "RETRAIN_BATCH_SIZE": "4",
        "RETRAIN_REGRESSION": "4",
        "PROMOTE_POLICY": "always",  # the tiny model learns nothing in 3 steps
    }
    report = new_words_demo.run_new_words(
        tmp_path / "run",
        base,
        budgets=(5, 10),
        pool_size=14,
        n_eval=4,
        strategies=("uncertainty",),  # random's order is checked above; each run costs a
        config=config,  # backend and a worker start (~40 s here)
        env=small,
    )
    saved = json.loads((tmp_path / "run" / "loop-new-words.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["new_words"] == ["heart"] and report["recipe"]["RETRAIN_REPLAY"] == "1"
    for key in ("new_words", "original"):
        before = report["before"][key]
        assert before["n"] == 4 and 0 <= before["acc50"] <= 1 and 0 <= before["mask_miou"] <= 1
    assert [r["strategy"] for r in report["strategies"]] == ["uncertainty"]
    for run in report["strategies"]:
        rounds = run["rounds"]
        assert [r["corrections"] for r in rounds] == [5, 10]
        picked = [k for r in rounds for k in r["picked"]]
        assert len(set(picked)) == 10  # a task is corrected once
        for r in rounds:
            assert r["selected_new_words"] == ["heart"]
            assert [s["stage"] for s in r["stages"]] == [2, 3]  # boxes, then masks
            assert r["replay_samples"] >= 1  # RETRAIN_REPLAY=1: as many as the training slice
            # RETRAIN_COPY_PASTE=3 reached the job, but every correction names "heart": a
            # heart pasted beside another annotated heart would be ambiguous, so none is
            assert report["recipe"]["RETRAIN_COPY_PASTE"] == "3" and r["pasted_samples"] == 0
            regression = r["gate_regression"]
            assert regression["old"]["n_records"] == regression["new"]["n_records"] == 4
            assert r["promoted"] and r["served"] == r["version"]
            assert r["new_words"]["n"] == r["original"]["n"] == 4
        for r in rounds:  # scored by the served version; nothing left below what was picked
            assert all(isinstance(s, float) for s in r["picked_scores"]), r["picked_scores"]
            assert r["lowest_score_left"] is not None
            assert max(r["picked_scores"]) <= r["lowest_score_left"]
        assert rounds[1]["served"] != rounds[0]["served"]  # round 2 re-scored by the new one
    table = new_words_demo.readme_table(report)
    assert table.count("\n| uncertainty |") == 2
    png = tmp_path / "curve.png"
    new_words_demo.plot_curve(report, png)
    assert Image.open(png).size == (720, 420)


def test_next_tasks_lists_unannotated_tasks_lowest_score_first(tmp_path, capsys):
    from nextchat_cli.main import main

    def prediction(score, version="v2", when="2026-12-01T12:00:00Z"):
        return {"score": score, "model_version": version, "created_at": when, "result": []}

    export = [
        {"id": 1, "data": {}, "annotations": [{"id": 5, "result": []}], "predictions": []},
        {"id": 2, "data": {}, "annotations": [], "predictions": [prediction(0.9)]},
        {"id": 3, "data": {}, "annotations": [], "predictions": [prediction(0.2)]},
        {"id": 4, "data": {}, "annotations": [], "predictions": []},
        {  # a skipped task is still to be annotated
            "id": 5,
            "data": {},
            "annotations": [{"id": 6, "result": [], "was_cancelled": True}],
            "predictions": [prediction(0.6), prediction(0.1, "v1", "2026-11-30T12:00:00Z")],
        },
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))

    def cli(*args):  # the real command line, in this process
        rc = main(["next-tasks", "--export", str(path), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    listed = json.loads(cli("--json")[1])
    assert listed == [
        {"task": 4, "score": None},
        {"task": 3, "score": 0.2},
        {"task": 5, "score": 0.6},  # its newest prediction
        {"task": 2, "score": 0.9},
    ]
    by_v1 = json.loads(cli("--json", "--version", "v1", "--limit", "2")[1])
    assert by_v1 == [{"task": 2, "score": None}, {"task": 3, "score": None}]
    text = cli("--limit", "1")[1]
    assert "4 unannotated task(s)" in text and "task 4  score none" in text
    path.write_text('{"not": "a list"}')
    rc, _, err = cli()
    assert rc == 1 and "expected a JSON list of Label Studio tasks" in err


def test_the_readme_new_words_table_is_generated_from_its_report():
    repo = Path(__file__).resolve().parents[1]
    report = json.loads((repo / "docs" / "loop-new-words.json").read_text())
    block = readme_block("loop-new-words")
    assert block == new_words_demo.readme_table(report)
    assert report["domain"] == "new-words" and report["strategies"]
