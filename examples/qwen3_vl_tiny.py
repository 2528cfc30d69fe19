"""Qwen3-VL offline: ``python examples/qwen3_vl_tiny.py [MODEL_DIR]``.

Without MODEL_DIR it writes a tiny Qwen3-VL with random weights (the hub's config.json and
tensor names, a small byte-level tokenizer with Qwen's vision tokens) to a temporary folder,
so the whole path runs offline in seconds: dynamic-resolution images (two sizes give two
token counts), the ViT with its deepstack mergers, interleaved M-RoPE positions, an image
request and a text request in one batch. The answers of random weights are noise; with a
real checkpoint (e.g. a local copy of Qwen/Qwen3-VL-2B-Instruct) pass its folder.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tiny_model(out: Path) -> Path:
    """config.json, random safetensors under the hub's names, tokenizer, template, preprocessor."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer

    from mistralrs_arch_vision.qwen3_vl import Qwen3VLForConditionalGeneration
    from mistralrs_core.testing.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    ids: dict[str, int] = {}
    for t in SPECIALS:
        tid = tok.token_to_id(t)
        assert tid is not None, t
        ids[t] = tid
    cfg = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "torch_dtype": "float32",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": max(ids.values()) + 1, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True},
                        "rope_theta": 5000000.0, "eos_token_id": tok.token_to_id("<|im_end|>")},
        "vision_config": {"model_type": "qwen3_vl", "depth": 4, "hidden_size": 32, "intermediate_size": 64,
                          "num_heads": 4, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "out_hidden_size": 64, "num_position_embeddings": 64,
                          "deepstack_visual_indexes": [1, 2]},
    }
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}}))
    # The model's own module tree (built on the meta device) says which tensors to write.
    model = Qwen3VLForConditionalGeneration.from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        hub = ("model.language_model." + name[len("model."):] if name.startswith("model.")
               else "model." + name if name.startswith("visual.") else name)
        tensors[hub] = torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0)
    save_file(tensors, out / "model.safetensors")
    return out


def data_uri(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else str(write_tiny_model(Path(tempfile.mkdtemp())))
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=VisionArchitecture.Qwen3VL))
    reqs = [ChatCompletionRequest(model="default", max_tokens=12, temperature=0.0, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(w, h, seed)}},
                                             {"type": "text", "text": "What is in this image?"}]}])
            for seed, (w, h) in enumerate([(160, 96), (64, 300)])]
    reqs.append(ChatCompletionRequest(model="default", max_tokens=12, temperature=0.0,
                                      messages=[{"role": "user", "content": "And a text-only question."}]))
    results: list[Any] = [None] * len(reqs)

    def send(i: int) -> None:
        results[i] = runner.send_chat_completion_request(reqs[i])
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, res in zip(["image 160x96", "image 64x300", "text"], results):
        print(f"{name}: {res.usage.prompt_tokens} prompt tokens -> {res.choices[0].message.content!r}")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
