"""Qwen3-VL: the Qwen3-VL ViT (``towers/qwen3_vit.py``), Qwen2-VL's dynamic-resolution
image processing (``processors/qwen2_vl.py``) and a Qwen3 text decoder (q/k RMSNorm) with
interleaved M-RoPE.

Images are prepared and placed as in Qwen2-VL (``qwen2_vl.py``'s ``Qwen2VLProcessor``, which
is this family's processor): the template's ``<|image_pad|>`` between
``<|vision_start|>``/``<|vision_end|>`` becomes one token per merged 2 x 2 patch block, one
``FeatureSpan``, as transformers' ``Qwen3VLProcessor`` does for images; the 3-axis rope
positions follow the same rule (``mrope_prompt_positions``).

Deepstack: the tower also projects the states of a few of its blocks
(``deepstack_visual_indexes``); feature k is added to the image tokens' hidden states after
decoder layer k. A span's features are one tensor [tokens, (1 + K) * hidden] (the
main rows, then the K deepstack rows side by side), so they are computed once per request and
sliced per prefill chunk by the model runner exactly as the main features are.
``merge_features`` splices the main part and hands the rest, with the rows it belongs to, to
the ``forward_embeds`` call on the embeddings it returned (checked by identity; ``embed``, where
every step starts, drops a hand-over a failed step left behind).

Checkpoints: the hub's (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``), the
transformers-4 / Qwen2-VL style (``model.*``, ``visual.*``) and ``language_model.model.*``.
"""
from __future__ import annotations

import torch

from mistralrs_core.layers.rope import MultiAxisRotaryEmbedding
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.processors.qwen2_vl import QwenVisionInput
from mistralrs_arch_vision.qwen2_vl import mrope_prompt_positions
from mistralrs_arch_vision.towers.qwen3_vit import Qwen3VisionConfig, Qwen3VisionTower

# transformers' Qwen3VLTextConfig defaults: a text_config lists only what differs from them.
QWEN3_VL_TEXT_DEFAULTS = dict(vocab_size=151_936, hidden_size=4096, intermediate_size=22_016, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                              max_position_embeddings=128_000, rms_norm_eps=1e-6, rope_theta=500_000.0,
                              attention_bias=False)
_MROPE_SECTION = [24, 20, 20]
# Qwen3VLConfig's token ids (the released checkpoints').
_IMAGE, _VIDEO, _VISION_START, _VISION_END = 151_655, 151_656, 151_652, 151_653

_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("visual.", "visual."),
)


def text_config_of(hf: dict, model_type: str = "qwen3_vl_text", defaults: dict = QWEN3_VL_TEXT_DEFAULTS) -> dict:
    text = dict(hf.get("text_config") or {})
    if text.get("model_type") not in (model_type, None):
        raise ValueError(f"text_config.model_type: {hf.get('model_type', 'qwen3_vl')} with a "
                         f"{text['model_type']!r} text model is not supported ({model_type} only)")
    return {**defaults, **text}


def mrope_section_of(text: dict) -> list[int]:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return [int(s) for s in params.get("mrope_section") or _MROPE_SECTION]


class Qwen3VLForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def text_config_of(cls, hf: dict) -> dict:
        return text_config_of(hf)

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Qwen3VLForConditionalGeneration":
        text = cls.text_config_of(hf)
        # transformers ties by the top-level flag; a config that names it only in text_config
        # means it there.
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        model = cls(cls.config_from_hf({**text, "tie_word_embeddings": bool(tie)}), dtype)
        # transformers' Qwen3-VL rotary interleaves the axes whatever ``mrope_interleaved`` says.
        model.rope = MultiAxisRotaryEmbedding(model.cfg.rope, mrope_section_of(text), interleaved=True)
        vision = Qwen3VisionConfig.from_hf(hf.get("vision_config") or {})
        if vision.out_hidden_size != model.cfg.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size {vision.out_hidden_size} does not match the text "
                             f"model's hidden_size {model.cfg.hidden_size}")
        model.visual = Qwen3VisionTower(vision)
        model.num_deepstack = min(model.visual.num_deepstack, model.cfg.num_layers)
        model.image_token_id = int(hf.get("image_token_id", _IMAGE))
        model.video_token_id = int(hf.get("video_token_id", _VIDEO))
        model.vision_start_token_id = int(hf.get("vision_start_token_id", _VISION_START))
        model.vision_end_token_id = int(hf.get("vision_end_token_id", _VISION_END))
        model._deepstack = None
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        bias = bool(text.get("attention_bias", False))
        return base_config(text, qkv_bias=bias, o_bias=bias, qk_norm=True)

    def map_weight_name(self, name):
        return super().map_weight_name(self.rename_checkpoint(name))

    # --- images -------------------------------------------------------------
    def image_features(self, inputs: list[QwenVisionInput]) -> list[torch.Tensor]:
        """Per image [tokens, (1 + K) * hidden]: the merged features, then the K deepstack
        features, side by side. All images in one tower call."""
        for x in inputs:
            self.visual.check_grid(tuple(x.grid_thw), x.patches.shape[0])
        patches = torch.cat([x.patches for x in inputs]).to(device=self.lm_device, dtype=self.dtype)
        merged, deep = self.visual(patches, [tuple(x.grid_thw) for x in inputs])
        deep = deep[:self.num_deepstack]
        wide = torch.cat([merged, *deep], dim=-1)
        return list(wide.split([self.visual.tokens_of(tuple(x.grid_thw)) for x in inputs]))

    def encode_features(self, spans):
        for s in spans:
            if not isinstance(s.data, QwenVisionInput):
                raise ValueError(f"a Qwen3-VL span holds {type(s.data).__name__}, not image patches")
        return self.image_features([s.data for s in spans])

    def merge_features(self, embeds, rows, features):
        hidden = self.cfg.hidden_size
        out = embeds.index_copy(0, rows, features[:, :hidden].to(embeds.dtype))
        if self.num_deepstack:
            deep = features[:, hidden:].reshape(len(rows), self.num_deepstack, hidden)
            self._deepstack = (out, rows, deep)
        return out

    def embed(self, input_ids):
        # A step starts here: a hand-over left by a step that failed before its layers ran
        # must not reach this one.
        self._deepstack = None
        return super().embed(input_ids)

    def forward_embeds(self, h, positions, meta, caches):
        pending, self._deepstack = self._deepstack, None
        if pending is None:
            return super().forward_embeds(h, positions, meta, caches)
        if pending[0] is not h:
            raise RuntimeError("Qwen3-VL: the embeddings reaching the layers are not the ones merge_features "
                               "returned; their deepstack features would be lost")
        _, rows, deep = pending
        cs = self.rope.cos_sin(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cs, meta, caches[i] if caches is not None else None)
            if i < self.num_deepstack:
                # .to: under a device map each layer returns h on its own device
                h = h.index_add(0, rows.to(h.device), deep[:, i].to(device=h.device, dtype=h.dtype))
        return self.model.norm(h)

    # --- positions ----------------------------------------------------------
    def prompt_positions(self, prompt_ids, spans):
        return mrope_prompt_positions(prompt_ids, spans, self.visual.cfg.spatial_merge_size)
