"""Tiny Gemma 3n models (transformers' modeling, every parameter perturbed) for tests.

* ``make_text_reference``: ``Gemma3nForCausalLM`` (AltUp with 3 inputs and a non-zero active
  index, Laurel, per-layer embeddings, 2 KV-shared layers, sliding + full layers with a
  window shorter than the prompts, activation sparsity on some layers, soft-capping).
* ``write_tiny_gemma3n``: ``Gemma3nForConditionalGeneration`` on the same text model, with
  the ids laid out as the released checkpoints lay them out (the image vocabulary starts at
  ``<end_of_image>``, the audio one at ``<end_of_audio>``, both past the per-layer table),
  the tiny MobileNetV5 of tiny_gemma3n_vision (timm's, through transformers'
  ``TimmWrapperModel``) and a tiny audio conformer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

BOI, BOA, EOI, IMG, EOA, AUD = ("<start_of_image>", "<start_of_audio>", "<end_of_image>", "<image_soft_token>",
                                "<end_of_audio>", "<audio_soft_token>")
SOFT_TOKENS = 4          # per image: the tiny tower's MSFA is 2 x 2
AUDIO_TOKENS = 8         # per clip: the tiny encoder gives 1 row per 16 mel frames (160 ms)
MEL_BINS = 16

IMAGE = 64               # the tiny tower's input size
# gemma-3n-E4B-it's preprocessor_config.json at the tiny sizes (image keys and the audio keys).
PREPROCESSOR = {"do_convert_rgb": None, "do_normalize": False, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessorFast",
                "image_seq_length": SOFT_TOKENS, "image_std": [0.5, 0.5, 0.5], "resample": 2,
                "rescale_factor": 1 / 255, "size": {"height": IMAGE, "width": IMAGE},
                "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": MEL_BINS,
                "sampling_rate": 16000, "dither": 0.0, "processor_class": "Gemma3nProcessor"}

# Gemma 3n's template shape (image parts -> <image_soft_token>, audio parts -> <audio_soft_token>)
# on the ChatML markers the tiny tokenizer knows.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image_soft_token>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<audio_soft_token>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def text_config_kwargs(vocab: int, per_layer_vocab: int) -> dict:
    return dict(
        vocab_size=vocab, vocab_size_per_layer_input=per_layer_vocab, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=[96, 128, 96, 112, 96, 128], num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"] * 3, num_kv_shared_layers=2,
        # a window shorter than the prompts, so local layers (and the shared local layer) mask
        sliding_window=6, laurel_rank=8, altup_num_inputs=3, altup_active_idx=1,
        activation_sparsity_pattern=[0.95, 0.8, 0.0, 0.0, 0.6, 0.0], final_logit_softcapping=30.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        max_position_embeddings=512, pad_token_id=None, eos_token_id=None, bos_token_id=None)


def make_text_reference(vocab: int = 300, per_layer_vocab: int = 280, seed: int = 1):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    tc = Gemma3nTextConfig(**text_config_kwargs(vocab, per_layer_vocab))
    tc._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Gemma3nForCausalLM(tc).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    names = (BOI, BOA, EOI, IMG, EOA, AUD)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in names}


def make_reference(ids: dict[str, int], *, seed: int = 1, vision_tower=None, vision_config=None):
    """``vision_tower``/``vision_config``: transformers' tower (already perturbed) and its
    config.json entry, or None for a reference without an image tower."""
    from unittest import mock

    import transformers
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nForConditionalGeneration, Gemma3nTextConfig
    from transformers.models.gemma3n import modeling_gemma3n
    vocab = ids[AUD] + 1
    tc = Gemma3nTextConfig(**text_config_kwargs(vocab, ids[EOI]))
    ac = Gemma3nAudioConfig(vocab_size=vocab - ids[EOA], vocab_offset=ids[EOA], hidden_size=24, input_feat_size=MEL_BINS,
                            conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[4, 4],
                            conf_attention_chunk_size=4, conf_attention_context_left=5)
    vc = _vision_config(ids, vision_config)
    cfg = Gemma3nConfig(text_config=tc, vision_config=vc, audio_config=ac, vision_soft_tokens_per_image=SOFT_TOKENS,
                        audio_soft_tokens_per_image=AUDIO_TOKENS,
                        boi_token_id=ids[BOI], eoi_token_id=ids[EOI], image_token_id=ids[IMG],
                        boa_token_id=ids[BOA], eoa_token_id=ids[EOA], audio_token_id=ids[AUD])
    for c in (cfg, cfg.text_config, cfg.audio_config, cfg.vision_config):
        c._attn_implementation = "eager"
    real = transformers.AutoModel.from_config
    tower = vision_tower if vision_tower is not None else _PooledPixels()

    def from_config(config, *a, **kw):
        if config.model_type == "gemma3n_vision":
            return tower
        return real(config, *a, **kw)
    torch.manual_seed(0)
    with mock.patch.object(modeling_gemma3n.AutoModel, "from_config", side_effect=from_config):
        ref = Gemma3nForConditionalGeneration(cfg).float().eval()
    for name, child in ref.model.named_children():
        if name != "vision_tower" or vision_tower is None:
            perturb_parameters(child, seed=seed, scale=0.3)
    return ref


class _PooledPixels(nn.Module):
    """A placeholder tower for references that never see pixels (text, audio)."""

    def forward(self, pixel_values, **_):
        raise AssertionError("this reference has no image tower")


def _vision_config(ids: dict[str, int], base: dict | None):
    from transformers import Gemma3nVisionConfig
    base = dict(base or {"hidden_size": 16})
    base.pop("model_type", None)
    return Gemma3nVisionConfig(**{**base, "vocab_size": ids[EOA] - ids[EOI], "vocab_offset": ids[EOI],
                                  "rms_norm_eps": 1e-6})


def write_tiny_gemma3n(out: Path, *, real_tower: bool = True, **kw):
    """``real_tower``: the tiny MobileNetV5 (its MSFA at 2 x 2: SOFT_TOKENS per image) and the
    released preprocessor settings at IMAGE pixels; else a reference without an image tower
    (no timm needed)."""
    ids = write_tokenizer(out)
    extra = {"chat_template.json": {"chat_template": TEMPLATE}}
    if real_tower:
        import copy

        from tiny_gemma3n_vision import reference_tower, tiny_model_args, tiny_vision_config
        vc = tiny_vision_config()
        vc["model_args"]["msfa_output_resolution"] = 2
        torch.manual_seed(0)        # the tower's initial weights come from the global generator
        tower = reference_tower(copy.deepcopy(vc), seed=3)
        kw.update(vision_tower=tower, vision_config=copy.deepcopy(vc))
        extra["preprocessor_config.json"] = PREPROCESSOR
    ref = make_reference(ids, **kw)
    if real_tower:
        from tiny_gemma3n_vision import restore_vision_model_args
        restore_vision_model_args(ref.config, dict(tiny_model_args(), msfa_output_resolution=2))
    save_reference(ref, out, extra_files=extra)
    return out, ref, ids


class ReferenceAudioExtractor:
    """transformers' Gemma3nAudioFeatureExtractor, its output as our clips' type (so both
    models can be fed the very same frames)."""

    def __init__(self):
        from transformers import Gemma3nAudioFeatureExtractor
        self.fe = Gemma3nAudioFeatureExtractor(feature_size=MEL_BINS)

    def __call__(self, samples):
        from mistralrs_arch_vision.processors.gemma3n_audio import Gemma3nAudioFeatures
        out = self.fe(samples, return_tensors="np")
        return Gemma3nAudioFeatures(out["input_features"][0].astype(np.float32), out["input_features_mask"][0])
