"""Label Studio label configs: which image, which controls, which labels.

:func:`parse_label_config` reads the XML once (through ``label_studio_sdk``'s
``LabelInterface``) into a :class:`LabelConfig`; :meth:`LabelConfig.control_for` is the one
rule for which control gets rectangles, brushes and polygons.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

RegionKind = Literal["rectangle", "polygon", "brush"]

_REGION_CONTROL_TAGS = frozenset(
    {
        "rectanglelabels",
        "polygonlabels",
        "brushlabels",
        "labels",
        "rectangle",
        "polygon",
        "brush",
    }
)
# Controls (and result types) that are prompts for the backend, not regions: the
# annotator's clicks of click refinement (Label Studio's SAM backends' KeyPointLabels),
# kept in the annotation beside the mask they made, never objects to train on.
CLICK_PROMPT_TAGS = frozenset({"keypointlabels"})


@dataclass(frozen=True)
class ControlInfo:
    """A control tag of the label config that matters here (region tools and TextArea)."""

    name: str
    tag: str  # lower-case tag, e.g. "rectanglelabels", "labels", "textarea"
    to_name: tuple[str, ...]
    labels: tuple[str, ...]  # as results store them (alias if the Label has one)
    # The tag's own XML attributes (e.g. TextArea ``value="$prompt"``, ``perRegion``).
    attrs: Mapping[str, str] = field(default_factory=dict)
    # Each label (as results store it) -> its <Label> attributes (value, alias, hint, ...).
    label_attrs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def label_prompts(self, label: str) -> list[str]:
        """Text prompts that find ``label``: its ``hint`` attribute, else its
        comma-separated ``predicted_values``, else the label's shown ``value``.

        ``<Label value="Car" hint="all cars"/>`` -> ``["all cars"]``;
        ``<Label value="Person" predicted_values="man,woman"/>`` -> ``["man", "woman"]``.
        """
        attrs = self.label_attrs.get(label, {})
        hint = (attrs.get("hint") or "").strip()
        if hint:
            return [hint]
        values = [v.strip() for v in (attrs.get("predicted_values") or "").split(",")]
        values = [v for v in values if v]
        return values or [(attrs.get("value") or label).strip()]


@dataclass(frozen=True)
class LabelConfig:
    """What a Label Studio label config says about image regions.

    ``controls`` are in config order: region controls (``RectangleLabels``,
    ``PolygonLabels``, ``BrushLabels``, ``Labels``, ``Rectangle``, ``Polygon``, ``Brush``)
    and click-prompt controls (``KeyPointLabels``) whose ``toName`` is an ``Image``, and
    ``TextArea`` controls. ``images`` maps each
    ``Image`` tag name to the task data key its ``value="$key"`` reads.
    """

    xml: str
    controls: tuple[ControlInfo, ...]
    images: dict[str, str] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        """Distinct labels of the region controls, in config order (first occurrence)."""
        seen: dict[str, None] = {}
        for c in self.controls:
            if c.tag in _REGION_CONTROL_TAGS:
                for label in c.labels:
                    seen.setdefault(label, None)
        return list(seen)

    def control_for(
        self, kind: RegionKind | Literal["textarea"], *, generic_labels: bool = True
    ) -> ControlInfo | None:
        """The first control that writes ``kind`` results, or ``None``: ``<kind>labels``
        first, then (``generic_labels``) the generic ``Labels``. The one rule for which
        control gets rectangles, brushes and polygons: the COCO importer takes a generic
        ``Labels`` too; the backend (``generic_labels=False``) writes only
        ``<kind>labels`` results."""
        if kind == "textarea":
            wanted = ["textarea"]
        else:
            wanted = [f"{kind}labels", "labels"] if generic_labels else [f"{kind}labels"]
        for tag in wanted:
            for c in self.controls:
                if c.tag == tag:
                    return c
        return None

    def image_key(self, to_name: str | None = None) -> str | None:
        """Task data key of the image ``to_name`` (the first ``Image`` when ``None``)."""
        if to_name is not None and to_name in self.images:
            return self.images[to_name]
        return next(iter(self.images.values()), None)


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio label config (XML) into a :class:`LabelConfig`.

    Uses ``label_studio_sdk.label_interface.LabelInterface``; raises ``ValueError`` for
    text that is not XML or has no ``Image`` tag.
    """
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise ValueError("label config must be a non-empty XML string, like '<View>...</View>'")
    try:
        ET.fromstring(xml)  # the SDK raises a bare Exception subclass; check syntax first
    except ET.ParseError as exc:
        raise ValueError(f"label config is not valid XML: {exc}") from exc
    li = LabelInterface(xml)
    images = {
        o.name: (o.value_name or "image")
        for o in (li.objects or [])
        if str(o.tag).lower() == "image"
    }
    if not images:
        raise ValueError(
            'label config has no <Image name=... value="$key"/> tag: this backend labels '
            "images (and COCO export and import need an image config); add one, e.g. "
            '<Image name="image" value="$image"/>'
        )
    controls = []
    for c in li.controls or []:
        tag = str(c.tag).lower()
        to_name = tuple(c.to_name or ())
        on_image = any(n in images for n in to_name)
        if tag == "textarea" or (tag in _REGION_CONTROL_TAGS | CLICK_PROMPT_TAGS and on_image):
            label_attrs = {
                label: {str(k): str(v) for k, v in (tag_.attr or {}).items()}
                for label, tag_ in (c.labels_attrs or {}).items()
            }
            controls.append(
                ControlInfo(
                    name=c.name,
                    tag=tag,
                    to_name=to_name,
                    labels=tuple(c.labels or ()),
                    attrs={str(k): str(v) for k, v in (c.attr or {}).items()},
                    label_attrs=label_attrs,
                )
            )
    return LabelConfig(xml=xml, controls=tuple(controls), images=images)
