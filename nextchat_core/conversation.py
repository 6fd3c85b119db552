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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from .config import NextChatConfig

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


def encode_conversation(
    turns: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    config: NextChatConfig,
    *,
    num_image_tokens: int,
    num_images: int = 1,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Render ``turns`` with the template and tokenize them.

    Raises ``ValueError`` when the number of ``<image>`` markers differs from
    ``num_images``, when an ``<at>`` is not followed by ``<boxes>``, or when turns do not
    alternate user/assistant starting with the user.
    """
    if not turns:
        raise ValueError("a conversation needs at least one user turn")
    tk = config.tokens
    tpl = config.template
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

    image_ids = [tk.im_start_id] + [tk.im_patch_id] * num_image_tokens + [tk.im_end_id]

    # The space inside "<at> <boxes>" would become a token of its own (its ids would sit
    # between the pair); the pair is always adjacent in ids, as in generation.
    pair_joined = tk.at + tk.boxes

    def encode_text(text: str) -> list[int]:
        text = text.replace(f"{tk.at} {tk.boxes}", pair_joined)
        ids: list[int] = []
        for k, part in enumerate(text.split(marker)):
            if k:
                ids.extend(image_ids)
            if part:
                ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
        return ids

    input_ids: list[int] = [tk.bos_id]
    labels: list[int] = [IGNORE_INDEX]

    def add(ids: list[int], *, target: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if target else [IGNORE_INDEX] * len(ids))

    if tpl.system:
        add(encode_text(tpl.system + tpl.sep), target=False)
    for turn in turns:
        if turn.role == "user":
            add(encode_text(f"{tpl.user_role}: {turn.text}{tpl.sep}"), target=False)
        else:
            add(encode_text(f"{tpl.assistant_role}:"), target=False)
            add([*encode_text(f" {turn.text}"), tk.eos_id], target=True)
    if add_generation_prompt:
        if turns[-1].role != "user":
            raise ValueError("add_generation_prompt needs the last turn to be the user's")
        add(encode_text(f"{tpl.assistant_role}:"), target=False)

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
