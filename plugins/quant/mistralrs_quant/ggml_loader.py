"""``Which.GGML``: a legacy llama.cpp model file (LLaMA layout) becomes a text pipeline.

The file is presented as a GGUF ``llama`` model (its hyperparameters as ``llama.*``
metadata, its vocabulary as ``tokenizer.ggml.*``, its tensors under GGUF names), so the
GGUF path does the rest: Q/K un-permutation, packed quantized weights, the tokenizer.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mistralrs_quant.ggml_reader import GGMLFile, open_ggml
from mistralrs_quant.gguf_loader import build_gguf_model, finish_pipeline
from mistralrs_quant.gguf_reader import GGUFFile
from mistralrs_quant.gguf_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN

# Settings a GGML file does not record, at the values llama.cpp and mistral.rs assumed.
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
CONTEXT_LENGTH = 4096

_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_BLOCK = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
# How llama.cpp's converters wrote SentencePiece's unknown piece.
_UNK_TEXT = " \u2047 ".encode()


def _gguf_name(path: Path, name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER.match(name)
    if m is None or m[2] not in _BLOCK:
        raise ValueError(f"{path}: tensor '{name}' is not part of the LLaMA layout GGML files use")
    return f"blk.{m[1]}.{_BLOCK[m[2]]}"


def spm_vocab(tokens: list[bytes]) -> tuple[list[str], list[int]]:
    """Pieces and token types from a GGML vocabulary.

    The converters wrote SentencePiece pieces with '▁' as a space, control tokens as empty
    strings, byte tokens as the raw byte and the unknown piece as ' ⁇ '; this undoes that."""
    pieces, types = [], []
    for i, t in enumerate(tokens):
        if t == _UNK_TEXT:
            pieces.append("<unk>"), types.append(UNKNOWN)
        elif t == b"":
            pieces.append({1: "<s>", 2: "</s>"}.get(i, f"<control_{i}>")), types.append(CONTROL)
        elif len(t) == 1 and t[0] == i - 3:   # LLaMA puts <0x00>..<0xFF> at ids 3..258
            pieces.append(f"<0x{t[0]:02X}>"), types.append(BYTE)
        else:
            pieces.append(t.decode("utf-8", errors="replace").replace(" ", "\u2581")), types.append(NORMAL)
    return pieces, types


def ggml_as_gguf(f: GGMLFile, gqa: int = 1) -> GGUFFile:
    hp, path = f.hparams, f.path
    if gqa < 1 or hp.n_head % gqa:
        raise ValueError(f"gqa: {gqa} does not divide the {hp.n_head} attention heads of {path}")
    head_dim = hp.n_embd // hp.n_head
    if hp.n_rot != head_dim:
        raise ValueError(f"{path}: n_rot {hp.n_rot} differs from the head size {head_dim}; "
                         "partial rotary LLaMA files are not supported")
    tensors = {}
    for name, info in f.tensors.items():
        new = _gguf_name(path, name)
        tensors[new] = dataclasses.replace(info, name=new)
    n_kv = hp.n_head // gqa
    wk = tensors.get("blk.0.attn_k.weight")
    if wk is not None and wk.shape[0] != n_kv * head_dim:
        hint = f"; pass gqa={hp.n_embd // wk.shape[0]}" if wk.shape[0] and hp.n_embd % wk.shape[0] == 0 else ""
        raise ValueError(f"{path}: layers.0.attention.wk.weight has {wk.shape[0]} rows but gqa={gqa} means "
                         f"{n_kv} key/value heads of {head_dim} ({n_kv * head_dim} rows){hint}")

    pieces, types = spm_vocab(f.tokens)
    md = {
        "general.architecture": "llama",
        "llama.block_count": hp.n_layer, "llama.embedding_length": hp.n_embd,
        # The FFN tensors' own shape wins where they disagree (70B conversions).
        "llama.feed_forward_length": hp.n_ff,
        "llama.attention.head_count": hp.n_head, "llama.attention.head_count_kv": n_kv,
        "llama.rope.dimension_count": hp.n_rot, "llama.rope.freq_base": ROPE_THETA,
        "llama.attention.layer_norm_rms_epsilon": RMS_NORM_EPS, "llama.context_length": CONTEXT_LENGTH,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": f.scores if f.scores is not None else [0.0] * len(pieces),
        "tokenizer.ggml.add_bos_token": True,
    }
    for role, i in (("unknown", 0), ("bos", 1), ("eos", 2)):
        if i < len(types) and types[i] in (UNKNOWN, CONTROL):
            md[f"tokenizer.ggml.{role}_token_id"] = i
    return GGUFFile([path], f.version, md, tensors)


def load_ggml_model(path, dtype, gqa: int = 1, device="cpu", quant_compute_dtype=None):
    """(model, hf_config, gguf view of the file); the tokenizer is left to the caller."""
    gguf = ggml_as_gguf(open_ggml(path), gqa)
    model, hf = build_gguf_model(gguf, dtype, device, quant_compute_dtype=quant_compute_dtype)
    return model, hf, gguf


class GGMLLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.errors import NotAvailableYet
        from mistralrs_core.loading.model_loader import reject_unsupported_fields
        from mistralrs_core.loading.resolve import resolve_file

        reject_unsupported_fields(which)
        if opts.in_situ_quant is not None:
            raise NotAvailableYet("in_situ_quant on a GGML model", "GGML weights are already quantized")
        path = resolve_file(which.quantized_model_id, which.quantized_filename, token_source=opts.token_source)
        gguf = ggml_as_gguf(open_ggml(path), 1 if which.gqa is None else which.gqa)
        return finish_pipeline(which, opts, name, gguf)
