"""A tiny LLaVa-NeXT directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference

from tiny_llava import IMAGE, PATCH, PREPROCESSOR, TEMPLATE, write_tokenizer

# Canvases in tiles of IMAGE px: 1x2, 2x1, 2x2, 1x3, 3x1 (the hub's set, scaled down).
PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE], [IMAGE, 3 * IMAGE], [3 * IMAGE, IMAGE]]
NEXT_PREPROCESSOR = {**PREPROCESSOR, "image_processor_type": "LlavaNextImageProcessor",
                     "image_grid_pinpoints": PINPOINTS, "do_pad": True}
# What llava-v1.6's processor_config.json holds (the CLS counted, then dropped by "default").
PROCESSOR = {"patch_size": PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
             "processor_class": "LlavaNextProcessor"}


def make_reference(vocab: int, image_token: int, *, text="llama", seed=2):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              MistralConfig)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE, patch_size=PATCH, projection_dim=16)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, eos_token_id=None,
              bos_token_id=None)
    tc = LlamaConfig(**kw) if text == "llama" else MistralConfig(sliding_window=None, **kw)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlavaNextForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_llava_next(out: Path, **kw):
    image_token = write_tokenizer(out)
    ref = make_reference(image_token + 1, image_token, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": NEXT_PREPROCESSOR,
                                          "processor_config.json": PROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, image_token
