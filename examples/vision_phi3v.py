"""Phi-3-vision: images as ``<|image_N|>`` tags. ``python examples/vision_phi3v.py [MODEL_DIR]``.

MODEL_DIR is a Phi-3-vision / Phi-3.5-vision folder (Microsoft's layout: config.json with
``model_type: phi3_v``, safetensors, tokenizer, preprocessor_config.json with ``num_crops``).
Without it a tiny random model in that layout is written to a temporary folder (offline;
its answers are noise, the point is the prompt handling):

* an image part with plain text gets its tag put in front of the text, as upstream
  mistral.rs does (``<|image_1|>What is in this image?``);
* text that writes the tags itself places each image there (``<|image_2|>`` may come first).

Each image becomes (rows * cols + 1) * 144 + 1 + (rows + 1) * 12 tokens for its grid of 336 px
crops (at most ``num_crops``), which ``usage.prompt_tokens`` shows.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
            "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
            "{{- '<|assistant|>\\n' -}}{% endif %}")


def write_random_phi3v(out: Path) -> Path:
    """A tiny random Phi-3-vision folder: CLIP 336/14 with 32 channels, 2-layer Phi-3 text."""
    from tokenizers import AddedToken, Tokenizer

    from mistralrs_core.testing.tiny import write_tiny_tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|image|>")])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "chat_template": TEMPLATE}))
    vocab, d, c, g = tok.get_vocab_size(), 64, 32, torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    w = {"model.embed_tokens.weight": rnd(vocab, d), "model.norm.weight": 1 + rnd(d), "lm_head.weight": rnd(vocab, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.qkv_proj.weight": rnd(3 * d, d), p + "self_attn.o_proj.weight": rnd(d, d),
              p + "mlp.gate_up_proj.weight": rnd(4 * d, d), p + "mlp.down_proj.weight": rnd(d, 2 * d),
              p + "input_layernorm.weight": 1 + rnd(d), p + "post_attention_layernorm.weight": 1 + rnd(d)}
    v = "model.vision_embed_tokens.img_processor.vision_model."
    w |= {v + "embeddings.class_embedding": rnd(c), v + "embeddings.patch_embedding.weight": rnd(c, 3, 14, 14),
          v + "embeddings.position_embedding.weight": rnd(577, c)}
    for name in ("pre_layrnorm", "post_layernorm"):
        w |= {v + name + ".weight": 1 + rnd(c), v + name + ".bias": rnd(c)}
    for i in range(2):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w |= {p + f"self_attn.{proj}.weight": rnd(c, c), p + f"self_attn.{proj}.bias": rnd(c)}
        for norm in ("layer_norm1", "layer_norm2"):
            w |= {p + norm + ".weight": 1 + rnd(c), p + norm + ".bias": rnd(c)}
        w |= {p + "mlp.fc1.weight": rnd(2 * c, c), p + "mlp.fc1.bias": rnd(2 * c),
              p + "mlp.fc2.weight": rnd(c, 2 * c), p + "mlp.fc2.bias": rnd(c)}
    e = "model.vision_embed_tokens."
    w |= {e + "glb_GN": rnd(1, 1, 4 * c), e + "sub_GN": rnd(1, 1, 1, 4 * c),
          e + "img_projection.0.weight": rnd(d, 4 * c), e + "img_projection.0.bias": rnd(d),
          e + "img_projection.2.weight": rnd(d, d), e + "img_projection.2.bias": rnd(d)}
    save_file(w, str(out / "model.safetensors"))
    cfg = {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "vocab_size": vocab, "hidden_size": d,
           "intermediate_size": 2 * d, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 8192, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
           "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                          "use_hd_transform": True, "with_learnable_separator": True},
           "img_processor": {"image_dim_out": c, "model_name": "openai/clip-vit-large-patch14-336",
                             "name": "clip_vision_model", "num_img_tokens": 144},
           # the hub's code fixes CLIP ViT-L/14-336; this tiny tower says its own size
           "vision_config": {"hidden_size": c, "intermediate_size": 2 * c, "num_hidden_layers": 2,
                             "num_attention_heads": 4}}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Phi3VImageProcessor",
                                                              "num_crops": 4}))
    return out


def data_uri(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else str(write_random_phi3v(Path(tempfile.mkdtemp())))
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=VisionArchitecture.Phi3V))
    wide, tall = data_uri(640, 300, 1), data_uri(200, 500, 2)
    asks = {"tag added in front": [{"type": "image_url", "image_url": {"url": wide}},
                                   {"type": "text", "text": "What is in this image?"}],
            "tags in the text": [{"type": "image_url", "image_url": {"url": wide}},
                                 {"type": "image_url", "image_url": {"url": tall}},
                                 {"type": "text", "text": "Compare <|image_2|> with <|image_1|>."}]}
    for what, content in asks.items():
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", max_tokens=16, temperature=0.0, messages=[{"role": "user", "content": content}]))
        print(f"{what}: {res.usage.prompt_tokens} prompt tokens -> {res.choices[0].message.content!r}")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
