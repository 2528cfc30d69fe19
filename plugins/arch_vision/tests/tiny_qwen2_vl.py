"""Tiny Qwen2-VL / Qwen2.5-VL directories (transformers' modeling, every parameter perturbed)
for tests: ``save_pretrained``'s files (hub weight names, nested ``text_config``), optionally
with the hub's flat config.json or transformers 5's nested weight names."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

PATCH, MERGE, TEMPORAL = 4, 2, 2
FACTOR = PATCH * MERGE                   # pixels per side of one merged token
MIN_PIXELS, MAX_PIXELS = FACTOR * FACTOR * 2, FACTOR * FACTOR * 40
WINDOW = 2 * FACTOR                      # Qwen2.5-VL: windows of 2 x 2 merged tokens
SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SECTIONS = [2, 3, 3]                     # text head_dim 16: rotary half of 8

# Qwen2-VL's template reduced to what matters: one placeholder run per image (video) part.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
                "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH,
                "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def make_reference(ids: dict[str, int], *, qwen25: bool, tie=False, sliding=False, seed=1):
    import transformers as t
    vocab = max(ids.values()) + 1
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTIONS},
                tie_word_embeddings=tie, eos_token_id=None, bos_token_id=None)
    if sliding:
        text.update(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    common = dict(depth=3, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  rope_parameters={"rope_type": "axial", "rope_theta": 1000.0})
    if qwen25:
        vision = dict(hidden_size=32, out_hidden_size=64, intermediate_size=48, hidden_act="silu",
                      window_size=WINDOW, fullatt_block_indexes=[1], **common)
        cls, cfg_cls, text_cls = (t.Qwen2_5_VLForConditionalGeneration, t.Qwen2_5_VLConfig,
                                  t.Qwen2_5_VLTextConfig)
    else:
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, hidden_act="quick_gelu", **common)
        cls, cfg_cls, text_cls = t.Qwen2VLForConditionalGeneration, t.Qwen2VLConfig, t.Qwen2VLTextConfig
    cfg = cfg_cls(text_config=text_cls(**text).to_dict(), vision_config=vision,
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=tie)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def flatten_config(out: Path) -> None:
    """The hub's Qwen2-VL config.json: text fields at the top, ``rope_theta`` and
    ``rope_scaling: {type: mrope, mrope_section}``."""
    cfg = json.loads((out / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = dict(text.pop("rope_parameters"))
    flat = {**text, **cfg, "rope_theta": rope.pop("rope_theta"),
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (out / "config.json").write_text(json.dumps(flat))


def nest_weight_names(out: Path) -> None:
    """transformers 5's module names (``model.language_model.*``, ``model.visual.*``);
    ``save_pretrained`` writes the hub's (``model.*``, ``visual.*``)."""
    from safetensors.torch import load_file, save_file
    for f in sorted(out.glob("*.safetensors")):
        renamed = {}
        for k, v in load_file(str(f)).items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model."):
                k = "model.language_model." + k[len("model."):]
            renamed[k] = v.contiguous()
        save_file(renamed, str(f), metadata={"format": "pt"})


def write_tiny_qwen2_vl(out: Path, *, qwen25=False, flat_config=False, nested_names=False, **kw):
    ids = write_tokenizer(out)
    ref = make_reference(ids, qwen25=qwen25, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    if flat_config:
        flatten_config(out)
    if nested_names:
        nest_weight_names(out)
    return out, ref, ids
