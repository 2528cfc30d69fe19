"""A tiny Idefics3 directory (transformers' modeling, every parameter perturbed) for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

TILE = 28               # the tower's image_size = max_image_size: 4 x 4 patches of 7
PATCH = 7
SCALE = 2               # pixel shuffle 2 x 2 -> 4 tokens per tile
TOKENS = 4
LONGEST = 3 * TILE      # up to 3 x 3 tiles + the global image
IMAGE, FAKE, GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

# SmolVLM's template shape (image parts -> <image>) on ChatML markers the tiny tokenizer knows.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# SmolVLM-256M-Instruct's preprocessor_config.json at the tiny size.
PREPROCESSOR = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "Idefics3ImageProcessor", "image_std": [0.5, 0.5, 0.5],
                "max_image_size": {"longest_edge": TILE}, "processor_class": "Idefics3Processor",
                "resample": 1, "rescale_factor": 1 / 255, "size": {"longest_edge": LONGEST}}


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny ChatML tokenizer plus Idefics3's image tokens; returns their ids."""
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    names = [FAKE, IMAGE, GLOBAL, *ROW_COL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in names}


def make_reference(vocab: int, ids: dict[str, int], *, seed=1):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    vc = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH)
    tc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                     pad_token_id=None, eos_token_id=None, bos_token_id=None)
    cfg = Idefics3Config(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=ids[IMAGE],
                         scale_factor=SCALE)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Idefics3ForConditionalGeneration(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def write_tiny_idefics3(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids
