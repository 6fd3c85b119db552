"""The Label Studio ML backend model: ``/setup`` and ``/predict`` on NExT-Chat.

Thin by design: read the label config's roles (:mod:`backend.label_config`), pick each
task's prompts, fetch images (:mod:`labelstudio.images`), run the core predictor in batches
on the weights cached per process (:mod:`backend.model_cache`), and build results with
``labelstudio.results`` (:mod:`backend.results`).

An interactive request that carries points or a box and no typed prompt, in a config
with ``KeyPointLabels`` and ``BrushLabels``, is click refinement (:mod:`backend.refine`):
SAM's mask for the clicks, no text prompt, no LLM.

Prompts of a task, first match wins:

1. the interactive context: the TextArea the annotator just typed
   (``params.context.result``); remembered as the project's last prompt;
2. the task data field that pre-fills the prompt TextArea (``value="$key"``), else
   ``data["prompt"]``;
3. per-label prompts: labels with a ``hint``/``predicted_values`` attribute; in a config
   without a prompt TextArea, every label (its ``hint``, ``predicted_values`` or value);
4. the project's last typed prompt ("next, approve": the next task gets the same prompt);
5. every label's own value (a prompt-TextArea config with nothing typed yet).

Levels 4 and 5 apply only to tasks nobody has annotated yet (``is_annotated``): Label
Studio re-asks about a task after its annotation is submitted, and a fallback answer
would put a new suggestion on the saved annotation.

A config with an answer TextArea turns prompts of levels 1, 2 and 4 into chat questions;
a config with a caption TextArea captions the rectangle of the interactive context (or,
in batch, every detected box).

Response per task: ``{"result": [...], "score", "model_version"}`` with ``score`` the
confidence of the task's least certain decision (``results.task_score``: Label Studio
sorts by it; regions scored as ``nextchat_core.predictor`` says). A task
whose image or prompt cannot be used gets ``[]`` (Label Studio: "no prediction for this
task"; it stores nothing, so a later "Retrieve predictions" tries the task again, where
``{"result": []}`` would be stored as a prediction of this version and never retried) and
an entry in the response's ``errors``. When every task of a request fails, the request
fails: HTTP 422 (bad task data), or 502 when all failures are image downloads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from labelstudio.images import FetchedImage, FetchOptions, TaskError, fetch_images
from labelstudio.projects import (
    ProjectState,
    ProjectStore,
    VersionNotInProject,
    project_key,
    show_version_in_project,
)
from labelstudio.results import LabelStudioFormatError, Region, parse_results, textarea_result
from nextchat_core.predictor import Answer, NextChatPredictor, Query, Task, prompt_problem
from training.versions import ModelVersion

from .label_config import LabeledPrompt, LabelPlan, plan_for
from .model_cache import ModelCache
from .refine import ClickRefiner, RefineError, wants_refinement
from .results import (
    LabeledDetection,
    answer_text,
    deduplicate,
    detection_results,
    drop_existing,
    new_region_id,
    task_score,
)
from .settings import Settings

logger = logging.getLogger(__name__)


class BackendError(Exception):
    """A request the backend cannot serve: HTTP ``status`` and a ``detail`` saying what to
    fix; ``extra`` goes into the JSON reply beside them."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


@dataclass
class InteractiveContext:
    """``params.context`` of an interactive request: the typed prompt (``None`` when no
    TextArea was typed) and the other results the annotator made (e.g. a rectangle)."""

    prompt: str | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _ModelQuery:
    """One model query for one task. ``region``: the context result a caption is for."""

    query_task: Task
    prompt: str
    label: str | None = None
    box: list[float] | None = None  # caption input, original pixels xyxy
    region: dict[str, Any] | None = None


@dataclass
class _TaskWork:
    index: int
    task: dict[str, Any]
    image: FetchedImage | None = None
    queries: list[_ModelQuery] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    detections: list[LabeledDetection] = field(default_factory=list)
    captions: list[Answer | None] = field(default_factory=list)  # one per detection
    error: TaskError | None = None
    # Interactive requests: the regions the task's annotations and drafts already hold
    # (a prompt asked twice must not add the same rectangle twice).
    existing: list[Region] = field(default_factory=list)


class NextChatBackend:
    """Serves one process's ``/setup`` and ``/predict`` (state lives in the store and
    under ``MODEL_DIR``, so instances are cheap)."""

    model_class = "NextChatBackend"

    def __init__(self, settings: Settings, store: ModelCache, projects: ProjectStore) -> None:
        self.settings = settings
        self.store = store
        self.projects = projects
        self._storage_problems: dict[str, str] = {}
        # (project, version) pairs whose project model_version is set / being set
        self._lock = threading.Lock()
        self._shown: set[tuple[str, str]] = set()
        self._showing: set[tuple[str, str]] = set()
        self._again: dict[tuple[str, str], tuple[float, ...]] = {}
        self.refiner = ClickRefiner(store)

    # --------------------------------------------------------------------- setup
    def setup(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /setup``: check the label config, remember the project's config and the
        hostname/token to fetch its uploads with; reply with the served model version."""
        project = _project(payload)
        schema = payload.get("schema")
        if schema is not None:
            _plan(schema)
        hostname = payload.get("hostname")
        if hostname is not None and (
            not isinstance(hostname, str) or not hostname.startswith(("http://", "https://"))
        ):
            raise BackendError(
                400, f"'hostname' must be an http(s) URL, got {str(hostname)[:60]!r}"
            )
        token = payload.get("access_token")
        if token is not None and not isinstance(token, str):
            raise BackendError(400, "'access_token' must be a string")
        if project is not None:
            changes: dict[str, Any] = {}
            if schema is not None:
                changes["label_config"] = schema
            if hostname:
                changes["hostname"] = hostname.rstrip("/")
                old = self.projects.get(project)
                if not token and old is not None and old.hostname != changes["hostname"]:
                    # A token goes only to the host it came with: a /setup that moves the
                    # project to another host without a token of its own drops the old one.
                    changes["access_token"] = None
                    logger.warning(
                        "setup: project %s moved from %s to %s without a token: the stored "
                        "token is dropped",
                        project,
                        old.hostname,
                        changes["hostname"],
                    )
            if token:
                changes["access_token"] = token
            if changes:
                self.projects.update(project, **changes)
        version = self.store.current_version()
        state = self.projects.get(project) if project is not None else None
        self._maybe_show_version(state, version.name, delays=(0.0,))
        logger.info(
            "setup: project %s, hostname %s, access token %s, model version %s",
            project,
            hostname,
            "received" if token else "not sent",
            version.name,
        )
        return {"model_version": version.name}

    # ------------------------------------------------------------------- predict
    def predict(
        self,
        payload: dict[str, Any],
        *,
        version: ModelVersion | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """``POST /predict``: one prediction per task, in task order. Batch pre-labeling
        (:mod:`backend.prelabel`) passes the run's ``version`` (default: the one served
        now) and its typed ``prompt`` (used as an interactive prompt would be, but not
        remembered as the project's last one)."""
        t0 = time.perf_counter()
        tasks = _tasks(payload)
        project = _project(payload)
        state = self.projects.get(project)
        xml = payload.get("label_config") or (state.label_config if state else None)
        if not xml:
            raise BackendError(
                400, "no label config: send 'label_config' with /predict or call /setup first"
            )
        plan = _plan(xml)
        params = payload.get("params")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise BackendError(400, f"'params' must be an object, got {type(params).__name__}")
        context = parse_context(params.get("context"), plan)
        if context.prompt is None and wants_refinement(plan, context.regions):
            try:  # clicks / a box for SAM, no text prompt: backend.refine
                return self.refiner.predict(
                    tasks,
                    plan,
                    context.regions,
                    project=project,
                    options=self._fetch_options(state, params),
                )
            except RefineError as exc:
                raise BackendError(exc.status, exc.detail) from None
        if context.prompt is not None and project is not None:
            self._remember_prompt(project, context.prompt)
        if prompt is not None:
            problem = prompt_problem(prompt)
            if problem:
                raise BackendError(400, f"prompt: {problem}")
            context = InteractiveContext(prompt=prompt, regions=context.regions)
        version = version or self.store.current_version()
        if not tasks:
            return {"results": [], "model_version": version.name}

        options = self._fetch_options(state, params)
        works = [_TaskWork(i, t) for i, t in enumerate(tasks)]
        for work in works:  # a task without a data object fails alone, before any fetch
            data = work.task.get("data")
            if not isinstance(data, dict):
                work.error = TaskError(
                    kind="no_image",
                    detail=(
                        "the task has no 'data' object"
                        if data is None
                        else f"the task's 'data' must be an object like {{\"image\": URL}}, "
                        f"got {type(data).__name__}"
                    ),
                )
        usable = [w for w in works if w.error is None]
        fetched_all = fetch_images([w.task for w in usable], plan.config, options)
        for work, fetched in zip(usable, fetched_all, strict=True):
            if isinstance(fetched, TaskError):
                work.error = fetched
            else:
                work.image = fetched
                self._plan_queries(work, plan, context, state)

        ready = [w for w in works if w.error is None and w.queries]
        box_token = "<at> <boxes>"
        if ready:
            with self.store.use(version) as (version, predictor):
                tk = predictor.config.tokens
                box_token = f"{tk.at} {tk.boxes}"
                self._run(predictor, ready, plan)
                for w in ready:
                    if w.error is None:
                        w.detections = self._detections(w, plan)
                self._caption_detections(predictor, ready, plan)
        results = [self._task_result(w, plan, version, box_token) for w in works]
        errors: list[dict[str, Any]] = [
            {
                "task": w.task.get("id"),
                "index": w.index,
                "kind": w.error.kind,
                "detail": w.error.detail,
            }
            for w in works
            if w.error is not None
        ]
        logger.info(
            "predict: project %s, %d task(s), %d failed, %d region(s), version %s, %.2f s",
            project,
            len(tasks),
            len(errors),
            sum(len(r["result"]) for r in results if isinstance(r, dict)),
            version.name,
            time.perf_counter() - t0,
        )
        if errors and len(errors) == len(works):
            status = 502 if all(e["kind"] == "fetch" for e in errors) else 422
            detail = (
                errors[0]["detail"]
                if len(errors) == 1
                else (
                    f"none of the {len(errors)} tasks could be predicted; first: {errors[0]['detail']}"
                )
            )
            raise BackendError(status, detail, errors=errors)
        out: dict[str, Any] = {"results": results, "model_version": version.name}
        if errors:
            out["errors"] = errors
        if context.prompt is None and not context.regions:
            # stored predictions (not interactive ones): the project can show them once
            # Label Studio has saved them
            self._maybe_show_version(state, version.name, delays=(2.0, 5.0, 15.0))
        return out

    def _show_version(self, state: ProjectState, version: str, delays: tuple[float, ...]) -> None:
        """Point the project's ``model_version`` at ``version`` (so the editor and the
        Data Manager's score column show this backend's predictions), in a thread: Label
        Studio waits on ``/setup`` and ``/predict`` and stores predictions only after
        ``/predict`` answered, so each try waits its delay first. Once done (or left alone
        on purpose) for a project and version, not again in this process."""
        key = (state.project, version)
        with self._lock:
            if key in self._shown:
                return
            if key in self._showing:  # the running thread tries these too, afterwards
                self._again[key] = delays
                return
            self._showing.add(key)
        ours = set(self.store.versions()["versions"])

        def tries() -> Iterator[float]:
            todo: tuple[float, ...] | None = delays
            while todo is not None:
                yield from todo
                with self._lock:
                    todo = self._again.pop(key, None)
                    if todo is None:
                        self._showing.discard(key)

        def run() -> None:
            for delay in tries():
                time.sleep(delay)
                try:
                    done = show_version_in_project(
                        state.hostname or "", state.access_token or "", state.project, version, ours
                    )
                except VersionNotInProject as exc:
                    logger.debug("project version: %s", exc)
                    continue
                except RuntimeError as exc:
                    logger.warning("project version: %s", exc)
                    done = None
                with self._lock:
                    if done is not None:
                        self._shown.add(key)
                    self._showing.discard(key)
                    self._again.pop(key, None)
                if done is not None:
                    logger.info("project version: %s", done)
                return

        threading.Thread(target=run, name=f"show-version-{state.project}", daemon=True).start()

    def _maybe_show_version(
        self, state: ProjectState | None, version: str, delays: tuple[float, ...]
    ) -> None:
        if (
            self.settings.sync_project_version
            and state is not None
            and state.hostname
            and state.access_token
        ):
            self._show_version(state, version, delays)

    def storage_problems(self) -> dict[str, str]:
        """What could not be written lately (``/health`` reports it)."""
        return dict(self._storage_problems)

    # ------------------------------------------------------------------ internals
    def _remember_prompt(self, project: str, prompt: str) -> None:
        # The prompt memory ("next, approve") is a convenience: a read-only or full
        # MODEL_DIR must not stop predictions, only be reported.
        try:
            self.projects.remember_prompt(project, prompt)
        except OSError as exc:
            self._storage_problems["prompt_memory"] = (
                f"cannot remember the last prompt under MODEL_DIR/projects: {exc.strerror}"
            )
            logger.warning("project %s: cannot remember the prompt: %s", project, exc)
        else:
            self._storage_problems.pop("prompt_memory", None)

    def _fetch_options(self, state: ProjectState | None, params: dict[str, Any]) -> FetchOptions:
        login, password = params.get("login"), params.get("password")
        return self.settings.fetch_options(
            state,
            task_data_login=login if isinstance(login, str) else None,
            task_data_password=password if isinstance(password, str) else None,
        )

    def _plan_queries(
        self,
        work: _TaskWork,
        plan: LabelPlan,
        context: InteractiveContext,
        state: ProjectState | None,
    ) -> None:
        """The queries of one task (module docstring), or ``work.error`` for a task whose
        prompt cannot be used."""
        assert work.image is not None
        task_id = work.task.get("id")
        if plan.caption_area is not None and context.regions:
            size = (work.image.width, work.image.height)
            errors: list[LabelStudioFormatError] = []
            regions = parse_results(
                context.regions, task_id=task_id, image_size=size, errors=errors
            )
            for exc in errors:
                logger.warning("task %s: ignoring a context region: %s", task_id, exc)
            raw = {_rid(r): r for r in context.regions}
            for region in regions:
                work.queries.append(
                    _ModelQuery(
                        "caption",
                        "caption",
                        box=[float(v) for v in region.box_xyxy],
                        region=raw.get(region.region_id),
                    )
                )
            if work.queries:
                return
        if context.prompt is not None:
            work.existing = existing_regions(work.task, (work.image.width, work.image.height))
        prompts, source = resolve_prompts(plan, work.task, context, state)
        if not prompts:
            logger.info(
                "task %s: no prompt (%s)",
                task_id,
                "annotated already: no fallback prompt"
                if source == "annotated"
                else "no typed prompt, task field or label",
            )
            return
        chat = plan.answer_area is not None and source in ("context", "task", "last")
        for lp in prompts:
            problem = prompt_problem(lp.prompt)
            if problem:
                work.error = TaskError(kind="prompt", detail=f"{source} prompt: {problem}")
                logger.error("task %s: %s", task_id, work.error.detail)
                work.queries = []
                return
            work.queries.append(
                _ModelQuery("chat" if chat else "ground", lp.prompt, label=lp.label)
            )

    def _run(
        self, predictor: NextChatPredictor, works: Sequence[_TaskWork], plan: LabelPlan
    ) -> None:
        """Run every query, ``batch_size`` tasks' images at a time, into ``work.answers``."""
        size = self.settings.batch_size
        for start in range(0, len(works), size):
            chunk = works[start : start + size]
            images = [w.image.image for w in chunk if w.image is not None]
            queries = [
                Query(i, q.prompt, q.query_task, [q.box] if q.box else None)
                for i, w in enumerate(chunk)
                for q in w.queries
            ]
            try:
                answers = predictor.predict_batch(
                    images, queries, with_masks=plan.needs_masks, batch_size=size
                )
            except ValueError as exc:
                # One task's query is bad (e.g. its prompt is too many tokens): re-run the
                # chunk task by task so only that task fails.
                logger.warning(
                    "batch of %d task(s) failed (%s); retrying task by task", len(chunk), exc
                )
                for w in chunk:
                    self._run_one(predictor, w, plan)
                continue
            it = iter(answers)
            for w in chunk:
                w.answers = [next(it) for _ in w.queries]

    def _run_one(self, predictor: NextChatPredictor, work: _TaskWork, plan: LabelPlan) -> None:
        assert work.image is not None
        queries = [
            Query(0, q.prompt, q.query_task, [q.box] if q.box else None) for q in work.queries
        ]
        try:
            work.answers = predictor.predict_batch(
                [work.image.image], queries, with_masks=plan.needs_masks
            )
        except ValueError as exc:
            # Per-task isolation: this task's query is invalid for the model; the task gets
            # an empty prediction and the error is logged with its id.
            work.error = TaskError(kind="prompt", detail=str(exc))
            logger.error("task %s: %s", work.task.get("id"), exc)

    def _caption_detections(
        self, predictor: NextChatPredictor, works: Sequence[_TaskWork], plan: LabelPlan
    ) -> None:
        """Batch mode with a caption TextArea: caption every detected box (NExT-Chat's
        box-in path) into ``work.captions``; a failure leaves the boxes uncaptioned."""
        if plan.caption_area is None:
            return
        for w in works:
            if w.error is not None or not w.detections or w.image is None:
                continue
            if any(j.query_task == "caption" for j in w.queries):
                continue  # the interactive context's region was captioned instead
            queries = [
                Query(0, "caption", "caption", [[float(v) for v in item.detection.box]])
                for item in w.detections
            ]
            try:
                answers = predictor.predict_batch(
                    [w.image.image], queries, with_masks=False, batch_size=self.settings.batch_size
                )
            except ValueError as exc:
                # A box the model cannot take (e.g. degenerate after clipping): keep the
                # task's regions, log, and leave them without captions.
                logger.error("task %s: captioning detected boxes failed: %s", w.task.get("id"), exc)
                continue
            w.captions = list(answers)

    def _detections(self, work: _TaskWork, plan: LabelPlan) -> list[LabeledDetection]:
        items = [
            LabeledDetection(det, query.prompt, query.label)
            for query, answer in zip(work.queries, work.answers, strict=True)
            if query.query_task != "caption"
            for det in answer.detections
            if det.score >= self.settings.score_threshold
            # a box clipped to nothing (predicted outside the image) is no region at all;
            # Label Studio would reject a zero-size rectangle
            and det.box[2] - det.box[0] >= 1.0
            and det.box[3] - det.box[1] >= 1.0
        ]
        kept = deduplicate(
            items,
            plan,
            iou=self.settings.dedup_iou,
            cross_label_iou=self.settings.cross_label_iou,
        )
        if work.existing:
            kept = drop_existing(kept, work.existing, plan)
        return kept

    def _task_result(
        self, work: _TaskWork, plan: LabelPlan, version: ModelVersion, box_token: str
    ) -> dict[str, Any] | list[Any]:
        if work.error is not None or work.image is None:
            return []  # "no prediction for this task": see the module docstring
        w, h = work.image.width, work.image.height
        result: list[dict[str, Any]] = []
        for query, answer in zip(work.queries, work.answers, strict=True):
            if query.query_task == "caption" and query.region is not None and plan.caption_area:
                # Interactive caption: the annotator's region, echoed, with its caption.
                region = dict(query.region)
                region.setdefault("id", new_region_id())
                result.append(region)
                result.append(
                    _text(answer.text, box_token, plan.caption_area.name, plan.image, region["id"])
                )
        captions = work.captions or [None] * len(work.detections)
        for item, caption in zip(work.detections, captions, strict=True):
            regions = detection_results(
                item, plan, width=w, height=h, polygon_tolerance=self.settings.polygon_tolerance
            )
            result.extend(regions)
            if caption is not None and plan.caption_area is not None and regions:
                result.append(
                    _text(
                        caption.text,
                        box_token,
                        plan.caption_area.name,
                        plan.image,
                        regions[0]["id"],
                    )
                )
        if plan.answer_area is not None:
            for query, answer in zip(work.queries, work.answers, strict=True):
                if query.query_task == "chat":
                    result.append(_text(answer.text, box_token, plan.answer_area.name, plan.image))
        answers = [
            a for q, a in zip(work.queries, work.answers, strict=True) if q.query_task != "caption"
        ]
        shown = [item.detection for item in work.detections]
        return {
            "result": result,
            "score": task_score(answers, shown, self.settings.score_threshold),
            "model_version": version.name,
        }


# ------------------------------------------------------------------------ helpers


def resolve_prompts(
    plan: LabelPlan, task: dict[str, Any], context: InteractiveContext, state: ProjectState | None
) -> tuple[list[LabeledPrompt], str]:
    """The task's prompts and where they came from (``context``, ``task``, ``labels``,
    ``last``, ``label_values``; ``none``), in the order of the module docstring."""
    if context.prompt is not None:
        return [LabeledPrompt(context.prompt)], "context"
    raw = task.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    for key in plan.task_prompt_keys():
        value = data.get(key) if key != plan.image_key else None
        if isinstance(value, str) and value.strip():
            return [LabeledPrompt(value.strip())], "task"
    chat = plan.answer_area is not None
    if not chat and plan.region_controls:
        labeled = plan.label_prompts(explicit_only=plan.prompt_area is not None)
        if labeled:
            return labeled, "labels"
    if is_annotated(task):
        # The fallbacks pre-label tasks nobody has labeled yet. Label Studio also asks
        # about a task just submitted (the editor reloads it): answering with the last
        # typed prompt would put a new pending suggestion on the saved annotation.
        return [], "annotated"
    if state is not None and state.last_prompt:
        return [LabeledPrompt(state.last_prompt)], "last"
    if plan.region_controls:
        return plan.label_prompts(), "label_values"
    return [], "none"


def existing_regions(task: dict[str, Any], size: tuple[int, int]) -> list[Region]:
    """The regions of the task's drafts and (not skipped) annotations, as Label Studio
    sends them with an interactive request; results this backend cannot read are ignored
    (they are the annotator's, not this request's)."""
    out: list[Region] = []
    sets = [d for d in task.get("drafts") or [] if isinstance(d, dict)] + [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    for item in sets:
        results = item.get("result")
        if isinstance(results, list):
            ignored: list[LabelStudioFormatError] = []
            out += parse_results(results, task_id=task.get("id"), image_size=size, errors=ignored)
    return out


def is_annotated(task: dict[str, Any]) -> bool:
    """Whether the task (as Label Studio sends it to ``/predict``, annotations included)
    has an annotation that was not skipped."""
    annotations = task.get("annotations")
    return isinstance(annotations, list) and any(
        isinstance(a, dict) and not a.get("was_cancelled") for a in annotations
    )


def parse_context(context: Any, plan: LabelPlan) -> InteractiveContext:
    """``params.context`` -> :class:`InteractiveContext`. TextArea results give the prompt
    (joined lines); other results are kept as regions. ``BackendError(400)`` for a
    malformed context or an empty / too long typed prompt."""
    if context is None:
        return InteractiveContext()
    if not isinstance(context, dict):
        raise BackendError(400, f"'params.context' must be an object, got {type(context).__name__}")
    results = context.get("result", [])
    if results is None:
        results = []
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise BackendError(
            400, "'params.context.result' must be a list of Label Studio result objects"
        )
    texts: list[str] = []
    typed = False
    regions = []
    skip = {c.name for c in (plan.caption_area, plan.answer_area) if c is not None}
    for r in results:
        if str(r.get("type", "")).lower() == "textarea":
            if r.get("from_name") in skip:
                continue
            value = r.get("value") if isinstance(r.get("value"), dict) else {}
            text = value.get("text")
            if isinstance(text, str):
                text = [text]
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise BackendError(
                    400, "a TextArea context result needs value.text: a list of strings"
                )
            typed = True
            texts.extend(text)
        else:
            regions.append(r)
    prompt = None
    if typed:
        # The prompt TextArea keeps every prompt typed on this annotation, oldest first
        # (the shipped configs set no maxSubmissions, so annotators type prompt after
        # prompt); the newest is the one just submitted.
        lines = [t.strip() for t in texts if t.strip()]
        prompt = lines[-1] if lines else ""
        problem = prompt_problem(prompt)
        if problem:
            raise BackendError(400, problem)
    return InteractiveContext(prompt=prompt, regions=regions)


def _tasks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        raise BackendError(
            400, "'tasks' must be a list of Label Studio tasks ({'id', 'data': {...}})"
        )
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise BackendError(
                400, f"tasks[{i}] must be an object with 'data', got {type(t).__name__}"
            )
    return tasks


def _project(payload: dict[str, Any]) -> str | None:
    try:
        return project_key(payload.get("project"))
    except ValueError as exc:
        raise BackendError(400, str(exc)) from None


def _plan(xml: Any) -> LabelPlan:
    try:
        return plan_for(xml)
    except ValueError as exc:
        raise BackendError(400, f"label config: {exc}") from None


def _rid(result: dict[str, Any]) -> str:
    rid = result.get("id")
    return str(rid) if rid not in (None, "") else ""


def _text(
    text: str, box_token: str, from_name: str, to_name: str, region_id: str | None = None
) -> dict[str, Any]:
    return textarea_result(
        answer_text(text, box_token), from_name=from_name, to_name=to_name, region_id=region_id
    )


_SERVER_PATH = re.compile(
    r"(?<![\w:/.%])/(?!data/|upload/|storage-data/)(?:[^\s'\"/:;,()]+/)+([^\s'\"/:;,()]+)"
)


def redact_paths(text: str) -> str:
    """``text`` with absolute server paths cut to their last part (``.../demo``): error
    replies say which file, not where the server keeps it."""
    return _SERVER_PATH.sub(lambda m: ".../" + m.group(1), text)
