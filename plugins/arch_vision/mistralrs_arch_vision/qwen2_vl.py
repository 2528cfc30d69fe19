"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution ViT (``towers/qwen_vit.py``) whose merged
patch features replace ``<|image_pad|>`` placeholders, and a Qwen2 text decoder (the core's
``DecoderLM``: q/k/v biases) rotated by M-RoPE.

Prompt layout (``Qwen2VLProcessor``): the chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` per image; the single ``<|image_pad|>`` is
expanded to t*h*w / merge^2 copies, one per merged token. That run is the image's
``FeatureSpan``.

M-RoPE positions (``prompt_positions``): text tokens count up on all three axes (t, h, w);
an image's tokens get (start, start + row, start + col) where ``start`` is the position the
next text token would have had, and the text after it resumes at start + max(rows, cols).
Generated tokens continue from the prompt's last position + 1 on every axis, i.e. token
index + ``delta`` (transformers' ``rope_deltas``). The reference computes this from
``mm_token_type_ids`` (1 on image tokens, as its processor emits them); here the spans are
those runs, so no such array is carried.

Video (``video_url`` parts): the template writes ``<|vision_start|><|video_pad|><|vision_end|>``;
the frames (``processors/qwen2_vl.Qwen2VLVideoProcessor``) make a grid of t temporal patches
and the one ``<|video_pad|>`` becomes t*h*w / merge^2 tokens, encoded by the same tower. The
temporal axis of their positions counts temporal patches (Qwen2-VL) or seconds: patch k sits at
``int(k * tokens_per_second * second_per_grid_t)`` (Qwen2.5-VL, float32 as transformers'
``get_rope_index``); text after a video resumes at start + max(rows, cols) as after an image.

Checkpoint layouts: the hub's (``model.*`` text, ``visual.*``, ``lm_head``) and transformers
5's (``model.language_model.*``, ``model.visual.*``, ``lm_head``). Config: the hub's is flat
(text fields at the top, ``rope_scaling: {type: mrope, mrope_section}``), transformers 5
nests ``text_config``.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import torch

from mistralrs_core.layers.rope import MultiAxisRotaryEmbedding
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.positions import PromptPositions
from mistralrs_core.models.text_config import base_config

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.qwen2_vl import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                                                       QwenVisionInput)
from mistralrs_arch_vision.towers.qwen_vit import QwenViTConfig, QwenVisionTower

# transformers' Qwen2VLTextConfig defaults (Qwen2.5-VL's are the same where a config omits them)
QWEN2_VL_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                              max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                              use_sliding_window=False, sliding_window=4096, max_window_layers=80)
DEFAULT_MROPE_SECTION = (16, 24, 24)
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
#: transformers' Qwen2_5_VLVisionConfig default: temporal positions per second of video
DEFAULT_TOKENS_PER_SECOND = 4


def text_config_of(hf: dict) -> dict:
    """The text model's fields: transformers 5's ``text_config``, or the hub's flat config."""
    if hf.get("text_config"):
        text = dict(hf["text_config"])
    else:
        text = {k: v for k, v in hf.items() if k not in ("vision_config", "text_config")}
    text = {**QWEN2_VL_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    # The top-level flag is what transformers ties by; the flat hub config has only that one.
    if hf.get("tie_word_embeddings") is not None:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return text


def mrope_section_of(text: dict, rotary_half: int) -> list[int]:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    sections = [int(s) for s in params.get("mrope_section") or DEFAULT_MROPE_SECTION]
    if len(sections) != 3 or sum(sections) != rotary_half:
        raise ValueError(f"rope_scaling.mrope_section: {sections} must be 3 sections (t, h, w) summing to "
                         f"head_dim / 2 = {rotary_half}")
    return sections


_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def mrope_prompt_positions(prompt_ids, spans, merge_size: int, temporal=None) -> PromptPositions | None:
    """The M-RoPE positions of a prompt whose image (and video) runs are ``spans``
    (transformers' ``get_rope_index``; Qwen3-VL's is the same rule for images).
    ``temporal(data)``: the offsets of a span's temporal patches (default 0, 1, ...; Qwen2.5-VL
    spaces a video's by its seconds). Whatever a span's time axis reaches, the text after it
    resumes at start + max(rows, cols), as the reference advances."""
    if not spans:
        return None                       # text only: equal axes, i.e. plain positions
    n, m = len(prompt_ids), merge_size
    pos = np.empty((3, n), dtype=np.int64)
    i = nxt = 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < i:
            raise ValueError("image spans overlap")
        pos[:, i:span.start] = np.arange(nxt, nxt + span.start - i)
        nxt += span.start - i
        t, h, w = span.data.grid_thw
        lt, lh, lw = t, h // m, w // m
        if lt * lh * lw != span.length:
            raise ValueError(f"an image span of {span.length} tokens holds a {h} x {w} patch grid "
                             f"({lt * lh * lw} tokens)")
        times = np.arange(lt) if temporal is None else temporal(span.data)
        tt, hh, ww = np.meshgrid(times, np.arange(lh), np.arange(lw), indexing="ij")
        pos[0, span.start:span.end] = nxt + tt.reshape(-1)
        pos[1, span.start:span.end] = nxt + hh.reshape(-1)
        pos[2, span.start:span.end] = nxt + ww.reshape(-1)
        # What the reference advances by (for a still image: its largest position + 1).
        nxt += max(lh, lw)
        i = span.end
    pos[:, i:] = np.arange(nxt, nxt + n - i)
    return PromptPositions(pos, delta=int(pos.max()) + 1 - n)


class Qwen2VLForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")
    #: Qwen2.5-VL's tower (RMSNorm, gated MLP, window attention)
    qwen25 = False
    #: the processor enables video parts only for models that place them as these do (Qwen3-VL
    #: shares the processor but spells video with timestamps and positions it differently)
    watches_video = True

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Qwen2VLForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        model.rope = MultiAxisRotaryEmbedding(model.cfg.rope, mrope_section_of(text, model.cfg.rope.rotary_dim // 2))
        model.visual = QwenVisionTower(QwenViTConfig.from_hf(hf.get("vision_config") or {}, qwen25=cls.qwen25,
                                                             text_hidden=model.cfg.hidden_size))
        if model.visual.cfg.out_hidden_size != model.cfg.hidden_size:
            raise ValueError(f"vision_config: the merger outputs {model.visual.cfg.out_hidden_size} channels for a "
                             f"text model of hidden_size {model.cfg.hidden_size}")
        model.image_token_id = int(hf.get("image_token_id", 151655))
        model.video_token_id = int(hf.get("video_token_id", 151656))
        # Qwen2-VL's temporal positions count temporal patches: one position per patch.
        model.tokens_per_second = (float((hf.get("vision_config") or {}).get("tokens_per_second")
                                         or DEFAULT_TOKENS_PER_SECOND) if cls.qwen25 else None)
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        # ``sliding_window`` counts only with ``use_sliding_window``, from ``max_window_layers`` on.
        window = text.get("sliding_window") if text.get("use_sliding_window") else None
        layer_types = None
        if window is not None:
            start = int(text.get("max_window_layers", text["num_hidden_layers"]))
            layer_types = ["sliding_attention" if i >= start else "full_attention"
                           for i in range(text["num_hidden_layers"])]
        return base_config(text, qkv_bias=True, sliding_window=window, layer_types=layer_types)

    def map_weight_name(self, name):
        return super().map_weight_name(self.rename_checkpoint(name))

    @property
    def merge_size(self) -> int:
        return self.visual.cfg.spatial_merge_size

    def image_features(self, inputs: list[QwenVisionInput]) -> list[torch.Tensor]:
        """Each image's merged features [t*h*w / merge^2, text hidden]; all images in one
        tower call."""
        patches = torch.cat([i.patches for i in inputs]).to(device=self.lm_device, dtype=self.dtype)
        grids = [tuple(int(v) for v in i.grid_thw) for i in inputs]
        feats = self.visual(patches, grids)
        return list(feats.split([t * h * w // self.merge_size ** 2 for t, h, w in grids]))

    def encode_features(self, spans):
        inputs = []
        for s in spans:
            if not isinstance(s.data, QwenVisionInput):
                raise ValueError(f"a Qwen2-VL span holds {type(s.data).__name__}, not image or video patches")
            t, h, w = s.data.grid_thw
            if t * h * w // self.merge_size ** 2 != s.length:
                raise ValueError(f"an image span of {s.length} tokens holds a {h} x {w} patch grid "
                                 f"({t * h * w // self.merge_size ** 2} tokens)")
            inputs.append(s.data)
        return self.image_features(inputs)

    def prompt_positions(self, prompt_ids, spans):
        return mrope_prompt_positions(prompt_ids, spans, self.merge_size, self.temporal_positions)

    def temporal_positions(self, data: QwenVisionInput) -> np.ndarray:
        """Offsets of a span's temporal patches on the temporal axis."""
        t = data.grid_thw[0]
        if not data.is_video or self.tokens_per_second is None:
            return np.arange(t)
        # float32 products truncated, as the reference computes them
        interval = np.float32(self.tokens_per_second) * np.float32(data.second_per_grid_t)
        return (np.arange(t, dtype=np.float32) * interval).astype(np.int64)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    qwen25 = True


@attrs.define
class Qwen2VLProcessor:
    """The family's half of the pipeline (transformers' ``Qwen2VLProcessor``): the template
    writes one ``<|image_pad|>`` per image (``<|video_pad|>`` per video) between vision
    start/end tokens; it becomes one token per merged patch."""
    image_processor: Qwen2VLImageProcessor
    image_token_id: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})
    video_processor: Qwen2VLVideoProcessor | None = None
    video_token_id: int | None = None
    video_part: dict = attrs.field(factory=lambda: {"type": "video"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Qwen2VLProcessor":
        vc = model.visual.cfg
        tower = {"patch_size": vc.patch_size, "merge_size": vc.spatial_merge_size,
                 "temporal_patch_size": vc.temporal_patch_size}
        for key, want in tower.items():
            got = preprocessor_config.get(key)
            if got is not None and int(got) != want:
                raise ValueError(f"preprocessor_config.json: {key} {got} does not match the vision tower's {want}")
        proc = Qwen2VLImageProcessor.from_config(preprocessor_config, **tower)
        token = tokenizer.token_to_id(IMAGE_PAD) if tokenizer is not None else None
        if token is None:
            raise ValueError(f"tokenizer: no {IMAGE_PAD!r} token (Qwen2-VL's image placeholder)")
        if token != model.image_token_id:
            raise ValueError(f"config.json: image_token_id {model.image_token_id} is not the tokenizer's "
                             f"{IMAGE_PAD!r} ({token})")
        video_token = tokenizer.token_to_id(VIDEO_PAD)
        if video_token is None or not getattr(model, "watches_video", False):
            return cls(proc, token)               # video parts are refused
        if video_token != model.video_token_id:
            raise ValueError(f"config.json: video_token_id {model.video_token_id} is not the tokenizer's "
                             f"{VIDEO_PAD!r} ({video_token})")
        video_cfg = preprocessor_config
        path = Path(model_dir) / "video_preprocessor_config.json" if model_dir is not None else None
        if path is not None and path.is_file():
            video_cfg = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(video_cfg, dict):
                raise ValueError("video_preprocessor_config.json: expected a JSON object")
        return cls(proc, token, video_processor=Qwen2VLVideoProcessor.from_config(video_cfg, proc),
                   video_token_id=video_token)

    def prepare(self, image) -> ImagePrompt:
        data = self.image_processor(image)
        return ImagePrompt(self.image_processor.num_tokens(data.grid_thw), data)

    @property
    def video_fps(self) -> float:
        """The rate a frame list is taken at when its part names none."""
        return self.video_processor.fps or 2.0

    def sample_video_frames(self, total: int, fps: float) -> list[int]:
        return self.video_processor.sample_frames(total, fps)

    def prepare_video(self, video) -> ImagePrompt:
        data = self.video_processor(video.frames, video.fps)
        return ImagePrompt(self.image_processor.num_tokens(data.grid_thw), data)
