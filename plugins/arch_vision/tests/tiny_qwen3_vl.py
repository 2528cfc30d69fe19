"""A tiny Qwen3-VL directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

PATCH = 4
MERGE = 2
TEMPORAL = 2
UNIT = PATCH * MERGE          # pixels per side of one prompt token
SECTIONS = [2, 3, 3]          # head_dim 16: 8 rotary frequencies, interleaved t/h/w
DEEPSTACK = [0, 2]            # tower blocks whose states feed text layers 0 and 1
SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen3-VL's template shape (an image part -> <|vision_start|><|image_pad|><|vision_end|>).
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Qwen3-VL's preprocessor_config.json at the tiny size: 2 .. 30 tokens per image.
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessorFast", "do_convert_rgb": True,
                "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "merge_size": MERGE, "patch_size": PATCH, "resample": 3,
                "rescale_factor": 0.00392156862745098, "temporal_patch_size": TEMPORAL,
                "size": {"shortest_edge": 2 * UNIT * UNIT, "longest_edge": 30 * UNIT * UNIT}}


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny ChatML tokenizer plus Qwen's vision tokens; returns their ids."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


# Qwen3-VL-MoE's text side at the tiny size: 4 experts, top 2, layer 1 dense.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
           mlp_only_layers=[1])


def tokenizer_of(ids: dict[str, int]):
    """A stand-in tokenizer that knows the vision tokens (what the processor looks up)."""
    import types
    return types.SimpleNamespace(token_to_id=ids.get, id_to_token={v: k for k, v in ids.items()}.get)


def make_reference(vocab: int, ids: dict[str, int], *, seed=1, tie=False, moe=False, **text):
    if moe:
        from transformers import Qwen3VLMoeConfig as Qwen3VLConfig
        from transformers import Qwen3VLMoeForConditionalGeneration as Qwen3VLForConditionalGeneration
        text = {**MOE, **text}
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vc = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=PATCH,
              temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, out_hidden_size=64,
              num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK)
    tc = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": SECTIONS,
                               "mrope_interleaved": True},
              tie_word_embeddings=tie, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    tc.update(text)
    cfg = Qwen3VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Qwen3VLForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    if tie:
        ref.tie_weights()
    return ref


def write_tiny_qwen3_vl(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
