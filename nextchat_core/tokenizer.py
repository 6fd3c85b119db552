"""Tokenizers: the released model's LLaMA tokenizer, or a byte-level BPE for small presets.

The released checkpoint ships its LLaMA tokenizer (32000 pieces + the 5 NExT-Chat tokens
at 32000-32004); it is loaded with ``transformers.AutoTokenizer`` from the checkpoint
directory. Small presets have no pretrained tokenizer, so :func:`train_bpe_tokenizer`
trains a byte-level BPE with the ``tokenizers`` library: byte-level means any text a user
types encodes (no unknown characters), which a word-level vocabulary could not promise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


def load_tokenizer(path: str | Path, config: NextChatConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved beside a checkpoint and check it against ``config``."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_tokenizer(tokenizer, config.tokens, vocab_size=config.llm.vocab_size)
    return tokenizer


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
