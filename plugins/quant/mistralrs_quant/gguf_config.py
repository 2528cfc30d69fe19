"""GGUF metadata -> a Hugging Face-style config dict, per GGUF architecture.

The text families read config.json; GGUF files carry the same facts under llama.cpp's
``<arch>.*`` keys (and a few as tensors: rope frequency factors). Each supported
architecture maps them onto the HF names its family's ``config_from_hf`` expects, so a
family module never learns about GGUF.

Which builder runs: the family registration's own ``config_from_gguf`` first (a
third-party family brings its builder with its registration), then this module's table
for the llama.cpp architectures. The table stays here, not in mistralrs-arch-text:
these mappings are llama.cpp's conventions (as are ``gguf_names``' tensor names), which
this plugin owns, and a text family must not depend on the GGUF plugin. Builders have
the signature ``builder(meta: GGUFMeta, vocab_size, tied) -> dict`` and may reuse
``common_config``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


class GGUFMeta:
    """A GGUF file's metadata seen from one architecture: ``get("block_count")`` reads
    ``<arch>.block_count``; ``tensors`` maps tensor names to their infos."""

    def __init__(self, md: Mapping, arch: str, tensors: Mapping):
        self.md, self.arch, self.tensors = md, arch, tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(f"{self.arch}.{key}", default)

    def req(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.md:
            raise ValueError(f"GGUF metadata is missing {full!r}")
        return self.md[full]

    def vector(self, tensor: str) -> list[float] | None:
        info = self.tensors.get(tensor)
        if tensor in self.tensors and info is None:
            raise ValueError(f"GGUF tensor {tensor!r} holds rope settings; pass the tensor table, not names")
        return None if info is None else info.dequantize().reshape(-1).tolist()


def _per_layer(value, what: str) -> int:
    """Some files store per-layer head counts as arrays; we need one value."""
    if isinstance(value, (list, tuple)):
        vals = set(value)
        if len(vals) != 1:
            raise ValueError(f"GGUF per-layer {what} {list(value)!r} varies by layer; not supported")
        return int(next(iter(vals)))
    return int(value)


def _intermediate(m: GGUFMeta) -> int:
    # The tensor is the truth: Phi-2's converter writes 4 * hidden whatever the model has.
    down = m.tensors.get("blk.0.ffn_down.weight")
    if getattr(down, "shape", None) is not None and len(down.shape) == 2:
        return int(down.shape[1])
    return _per_layer(m.req("feed_forward_length"), "feed_forward_length")


def _rope_scaling(m: GGUFMeta, cfg: dict) -> dict | None:
    kind = m.get("rope.scaling.type")
    kind = None if kind in (None, "", "none") else kind
    rs: dict[str, Any] = {}
    if kind is not None:
        rs = {"rope_type": kind, "factor": float(m.get("rope.scaling.factor", 1.0))}
        orig = m.get("rope.scaling.original_context_length")
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if m.get(f"rope.scaling.{key}") is not None:
                rs[hf_key] = float(m.get(f"rope.scaling.{key}"))
    factors = m.vector("rope_freqs.weight")
    if factors is None:
        return rs or None
    # llama.cpp divides each rotary frequency by its factor (how it stores Llama 3.1's
    # scaling). LongRoPE with equal short and long factors and no attention scaling is
    # exactly that; a linear factor on top multiplies into every entry.
    if kind not in (None, "linear"):
        raise ValueError(f"GGUF rope_freqs.weight together with rope scaling {kind!r} is not supported")
    scale = rs.get("factor", 1.0) if kind == "linear" else 1.0
    factors = [f * scale for f in factors]
    return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors, "factor": 1.0,
            "attention_factor": 1.0, "original_max_position_embeddings": cfg["max_position_embeddings"]}


def _common(m: GGUFMeta, vocab: int, tied: bool) -> dict:
    layers = int(m.req("block_count"))
    heads = _per_layer(m.req("attention.head_count"), "head_count")
    hidden = int(m.req("embedding_length"))
    cfg = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _intermediate(m),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _per_layer(m.get("attention.head_count_kv", heads), "head_count_kv"),
        "max_position_embeddings": int(m.get("context_length", 4096)),
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(m.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
    }
    key_len = m.get("attention.key_length")
    if key_len is not None and int(key_len) != hidden // heads:
        cfg["head_dim"] = int(key_len)
    head_dim = cfg.get("head_dim", hidden // heads)
    rope_dims = m.get("rope.dimension_count")
    if rope_dims is not None and not 0 < int(rope_dims) <= head_dim:
        # Checked before anything is sized by it (the rotary tables).
        raise ValueError(f"rope.dimension_count: {rope_dims} is not within 1..{head_dim} (the head dimension)")
    if rope_dims is not None and int(rope_dims) != head_dim:
        cfg["partial_rotary_factor"] = int(rope_dims) / head_dim
    scaling = _rope_scaling(m, cfg)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


common_config = _common   # public name for third-party builders


def _has_bias(m: GGUFMeta, name: str) -> bool:
    return f"blk.0.{name}.bias" in m.tensors


def llama(m: GGUFMeta, vocab: int, tied: bool) -> dict:
    cfg = _common(m, vocab, tied)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"],
               attention_bias=_has_bias(m, "attn_q"), mlp_bias=_has_bias(m, "ffn_up"))
    return cfg


def qwen2(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return cfg


def qwen3(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.setdefault("head_dim", int(m.get("attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"])))
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=_has_bias(m, "attn_q"))
    return cfg


def smollm3(m, vocab, tied):
    cfg = llama(m, vocab, tied)
    # llama.cpp hard-codes NoPE on every 4th layer (SmolLM3's only released setting) and
    # its converter writes no key for it; a file that names another interval wins.
    cfg.update(model_type="smollm3", architectures=["SmolLM3ForCausalLM"],
               no_rope_layer_interval=int(m.get("no_rope_layer_interval", 4)))
    return cfg


def phi2(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu_new",
               layer_norm_eps=float(m.get("attention.layer_norm_epsilon", 1e-5)),
               partial_rotary_factor=int(m.get("rope.dimension_count", head_dim // 2)) / head_dim)
    return cfg


def phi3(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    window = m.get("attention.sliding_window")
    cfg.update(model_type="phi3", architectures=["Phi3ForCausalLM"],
               # Phi-4 is written as phi3 with a window of 0: no sliding window.
               sliding_window=int(window) if window else None)
    orig = m.get("rope.scaling.original_context_length")
    if orig:
        cfg["original_max_position_embeddings"] = int(orig)
    long, short = m.vector("rope_factors_long.weight"), m.vector("rope_factors_short.weight")
    if long is not None or short is not None:
        if long is None or short is None or not orig:
            raise ValueError("GGUF phi3 LongRoPE needs rope_factors_long, rope_factors_short and "
                             "phi3.rope.scaling.original_context_length")
        rs = {"rope_type": "longrope", "long_factor": long, "short_factor": short,
              "original_max_position_embeddings": int(orig)}
        if m.get("rope.scaling.attn_factor") is not None:
            rs["attention_factor"] = float(m.get("rope.scaling.attn_factor"))
        cfg["rope_scaling"] = rs
    return cfg


def starcoder2(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    window = m.get("attention.sliding_window")
    cfg.update(model_type="starcoder2", architectures=["Starcoder2ForCausalLM"],
               norm_epsilon=float(m.get("attention.layer_norm_epsilon", 1e-5)),
               hidden_act="gelu_pytorch_tanh", use_bias=_has_bias(m, "attn_q"),
               sliding_window=int(window) if window else None)
    return cfg


def gemma(m, vocab, tied):
    cfg = _common(m, vocab, tied)
    cfg.setdefault("head_dim", int(m.get("attention.key_length", 256)))
    cfg.update(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_activation="gelu_pytorch_tanh")
    return cfg


def _query_scalar(cfg: dict, layers_27b: int) -> int:
    # llama.cpp's rule: the 27B models scale queries by hidden/heads, the others by head_dim
    # (what query_pre_attn_scalar says in their config.json).
    if cfg["num_hidden_layers"] == layers_27b:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["head_dim"]


def gemma2(m, vocab, tied):
    cfg = gemma(m, vocab, tied)
    cfg.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
               query_pre_attn_scalar=_query_scalar(cfg, 46),
               sliding_window=int(m.get("attention.sliding_window", 4096)),
               attn_logit_softcapping=m.get("attn_logit_softcapping"),
               final_logit_softcapping=m.get("final_logit_softcapping"))
    return cfg


def gemma3(m, vocab, tied):
    cfg = gemma(m, vocab, tied)
    layers = cfg["num_hidden_layers"]
    pattern = m.get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):   # per layer: true = sliding
        types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        # llama.cpp hard-codes Gemma 3's 5-local-then-1-global pattern and the local rope base.
        types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]
    cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
               query_pre_attn_scalar=_query_scalar(cfg, 62),
               sliding_window=int(m.get("attention.sliding_window", 512)),
               layer_types=types, rope_local_base_freq=float(m.get("rope.freq_base_swa", 10000.0)),
               hidden_activation="gelu_pytorch_tanh",
               final_logit_softcapping=m.get("final_logit_softcapping"),
               attn_logit_softcapping=m.get("attn_logit_softcapping"))
    return cfg


CONFIG_BUILDERS: dict[str, Callable[[GGUFMeta, int, bool], dict]] = {
    "llama": llama, "qwen2": qwen2, "qwen3": qwen3, "smollm3": smollm3, "phi2": phi2, "phi3": phi3,
    "starcoder2": starcoder2, "gemma": gemma, "gemma2": gemma2, "gemma3": gemma3,
}


def config_builder(arch: str, family=None) -> Callable[[GGUFMeta, int, bool], dict]:
    """The builder for ``arch``: the family registration's ``config_from_gguf`` when it has
    one (``family``: a ``mistralrs_core.plugins.ArchitectureEntry``), else the table's."""
    own = family.load_config_from_gguf() if family is not None else None
    if own is not None:
        return own
    builder = CONFIG_BUILDERS.get(arch)
    if builder is None:
        who = f"family {family.name!r} ({family.plugin}) registers no config_from_gguf and " if family else ""
        raise ValueError(f"GGUF architecture {arch!r} is not supported: {who}no built-in builder exists; "
                         f"built in: {sorted(CONFIG_BUILDERS)}")
    return builder


def hf_config_from_gguf(metadata: Mapping, tensors: Mapping, vocab_size: int, arch: str | None = None,
                        family=None) -> dict:
    """``tensors`` maps GGUF tensor names to ``GGUFTensorInfo`` (shapes and rope factor
    vectors are read from it); ``arch`` defaults to ``general.architecture``; ``family``:
    the registry entry whose ``config_from_gguf`` (if any) builds the config."""
    arch = arch or metadata.get("general.architecture")
    if not isinstance(tensors, Mapping):   # bare names: no shapes or rope vectors to read
        tensors = {name: None for name in tensors}
    builder = config_builder(arch, family)
    tied = "output.weight" not in tensors
    return builder(GGUFMeta(metadata, arch, tensors), vocab_size, tied)
