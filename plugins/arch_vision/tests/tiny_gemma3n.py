"""Tiny Gemma 3n models (transformers' modeling, every parameter perturbed) for tests.

* ``make_text_reference``: ``Gemma3nForCausalLM`` (AltUp with 3 inputs and a non-zero active
  index, Laurel, per-layer embeddings, 2 KV-shared layers, sliding + full layers with a
  window shorter than the prompts, activation sparsity on some layers, soft-capping).
* ``write_tiny_gemma3n``: ``Gemma3nForConditionalGeneration`` on the same text model, with
  the ids laid out as the released checkpoints lay them out (the image vocabulary starts at
  ``<end_of_image>``, the audio one at ``<end_of_audio>``, both past the per-layer table).
  ``vision_tower`` is a stand-in unless a MobileNetV5 reference is given (``StubTower``,
  the same module on both sides): pooled pixels through a fixed channel map, shaped as
  transformers' timm wrapper returns them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

BOI, BOA, EOI, IMG, EOA, AUD = ("<start_of_image>", "<start_of_audio>", "<end_of_image>", "<image_soft_token>",
                                "<end_of_audio>", "<audio_soft_token>")
SOFT_TOKENS = 4          # per image: the stand-in tower pools to 2 x 2
AUDIO_TOKENS = 8         # per clip: the tiny encoder gives 1 row per 16 mel frames (160 ms)
MEL_BINS = 16
VISION_HIDDEN = 16
IMAGE = 32

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


class StubTower(nn.Module):
    """Pixels -> 2 x 2 average pool -> a fixed channel map -> tanh. ``reference=True`` answers
    like transformers' timm wrapper ([B, C, 2, 2] in ``last_hidden_state``); otherwise like our
    towers ([B, 4, C])."""

    def __init__(self, reference: bool):
        super().__init__()
        self.reference = reference
        self.proj = nn.Parameter(torch.randn(VISION_HIDDEN, 3, generator=torch.Generator().manual_seed(5)))

    def forward(self, pixel_values, **_):
        x = nn.functional.adaptive_avg_pool2d(pixel_values, (2, 2))                 # [B, 3, 2, 2]
        x = torch.tanh(torch.einsum("bchw,dc->bdhw", x, self.proj.to(x.dtype)) * 2)
        if self.reference:
            from transformers.modeling_outputs import BaseModelOutput
            return BaseModelOutput(last_hidden_state=x)
        return x.flatten(2).transpose(1, 2)


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    names = (BOI, BOA, EOI, IMG, EOA, AUD)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in names}


def make_reference(ids: dict[str, int], *, seed: int = 1, vision_tower=None):
    """``vision_tower``: None for the stand-in, else the module transformers should use."""
    from unittest import mock

    import transformers
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nForConditionalGeneration, Gemma3nTextConfig
    from transformers.models.gemma3n import modeling_gemma3n
    vocab = ids[AUD] + 1
    tc = Gemma3nTextConfig(**text_config_kwargs(vocab, ids[EOI]))
    ac = Gemma3nAudioConfig(vocab_size=vocab - ids[EOA], vocab_offset=ids[EOA], hidden_size=24, input_feat_size=MEL_BINS,
                            conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[4, 4],
                            conf_attention_chunk_size=4, conf_attention_context_left=5)
    vc = _vision_config(ids)
    cfg = Gemma3nConfig(text_config=tc, vision_config=vc, audio_config=ac, vision_soft_tokens_per_image=SOFT_TOKENS,
                        audio_soft_tokens_per_image=AUDIO_TOKENS,
                        boi_token_id=ids[BOI], eoi_token_id=ids[EOI], image_token_id=ids[IMG],
                        boa_token_id=ids[BOA], eoa_token_id=ids[EOA], audio_token_id=ids[AUD])
    for c in (cfg, cfg.text_config, cfg.audio_config, cfg.vision_config):
        c._attn_implementation = "eager"
    real = transformers.AutoModel.from_config
    tower = vision_tower if vision_tower is not None else StubTower(reference=True)

    def from_config(config, *a, **kw):
        if config.model_type == "gemma3n_vision":
            return tower
        return real(config, *a, **kw)
    torch.manual_seed(0)
    with mock.patch.object(modeling_gemma3n.AutoModel, "from_config", side_effect=from_config):
        ref = Gemma3nForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def _vision_config(ids: dict[str, int]):
    from transformers import Gemma3nVisionConfig
    return Gemma3nVisionConfig(hidden_size=VISION_HIDDEN, vocab_size=ids[EOA] - ids[EOI], vocab_offset=ids[EOI],
                               rms_norm_eps=1e-6)


def write_tiny_gemma3n(out: Path, **kw):
    ids = write_tokenizer(out)
    ref = make_reference(ids, **kw)
    save_reference(ref, out, extra_files={"chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids


class ReferenceAudioTower(nn.Module):
    """transformers' own audio encoder behind our tower's call shape: a stand-in for tests of
    everything around the encoder (its weights load from the checkpoint like a tower's)."""

    def __init__(self, audio_config):
        super().__init__()
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder
        self.inner = Gemma3nAudioEncoder(audio_config).float().eval()

    def map_weight_name(self, name):
        return "inner." + name

    def forward(self, mel, valid):
        out = self.inner(mel, ~valid)
        return out.last_hidden_state, ~out.audio_mel_mask


class ReferenceAudioExtractor:
    """transformers' Gemma3nAudioFeatureExtractor behind our extractor's call shape
    (``(samples, rate) -> .mel, .valid``; resampled with our seam's soxr)."""
    sampling_rate = 16_000

    def __init__(self):
        from transformers import Gemma3nAudioFeatureExtractor
        self.fe = Gemma3nAudioFeatureExtractor(feature_size=MEL_BINS)

    def __call__(self, samples, rate=16_000):
        from types import SimpleNamespace

        from mistralrs_arch_vision.audio import resample
        out = self.fe(resample(samples, rate, self.sampling_rate), return_tensors="pt")
        return SimpleNamespace(mel=out["input_features"][0], valid=out["input_features_mask"][0])
