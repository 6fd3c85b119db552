"""What a Label Studio label config asks of the backend: which results to build, where
prompts come from, and which label a prompt's boxes get.

Parsed once per config by ``labelstudio.config.parse_label_config`` (the SDK's
``LabelInterface``); this module only reads roles off the parsed controls:

* region controls (``RectangleLabels``, ``BrushLabels``, ``PolygonLabels`` on the
  ``Image``): every detection becomes one region in each of them;
* ``TextArea`` roles, by name or ``perRegion``:

  - ``perRegion="true"`` or a name containing ``caption``: the **caption** of a region
    (filled for the rectangle in the interactive context, or for each detected box);
  - a name containing ``answer``: the **answer** of a chat question;
  - any other TextArea (e.g. ``prompt``, ``question``): the **prompt** the annotator types;
    its ``value="$key"`` names the task data field that pre-fills it.

Label of a free-typed prompt (``label_for``): the label whose words (its value, alias,
``hint`` and ``predicted_values``) occur most often among the prompt's words, compared
case-insensitively and without a plural ``s``/``es``; ties go to the label first in the
config; with no word in common, the first label. Filler words ("all", "the", "find", ...)
are ignored. "all red cars" -> ``Car``.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from labelstudio.config import CLICK_PROMPT_TAGS, ControlInfo, LabelConfig, parse_label_config

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Words that say nothing about which label is meant ("all cars" vs "all people").
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "all",
        "any",
        "every",
        "each",
        "some",
        "of",
        "in",
        "on",
        "at",
        "and",
        "or",
        "with",
        "to",
        "is",
        "are",
        "there",
        "where",
        "what",
        "which",
        "find",
        "show",
        "me",
        "image",
        "picture",
        "photo",
        "this",
        "that",
        "these",
        "those",
    ]
)


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt to run and the label (as results store it) its detections get; ``None``
    for a free-typed prompt (the label is matched per control, see ``label_for``)."""

    prompt: str
    label: str | None = None


@dataclass(frozen=True)
class LabelPlan:
    """The roles of a label config's controls. ``image`` is the ``Image`` tag name
    results point at (``to_name``); ``image_key`` the task data key holding its URL."""

    config: LabelConfig
    image: str
    image_key: str
    rectangles: ControlInfo | None
    brushes: ControlInfo | None
    polygons: ControlInfo | None
    prompt_area: ControlInfo | None
    caption_area: ControlInfo | None
    answer_area: ControlInfo | None
    # KeyPointLabels on the image: the annotator's clicks for SAM (backend.refine).
    keypoints: ControlInfo | None = None

    @property
    def region_controls(self) -> list[ControlInfo]:
        return [c for c in (self.rectangles, self.brushes, self.polygons) if c is not None]

    @property
    def needs_masks(self) -> bool:
        return self.brushes is not None or self.polygons is not None

    @property
    def categories(self) -> list[str]:
        return self.config.categories

    def label_prompts(self, *, explicit_only: bool = False) -> list[LabeledPrompt]:
        """One prompt per label of the region controls (several for a comma-separated
        ``predicted_values``), from ``ControlInfo.label_prompts``. ``explicit_only``: only
        labels that carry a ``hint`` or ``predicted_values`` attribute."""
        out: list[LabeledPrompt] = []
        seen: set[tuple[str, str]] = set()
        for control in self.region_controls:
            for label in control.labels:
                attrs = control.label_attrs.get(label, {})
                if explicit_only and not (attrs.get("hint") or attrs.get("predicted_values")):
                    continue
                for prompt in control.label_prompts(label):
                    if (prompt, label) not in seen:
                        seen.add((prompt, label))
                        out.append(LabeledPrompt(prompt, label))
        return out

    def label_for(self, prompt: str, control: ControlInfo, preferred: str | None = None) -> str:
        """The label of ``control`` for detections of ``prompt``: ``preferred`` when the
        control has it, else the best word match (module docstring), else the first."""
        if preferred is not None and preferred in control.labels:
            return preferred
        words = _words(prompt)
        best, best_score = control.labels[0], 0
        for label in control.labels:
            attrs = control.label_attrs.get(label, {})
            text = " ".join(
                [
                    label,
                    attrs.get("value", ""),
                    attrs.get("alias", ""),
                    attrs.get("hint", ""),
                    attrs.get("predicted_values", "").replace(",", " "),
                ]
            )
            score = len(_words(text) & words)
            if score > best_score:
                best, best_score = label, score
        return best

    def task_prompt_keys(self) -> list[str]:
        """The task data keys a task's own prompt is read from, first match wins: the key
        that pre-fills the prompt TextArea (``value="$key"``), else the TextArea's name
        (``prompt``, ``question``), then ``prompt``. The shipped configs pre-fill nothing:
        a ``$key`` in a config makes Label Studio refuse tasks without that key (image-only
        imports and uploads)."""
        keys: list[str] = []
        if self.prompt_area is not None:
            value = self.prompt_area.attrs.get("value", "")
            if value.startswith("$") and len(value) > 1:
                keys.append(value[1:])
            keys.append(self.prompt_area.name)
        keys.append("prompt")
        return list(dict.fromkeys(keys))


def plan_for(xml: str) -> LabelPlan:
    """The :class:`LabelPlan` of a label config (cached per config text). Raises
    ``ValueError`` for a config without an ``Image`` or without a control this backend
    can fill."""
    if not isinstance(xml, str):
        raise ValueError(f"label config must be an XML string, got {type(xml).__name__}")
    return _plan_for(xml)


@functools.lru_cache(maxsize=64)
def _plan_for(xml: str) -> LabelPlan:
    config = parse_label_config(xml)
    image = next(iter(config.images))
    region = {
        kind: config.control_for(kind, generic_labels=False)
        for kind in ("rectangle", "brush", "polygon")
    }
    areas = [c for c in config.controls if c.tag == "textarea"]
    caption = next((c for c in areas if _role(c) == "caption"), None)
    answer = next((c for c in areas if _role(c) == "answer"), None)
    prompt = next((c for c in areas if _role(c) == "prompt"), None)
    if not any(region.values()) and caption is None and answer is None:
        # Every tag of the config but the layout ones: what the user did write.
        layout = {"view", "image", "label", "header", "text", "style", "choice", "hypertext"}
        tags = {el.tag for el in ET.fromstring(xml).iter()}
        found = sorted(t for t in tags if t.lower() not in layout) or ["no control tag"]
        raise ValueError(
            "label config has no control this backend can fill: add a <RectangleLabels>, "
            "<BrushLabels> or <PolygonLabels> on the <Image>, a per-region caption "
            '<TextArea perRegion="true">, or an answer <TextArea name="answer"> '
            f"(found: {', '.join(found)}); see label_configs/ in the repository for examples"
        )
    if answer is not None and prompt is None:
        raise ValueError(
            'a chat config needs a question <TextArea name="question" toName="image"/> '
            'beside the answer <TextArea name="answer" .../>: the question is the prompt'
        )
    for control in region.values():
        if control is not None and not control.labels:
            raise ValueError(
                f"<{control.tag} name={control.name!r}> has no <Label value=...> children: "
                "add at least one label"
            )
    to_names = [c.to_name for c in config.controls if c.to_name]
    image_name = next((n for names in to_names for n in names if n in config.images), image)
    return LabelPlan(
        config=config,
        image=image_name,
        image_key=config.images[image_name],
        rectangles=region["rectangle"],
        brushes=region["brush"],
        polygons=region["polygon"],
        prompt_area=prompt,
        caption_area=caption,
        answer_area=answer,
        keypoints=next((c for c in config.controls if c.tag in CLICK_PROMPT_TAGS), None),
    )


def _role(control: ControlInfo) -> str:
    name = control.name.lower()
    per_region = control.attrs.get("perRegion", control.attrs.get("perregion", "")).lower()
    if per_region == "true" or "caption" in name:
        return "caption"
    if "answer" in name:
        return "answer"
    return "prompt"


def _words(text: str) -> set[str]:
    out = set()
    for w in _WORD.findall(text.lower()):
        if w not in _STOPWORDS:
            out.add(_singular(w))
    return out


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word
