"""Builds text pipelines from a Hugging Face-style directory (config.json + safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch

from mistralrs_core.plugins import get_registry, installed_plugins


def detect_architecture(hf_config: dict, kind: str = "text", arch=None):
    reg = get_registry()
    if arch is not None:
        name = getattr(arch, "name", arch)
        entry = reg.architecture(str(name), kind)
        if entry is None:
            raise ValueError(f"arch: no installed {kind} family {name!r}; known {kind} families: "
                             f"{', '.join(reg.names(kind)) or 'none'}; installed plugins: "
                             f"{', '.join(installed_plugins())}")
        return entry
    entry = reg.architecture_for_hf(hf_config, kind)
    if entry is None:
        from mistralrs_core.plugins import get_plugin_manager
        name = get_plugin_manager().hook.mistralrs_select_architecture(config=hf_config, kind=kind)
        if name:
            entry = reg.architecture(name, kind)
    if entry is None:
        raise ValueError(
            f"unknown model family (model_type={hf_config.get('model_type')!r}, "
            f"architectures={hf_config.get('architectures')}); known {kind} families: "
            f"{', '.join(reg.names(kind)) or 'none'}; installed plugins: {', '.join(installed_plugins())}")
    return entry


def build_text_model(model_dir: Path, arch=None, dtype=torch.float32, device="cpu", kind="text"):
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.quant_config import from_hf_config
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    hf = load_model_config(model_dir)
    entry = detect_architecture(hf, kind, arch)
    cls = entry.load()
    model = cls.from_hf_config(hf, dtype)
    prequantized = from_hf_config(hf)
    if prequantized is not None:
        # Read by CausalLM.load_weights (family overrides of load_weights do not forward
        # extra arguments).
        model.quant_config = prequantized
    weights = SafetensorsWeights(model_dir)
    try:
        model.load_weights(weights.items(), device=device)
    except ValueError as exc:
        # A weight the family does not expect, or of the wrong shape: say which file holds it.
        where = str(weights.files[0] if len(weights.files) == 1 else model_dir)
        msg = str(exc)
        raise ValueError(msg if where in msg else f"{where}: {msg}") from None
    model.eval()
    model.family = entry
    return model, hf


def make_text_pipeline(name: str, model, tokenizer, template, hf_config: dict, generation_config: dict,
                       opts, device: torch.device, pipeline_cls=None):
    """Wire a loaded model to an engine sized by the options (shared by every text loader)."""
    from mistralrs_core.engine import kv_pool
    from mistralrs_core.engine.engine import Engine, EngineConfig
    from mistralrs_core.pipeline.text import TextPipeline
    from mistralrs_core.tokenization.eos import generation_eos_ids

    from mistralrs_core.distributed import placement
    placement.finish_model(model)
    specs = model.kv_cache_specs()
    cache_dtype = kv_pool.cache_dtype(opts.pa_cache_type, model.dtype, specs)
    bs = kv_pool.block_size(opts)
    tokens = kv_pool.pool_tokens(opts, specs, cache_dtype, device, model.max_context_len, model_dtype=model.dtype)
    num_blocks = max(2, -(-tokens // bs))
    if getattr(model, "tensor_parallel", None) is not None:
        from mistralrs_core.distributed.step_channel import tp_pipeline
        # Every rank needs the same pool (block ids travel in the steps); the others serve
        # the forwards rank 0 schedules instead of running an engine.
        num_blocks, worker = tp_pipeline(model, name, num_blocks, bs, device, cache_dtype, opts)
        if worker is not None:
            return worker
    cfg = EngineConfig(max_seqs=opts.max_seqs, block_size=bs, num_blocks=num_blocks,
                       prefix_cache=opts.prefix_cache_n > 0, no_kv_cache=opts.no_kv_cache,
                       max_batch_tokens=opts.max_batch_tokens or 2048, seed=opts.seed,
                       device=str(device), cache_dtype=cache_dtype, max_waiting=opts.max_queue,
                       request_timeout=opts.request_timeout)
    eos = generation_eos_ids(tokenizer, template, generation_config, hf_config)
    engine = Engine(model, tokenizer, cfg, eos, name=name)
    return (pipeline_cls or TextPipeline)(name, model, tokenizer, template, engine, generation_config)


def reject_unsupported_fields(which, supported: frozenset = frozenset()) -> None:
    """A loader refuses the ``Which`` fields it cannot honour (``supported``: those it
    does) unless a plugin provides their capability (``mistralrs_core.capabilities``)."""
    from mistralrs_core.capabilities import check_which
    check_which(which, supported)


#: What a Plain load may ask of a quantization plugin (Runner option, then Which fields).
QUANT_WHICH_FIELDS = ("topology", "organization", "from_uqff", "write_uqff", "imatrix", "calibration_file")


def quant_requested(which, opts) -> bool:
    return bool(getattr(opts, "in_situ_quant", None)) or any(getattr(which, f, None) for f in QUANT_WHICH_FIELDS)


def quantizing_loader(which, opts):
    """The plugin loader registered as "isq" when this load asks for in-situ quantization,
    a topology, an importance matrix or UQFF (None: a dense load; without the plugin the
    capability gate has already refused those arguments). The vision loader asks it too:
    the plugin then builds the model and the vision loader the rest of the pipeline."""
    if not quant_requested(which, opts):
        return None
    entry = get_registry().loaders.get("isq")
    return entry.load()() if entry is not None else None


class SafetensorsLoader:
    """``Which.Plain``: a local or hub directory with config.json, safetensors and tokenizer."""

    def load(self, which, opts, name: str):
        delegate = quantizing_loader(which, opts)
        if delegate is not None:
            return delegate.load(which, opts, name)
        reject_unsupported_fields(which)
        from mistralrs_core.loading.hf_config import load_generation_config
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.loading.resolve import resolve_model_dir
        from mistralrs_core.tokenization.chat_template import resolve_chat_template
        from mistralrs_core.tokenization.tokenizer import Tokenizer

        model_dir = resolve_model_dir(which.model_id, hf_cache_path=getattr(which, "hf_cache_path", None),
                                      token_source=opts.token_source)
        device = pick_device(opts.device)
        dtype = pick_dtype(which.dtype, device)
        tokenizer = Tokenizer.from_dir(model_dir, tokenizer_json=which.tokenizer_json)
        model, hf = build_text_model(model_dir, arch=which.arch, dtype=dtype, device=device)
        template = resolve_chat_template(model_dir, tokenizer, opts.chat_template, opts.jinja_explicit)
        gen_cfg = load_generation_config(model_dir)
        # A family may bring its own pipeline (e.g. one that turns image parts into features).
        pipeline_cls = model.family.load_pipeline()
        return make_text_pipeline(name, model, tokenizer, template, hf, gen_cfg, opts, device, pipeline_cls)
