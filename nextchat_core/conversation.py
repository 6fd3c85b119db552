"""Conversation template and tokenization: text turns -> ``input_ids`` and ``labels``.

NExT-Chat uses the Vicuna v1.1 template::

    {system} USER: {question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:

with the LM loss on assistant turns only. The text ``<image>`` becomes ``<im_start>``,
``num_image_tokens`` x ``<im_patch>``, ``<im_end>``; every box is the pair
``<at> <boxes>`` (the box itself travels beside the text and is injected at the
``<boxes>`` position through ``loc_encoder``). The template strings are part of the
checkpoint's config (:class:`~nextchat_core.config.TemplateConfig`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import inflect
from transformers import PreTrainedTokenizerBase

from .config import NextChatConfig
from .tokenizer import encode_text

IGNORE_INDEX = -100  # label value that takes no loss (the HF convention)
BOX_PAIR = "<at> <boxes>"


@dataclass
class Turn:
    """One message. ``role`` is ``"user"`` or ``"assistant"``."""

    role: Literal["user", "assistant"]
    text: str


@dataclass
class EncodedConversation:
    """Token ids of one conversation.

    ``input_ids``/``labels``: length-T lists; labels are ``IGNORE_INDEX`` outside assistant
    turns and at ``<boxes>`` positions (their embedding comes from ``loc_encoder``).
    ``num_boxes``: how many ``<boxes>`` placeholders the ids hold, in order.
    """

    input_ids: list[int]
    labels: list[int]
    num_boxes: int


def box_pairs(n: int) -> str:
    """``n`` box references in text: ``"<at> <boxes> <at> <boxes> ..."``."""
    return " ".join([BOX_PAIR] * n)


_REGION_REF = re.compile(r"\[(\d+)\]")


def refer_regions(text: str, boxes: Sequence[Sequence[float]]) -> tuple[str, list[list[float]]]:
    """A user text that names input regions by index, ``[0]``, ``[1]`` ... (as NExT-Chat's
    and Shikra's data do), with each reference written as ``<at> <boxes>``; returns the text
    and the boxes in the order the references appear (a region named twice is passed twice).
    Raises ``ValueError`` for an index with no box."""
    ordered: list[list[float]] = []

    def pair(match: re.Match[str]) -> str:
        k = int(match.group(1))
        if k >= len(boxes):
            raise ValueError(
                f"the prompt names region [{k}] but {len(boxes)} input box(es) were given; "
                f"use [0] to [{len(boxes) - 1}]"
                if boxes
                else f"the prompt names region [{k}] but no input boxes were given"
            )
        ordered.append([float(v) for v in boxes[k]])
        return BOX_PAIR

    return _REGION_REF.sub(pair, text), ordered


def grounding_turns(
    expression: str, config: NextChatConfig, *, num_boxes: int | None = None
) -> list[Turn]:
    """Referring-expression turns: the REC question, and (for training) the answer with
    ``num_boxes`` box pairs. ``num_boxes=None`` gives the question alone (for generation)."""
    t = config.template
    turns = [Turn("user", t.rec_question.format(expr=expression.strip()))]
    if num_boxes is not None:
        turns.append(Turn("assistant", t.rec_answer.format(boxes=box_pairs(num_boxes))))
    return turns


def caption_turns(config: NextChatConfig, *, caption: str | None = None) -> list[Turn]:
    """Region-caption turns: a question holding one input box, and (for training) the
    caption as answer."""
    turns = [Turn("user", config.template.caption_question.format(region=BOX_PAIR))]
    if caption is not None:
        turns.append(Turn("assistant", caption))
    return turns


def exists_turns(expression: str, config: NextChatConfig) -> list[Turn]:
    """The yes/no question a region's confidence asks about a referring expression
    (``template.exists_question``), with the expression as POPE - the benchmark NExT-Chat
    reports yes/no accuracy on - words its objects ("Is there a car in the image?"):
    :func:`presence_expression`."""
    question = config.template.exists_question.format(expr=presence_expression(expression))
    return chat_turns(question, config)


def presence_expression(expression: str) -> str:
    """``expression`` as the object of "Is there ...?": a leading "the" becomes "a"/"an"
    ("the orange star" -> "an orange star"), and "all" + a plural becomes "a" + its
    singular ("all red cars on the left" -> "a red car on the left"); anything else as
    typed. English articles and singulars by ``inflect``. Why (measured on the bundled
    model): bench/RESULTS.md, "Region-score candidates"."""
    words = expression.split()
    head = words[0].lower() if len(words) > 1 else ""
    if head not in ("the", "all"):
        return " ".join(words)
    rest = words[1:]
    if head == "all":
        for i, word in enumerate(rest):
            singular = _english().singular_noun(word)
            if singular:
                rest[i] = singular
                break
        else:
            return " ".join(words)  # no plural noun after "all": leave it
    return _english().a(" ".join(rest))


@functools.cache
def _english() -> inflect.engine:
    return inflect.engine()


def chat_turns(question: str, config: NextChatConfig, *, answer: str | None = None) -> list[Turn]:
    """A free question about the image, placed by the template's ``chat_question`` unless
    it already holds ``<image>``."""
    marker = config.tokens.image_placeholder
    text = (
        question
        if marker in question
        else config.template.chat_question.format(question=question.strip())
    )
    turns = [Turn("user", text)]
    if answer is not None:
        turns.append(Turn("assistant", answer))
    return turns


def render_conversation(
    turns: Sequence[Turn],
    config: NextChatConfig,
    *,
    num_image_tokens: int,
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as ONE string, as the official code renders it, and the
    character spans of the assistant answers (each ending with ``</s>``).

    Vicuna v1.1 (FastChat ``ADD_COLON_TWO``): ``{system} USER: {q} ASSISTANT: {a}</s>USER:
    ... ASSISTANT:``. ``<image>`` is expanded in the text to ``<im_start>``,
    ``num_image_tokens`` x ``<im_patch>``, ``<im_end>`` (the official prompt holds them
    literally). An empty ``template.system`` (small presets) leaves the system line out.
    """
    tk, tpl = config.tokens, config.template
    image = tk.im_start + tk.im_patch * num_image_tokens + tk.im_end
    eos = tpl.sep2
    parts: list[str] = [tpl.system + tpl.sep] if tpl.system else []
    spans: list[tuple[int, int]] = []
    length = len(parts[0]) if parts else 0
    for turn in turns:
        text = turn.text.replace(tk.image_placeholder, image)
        if turn.role == "user":
            piece = f"{tpl.user_role}: {text}{tpl.sep}"
        else:
            head = f"{tpl.assistant_role}: "
            piece = f"{head}{text}{eos}"
            spans.append((length + len(head), length + len(piece)))
        parts.append(piece)
        length += len(piece)
    if add_generation_prompt:
        parts.append(f"{tpl.assistant_role}:")
    return "".join(parts), spans


def encode_conversation(
    turns: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    config: NextChatConfig,
    *,
    num_image_tokens: int,
    num_images: int = 1,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Render ``turns`` as one string and tokenize it in one pass, by the official rule.

    The ids are those of transformers 4.31's slow ``LlamaTokenizer`` on that string (what
    the released model was trained on; see :func:`~nextchat_core.tokenizer.encode_text`):
    ``... ▁USER : <im_start> <im_patch>... <im_end> ▁Where ▁is ... ? ▁ASSISTANT :`` and
    ``Answer : <at> <boxes> ▁.`` - no standalone ``▁`` next to an added token. Labels are
    the tokens that end inside an assistant answer (its ``</s>`` included).

    Raises ``ValueError`` when the number of ``<image>`` markers differs from
    ``num_images``, when an ``<at>`` is not followed by ``<boxes>``, or when turns do not
    alternate user/assistant starting with the user.
    """
    if not turns:
        raise ValueError("a conversation needs at least one user turn")
    tk = config.tokens
    marker = tk.image_placeholder
    found = sum(t.text.count(marker) for t in turns)
    if found != num_images:
        raise ValueError(
            f"the conversation has {found} {marker} marker(s) but {num_images} image(s) were "
            f"given; put exactly one {marker} in the first question, e.g. "
            f"'{marker} Where is the red circle?'"
        )
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(
                f"turn {i} has role {turn.role!r}; turns must alternate user/assistant, "
                "starting with the user"
            )
    if add_generation_prompt and turns[-1].role != "user":
        raise ValueError("add_generation_prompt needs the last turn to be the user's")
    text, spans = render_conversation(
        turns,
        config,
        num_image_tokens=num_image_tokens,
        add_generation_prompt=add_generation_prompt,
    )
    pieces = encode_text(text, tokenizer, tk)
    input_ids: list[int] = [tk.bos_id]
    labels: list[int] = [IGNORE_INDEX]
    for tid, end in pieces:
        input_ids.append(tid)
        target = any(lo < end <= hi for lo, hi in spans)
        labels.append(tid if target else IGNORE_INDEX)
    return _checked(input_ids, labels, config)


def _checked(
    input_ids: list[int], labels: list[int], config: NextChatConfig
) -> EncodedConversation:
    """Every ``<at>`` is followed by ``<boxes>``; ``<boxes>`` takes no LM loss (its input
    embedding comes from ``loc_encoder``)."""
    tk = config.tokens
    for pos, tid in enumerate(input_ids):
        if tid == tk.at_id and (pos + 1 >= len(input_ids) or input_ids[pos + 1] != tk.boxes_id):
            raise ValueError(
                f"every {tk.at} must be followed by {tk.boxes} (write boxes as '{BOX_PAIR}')"
            )
        if tid == tk.boxes_id:
            labels[pos] = IGNORE_INDEX
    return EncodedConversation(
        input_ids=input_ids, labels=labels, num_boxes=input_ids.count(tk.boxes_id)
    )
