"""``Which.Plain`` with in-situ quantization, a topology, an importance matrix or UQFF.

The core's safetensors loader hands a Plain load here when any of these is asked for
(``in_situ_quant``, ``topology``, ``organization``, ``from_uqff``, ``write_uqff``,
``imatrix``, ``calibration_file``). The model is built on the meta device as usual, and
the checkpoint streams through the quant hook with ``QuantConfig(kind="isq")``: each
weight is quantized as it arrives (``hook.py``), so the dense model never exists. GGML
types end up exactly as a GGUF file's weights do: ``GGMLQuantMethod`` over the C++
kernels, a float32 residual stream under ``ModelDType.Auto`` on CPU, and the fused decoder
step. ``from_uqff`` streams the shards and the residual instead (``kind="uqff"``), with no
quantization pass; ``write_uqff`` writes them after an ISQ load.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from mistralrs_core.errors import NotAvailableYet
from mistralrs_core.loading.page_release import copy_out_of_files
from mistralrs_core.loading.quant_config import QuantConfig

from .plan import IsqPlan, build_plan
from .types import check_available, parse_isq_type

log = logging.getLogger(__name__)

#: Which fields this loader serves (besides the core Plain ones).
FIELDS = ("topology", "organization", "from_uqff", "write_uqff", "imatrix", "calibration_file")


def _is_moqe(which) -> bool:
    org = getattr(which, "organization", None)
    name = getattr(org, "name", None) or (str(org) if org is not None else "")
    return name.lower() in ("moqe", "moeexpertsonly")


def check_args(which, opts) -> None:
    """Contradictions, refused before any file is read."""
    if getattr(which, "imatrix", None) and getattr(which, "calibration_file", None):
        raise ValueError("imatrix / calibration_file: give one or the other (calibration_file computes an "
                         "importance matrix, imatrix loads one)")
    isq = getattr(opts, "in_situ_quant", None)
    if getattr(which, "from_uqff", None):
        for f, v in (("in_situ_quant", isq), ("write_uqff", which.write_uqff), ("imatrix", which.imatrix),
                     ("calibration_file", which.calibration_file)):
            if v:
                raise ValueError(f"{f}: from_uqff loads already quantized weights; {f} does not apply")
    elif not isq and not getattr(which, "topology", None):
        for f in ("write_uqff", "imatrix", "calibration_file", "organization"):
            if getattr(which, f, None) and (f != "organization" or _is_moqe(which)):
                raise ValueError(f"{f}: needs in-situ quantization (Runner(in_situ_quant=...) or a topology)")


def make_plan(which, opts, model_dir: Path, hf: dict, entry) -> IsqPlan:
    from .topology import load_topology
    topology = load_topology(which.topology) if getattr(which, "topology", None) else None
    default = getattr(opts, "in_situ_quant", None)
    plan = build_plan(default, topology, moqe=_is_moqe(which), family=getattr(entry, "name", None))
    for t in plan.types_used():
        check_available(parse_isq_type(t))
    if getattr(which, "imatrix", None):
        from .imatrix import load_imatrix
        plan.imatrix = load_imatrix(which.imatrix, hf, entry)
    plan.cpp_impl = getattr(opts, "quant_kernel", None)
    return plan


def _load_weights(model, weights, device, where):
    try:
        model.load_weights(weights, device=device)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if str(where) in msg else f"{where}: {msg}") from None
    model.eval()


def keep_dense(model) -> None:
    """Mark the modules a family keeps out of in-situ quantization (``isq_dense_modules()``:
    a vision model's towers and projectors), so the plan gives them no type: upstream's
    vision loaders list only the language model's layers for ISQ and store the rest as
    residual tensors."""
    dense = getattr(model, "isq_dense_modules", None)
    if dense is None:
        return
    for top in dense():
        for module in top.modules():
            module.__dict__["isq_dense"] = True


def count_quantizable(model, plan: IsqPlan) -> int:
    from mistralrs_core.layers.moe import MoEExperts
    n = 0
    for module in model.modules():
        if isinstance(module, MoEExperts):
            # the hook sees one tensor per expert and part
            n += 3 * module.num_experts * (plan.type_for(f"{module.hf_name}.0.gate_proj", module) is not None)
            continue
        if hasattr(module, "set_quant_method") and module.__dict__.get("hf_name"):
            n += plan.type_for(module.hf_name, module) is not None
    return n


def load_isq_model(model_dir: Path, which, opts, device, dtype, compute, plan: IsqPlan | None = None,
                   kind: str = "text"):
    """(model, hf, entry, plan): a Plain checkpoint quantized while it streams in
    (``kind``: the registry kind of its family, "text" or "vision")."""
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_core.loading.weights import assign_prefixes

    hf = load_model_config(model_dir)
    entry = detect_architecture(hf, kind, which.arch)
    if plan is None:
        plan = make_plan(which, opts, model_dir, hf, entry)
        if getattr(which, "calibration_file", None):
            from .imatrix import imatrix_from_calibration
            plan.imatrix = imatrix_from_calibration(model_dir, which, which.calibration_file, hf, entry)
    model = entry.load().from_hf_config(hf, dtype)
    model.quant_compute_dtype = compute
    model.quant_config = QuantConfig(kind="isq", compute_dtype=compute, plan=plan)
    assign_prefixes(model)
    keep_dense(model)
    from .progress import bar
    progress = bar(count_quantizable(model, plan), f"ISQ {plan.default.name if plan.default else 'topology'}")
    plan.tick = lambda: progress.update(1)
    t0 = time.perf_counter()
    weights = SafetensorsWeights(model_dir)
    try:
        _load_weights(model, weights.items(), device, weights.files[0] if len(weights.files) == 1 else model_dir)
    finally:
        progress.close()
        plan.tick = None
    # The small tensors that stayed dense (norms, biases) get their own memory, so nothing
    # views the checkpoint (unless a large layer was kept dense) and the mapping closes
    # with the handles.
    copy_out_of_files(model)
    weights.close()
    model.isq_seconds = time.perf_counter() - t0
    model.family = entry
    return model, hf, entry, plan


def load_uqff_model(model_dir: Path, which, opts, device, dtype, compute, kind: str = "text"):
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from .uqff import RESIDUAL, expand_shards, iter_uqff

    shards = expand_shards(which.from_uqff, model_dir)
    base = shards[0].parent
    cfg_dir = model_dir if (model_dir / "config.json").is_file() else base
    hf = load_model_config(cfg_dir)
    entry = detect_architecture(hf, kind, which.arch)
    residual = base / RESIDUAL
    if not residual.is_file():
        residual = model_dir / RESIDUAL
    if not residual.is_file():
        raise FileNotFoundError(f"from_uqff: no {RESIDUAL} next to {shards[0]} (a UQFF directory needs it)")
    plan = IsqPlan(None)
    plan.cpp_impl = getattr(opts, "quant_kernel", None)
    model = entry.load().from_hf_config(hf, dtype)
    model.quant_compute_dtype = compute
    model.quant_config = QuantConfig(kind="uqff", compute_dtype=compute, plan=plan)
    res = SafetensorsWeights(residual)

    def stream():
        yield from iter_uqff(shards)
        yield from res.items()

    _load_weights(model, stream(), device, shards[0])
    model.family = entry
    return model, hf, entry, cfg_dir


class IsqLoader:
    def check(self, which, opts) -> None:
        """The arguments' contradictions and the ISQ type's name, before any download."""
        check_args(which, opts)
        if opts.in_situ_quant is not None:
            parse_isq_type(opts.in_situ_quant)

    def build_model(self, model_dir: Path, which, opts, device, kind: str = "text"):
        """(model, hf, asset_dir, plan): the model of ``model_dir`` quantized in situ, or
        read from ``which.from_uqff`` (``plan`` None), written out when ``which.write_uqff``
        asks; ``asset_dir`` holds its tokenizer and templates. ``kind="vision"`` is the
        vision loader's call: the family is looked up among vision families, and the fused
        decoder step (built for text decoders) is left out."""
        from ..fused_decoder import install
        from ..gguf_loader import pick_dtypes

        self.check(which, opts)
        dtype, compute = pick_dtypes(which, device)
        t0 = time.perf_counter()
        if which.from_uqff:
            model, hf, entry, asset_dir = load_uqff_model(model_dir, which, opts, device, dtype, compute, kind)
            plan = None
        else:
            model, hf, entry, plan = load_isq_model(model_dir, which, opts, device, dtype, compute, kind=kind)
            asset_dir = model_dir
        model.load_seconds = time.perf_counter() - t0
        if kind == "text":
            install(model)
        if getattr(which, "write_uqff", None):
            from .uqff import shard_stem, write_uqff
            write_uqff(model, which.write_uqff, model_dir, shard_stem(opts.in_situ_quant and
                                                                     parse_isq_type(opts.in_situ_quant).uqff_stem))
        return model, hf, asset_dir, plan

    def load(self, which, opts, name: str):
        from mistralrs_core.loading.hf_config import load_generation_config
        from mistralrs_core.loading.model_loader import make_text_pipeline, reject_unsupported_fields
        from mistralrs_core.loading.options import pick_device
        from mistralrs_core.loading.resolve import resolve_model_dir
        from mistralrs_core.tokenization.chat_template import resolve_chat_template
        from mistralrs_core.tokenization.tokenizer import Tokenizer

        reject_unsupported_fields(which, frozenset(FIELDS))
        self.check(which, opts)   # a bad name fails before any download
        model_dir = resolve_model_dir(which.model_id, hf_cache_path=getattr(which, "hf_cache_path", None),
                                      token_source=opts.token_source)
        device = pick_device(opts.device)
        model, hf, asset_dir, plan = self.build_model(model_dir, which, opts, device)
        tokenizer = Tokenizer.from_dir(asset_dir, tokenizer_json=which.tokenizer_json)
        template = resolve_chat_template(asset_dir, tokenizer, opts.chat_template, opts.jinja_explicit)
        gen_cfg = load_generation_config(asset_dir)
        pipeline_cls = model.family.load_pipeline()
        pipe = make_text_pipeline(name, model, tokenizer, template, hf, gen_cfg, opts, device, pipeline_cls)
        pipe.re_isq = self.re_isq(pipe, model_dir, which, opts, plan)
        return pipe

    def re_isq(self, pipe, model_dir: Path, which, opts, plan, kind: str = "text"):
        """``pipe.re_isq``: what ``Runner.send_re_isq`` calls for a model ``build_model`` made."""
        return _ReIsq(pipe, model_dir, which, opts, plan, fused=kind == "text")


class _ReIsq:
    """``Runner.send_re_isq(dtype)``: re-quantize every quantizable layer from the
    original checkpoint tensors to a new default type (the topology, MoQE and imatrix of
    the load still apply). New methods are built aside, then swapped in and the fused
    decoder step rebuilt; a step already running finishes on the old weights."""

    def __init__(self, pipe, model_dir: Path, which, opts, plan, fused: bool = True):
        self.pipe, self.model_dir, self.which, self.opts, self.plan = pipe, model_dir, which, opts, plan
        self.fused = fused   # rebuild the fused decoder step (text models; build_model's kind)

    def __call__(self, dtype: str) -> None:
        from mistralrs_core.layers.moe import MoEExperts
        from mistralrs_core.loading.safetensors_io import SafetensorsWeights

        from ..fused_decoder import install
        from .hook import quantize_weight

        new_default = parse_isq_type(dtype, "send_re_isq(dtype)")
        if self.plan is None:
            raise NotAvailableYet("send_re_isq on a model loaded from_uqff",
                                  "its original weights are not part of the UQFF directory")
        plan = IsqPlan(new_default, patterns=self.plan.patterns, layers=self.plan.layers, moqe=self.plan.moqe,
                       imatrix=self.plan.imatrix, routers=self.plan.routers)
        check_available(new_default)
        model = self.pipe.model
        weights = SafetensorsWeights(self.model_dir)
        compute = model.quant_config.compute_dtype
        swaps = []
        for module in model.modules():
            if not hasattr(module, "set_quant_method") or not module.__dict__.get("hf_name"):
                continue
            if getattr(module, "fused_parts", None):
                raise NotAvailableYet("send_re_isq on fused layers", "load with the C++ kernels available")
            name = f"{module.hf_name}.weight"
            isq = plan.type_for(module.hf_name, module)
            if isq is None or name not in weights:
                continue
            method = quantize_weight(weights.get(name), parse_isq_type(isq), compute, model.quant_config.device,
                                     plan.imatrix_for(module.hf_name), getattr(self.plan, "cpp_impl", None),
                                     release=True)
            if method is not None:
                swaps.append((module, method))
        expert_swaps = [_requantize_experts(m, plan, weights, compute, model.quant_config.device,
                                            getattr(self.plan, "cpp_impl", None))
                        for m in model.modules() if isinstance(m, MoEExperts)]
        for module, method in swaps:
            module.set_quant_method(method)
        for swap in expert_swaps:
            if swap is not None:
                swap()
        plan.cpp_impl = getattr(self.plan, "cpp_impl", None)
        self.plan = plan
        model.fast_forward = None
        if self.fused:
            install(model)
        changed = getattr(getattr(self.pipe, "engine", None), "weights_changed", None)
        if changed is not None:
            changed()


def _requantize_experts(experts, plan: IsqPlan, weights, compute, device, cpp_impl):
    """The new methods of one MoE layer's experts, read from the checkpoint's per-expert
    tensors; returns the swap to run once every layer is ready (None: the plan leaves the
    experts as they are)."""
    from mistralrs_core.errors import NotAvailableYet
    from mistralrs_core.layers.moe import QuantizedExperts

    from .hook import quantize_weight
    layer = experts.__dict__.get("hf_name")
    first = getattr(experts, "first", 0)
    keys = [(e, p) for e in range(experts.num_experts) for p in ("gate", "up", "down")]
    names = {k: experts.part_names.get((k[0] + first, k[1])) for k in keys}
    types = {k: plan.type_for(n, experts) if n else None for k, n in names.items()}
    if all(t is None for t in types.values()):
        return None
    if any(t is None for t in types.values()):
        raise ValueError(f"send_re_isq: the topology quantizes only some of {layer}'s experts; "
                         "a layer's experts are quantized all or none")
    if any(f"{n}.weight" not in weights for n in names.values()):
        raise NotAvailableYet(f"send_re_isq on {layer}'s experts",
                              "the checkpoint does not store them one tensor per expert")
    parts = {}
    for k, name in names.items():
        method = quantize_weight(weights.get(f"{name}.weight"), parse_isq_type(types[k]), compute, device,
                                 plan.imatrix_for(name), cpp_impl)
        if method is None:
            raise NotAvailableYet(f"send_re_isq to {types[k]} on {layer}'s experts",
                                  "their rows are not whole blocks of that type")
        parts[k] = method
    if isinstance(experts.quant, QuantizedExperts):
        quant = experts.quant
        # One attribute store: a step already running read the old dict and finishes on it.
        return lambda: setattr(quant, "parts", parts)
    if experts.quant is not None:
        raise NotAvailableYet(f"send_re_isq on {layer}'s {type(experts.quant).__name__} experts")
    return lambda: experts.set_quant(QuantizedExperts(experts, parts))
