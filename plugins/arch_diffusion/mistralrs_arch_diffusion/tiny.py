"""A tiny random Flux folder in the diffusers layout, written with torch and ``tokenizers``
only (no diffusers): for examples, smoke tests and the server without a download. Its
images are noise-like: the weights are random."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_WORDS = ["a", "red", "fox", "in", "the", "snow", "cat", "blue", "sky", "over", "hills", "of", "green", "tree"]


def _write_clip_tokenizer(folder: Path) -> int:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab: dict[str, int] = {}
    for tok in letters + [ch + "</w>" for ch in letters] + [".</w>", ",</w>", "!</w>"]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "model_max_length": 77}))
    return len(vocab)


def _write_t5_tokenizer(folder: Path, max_length: int) -> int:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz.,!"]
    pieces += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(_WORDS)]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_length}))
    return len(pieces)


def _save(module: torch.nn.Module, folder: Path, config: dict, seed: int, name: str) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for pname, p in module.named_parameters():
        if pname.endswith("norm.weight") or pname.endswith("layer_norm.weight") or ".norm_" in pname:
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) * (1.0 / max(p.shape[-1], 1)) ** 0.5
        tensors[pname] = t.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / name)
    (folder / "config.json").write_text(json.dumps(config))


def write_tiny_flux(out: str | Path, *, guidance: bool = False, seed: int = 0, t5_max_length: int = 64) -> Path:
    """Write a tiny random Flux (schnell-like, or dev-like with ``guidance``) to ``out``."""
    from mistralrs_arch_diffusion.clip_text import CLIPTextConfig, CLIPTextModel
    from mistralrs_arch_diffusion.flux_transformer import FluxConfig, FluxTransformer2DModel
    from mistralrs_arch_diffusion.t5 import T5Config, T5EncoderModel
    from mistralrs_arch_diffusion.vae import AutoencoderKLDecoder, VAEConfig

    out = Path(out)
    clip_vocab = _write_clip_tokenizer(out / "tokenizer")
    t5_vocab = _write_t5_tokenizer(out / "tokenizer_2", t5_max_length)
    clip = dict(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                eos_token_id=clip_vocab - 1)
    _save(CLIPTextModel(CLIPTextConfig(**clip)), out / "text_encoder", clip, seed, "model.safetensors")
    t5 = dict(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
    t5_cfg = T5Config.from_hf(t5)
    _save(T5EncoderModel(t5_cfg), out / "text_encoder_2", t5, seed + 1, "model.safetensors")
    flux = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
                axes_dims_rope=[4, 6, 6])
    _save(FluxTransformer2DModel(FluxConfig.from_hf(flux)), out / "transformer", flux, seed + 2,
          "diffusion_pytorch_model.safetensors")
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
               layers_per_block=1, norm_num_groups=4, up_block_types=["UpDecoderBlock2D"] * 4,
               scaling_factor=1.5035, shift_factor=0.0609, use_post_quant_conv=False)
    _save(AutoencoderKLDecoder(VAEConfig.from_hf(vae)), out / "vae", vae, seed + 3,
          "diffusion_pytorch_model.safetensors")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
         "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return out
