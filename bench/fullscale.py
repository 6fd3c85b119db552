"""Full-scale speed: the released NExT-Chat-7B-336 shapes with random weights, per phase.

    python bench/fullscale.py --preset nextchat-7b-336 --device cuda     # on a GPU
    python bench/fullscale.py --preset tiny --device cpu --iters 2       # anywhere

Builds the preset directly on the device (bf16 on CUDA; no download: real shapes, random
weights), then measures: CLIP encode, SAM image encoder, prefill, decode ms/token, box
decode, mask decoder; the end-to-end latency of one image-prompt -> box + mask answer at
batch 1; throughput at batch 8 and 32 image-prompts; several prompts on one image (CLIP
and SAM embeddings computed once); peak memory. Then training steps at that scale: stage 2
with LoRA on the LLM (bf16, gradient checkpointing) and stage 3 (mask decoder + prompt MLP).

Random weights never choose ``<at>`` by themselves, so answers are forced to the REC shape
``Answer: <at> <boxes> .</s>`` through ``generate``'s ``logits_processor``: every phase runs
exactly as it does for a trained model, with a realistic answer length.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextchat_core.batch import collate, grounding_sample
from nextchat_core.build import build_model
from nextchat_core.config import get_preset
from nextchat_core.conversation import encode_conversation, grounding_turns
from nextchat_core.predictor import NextChatPredictor, Query
from nextchat_core.tokenizer import train_bpe_tokenizer
from training.engine import EngineSettings, make_accelerator, prepare, training_step
from training.lora import LoraSettings
from training.stages import get_stage

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.",
    "Where is the man in the red jacket on the left in the image? Answer: .",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def forced_answer(tokenizer, config) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Force ``Answer: <at> <boxes> .</s>`` so random weights produce one box per prompt."""
    tk = config.tokens
    script = (
        tokenizer(" Answer:", add_special_tokens=False)["input_ids"]
        + [tk.at_id, tk.boxes_id]
        + tokenizer(" .", add_special_tokens=False)["input_ids"]
        + [tk.eos_id]
    )

    def processor(step: int, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[:, script[min(step, len(script) - 1)]] = 0.0
        return forced

    processor.length = len(script)  # type: ignore[attr-defined]
    return processor


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8) for _ in range(n)]


def bench_inference(args, device, dtype, rows: list[tuple[str, str]], results: dict) -> None:
    cfg = get_preset(args.preset)
    cfg.tokens.pad_id = 3  # the stand-in BPE's pad (the LLaMA tokenizer is not available offline)
    cfg.llm.attn_implementation = args.attn
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    sync(device)
    results["build_s"] = time.perf_counter() - t0
    tokenizer = train_bpe_tokenizer(CORPUS * 4, config=cfg)
    predictor = NextChatPredictor(
        model, tokenizer, device=device, dtype=dtype, max_new_tokens=8, mask_iou_threshold=-1.0
    )
    proc = forced_answer(tokenizer, cfg)
    params = sum(p.numel() for p in model.parameters())
    rows.append(
        ("parameters", f"{params / 1e9:.3f} B" if params > 1e8 else f"{params / 1e6:.2f} M")
    )
    rows.append(("build (random init on device)", f"{results['build_s']:.1f} s"))

    imgs = images(32)
    processed = predictor.processor(imgs[0])
    pix, sam_pix = predictor.processor.tensors([processed], device=device, dtype=dtype)
    ac = predictor._context  # inference_mode + autocast exactly as the predictor runs

    def run(fn):
        def wrapped():
            with ac():
                return fn()

        return wrapped

    n_img = model.num_image_tokens
    enc = encode_conversation(
        grounding_turns("the man in the red jacket on the left", cfg),
        tokenizer,
        cfg,
        num_image_tokens=n_img,
        add_generation_prompt=True,
    )
    ids = torch.tensor([enc.input_ids], device=device)
    mask = torch.ones_like(ids)
    phase = {}
    phase["preprocess: PIL resize (CPU)"] = timed(
        lambda: predictor.processor(imgs[1]), device, args.iters
    )
    phase["preprocess: normalize + pad (on device)"] = timed(
        lambda: predictor.processor.tensors([processed], device=device, dtype=dtype),
        device,
        args.iters,
    )
    phase["vision tower + projector"] = timed(
        run(lambda: model.encode_images(pix)), device, args.iters
    )
    phase["SAM image encoder"] = timed(
        run(lambda: model.encode_sam_images(sam_pix)), device, args.iters
    )
    with ac():
        feats = model.encode_images(pix)
        sam_emb = model.encode_sam_images(sam_pix)

    def prefill():
        embeds = model.embed_inputs(ids, feats, None)
        return model._llm(embeds, mask)

    phase[f"prefill ({ids.shape[1]} tokens)"] = timed(run(prefill), device, args.iters)

    # decode: one cached step at a time after the prefill
    from transformers import DynamicCache

    from nextchat_core.modeling.nextchat import _CACHE_KWARG

    def decode_steps(n: int):
        def go():
            cache = DynamicCache(config=model.language_model.config)
            embeds = model.embed_inputs(ids, feats, None)
            m = mask.clone()
            pos = m.cumsum(-1) - 1
            h = model._llm(embeds, m, position_ids=pos, use_cache=True, **{_CACHE_KWARG: cache})[
                :, -1
            ]
            pos = pos[:, -1:]
            emb = model.language_model.get_input_embeddings()
            for _ in range(n):
                tok = model.language_model.get_output_embeddings()(h).argmax(-1)
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                pos = pos + 1
                h = model._llm(
                    emb(tok)[:, None], m, position_ids=pos, use_cache=True, **{_CACHE_KWARG: cache}
                )[:, -1]

        return go

    t_short = timed(run(decode_steps(1)), device, args.iters)
    t_long = timed(run(decode_steps(17)), device, args.iters)
    phase["decode, per token (KV cache)"] = (t_long - t_short) / 16
    h = torch.randn(1, cfg.llm.hidden_size, device=device, dtype=dtype)
    phase["box decode (loc_decoder + loc_encoder)"] = timed(
        run(lambda: model.loc_encoder(model.loc_decoder(h))), device, args.iters
    )
    box = torch.tensor([[0.2, 0.3, 0.6, 0.7]], device=device)
    phase["mask decoder (prompt MLP + SAM decoder, 1 box)"] = timed(
        run(lambda: model.predict_masks(sam_emb, h, box, width=640, height=480)), device, args.iters
    )
    for k, v in phase.items():
        rows.append((k, f"{v * 1e3:.2f} ms"))
    results["phases_ms"] = {k: v * 1e3 for k, v in phase.items()}
    results["prompt_tokens"] = int(ids.shape[1])

    # decode through generate (forced non-eos tokens), eager vs static cache vs CUDA graphs
    filler = tokenizer(" the", add_special_tokens=False)["input_ids"][0]

    def keep_going(step: int, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[:, filler] = 0.0
        return forced

    def gen(n: int, **kw):
        def go():
            model.generate(ids, mask, feats, max_new_tokens=n, logits_processor=keep_going, **kw)

        return go

    variants = {"eager (dynamic KV cache)": {}, "static cache": {"static_cache": True}}
    if device.type == "cuda" and not args.no_compile:
        variants["CUDA graphs (torch.compile reduce-overhead)"] = {"compile_decoder": True}
    results["decode_ms_per_token"] = {}
    for name, kw in variants.items():
        try:
            t_start = time.perf_counter()
            run(gen(17, **kw))()  # compiles / captures when asked
            first = time.perf_counter() - t_start
            per = (
                timed(run(gen(33, **kw)), device, args.iters)
                - timed(run(gen(1, **kw)), device, args.iters)
            ) / 32
            rows.append(
                (
                    f"decode per token via generate, {name}",
                    f"{per * 1e3:.2f} ms (first call {first:.1f} s)",
                )
            )
            results["decode_ms_per_token"][name] = per * 1e3
        except Exception as exc:  # a benchmark reports a failed variant and goes on
            rows.append(
                (
                    f"decode per token via generate, {name}",
                    f"FAILED: {type(exc).__name__}: {str(exc)[:200]}",
                )
            )
    fast = (
        {"compile_decoder": True}
        if "CUDA graphs (torch.compile reduce-overhead)" in results["decode_ms_per_token"]
        else {}
    )

    # end to end through the predictor (what the backend calls)
    reset_peak(device)
    q1 = [Query(0, "the man in the red jacket on the left")]
    e2e = timed(
        lambda: predictor.predict_batch(imgs[:1], q1, logits_processor=proc), device, args.iters
    )
    check = predictor.predict_batch(imgs[:1], q1, logits_processor=proc)[0]
    assert len(check.detections) == 1 and check.detections[0].mask is not None, check
    rows.append(("end to end, 1 image-prompt -> box + mask (batch 1)", f"{e2e * 1e3:.1f} ms"))
    results["e2e_batch1_ms"] = e2e * 1e3
    if fast:
        e2e_fast = timed(
            lambda: predictor.predict_batch(imgs[:1], q1, logits_processor=proc, **fast),
            device,
            args.iters,
            warmup=2,
        )
        rows.append(("end to end, batch 1, CUDA-graph decode", f"{e2e_fast * 1e3:.1f} ms"))
        results["e2e_batch1_graphs_ms"] = e2e_fast * 1e3
    for b in args.batches:
        qs = [Query(i, "the man in the red jacket on the left") for i in range(b)]
        for label, kw in [("", {})] + ([(", CUDA-graph decode", fast)] if fast else []):
            t = timed(
                lambda qs=qs, b=b, kw=kw: predictor.predict_batch(
                    imgs[:b], qs, batch_size=b, logits_processor=proc, **kw
                ),
                device,
                max(1, args.iters // 2),
                warmup=2 if kw else 1,
            )
            rows.append(
                (
                    f"throughput, batch {b} image-prompts{label}",
                    f"{b / t:.1f} image-prompts/s ({t * 1e3:.0f} ms)",
                )
            )
            results[f"throughput_b{b}{'_graphs' if kw else ''}"] = b / t
    n_prompts = 8
    prompts = [f"the object number {i} on the left" for i in range(n_prompts)]

    def many():
        predictor.set_image(imgs[0])
        predictor.predict(prompts, logits_processor=proc)

    t = timed(many, device, max(1, args.iters // 2))
    rows.append(
        (
            f"{n_prompts} prompts on one image (embeddings once)",
            f"{t * 1e3:.0f} ms = {t / n_prompts * 1e3:.1f} ms/prompt",
        )
    )
    results["one_image_8_prompts_ms"] = t * 1e3
    mem = peak_memory_mb(device)
    rows.append(
        ("peak memory, inference", f"{mem / 1024:.1f} GiB" if mem > 4096 else f"{mem:.0f} MiB")
    )
    results["peak_inference_mb"] = mem


def bench_training(args, device, dtype, rows, results, stages=((2, True), (3, False))) -> None:
    """Training steps per stage (``(stage, lora)`` pairs): samples/s and peak memory."""
    for stage, lora in stages:
        cfg = get_preset(args.preset)
        cfg.tokens.pad_id = 3
        cfg.llm.attn_implementation = args.attn
        torch.manual_seed(0)
        model = build_model(cfg, device=device, dtype=dtype)
        tokenizer = train_bpe_tokenizer(CORPUS * 4, config=cfg)
        spec = get_stage(stage)
        settings = EngineSettings(
            lr=2e-5,
            precision="bf16" if device.type == "cuda" else "fp32",
            gradient_checkpointing=(stage == 2 and device.type == "cuda"),
            lora=LoraSettings() if lora else None,
        )
        groups = prepare(model, spec, settings)
        accelerator = make_accelerator(settings, cpu=device.type == "cpu")
        optimizer = torch.optim.AdamW(groups)
        model, optimizer = accelerator.prepare(model, optimizer)
        imgs = images(args.train_batch, seed=stage)
        samples = []
        for i, img in enumerate(imgs):
            m = np.zeros(img.shape[:2], dtype=bool)
            m[100:300, 200:400] = True
            samples.append(
                grounding_sample(
                    img,
                    f"the object number {i} on the left",
                    [(200, 100, 400, 300)],
                    cfg,
                    masks=[m],
                )
            )
        batch = collate(
            samples,
            tokenizer=tokenizer,
            config=cfg,
            num_image_tokens=model.num_image_tokens,
            with_masks=spec.masks,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        weights = spec.loss_weights(cfg.loss)
        reset_peak(device)

        def step(
            accelerator=accelerator, model=model, batch=batch, optimizer=optimizer, weights=weights
        ):
            training_step(
                accelerator, model, batch, optimizer, None, loss_weights=weights, clip_norm=1.0
            )

        t = timed(step, device, max(2, args.iters // 2))
        trainable = sum(p.numel() for g in groups for p in g["params"])
        what = ["LoRA r16 on LLM" if lora else ", ".join(spec.trainable), settings.precision]
        if settings.gradient_checkpointing:
            what.append("grad ckpt")
        name = f"train stage {stage} ({', '.join(what)})"
        mem = peak_memory_mb(device)
        rows.append(
            (
                name,
                f"{args.train_batch / t:.2f} samples/s at batch {args.train_batch}, "
                f"{trainable / 1e6:.2f} M trainable, peak {mem / 1024:.1f} GiB",
            )
        )
        results[f"train_stage{stage}"] = {
            "samples_per_s": args.train_batch / t,
            "peak_mb": mem,
            "trainable": trainable,
            "batch": args.train_batch,
        }
        del model, optimizer, accelerator
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default="nextchat-7b-336", choices=["tiny", "demo", "nextchat-7b-336"]
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--attn", default="sdpa", help="LLM attention: sdpa (default) or eager")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile / CUDA-graph variant"
    )
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[tuple[str, str]] = []
    results: dict = {
        "preset": args.preset,
        "device": name,
        "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    bench_inference(args, device, dtype, rows, results)
    if not args.skip_training:
        bench_training(args, device, dtype, rows, results)
    width = max(len(r[0]) for r in rows)
    print(
        f"\nfullscale benchmark: preset {args.preset} on {name} ({dtype}), torch {torch.__version__}"
    )
    print(f"{'phase'.ljust(width)} | result")
    print(f"{'-' * width}-|-{'-' * 40}")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
