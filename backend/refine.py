"""Click refinement: the annotator clicks points or draws a box, SAM draws the mask.

The protocol of Label Studio's own SAM backends (label-studio-ml-backend's
``segment_anything_model`` example), served by the SAM inside NExT-Chat:

* the label config has a ``KeyPointLabels`` (and, for box prompts, a ``RectangleLabels``)
  with ``smart="true"`` beside the ``BrushLabels`` that receives the masks
  (``label_configs/click_masks.xml``);
* with Auto-Annotation on, every click with the smart keypoint tool (Alt + click: a
  negative point, the result's ``is_positive`` is ``false``) and every box drawn with the
  smart rectangle tool sends an interactive ``/predict`` whose ``params.context.result``
  holds the pending points and boxes, in the order they were made, in percent of the
  image;
* the answer is one ``brushlabels`` result: SAM's mask for the points and the newest box
  of the newest prompt's label (prompts of other labels belong to another object and
  are left out), with that label and SAM's predicted IoU as its score.

SAM's prompt path is the released one (points + labels and a box into the prompt
encoder, no LLM tokens: :meth:`nextchat_core.predictor.NextChatPredictor.segment`). The
image embedding - the only expensive part - is computed once per (project, model
version, image) and kept in a small in-process LRU (:class:`EmbeddingCache`); a cached
click skips the image download too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labelstudio.config import CLICK_PROMPT_TAGS
from labelstudio.images import FetchOptions, TaskError, fetch_images
from labelstudio.results import LabelStudioFormatError, brush_result, image_reference
from nextchat_core import frames
from nextchat_core.predictor import SamImage
from training.versions import ModelVersion

from .label_config import LabelPlan
from .model_cache import ModelCache
from .results import new_region_id

logger = logging.getLogger(__name__)

# SAM-H's embedding is 256x64x64 float32 = 4 MiB: 16 images are what an annotator goes
# back and forth between, for 64 MiB.
EMBEDDINGS_KEPT = 16

# Context result types that are SAM prompts: the clicks and the box.
PROMPT_TYPES = CLICK_PROMPT_TAGS | {"rectanglelabels"}


class RefineError(Exception):
    """A click request that cannot be served: HTTP ``status`` and what to fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ClickPrompts:
    """SAM prompts in original pixels. ``points``: ``(x, y)`` per click, ``labels``: 1
    positive / 0 negative per click; ``box``: xyxy or ``None``; ``label``: the label the
    mask gets (a label of the config's ``BrushLabels``)."""

    points: list[tuple[float, float]]
    labels: list[int]
    box: list[float] | None
    label: str


def wants_refinement(plan: LabelPlan, regions: Sequence[dict[str, Any]]) -> bool:
    """Whether an interactive request is a click-refinement request: the config has
    ``KeyPointLabels`` and ``BrushLabels``, and the context holds a point or a box."""
    if plan.keypoints is None or plan.brushes is None:
        return False
    return any(str(r.get("type", "")).lower() in PROMPT_TYPES for r in regions)


def click_prompts(
    regions: Sequence[dict[str, Any]], plan: LabelPlan, *, width: int, height: int
) -> ClickPrompts:
    """The SAM prompts of an interactive context (module docstring) for a ``width x
    height`` image. ``ValueError`` naming the bad result when one is malformed."""
    assert plan.brushes is not None  # wants_refinement checked it
    prompts = [r for r in regions if str(r.get("type", "")).lower() in PROMPT_TYPES]
    if not prompts:
        raise ValueError("the context holds no keypointlabels or rectanglelabels result")
    newest = _label_of(prompts[-1])
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: list[float] | None = None
    for i, r in enumerate(prompts):
        if _label_of(r) != newest:
            continue  # a pending prompt of another label: another object
        kind = str(r["type"]).lower()
        value = r.get("value")
        if not isinstance(value, dict):
            raise ValueError(f"context result {i} ({kind}) has no 'value' object")
        if kind in CLICK_PROMPT_TAGS:
            x, y = _numbers(value, ("x", "y"), i, kind)
            positive = r.get("is_positive", True)
            if not isinstance(positive, bool):
                raise ValueError(
                    f"context result {i}: 'is_positive' must be true or false, got {positive!r}"
                )
            px = frames.points_percent_to_pixel([[x, y]], width, height)[0]
            points.append((float(px[0]), float(px[1])))
            labels.append(1 if positive else 0)
        else:
            x, y, w, h = _numbers(value, ("x", "y", "width", "height"), i, kind)
            rotation = value.get("rotation", 0) or 0
            if not isinstance(rotation, int | float):
                raise ValueError(f"context result {i}: 'rotation' must be a number")
            rect = frames.PercentRect(x, y, w, h, float(rotation))
            # SAM takes one box: the newest one, as Label Studio's SAM backend does.
            box = [float(v) for v in frames.percent_to_pixel(rect, width, height)]
    label = plan.label_for(newest or "", plan.brushes, preferred=newest)
    return ClickPrompts(points=points, labels=labels, box=box, label=label)


class EmbeddingCache:
    """A thread-safe LRU of :class:`SamImage` embeddings; ``hits``/``misses`` count
    lookups (tests and the bench read them)."""

    def __init__(self, capacity: int = EMBEDDINGS_KEPT) -> None:
        if capacity < 1:
            raise ValueError(f"an embedding cache keeps at least 1 image, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, ...], SamImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> SamImage | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, ...], item: SamImage) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class ClickRefiner:
    """Serves click-refinement requests on the process's model (``store``), with one
    :class:`EmbeddingCache` per backend process."""

    def __init__(self, store: ModelCache, cache: EmbeddingCache | None = None) -> None:
        self.store = store
        self.cache = cache if cache is not None else EmbeddingCache()

    def predict(
        self,
        tasks: Sequence[dict[str, Any]],
        plan: LabelPlan,
        regions: Sequence[dict[str, Any]],
        *,
        project: str | None,
        options: FetchOptions,
    ) -> dict[str, Any]:
        """The ``/predict`` reply: one mask per task (Label Studio sends one task)."""
        version = self.store.current_version()
        results = [
            self._one(task, plan, regions, project=project, options=options, version=version)
            for task in tasks
        ]
        return {"results": results, "model_version": version.name}

    def _one(
        self,
        task: dict[str, Any],
        plan: LabelPlan,
        regions: Sequence[dict[str, Any]],
        *,
        project: str | None,
        options: FetchOptions,
        version: ModelVersion,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            ref = image_reference(task, plan.config)
        except LabelStudioFormatError as exc:
            raise RefineError(422, str(exc)) from None
        key = (project or "", version.name, str(version.path), ref)
        image = self.cache.get(key)
        cached = image is not None
        fetched = None
        if image is None:  # download outside the model lock: other requests go on
            got = fetch_images([task], plan.config, options)[0]
            if isinstance(got, TaskError):
                raise RefineError(502 if got.kind == "fetch" else 422, got.detail)
            fetched = got
        with self.store.use(version) as (version, predictor):
            if image is None:
                assert fetched is not None
                image = predictor.sam_image(fetched.image)
                self.cache.put(key, image)
            try:
                prompts = click_prompts(regions, plan, width=image.width, height=image.height)
                segment = predictor.segment(
                    image,
                    points=prompts.points or None,
                    point_labels=prompts.labels or None,
                    box=prompts.box,
                )
            except ValueError as exc:
                raise RefineError(400, f"click refinement: {exc}") from None
        assert plan.brushes is not None
        result: list[dict[str, Any]] = []
        if segment.mask.any():
            result.append(
                brush_result(
                    segment.mask,
                    [prompts.label],
                    from_name=plan.brushes.name,
                    to_name=plan.image,
                    region_id=new_region_id(),
                    score=segment.score,
                )
            )
        logger.info(
            "refine: task %s, %d point(s), %s box, label %s, embedding %s, %.1f ms",
            task.get("id"),
            len(prompts.points),
            "a" if prompts.box else "no",
            prompts.label,
            "cached" if cached else "computed",
            (time.perf_counter() - t0) * 1e3,
        )
        return {"result": result, "score": segment.score, "model_version": version.name}


def _label_of(result: dict[str, Any]) -> str | None:
    value = result.get("value")
    kind = str(result.get("type", "")).lower()
    labels = value.get(kind) if isinstance(value, dict) else None
    if isinstance(labels, list) and labels and isinstance(labels[0], str):
        return labels[0]
    return None


def _numbers(value: dict[str, Any], keys: Sequence[str], index: int, kind: str) -> list[float]:
    out = []
    for k in keys:
        v = value.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(
                f"context result {index} ({kind}) needs a number value.{k} in percent of "
                f"the image, got {v!r}"
            )
        out.append(float(v))
    return out
