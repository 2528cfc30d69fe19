"""Phi-4-multimodal: a Phi-3-style text decoder (fused qkv / gate_up, partial rotary, LongRoPE),
the SigLIP image encoder with the HD transform (``towers/phi4mm_vision.py``) and the conformer
audio encoder (``towers/phi4mm_audio.py``).

Prompts. As upstream mistral.rs and Microsoft's processor: the user writes ``<|image_N|>`` /
``<|audio_N|>`` tags in the text (the hub's chat template takes string content only), every
tag becomes the image (audio) placeholder token ``<|endoftext10|>`` (``<|endoftext11|>``), and
the i-th placeholder expands to the i-th image's (clip's) token count; a template that emits
the placeholder tokens itself works too. Image and audio parts add no text of their own
(``message_text`` hands the template each message's text as one string).

Audio is projected by one of two heads: ``speech`` when the request has no image, ``vision``
(transformers' ``up/down_proj_for_vision_speech``) when it has one, as transformers decides it
per forward; here it is per request, so each span carries its mode and its digest differs.

Checkpoints:
- transformers 5 (``Phi4MultimodalForCausalLM``, model_type ``phi4_multimodal``): plain
  weights, ``model.embed_tokens_extend.image_embed.*`` / ``audio_embed.*``;
- Microsoft's original (``Phi4MMForCausalLM``, ``phi4mm``): ``glb_GN``, ``sub_GN``,
  ``img_projection.0/2``, ``audio_projection.{speech,vision}.0/2``, and every text linear as
  ``base_layer`` + ``lora_A/lora_B.{vision,speech}``. What upstream does with the LoRA
  weights, this does: the *vision* LoRA is merged into the base weight at load
  (W + lora_alpha / r * B @ A, for the layers its ``vision_lora.layer`` regex matches) and
  used for every request, text, image or audio; the speech LoRA is not applied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import part_digest
from mistralrs_arch_vision.processors.phi4mm import Phi4MMImage, Phi4MMImageProcessor
from mistralrs_arch_vision.processors.phi4mm_audio import Phi4MMAudioClip, Phi4MMAudioFeatureExtractor
from mistralrs_arch_vision.towers.phi4mm_audio import Phi4MMAudioEncoder
from mistralrs_arch_vision.towers.phi4mm_vision import SO400M_448, Phi4MMImageEmbedding
from mistralrs_arch_vision.towers.siglip import SiglipTowerConfig

IMAGE_TOKEN, AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"
_IMAGE_ID, _AUDIO_ID = 200_010, 200_011          # Phi-4-multimodal's tokenizer
_IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
_AUDIO_TAG = re.compile(r"<\|audio_\d+\|>")


def is_microsoft_layout(hf: dict) -> bool:
    return hf.get("model_type") == "phi4mm" or "embd_layer" in hf


def text_config(hf: dict):
    """The decoder of either layout's config.json (the text keys sit at the top level in both)."""
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("lm_head_bias"):
        raise ValueError("config.json: Phi-4-multimodal has no attention/MLP/lm_head biases")
    return base_config(hf, qkv_fused=True, mlp_fused=True, sliding_window=hf.get("sliding_window"))


def vision_settings(hf: dict) -> tuple[SiglipTowerConfig, int, int]:
    """(tower config, feature layer, crop size) of either layout."""
    if is_microsoft_layout(hf):
        img = (hf.get("embd_layer") or {}).get("image_embd_layer") or {}
        proc = hf.get("img_processor") or {}
        feature = proc.get("layer_idx", -2) if isinstance(proc, dict) else -2
        if isinstance(proc, dict) and proc.get("type_feature", "patch") != "patch":
            raise ValueError(f"img_processor.type_feature: {proc['type_feature']!r} is not supported (patch)")
        for key, want in (("hd_transform_order", "sub_glb"), ("image_token_compression_cls", "avg_pool_2d"),
                          ("projection_cls", "mlp"), ("use_hd_transform", True), ("with_learnable_separator", True)):
            if img.get(key, want) != want:
                raise ValueError(f"embd_layer.image_embd_layer.{key}: {img[key]!r} is not supported ({want!r})")
        # Microsoft's config names no tower; a ``vision_config`` (our tiny test folders) wins.
        vision = SiglipTowerConfig.from_hf({**SO400M_448, **(hf.get("vision_config") or {})})
        crop = int(img.get("crop_size") or vision.image_size)
        return vision, int(-2 if feature is None else feature), crop
    vc = dict(hf.get("vision_config") or {})
    vision = SiglipTowerConfig.from_hf({**SO400M_448, **vc})
    return vision, int(vc.get("feature_layer", -2)), int(vc.get("crop_size") or vision.image_size)


def has_audio(hf: dict) -> bool:
    if is_microsoft_layout(hf):
        return bool(hf.get("audio_processor")) and bool((hf.get("embd_layer") or {}).get("audio_embd_layer"))
    return True          # transformers 5 always builds one (a missing audio_config means defaults)


def _token_id(hf: dict, sub: str, key: str, default: int) -> int:
    return int((hf.get(sub) or {}).get(key) or default)


@dataclass(frozen=True)
class LoraSpec:
    """One static LoRA of Microsoft's config (``vision_lora``/``speech_lora``)."""
    name: str
    layer: re.Pattern
    scale: float

    @classmethod
    def from_hf(cls, name: str, cfg: dict | None) -> "LoraSpec | None":
        if not cfg:
            return None
        try:
            r, alpha, layer = int(cfg["r"]), float(cfg["lora_alpha"]), str(cfg["layer"])
        except KeyError as e:
            raise ValueError(f"config.json: {name}_lora lacks {e.args[0]!r}") from None
        return cls(name, re.compile(layer), alpha / r if r > 0 else 1.0)


# --------------------------------------------------------------------------- the model
_PREFIXES = (
    ("model.embed_tokens_extend.image_embed.", "image_embed."),
    ("model.embed_tokens_extend.audio_embed.", "audio_embed."),
)
_MICROSOFT_NAMES = (  # Microsoft's names inside image_embed -> transformers 5's
    ("image_embed.glb_GN", "image_embed.global_img_feature_extensor"),
    ("image_embed.sub_GN", "image_embed.sub_img_feature_extensor"),
    ("image_embed.img_projection.0.", "image_embed.img_projection_up."),
    ("image_embed.img_projection.2.", "image_embed.img_projection_down."),
)   # the audio encoder's own map_weight_name renames Microsoft's audio names
_LORA = re.compile(r"^(?P<prefix>.+)\.(?:base_layer\.weight|lora_(?P<ab>[AB])\.(?P<name>\w+)\.weight)$")


class Phi4MMForCausalLM(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")
    vision_lora: LoraSpec | None = None

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Phi4MMForCausalLM":
        model = cls(text_config(hf), dtype)
        vision, feature_layer, crop = vision_settings(hf)
        model.image_embed = Phi4MMImageEmbedding(vision, model.cfg.hidden_size, feature_layer, crop)
        model.microsoft_layout = is_microsoft_layout(hf)
        if model.microsoft_layout:
            model.vision_lora = LoraSpec.from_hf("vision", hf.get("vision_lora"))
        # (not a class attribute: nn.Module would register the encoder but find the class's None)
        model.audio_embed = Phi4MMAudioEncoder.from_hf(hf) if has_audio(hf) else None
        model.image_token_id = _token_id(hf, "vision_config", "image_token_id", _IMAGE_ID)
        model.audio_token_id = _token_id(hf, "audio_config", "audio_token_id", _AUDIO_ID)
        return model

    @classmethod
    def config_from_hf(cls, hf: dict):
        return text_config(hf)

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        for src, dst in _MICROSOFT_NAMES:
            if name.startswith(src):
                name = dst + name[len(src):]
                break
        if name.startswith("image_embed."):
            inner = self.image_embed.map_weight_name(name[len("image_embed."):])
            return None if inner is None else "image_embed." + inner
        if name.startswith("audio_embed."):
            if self.audio_embed is None:
                return None             # no audio encoder built: its weights are not needed
            inner = self.audio_embed.map_weight_name(name[len("audio_embed."):])
            return None if inner is None else "audio_embed." + inner
        return super().map_weight_name(name)

    def route_weights(self, weights, loader):
        """Microsoft's LoRA-wrapped linears: ``base_layer`` + the vision LoRA (where its regex
        matches the layer) -> one merged ``weight``; the speech LoRA is dropped. Each layer's
        tensors are held only until its last one arrives."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        lora = self.vision_lora
        for raw, value in weights:
            m = _LORA.match(raw)
            if m is None:
                yield raw, value
                continue
            prefix = m["prefix"]
            wanted = lora is not None and lora.layer.search(prefix) is not None
            if m["ab"] is not None and (not wanted or m["name"] != lora.name):
                continue                       # the speech LoRA, or a LoRA the regex excludes
            part = "base" if m["ab"] is None else m["ab"]
            if not wanted:
                yield f"{prefix}.weight", value
                continue
            got = pending.setdefault(prefix, {})
            got[part] = value
            if len(got) == 3:
                del pending[prefix]
                yield f"{prefix}.weight", self._merge(prefix, got, lora)
        if pending:
            missing = sorted(f"{p} ({', '.join(sorted({'base', 'A', 'B'} - set(g)))})" for p, g in pending.items())
            raise ValueError(f"checkpoint: vision LoRA parts missing for {len(missing)} layer(s): "
                             f"{', '.join(missing[:4])}")

    @staticmethod
    def _merge(prefix: str, parts: dict, lora: LoraSpec) -> torch.Tensor:
        base, a, b = parts["base"], parts["A"], parts["B"]
        if not all(isinstance(t, torch.Tensor) for t in (base, a, b)):
            raise ValueError(f"{prefix}: a quantized LoRA-wrapped layer cannot be merged")
        if a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(f"{prefix}: vision LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                             f"the base weight {tuple(base.shape)}")
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * lora.scale
        return (base.to(torch.float32) + delta).to(base.dtype)

    # ------------------------------------------------------------------ features
    def encode_features(self, spans):
        out: list[torch.Tensor | None] = [None] * len(spans)
        images = [(i, s.data) for i, s in enumerate(spans) if isinstance(s.data, Phi4MMImage)]
        if images:
            for (i, _), feats in zip(images, self.image_embed([d for _, d in images])):
                out[i] = feats
        clips = [(i, s.data) for i, s in enumerate(spans) if isinstance(s.data, Phi4MMAudioClip)]
        if clips:
            if self.audio_embed is None:
                raise ValueError("audio: this Phi-4-multimodal model has no audio encoder")
            for (i, _), feats in zip(clips, self.audio_embed.encode_clips([c for _, c in clips])):
                out[i] = feats
        if any(f is None for f in out):
            raise ValueError("Phi-4-multimodal spans hold images or audio clips only")
        return [f.to(self.dtype) for f in out]


# --------------------------------------------------------------------------- the processor
class Phi4MMProcessor:
    """The family's half of the pipeline: tags -> placeholder tokens -> spans."""
    #: image and audio parts add no text: the user's ``<|image_N|>``/``<|audio_N|>`` tags place them
    image_part = {"type": "text", "text": ""}
    audio_part = {"type": "text", "text": ""}

    def __init__(self, image_processor: Phi4MMImageProcessor, tokenizer, image_token_id: int,
                 audio_token_id: int, audio_processor=None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.audio_token_id = audio_token_id
        self.audio_processor = audio_processor

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Phi4MMProcessor":
        if tokenizer is None:
            raise ValueError("Phi-4-multimodal's processor needs the tokenizer (its placeholders are text)")
        proc = Phi4MMImageProcessor.from_hf(preprocessor_config)
        tower = model.image_embed.img_processor.cfg
        if proc.crop != model.image_embed.crop_size or proc.patch_size != tower.patch_size:
            raise ValueError(f"preprocessor_config.json: crops of {proc.crop} pixels in {proc.patch_size}-pixel "
                             f"patches do not match the vision tower's {model.image_embed.crop_size} / "
                             f"{tower.patch_size}")
        ids = {}
        for what, text, configured in (("image", IMAGE_TOKEN, model.image_token_id),
                                       ("audio", AUDIO_TOKEN, model.audio_token_id)):
            found = tokenizer.token_to_id(text)
            if found is None:
                raise ValueError(f"tokenizer: no {text!r} token (Phi-4-multimodal's {what} placeholder)")
            if found != configured and configured not in (_IMAGE_ID, _AUDIO_ID):
                raise ValueError(f"config.json: {what} token id {configured} is not the tokenizer's {text!r} "
                                 f"({found})")
            ids[what] = found
        return cls(proc, tokenizer, ids["image"], ids["audio"], cls._audio_processor(model, preprocessor_config))

    @staticmethod
    def _audio_processor(model, preprocessor_config: dict):
        if model.audio_embed is None:
            return None
        return Phi4MMAudioFeatureExtractor.from_hf(preprocessor_config)

    @staticmethod
    def message_text(parts: list[dict], before: dict) -> str:
        """The hub's template concatenates ``message['content']`` as a string: the message's
        text parts joined (image and audio parts add nothing; the user's tags place them)."""
        return "".join(p.get("text", "") for p in parts if p.get("type") == "text")

    def prepare(self, image) -> Phi4MMImage:
        return self.image_processor(image)

    def prepare_audio(self, audio, *, with_images: bool = False, where: str = "audio") -> Phi4MMAudioClip:
        """A loaded clip -> log-mel features, token count and the projection head its
        request calls for (``vision`` when the request has an image)."""
        if self.audio_processor is None:
            raise ValueError(f"{where}: this Phi-4-multimodal model has no audio encoder")
        clip = self.audio_processor.prepare(audio.samples, audio.rate, where=where)
        clip.mode = "vision" if with_images else "speech"
        return clip

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        text = _IMAGE_TAG.sub(IMAGE_TOKEN, text)
        text = _AUDIO_TAG.sub(AUDIO_TOKEN, text)
        ids = encode_prompt(self.tokenizer, text)
        for token, items, what in ((self.image_token_id, images, "image"), (self.audio_token_id, audios, "audio")):
            found = ids.count(token)
            if found != len(items):
                raise ValueError(f"messages: the prompt holds {found} {what} tag(s) for {len(items)} {what} "
                                 f"part(s); write one <|{what}_N|> tag per {what} in the text (N from 1)")
        with_images = bool(images)
        out, spans, k, a = [], [], 0, 0
        for t in ids:
            if t == self.image_token_id:
                item = images[k]
                prepared = self.prepare(item.image)
                n, digest, k = prepared.num_tokens, item.content_hash, k + 1
            elif t == self.audio_token_id:
                item = audios[a]
                prepared = self.prepare_audio(item, with_images=with_images, where=f"audio {a + 1}")
                n, a = prepared.num_tokens, a + 1
                # The projection head depends on whether the request has images.
                digest = part_digest(item.content_hash, b"phi4mm-audio", int(with_images))
            else:
                out.append(t)
                continue
            spans.append(FeatureSpan(start=len(out), length=n, data=prepared, content_hash=digest))
            out.extend([t] * n)
        return Prompt(out, spans)
