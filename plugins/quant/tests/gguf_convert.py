"""Write tiny transformers models as GGUF files the way llama.cpp's converter lays them out
(tensor names, metadata keys, value transforms), and as legacy GGML files.

Every writer returns the values the file holds, mapped back to HF parameter names
(``hf_values``): after quantization they differ from the model's own, and a reference
model given exactly these values must agree with the loaded file to float rounding.
This module is the test's own, independent statement of the formats: it shares no
name tables or transforms with the loader it checks.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import dequantize, quantize

# ---------------------------------------------------------------- GGUF tensors

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
           "model.final_layernorm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
_ARCH_BLOCK = {
    "phi2": {"self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
    "starcoder2": {"mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "gemma2": _SANDWICH, "gemma3": _SANDWICH,
}
PERMUTED = ("llama", "smollm3")
GEMMA = ("gemma", "gemma2", "gemma3")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class Entry:
    name: str                         # GGUF name
    value: torch.Tensor               # float32, GGUF layout
    sources: list = field(default_factory=list)   # (hf_name, (row0, row1))
    perm: torch.Tensor | None = None  # GGUF row i holds HF row perm[i]
    offset: float = 0.0               # added to the HF values (Gemma norms)


def llama_permutation(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K reordering (rotate-half -> adjacent pairs) as a row index."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _heads(cfg):
    nh = cfg.num_attention_heads
    return nh, getattr(cfg, "num_key_value_heads", None) or nh


def gguf_entries(arch: str, model, cfg, fuse_qkv: bool = True) -> list[Entry]:
    """``fuse_qkv=False``: Phi-2 as converted from today's HF checkpoint (separate q/k/v)
    rather than from Microsoft's original fused one."""
    fuse = arch == "phi2" and fuse_qkv
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    nh, nkv = _heads(cfg)
    out = []
    for name, value in sd.items():
        if "rotary_emb" in name:
            continue
        m = _LAYER.match(name)
        if m is None:
            base, kind = name.rsplit(".", 1)
            gname = f"{_GLOBAL[base]}.{kind}"
        else:
            layer, part, kind = m.groups()
            if fuse and part in ("self_attn.k_proj", "self_attn.v_proj"):
                continue   # fused into attn_qkv with q below
            if fuse and part == "self_attn.q_proj":
                parts = [sd[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                bounds = np.cumsum([0] + [p.shape[0] for p in parts])
                srcs = [(f"model.layers.{layer}.self_attn.{p}_proj.{kind}", (int(bounds[i]), int(bounds[i + 1])))
                        for i, p in enumerate("qkv")]
                out.append(Entry(f"blk.{layer}.attn_qkv.{kind}", torch.cat(parts), srcs))
                continue
            gpart = _ARCH_BLOCK.get(arch, {}).get(part) or _BLOCK[part]
            gname = f"blk.{layer}.{gpart}.{kind}"
        e = Entry(gname, value, [(name, (0, value.shape[0]))])
        if arch in PERMUTED and re.search(r"self_attn\.[qk]_proj\.", name):
            e.perm = llama_permutation(value.shape[0], nh if ".q_proj." in name else nkv)
            e.value = value[e.perm]
        if arch in GEMMA and name.endswith("norm.weight"):
            e.offset = 1.0
            e.value = value + 1.0
        out.append(e)
    return out


def pick_type(name: str, value: torch.Tensor, qtype: str) -> T:
    """Per-tensor type for a file of ``qtype``, falling back as llama.cpp's quantizer does
    when a row is not a whole number of blocks; 1-D tensors stay F32."""
    if qtype == "F32" or value.dim() != 2:
        return T.F32
    want = T[qtype]
    if qtype == "Q4_K" and name.split(".")[0] in ("token_embd", "output"):
        want = T.Q6_K   # the Q4_K_M mix: embeddings and output at 6 bits
    for t in (want, T.Q8_0):
        if value.shape[1] % gguf.GGML_QUANT_SIZES[t][0] == 0:
            return t
    return T.F32


def stored(value: torch.Tensor, qtype: T):
    """(array to write, float32 values the file then holds)."""
    if qtype == T.F32:
        return value.numpy().astype(np.float32), value
    if qtype == T.F16:
        half = value.half()
        return half.numpy(), half.float()
    raw = quantize(value, qtype)
    return raw.numpy(), dequantize(raw, qtype).reshape(value.shape)


def back_to_hf(e: Entry, held: torch.Tensor) -> dict:
    if e.offset:
        held = held - e.offset
    if e.perm is not None:
        hf = torch.empty_like(held)
        hf[e.perm] = held
        held = hf
    return {name: held[r0:r1] for name, (r0, r1) in e.sources}


# ---------------------------------------------------------------- GGUF metadata

def rope_params(cfg, layer_type: str = "full_attention") -> dict:
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    return dict(rp.get(layer_type) or {}) if layer_type in rp else rp


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def llama3_rope_factors(cfg) -> list[float] | None:
    """llama.cpp stores Llama 3.1's rope scaling as one divisor per rotary frequency."""
    rp = rope_params(cfg)
    if rp.get("rope_type") != "llama3":
        return None
    dim, base = head_dim(cfg), rp["rope_theta"]
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_metadata(w: gguf.GGUFWriter, arch: str, cfg) -> list[tuple[str, torch.Tensor]]:
    """The keys llama.cpp's converter writes for ``arch``; returns extra (rope) tensors."""
    nh, nkv = _heads(cfg)
    hd, rp = head_dim(cfg), rope_params(cfg)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(nh)
    extra = []
    if arch == "phi2":
        # Phi-2's converter: 4 * hidden, MHA, LayerNorm eps, partial rotary, no rope base.
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_head_count_kv(nh)
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_rope_dimension_count(int(rp["partial_rotary_factor"] * cfg.hidden_size) // nh)
        w.add_add_bos_token(False)
        return extra
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count_kv(nkv)
    if arch == "starcoder2":
        w.add_layer_norm_eps(cfg.norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch not in ("gemma", "gemma2"):
        w.add_rope_freq_base(rope_params(cfg, "full_attention")["rope_theta"] if arch == "gemma3"
                             else rp["rope_theta"])
    if arch in ("llama", "smollm3", "qwen3") or arch in GEMMA:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch in ("llama", "smollm3"):
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(hd)
        factors = llama3_rope_factors(cfg)
        if factors is not None:
            extra.append(("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "phi3":
        orig = (rp.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
                or cfg.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // nh)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rp.get("rope_type") == "longrope":
            scale = cfg.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            extra += [("rope_factors_long.weight", torch.tensor(rp["long_factor"], dtype=torch.float32)),
                      ("rope_factors_short.weight", torch.tensor(rp["short_factor"], dtype=torch.float32))]
    return extra


# ---------------------------------------------------------------- tokenizers

NORMAL, CONTROL, BYTE, UNKNOWN = 1, 3, 6, 2


def gpt2_vocab(size: int):
    """A byte-level BPE vocabulary of exactly ``size`` tokens: 256 bytes, merges learned
    from a small text, then control tokens (the last is the end-of-text token)."""
    from mistralrs_quant.gguf_tokenizer import bytes_to_unicode
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    text = "the cat sat on the mat. the dog ate the hat. hello world, hello there!"
    words = [[alphabet[b] for b in (w if i == 0 else " " + w).encode()] for i, w in enumerate(text.split())]
    merges = []
    n_special = 3
    while len(tokens) + n_special < size:
        counts = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i:i + 2] = [best[0] + best[1]]
                i += 1
    specials = [f"<|reserved_{i}|>" for i in range(size - len(tokens) - 1)] + ["<|endoftext|>"]
    types = [NORMAL] * len(tokens) + [CONTROL] * len(specials)
    return tokens + specials, merges, types


def add_gpt2_tokenizer(w: gguf.GGUFWriter, size: int) -> dict:
    tokens, merges, types = gpt2_vocab(size)
    eos = len(tokens) - 1
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    return {"tokens": tokens, "eos": eos}


# ---------------------------------------------------------------- GGUF files

def write_gguf(path, arch: str, model, cfg, qtype: str = "F32", *, tokenizer_size: int | None = None,
               split_max_tensors: int = 0, fuse_qkv: bool = True) -> dict:
    """Write ``model`` as ``arch``; returns {hf_name: values the file holds}."""
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name("tiny")
    extra = write_metadata(w, arch, cfg)
    if tokenizer_size:
        add_gpt2_tokenizer(w, tokenizer_size)
    hf_values = {}
    for name, value in extra:
        w.add_tensor(name, value.numpy())
    for e in gguf_entries(arch, model, cfg, fuse_qkv):
        t = pick_type(e.name, e.value, qtype)
        array, held = stored(e.value, t)
        w.add_tensor(e.name, array, raw_dtype=None if t == T.F32 else t)
        hf_values.update(back_to_hf(e, held))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf_values


def set_values(model, hf_values: dict) -> None:
    """Give ``model`` (a transformers model) exactly the values a file holds."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in hf_values:
                p.copy_(hf_values[name].reshape(p.shape))


# ---------------------------------------------------------------- legacy GGML files

GGML_MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
_GGML_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
}


def spm_vocab_bytes(pieces: list[str]) -> list[bytes]:
    """A SentencePiece vocabulary as llama.cpp's converter stored it in GGML files."""
    out = []
    for p in pieces:
        if p == "<unk>":
            out.append(" \u2047 ".encode())
        elif p in ("<s>", "</s>"):
            out.append(b"")
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", p):
            out.append(bytes([int(p[3:5], 16)]))
        else:
            out.append(p.replace("\u2581", " ").encode())
    return out


def ggml_tensors(model, cfg, types: dict) -> list[tuple[str, torch.Tensor, T, dict]]:
    """(GGML name, value, type, hf_values) for a LLaMA model; ``types`` maps a name
    fragment to the type of the 2-D tensors whose name contains it."""
    nh, nkv = _heads(cfg)
    out = []
    for name, value in model.state_dict().items():
        value = value.detach().float().clone()
        m = _LAYER.match(name)
        if m is None:
            base = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        else:
            base = f"layers.{m[1]}.{_GGML_LAYER[m[2]]}.{m[3]}"
        perm = None
        if ".q_proj." in name or ".k_proj." in name:
            perm = llama_permutation(value.shape[0], nh if ".q_proj." in name else nkv)
            value = value[perm]
        t = T.F32
        if value.dim() == 2:
            t = next((v for k, v in types.items() if k in base), T.F32)
        array, held = stored(value, t)
        e = Entry(base, value, [(name, (0, value.shape[0]))], perm)
        out.append((base, array, t, back_to_hf(e, held)))
    return out


def write_ggml(path, model, cfg, pieces: list[str], scores: list[float], types: dict, *,
               magic: str = "ggjt", version: int = 3, n_mult: int = 256) -> dict:
    """A legacy llama.cpp file of ``model`` (a LLaMA); returns {hf_name: held values}."""
    buf = bytearray(struct.pack("<I", GGML_MAGIC[magic]))
    if magic != "ggml":
        buf += struct.pack("<I", version)
    hd = head_dim(cfg)
    buf += struct.pack("<7I", len(pieces), cfg.hidden_size, n_mult, cfg.num_attention_heads,
                       cfg.num_hidden_layers, hd, 1)
    for tok, score in zip(spm_vocab_bytes(pieces), scores):
        buf += struct.pack("<I", len(tok)) + tok
        if magic != "ggml":
            buf += struct.pack("<f", score)
    hf_values = {}
    for name, array, t, held in ggml_tensors(model, cfg, types):
        dims = list(reversed(array.shape[:-1])) if t != T.F32 and t != T.F16 else list(reversed(array.shape))
        if t not in (T.F32, T.F16):
            dims = [array.shape[-1] // gguf.GGML_QUANT_SIZES[t][1] * gguf.GGML_QUANT_SIZES[t][0]] + dims
        enc = name.encode()
        buf += struct.pack("<3I", len(dims), len(enc), int(t)) + struct.pack(f"<{len(dims)}I", *dims) + enc
        if magic == "ggjt":
            buf += b"\0" * (-len(buf) % 32)
        buf += np.ascontiguousarray(array).tobytes()
        hf_values.update(held)
    with open(path, "wb") as f:
        f.write(bytes(buf))
    return hf_values


def patch_bytes(path, offset: int, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes of the file at ``offset`` (to damage test files)."""
    buf = bytearray(path.read_bytes())
    buf[offset:offset + len(data)] = data
    path.write_bytes(bytes(buf))


def gguf_tensor_record(path, name: bytes) -> int:
    """Offset just past a tensor's name in its GGUF tensor-info record."""
    buf = path.read_bytes()
    return buf.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
