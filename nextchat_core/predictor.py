"""The stateful runtime API: image in, answers (text, boxes, masks, scores) out.

    predictor = NextChatPredictor.from_pretrained("path/to/checkpoint")
    predictor.set_image("street.jpg")            # CLIP + SAM embeddings, cached
    answers = predictor.predict(["the red car", "all people"])
    answers[0].detections[0].box                 # original-pixel xyxy
    answers[0].detections[0].mask                # HxW bool at original resolution

Scores (NExT-Chat has none; users need one to sort and threshold). A region's ``score``
is its presence times its quality:

- presence (``config.score.presence``): ``"exists"`` - p(yes) / (p(yes) + p(no)) for the
  first answer token of "Is there {expression}?" (``conversation.exists_turns``; one
  teacher-forced pass per prompt, batched with the prompts' generation, on the image
  tokens already encoded); ``"at"`` - the probability the model gave the ``<at>`` token at
  the step that produced the box (checkpoints that never learned yes/no);
- quality: SAM's predicted IoU of the region's mask (clamped to [0, 1]) when masks are
  made, else 1;
- calibrated, when the checkpoint carries a fitted ``score.calibration`` (Platt scaling
  of both logits: ``nextchat_core.config.ScoreConfig``), so that a score of 0.8 is right
  about 8 times in 10 (``nextchat evaluate`` reports the ECE and draws the diagram).

``presence=`` / ``presence_threshold=`` override the checkpoint's choice. With
``"exists"``, a prompt whose presence is under ``presence_threshold`` (default the
checkpoint's ``score.presence_threshold``, 0.5: the model would answer "No") returns no
region; its boxes are kept in ``Answer.rejected``. Measured on the bundled model
(bench/score_candidates.py, bench/RESULTS.md): p(`<at>`) is about 1 for every box and
separates nothing (AUROC 0.48); p(yes) x SAM IoU separates right from wrong best. An
answer's ``score`` is the probability that it is right as returned: its weakest region's
score, or, with no region, 1 - presence (0 under ``"at"``, which says nothing then).

Decoding: greedy by default - what NExT-Chat's published tables were measured with (its
eval configs: ``num_beams=1``), deterministic (the same task gives the same pre-label on
every run) and the cheapest; ``num_beams=5`` is what its public demo uses, and
``do_sample`` samples. Pass either to ``predict`` / ``predict_batch``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from . import frames
from .build import from_pretrained
from .config import NextChatConfig
from .conversation import (
    IGNORE_INDEX,
    Turn,
    caption_turns,
    chat_turns,
    encode_conversation,
    exists_turns,
    grounding_turns,
    refer_regions,
)
from .device import resolve_device
from .frames import SamGeometry
from .image_processing import ImageProcessor, ProcessedImage
from .modeling import NextChatModel
from .tokenizer import decode_text

log = logging.getLogger(__name__)

Task = Literal["ground", "chat", "caption"]
MAX_PROMPT_CHARS = 2000


def prompt_problem(prompt: str, *, task: str = "ground") -> str | None:
    """Why ``prompt`` cannot be sent to the model, or ``None`` when it can (a caption's
    input is its box, so its prompt may be empty). The one prompt rule: the predictor
    raises it as ``ValueError``, the backend answers it per task."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # the tokenizer cannot take it
        return (
            f"the prompt holds a character that is not text (a lone UTF-16 surrogate "
            f"{prompt[exc.start]!r} at position {exc.start}): send valid Unicode"
        )
    if not prompt.strip() and task != "caption":
        return "the prompt is empty: type what to find, e.g. 'all cars'"
    if len(prompt) > MAX_PROMPT_CHARS:
        return (
            f"the prompt has {len(prompt)} characters, more than the {MAX_PROMPT_CHARS} "
            "allowed: shorten it"
        )
    return None


@dataclass
class Detection:
    """One located object. ``box``: original-pixel xyxy (clipped to the image);
    ``mask``: ``HxW`` bool at original resolution, or ``None`` (not asked for, or SAM's
    predicted IoU below the threshold); scores as described in the module docstring."""

    box: np.ndarray
    score: float
    mask: np.ndarray | None = None
    mask_iou: float | None = None  # SAM's predicted IoU of the mask, clamped to [0, 1]
    at_score: float | None = None  # the <at> token's probability at this box's step


@dataclass
class Answer:
    """The model's reply to one prompt about one image. ``text`` keeps the
    ``<at> <boxes>`` pairs, one per detection, in order. ``truncated``: the answer was cut
    off by ``max_new_tokens`` before the model ended it (it may have had more to list).
    ``presence``: the prompt's p(yes) (``None`` when not asked: ``"at"`` scoring, or not
    a grounding prompt); ``rejected``: the boxes the presence gate held back."""

    prompt: str
    text: str
    detections: list[Detection] = field(default_factory=list)
    score: float = 0.0
    truncated: bool = False
    presence: float | None = None
    rejected: list[Detection] = field(default_factory=list)


@dataclass
class Query:
    """One prompt for one image of a batch. ``boxes``: original-pixel xyxy input regions
    (``caption`` task: exactly one), referred to in ``prompt`` by index (``"what is [0]
    holding?"``) or by ``<at> <boxes>`` slots in order."""

    image_index: int
    prompt: str
    task: Task = "ground"
    boxes: Sequence[Sequence[float]] | None = None


@dataclass
class SamImage:
    """One image's SAM embedding, what :meth:`NextChatPredictor.segment` needs: computed
    once per image by :meth:`NextChatPredictor.sam_image`, reused for every click.
    ``embedding``: ``1xCxgxg``; ``width``/``height``: the original size in pixels."""

    embedding: torch.Tensor
    width: int
    height: int


@dataclass
class Segment:
    """The mask for one set of clicks/box: ``mask`` ``HxW`` bool at original resolution;
    ``score``: SAM's predicted IoU of it, clamped to [0, 1]."""

    mask: np.ndarray
    score: float


@dataclass
class _Encoded:
    processed: ProcessedImage
    features: torch.Tensor  # 1xNxH
    sam_embedding: torch.Tensor | None = None  # 1xCxgxg
    sam_ready: Any = None  # a torch.cuda.Event while SAM still runs on the side stream

    def sam(self) -> torch.Tensor | None:
        """The SAM embedding, once the side stream that computes it has finished."""
        if self.sam_ready is not None:
            torch.cuda.current_stream().wait_event(self.sam_ready)
            self.sam_ready = None
        return self.sam_embedding


class NextChatPredictor:
    """Runs a :class:`NextChatModel` on images: embeddings once per image, many prompts."""

    def __init__(
        self,
        model: NextChatModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 48,
        mask_iou_threshold: float | None = None,
        presence: Literal["exists", "at"] | None = None,
        presence_threshold: float | None = None,
        sam_batch_size: int = 4,
    ) -> None:
        self.device = (
            torch.device(resolve_device(str(device)))
            if device is not None
            else next(model.parameters()).device
        )
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        if dtype is not None:
            self.model = self.model.to(dtype)
        self.tokenizer = tokenizer
        self.config = model.config
        self.processor = ImageProcessor(self.config)
        self.max_new_tokens = max_new_tokens
        self.mask_iou_threshold = (
            self.config.sam.mask_iou_threshold if mask_iou_threshold is None else mask_iou_threshold
        )
        self.presence = self.config.score.presence if presence is None else presence
        if self.presence not in ("exists", "at"):
            raise ValueError(f"presence must be 'exists' or 'at', got {self.presence!r}")
        self.presence_threshold = (
            self.config.score.presence_threshold
            if presence_threshold is None
            else presence_threshold
        )
        self._num_image_tokens = model.num_image_tokens
        self._image: _Encoded | None = None
        self._answer_tokens: dict[str, int] = {}
        # SAM's encoder runs in chunks (its activations dominate peak memory) and, on CUDA,
        # on a side stream: decoding is launch-bound, so the GPU has room for SAM meanwhile.
        self.sam_batch_size = sam_batch_size
        # Decoding and resizing (PIL releases the GIL) run in threads, one image each.
        self._pool = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="nextchat-img"
        )
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        config: NextChatConfig | None = None,
        clip_path: str | Path | None = None,
        **kwargs: Any,
    ) -> NextChatPredictor:
        """Load a checkpoint directory of either layout (see
        :func:`nextchat_core.build.from_pretrained`; a released directory's config is derived
        from its own files unless ``config`` is given) and wrap it."""
        ckpt = from_pretrained(path, device=device, dtype=dtype, config=config, clip_path=clip_path)
        return cls(ckpt.model, ckpt.tokenizer, device=device, dtype=dtype, **kwargs)

    # ---------------------------------------------------------------- one image
    def set_image(self, image: Any, *, with_masks: bool = True) -> None:
        """Compute and cache the image's vision-tower tokens (and SAM embedding)."""
        self._image = self._encode([image], with_masks=with_masks)[0]

    def predict(
        self,
        prompts: str | Sequence[str],
        *,
        task: Task = "ground",
        boxes: Sequence[Sequence[float]] | None = None,
        with_masks: bool = True,
        **generate_kwargs: Any,
    ) -> list[Answer]:
        """Answers for one or many prompts about the image given to :meth:`set_image`."""
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict()")
        if isinstance(prompts, str):
            prompts = [prompts]
        if with_masks and self._image.sam_embedding is None:
            self._encode_sam([self._image])
        queries = [Query(0, p, task, boxes) for p in prompts]
        return self._answer([self._image], queries, with_masks=with_masks, **generate_kwargs)

    # ------------------------------------------------------ click segmentation
    def sam_image(self, image: Any) -> SamImage:
        """SAM's image embedding of ``image`` (no vision tower, no LLM): the expensive part
        of click segmentation, to compute once per image and keep."""
        processed = self.processor(image)
        with self._context():
            _, sam_pixels = self.processor.tensors(
                [processed], device=self.device, dtype=self._input_dtype
            )
            assert sam_pixels is not None  # tensors(sam=True) always returns them
            embedding = self.model.encode_sam_images(sam_pixels)
        return SamImage(embedding, processed.width, processed.height)

    def segment(
        self,
        image: SamImage,
        *,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
    ) -> Segment:
        """The mask SAM draws for clicks and/or a box on ``image``, as segment-anything's
        ``SamPredictor.predict``: ``points`` ``Nx2`` original-pixel (x, y) with
        ``point_labels`` ``N`` (1 positive, 0 negative), ``box`` original-pixel xyxy.

        One lone click is ambiguous (part or whole?): as segment-anything advises, SAM's
        three candidates are made and the one with the highest predicted IoU is kept;
        with more prompts a single mask is asked for."""
        w, h = image.width, image.height
        size = self.config.sam.image_size
        coords = labels = sam_box = None
        n_points = 0
        if points is not None or point_labels is not None:
            pts = np.asarray(points if points is not None else [], dtype=np.float64)
            lab = np.asarray(point_labels if point_labels is not None else [])
            if pts.ndim != 2 or pts.shape[1:] != (2,) or lab.shape != (len(pts),):
                raise ValueError(
                    f"points must be Nx2 original-pixel (x, y) with N point_labels, got "
                    f"points of shape {pts.shape} and labels of shape {lab.shape}"
                )
            if not np.isin(lab, (0, 1)).all():
                raise ValueError(
                    f"point_labels must be 1 (positive) or 0 (negative), got {lab.tolist()}"
                )
            out = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
            if out.any():
                raise ValueError(
                    f"point {pts[out][0].tolist()} lies outside the {w}x{h} image "
                    "(expected original-pixel x in [0, width], y in [0, height])"
                )
            n_points = len(pts)
            if n_points:
                sam_pts = frames.points_pixel_to_sam(pts, w, h, size)
                coords = torch.tensor(sam_pts[None], dtype=torch.float32, device=self.device)
                labels = torch.tensor(lab[None], dtype=torch.int, device=self.device)
        if box is not None:
            px = frames.check_pixel_box(box, w, h, what="box prompt", tolerance=0.5)
            sam_box = torch.tensor(
                frames.pixel_to_sam(frames.clip_boxes(px, w, h), w, h, size)[None],
                dtype=torch.float32,
                device=self.device,
            )
        if coords is None and sam_box is None:
            raise ValueError("segment needs at least one point or a box")
        with self._context():
            m = self.model.predict_prompt_masks(
                image.embedding,
                point_coords=coords,
                point_labels=labels,
                box=sam_box,
                multimask_output=n_points == 1 and sam_box is None,
            )
            best = int(m.iou_predictions.argmax())
            full = frames.sam_mask_to_original(m.logits[best], SamGeometry(w, h, size)) > 0
        return Segment(mask=full.cpu().numpy(), score=float(m.iou_predictions[best].clamp(0, 1)))

    # -------------------------------------------------------------- many images
    def predict_batch(
        self,
        images: Sequence[Any],
        queries: Sequence[Query],
        *,
        with_masks: bool = True,
        batch_size: int = 8,
        **generate_kwargs: Any,
    ) -> list[Answer]:
        """Answers for ``queries`` over ``images`` (each image encoded once, however many
        queries name it), generated ``batch_size`` queries at a time; same order as
        ``queries``."""
        for q in queries:
            if not 0 <= q.image_index < len(images):
                raise ValueError(
                    f"query image_index {q.image_index} is outside the {len(images)} images"
                )
        encoded: list[_Encoded] = []
        for start in range(0, len(images), batch_size):
            encoded.extend(self._encode(images[start : start + batch_size], with_masks=with_masks))
        answers: list[Answer] = []
        for start in range(0, len(queries), batch_size):
            answers.extend(
                self._answer(
                    encoded,
                    list(queries[start : start + batch_size]),
                    with_masks=with_masks,
                    **generate_kwargs,
                )
            )
        return answers

    # ----------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cuda", dtype=self.dtype):
                    yield
            else:
                yield

    def _encode(self, images: Sequence[Any], *, with_masks: bool) -> list[_Encoded]:
        processed = (
            list(self._pool.map(self.processor, images))
            if len(images) > 1
            else [self.processor(images[0])]
        )
        with self._context():
            pixels, _ = self.processor.tensors(
                processed, device=self.device, dtype=self._input_dtype, sam=False
            )
            feats = self.model.encode_images(pixels)
        encoded = [_Encoded(p, feats[i : i + 1]) for i, p in enumerate(processed)]
        if with_masks:
            self._encode_sam(encoded)
        return encoded

    def _encode_sam(self, encoded: list[_Encoded]) -> None:
        """SAM image embeddings for ``encoded`` (chunked; asynchronous on CUDA)."""
        side = self._side_stream
        main = None
        if side is not None:
            main = torch.cuda.current_stream(self.device)
            side.wait_stream(main)
        with (
            self._context(),
            torch.cuda.stream(side) if side is not None else contextlib.nullcontext(),
        ):
            for start in range(0, len(encoded), self.sam_batch_size):
                chunk = encoded[start : start + self.sam_batch_size]
                _, sam_pixels = self.processor.tensors(
                    [e.processed for e in chunk], device=self.device, dtype=self._input_dtype
                )
                assert sam_pixels is not None  # tensors(sam=True) always returns them
                emb = self.model.encode_sam_images(sam_pixels)
                if main is not None:
                    emb.record_stream(main)  # used on the main stream after the event
                for j, e in enumerate(chunk):
                    e.sam_embedding = emb[j : j + 1]
        if side is not None:
            event = torch.cuda.Event()
            event.record(side)
            for e in encoded:
                e.sam_ready = event

    @property
    def _input_dtype(self) -> torch.dtype:
        return self.dtype or torch.float32

    def _turns(self, q: Query) -> tuple[list[Turn], list[list[float]]]:
        prompt = q.prompt
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        problem = prompt_problem(prompt, task=q.task)
        if problem is not None:
            raise ValueError(problem)
        boxes = [list(map(float, b)) for b in (q.boxes or [])]
        if boxes and q.task != "caption" and self.config.tokens.at not in prompt:
            # Regions named by index, "[0]", as NExT-Chat's data does (refer_regions).
            prompt, boxes = refer_regions(prompt, boxes)
        marker = self.config.tokens.image_placeholder
        if q.task == "caption":
            if len(boxes) != 1:
                raise ValueError(f"a caption query needs exactly one input box, got {len(boxes)}")
            return caption_turns(self.config), boxes
        if q.task == "chat" or marker in prompt:
            return chat_turns(prompt, self.config), boxes
        if q.task != "ground":
            raise ValueError(f"unknown task {q.task!r}; expected 'ground', 'chat' or 'caption'")
        return grounding_turns(prompt, self.config), boxes

    def exists(self, prompts: str | Sequence[str]) -> list[float]:
        """For the image of :meth:`set_image`: the model's probability that each prompt's
        object is in the image - ``p(yes) / (p(yes) + p(no))`` for the first answer token
        of :func:`~nextchat_core.conversation.exists_turns` (one teacher-forced forward
        pass per prompt, all prompts in one batch; no decoding)."""
        if self._image is None:
            raise RuntimeError("call set_image(image) before exists()")
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._exists([self._image], [Query(0, p) for p in prompts])

    def _exists(self, encoded: list[_Encoded], queries: Sequence[Query]) -> list[float]:
        tpl = self.config.template
        rows = []
        for q in queries:
            rows.append(
                encode_conversation(
                    exists_turns(q.prompt, self.config),
                    self.tokenizer,
                    self.config,
                    num_image_tokens=self._num_image_tokens,
                    add_generation_prompt=True,
                ).input_ids
            )
        yes, no = self._answer_token(tpl.yes_answer), self._answer_token(tpl.no_answer)
        ids, mask = self._left_padded(rows)
        feats = torch.cat([encoded[q.image_index].features for q in queries])
        with self._context():
            model = self.model
            embeds = model.embed_inputs(ids.to(self.device), feats, None)
            h = model._llm(embeds, mask.to(self.device))[:, -1]
            logits = model.language_model.get_output_embeddings()(h).float()
            pair = logits[:, [yes, no]].softmax(-1)[:, 0]
        return [float(v) for v in pair.cpu()]

    def _answer_token(self, answer: str) -> int:
        """The first token the model writes for an answer starting with ``answer``."""
        cached = self._answer_tokens.get(answer)
        if cached is None:
            enc = encode_conversation(
                chat_turns("x", self.config, answer=answer),
                self.tokenizer,
                self.config,
                num_image_tokens=self._num_image_tokens,
            )
            cached = next(t for t in enc.labels if t != IGNORE_INDEX)
            self._answer_tokens[answer] = cached
        return cached

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``BxT`` ids and mask, LEFT-padded (generation appends on the right)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.config.tokens.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return ids, mask

    def _answer(
        self,
        encoded: list[_Encoded],
        queries: list[Query],
        *,
        with_masks: bool,
        **generate_kwargs: Any,
    ) -> list[Answer]:
        rows, in_boxes = [], []
        for q in queries:
            turns, boxes = self._turns(q)
            enc = encode_conversation(
                turns,
                self.tokenizer,
                self.config,
                num_image_tokens=self._num_image_tokens,
                add_generation_prompt=True,
            )
            if enc.num_boxes != len(boxes):
                raise ValueError(
                    f"the prompt has {enc.num_boxes} '<at> <boxes>' region slots but "
                    f"{len(boxes)} input boxes were given"
                )
            limit = self.config.llm.max_position_embeddings - self.max_new_tokens - 2
            if len(enc.input_ids) > limit:
                raise ValueError(
                    f"the prompt is {len(enc.input_ids)} tokens with the image; this model takes "
                    f"at most {limit}: shorten the prompt"
                )
            p = encoded[q.image_index].processed
            for b in boxes:
                frames.check_pixel_box(b, p.width, p.height, what="input box")
                in_boxes.append(frames.pixel_to_square(np.asarray(b), p.width, p.height))
            rows.append(enc.input_ids)
        ids, mask = self._left_padded(rows)
        feats = torch.cat([encoded[q.image_index].features for q in queries])
        box_tensor = (
            torch.tensor(np.stack(in_boxes), dtype=torch.float32, device=self.device)
            if in_boxes
            else None
        )
        kwargs = {"max_new_tokens": self.max_new_tokens, **generate_kwargs}
        presence: list[float | None] = [None] * len(queries)
        asked = [i for i, q in enumerate(queries) if self._asks_presence(q)]
        if asked:
            p_yes = self._exists(encoded, [queries[i] for i in asked])
            for i, value in zip(asked, p_yes, strict=True):
                presence[i] = value
        with self._context():
            gen = self.model.generate(
                ids.to(self.device), mask.to(self.device), feats, input_boxes=box_tensor, **kwargs
            )
            answers = []
            for i, q in enumerate(queries):
                answers.append(
                    self._to_answer(
                        q,
                        encoded[q.image_index],
                        gen.sequences[i],
                        gen.boxes[i],
                        gen.at_hidden[i],
                        gen.box_scores[i],
                        presence[i],
                        with_masks=with_masks,
                    )
                )
                if gen.truncated[i]:
                    answers[-1].truncated = True
                    log.warning(
                        "answer to %r cut off at max_new_tokens=%d after %d box(es): raise "
                        "max_new_tokens to let the model finish listing",
                        q.prompt[:80],
                        kwargs["max_new_tokens"],
                        len(gen.boxes[i]),
                    )
        return answers

    def _to_answer(
        self,
        q: Query,
        enc: _Encoded,
        sequence: list[int],
        boxes: torch.Tensor,
        hidden: torch.Tensor,
        scores: torch.Tensor,
        presence: float | None,
        *,
        with_masks: bool,
    ) -> Answer:
        tk = self.config.tokens
        p = enc.processed
        text = decode_text(sequence, self.tokenizer, tk)
        square = frames.sort_corners(boxes.float().cpu().numpy())
        px = frames.square_to_pixel(square, p.width, p.height, clip=True)
        dets = [
            Detection(
                box=px[j],
                score=self._region_score(float(scores[j]) if presence is None else presence),
                at_score=float(scores[j]),
            )
            for j in range(len(px))
        ]
        if presence is not None and presence < self.presence_threshold:
            return Answer(
                prompt=q.prompt, text=text, score=1.0 - presence, presence=presence, rejected=dets
            )
        if with_masks and len(dets):
            if enc.sam_embedding is None:
                self._encode_sam([enc])
            embedding = enc.sam()
            assert embedding is not None  # encoded just above when missing
            m = self.model.predict_masks(embedding, hidden, boxes, width=p.width, height=p.height)
            geometry = SamGeometry(p.width, p.height, self.config.sam.image_size)
            full = frames.sam_mask_to_original(m.logits, geometry) > 0
            for j, det in enumerate(dets):
                iou = float(m.iou_predictions[j].clamp(0, 1))
                det.mask_iou = iou
                det.score = self._region_score(
                    float(scores[j]) if presence is None else presence, iou
                )
                det.mask = full[j].cpu().numpy() if iou >= self.mask_iou_threshold else None
        none = 0.0 if presence is None else 1.0 - presence  # no region: right if absent
        score = min(d.score for d in dets) if dets else none
        return Answer(prompt=q.prompt, text=text, detections=dets, score=score, presence=presence)

    def _region_score(self, presence: float, quality: float | None = None) -> float:
        """A region's score from its presence and (with a mask) SAM's predicted IoU: the
        product, or the checkpoint's calibration when it was fitted for this scoring."""
        score = self.config.score
        fitted = score.calibration if self.presence == score.presence else None
        weights = (fitted or {}).get("boxes" if quality is None else "masks")
        if not weights:
            return presence * (1.0 if quality is None else quality)
        z = weights[0] * logit(presence) + weights[-1]
        if quality is not None:
            z += weights[1] * logit(quality)
        return float(1.0 / (1.0 + np.exp(-z)))

    def _asks_presence(self, q: Query) -> bool:
        """Whether ``q``'s regions are scored with p(yes): a grounding prompt (a referring
        expression, no input regions) under ``"exists"`` scoring."""
        return (
            self.presence == "exists"
            and q.task == "ground"
            and not q.boxes
            and self.config.tokens.image_placeholder not in q.prompt
        )


def logit(p: float, eps: float = 1e-4) -> float:
    """log(p / (1 - p)), ``p`` clipped to [eps, 1 - eps]."""
    p = min(max(p, eps), 1.0 - eps)  # SAM's IoU head and softmaxes reach 0 and 1
    return float(np.log(p / (1.0 - p)))
