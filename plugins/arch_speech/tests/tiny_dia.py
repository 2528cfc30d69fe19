"""Tiny random Dia + DAC checkpoints for the tests (transformers 5 layout and the original
releases' layouts), every parameter perturbed."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs_core.testing.parity import perturb_parameters

DELAY = [0, 2, 3, 4]
EOS, PAD, BOS = 16, 17, 18          # audio vocab 20; the DAC codebooks hold 16 codes


def dia_config(enc_theta: float = 5000.0):
    from transformers import DiaConfig, DiaDecoderConfig, DiaEncoderConfig
    enc = DiaEncoderConfig(max_position_embeddings=96, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, intermediate_size=48, norm_eps=1e-5, vocab_size=256,
                           rope_parameters={"rope_type": "default", "rope_theta": enc_theta})
    dec = DiaDecoderConfig(max_position_embeddings=160, num_hidden_layers=2, hidden_size=48, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, cross_num_attention_heads=4,
                           cross_head_dim=8, cross_num_key_value_heads=4, cross_hidden_size=32, norm_eps=1e-5,
                           vocab_size=20, num_channels=len(DELAY), eos_token_id=EOS, pad_token_id=PAD,
                           bos_token_id=BOS, rope_parameters={"rope_type": "default", "rope_theta": 7000.0})
    return DiaConfig(encoder_config=enc, decoder_config=dec, delay_pattern=DELAY)


def make_reference_dia(seed: int = 0, enc_theta: float = 5000.0):
    from transformers import DiaForConditionalGeneration
    torch.manual_seed(seed)
    ref = DiaForConditionalGeneration(dia_config(enc_theta)).eval()
    perturb_parameters(ref, seed=seed, scale=0.2)
    return ref


GEN_CONFIG = {"do_sample": True, "guidance_scale": 3.0, "temperature": 1.3, "top_p": 0.95, "top_k": 6,
              "max_length": 60}


def write_dia(ref, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(GEN_CONFIG))
    return out


def write_dia_original(ref, out: Path) -> Path:
    """The same weights saved as the original nari-labs release stores them: DenseGeneral
    kernels (input axis first, output split over heads), fused ``wi_fused``, one embedding
    table per codebook, and its nested config.json."""
    c = ref.config
    enc, dec = c.encoder_config, c.decoder_config
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    out_sd = {}
    for name, t in sd.items():
        n = name[len("model."):] if name.startswith("model.") else name
        if n == "logits_dense.weight":
            out_sd["decoder.logits_dense.weight"] = t.t().reshape(dec.hidden_size, len(DELAY), dec.vocab_size)
        elif n == "decoder.embeddings.embed.weight":
            for ch, part in enumerate(t.split(dec.vocab_size)):
                out_sd[f"decoder.embeddings.{ch}.weight"] = part
        elif n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            is_enc, is_cross = n.startswith("encoder."), ".cross_attention." in n
            hd = enc.head_dim if is_enc else (dec.cross_head_dim if is_cross else dec.head_dim)
            out_sd[n] = t.t().reshape(t.shape[1], -1, hd)
        elif n.endswith("o_proj.weight"):
            is_enc, is_cross = n.startswith("encoder."), ".cross_attention." in n
            hd = enc.head_dim if is_enc else (dec.cross_head_dim if is_cross else dec.head_dim)
            out_sd[n] = t.t().reshape(-1, hd, t.shape[0])
        elif n.endswith("mlp.gate_up_proj.weight"):
            out_sd[n.replace("gate_up_proj", "wi_fused")] = t.t().reshape(t.shape[1], 2, -1)
        elif n.endswith("mlp.down_proj.weight"):
            out_sd[n.replace("down_proj", "wo")] = t.t()
        else:
            out_sd[n] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out_sd.items()}, str(out / "model.safetensors"))
    cfg = {"version": "0.1", "model": {
        "encoder": {"n_layer": enc.num_hidden_layers, "n_embd": enc.hidden_size, "n_hidden": enc.intermediate_size,
                    "n_head": enc.num_attention_heads, "head_dim": enc.head_dim},
        "decoder": {"n_layer": dec.num_hidden_layers, "n_embd": dec.hidden_size, "n_hidden": dec.intermediate_size,
                    "gqa_query_heads": dec.num_attention_heads, "kv_heads": dec.num_key_value_heads,
                    "gqa_head_dim": dec.head_dim, "cross_query_heads": dec.cross_num_attention_heads,
                    "cross_head_dim": dec.cross_head_dim},
        "src_vocab_size": enc.vocab_size, "tgt_vocab_size": dec.vocab_size, "normalization_layer_epsilon": 1e-5,
        "weight_dtype": "float32",
        # Encoder and decoder share one rope in the original: convert a reference made with
        # make_reference_dia(enc_theta=7000).
        "rope_min_timescale": 1, "rope_max_timescale": dec.rope_parameters["rope_theta"]},
        "data": {"text_length": enc.max_position_embeddings, "audio_length": dec.max_position_embeddings,
                 "channels": len(DELAY), "text_pad_value": 0, "audio_eos_value": EOS, "audio_pad_value": PAD,
                 "audio_bos_value": BOS, "delay_pattern": DELAY}}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "generation_config.json").write_text(json.dumps(GEN_CONFIG))
    return out


# ------------------------------------------------------------------ DAC

def dac_config():
    from transformers import DacConfig
    return DacConfig(encoder_hidden_size=4, decoder_hidden_size=32, downsampling_ratios=[2, 4, 2], n_codebooks=len(DELAY),
                     codebook_size=16, codebook_dim=4, sampling_rate=24000)


def make_reference_dac(seed: int = 1):
    from transformers import DacModel
    torch.manual_seed(seed)
    ref = DacModel(dac_config()).eval()
    # 0.1, not the decoder's 0.2: at 0.2 the activations grow to ~150 before the last
    # convolution cancels them down to a waveform, and transformers' own float32 output is
    # then 1-3e-4 (relative) away from its float64 one, so a 1e-4 comparison could only pass
    # by repeating its exact operation order. At 0.1 both sides are ~5e-7 from float64.
    perturb_parameters(ref, seed=seed, scale=0.1)
    return ref


def write_dac(ref, out: Path) -> Path:
    """transformers layout with the weight-norm parametrisation the hub export keeps."""
    import copy
    m = copy.deepcopy(ref)
    m.apply_weight_norm()
    m.save_pretrained(out, safe_serialization=True)
    return out


def write_dac_original(ref, out: Path) -> Path:
    """The original DAC release's names (``decoder.model.N``, ``block.K``) with
    ``weight_g``/``weight_v`` pairs; no config.json (its architecture is in the tensors)."""
    sd = {}
    n_blocks = len(ref.decoder.block)

    def put(prefix: str, conv):
        w = conv.weight.detach()
        norm = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
        sd[prefix + ".weight_g"] = norm.clone()
        sd[prefix + ".weight_v"] = w.clone()       # any v with this direction works; use w itself
        sd[prefix + ".bias"] = conv.bias.detach().clone()

    d = ref.decoder
    put("decoder.model.0", d.conv1)
    for i, blk in enumerate(d.block):
        p = f"decoder.model.{i + 1}.block"
        sd[f"{p}.0.alpha"] = blk.snake1.alpha.detach().clone()
        put(f"{p}.1", blk.conv_t1)
        for j, ru in enumerate((blk.res_unit1, blk.res_unit2, blk.res_unit3)):
            sd[f"{p}.{j + 2}.block.0.alpha"] = ru.snake1.alpha.detach().clone()
            put(f"{p}.{j + 2}.block.1", ru.conv1)
            sd[f"{p}.{j + 2}.block.2.alpha"] = ru.snake2.alpha.detach().clone()
            put(f"{p}.{j + 2}.block.3", ru.conv2)
    sd[f"decoder.model.{n_blocks + 1}.alpha"] = d.snake1.alpha.detach().clone()
    put(f"decoder.model.{n_blocks + 2}", d.conv2)
    for i, q in enumerate(ref.quantizer.quantizers):
        sd[f"quantizer.quantizers.{i}.codebook.weight"] = q.codebook.weight.detach().clone()
        put(f"quantizer.quantizers.{i}.out_proj", q.out_proj)
        put(f"quantizer.quantizers.{i}.in_proj", q.in_proj)
    sd["encoder.block.0.weight_v"] = torch.zeros(2, 1, 7)      # an encoder tensor: must be ignored
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"sample_rate": 24000}))
    return out


def delayed_start(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """What DiaProcessor gives ``generate`` for text-only requests: the delay mask
    (BOS while t <= delay[c], PAD after) and its attention mask."""
    t = torch.arange(1 + max(DELAY))[:, None]
    mask = torch.where(t <= torch.tensor(DELAY)[None, :], BOS, PAD)
    return mask[None].repeat(batch, 1, 1), torch.ones(batch, 1 + max(DELAY), dtype=torch.long)


def reference_codes(sequences: torch.Tensor) -> list[torch.Tensor]:
    """Undo the delay pattern of transformers' generate output [B, T, C] as DiaProcessor's
    batch_decode does -> per item codes [C, frames]."""
    from transformers.models.dia.processing_dia import DiaProcessor
    b, t, c = sequences.shape
    start = (sequences[:, :, 0] == BOS).sum(-1)
    end = t - (sequences[:, :, 0] == PAD).sum(-1) - 1
    idx = DiaProcessor.build_indices(bsz=b, seq_len=t, num_channels=c, delay_pattern=DELAY, revert=True)
    out = DiaProcessor.apply_audio_delay(sequences, -1, -1, idx).transpose(1, 2)
    return [out[i, :, start[i]:end[i]] for i in range(b)]
