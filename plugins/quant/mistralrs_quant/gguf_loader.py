"""``Which.GGUF``: a (possibly split) GGUF file becomes a text pipeline.

The file's metadata becomes an HF-style config for the registered family whose GGUF
architecture matches; tensors are handed to the model by their HF names, quantized ones
as ``GGUFQuantizedWeight`` so the shared ``Linear``/``Embedding`` keep them packed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_quant.gguf_config import hf_config_from_gguf
from mistralrs_quant.gguf_names import hf_name, is_offset_norm, needs_unpermute, unpermute_rows
from mistralrs_quant.gguf_reader import GGUFFile, open_gguf
from mistralrs_quant.qlinear import GGUFQuantizedWeight

# Types whose tensors are plain floats: loaded as dense tensors, not quant methods.
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def resolve_gguf_paths(which, opts) -> list[Path]:
    from mistralrs_core.loading.resolve import resolve_file
    names = which.quantized_filename
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("quantized_filename: at least one file is required")
    return [resolve_file(which.quantized_model_id, n, hf_cache_path=getattr(which, "hf_cache_path", None),
                         token_source=opts.token_source) for n in names]


def iter_gguf_weights(gguf: GGUFFile, arch: str, hf_cfg: dict):
    """(hf_name, tensor or GGUFQuantizedWeight) for every tensor the families use."""
    for name, info in gguf.tensors.items():
        target = hf_name(arch, name)
        if target is None:
            if name.startswith("rope_freqs") or name.endswith("attn_rot_embd"):
                continue  # precomputed rope tables: we compute rope ourselves
            raise ValueError(f"GGUF tensor {name!r} has no counterpart in the {arch} family")
        heads_key = needs_unpermute(arch, target)
        if info.type_name in _FLOAT_TYPES:
            value = info.dequantize()
            if heads_key is not None:
                value = value[unpermute_rows(value.shape[0], hf_cfg[heads_key])]
            if is_offset_norm(arch, target):
                value = value - 1.0
        else:
            raw = info.raw_tensor().reshape(info.shape[0], -1)
            if heads_key is not None:
                # Quantized blocks run along a row, so permuting rows keeps them intact.
                raw = raw[unpermute_rows(raw.shape[0], hf_cfg[heads_key])]
            value = GGUFQuantizedWeight(raw, info.ggml_type, info.shape)
        yield target, value


def load_gguf_model(paths, dtype, device="cpu", arch_override=None, quant_compute_dtype=None):
    """(model, hf_config, gguf) for GGUF file(s); the tokenizer is left to the caller.

    ``dtype`` is the residual stream's; ``quant_compute_dtype`` (default: the same) is what
    the quantized matmuls compute in."""
    from mistralrs_core.plugins import get_registry, installed_plugins
    gguf = open_gguf(paths)
    arch = gguf.architecture
    reg = get_registry()
    entry = reg.architecture_for_gguf(arch, "text") if arch_override is None else reg.architecture(arch_override, "text")
    if entry is None:
        known = sorted({a for e in reg.architectures.values() for a in e.gguf_architectures})
        raise ValueError(f"GGUF architecture {arch!r} ({paths[0]}) has no installed family; GGUF "
                         f"architectures known: {', '.join(known)}; installed plugins: "
                         f"{', '.join(installed_plugins())}")
    emb = gguf.tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"GGUF file {paths[0]} has no token_embd.weight tensor")
    hf = hf_config_from_gguf(gguf.metadata, gguf.tensors.keys(), emb.shape[0])
    model = entry.load().from_hf_config(hf, dtype)
    model.quant_compute_dtype = quant_compute_dtype
    model.load_weights(iter_gguf_weights(gguf, arch, hf), device=device)
    model.eval()
    return model, hf, gguf


class GGUFLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.errors import NotAvailableYet
        from mistralrs_core.loading.model_loader import make_text_pipeline, reject_unsupported_fields
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.tokenization.chat_template import resolve_chat_template
        from mistralrs_core.tokenization.tokenizer import Tokenizer
        from mistralrs_quant.gguf_tokenizer import tokenizer_from_gguf

        reject_unsupported_fields(which)
        for field in ("mmproj_filename", "adapters"):
            if getattr(which, field, None):
                raise NotAvailableYet(f"Which.GGUF({field}=...)")
        if opts.in_situ_quant is not None:
            raise NotAvailableYet("in_situ_quant on a GGUF model", "GGUF weights are already quantized")
        paths = resolve_gguf_paths(which, opts)
        device = pick_device(opts.device)
        compute = pick_dtype(which.dtype, device)
        # Auto keeps the residual stream in float32 and runs only the quantized products in
        # the fast dtype: bf16 activations end to end flipped SmolLM2's answer on a 0.08-logit
        # margin, float32 activations with bf16 products did not.
        auto = getattr(which.dtype, "name", "Auto") == "Auto"
        dtype = torch.float32 if auto and device.type == "cpu" else compute
        model, hf, gguf = load_gguf_model(paths, dtype, device, quant_compute_dtype=compute)
        tok_dir = None
        tokenizer_json = getattr(which, "tokenizer_json", None)
        if which.tok_model_id or tokenizer_json:
            from mistralrs_core.loading.resolve import resolve_model_dir
            tok_dir = resolve_model_dir(which.tok_model_id, token_source=opts.token_source) \
                if which.tok_model_id else Path(tokenizer_json).parent
            tokenizer = Tokenizer.from_dir(tok_dir, tokenizer_json=tokenizer_json)
        else:
            tok, info = tokenizer_from_gguf(gguf.metadata)
            extra = [info[k] for k in ("eot_token_id", "eom_token_id") if info.get(k) is not None]
            tokenizer = Tokenizer.from_tokenizers(
                tok, bos_token=info.get("bos_token"), eos_token=info.get("eos_token"),
                unk_token=info.get("unk_token"), pad_token=info.get("pad_token"), add_bos=info["add_bos"],
                add_eos=info["add_eos"], chat_template=info.get("chat_template"), extra_eos_ids=extra)
        template = resolve_chat_template(tok_dir, tokenizer, opts.chat_template, opts.jinja_explicit)
        return make_text_pipeline(name, model, tokenizer, template, hf, {}, opts, device)
