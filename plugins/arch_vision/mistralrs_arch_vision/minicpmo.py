"""MiniCPM-o 2.6 and MiniCPM-V 2.6 (images): a SigLIP tower at each slice's own size, a
resampler with 2-D sin/cos positions that turns every slice into ``query_num`` rows, and a
Qwen2 text decoder (the core's ``DecoderLM``).

The hub model has no transformers implementation; this follows its published code
(``modeling_minicpmo.py`` / ``modeling_minicpmv.py``, ``modeling_navit_siglip.py``,
``resampler.py``), which upstream mistral.rs and vLLM follow too:

* the vision model is SigLIP with Idefics2's weight names (``vpm.embeddings.*``,
  ``vpm.encoder.layers.N.*``, ``vpm.post_layernorm``), fed one slice at a time in the
  processor's [C, patch, n * patch] layout: the stride-``patch`` convolution reads the n
  patches in raster order, and the learned positions are looked up by fractional
  coordinates of the slice's (rows, cols) grid. The hub computes those coordinates with
  ``arange(0, 1 - 1e-6, 1 / n)``, which for some n (49 at 70 cells a side, for instance)
  lands a patch in another cell than transformers' Idefics2 arithmetic does: the hub's rule
  is kept (the model was trained with it). ``drop_vision_last_layer`` drops the last layer.
* slices of different sizes run as one padded batch (at most ``vision_batch_size`` slices a
  call) whose key mask hides the padding; the resampler masks it too.
* every slice (the source image and each grid cell) is its own ``FeatureSpan``: the run of
  ``<unk>`` tokens between ``<image>``/``</image>`` or ``<slice>``/``</slice>``; the markers and
  the newline between grid rows are ordinary text tokens. Spans are causal.

MiniCPM-o's audio (``apm.*``, Whisper encoder) and speech output (``tts.*``) weights are
skipped: upstream mistral.rs's MiniCpmO takes images only, and so does this family.

Checkpoints (openbmb's layout): ``llm.model.*``, ``llm.lm_head.*``, ``vpm.*``, ``resampler.*``.
"""
from __future__ import annotations

import dataclasses

import attrs
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import part_digest, token_runs
from mistralrs_arch_vision.processors.minicpmo import RAW_IMAGE_TAG, MiniCpmImageProcessor, MiniCpmSlice
from mistralrs_arch_vision.towers.siglip import SiglipEmbeddings, SiglipTowerConfig, SiglipVisionTower
from mistralrs_arch_vision.towers.siglip_navit import NaViTSiglipTower
from mistralrs_arch_vision.towers.sincos_resampler import SincosResampler

# transformers' Qwen2Config defaults: the hub config lists the text fields at its top level.
QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                      max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28)
# The hub's MiniCPMVConfig when config.json has no vision_config (SigLIP-400M at 980/14).
VISION_DEFAULTS = dict(hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16,
                       num_hidden_layers=27, patch_size=14)
_MODEL_TYPES = ("minicpmo", "minicpmv")
_SKIPPED = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")
_PREFIXES = (("llm.model.", "model."), ("llm.lm_head.", "lm_head."))


def text_config_of(hf: dict) -> dict:
    kind = hf.get("model_type")
    if kind not in _MODEL_TYPES:
        raise ValueError(f"config.json: model_type {kind!r} is not a MiniCPM-V/o model ({', '.join(_MODEL_TYPES)})")
    version = hf.get("version")
    # MiniCPM-V 2.0 / 2.5 share model_type "minicpmv" but have other text models and resamplers.
    if version is not None and abs(float(version) - 2.6) > 1e-6:
        raise ValueError(f"config.json: MiniCPM-V version {version} is not supported (2.6, Qwen2 text)")
    text = {**QWEN2_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    return text


def qwen2_sliding(text: dict) -> dict:
    """Qwen2's rule: a window only with ``use_sliding_window``, from ``max_window_layers`` on."""
    window = text.get("sliding_window") if text.get("use_sliding_window") else None
    start = text.get("max_window_layers", 28)
    types = ["sliding_attention" if window is not None and i >= start else "full_attention"
             for i in range(text["num_hidden_layers"])]
    return dict(sliding_window=window, layer_types=types)


def hub_position_ids(rows: int, cols: int, per_side: int) -> torch.Tensor:
    """[rows * cols] position-table cells of a rows x cols patch grid, by the hub's
    arithmetic: fractions from a float32 ``arange(0, 1 - 1e-6, 1 / n)`` bucketed against the
    boundaries k / per_side."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)

    def buckets(n: int) -> torch.Tensor:
        frac = torch.arange(0, 1 - 1e-6, float(torch.tensor(1.0) / n))
        if frac.numel() != n:
            raise ValueError(f"a slice of {n} patches a side has no fractional positions")
        return torch.bucketize(frac, boundaries, right=True)

    return (buckets(rows)[:, None] * per_side + buckets(cols)[None, :]).flatten()


class SlicePatchEmbeddings(SiglipEmbeddings):
    """SigLIP's patch convolution and position table over a ``MiniCpmSlice``."""

    def forward(self, piece: MiniCpmSlice) -> torch.Tensor:
        """[C, patch, n * patch] -> [n, D]: the convolution reads the n patches side by side."""
        rows, cols = piece.tgt_size
        p = self.cfg.patch_size
        px = piece.pixels
        if px.dim() != 3 or px.shape[1] != p or px.shape[2] != rows * cols * p:
            raise ValueError(f"a slice of {rows}x{cols} patches must be [C, {p}, {rows * cols * p}], "
                             f"got {tuple(px.shape)}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(px[None].to(device=weight.device, dtype=weight.dtype))[0].flatten(1).T
        ids = hub_position_ids(rows, cols, self.cfg.patches_per_side).to(patches.device)
        return patches + self.position_embedding(ids).to(patches.dtype)


class MiniCpmVisionTower(NaViTSiglipTower):
    """The hub's ``vpm``: SigLIP over slices of any patch grid, padded and masked."""

    def __init__(self, cfg: SiglipTowerConfig, dtype: torch.dtype = torch.float32):
        SiglipVisionTower.__init__(self, cfg, use_head=False, dtype=dtype)
        self.embeddings = SlicePatchEmbeddings(cfg)

    def map_weight_name(self, name):
        if name.startswith("head."):          # the hub builds the tower without SigLIP's head
            return None
        return super().map_weight_name(name)


class MiniCPMOForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "MiniCPMOForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = SiglipTowerConfig.from_hf(hf.get("vision_config") or VISION_DEFAULTS)
        if hf.get("drop_vision_last_layer"):
            vision = dataclasses.replace(vision, num_hidden_layers=vision.num_hidden_layers - 1)
        model.vpm = MiniCpmVisionTower(vision, dtype=dtype)
        hidden = int(text["hidden_size"])
        model.query_num = int(hf.get("query_num", 64))
        model.resampler = SincosResampler(model.query_num, hidden, hidden // 128, vision.hidden_size)
        model.vision_batch_size = max(int(hf.get("vision_batch_size") or 16), 1)
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        # The hub scales the token embeddings when its config has a ``scale_emb`` (MiniCPM
        # text models do; the released 2.6 configs do not).
        scale = text.get("scale_emb")
        return base_config(text, qkv_bias=True, embed_scale=None if scale is None else float(scale),
                           **qwen2_sliding(text))

    def map_weight_name(self, name):
        if name.startswith(_SKIPPED):
            return None
        name = self.rename_checkpoint(name)
        if name.startswith("vpm."):
            inner = self.vpm.map_weight_name(name[len("vpm."):])
            return None if inner is None else "vpm." + inner
        if name.startswith("resampler.pos_embed"):   # a buffer some exports keep; we compute it
            return None
        return super().map_weight_name(name)

    def slice_features(self, pieces: list[MiniCpmSlice]) -> list[torch.Tensor]:
        """Slices of any patch grids -> [query_num, hidden] each; ``vision_batch_size``
        slices per tower call (padded, masked), as the hub batches them."""
        out = []
        for i in range(0, len(pieces), self.vision_batch_size):
            chunk = pieces[i:i + self.vision_batch_size]
            patches, mask = self.vpm(chunk)
            feats = self.resampler(patches, [p.tgt_size for p in chunk], mask)
            out.extend(feats.to(self.dtype))
        return out

    def encode_features(self, spans):
        pieces = [s.data for s in spans]
        if not all(isinstance(p, MiniCpmSlice) for p in pieces):
            raise ValueError("MiniCPM-o takes image slices only (its audio input is not supported)")
        return self.slice_features(pieces)


# --------------------------------------------------------------------------- the processor
@attrs.define
class MiniCpmOProcessor:
    """The family's half of the pipeline. The hub's chat flattens each message to text
    (parts joined by newlines, an image as ``(<image>./</image>)``) before its template runs,
    and its processor then expands the i-th tag into the image's placeholder text;
    ``message_text`` and ``expand_prompt`` do the same."""
    image_processor: MiniCpmImageProcessor
    tokenizer: object
    unk_id: int
    marker_ids: tuple[int, int, int, int]        # <image>, </image>, <slice>, </slice>
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "MiniCpmOProcessor":
        if tokenizer is None:
            raise ValueError("MiniCPM-o's processor needs the tokenizer (its image markers are text)")
        ip = MiniCpmImageProcessor.from_hf(preprocessor_config)
        if ip.image_feature_size != model.query_num:
            raise ValueError(f"preprocessor_config.json: image_feature_size {ip.image_feature_size} differs from "
                             f"config.json's query_num {model.query_num}")
        if ip.patch_size != model.vpm.cfg.patch_size:
            raise ValueError(f"preprocessor_config.json: patch_size {ip.patch_size} differs from the vision "
                             f"model's {model.vpm.cfg.patch_size}")
        ids = []
        for token in (ip.unk, ip.im_start, ip.im_end, ip.slice_start, ip.slice_end):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"tokenizer: no {token!r} token (MiniCPM-o's image markers)")
            ids.append(tid)
        return cls(ip, tokenizer, ids[0], tuple(ids[1:]))

    def message_text(self, parts: list[dict], before: dict | None = None) -> str:
        """One message's parts as the hub's chat writes them (tags are not numbered, so
        ``before``, the pipeline's count of earlier images, is not needed)."""
        return "\n".join(RAW_IMAGE_TAG if p["type"] == "image" else p.get("text", "") for p in parts)

    def expand_text(self, text: str, images) -> str:
        chunks = text.split(RAW_IMAGE_TAG)
        if len(chunks) - 1 != len(images):
            raise ValueError(f"messages: the rendered prompt holds {len(chunks) - 1} image placeholder(s) for "
                             f"{len(images)} image(s); the chat template must emit one per image part")
        out = [chunks[0]]
        for k, (img, chunk) in enumerate(zip(images, chunks[1:])):
            out += [self.image_processor.placeholder(img.image.size, k), chunk]
        return "".join(out)

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        """Rendered chat text + loaded images -> token ids, one span per source image/slice.
        No ``prepare_audio``: the pipeline refuses audio parts before this runs."""
        if audios:
            raise ValueError("messages: MiniCPM-o here takes images only, not audio")
        units = [(img, k, piece) for img in images for k, piece in enumerate(self.image_processor(img.image))]
        ids = encode_prompt(self.tokenizer, self.expand_text(text, images))
        runs = token_runs(ids, self.unk_id)
        n = self.image_processor.image_feature_size
        opens = set(self.marker_ids[0::2])
        if (len(runs) != len(units) or any(length != n for _, length in runs)
                or any(start == 0 or ids[start - 1] not in opens for start, _ in runs)):
            raise ValueError(f"messages: the prompt's image tokens form runs {[length for _, length in runs]}, "
                             f"expected {len(units)} of {n} (is {self.image_processor.unk!r} in the text?)")
        spans = [FeatureSpan(start=start, length=length, data=piece, content_hash=_slice_hash(img.content_hash, k))
                 for (start, length), (img, k, piece) in zip(runs, units)]
        return Prompt(ids, spans)


def _slice_hash(content_hash: bytes, k: int) -> bytes:
    """The source image (piece 0) keeps the image's digest; slice k gets its own."""
    return content_hash if k == 0 else part_digest(content_hash, b"minicpmo-slice", k)
