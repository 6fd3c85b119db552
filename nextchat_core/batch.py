"""Training samples and their collation into the tensors of ``NextChatModel.forward``.

A :class:`Sample` is one conversation about one image with its boxes (original pixels, one
per ``<at> <boxes>`` pair in text order) and optional masks. Every data reader of the
training pipeline produces these; :func:`collate` turns a list of them into a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from . import frames
from .config import NextChatConfig
from .conversation import IGNORE_INDEX, Turn, encode_conversation
from .frames import SamGeometry
from .image_processing import ImageProcessor


@dataclass
class Sample:
    """One training conversation.

    ``image``: a path, bytes, PIL image or ``HxWx3`` uint8 array (loaded when collated).
    ``boxes``: original-pixel xyxy, one per ``<at> <boxes>`` pair, in text order.
    ``masks``: ``None``, or one entry per box: an ``HxW`` bool mask or ``None``.
    ``source``: names the record in error messages (file and line, task id, ...).
    ``extras``: optional per-sample arrays for auxiliary objectives; collated as
    ``aux_<name>`` tensors when every sample of a batch has them.
    ``vision_features``: optional ``NxC`` output of a FROZEN vision tower for this image,
    computed once (training reuses it instead of running the tower every step); then
    ``image`` is only its original ``(width, height)``. Such a sample has masks only with
    ``sam_embedding``: the ``CxHxW`` output of SAM's frozen image encoder for the image.
    """

    image: Any
    turns: list[Turn]
    boxes: list[Sequence[float]] = field(default_factory=list)
    masks: list[np.ndarray | None] | None = None
    source: str = "<sample>"
    extras: dict[str, np.ndarray] | None = None
    vision_features: torch.Tensor | None = None
    sam_embedding: torch.Tensor | None = None


def collate(
    samples: Sequence[Sample],
    *,
    tokenizer: PreTrainedTokenizerBase,
    config: NextChatConfig,
    num_image_tokens: int,
    processor: ImageProcessor | None = None,
    with_masks: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-padded batch for ``NextChatModel.forward``: ``input_ids``, ``attention_mask``,
    ``labels``, ``pixel_values`` (``vision_features`` when the samples carry them), ``boxes``
    (square frame) and, when any sample has a mask
    and ``with_masks``, ``sam_pixel_values`` (``sam_image_embeddings`` for samples with
    precomputed features), ``mask_targets`` (SAM frame),
    ``mask_box_index`` and ``image_sizes``.

    Raises ``ValueError`` naming ``sample.source`` for a box outside its image or a box
    count that does not match the text.
    """
    processor = processor or ImageProcessor(config)
    cached = [s.vision_features is not None for s in samples]
    if any(cached) and not all(cached):
        raise ValueError(
            "a batch mixes samples with precomputed vision_features and samples with images; "
            "give every sample of a batch the same kind"
        )
    ids, labels, processed_images, sizes = [], [], [], []
    boxes: list[np.ndarray] = []
    mask_targets: list[np.ndarray] = []
    mask_index: list[int] = []
    for s in samples:
        if s.vision_features is not None:
            w, h = (int(v) for v in s.image)  # the original (width, height)
        else:
            processed = process_image(processor, s.image, s.source)
            processed_images.append(processed)
            w, h = processed.width, processed.height
        enc = encode_conversation(s.turns, tokenizer, config, num_image_tokens=num_image_tokens)
        if enc.num_boxes != len(s.boxes):
            raise ValueError(
                f"{s.source}: the text has {enc.num_boxes} '<at> <boxes>' pairs but "
                f"{len(s.boxes)} boxes were given"
            )
        if s.masks is not None and len(s.masks) != len(s.boxes):
            raise ValueError(f"{s.source}: {len(s.masks)} masks for {len(s.boxes)} boxes")
        for k, b in enumerate(s.boxes):
            box = frames.check_pixel_box(b, w, h, what=f"{s.source}: box {k}", tolerance=0.5)
            boxes.append(frames.pixel_to_square(box, w, h))
            mask = None if s.masks is None else s.masks[k]
            if with_masks and mask is not None:
                mask_targets.append(
                    frames.original_mask_to_sam(mask, SamGeometry(w, h, config.sam.image_size))
                )
                mask_index.append(len(boxes) - 1)
        ids.append(enc.input_ids)
        labels.append(enc.labels)
        sizes.append((w, h))

    if all(cached):
        pixel_values, sam_pixel_values = None, None
    else:
        pixel_values, sam_pixel_values = processor.tensors(processed_images, sam=bool(mask_targets))
    width = max(len(r) for r in ids)
    pad = config.tokens.pad_id
    batch = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4),
    }
    if pixel_values is None:
        batch["vision_features"] = torch.stack([s.vision_features for s in samples]).float()  # type: ignore[misc]
    else:
        batch["pixel_values"] = pixel_values
    if all(s.extras for s in samples):
        for key in samples[0].extras or {}:
            batch[f"aux_{key}"] = torch.from_numpy(np.stack([s.extras[key] for s in samples]))  # type: ignore[index]
    if mask_targets:
        if all(cached):
            missing = [s.source for s in samples if s.sam_embedding is None]
            if missing:
                raise ValueError(
                    f"{missing[0]}: a batch with masks and precomputed vision_features needs "
                    "every sample's sam_embedding (SAM's image embedding); give them one or "
                    "drop the masks"
                )
            batch["sam_image_embeddings"] = torch.stack([s.sam_embedding for s in samples])  # type: ignore[misc]
        else:
            assert sam_pixel_values is not None  # tensors(sam=True) when there are mask targets
            batch["sam_pixel_values"] = sam_pixel_values
        batch["mask_targets"] = torch.from_numpy(np.stack(mask_targets))
        batch["mask_box_index"] = torch.tensor(mask_index)
        batch["image_sizes"] = torch.tensor(sizes)
    return batch


def process_image(processor: ImageProcessor, image: Any, source: str) -> Any:
    """``processor(image)``; an image that cannot be read or processed raises naming
    ``source`` (the record it belongs to)."""
    try:
        return processor(image)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise type(exc)(f"{source}: {exc}") from exc


def grounding_sample(
    image: Any,
    expression: str,
    boxes: list[Sequence[float]],
    config: NextChatConfig,
    *,
    masks: list[np.ndarray | None] | None = None,
    source: str = "<sample>",
) -> Sample:
    """A referring-expression sample: the REC question and one box pair per box."""
    from .conversation import grounding_turns

    return Sample(
        image, grounding_turns(expression, config, num_boxes=len(boxes)), list(boxes), masks, source
    )
