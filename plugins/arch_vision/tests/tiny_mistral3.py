"""A tiny Mistral 3 directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

PATCH = 4
MERGE = 2
UNIT = PATCH * MERGE        # pixels per side of one prompt token
LONGEST = 48                # at most 6 x 6 tokens per image
SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")

# Mistral's templates emit one [IMG] per image part; the processor expands it.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '[IMG]' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Mistral-Small-3.1's preprocessor_config.json, with a small longest edge.
PREPROCESSOR = {"image_processor_type": "PixtralImageProcessor", "do_convert_rgb": True, "do_normalize": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": {"height": PATCH, "width": PATCH},
                "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": LONGEST}}
PROCESSOR = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
             "patch_size": PATCH, "processor_class": "PixtralProcessor", "spatial_merge_size": MERGE}


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny ChatML tokenizer plus the three Pixtral special tokens; returns their ids."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def make_reference(vocab: int, image_token: int, *, feature_layer=-1, sliding_window=None, seed=1):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    vc = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             patch_size=PATCH, image_size=LONGEST, rope_parameters={"rope_type": "axial",
                                                                                   "rope_theta": 10000.0})
    tc = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       rms_norm_eps=1e-5, sliding_window=sliding_window, tie_word_embeddings=False,
                       eos_token_id=None, bos_token_id=None)
    cfg = Mistral3Config(vision_config=vc, text_config=tc, image_token_index=image_token,
                         vision_feature_layer=feature_layer, spatial_merge_size=MERGE, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Mistral3ForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_mistral3(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids["[IMG]"], **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "processor_config.json": PROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
