"""The training pipeline on the tiny preset (CPU): stages, resume, freezing, LoRA, readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_scene
from PIL import Image

from labelstudio import results as ls_results
from nextchat_core.build import build_model
from nextchat_core.masks import coco_segmentation_to_mask, mask_iou, mask_to_box, mask_to_coco_rle
from nextchat_core.predictor import NextChatPredictor
from training.data import read_coco, read_label_studio, read_refexp_jsonl
from training.engine import EngineSettings, prepare
from training.lora import LoraSettings, merge_lora
from training.stages import get_stage
from training.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def write_refexp(tmp: Path, n: int = 6) -> Path:
    """n non-square scenes with one disc each, as refexp jsonl (+ masks as COCO RLE)."""
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        w, h = int(rng.integers(80, 128)), int(rng.integers(56, 96))
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x1, y1, x1 + int(rng.integers(16, w // 2)), y1 + int(rng.integers(16, h // 2)))
        img, mask = make_scene(w, h, box)
        Image.fromarray(img).save(tmp / "images" / f"{i}.png")
        tight = mask_to_box(mask).tolist()
        lines.append(
            {
                "image": f"images/{i}.png",
                "width": w,
                "height": h,
                "expression": "the red circle",
                "boxes": [tight],
                "masks": [mask_to_coco_rle(mask)],
            }
        )
    lines.append(
        {
            "image": "images/0.png",
            "task": "chat",
            "question": "Is there a red circle?",
            "answer": "Yes, <at> <boxes>.",
            "boxes": [lines[0]["boxes"][0]],
        }
    )
    path = tmp / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def config_for(tmp: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        stage=2,
        init="tiny",
        data=[{"kind": "refexp", "path": str(data)}],
        steps=6,
        batch_size=2,
        lr=3e-3,
        warmup_ratio=0.0,
        output_dir=str(tmp / "run"),
        log_every=1,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage_lowers_its_loss(tmp_path, stage):
    data = write_refexp(tmp_path)
    cfg = config_for(
        tmp_path,
        data,
        stage=stage,
        steps=20,
        batch_size=3,
        log_every=5,
        lr=3e-3 if stage != 3 else 1e-2,
    )
    result = train(cfg)
    rows = [r for r in metrics(result.log_path) if not r.get("eval")]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9, [r["loss"] for r in rows]
    assert (result.final_dir / "model.safetensors").exists()
    if stage == 3:
        assert "focal_loss" in rows[0] and "lm_loss" not in rows[0]
    elif stage in (1, 2):
        assert "lm_loss" in rows[0] and "focal_loss" not in rows[0]


def test_bf16_autocast_trains_on_the_cpu_and_keeps_float32_weights(tmp_path):
    # precision "bf16" is accelerate's autocast, on the CPU too (AMX makes it pay:
    # bench/precision.py); the answers' <at> <boxes> go in through loc_encoder, whose bf16
    # output must be scattered into the float32 token embeddings
    data = write_refexp(tmp_path)
    cfg = config_for(tmp_path, data, precision="bf16", steps=20, batch_size=3, log_every=5)
    result = train(cfg)
    rows = [r for r in metrics(result.log_path) if not r.get("eval")]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9, [r["loss"] for r in rows]
    from safetensors.torch import load_file

    weights = load_file(str(result.final_dir / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_one_process_trains_in_float32_and_bf16_one_after_the_other():
    # accelerate refuses a second mixed precision in a process; a worker or a bench that
    # runs both gets each (make_accelerator starts a single process's state afresh)
    from training.engine import make_accelerator

    for precision, mixed, dtype in (
        ("fp32", "no", torch.float32),
        ("bf16", "bf16", torch.bfloat16),
        ("fp32", "no", torch.float32),
    ):
        accelerator = make_accelerator(EngineSettings(precision=precision), cpu=True)
        assert accelerator.mixed_precision == mixed
        with accelerator.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_interrupted_run_resumes_exactly(tmp_path):
    data = write_refexp(tmp_path)
    full = train(config_for(tmp_path, data, output_dir=str(tmp_path / "full")))
    cfg = config_for(tmp_path, data, output_dir=str(tmp_path / "split"))
    part = train(cfg, stop_after=3)
    assert part.steps == 3 and not part.final_dir.exists()
    step = tmp_path / "split" / "checkpoints" / "step-00000003"
    assert step.is_dir()
    # the random states load without unpickling (safetensors + JSON); torch.load is only
    # ever called with weights_only=True
    assert (step / "rng.safetensors").is_file() and not (step / "rng.pt").exists()
    resumed = train(cfg)
    assert resumed.steps == 6
    from safetensors.torch import load_file

    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    # and the run really trained (it is not trivially equal to the init)
    init = build_model("tiny").state_dict()
    assert not torch.equal(a["loc_decoder.0.weight"], init["loc_decoder.0.weight"])
    losses_full = [r["loss"] for r in metrics(full.log_path)]
    losses_split = [r["loss"] for r in metrics(resumed.log_path)]
    assert losses_full == pytest.approx(losses_split, rel=0, abs=0)


def test_stage3_changes_only_prompt_mlp_and_mask_decoder(tmp_path):
    data = write_refexp(tmp_path)
    cfg = config_for(tmp_path, data, stage=3, steps=3, lr=1e-2)
    torch.manual_seed(0)  # the trainer's init: seed 0, then the preset
    before = build_model("tiny").state_dict()
    result = train(cfg)
    from safetensors.torch import load_file

    after = load_file(str(result.final_dir / "model.safetensors"))
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "stage 3 trained nothing"
    assert all(k.startswith(("seg_prompt_mlp.", "sam.mask_decoder.")) for k in changed), sorted(
        changed
    )[:5]
    assert any(k.startswith("seg_prompt_mlp.") for k in changed)
    assert any(k.startswith("sam.mask_decoder.") for k in changed)


def test_a_nested_prefix_gets_its_own_group_and_learning_rate(tiny_config):
    # RETRAIN_TRAINABLE / RETRAIN_LR_SCALE may name a module inside another trainable one:
    # each parameter belongs to one group (AdamW refuses a parameter twice), the longest.
    import dataclasses

    from training.stages import apply_stage

    model = build_model("tiny")
    spec = dataclasses.replace(
        get_stage(2),
        trainable=("vision_tower", "language_model", "language_model.model.embed_tokens"),
        lr_scale={"language_model.model.embed_tokens": 10.0, "vision_tower": 0.5},
    )
    groups = {g["name"]: g for g in apply_stage(model, spec, lr=1e-3)}
    assert {k: v["lr"] for k, v in groups.items()} == {
        "vision_tower": 5e-4,
        "language_model": 1e-3,
        "language_model.model.embed_tokens": 1e-2,
    }
    embed = model.get_submodule("language_model.model.embed_tokens").weight
    assert [p is embed for p in groups["language_model.model.embed_tokens"]["params"]] == [True]
    assert not any(p is embed for p in groups["language_model"]["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for g in groups.values() for p in g["params"]]
    assert len(trained) == len(set(trained))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    assert any(n.startswith("vision_tower.") for n in trained)
    torch.optim.AdamW(list(groups.values()))  # one group per parameter: AdamW takes it
    typo = dataclasses.replace(spec, trainable=("language_model", "vision_towr"), lr_scale={})
    with pytest.raises(ValueError, match=r"no parameter of the model is under \['vision_towr'\]"):
        apply_stage(model, typo, lr=1e-3)


def test_lora_train_merge_gives_same_outputs(tiny_tokenizer, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    prepare(
        model, get_stage(2), EngineSettings(lr=1e-2, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    )
    lora_params = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_params
    frozen_base = [
        n
        for n, p in model.named_parameters()
        if n.startswith("language_model.") and "lora_" not in n
    ]
    assert all(not dict(model.named_parameters())[n].requires_grad for n in frozen_base)
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    img, _ = make_scene()
    model.eval()
    before = NextChatPredictor(model, tiny_tokenizer, max_new_tokens=6)
    before.set_image(img)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    logits_lora = model.language_model(input_ids=ids).logits
    merge_lora(model)
    assert not any("lora_" in n for n in model.state_dict())
    assert set(model.state_dict()) == set(build_model(tiny_config).state_dict())
    logits_merged = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(logits_lora, logits_merged, atol=1e-4, rtol=1e-4)


def test_lora_run_through_the_trainer_writes_a_plain_checkpoint(tmp_path):
    data = write_refexp(tmp_path)
    result = train(config_for(tmp_path, data, steps=3, lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    from safetensors.torch import load_file

    keys = set(load_file(str(result.final_dir / "model.safetensors")))
    assert not any("lora" in k for k in keys)
    assert keys == set(build_model("tiny").state_dict())


def test_refexp_reader_and_bad_records(tmp_path, tiny_config):
    data = write_refexp(tmp_path)
    ds = read_refexp_jsonl(data, tiny_config)
    assert len(ds) == 7
    s = ds[0]
    assert s.masks is not None and s.masks[0].shape == (ds.records[0].height, ds.records[0].width)
    assert ds[6].turns[0].text.startswith("<image>") and len(ds[6].boxes) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/0.png", "expression": "x", "boxes": [[0, 0, 5000, 10]]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: box 0 .* outside"):
        read_refexp_jsonl(bad, tiny_config)
    bad.write_text(
        '\n{"image": "images/missing.png", "expression": "x", "boxes": [[0, 0, 5, 5]]}\n'
    )
    with pytest.raises(FileNotFoundError, match=r"bad.jsonl:2: image not found"):
        read_refexp_jsonl(bad, tiny_config)
    bad.write_text('{"image": "images/0.png", "expression": "x", "boxes": [[0, 0, 5, 5]]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_refexp_jsonl(bad, tiny_config)
    bad.write_text('{"image": "images/0.png", "expression": "", "boxes": [[0, 0, 5, 5]]}\n')
    with pytest.raises(ValueError, match="non-empty 'expression'"):
        read_refexp_jsonl(bad, tiny_config)


def test_coco_reader(tmp_path, tiny_config):
    data = write_refexp(tmp_path, n=3)
    rows = [json.loads(x) for x in data.read_text().splitlines()][:3]
    images, anns = [], []
    for i, r in enumerate(rows):
        images.append(
            {"id": i + 1, "file_name": r["image"], "width": r["width"], "height": r["height"]}
        )
        x1, y1, x2, y2 = r["boxes"][0]
        anns.append(
            {
                "id": 10 + i,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "segmentation": r["masks"][0],
            }
        )
    anns.append(
        {
            "id": 99,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 4, 4],
            "area": 16,
            "iscrowd": 0,
            "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
        }
    )
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "disc"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (tmp_path / "refs.json").write_text(json.dumps([{"ann_id": 11, "expression": "the red disc"}]))
    ds = read_coco(tmp_path / "instances.json", tiny_config, refs=tmp_path / "refs.json")
    texts = [r.text for r in ds.records]
    assert texts == ["all disc", "disc", "disc", "the red disc"]
    assert len(ds.records[0].boxes) == 2 and ds.records[0].boxes[0][0] == 0  # sorted left to right
    sample = ds[3]
    assert (
        sample.masks[0].sum()
        == coco_segmentation_to_mask(rows[1]["masks"][0], rows[1]["width"], rows[1]["height"]).sum()
    )


def test_label_studio_reader(tmp_path, tiny_config):
    img, mask = make_scene(96, 64, (20, 10, 60, 50))
    Image.fromarray(img).save(tmp_path / "a.png")
    rect = {
        "id": "r1",
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": 96,
        "original_height": 64,
        "value": {
            "x": 20 / 96 * 100,
            "y": 10 / 64 * 100,
            "width": 40 / 96 * 100,
            "height": 40 / 64 * 100,
            "rotation": 0,
            "rectanglelabels": ["Disc"],
        },
    }
    brush = {
        "id": "b1",
        "type": "brushlabels",
        "from_name": "mask",
        "to_name": "image",
        "original_width": 96,
        "original_height": 64,
        "value": {"format": "rle", "rle": ls_results.mask_to_ls_rle(mask), "brushlabels": ["Blob"]},
    }
    prompt = {
        "id": "t1",
        "type": "textarea",
        "from_name": "prompt",
        "to_name": "image",
        "value": {"text": ["the red disc"]},
    }
    tasks = [
        {
            "id": 1,
            "data": {"image": str(tmp_path / "a.png")},
            "annotations": [{"id": 5, "result": [rect, brush]}],
        },
        {
            "id": 2,
            "data": {"image": str(tmp_path / "a.png")},
            "annotations": [{"id": 6, "result": [rect, prompt]}],
        },
        {"id": 3, "data": {"image": str(tmp_path / "a.png")}, "annotations": []},
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    ds = read_label_studio(tmp_path / "export.json", tiny_config)
    assert sorted(r.text for r in ds.records) == ["Blob", "Disc", "the red disc"]
    blob = next(i for i, r in enumerate(ds.records) if r.text == "Blob")
    sample = ds[blob]
    assert mask_iou(sample.masks[0], mask) == 1.0
    np.testing.assert_allclose(ds.records[blob].boxes[0], mask_to_box(mask))
    tasks[0]["data"]["image"] = str(tmp_path / "gone.png")
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    with pytest.raises(FileNotFoundError, match="task 1"):
        read_label_studio(tmp_path / "export.json", tiny_config)


def test_label_studio_box_and_mask_of_one_object_are_one_box(tmp_path, tiny_config):
    """As the backend writes them: a rectangle and its brush mask (parentID), each region
    with the prompt that found it (meta), two prompts typed on one annotation."""
    Image.new("RGB", (96, 64)).save(tmp_path / "a.png")
    disc = np.zeros((64, 96), bool)
    disc[10:30, 20:44] = True
    blob = np.zeros((64, 96), bool)
    blob[40:60, 60:90] = True
    results = []
    for rid, mask, label, prompt in (
        ("r1", disc, "Disc", "the red disc"),
        ("r2", blob, "Blob", "the blob"),
    ):
        box = mask_to_box(mask)
        results.append(
            ls_results.rectangle_result(
                box, [label], width=96, height=64, region_id=rid, prompt=prompt
            )
        )
        results.append(
            ls_results.brush_result(
                mask, [label], from_name="mask", region_id=rid + "m", parent_id=rid, prompt=prompt
            )
        )
    results.append(ls_results.textarea_result(["the red disc", "the blob"]))
    tasks = [
        {
            "id": 1,
            "data": {"image": str(tmp_path / "a.png")},
            "annotations": [{"id": 5, "result": results}],
        }
    ]
    ds = read_label_studio(tasks, tiny_config)
    by_text = {r.text: r for r in ds.records}
    assert sorted(by_text) == ["the blob", "the red disc"]  # each region's own prompt
    for text, mask in (("the red disc", disc), ("the blob", blob)):
        rec = by_text[text]
        assert len(rec.boxes) == 1  # one object: not a second box from its mask
        np.testing.assert_allclose(rec.boxes[0], mask_to_box(mask))
        sample = ds[ds.records.index(rec)]
        assert mask_iou(sample.masks[0], mask) == 1.0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stage": 2, "data": [{"kind": "refexp", "path": "x"}], "lrr": 1})
    with pytest.raises(ValueError, match="unknown stage"):
        TrainConfig.from_dict({"stage": 7, "data": [{"kind": "refexp", "path": "x"}]})
    with pytest.raises(ValueError, match="unknown data kind"):
        TrainConfig.from_dict({"stage": 2, "data": [{"kind": "parquet", "path": "x"}]})
    with pytest.raises(ValueError, match="at least one source"):
        TrainConfig.from_dict({"stage": 2})


def test_cli_train_through_the_accelerate_launcher(tmp_path):
    """`accelerate launch` with one CPU process runs the same entry point (the multi-GPU
    path with FSDP uses this launcher; here it proves the launch path is live)."""
    write_refexp(tmp_path)
    cfg = {
        "stage": 2,
        "init": "tiny",
        "data": [{"kind": "refexp", "path": "train.jsonl"}],
        "steps": 2,
        "batch_size": 2,
        "output_dir": "run",
        "log_every": 1,
    }
    (tmp_path / "train.yaml").write_text(json.dumps(cfg))  # JSON is valid YAML
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "nextchat_cli.main",
            "train",
            "--config",
            str(tmp_path / "train.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{") :])
    assert report["steps"] == 2 and Path(report["final"]).name == "final"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_evaluate_command_runs_a_checkpoint_on_refexp_records(
    tmp_path, tiny_model, tiny_tokenizer, capsys
):
    from nextchat_cli.main import main
    from nextchat_core.build import save_pretrained

    data = write_refexp(tmp_path)
    ckpt = save_pretrained(tiny_model, tmp_path / "ckpt", tiny_tokenizer)
    rc = main(
        [
            "evaluate",
            "--refexp",
            str(data),
            "--checkpoint",
            str(ckpt),
            "-o",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_records"] == 6  # the chat record is not a referring expression
    assert report["n_mask_records"] == 6
    assert 0.0 <= report["rec_acc"] <= 1.0 and report["seconds"] > 0
    assert capsys.readouterr().out.strip()


def test_platt_scaling_recovers_known_weights():
    """The calibration fit (training.evaluation._platt, LBFGS logistic regression) finds
    the weights the labels were drawn with."""
    import torch

    from training.evaluation import _platt

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5)
    y = torch.bernoulli(p, generator=gen)
    a, b, c = _platt(x, y)
    assert (a, b, c) == pytest.approx((2.0, -1.0, 0.5), abs=0.1)
    (a1, c1) = _platt(x[:, :1], y)  # one feature: the other's effect averages out
    assert 0.5 < a1 < 2.0 and c1 > 0


def test_presence_records_teach_yes_for_corrected_boxes(tiny_config, tiny_tokenizer):
    """A corrected box also becomes the presence question its confidence asks, answered
    "Yes" with the same boxes (so a new word is not held back by the gate after retraining)."""
    from nextchat_core.conversation import IGNORE_INDEX, encode_conversation, exists_turns
    from training.data import Record, presence_records, record_to_sample

    img, _ = make_scene()
    box = [10.0, 10.0, 30.0, 30.0]
    rec = Record(img, "rec", "the pink cross", None, [box, box], None, 64, 64, "t")
    absent = Record(img, "rec", "the cyan heart", None, [], None, 64, 64, "t")
    caption = Record(img, "caption", "", "a cross", [box], None, 64, 64, "t")
    (chat,) = presence_records([rec, absent, caption], tiny_config)
    assert chat.task == "chat" and chat.boxes == [box, box]
    assert chat.text == exists_turns("the pink cross", tiny_config)[0].text
    sample = record_to_sample(chat, tiny_config)
    enc = encode_conversation(sample.turns, tiny_tokenizer, tiny_config, num_image_tokens=4)
    assert enc.num_boxes == 2
    # the first answer token the model learns is the one the presence pass reads
    predictor = NextChatPredictor(build_model(tiny_config), tiny_tokenizer)
    first = next(t for t in enc.labels if t != IGNORE_INDEX)
    assert first == predictor._answer_token(tiny_config.template.yes_answer)
