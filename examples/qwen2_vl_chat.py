"""Qwen2-VL / Qwen2.5-VL: images at their own resolution, M-RoPE positions.

    python examples/qwen2_vl_chat.py                      # a tiny random Qwen2.5-VL, offline
    python examples/qwen2_vl_chat.py MODEL_DIR [Qwen2VL]   # e.g. Qwen/Qwen2.5-VL-3B-Instruct

Two images of different sizes go into one message; each becomes its own number of
``<|image_pad|>`` tokens (one per 28 x 28 pixels at the released settings, as the
processor's ``smart_resize`` rounds the image), and the text model rotates them by their
(t, h, w) grid positions. The tiny model's answer is noise; the point is the path
(processor, tower, M-RoPE positions) end to end.
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

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tiny_qwen25_vl(out: Path) -> Path:
    """A random Qwen2.5-VL folder in the hub's layout, written with our own module tree."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer
    from mistralrs_core.testing.tiny import write_tiny_tokenizer
    from mistralrs_arch_vision.qwen2_vl import Qwen2_5_VLForConditionalGeneration
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": False,
           "image_token_id": tok.token_to_id("<|image_pad|>"), "video_token_id": tok.token_to_id("<|video_pad|>"),
           "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                             "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                             "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]}}
    model = Qwen2_5_VLForConditionalGeneration.from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(p.shape, generator=g) * 0.2 for name, p in model.named_parameters()}
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 28 * 28 * 64,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out


def data_uri(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    if len(sys.argv) > 1:
        model_dir, arch = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Qwen2_5VL"
    else:
        model_dir, arch = str(write_tiny_qwen25_vl(Path(tempfile.mkdtemp()))), "Qwen2_5VL"
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=getattr(VisionArchitecture, arch)))
    images = [(200, 90, 1), (60, 120, 2)]
    req = ChatCompletionRequest(model="default", max_tokens=16, temperature=0.0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(*images[0])}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_uri(*images[1])}},
        {"type": "text", "text": "What differs between these images?"}]}])
    from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLImageProcessor
    proc = Qwen2VLImageProcessor.from_config(json.loads((Path(model_dir) / "preprocessor_config.json").read_text()))
    for w, h, _ in images:
        rw, rh = proc.resized_size(w, h)
        print(f"{w} x {h} image -> resized to {rw} x {rh} -> {proc.num_tokens((1, rh // proc.patch_size, rw // proc.patch_size))} image tokens")
    res = runner.send_chat_completion_request(req)
    print(f"prompt tokens {res.usage.prompt_tokens}; answer {res.choices[0].message.content!r}")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
