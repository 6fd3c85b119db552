"""The `nextchat` console script's core commands, run as a real subprocess and in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_scene
from PIL import Image

from nextchat_cli.main import main
from nextchat_core.build import save_pretrained

MANIFEST = Path(__file__).resolve().parent / "data" / "nextchat-7b-336-state-dict.json"


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "nextchat_cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inspect-checkpoint" in out.stdout and "predict" in out.stdout


def test_inspect_manifest_prints_zero_missing_and_unexpected(capsys):
    assert main(["inspect-checkpoint", "--manifest", str(MANIFEST)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == 0 and report["unexpected"] == 0 and report["mismatched"] == 0
    assert report["preset"] == "nextchat-7b-336" and report["parameters"] == 7_741_812_788


def test_predict_prints_json_and_writes_overlay(tiny_model, tiny_tokenizer, tmp_path, capsys):
    ckpt = save_pretrained(tiny_model, tmp_path / "ckpt", tiny_tokenizer)
    img, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    overlay = tmp_path / "overlay.png"
    rc = main(
        [
            "predict",
            str(tmp_path / "scene.png"),
            "the red circle",
            "--checkpoint",
            str(ckpt),
            "--json",
            "--overlay",
            str(overlay),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(text[: text.rindex("]") + 1])
    assert data[0]["prompt"] == "the red circle" and isinstance(data[0]["text"], str)
    with Image.open(overlay) as im:
        assert im.size == (96, 64)


def test_predict_bad_input_is_a_clear_error(tmp_path, capsys):
    rc = main(
        ["predict", str(tmp_path / "missing.png"), "x", "--checkpoint", str(tmp_path / "nope")]
    )
    assert rc == 1
    assert "no checkpoint at" in capsys.readouterr().err
