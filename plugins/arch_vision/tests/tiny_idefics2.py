"""A tiny Idefics2 directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

PATCH = 4
IMAGE = 16              # the position table: 4 x 4 cells, shared by images of any size
LATENTS = 3             # resampler_n_latents: image tokens per crop
FAKE, IMG, EOU = "<fake_token_around_image>", "<image>", "<end_of_utterance>"

# Idefics2's template shape (image parts -> <image>, text right after it) on ChatML markers
# the tiny tokenizer knows.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")

# idefics2-8b's preprocessor_config.json at the tiny size (images 12..28 pixels a side).
PREPROCESSOR = {"do_convert_rgb": True, "do_image_splitting": False, "do_normalize": True, "do_pad": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "Idefics2ImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
                "rescale_factor": 1 / 255, "size": {"longest_edge": 28, "shortest_edge": 12}}


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny ChatML tokenizer plus Idefics2's three special tokens; returns their ids."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (FAKE, IMG, EOU)])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in (FAKE, IMG, EOU)}


def make_reference(vocab: int, image_token: int, *, text_type="mistral", seed=1):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
              patch_size=PATCH, layer_norm_eps=1e-6)
    tc = dict(model_type=text_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if text_type == "mistral":
        tc["sliding_window"] = None
    pc = dict(hidden_size=64, resampler_n_latents=LATENTS, resampler_depth=2, resampler_n_heads=4,
              resampler_head_dim=8, num_key_value_heads=2, rms_norm_eps=1e-5)
    cfg = Idefics2Config(vision_config=vc, text_config=tc, perceiver_config=pc, image_token_id=image_token,
                         tie_word_embeddings=False)
    for c in (cfg, cfg.vision_config, cfg.text_config, cfg.perceiver_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Idefics2ForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_idefics2(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids[IMG], **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
