"""A tiny random Flux (diffusers' own classes, every parameter perturbed) saved in the
diffusers layout, and its conversion to Black Forest Labs' single-file layout. The
conversion here is written independently of the loader's (it goes the other way)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

WORDS = ["a", "red", "fox", "in", "the", "snow", "cat", "blue", "sky", "over", "hills", "of", "green", "tree"]
PROMPT = "a red fox in the snow"
T5_MAX = 40


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    # Byte-level characters for ASCII letters, their word-final forms, a few merges.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {}
    for tok in letters + [ch + "</w>" for ch in letters] + [".", ".</w>", ",</w>", "!</w>", "Ġ"]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    for s in specials:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz.,!"]
    pieces += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    # A short model_max_length keeps the default T5 context (and the tests) small.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX)


def build(variant: str = "schnell", seed: int = 0):
    """diffusers' ``FluxPipeline`` with tiny random components (float32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=clip_tok.eos_token_id,
        bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id, projection_dim=32))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok) + 3, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
        guidance_embeds=variant == "dev", axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035, sample_size=32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    for i, m in enumerate((clip, t5, transformer, vae)):
        _perturb(m, seed * 10 + i)
        m.eval()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def save(pipe, folder: Path, clip_tokenizer_json: bool = False) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    tj = folder / "tokenizer" / "tokenizer.json"
    model = json.loads(tj.read_text())["model"]
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if not clip_tokenizer_json:
        # Black Forest Labs' repositories ship CLIP's vocab.json + merges.txt only.
        tj.unlink()
    return folder


# --------------------------------------------------------------------------- to the BFL layout

def _bfl_transformer(sd: dict, n_double: int, n_single: int) -> dict:
    out = {}

    def put(dst, src):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                out[f"{dst}.{leaf}"] = sd[f"{src}.{leaf}"]

    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    put("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    put("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        put(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        put(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for leaf in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}.attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{leaf}"] for x in "qkv"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]
        put(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        put(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        put(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        put(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        put(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        put(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for leaf in ("weight", "bias"):
            out[f"{b}.linear1.{leaf}"] = torch.cat([sd[f"{d}.attn.to_{x}.{leaf}"] for x in "qkv"]
                                                   + [sd[f"{d}.proj_mlp.{leaf}"]])
        put(f"{b}.linear2", f"{d}.proj_out")
        put(f"{b}.modulation.lin", f"{d}.norm.linear")
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    put("final_layer.linear", "proj_out")
    for leaf in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    # Fusion folds 12 q/k/v tensors into 4 per double block, 8 into 2 per single block.
    assert len(out) == len(sd) - 8 * n_double - 6 * n_single
    return {k: v.contiguous() for k, v in out.items()}


def _bfl_ae(sd: dict, n_up: int) -> dict:
    out = {}
    for name, t in sd.items():
        if name.startswith(("encoder.", "quant_conv.", "post_quant_conv.")):
            out[name] = t  # kept as the single file has them (the loader skips the encoder)
            continue
        n = name.replace("decoder.mid_block.resnets.0.", "decoder.mid.block_1.")
        n = n.replace("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")
        n = n.replace("decoder.mid_block.attentions.0.group_norm.", "decoder.mid.attn_1.norm.")
        for src, dst in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            prefix = f"decoder.mid_block.attentions.0.{src}."
            if n.startswith(prefix):
                n = f"decoder.mid.attn_1.{dst}." + n[len(prefix):]
                if n.endswith("weight"):
                    t = t[:, :, None, None]
        n = n.replace("conv_shortcut", "nin_shortcut").replace("decoder.conv_norm_out.", "decoder.norm_out.")
        if n.startswith("decoder.up_blocks."):
            parts = n.split(".")
            j = n_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                n = f"decoder.up.{j}.block.{'.'.join(parts[4:])}"
            else:  # upsamplers.0.conv.*
                n = f"decoder.up.{j}.upsample.{'.'.join(parts[5:])}"
        out[n] = t.contiguous()
    return out


def to_single_file(diffusers_dir: Path, folder: Path, variant: str = "schnell") -> Path:
    """The BFL layout: ``flux1-<variant>.safetensors`` + ``ae.safetensors`` beside the config,
    text encoder and tokenizer folders (transformer/ and vae/ keep only their configs)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(diffusers_dir, folder)
    tdir, vdir = folder / "transformer", folder / "vae"
    tsd = {}
    for f in sorted(tdir.glob("*.safetensors")):
        tsd.update(load_file(f))
        f.unlink()
    tcfg = json.loads((tdir / "config.json").read_text())
    save_file(_bfl_transformer(tsd, tcfg["num_layers"], tcfg["num_single_layers"]),
              folder / f"flux1-{variant}.safetensors")
    vsd = {}
    for f in sorted(vdir.glob("*.safetensors")):
        vsd.update(load_file(f))
        f.unlink()
    vcfg = json.loads((vdir / "config.json").read_text())
    save_file(_bfl_ae(vsd, len(vcfg["block_out_channels"])), folder / "ae.safetensors")
    return folder
