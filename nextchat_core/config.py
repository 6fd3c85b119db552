"""Typed, validated NExT-Chat configuration: one composite config of sub-configs.

A checkpoint carries its config (``config.json``), so the vision tower, the sizes, the
token ids and the prompt template are properties of the checkpoint. Named presets:

* ``tiny`` - for tests: every part present, seconds on CPU.
* ``demo`` - the small model trained by ``make demo-model`` and shipped with the product.
* ``nextchat-7b-336`` - the released NExT-Chat-7B-336 shapes (CLIP ViT-L/14-336 layer -2
  without CLS, 2-layer GELU projector 1024->4096->4096, Vicuna-7B with vocab 32005,
  loc_encoder 4->2048->4096, loc_decoder 4096->2048->4, seg_prompt_mlp 4096->4096->1024
  as 4 tokens x 256, SAM ViT-H).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_VERSION = 1


@dataclass
class VisionConfig:
    """The vision tower: any ``transformers`` encoder that yields patch features."""

    # "clip": transformers CLIPVisionModel (the released model); "hf": any other
    # transformers vision backbone named by hf_model_type (AutoModel.from_config).
    backbone: Literal["clip", "hf"] = "clip"
    hf_model_type: str = ""  # e.g. "vit", "convnext", used when backbone == "hf"
    image_size: int = 336  # square input side, pixels
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    select_layer: int = -2  # NExT-Chat/LLaVA: penultimate layer's hidden states
    drop_cls: bool = True  # drop the CLS token (576 patch tokens at 336/14)
    # Per-channel normalization after centered pad-to-square (CLIP's mean/std).
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # RGB fill of the centered pad to square, a property of what the checkpoint was trained
    # on. NExT-Chat's Expand2square pads with WHITE (following Shikra), not the CLIP mean
    # colour of LLaVA's expand2square.
    pad_color: tuple[int, int, int] = (255, 255, 255)
    frozen: bool = True  # the released model never trains CLIP
    # Add a learned 2-D position embedding to a conv backbone's feature map. Conv features
    # carry no absolute position, and LLaMA's rotary embedding acts on queries and keys
    # only, so without this the `<at>` state cannot read WHERE a referred cell is (ViTs such
    # as CLIP already add position embeddings; the released model has none here).
    position_embedding: bool = False
    # Conv backbones: fuse the map of the stage BEFORE ``select_layer`` (twice the
    # resolution) with the upsampled ``select_layer`` map (3x3 conv + BatchNorm + ReLU, then
    # 1x1 conv to ``hidden_size``): a stride-16 token grid whose cells still see stride-32
    # context. ``patch_size`` is then half the backbone's total stride. The demo uses it
    # because its small objects are 5-22 px at 256 px (docs/perception-trial.md).
    fuse_previous_stage: bool = False
    # Conv backbones: merge each ``token_merge x token_merge`` block of the feature map into
    # one token (space-to-depth: channels concatenated, row-major within the block), so the
    # LLM sees ``1/token_merge^2`` as many tokens, each ``hidden_size`` wide; the map itself
    # then has ``hidden_size / token_merge^2`` channels and ``patch_size`` is the stride of
    # the merged tokens. (As Qwen2-VL's 2x2 merge: the LLM's cost is linear in the tokens,
    # and on the demo's CPU 256 tokens made an LLM step ~3x slower than 64.)
    token_merge: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # forwarded to the HF config

    def validate(self) -> None:
        if self.backbone not in ("clip", "hf"):
            raise ValueError(f"vision.backbone must be 'clip' or 'hf', got {self.backbone!r}")
        if self.backbone == "hf" and not self.hf_model_type:
            raise ValueError("vision.hf_model_type is required when vision.backbone == 'hf'")
        if self.backbone == "clip" and self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size ({self.image_size}) must be a multiple of "
                f"vision.patch_size ({self.patch_size})"
            )
        if (self.fuse_previous_stage or self.token_merge != 1) and self.backbone == "clip":
            raise ValueError(
                "vision.fuse_previous_stage and vision.token_merge are for conv backbones, "
                f"not CLIP (got fuse_previous_stage={self.fuse_previous_stage}, "
                f"token_merge={self.token_merge})"
            )
        if self.token_merge < 1 or self.hidden_size % (self.token_merge**2):
            raise ValueError(
                f"vision.token_merge must be >= 1 and its square must divide hidden_size "
                f"({self.hidden_size}), got {self.token_merge}"
            )
        if not -self.num_layers <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"vision.select_layer {self.select_layer} is outside the tower's "
                f"{self.num_layers} layers"
            )

    @property
    def num_patches(self) -> int:
        """Image tokens per image for a ViT tower (576 for CLIP ViT-L/14 at 336 px)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ProjectorConfig:
    """``mm_projector``: ``depth`` Linear layers with GELU between (mlp2x_gelu)."""

    depth: int = 2

    def validate(self) -> None:
        if self.depth < 1:
            raise ValueError(f"projector.depth must be >= 1, got {self.depth}")


@dataclass
class LLMConfig:
    """The language model, a ``transformers`` LlamaForCausalLM built from these sizes."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32005  # 32000 LLaMA + 5 NExT-Chat tokens
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"
    # Init std of every LLaMA weight (transformers' default 0.02; irrelevant once weights
    # are loaded). A small model trained from scratch wants ~1/sqrt(hidden_size), so word
    # embeddings are not drowned by image tokens in the residual stream.
    initializer_range: float = 0.02

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"llm.hidden_size ({self.hidden_size}) must be divisible by "
                f"llm.num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"llm.num_heads ({self.num_heads}) must be divisible by "
                f"llm.num_kv_heads ({self.num_kv_heads})"
            )


@dataclass
class LocationConfig:
    """``loc_encoder`` (box in, 4->hidden->llm) and ``loc_decoder`` (llm->hidden->4)."""

    hidden_size: int = 2048
    # Between the two Linears: "relu" (NExT-Chat). A small model trained from scratch
    # wants "gelu": with ReLU at a from-scratch learning rate, 95 % of loc_decoder's
    # units died in the demo's first run and the box stayed the average one.
    activation: str = "relu"

    def validate(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"location.hidden_size must be >= 1, got {self.hidden_size}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(
                f"location.activation must be 'relu' or 'gelu', got {self.activation!r}"
            )


@dataclass
class SamConfig:
    """segment-anything ImageEncoderViT / PromptEncoder / MaskDecoder sizes, plus
    ``seg_prompt_mlp`` (llm -> mlp_hidden -> num_prompt_tokens * prompt_dim)."""

    image_size: int = 1024  # SAM input side (longest side resized to this, centered pad)
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    prompt_dim: int = 256  # SAM's prompt / transformer dim
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    num_prompt_tokens: int = 4  # seg_prompt_mlp output = 4 tokens x 256 (NExT-Chat)
    prompt_mlp_hidden: int = 4096
    # The public demo zeroes masks whose predicted IoU is below 0.3.
    mask_iou_threshold: float = 0.3
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"sam.image_size ({self.image_size}) must be a multiple of "
                f"sam.patch_size ({self.patch_size})"
            )
        if any(i >= self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError(
                f"sam.encoder_global_attn_indexes {self.encoder_global_attn_indexes} "
                f"must be < sam.encoder_depth ({self.encoder_depth})"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError("sam.encoder_embed_dim must be divisible by sam.encoder_num_heads")
        if self.prompt_dim % self.decoder_num_heads:
            raise ValueError("sam.prompt_dim must be divisible by sam.decoder_num_heads")

    @property
    def embedding_size(self) -> int:
        """Side of SAM's image embedding grid (64 for the released 1024/16)."""
        return self.image_size // self.patch_size


@dataclass
class TokenConfig:
    """NExT-Chat's added tokens and their ids (32000-32004 in the released tokenizer)."""

    im_patch: str = "<im_patch>"
    im_start: str = "<im_start>"
    im_end: str = "<im_end>"
    at: str = "<at>"  # the paper's <trigger>
    boxes: str = "<boxes>"  # the location placeholder filled by loc_encoder
    image_placeholder: str = "<image>"  # text marker expanded to im_start + patches + im_end
    im_patch_id: int = 32000
    im_start_id: int = 32001
    im_end_id: int = 32002
    at_id: int = 32003
    boxes_id: int = 32004
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def validate(self) -> None:
        ids = [self.im_patch_id, self.im_start_id, self.im_end_id, self.at_id, self.boxes_id]
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids must be distinct, got {ids}")

    def added_tokens(self) -> list[str]:
        return [self.im_patch, self.im_start, self.im_end, self.at, self.boxes]

    def added_token_ids(self) -> dict[str, int]:
        """The five added tokens and their ids, in the released order."""
        ids = [self.im_patch_id, self.im_start_id, self.im_end_id, self.at_id, self.boxes_id]
        return dict(zip(self.added_tokens(), ids, strict=True))


@dataclass
class TemplateConfig:
    """The conversation template (Vicuna v1.1 for the released model) and the task
    prompts used to turn a referring expression into a question."""

    system: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    sep2: str = "</s>"
    # Where is {expr}: the REC question; {expr} is replaced, <image> marks the image.
    rec_question: str = "<image> Where is {expr} in the image?"
    rec_answer: str = "Answer: {boxes} ."
    caption_question: str = "<image> What is in the region {region}?"
    # A free question; {question} is the user's text. Small models put the image AFTER the
    # text so that (causal) image tokens can attend to the question.
    chat_question: str = "<image> {question}"
    # The yes/no question a region's confidence asks (POPE-style, which NExT-Chat is
    # evaluated on), and the first words of its two answers.
    exists_question: str = "Is there {expr} in the image?"
    yes_answer: str = "Yes"
    no_answer: str = "No"
    # How the conversation becomes ids: rendered as ONE string and tokenized by the official
    # rule (nextchat_core.tokenizer.encode_text), what the released model was trained on. The
    # only value: kept in config.json so that a checkpoint states it.
    tokenization: Literal["one-string"] = "one-string"

    def validate(self) -> None:
        if self.tokenization != "one-string":
            raise ValueError(
                f"template.tokenization must be 'one-string' (the official rule), got "
                f"{self.tokenization!r}: 'per-turn' checkpoints (the demo model shipped before "
                "2026-12-01) are no longer read; retrain with `make demo-model`"
            )
        if "{expr}" not in self.rec_question:
            raise ValueError("template.rec_question must contain '{expr}'")
        if "{boxes}" not in self.rec_answer:
            raise ValueError("template.rec_answer must contain '{boxes}'")
        if "{region}" not in self.caption_question:
            raise ValueError("template.caption_question must contain '{region}'")
        if "{expr}" not in self.exists_question:
            raise ValueError("template.exists_question must contain '{expr}'")
        if "{question}" not in self.chat_question:
            raise ValueError("template.chat_question must contain '{question}'")


@dataclass
class ScoreConfig:
    """How a region's confidence is computed (the formula: ``nextchat_core.predictor``'s
    module docstring; the measurements behind it: ``bench/score_candidates.py``).

    ``presence``: ``"exists"`` - the prompt's object is judged present with the model's own
    yes/no answer to ``template.exists_question`` (p(yes) / (p(yes) + p(no)), POPE-style,
    which the released model is evaluated on), and a region found for a prompt whose
    p(yes) is under ``presence_threshold`` is not returned; ``"at"`` - the probability of
    the ``<at>`` token, for checkpoints that never learned to answer yes/no (the tiny test
    preset): no extra pass, no gate. ``presence_threshold`` 0.5: a region is returned when
    the model would answer "Yes".

    ``calibration``: Platt scaling of the score, fitted for this checkpoint on a held-out
    split (``training.evaluation.fit_calibration``): ``{"masks": [a, b, c], "boxes": [a,
    c]}`` gives ``sigmoid(a * logit(presence) + b * logit(SAM IoU) + c)`` for a region with
    a mask, ``sigmoid(a * logit(presence) + c)`` for a box alone; ``None`` (the released
    model: nothing to fit it on here) leaves the product presence x SAM IoU."""

    presence: Literal["exists", "at"] = "exists"
    presence_threshold: float = 0.5
    calibration: dict[str, list[float]] | None = None

    def validate(self) -> None:
        if self.presence not in ("exists", "at"):
            raise ValueError(f"score.presence must be 'exists' or 'at', got {self.presence!r}")
        if not 0.0 <= self.presence_threshold <= 1.0:
            raise ValueError(
                f"score.presence_threshold must be in [0, 1], got {self.presence_threshold}"
            )
        sizes = {"masks": 3, "boxes": 2}
        for key, weights in (self.calibration or {}).items():
            if key not in sizes or not (
                isinstance(weights, list)
                and len(weights) == sizes[key]
                and all(isinstance(w, int | float) for w in weights)
            ):
                raise ValueError(
                    f"score.calibration[{key!r}] must be one of 'masks' (3 numbers) or "
                    f"'boxes' (2 numbers), got {weights!r}"
                )


@dataclass
class LossConfig:
    """Loss weights (NExT-Chat public code: GIoU weight 0.2; the paper says 0.8)."""

    lm: float = 1.0
    l1: float = 2.0
    giou: float = 0.2
    cycle1: float = 1.0
    cycle2: float = 1.0
    focal: float = 20.0
    focal_alpha: float = 0.8
    focal_gamma: float = 2.0
    dice: float = 1.0
    iou: float = 1.0


@dataclass
class NextChatConfig:
    """The whole model. ``preset`` names where it came from (informational)."""

    preset: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    location: LocationConfig = field(default_factory=LocationConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for part in (
            self.vision,
            self.projector,
            self.llm,
            self.location,
            self.sam,
            self.tokens,
            self.template,
            self.score,
        ):
            part.validate()
        top = max(
            self.tokens.im_patch_id,
            self.tokens.im_start_id,
            self.tokens.im_end_id,
            self.tokens.at_id,
            self.tokens.boxes_id,
        )
        if top >= self.llm.vocab_size:
            raise ValueError(
                f"special token id {top} does not fit llm.vocab_size {self.llm.vocab_size}"
            )

    # ------------------------------------------------------------------ (de)serialize
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NextChatConfig:
        if not isinstance(data, dict):
            raise TypeError(f"config must be a JSON object, got {type(data).__name__}")
        kinds = {
            "vision": VisionConfig,
            "projector": ProjectorConfig,
            "llm": LLMConfig,
            "location": LocationConfig,
            "sam": SamConfig,
            "tokens": TokenConfig,
            "template": TemplateConfig,
            "score": ScoreConfig,
            "loss": LossConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown config keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in kinds:
                kwargs[key] = _sub_from_dict(kinds[key], key, value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NextChatConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _sub_from_dict(kind: type, name: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise TypeError(f"config.{name} must be an object, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(
            f"unknown keys in config.{name}: {sorted(unknown)}; expected some of {sorted(fields)}"
        )
    converted = {}
    for key, v in value.items():
        # JSON has no tuples; the dataclass defaults tell which fields are tuples.
        default = fields[key].default
        converted[key] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return kind(**converted)


# ---------------------------------------------------------------------------- presets


def _tiny() -> NextChatConfig:
    return NextChatConfig(
        preset="tiny",
        vision=VisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            frozen=False,
        ),
        llm=LLMConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=512,
        ),
        location=LocationConfig(hidden_size=32),
        sam=SamConfig(
            image_size=64,
            patch_size=16,
            encoder_embed_dim=32,
            encoder_depth=2,
            encoder_num_heads=2,
            encoder_global_attn_indexes=(1,),
            window_size=2,
            prompt_dim=32,
            decoder_depth=2,
            decoder_mlp_dim=64,
            decoder_num_heads=2,
            iou_head_hidden_dim=32,
            mask_in_chans=4,
            prompt_mlp_hidden=64,
        ),
        tokens=_small_tokens(512),
        template=TemplateConfig(system="", rec_question="<image> Where is {expr}?"),
        # Test models are trained for a few steps on boxes; their yes/no answers mean
        # nothing, so their regions keep the <at> probability and no presence gate.
        score=ScoreConfig(presence="at"),
    )


def _demo() -> NextChatConfig:
    # The shipped demo model (trained by `make demo-model` on the synthetic shapes domain,
    # see training/demo.py and docs/demo-recipe.md). It has no pretrained CLIP, so its
    # vision tower is a small BatchNorm ResNet (transformers, basic blocks) pre-trained ALONE
    # on the domain with dense object-level targets and then FROZEN, as CLIP is. Its stage-3
    # (stride 16) and stage-4 (stride 32) maps are fused into a 16x16 map at 256 px:
    # the domain's small objects are 5-22 px in this frame (docs/perception-trial.md
    # measured ConvNeXt never learning shape here, and stride 32 losing small objects).
    # Each 2x2 block of cells is one LLM token (64 tokens): measured here, an LLM step at
    # 256 image tokens took ~3x as long as at 64, which the CPU budget cannot pay.
    resnet = {
        "num_channels": 3,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [2, 2, 2, 2],
        "layer_type": "basic",
    }
    return NextChatConfig(
        preset="demo",
        vision=VisionConfig(
            backbone="hf",
            hf_model_type="resnet",
            image_size=256,
            patch_size=32,  # 8x8 merged tokens of the 16x16 stride-16 map
            hidden_size=1024,  # 2x2 cells x 256 channels per token
            num_layers=4,
            select_layer=-1,
            drop_cls=False,
            frozen=True,
            position_embedding=True,
            fuse_previous_stage=True,
            token_merge=2,
            # Chosen for the demo, not the released white: "white" is one of the domain's
            # object colors, and a white margin beside a white shape would extend it.
            pad_color=(123, 117, 104),
            extra=resnet,
        ),
        llm=LLMConfig(
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=688,
            vocab_size=1024,
            max_position_embeddings=512,
        ),
        location=LocationConfig(hidden_size=256, activation="gelu"),
        sam=SamConfig(
            image_size=256,
            patch_size=16,
            encoder_embed_dim=96,
            encoder_depth=4,
            encoder_num_heads=4,
            encoder_global_attn_indexes=(1, 3),
            window_size=4,
            prompt_dim=64,
            decoder_depth=2,
            decoder_mlp_dim=256,
            decoder_num_heads=4,
            iou_head_hidden_dim=64,
            mask_in_chans=8,
            prompt_mlp_hidden=256,
        ),
        tokens=_small_tokens(1024),
        template=TemplateConfig(
            system="",
            rec_question="Where is {expr}? <image>",
            caption_question="What is in the region {region}? <image>",
            chat_question="{question} <image>",
            exists_question="Is there {expr}?",
        ),
    )


def _small_tokens(vocab_size: int) -> TokenConfig:
    # Small presets use a byte-level BPE trained by nextchat_core.tokenizer whose first
    # ids are <unk> <s> </s> <pad> and whose last five are NExT-Chat's added tokens, in the
    # released order (im_patch, im_start, im_end, at, boxes).
    base = vocab_size - 5
    return TokenConfig(
        im_patch_id=base,
        im_start_id=base + 1,
        im_end_id=base + 2,
        at_id=base + 3,
        boxes_id=base + 4,
        bos_id=1,
        eos_id=2,
        pad_id=3,
    )


def _nextchat_7b_336() -> NextChatConfig:
    return NextChatConfig(preset="nextchat-7b-336")  # the defaults are the released shapes


PRESETS = {"tiny": _tiny, "demo": _demo, "nextchat-7b-336": _nextchat_7b_336}


def get_preset(name: str) -> NextChatConfig:
    """A fresh config for a named preset (``tiny``, ``demo``, ``nextchat-7b-336``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
