"""Tiny random Dia and DAC checkpoints in the transformers 5 layout, for examples and smoke
runs without a download (the audio is noise: the weights are random)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs_arch_speech.dac import DacCodec, DacDecoderConfig
from mistralrs_arch_speech.dia import DiaModel
from mistralrs_arch_speech.dia_config import DiaConfig

DIA_CONFIG = {
    "model_type": "dia", "architectures": ["DiaForConditionalGeneration"],
    "delay_pattern": [0, 8, 9, 10, 11, 12, 13, 14, 15],
    "encoder_config": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 256,
                       "max_position_embeddings": 1024, "norm_eps": 1e-5,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "decoder_config": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                       "cross_num_attention_heads": 4, "cross_num_key_value_heads": 4, "cross_head_dim": 16,
                       "cross_hidden_size": 64, "vocab_size": 1028, "num_channels": 9,
                       "max_position_embeddings": 3072, "norm_eps": 1e-5, "eos_token_id": 1024,
                       "pad_token_id": 1025, "bos_token_id": 1026,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", ".alpha")):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = 0.05 * torch.randn(p.shape, generator=g)
        out[name] = t
    return out


def write_random_dia(out: Path, seed: int = 0, max_frames: int = 200) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = DiaModel(DiaConfig.from_hf(DIA_CONFIG))
    state = {("" if n.startswith("logits_dense") else "model.") + n: t for n, t in _random_state(model, seed).items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(DIA_CONFIG, indent=1))
    gen = {"do_sample": True, "guidance_scale": 3.0, "temperature": 1.3, "top_p": 0.95, "top_k": 35,
           "max_length": max_frames}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out


def write_random_dac(out: Path, seed: int = 1) -> Path:
    """The 44.1 kHz codec's structure (strides 8, 8, 4, 2: 512 samples a frame, 9 codebooks
    of 1024 codes), narrow."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DacDecoderConfig(latent=64, channels=64, strides=[8, 8, 4, 2], n_codebooks=9, codebook_size=1024,
                           codebook_dim=8, sampling_rate=44100)
    codec = DacCodec(cfg)
    save_file(_random_state(codec, seed), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "dac", "sampling_rate": 44100}))
    return out
