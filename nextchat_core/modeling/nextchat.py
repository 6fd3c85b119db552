"""NExT-Chat: an LMM that answers in text and, through ``<at>``, in boxes and SAM masks."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn
from transformers import Cache, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from .. import frames, losses
from ..config import LossConfig, NextChatConfig
from .outputs import GenerationOutput, MaskOutput, NextChatOutput
from .sam_attention import use_sdpa_attention
from .vision_tower import VisionTower, channels_last_on_cpu

# transformers renamed LlamaModel.forward's `past_key_values` to `cache` (5.2x); pass
# whichever this installed version names, so generation works across 5.x.
_CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def _mlp(dims: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Linear layers with ``act`` between them: indices 0, 2, ... are the Linears, as in the
    released state dict (``loc_encoder.0``, ``loc_encoder.2``)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


class NextChatModel(nn.Module):
    """The whole model, built from a config with random weights.

    Parts (names match the released state dict up to the prefixes mapped in
    :mod:`nextchat_core.build`): ``vision_tower``, ``mm_projector``, ``language_model``
    (a LlamaForCausalLM), ``loc_encoder`` (4 -> hidden -> llm) and ``loc_decoder``
    (llm -> hidden -> 4, no sigmoid/clamp) with ``config.loc.activation`` between their
    Linears (ReLU in NExT-Chat, GELU in the demo model), ``seg_prompt_mlp`` (llm -> hidden
    -> tokens*prompt_dim, ReLU) and ``sam`` (segment-anything ``Sam``).
    """

    def __init__(self, config: NextChatConfig) -> None:
        super().__init__()
        self.config = config
        v, llm, loc, sam = config.vision, config.llm, config.location, config.sam
        self.vision_tower = VisionTower(v)
        self.mm_projector = _mlp(
            [v.hidden_size] + [llm.hidden_size] * config.projector.depth, nn.GELU
        )
        lm_config = LlamaConfig(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings,
            rms_norm_eps=llm.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
            initializer_range=llm.initializer_range,
            tie_word_embeddings=llm.tie_word_embeddings,
            bos_token_id=config.tokens.bos_id,
            eos_token_id=config.tokens.eos_id,
            pad_token_id=config.tokens.pad_id,
        )
        lm_config._attn_implementation = llm.attn_implementation
        self.language_model = LlamaForCausalLM(lm_config)
        act = nn.GELU if loc.activation == "gelu" else nn.ReLU
        self.loc_encoder = _mlp([4, loc.hidden_size, llm.hidden_size], act)
        self.loc_decoder = _mlp([llm.hidden_size, loc.hidden_size, 4], act)
        self.seg_prompt_mlp = _mlp(
            [llm.hidden_size, sam.prompt_mlp_hidden, sam.num_prompt_tokens * sam.prompt_dim],
            nn.ReLU,
        )
        grid = sam.embedding_size
        self.sam = Sam(
            # As segment_anything.build_sam._build_sam, at this config's sizes.
            image_encoder=ImageEncoderViT(
                img_size=sam.image_size,
                patch_size=sam.patch_size,
                embed_dim=sam.encoder_embed_dim,
                depth=sam.encoder_depth,
                num_heads=sam.encoder_num_heads,
                mlp_ratio=4,
                out_chans=sam.prompt_dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                global_attn_indexes=sam.encoder_global_attn_indexes,
                window_size=sam.window_size,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=sam.prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(sam.image_size, sam.image_size),
                mask_in_chans=sam.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=sam.decoder_depth,
                    embedding_dim=sam.prompt_dim,
                    mlp_dim=sam.decoder_mlp_dim,
                    num_heads=sam.decoder_num_heads,
                ),
                transformer_dim=sam.prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=sam.iou_head_hidden_dim,
            ),
            pixel_mean=list(sam.pixel_mean),
            pixel_std=list(sam.pixel_std),
        )
        # Same parameters and outputs as segment-anything's attention, on the fused SDPA
        # kernel (see sam_attention.py): SAM-H's encoder is the slowest phase otherwise.
        use_sdpa_attention(self.sam.image_encoder)
        if v.frozen:
            self.vision_tower.requires_grad_(False)

    def train(self, mode: bool = True) -> NextChatModel:
        """``nn.Module.train``, except that a frozen tower (no trainable parameter: CLIP, a
        frozen SAM, the demo's BatchNorm ResNet) stays in eval mode: it normalizes with its
        stored statistics, not each batch's, and does not update them."""
        super().train(mode)
        if mode:
            for module in (self.vision_tower, self.sam):
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    # ------------------------------------------------------------------ encoders
    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``Bx3xVxV`` vision-tower inputs -> ``BxNxH`` projected image tokens."""
        if _trainable(self.vision_tower):
            feats = self.vision_tower(pixel_values)
        else:
            with torch.no_grad():  # NExT-Chat never trains CLIP: save its activations
                feats = self.vision_tower(pixel_values)
        return self.project(feats)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """``BxNxC`` vision-tower output -> ``BxNxH`` image tokens (``mm_projector``)."""
        return self.mm_projector(vision_features.to(next(self.mm_projector.parameters()).dtype))

    def encode_sam_images(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """``Bx3xSxS`` SAM-frame inputs -> ``BxCxgxg`` SAM image embeddings."""
        encoder = self.sam.image_encoder
        sam_pixel_values = channels_last_on_cpu(encoder, sam_pixel_values)
        if _trainable(encoder):
            return encoder(sam_pixel_values)
        with torch.no_grad():
            return encoder(sam_pixel_values)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None,
        boxes: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings with image tokens at ``<im_patch>`` positions and
        ``loc_encoder(box)`` at ``<boxes>`` positions.

        ``input_ids``: ``BxT``. ``image_features``: ``BxNxH`` (row b's patches in order).
        ``boxes``: ``Mx4`` square-frame xyxy, one per ``<boxes>`` in row-major order.
        Returns ``BxTxH``.
        """
        tk = self.config.tokens
        embeds = self.language_model.get_input_embeddings()(input_ids)
        patch = input_ids == tk.im_patch_id
        n_patch = int(patch.sum())
        if n_patch:
            if (
                image_features is None
                or image_features.shape[0] * image_features.shape[1] != n_patch
            ):
                got = None if image_features is None else tuple(image_features.shape)
                raise ValueError(
                    f"input_ids hold {n_patch} image tokens but image_features has shape {got}; "
                    f"each <image> expands to {self.num_image_tokens} tokens"
                )
            embeds = embeds.masked_scatter(patch.unsqueeze(-1), image_features.to(embeds.dtype))
        slots = input_ids == tk.boxes_id
        n_slots = int(slots.sum())
        n_boxes = 0 if boxes is None else boxes.shape[0]
        if n_slots != n_boxes:
            raise ValueError(
                f"input_ids hold {n_slots} <boxes> placeholders but {n_boxes} boxes were given; "
                "pass one square-frame xyxy box per '<at> <boxes>' pair"
            )
        if n_slots:
            assert boxes is not None
            box_embeds = self.loc_encoder(boxes.to(embeds.dtype))
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), box_embeds.to(embeds.dtype))
        return embeds

    def _llm(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        """Run the LLaMA trunk; returns the last layer's post-norm hidden states ``BxTxH``."""
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        return out.last_hidden_state

    # --------------------------------------------------------------------- masks
    def predict_masks(
        self,
        image_embedding: torch.Tensor,
        at_hidden: torch.Tensor,
        boxes: torch.Tensor,
        *,
        width: int,
        height: int,
    ) -> MaskOutput:
        """SAM masks for k boxes of ONE image.

        ``image_embedding``: ``1xCxgxg``; ``at_hidden``: ``kxH`` trigger hidden states;
        ``boxes``: ``kx4`` square-frame xyxy; ``width``/``height``: the original image size
        (for the square -> SAM frame conversion). Prompt = SAM's 2 box tokens followed by
        ``seg_prompt_mlp``'s tokens; ``multimask_output=False`` as in NExT-Chat.
        """
        cfg = self.config.sam
        k = at_hidden.shape[0]
        sam_boxes = frames.square_to_sam(boxes.float(), width, height, cfg.image_size)
        sparse, dense = self.sam.prompt_encoder(
            points=None, boxes=sam_boxes.to(image_embedding.dtype), masks=None
        )
        prompt_tokens = self.seg_prompt_mlp(at_hidden).reshape(
            k, cfg.num_prompt_tokens, cfg.prompt_dim
        )
        sparse = torch.cat([sparse, prompt_tokens.to(sparse.dtype)], dim=1)
        logits, iou = self._decode_masks(image_embedding, sparse, dense, multimask_output=False)
        return MaskOutput(logits=logits[:, 0], iou_predictions=iou[:, 0])

    def predict_prompt_masks(
        self,
        image_embedding: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> MaskOutput:
        """SAM masks from the annotator's clicks and/or box on ONE image, without the LLM:
        the released SAM prompt path (segment-anything's ``Sam.forward`` for one image).

        ``image_embedding``: ``1xCxgxg``; ``point_coords``: ``1xNx2`` SAM-frame (x, y);
        ``point_labels``: ``1xN``, 1 for a positive click, 0 for a negative one;
        ``box``: ``1x4`` SAM-frame xyxy. ``multimask_output``: SAM's three candidate masks
        (k = 3) instead of one (k = 1). Returns ``MaskOutput`` with ``kxSxS`` logits.
        """
        if point_coords is None and box is None:
            raise ValueError("predict_prompt_masks needs point_coords (with point_labels) or a box")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together: pass both or neither")
        dtype = image_embedding.dtype
        points = None
        if point_coords is not None and point_labels is not None:
            points = (point_coords.to(dtype), point_labels.to(torch.int))
        sparse, dense = self.sam.prompt_encoder(
            points=points, boxes=None if box is None else box.to(dtype), masks=None
        )
        logits, iou = self._decode_masks(
            image_embedding, sparse, dense, multimask_output=multimask_output
        )
        return MaskOutput(logits=logits[0], iou_predictions=iou[0])

    def _decode_masks(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        *,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder on the prompt embeddings, its low-res masks upsampled to the
        SAM input frame (float32 logits ``k x m x S x S``, IoU predictions ``k x m``)."""
        size = self.config.sam.image_size
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        logits = F.interpolate(
            low_res.float(), size=(size, size), mode="bilinear", align_corners=False
        )
        return logits, iou.float()

    # ------------------------------------------------------------------- training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        mask_targets: torch.Tensor | None = None,
        mask_box_index: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        loss_weights: LossConfig | None = None,
        return_logits: bool = False,
        return_hidden: bool = False,
        vision_features: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
    ) -> NextChatOutput:
        """Teacher-forced forward with every NExT-Chat loss.

        ``input_ids``/``attention_mask``/``labels``: ``BxT`` (labels aligned with inputs,
        ``-100`` for no loss). ``pixel_values``: ``Bx3xVxV``. ``boxes``: ``Mx4`` square-frame
        xyxy targets, one per ``<at> <boxes>`` pair in row-major order (they are also the
        inputs at ``<boxes>``). Masks (optional): ``sam_pixel_values`` ``Bx3xSxS``,
        ``mask_targets`` ``KxSxS`` in the SAM frame for boxes ``mask_box_index`` (``K``,
        indices into ``boxes``), ``image_sizes`` ``Bx2`` original (width, height).
        ``loss_weights`` overrides ``config.loss`` (stage 3 sets the text/box weights to 0).
        ``return_hidden`` keeps the LLM's last hidden states and the vision tower's features
        in the output (for auxiliary objectives of small-model pre-training).
        ``vision_features``: ``BxNxC`` output of the FROZEN vision tower computed beforehand,
        instead of ``pixel_values`` (the tower is not run; refused while it trains);
        ``sam_image_embeddings``: ``BxCxHxW`` output of SAM's FROZEN image encoder computed
        beforehand, instead of ``sam_pixel_values`` (likewise).
        """
        w = loss_weights or self.config.loss
        tk = self.config.tokens
        image_features = None
        if vision_features is not None:
            if pixel_values is not None or _trainable(self.vision_tower):
                raise ValueError(
                    "vision_features replace pixel_values for a frozen vision tower only; "
                    "pass one of them, and pixel_values while the tower trains"
                )
            image_features = self.project(vision_features)
        elif pixel_values is not None:
            if return_hidden:
                vision_features = self.vision_tower(pixel_values)
                image_features = self.project(vision_features)
            else:
                image_features = self.encode_images(pixel_values)
        embeds = self.embed_inputs(input_ids, image_features, boxes)
        hidden = self._llm(embeds, attention_mask)
        zero = hidden.sum() * 0.0
        out = NextChatOutput(loss=zero)
        if return_hidden:
            out.hidden_states, out.vision_features = hidden, vision_features
        total = zero

        lm_head = self.language_model.get_output_embeddings()
        if return_logits:
            out.logits = lm_head(hidden)
        if labels is not None and w.lm:
            lm = losses.lm_loss(hidden, labels, lm_head)
            if lm is not None:
                out.lm_loss = lm
                total = total + w.lm * out.lm_loss

        at_mask = input_ids == tk.at_id
        if boxes is not None and boxes.shape[0]:
            h_at = hidden[at_mask]  # MxH, row-major like the <boxes> slots
            pred = self.loc_decoder(h_at)
            out.pred_boxes, out.at_hidden = pred, h_at
            if w.l1 or w.giou:
                out.l1_loss, out.giou_loss = losses.box_losses(pred, boxes)
                total = total + w.l1 * out.l1_loss + w.giou * out.giou_loss
            if w.cycle1:
                out.cycle1_loss = losses.cycle1_loss(self.loc_encoder(pred), h_at)
                total = total + w.cycle1 * out.cycle1_loss
            if w.cycle2:
                b = boxes.to(pred.dtype)
                out.cycle2_loss = losses.cycle2_loss(self.loc_decoder(self.loc_encoder(b)), b)
                total = total + w.cycle2 * out.cycle2_loss

            if mask_targets is not None and mask_targets.shape[0]:
                if (sam_pixel_values is None) == (sam_image_embeddings is None):
                    raise ValueError(
                        "mask_targets need one of sam_pixel_values and sam_image_embeddings"
                    )
                if image_sizes is None or mask_box_index is None:
                    raise ValueError("mask_targets need image_sizes and mask_box_index")
                image_of_box = at_mask.nonzero()[:, 0]  # M: which row each box belongs to
                if sam_image_embeddings is not None:
                    if _trainable(self.sam.image_encoder):
                        raise ValueError(
                            "sam_image_embeddings replace sam_pixel_values for a frozen SAM "
                            "image encoder only; pass sam_pixel_values while it trains"
                        )
                    sam_embeds = sam_image_embeddings.to(
                        next(self.sam.mask_decoder.parameters()).dtype
                    )
                else:
                    assert sam_pixel_values is not None  # one of the two, checked above
                    sam_embeds = self.encode_sam_images(sam_pixel_values)
                all_logits, all_iou, order = [], [], []
                for b in image_of_box[mask_box_index].unique().tolist():
                    idx = mask_box_index[image_of_box[mask_box_index] == b]
                    width, height = (int(s) for s in image_sizes[b].tolist())
                    m = self.predict_masks(
                        sam_embeds[b : b + 1],
                        h_at[idx],
                        pred[idx].detach(),
                        width=width,
                        height=height,
                    )
                    all_logits.append(m.logits)
                    all_iou.append(m.iou_predictions)
                    order.append((mask_box_index.unsqueeze(1) == idx.unsqueeze(0)).nonzero()[:, 0])
                perm = torch.cat(order).argsort()
                mask_logits = torch.cat(all_logits)[perm]
                iou_pred = torch.cat(all_iou)[perm]
                out.mask_logits, out.iou_predictions = mask_logits, iou_pred
                out.focal_loss, out.dice_loss, out.iou_loss = losses.mask_losses(
                    mask_logits, mask_targets, iou_pred, alpha=w.focal_alpha, gamma=w.focal_gamma
                )
                total = (
                    total + w.focal * out.focal_loss + w.dice * out.dice_loss + w.iou * out.iou_loss
                )
        out.loss = total
        return out

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None,
        *,
        input_boxes: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        logits_processor: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        static_cache: bool = False,
        compile_decoder: bool = False,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> GenerationOutput:
        """Decode with the KV cache; ``<at>`` becomes a box.

        ``input_ids``/``attention_mask``: ``BxT`` LEFT-padded prompts. ``image_features``:
        ``BxNxH`` from :meth:`encode_images`. ``input_boxes``: ``Mx4`` square-frame boxes for
        the prompts' ``<boxes>`` slots (region inputs). When a row produces ``<at>``, the
        next step's hidden state at that ``<at>`` goes through ``loc_decoder``; the token
        written after it is ``<boxes>`` and its input embedding is
        ``loc_encoder(loc_decoder(h_at))`` - the NExT-Chat decoding rule.
        ``logits_processor(step, logits) -> logits`` (``BxV``) may constrain each step's
        choice (e.g. forced answers for benchmarks, vocabulary restrictions).
        ``static_cache`` decodes with a preallocated ``StaticCache`` and a fixed-size
        attention mask, so every decode step has the same shapes; ``compile_decoder``
        (implies it) runs the step through ``torch.compile(mode="reduce-overhead")``, i.e.
        CUDA graphs on a GPU: decoding a 7B model is otherwise bound by kernel launches.

        After ``<at>`` (NExT-Chat's loop): the model's own next token is kept if it is
        ``</s>`` (the answer ends; the box of that ``<at>`` is kept); any other token is
        written as ``<boxes>``, never read as a new trigger. ``num_beams > 1`` runs beam
        search (:meth:`_beam_search`) with the same box feedback in every beam; greedy
        (``num_beams=1``) is what the published tables were measured with.
        """
        if num_beams > 1:
            if do_sample or static_cache or compile_decoder or logits_processor is not None:
                raise ValueError(
                    "num_beams > 1 runs plain beam search: it cannot be combined with "
                    "do_sample, static_cache, compile_decoder or a logits_processor"
                )
            return self._beam_search(
                input_ids,
                attention_mask,
                image_features,
                input_boxes=input_boxes,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
            )
        tk = self.config.tokens
        bsz = input_ids.shape[0]
        device = input_ids.device
        lm_head = self.language_model.get_output_embeddings()
        embeds = self.embed_inputs(input_ids, image_features, input_boxes)
        mask = attention_mask.clone()
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        static_cache = static_cache or compile_decoder
        cache: Cache
        if static_cache:
            length = input_ids.shape[1]
            # Rounded up so that prompts of similar length share one compiled graph.
            total = -(-(length + max_new_tokens + 2) // 64) * 64
            cache = StaticCache(config=self.language_model.config, max_cache_len=total)
            # 4-D boolean masks over the whole cache: fixed shapes for every decode step.
            prefill = torch.zeros(bsz, 1, length, total, dtype=torch.bool, device=device)
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            prefill[:, 0, :, :length] = causal & mask.bool()[:, None, :]
            step_mask = torch.zeros(bsz, 1, 1, total, dtype=torch.bool, device=device)
            step_mask[:, 0, 0, :length] = mask.bool()
            h_last = self._llm(
                embeds, prefill, position_ids=position, use_cache=True, **{_CACHE_KWARG: cache}
            )[:, -1]
            step_fn = self._compiled_step() if compile_decoder else self._decode_step
        else:
            cache = DynamicCache(config=self.language_model.config)
            h_last = self._llm(
                embeds, mask, position_ids=position, use_cache=True, **{_CACHE_KWARG: cache}
            )[:, -1]
        position = position[:, -1:]

        sequences: list[list[int]] = [[] for _ in range(bsz)]
        boxes: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        hiddens: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        scores: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        ended = torch.zeros(bsz, dtype=torch.bool, device=device)  # the model chose </s>
        prev_at = torch.zeros(bsz, dtype=torch.bool, device=device)
        at_prob = torch.zeros(bsz, device=device)
        step = 0
        # One extra step is allowed so an <at> emitted at the limit still gets its box.
        while step < max_new_tokens or bool(prev_at.any()):
            step += 1
            logits = lm_head(h_last).float()
            if logits_processor is not None:
                logits = logits_processor(step - 1, logits)
            probs = logits.softmax(-1)
            token = self._choose(
                logits,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )
            box = self.loc_decoder(h_last)
            chose_eos = (token == tk.eos_id) & ~finished & (step <= max_new_tokens)
            ended |= chose_eos
            # </s> right after <at> ends the answer; the slot is still written as <boxes>.
            stop_after_box = prev_at & chose_eos
            token = torch.where(prev_at, torch.full_like(token, tk.boxes_id), token)
            if step > max_new_tokens:  # past the limit: only pending boxes, then stop
                token = torch.where(prev_at, token, torch.full_like(token, tk.eos_id))
            token = torch.where(finished, torch.full_like(token, tk.pad_id), token)
            for row in (prev_at & ~finished).nonzero()[:, 0].tolist():
                boxes[row].append(box[row].float())
                hiddens[row].append(h_last[row])
                scores[row].append(at_prob[row])
            new_at = (token == tk.at_id) & ~finished
            at_prob = torch.where(new_at, probs[:, tk.at_id], at_prob)
            for row, t in enumerate(token.tolist()):
                if not finished[row]:
                    sequences[row].append(t)
            finished = finished | (token == tk.eos_id) | stop_after_box
            prev_at = new_at
            if bool(finished.all()):
                break
            next_embed = self._next_input(token, box)
            position = position + 1
            if static_cache:
                step_mask[:, 0, 0, length + step - 1] = True
                h_last = step_fn(next_embed.unsqueeze(1), step_mask, position, cache)
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                h_last = self._decode_step(next_embed.unsqueeze(1), mask, position, cache)

        hdim = self.config.llm.hidden_size
        return GenerationOutput(
            sequences=sequences,
            boxes=[torch.stack(b) if b else torch.zeros(0, 4, device=device) for b in boxes],
            at_hidden=[
                torch.stack(h) if h else torch.zeros(0, hdim, device=device) for h in hiddens
            ],
            box_scores=[torch.stack(s) if s else torch.zeros(0, device=device) for s in scores],
            truncated=(~ended).tolist(),
        )

    def _beam_search(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None,
        *,
        input_boxes: torch.Tensor | None,
        max_new_tokens: int,
        num_beams: int,
        length_penalty: float,
    ) -> GenerationOutput:
        """Beam search with NExT-Chat's box feedback in each beam.

        Each row keeps ``num_beams`` hypotheses scored by their summed log-probabilities; a
        hypothesis that chooses ``</s>`` is finished, ranked by ``score / length **
        length_penalty`` (HF's rule). After ``<at>`` a beam's slot is ``<boxes>`` (log-prob
        0) and its input embedding is ``loc_encoder(loc_decoder(h_at))`` of that beam's own
        state. A row stops once it holds ``num_beams`` finished hypotheses and none of its
        live beams can beat the worst of them; at ``max_new_tokens`` its live beams are
        ranked too (and flagged ``truncated``). Written here because transformers'
        ``generate`` cannot replace the next input embedding from the last hidden state.
        """
        tk = self.config.tokens
        bsz, k = input_ids.shape[0], num_beams
        device = input_ids.device
        lm_head = self.language_model.get_output_embeddings()
        embeds = self.embed_inputs(input_ids, image_features, input_boxes)
        embeds = embeds.repeat_interleave(k, dim=0)
        mask = attention_mask.repeat_interleave(k, dim=0)
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.language_model.config)
        h_last = self._llm(
            embeds, mask, position_ids=position, use_cache=True, **{_CACHE_KWARG: cache}
        )[:, -1]
        position = position[:, -1:]
        n = bsz * k
        inf = float("-inf")
        beam_scores = torch.zeros(bsz, k, device=device)
        beam_scores[:, 1:] = inf  # identical beams at first: expand beam 0 only
        beam_scores = beam_scores.view(-1)
        seqs: list[list[int]] = [[] for _ in range(n)]
        boxes: list[list[torch.Tensor]] = [[] for _ in range(n)]
        hiddens: list[list[torch.Tensor]] = [[] for _ in range(n)]
        scores: list[list[torch.Tensor]] = [[] for _ in range(n)]
        prev_at = torch.zeros(n, dtype=torch.bool, device=device)
        at_prob = torch.zeros(n, device=device)
        # per row: finished hypotheses (rank, sequence, beam index at the time, truncated)
        done: list[list[tuple[float, list[int], int, bool]]] = [[] for _ in range(bsz)]
        kept: dict[int, tuple[list, list, list]] = {}  # id -> (boxes, hiddens, scores)
        row_done = [False] * bsz
        vocab = lm_head.out_features

        def rank(score: float, length: int) -> float:
            return score / max(length, 1) ** length_penalty

        def finish(r: int, score: float, seq: list[int], src: int, cut: bool) -> None:
            key = len(kept)
            kept[key] = (boxes[src], hiddens[src], scores[src])
            done[r].append((rank(score, len(seq)), seq, key, cut))
            done[r].sort(key=lambda d: -d[0])
            del done[r][k:]

        step = 0
        while True:
            step += 1
            logprobs = lm_head(h_last).float().log_softmax(-1)
            probs_at = logprobs[:, tk.at_id].exp()
            box = self.loc_decoder(h_last)
            forced = torch.full_like(logprobs, inf)
            forced[:, tk.boxes_id] = 0.0
            logprobs = torch.where(prev_at.unsqueeze(-1), forced, logprobs)
            for i in prev_at.nonzero()[:, 0].tolist():
                boxes[i] = [*boxes[i], box[i].float()]
                hiddens[i] = [*hiddens[i], h_last[i]]
                scores[i] = [*scores[i], at_prob[i]]
            if step > max_new_tokens and not bool(prev_at.any()):
                break
            if step > max_new_tokens:  # past the limit: pending boxes only, others stay
                stay = torch.full_like(logprobs, inf)
                stay[:, tk.pad_id] = 0.0
                logprobs = torch.where(prev_at.unsqueeze(-1), logprobs, stay)
            cand = (beam_scores.unsqueeze(-1) + logprobs).view(bsz, k * vocab)
            top, idx = cand.topk(2 * k, dim=-1)
            parents, new_tokens, new_scores = [], [], []
            for r in range(bsz):
                picked: list[tuple[float, int, int]] = []
                for score, j in zip(top[r].tolist(), idx[r].tolist(), strict=True):
                    src, tok = r * k + j // vocab, j % vocab
                    if score == inf or row_done[r]:
                        continue
                    if tok == tk.eos_id:
                        finish(r, score, [*seqs[src], tok], src, False)
                    elif len(picked) < k:
                        picked.append((score, src, tok))
                best = max((p[0] for p in picked), default=inf)
                if len(done[r]) == k and (best == inf or rank(best, step) <= done[r][-1][0]):
                    row_done[r] = True
                while len(picked) < k:  # fewer live candidates than beams: dead fillers
                    picked.append((inf, r * k, tk.pad_id))
                for score, src, tok in picked:
                    parents.append(src)
                    new_tokens.append(tok)
                    new_scores.append(inf if row_done[r] else score)
            parent = torch.tensor(parents, device=device)
            token = torch.tensor(new_tokens, device=device)
            beam_scores = torch.tensor(new_scores, device=device)
            seqs = [[*seqs[p], t] for p, t in zip(parents, new_tokens, strict=True)]
            boxes = [boxes[p] for p in parents]
            hiddens = [hiddens[p] for p in parents]
            scores = [scores[p] for p in parents]
            alive = torch.isfinite(beam_scores)
            at_prob = torch.where(token == tk.at_id, probs_at[parent], at_prob[parent])
            h_box = box[parent]
            prev_at = (token == tk.at_id) & alive
            if all(row_done) or not bool(alive.any()):
                break
            cache.reorder_cache(parent)  # type: ignore[arg-type]  # a LongTensor
            next_embed = self._next_input(token, h_box)
            position = position[parent] + 1
            mask = torch.cat([mask[parent], torch.ones_like(mask[:, :1])], dim=1)
            h_last = self._decode_step(next_embed.unsqueeze(1), mask, position, cache)

        hdim = self.config.llm.hidden_size
        out = GenerationOutput(sequences=[])
        for r in range(bsz):
            if not row_done[r]:  # cut off by max_new_tokens: its live beams are ranked too
                for i in range(r * k, r * k + k):
                    if torch.isfinite(beam_scores[i]):
                        live = [t for t in seqs[i] if t != tk.pad_id]
                        finish(r, float(beam_scores[i]), live, i, True)
            _, seq, key, cut = done[r][0]
            bx, hs, sc = kept[key]
            out.sequences.append(seq)
            out.boxes.append(torch.stack(bx) if bx else torch.zeros(0, 4, device=device))
            out.at_hidden.append(torch.stack(hs) if hs else torch.zeros(0, hdim, device=device))
            out.box_scores.append(torch.stack(sc) if sc else torch.zeros(0, device=device))
            out.truncated.append(cut)
        return out

    def _next_input(self, token: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """``BxH`` input embeddings of the next step: the token's own, or, where the token
        is ``<boxes>``, ``loc_encoder(box)`` (``box``: ``Bx4``, ``loc_decoder`` of the
        ``<at>`` state) - NExT-Chat's feedback of the decoded location."""
        next_embed = self.language_model.get_input_embeddings()(token)
        box_rows = token == self.config.tokens.boxes_id
        if box_rows.any():
            located = self.loc_encoder(box).to(next_embed.dtype)
            next_embed = torch.where(box_rows.unsqueeze(-1), located, next_embed)
        return next_embed

    def _decode_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """One cached decode step with fixed shapes: ``Bx1xH`` in, ``BxH`` out."""
        out = self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{_CACHE_KWARG: cache},
        )
        return out.last_hidden_state[:, -1]

    def _compiled_step(self) -> Callable[..., torch.Tensor]:
        fn = getattr(self, "_compiled_decode_step", None)
        if fn is None:
            fn = torch.compile(self._decode_step, mode="reduce-overhead", dynamic=False)
            self._compiled_decode_step = fn
        return fn

    @staticmethod
    def _choose(
        logits: torch.Tensor,
        *,
        do_sample: bool,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = (logits / max(temperature, 1e-5)).softmax(-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _trainable(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
