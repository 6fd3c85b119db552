"""Which task to annotate next: uncertainty first, by the prediction's score.

A prediction's ``score`` (the task score Label Studio's Data Manager sorts by) is the
backend's confidence that its pre-label needs no correction, so the task with the LOWEST
score is the one whose correction teaches the model most (uncertainty sampling, Lewis &
Gale 1994). A task with no usable score - no prediction, or one without a score - comes
first of all: nothing is known about it. Ties keep the input order, so the ordering is
deterministic. ``nextchat loop-demo --domain new-words`` measures this order against
:func:`random_order` with the same numbers of corrections; ``nextchat next-tasks`` lists a
project's unannotated tasks in it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

STRATEGIES = ("uncertainty", "random")


def prediction_score(prediction: Any) -> float | None:
    """The prediction-level ``score`` of a Label Studio prediction (or ``/predict``
    result), ``None`` when there is no prediction or no finite numeric score."""
    if not isinstance(prediction, Mapping):
        return None
    score = prediction.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return None
    return float(score)


def task_score(task: Mapping[str, Any], model_version: str | None = None) -> float | None:
    """The score of a Label Studio task's prediction (a task as the API or an export
    returns it, with ``predictions``): the one of ``model_version`` when given, else the
    newest (largest ``created_at``, else the last listed). ``None`` when it has none."""
    predictions = task.get("predictions") or []
    if not isinstance(predictions, list):
        raise ValueError(
            f"task {task.get('id')}: 'predictions' must be a list of prediction objects, got "
            f"{type(predictions).__name__}"
        )
    candidates = [
        p
        for p in predictions
        if isinstance(p, Mapping)
        and (model_version is None or p.get("model_version") == model_version)
    ]
    if not candidates:
        return None
    newest = max(enumerate(candidates), key=lambda kp: (str(kp[1].get("created_at") or ""), kp[0]))
    return prediction_score(newest[1])


def uncertainty_first(scored: Iterable[tuple[K, float | None]]) -> list[K]:
    """The keys of ``(key, score)`` pairs, most worth annotating first: no score, then
    lowest score; ties in input order."""
    items = list(scored)
    order = sorted(
        range(len(items)),
        key=lambda i: (items[i][1] is not None, items[i][1] or 0.0, i),
    )
    return [items[i][0] for i in order]


def random_order(keys: Sequence[K], seed: int) -> list[K]:
    """``keys`` in a random order fixed by ``seed`` (the baseline uncertainty-first is
    measured against)."""
    out = list(keys)
    random.Random(seed).shuffle(out)
    return out


def select(
    scored: Sequence[tuple[K, float | None]], n: int, strategy: str, *, seed: int = 0
) -> list[K]:
    """The first ``n`` keys by ``strategy``: ``uncertainty`` (:func:`uncertainty_first`)
    or ``random`` (:func:`random_order` with ``seed``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection strategy must be one of {STRATEGIES}, got {strategy!r}")
    if n < 0:
        raise ValueError(f"the number of tasks to select must be >= 0, got {n}")
    if strategy == "uncertainty":
        return uncertainty_first(scored)[:n]
    return random_order([k for k, _ in scored], seed)[:n]


def is_annotated(task: Mapping[str, Any]) -> bool:
    """Whether a Label Studio task has a submitted annotation (a skipped one - Label
    Studio's ``was_cancelled`` - does not count)."""
    return any(
        isinstance(a, Mapping) and not a.get("was_cancelled") for a in task.get("annotations") or []
    )


def next_tasks(
    tasks: Iterable[Mapping[str, Any]], *, model_version: str | None = None
) -> list[tuple[Any, float | None]]:
    """A project's unannotated tasks (Label Studio tasks with their ``predictions``), most
    worth annotating first (:func:`uncertainty_first` by :func:`task_score`), as
    ``(task id, score)`` pairs: what ``nextchat next-tasks`` lists."""
    scored = [(t.get("id"), task_score(t, model_version)) for t in tasks if not is_annotated(t)]
    score_of = dict(scored)
    return [(k, score_of[k]) for k in uncertainty_first(scored)]
