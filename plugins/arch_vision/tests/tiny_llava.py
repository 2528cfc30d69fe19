"""A tiny LLaVa directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

IMAGE = 28              # crop size = the tower's image_size
PATCH = 7               # 16 patches per image
IMAGE_TOKEN = "<image>"

# The hub LLaVa templates' shape: content is a string or a list of text / image parts.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                "size": {"shortest_edge": IMAGE}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": IMAGE, "width": IMAGE}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}


def write_tokenizer(out: Path) -> int:
    """The tiny ChatML tokenizer plus an ``<image>`` special token; returns its id."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    return tok.token_to_id(IMAGE_TOKEN)


def make_reference(vocab: int, image_token: int, *, feature_layer=-2, strategy="default", seed=1):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE, patch_size=PATCH, projection_dim=16)
    tc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                     eos_token_id=None, bos_token_id=None)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      image_seq_length=(IMAGE // PATCH) ** 2 + (strategy == "full"))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_llava(out: Path, **kw):
    image_token = write_tokenizer(out)
    vocab = image_token + 1
    ref = make_reference(vocab, image_token, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, image_token
