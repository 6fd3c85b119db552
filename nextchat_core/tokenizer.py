"""Tokenizers: the released model's LLaMA tokenizer, or a byte-level BPE for small presets.

The released checkpoint ships its LLaMA tokenizer (32000 pieces + the 5 NExT-Chat tokens
at 32000-32004); it is loaded with ``transformers.AutoTokenizer`` from the checkpoint
directory. Small presets have no pretrained tokenizer, so :func:`train_bpe_tokenizer`
trains a byte-level BPE with the ``tokenizers`` library: byte-level means any text a user
types encodes (no unknown characters), which a word-level vocabulary could not promise.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import NextChatConfig, TokenConfig

_BASE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, as TokenConfig expects

# Words every small model should hold as single pieces: the template and task prompts.
_SEED_TEXT = (
    "USER: ASSISTANT: Where is the in image? Answer: . What is in the region ? "
    "Yes, No, there is a an of and on left right top bottom small large leftmost "
    "rightmost topmost all shapes shape object objects"
)


def train_bpe_tokenizer(
    corpus: Iterable[str], *, config: NextChatConfig
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose size and special-token ids match ``config``.

    The vocabulary is exactly ``config.llm.vocab_size``: 4 base specials, learned pieces,
    filler tokens if the corpus is too small to learn enough merges, and NExT-Chat's five
    added tokens last (``config.tokens`` ids).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok_cfg = config.tokens
    target = config.llm.vocab_size - len(tok_cfg.added_tokens())
    expected = [
        tok_cfg.im_patch_id,
        tok_cfg.im_start_id,
        tok_cfg.im_end_id,
        tok_cfg.at_id,
        tok_cfg.boxes_id,
    ]
    if expected != list(range(target, target + 5)) or (
        tok_cfg.bos_id,
        tok_cfg.eos_id,
        tok_cfg.pad_id,
    ) != (1, 2, 3):
        raise ValueError(
            "train_bpe_tokenizer expects the small-preset token layout (<unk> <s> </s> <pad> "
            f"first, the 5 NExT-Chat tokens last at {list(range(target, target + 5))}); got "
            f"added ids {expected}, bos/eos/pad {(tok_cfg.bos_id, tok_cfg.eos_id, tok_cfg.pad_id)}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_SEED_TEXT, *corpus], trainer=trainer)
    missing = target - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<extra_{i}>" for i in range(missing)])
    tokenizer.add_special_tokens(tok_cfg.added_tokens())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    check_tokenizer(fast, tok_cfg, vocab_size=config.llm.vocab_size)
    return fast


def encode_text(
    text: str, tokenizer: PreTrainedTokenizerBase, tokens: TokenConfig
) -> list[tuple[int, int]]:
    """``(token id, end offset in text)`` for each token of ``text``, by the rule of the
    tokenizer the released model was trained with.

    NExT-Chat tokenizes each conversation as ONE string with transformers 4.31's slow
    ``LlamaTokenizer`` (``legacy: true``). That tokenizer splits the text at added and
    special tokens; next to the five added NExT-Chat tokens it strips the whitespace on
    both sides (they are plain added tokens, stripped by default), next to ``<s>``, ``</s>``
    and ``<unk>`` it strips nothing (their ``AddedToken`` has ``lstrip/rstrip`` false); each
    remaining piece is encoded on its own by SentencePiece, which puts its dummy prefix
    ``▁`` before every piece. transformers 5 has no such tokenizer (its ``LlamaTokenizer``
    is the converted fast one: it keeps a ``▁`` before ``<im_start>`` and differs on
    leading spaces), so the rule is written here. Pieces go through SentencePiece itself
    when the checkpoint ships ``tokenizer.model``, else through the tokenizer's own fast
    encoder (the small presets' byte-level BPE).
    """
    added = tokens.added_token_ids()
    special = {
        t: int(tokenizer.convert_tokens_to_ids(t))  # type: ignore[arg-type]
        for t in tokenizer.all_special_tokens
        if t and t not in added
    }
    names = sorted([*added, *special], key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
    # parts alternate text, token, text, ...: strip the text beside added tokens.
    starts, pos = [], 0
    for part in parts:
        starts.append(pos)
        pos += len(part)
    spans = [[starts[k], starts[k] + len(part)] for k, part in enumerate(parts)]
    for k in range(1, len(parts), 2):
        if parts[k] in added:
            left, right = spans[k - 1], spans[k + 1]
            left[1] = starts[k - 1] + len(parts[k - 1].rstrip()) if left[1] > left[0] else left[1]
            right[0] = right[1] - len(parts[k + 1].lstrip()) if right[1] > right[0] else right[0]
    encode = _piece_encoder(tokenizer)
    out: list[tuple[int, int]] = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append((added.get(part, special.get(part, 0)), spans[k][1]))
            continue
        lo, hi = spans[k]
        if hi > lo:
            out.extend((tid, lo + end) for tid, end in encode(text[lo:hi]))
    return out


def decode_text(ids: Iterable[int], tokenizer: PreTrainedTokenizerBase, tokens: TokenConfig) -> str:
    """Generated ids as text, as the official (4.31 slow) decode writes them: runs of
    ordinary tokens decoded, the added tokens written as themselves, the parts joined by
    spaces (``spaces_between_special_tokens``); ``<s>``/``</s>``/padding left out."""
    by_id = {v: t for t, v in tokens.added_token_ids().items()}
    skip = {tokens.bos_id, tokens.eos_id, tokens.pad_id}
    parts: list[str] = []
    run: list[int] = []
    for tid in ids:
        if tid in by_id or tid in skip:
            if run:
                parts.append(str(tokenizer.decode(run, skip_special_tokens=True)))
                run = []
            if tid in by_id:
                parts.append(by_id[tid])
        else:
            run.append(tid)
    if run:
        parts.append(str(tokenizer.decode(run, skip_special_tokens=True)))
    return " ".join(p.strip() for p in parts if p.strip())


def _piece_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[tuple[int, int]]]:
    """Encodes one piece of text (no special tokens in it): ``(id, end char offset)``."""
    model = _sentencepiece_file(tokenizer)
    if model is not None:
        return functools.partial(_sentencepiece_encode, _sentencepiece(str(model)))

    def fast(piece: str) -> list[tuple[int, int]]:
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (int(t), int(end))
            for t, (_, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    return fast


def _sentencepiece_file(tokenizer: PreTrainedTokenizerBase) -> Path | None:
    name = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if name and str(name).endswith(".model") and Path(name).is_file():
        return Path(name)
    return None


@functools.lru_cache(maxsize=4)
def _sentencepiece(path: str) -> Any:
    try:
        import sentencepiece
    except ImportError as exc:  # a declared dependency; say what is missing if it is not
        raise ImportError(
            f"the checkpoint's tokenizer is SentencePiece ({path}); install the "
            "'sentencepiece' and 'protobuf' packages"
        ) from exc
    return sentencepiece.SentencePieceProcessor(model_file=path)


def _sentencepiece_encode(sp: Any, piece: str) -> list[tuple[int, int]]:
    # SentencePiece reports byte offsets; map them to character offsets.
    data = piece.encode("utf-8")
    char_end = [0] * (len(data) + 1)
    b = 0
    for i, ch in enumerate(piece):
        b += len(ch.encode("utf-8"))
        char_end[b] = i + 1
    for j in range(1, len(char_end)):  # offsets inside a character round up to its end
        char_end[j] = max(char_end[j], char_end[j - 1])
    proto = sp.encode(piece, return_type="proto")
    return [(int(p.id), char_end[p.end]) for p in proto.pieces]


def load_tokenizer(path: str | Path, config: NextChatConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved beside a checkpoint and check it against ``config``.

    A released checkpoint's tokenizer is SentencePiece (``tokenizer.model``, no
    ``tokenizer.json``); transformers needs ``sentencepiece`` and ``protobuf`` to read it,
    and says "tiktoken is required" when they are missing. The error here names the file
    and the packages instead.
    """
    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, ImportError, OSError, RuntimeError) as exc:
        files = sorted(
            p.name
            for p in path.glob("*")
            if p.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab"))
        )
        need = ""
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            missing = [m for m in ("sentencepiece", "google.protobuf") if not _importable(m)]
            if missing:
                need = (
                    f"; {path / 'tokenizer.model'} is a SentencePiece model, which needs the "
                    f"missing package(s) {', '.join(n.replace('google.', '') for n in missing)}: "
                    "pip install sentencepiece protobuf"
                )
        raise ValueError(
            f"cannot load the tokenizer of {path} (tokenizer files found: {files or 'none'}): "
            f"{exc}{need}"
        ) from exc
    check_tokenizer(tokenizer, config.tokens, vocab_size=config.llm.vocab_size)
    return tokenizer


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, tokens: TokenConfig, *, vocab_size: int
) -> None:
    """Raise ``ValueError`` when the tokenizer's special-token ids disagree with the config."""
    wanted = {
        tokens.im_patch: tokens.im_patch_id,
        tokens.im_start: tokens.im_start_id,
        tokens.im_end: tokens.im_end_id,
        tokens.at: tokens.at_id,
        tokens.boxes: tokens.boxes_id,
    }
    for text, want in wanted.items():
        got = tokenizer.convert_tokens_to_ids(text)
        if got != want:
            raise ValueError(
                f"tokenizer maps {text} to id {got}, the config expects {want}: the tokenizer "
                "and config.json come from different checkpoints"
            )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )
