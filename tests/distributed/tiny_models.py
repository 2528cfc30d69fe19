"""Tiny random checkpoints for the scale-out tests (torch + safetensors only, so child
processes never import transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs_core.testing.tiny import write_random_llama, write_tiny_tokenizer


def _rnd(g, *shape, std=0.02):
    return torch.randn(*shape, generator=g) * std


def write_llama(out: Path) -> Path:
    # 4 heads over 2 KV heads (split), a vocabulary that 2 ranks cannot split evenly.
    return write_random_llama(out, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=387, seed=1)


def write_qwen3(out: Path) -> Path:
    """Qwen3 with one KV head (replicated across ranks), q/k norms and tied embeddings."""
    out = Path(out)
    write_tiny_tokenizer(out)
    g = torch.Generator().manual_seed(2)
    hidden, heads, kv, hd, inter, vocab, layers = 64, 4, 1, 32, 96, 384, 2
    w = {"model.embed_tokens.weight": _rnd(g, vocab, hidden, std=1.0),
         "model.norm.weight": 1 + _rnd(g, hidden, std=0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = _rnd(g, heads * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.k_proj.weight"] = _rnd(g, kv * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.v_proj.weight"] = _rnd(g, kv * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.o_proj.weight"] = _rnd(g, hidden, heads * hd, std=(heads * hd) ** -0.5)
        w[p + "self_attn.q_norm.weight"] = 1 + _rnd(g, hd, std=0.1)
        w[p + "self_attn.k_norm.weight"] = 1 + _rnd(g, hd, std=0.1)
        w[p + "mlp.gate_proj.weight"] = _rnd(g, inter, hidden, std=hidden ** -0.5)
        w[p + "mlp.up_proj.weight"] = _rnd(g, inter, hidden, std=hidden ** -0.5)
        w[p + "mlp.down_proj.weight"] = _rnd(g, hidden, inter, std=inter ** -0.5)
        w[p + "input_layernorm.weight"] = 1 + _rnd(g, hidden, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + _rnd(g, hidden, std=0.1)
    save_file(w, str(out / "model.safetensors"))
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def write_mixtral(out: Path, experts: int = 4) -> Path:
    """Mixtral-like: 4 experts, top-2, renormalised; 2 per rank under expert parallelism."""
    out = Path(out)
    write_tiny_tokenizer(out)
    g = torch.Generator().manual_seed(3)
    hidden, heads, kv, inter, vocab, layers = 64, 4, 2, 96, 384, 2
    hd = hidden // heads
    w = {"model.embed_tokens.weight": _rnd(g, vocab, hidden, std=1.0),
         "model.norm.weight": 1 + _rnd(g, hidden, std=0.1),
         "lm_head.weight": _rnd(g, vocab, hidden, std=hidden ** -0.5)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = _rnd(g, heads * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.k_proj.weight"] = _rnd(g, kv * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.v_proj.weight"] = _rnd(g, kv * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.o_proj.weight"] = _rnd(g, hidden, heads * hd, std=hidden ** -0.5)
        w[p + "block_sparse_moe.gate.weight"] = _rnd(g, experts, hidden, std=1.0)
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = _rnd(g, inter, hidden, std=hidden ** -0.5)
            w[q + "w3.weight"] = _rnd(g, inter, hidden, std=hidden ** -0.5)
            w[q + "w2.weight"] = _rnd(g, hidden, inter, std=inter ** -0.5)
        w[p + "input_layernorm.weight"] = 1 + _rnd(g, hidden, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + _rnd(g, hidden, std=0.1)
    save_file(w, str(out / "model.safetensors"))
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "num_local_experts": experts, "num_experts_per_tok": 2, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def write_q8_gguf(out_file: Path, hf_dir: Path) -> Path:
    """The Llama of ``hf_dir`` as a Q8_0 GGUF (llama.cpp's layout), through the quant
    plugin's test converter."""
    import sys
    from types import SimpleNamespace

    from safetensors.torch import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "quant" / "tests"))
    from gguf_convert import write_gguf
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    ns = SimpleNamespace(**cfg, rope_parameters={"rope_theta": cfg["rope_theta"], "rope_type": "default"})
    write_gguf(out_file, "llama", SimpleNamespace(state_dict=lambda: sd), ns, "Q8_0", tokenizer_size=cfg["vocab_size"])
    return out_file
