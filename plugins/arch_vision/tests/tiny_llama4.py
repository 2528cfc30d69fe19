"""A tiny Llama 4 directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

SPECIALS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
            "<|tile_y_separator|>")
PATCH = 4
IMAGE = 16                    # tile side: (16 / 4)^2 = 16 patches, 4 tokens after the 2x2 shuffle
MAX_PATCHES = 4

# Llama 4's templates emit one <|image|> per image part; the processor expands it.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Llama-4-Scout's preprocessor_config.json, with small tiles.
PREPROCESSOR = {"image_processor_type": "Llama4ImageProcessorFast", "do_convert_rgb": True, "do_normalize": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "max_patches": MAX_PATCHES, "resample": 2, "rescale_factor": 0.00392156862745098,
                "resize_to_max_canvas": False, "size": {"height": IMAGE, "width": IMAGE}}
PROCESSOR = {"processor_class": "Llama4Processor", "patch_size": PATCH, "pixel_shuffle_ratio": 0.5,
             "fake_image_token": "<|image|>", "image_token": "<|image|>"}


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def make_reference(vocab: int, ids: dict, *, chunk=5, layers=4, seed=1, **text_kw):
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=3, num_experts_per_tok=1, interleave_moe_layer_step=2,
                no_rope_layer_interval=2, attention_chunk_size=chunk, floor_scale=3, attn_scale=0.5,
                max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None,
                pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    tc = Llama4TextConfig(**{**text, **text_kw})
    vc = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE, patch_size=PATCH, pixel_shuffle_ratio=0.5, projector_input_dim=48,
                            projector_output_dim=48, vision_output_dim=48, rope_parameters={"rope_type": "default",
                                                                                            "rope_theta": 10000.0})
    cfg = Llama4Config(vision_config=vc, text_config=tc, image_token_index=ids["<|patch|>"],
                       boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"])
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Llama4ForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_llama4(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "processor_config.json": PROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
