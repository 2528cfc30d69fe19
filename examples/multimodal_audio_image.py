"""Ask Phi-4-multimodal about an audio clip and an image in one message (the SDK's example).

The text places each input with ``<|audio_N|>`` / ``<|image_N|>`` tags (N from 1), as
Microsoft's processor and upstream mistral.rs expect; the ``audio_url`` / ``image_url`` parts
take any of the usual sources (data URI, path, file://, http(s), bare base64).

Offline by default: it writes a tiny RANDOM Phi-4-multimodal folder (transformers 5's layout:
config.json, random safetensors, a small tokenizer, the hub's chat template) plus a tone and a
picture, so the answer is noise but the whole path runs: log-mel features and the conformer
audio encoder, dynamic-HD crops and the SigLIP image encoder, the Phi text decoder. With the
real model (about 11 GB):

    python examples/multimodal_audio_image.py --model microsoft/Phi-4-multimodal-instruct \\
        --image https://www.allaboutbirds.org/guide/assets/og/528129121-1200px.jpg \\
        --audio https://upload.wikimedia.org/wikipedia/commons/4/42/Bird_singing.ogg
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

IMAGE_TOKEN, AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"
TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")


def tiny_config(vocab: int, image_id: int, audio_id: int) -> dict[str, object]:
    rotary = 12                                    # head_dim 16 * partial_rotary_factor 0.75
    return {
        "model_type": "phi4_multimodal", "architectures": ["Phi4MultimodalForCausalLM"], "vocab_size": vocab,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 8192, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                            "short_factor": [1.0] * (rotary // 2), "long_factor": [2.0] * (rotary // 2),
                            "original_max_position_embeddings": 4096},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 224, "crop_size": 224, "patch_size": 14,
                          "feature_layer": -2, "image_token_id": image_id},
        "audio_config": {"hidden_size": 16, "intermediate_size": 24, "num_blocks": 2, "num_attention_heads": 2,
                         "ext_pw_out_channel": 16, "depthwise_separable_out_channel": 16, "nemo_conv_channels": 8,
                         "input_size": 80, "time_reduction": 8, "bias_max_distance": 20,
                         "audio_token_id": audio_id},
    }


def write_tiny_phi4mm(out: Path) -> Path:
    """A random Phi-4-multimodal folder; weights named as transformers 5 saves them."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer

    from mistralrs_arch_vision.phi4mm import Phi4MMForCausalLM
    from mistralrs_core.testing.tiny import write_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    specials = [IMAGE_TOKEN, AUDIO_TOKEN, "<|user|>", "<|assistant|>", "<|end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    ids: list[int] = []
    for t in specials:
        token_id = tok.token_to_id(t)
        assert token_id is not None
        ids.append(token_id)
    config = tiny_config(max(ids) + 1, ids[0], ids[1])
    (out / "config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Phi4MultimodalImageProcessor", "size": {"height": 224, "width": 224},
         "patch_size": 14, "dynamic_hd": 4, "audio_compression_rate": 8}))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    with torch.device("meta"):
        model = Phi4MMForCausalLM.from_hf_config(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        if name.startswith(("image_embed.", "audio_embed.")):
            name = "model.embed_tokens_extend." + name
        tensors[name] = torch.randn(p.shape, generator=g) * 0.1
    save_file(tensors, str(out / "model.safetensors"))
    return out


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def picture_png() -> str:
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (180, 320, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Phi-4-multimodal folder or hub id (default: a tiny random local one)")
    ap.add_argument("--image", help="image URL, path or data URI (default: a random picture)")
    ap.add_argument("--audio", help="audio URL, path or data URI (default: a 440 Hz tone)")
    args = ap.parse_args()
    if args.model is None:
        args.model = str(write_tiny_phi4mm(Path(tempfile.mkdtemp()) / "phi4mm"))
        print("model: a tiny RANDOM Phi-4-multimodal (the answer is noise)", file=sys.stderr)
    runner = Runner(which=Which.VisionPlain(model_id=args.model, arch=VisionArchitecture.Phi4MM))
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default",
        messages=[{"role": "user", "content": [
            {"type": "audio_url", "audio_url": {"url": args.audio or tone_wav()}},
            {"type": "image_url", "image_url": {"url": args.image or picture_png()}},
            {"type": "text", "text": "<|audio_1|><|image_1|> Describe in detail what is happening, "
                                     "referencing both what you hear and what you see."},
        ]}],
        max_tokens=24, temperature=0.2, top_p=0.9,
    ))
    print(response.choices[0].message.content)
    usage = response.usage
    print(f"prompt {usage.prompt_tokens} tokens (image and audio placeholders included), "
          f"{usage.completion_tokens} generated", file=sys.stderr)
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
