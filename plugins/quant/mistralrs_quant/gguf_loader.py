"""``Which.GGUF``: a (possibly split) GGUF file becomes a text pipeline.

The file's metadata becomes an HF-style config for the registered family whose GGUF
architecture matches; tensors are handed to the model by their HF names, quantized ones
as ``GGUFQuantizedWeight``; under ``QuantConfig(kind="gguf")`` the quant hook
(``qlinear.gguf_quant_method``) keeps them packed in the shared ``Linear``/``Embedding``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from mistralrs_core.loading.quant_config import QuantConfig

from mistralrs_quant.gguf_config import hf_config_from_gguf
from mistralrs_quant.gguf_names import Target, hf_targets, is_offset_norm, needs_unpermute, unpermute_rows
from mistralrs_quant.gguf_reader import GGUFFile, GGUFTensorInfo, open_gguf
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


def _tensor_value(info: GGUFTensorInfo, arch: str, target: Target, hf_cfg: dict, quant_kernel=None):
    heads_key = needs_unpermute(arch, target.name)
    if info.type_name in _FLOAT_TYPES or len(info.shape) != 2:
        value = info.dequantize()
        if target.rows is not None:
            value = value[target.rows[0]:target.rows[1]]
        if heads_key is not None:
            value = value[unpermute_rows(value.shape[0], hf_cfg[heads_key])]
        if is_offset_norm(arch, target.name):
            value = value - 1.0
        return value
    # Quantized blocks run along a row, so slicing or permuting rows keeps them intact.
    raw = info.raw_tensor().reshape(info.shape[0], -1)
    if target.rows is not None:
        raw = raw[target.rows[0]:target.rows[1]]
    if heads_key is not None:
        raw = raw[unpermute_rows(raw.shape[0], hf_cfg[heads_key])]
    return GGUFQuantizedWeight(raw, info.ggml_type, (raw.shape[0], info.shape[1]), cpp_impl=quant_kernel)


def iter_gguf_weights(gguf: GGUFFile, arch: str, hf_cfg: dict, quant_kernel: str | None = None):
    """(hf_name, tensor or GGUFQuantizedWeight) for every tensor the families use;
    ``quant_kernel``: the C++ kernel variant of the quantized ones (``Runner(quant_kernel=)``)."""
    for name, info in gguf.tensors.items():
        targets = hf_targets(arch, name, hf_cfg)
        if targets is None:
            raise ValueError(f"GGUF tensor {name!r} has no counterpart in the {arch} family")
        for target in targets:
            yield target.name, _tensor_value(info, arch, target, hf_cfg, quant_kernel)


def _family(arch: str | None, arch_override: str | None, where: Path):
    from mistralrs_core.plugins import get_registry, installed_plugins
    reg = get_registry()
    entry = (reg.architecture_for_gguf(arch, "text") if arch_override is None
             else reg.architecture(arch_override, "text"))
    if entry is None:
        known = sorted({a for e in reg.architectures.values() for a in e.gguf_architectures})
        wanted = f"architecture {arch_override!r}" if arch_override else f"GGUF architecture {arch!r}"
        raise ValueError(f"{where}: {wanted} has no installed family; GGUF architectures known: "
                         f"{', '.join(known)}; installed plugins: {', '.join(installed_plugins())}")
    return entry


def build_gguf_model(gguf: GGUFFile, dtype, device="cpu", arch_override=None, quant_compute_dtype=None,
                     quant_kernel: str | None = None):
    """(model, hf_config) from an opened GGUF (or a legacy GGML file presented as one)."""
    where = gguf.paths[0]
    arch = gguf.architecture
    entry = _family(arch, arch_override, where)
    try:
        emb = gguf.tensors.get("token_embd.weight")
        if emb is None:
            raise ValueError("the file has no token_embd.weight tensor")
        hf = hf_config_from_gguf(gguf.metadata, gguf.tensors, emb.shape[0], arch, family=entry)
        model = entry.load().from_hf_config(hf, dtype)
        model.quant_compute_dtype = quant_compute_dtype
        # Set on the model, not passed: families that wrap ``load_weights`` (MoE) take only
        # (weights, device). The packed blocks reach the layers through the quant hook.
        model.quant_config = QuantConfig(kind="gguf", compute_dtype=quant_compute_dtype or dtype)
        model.load_weights(iter_gguf_weights(gguf, arch, hf, quant_kernel), device=device)
    except ValueError as exc:
        # One message that names the file, not a chain pointing into the loader.
        msg = str(exc)
        raise ValueError(msg if str(where) in msg else f"{where}: {msg}") from None
    model.eval()
    from mistralrs_quant.fused_decoder import install
    install(model)
    return model, hf


def load_gguf_model(paths, dtype, device="cpu", arch_override=None, quant_compute_dtype=None):
    """(model, hf_config, gguf) for GGUF file(s); the tokenizer is left to the caller.

    ``dtype`` is the residual stream's; ``quant_compute_dtype`` (default: the same) is what
    the quantized matmuls compute in."""
    gguf = open_gguf(paths)
    model, hf = build_gguf_model(gguf, dtype, device, arch_override, quant_compute_dtype)
    return model, hf, gguf


def pick_dtypes(which, device):
    """(residual dtype, quantized-product dtype) for a quantized-file loader."""
    from mistralrs_core.loading.options import pick_dtype
    compute = pick_dtype(which.dtype, device)
    # Auto keeps the residual stream in float32 and runs only the quantized products in
    # the fast dtype: bf16 activations end to end flipped SmolLM2's answer on a 0.08-logit
    # margin, float32 activations with bf16 products did not.
    # With the C++ kernels (qlinear's "cpp" path) decode-sized products are float32-exact
    # whatever the compute dtype; it then only applies to prefill-sized ones.
    auto = getattr(which.dtype, "name", "Auto") == "Auto"
    return (torch.float32 if auto and device.type == "cpu" else compute), compute


def load_tokenizer(which, opts, metadata: dict, where: Path):
    """(tokenizer, tokenizer dir or None): ``tok_model_id`` / ``tokenizer_json`` win over
    the vocabulary in the file's metadata."""
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    from mistralrs_quant.gguf_tokenizer import tokenizer_from_gguf

    tokenizer_json = getattr(which, "tokenizer_json", None)
    if which.tok_model_id or tokenizer_json:
        from mistralrs_core.loading.resolve import resolve_model_dir
        tok_dir = resolve_model_dir(which.tok_model_id, token_source=opts.token_source) \
            if which.tok_model_id else Path(tokenizer_json).parent
        return Tokenizer.from_dir(tok_dir, tokenizer_json=tokenizer_json), tok_dir
    try:
        tok, info = tokenizer_from_gguf(metadata)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}; pass tok_model_id= (a directory or hub id with tokenizer.json) "
                         f"or tokenizer_json=") from None
    extra = [info[k] for k in ("eot_token_id", "eom_token_id") if info.get(k) is not None]
    tokenizer = Tokenizer.from_tokenizers(
        tok, bos_token=info.get("bos_token"), eos_token=info.get("eos_token"),
        unk_token=info.get("unk_token"), pad_token=info.get("pad_token"), add_bos=info["add_bos"],
        add_eos=info["add_eos"], chat_template=info.get("chat_template"), extra_eos_ids=extra)
    return tokenizer, None


def check_quant_kernel(value: str | None) -> str | None:
    """The ``quant_kernel`` load option, validated before any weight is read."""
    from mistralrs_quant.kernels.cpp import IMPLS
    if value is not None and value not in IMPLS:
        raise ValueError(f"quant_kernel: unknown C++ kernel variant {value!r} (one of {', '.join(IMPLS)})")
    return value


def finish_pipeline(which, opts, name: str, gguf: GGUFFile):
    """Cheap checks first (a family for the architecture, a tokenizer), then weights, then
    the engine: a file that cannot serve fails before any weight is read."""
    from mistralrs_core.loading.model_loader import make_text_pipeline
    from mistralrs_core.loading.options import pick_device
    from mistralrs_core.tokenization.chat_template import resolve_chat_template

    _family(gguf.architecture, None, gguf.paths[0])
    tokenizer, tok_dir = load_tokenizer(which, opts, gguf.metadata, gguf.paths[0])
    device = pick_device(opts.device)
    dtype, compute = pick_dtypes(which, device)
    model, hf = build_gguf_model(gguf, dtype, device, quant_compute_dtype=compute,
                                 quant_kernel=check_quant_kernel(getattr(opts, "quant_kernel", None)))
    # The header and the bytes of tensors the model copied (fused, dequantized) were read
    # once; their pages would otherwise stay in the RSS next to the copies.
    gguf.release_unused_pages()
    try:
        template = resolve_chat_template(tok_dir, tokenizer, opts.chat_template, opts.jinja_explicit)
    except ValueError as exc:   # the template in the file's metadata does not compile
        raise ValueError(f"{gguf.paths[0]}: {exc}") from None
    return make_text_pipeline(name, model, tokenizer, template, hf, {}, opts, device)


class GGUFLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.errors import NotAvailableYet
        from mistralrs_core.loading.model_loader import reject_unsupported_fields

        reject_unsupported_fields(which)
        for field in ("mmproj_filename", "adapters"):
            if getattr(which, field, None):
                raise NotAvailableYet(f"Which.GGUF({field}=...)")
        if opts.in_situ_quant is not None:
            raise NotAvailableYet("in_situ_quant on a GGUF model", "GGUF weights are already quantized")
        return finish_pipeline(which, opts, name, open_gguf(resolve_gguf_paths(which, opts)))
