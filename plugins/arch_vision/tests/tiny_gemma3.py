"""A tiny Gemma 3 vision directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

IMAGE = 28              # the tower's image_size: 4 x 4 patches of 7
PATCH = 7
MM_TOKENS = 4           # pooled to 2 x 2 soft tokens per image
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# Gemma 3's template shape (image parts -> <start_of_image>, text trimmed) on ChatML markers
# the tiny tokenizer knows.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# gemma-3-4b-it's preprocessor_config.json at the tiny size (pan-and-scan crops of >= 20 px).
PREPROCESSOR = {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
                "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
                "image_seq_length": MM_TOKENS, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_crop_size": 20, "pan_and_scan_min_ratio_to_activate": 1.2,
                "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
                "size": {"height": IMAGE, "width": IMAGE}}


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny ChatML tokenizer plus Gemma 3's three image tokens; returns their ids."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOI, EOI, SOFT)])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in (BOI, EOI, SOFT)}


def make_reference(vocab: int, ids: dict[str, int], *, seed=1, **text):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6)
    tc = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                          # a window shorter than the prompts, so local layers do mask
                          sliding_window=12, layer_types=["sliding_attention", "full_attention",
                                                          "sliding_attention"],
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                          # Both soft-caps None, as in every released Gemma 3: transformers 5's
                          # Gemma 3 ignores them (attention never gets the cap; only its text-only
                          # Gemma3ForCausalLM caps the final logits), while we (and vLLM) apply them.
                          max_position_embeddings=512, final_logit_softcapping=None,
                          attn_logit_softcapping=None, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    tc = Gemma3TextConfig(**{**tc.to_dict(), **text}) if text else tc
    cfg = Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=MM_TOKENS,
                       boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[SOFT])
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Gemma3ForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_gemma3(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
