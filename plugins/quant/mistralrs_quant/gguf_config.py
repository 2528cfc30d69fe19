"""GGUF metadata -> a Hugging Face-style config dict, per GGUF architecture.

The text families read config.json; GGUF files carry the same facts under llama.cpp's
``<arch>.*`` keys. Each supported architecture maps them onto the HF names its family's
``config_from_hf`` expects, so a family module never learns about GGUF.
"""
from __future__ import annotations

from typing import Any, Callable


class _Meta:
    def __init__(self, md: dict, arch: str):
        self.md, self.arch = md, arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(f"{self.arch}.{key}", default)

    def req(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.md:
            raise ValueError(f"GGUF metadata is missing {full!r}")
        return self.md[full]


def _per_layer(value, n_layers: int) -> int:
    """Some files store per-layer head counts as arrays; we need one value."""
    if isinstance(value, (list, tuple)):
        vals = set(value)
        if len(vals) != 1:
            raise ValueError(f"GGUF per-layer value {value!r} varies by layer; not supported")
        return int(next(iter(vals)))
    return int(value)


def _common(m: _Meta, vocab: int, tied: bool) -> dict:
    layers = int(m.req("block_count"))
    heads = _per_layer(m.req("attention.head_count"), layers)
    hidden = int(m.req("embedding_length"))
    cfg = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _per_layer(m.req("feed_forward_length"), layers),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _per_layer(m.get("attention.head_count_kv", heads), layers),
        "max_position_embeddings": int(m.get("context_length", 4096)),
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(m.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
    }
    key_len = m.get("attention.key_length")
    if key_len is not None and int(key_len) != hidden // heads:
        cfg["head_dim"] = int(key_len)
    scaling = m.get("rope.scaling.type")
    if scaling and scaling != "none":
        rs = {"rope_type": scaling, "factor": float(m.get("rope.scaling.factor", 1.0))}
        orig = m.get("rope.scaling.original_context_length")
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rs
    return cfg


def llama(m: _Meta, vocab: int, tied: bool) -> dict:
    cfg = _common(m, vocab, tied)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return cfg


def qwen2(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return cfg


def qwen3(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.setdefault("head_dim", int(m.get("attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"])))
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    return cfg


def gemma(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.setdefault("head_dim", int(m.get("attention.key_length", 256)))
    cfg.update(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_activation="gelu_pytorch_tanh")
    return cfg


def gemma2(m, vocab, tied):
    cfg = gemma(m, vocab, tied)
    cfg.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
               query_pre_attn_scalar=cfg["head_dim"],
               sliding_window=int(m.get("attention.sliding_window", 4096)),
               attn_logit_softcapping=m.get("attn_logit_softcapping"),
               final_logit_softcapping=m.get("final_logit_softcapping"))
    return cfg


def gemma3(m, vocab, tied):
    cfg = gemma(m, vocab, tied)
    layers = cfg["num_hidden_layers"]
    # llama.cpp hard-codes Gemma 3's 5-local-then-1-global pattern and the local rope base.
    pattern = 6
    cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
               query_pre_attn_scalar=cfg["head_dim"],
               sliding_window=int(m.get("attention.sliding_window", 512)),
               layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                            for i in range(layers)],
               rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh")
    if "rope_scaling" in cfg and cfg["rope_scaling"]["rope_type"] == "linear":
        pass  # global layers only, as the family reads it
    return cfg


CONFIG_BUILDERS: dict[str, Callable[[_Meta, int, bool], dict]] = {
    "llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma2": gemma2, "gemma3": gemma3,
}


def hf_config_from_gguf(metadata: dict, tensor_names, vocab_size: int) -> dict:
    arch = metadata.get("general.architecture")
    builder = CONFIG_BUILDERS.get(arch)
    if builder is None:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(CONFIG_BUILDERS)}")
    tied = "output.weight" not in tensor_names
    return builder(_Meta(metadata, arch), vocab_size, tied)
