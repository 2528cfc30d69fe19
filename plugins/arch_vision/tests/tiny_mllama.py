"""A tiny Mllama directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

TILE = 14               # tile side = the tower's image_size
PATCH = 7               # 4 patches + CLS = 5 tokens per tile (not a multiple of 8: padded)
MAX_TILES = 4
IMAGE_TOKEN = "<|image|>"

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PREPROCESSOR = {"image_processor_type": "MllamaImageProcessor", "do_resize": True, "do_pad": True,
                "size": {"height": TILE, "width": TILE}, "max_image_tiles": MAX_TILES, "resample": 2,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}


def write_tokenizer(out: Path) -> int:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    return tok.token_to_id(IMAGE_TOKEN)


def make_reference(vocab: int, image_token: int, seed: int = 1):
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
              image_size=TILE, patch_size=PATCH, max_num_tiles=MAX_TILES, intermediate_layers_indices=[1, 3],
              vision_output_dim=32 * 3, norm_eps=1e-5)
    tc = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = MllamaConfig(vision_config=vc, text_config=tc, image_token_index=image_token)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = MllamaForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_mllama(out: Path):
    image_token = write_tokenizer(out)
    # The image token is the last id the tokenizer knows; the text vocabulary stops before it
    # (the embedding table has 8 rows past the vocabulary, as in the released checkpoints).
    ref = make_reference(image_token, image_token)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, image_token
