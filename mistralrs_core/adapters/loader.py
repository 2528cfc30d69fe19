"""``Which.Lora`` / ``LoraGGUF`` / ``LoraGGML`` / ``XLora`` / ``XLoraGGUF`` / ``XLoraGGML``.

The base model loads through whichever loader serves the matching plain variant (``Plain``,
``GGUF``, ``GGML``: the core, the quant plugin), then the adapters are read, checked
against its layers and attached (``attach_lora`` / ``attach_xlora``).
"""
from __future__ import annotations

from pathlib import Path

import attrs

from mistralrs_core.adapters.lora import AdapterRuntime
from mistralrs_core.adapters.ordering import Ordering, adapter_dir, is_adapter_dir, read_ordering
from mistralrs_core.adapters.weights import AdapterWeights, linear_modules, load_adapter

_BASE = {"Lora": "Plain", "XLora": "Plain", "LoraGGUF": "GGUF", "XLoraGGUF": "GGUF",
         "LoraGGML": "GGML", "XLoraGGML": "GGML"}


def base_which(which, model_id: str | None = None):
    """The plain variant loading the same base (fields copied by name)."""
    from mistralrs_core.api.which import Which
    cls = getattr(Which, _BASE[type(which).__name__])
    kwargs = {}
    for f in attrs.fields(cls):
        if hasattr(which, f.name):
            kwargs[f.name] = getattr(which, f.name)
    if cls.__name__ == "Plain":
        kwargs["model_id"] = model_id
    return cls(**kwargs)


def _resolve(model_id: str, which, opts, field: str) -> Path:
    from mistralrs_core.loading.resolve import resolve_model_dir
    try:
        return resolve_model_dir(model_id, hf_cache_path=getattr(which, "hf_cache_path", None),
                                 token_source=opts.token_source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{field}: {exc}") from None


@attrs.define
class AdapterPlan:
    sources: list[tuple[str, Path]]     # (name, directory), in ordering order
    default: list[str]                  # active when a request names none
    ordering: Ordering | None = None


def lora_plan(which, opts) -> AdapterPlan:
    name = type(which).__name__
    order_path = getattr(which, "order", None)
    root_id = getattr(which, "adapter_model_id", None) or getattr(which, "adapters_model_id", None)
    field = "adapter_model_id" if name == "Lora" else "adapters_model_id"
    sources: list[tuple[str, Path]] = []
    default: list[str] = []
    ordering = None
    if order_path:
        ordering = read_ordering(order_path)
        if isinstance(root_id, list):
            raise ValueError(f"{field}: with an ordering file, one directory holding the adapters")
        if ordering.order:
            if not root_id:
                raise ValueError(f"{field}: required: the ordering file names adapters under it")
            root = _resolve(root_id, which, opts, field)
            for n in ordering.order:
                sources.append((n, adapter_dir(root, n, f"{field} ({order_path})")))
        default = list(ordering.order)
        for n, mid in ordering.preload:
            d = _resolve(mid, which, opts, f"preload_adapters[{n}]")
            sources.append((n, d if is_adapter_dir(d) else adapter_dir(d, n, f"preload_adapters[{n}]")))
    elif root_id:
        for mid in ([root_id] if isinstance(root_id, str) else root_id):
            d = _resolve(mid, which, opts, field)
            if not is_adapter_dir(d):
                raise FileNotFoundError(f"{field}: {d} holds no adapter_config.json; pass order= (an ordering "
                                        f"file) naming the adapters under it")
            sources.append((d.name, d))
            default.append(d.name)
    for a in getattr(which, "adapters", None) or []:
        d = _resolve(a.source, which, opts, f"adapters[{a.alias}]")
        sources.append((a.alias, d if is_adapter_dir(d) else adapter_dir(d, a.alias, f"adapters[{a.alias}]")))
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: two adapters are named {sorted({n for n in names if names.count(n) > 1})}")
    if not sources:
        raise ValueError(f"{field}: no adapters to load")
    limit = getattr(which, "max_adapters", None)
    if limit is not None and len(sources) > limit:
        raise ValueError(f"max_adapters: {len(sources)} adapters exceed the limit of {limit}")
    return AdapterPlan(sources, default, ordering)


def _weight_index(model):
    from mistralrs_core.loading.weights import weight_index
    return linear_modules(model, weight_index(model))


def load_adapters(model, sources, which=None) -> tuple[list[AdapterWeights], dict]:
    linears = _weight_index(model)
    adapters = [load_adapter(n, d, model, linears) for n, d in sources]
    max_rank = getattr(which, "max_rank", None)
    for a in adapters:
        for u in a.updates.values():
            if max_rank is not None and u.A.shape[0] > max_rank:
                raise ValueError(f"max_rank: adapter {a.name!r} has rank {u.A.shape[0]} > {max_rank}")
    return adapters, linears


def attach_lora(model, sources: list[tuple[str, Path]], default: list[str], merge: bool | None = None,
                which=None) -> AdapterRuntime:
    """Read the adapters, check them against ``model`` and attach them. ``merge=None``: merge
    when one adapter is all there is, it serves every request, and its layers are dense."""
    adapters, linears = load_adapters(model, sources, which)
    if merge is None:
        merge = (len(adapters) == 1 and default == [adapters[0].name] and all(
            getattr(linears[m][0], "qmethod", None) is None and linears[m][0].weight is not None
            for m in list(adapters[0].updates) + list(adapters[0].biases) + list(adapters[0].weights)))
    elif merge and len(adapters) != 1:
        raise ValueError("merge: only one adapter can be merged into the weights")
    runtime = AdapterRuntime(model, adapters, default)
    runtime.install(adapters, linears, merge)
    model.adapters = runtime
    return runtime


def attach_xlora(model, root: Path, ordering: Ordering, tgt_non_granular_index: int | None):
    from mistralrs_core.adapters.xlora import XLoraClassifier, XLoraRuntime, read_xlora_config
    where = f"order: {ordering.path}"
    if not ordering.order:
        raise ValueError(f"{where}: order: an X-LoRA model needs its adapters, in training order")
    if not ordering.layers:
        raise ValueError(f"{where}: layers: required for X-LoRA (module name -> classifier layer index, "
                         f"as upstream's create_ordering.py writes it)")
    if tgt_non_granular_index is not None and tgt_non_granular_index < 1:
        raise ValueError(f"tgt_non_granular_index: must be >= 1, got {tgt_non_granular_index}")
    sources = [(n, adapter_dir(root, n, f"xlora_model_id ({ordering.path})")) for n in ordering.order]
    adapters, linears = load_adapters(model, sources)
    for a in adapters:
        if a.weights:
            raise ValueError(f"adapter {a.name!r}: modules_to_save: whole-module copies cannot be mixed by X-LoRA")
    layers = dict(ordering.layers)
    for a in adapters:
        for module in a.updates:
            if module not in layers:
                raise ValueError(f"{where}: layers: has no index for {module!r}, which adapter {a.name!r} adapts")
    n_layers = max(layers.values()) + 1
    cfg = read_xlora_config(root / "xlora_config.json")
    classifier_file = root / "xlora_classifier.safetensors"
    if not classifier_file.is_file():
        raise FileNotFoundError(f"xlora_model_id: {classifier_file} not found")
    classifier = XLoraClassifier.load(classifier_file, cfg, n_layers, len(adapters), model.dtype,
                                      next(model.parameters()).device)
    runtime = XLoraRuntime(model, adapters, classifier, tgt_non_granular_index)
    runtime.install(adapters, linears, merge=False, xlayers=layers)
    model.adapters = runtime
    return runtime


class AdapterLoader:
    """Loads the base through its own loader, then attaches LoRA or X-LoRA adapters."""

    def load(self, which, opts, name: str):
        from mistralrs_core.runner import _load_pipeline
        xlora = which.adapter_kind == "xlora"
        if xlora:
            ordering = read_ordering(which.order)
            root = _resolve(which.xlora_model_id, which, opts, "xlora_model_id")
            base_id = getattr(which, "model_id", None) or ordering.base_model_id
            if which.tgt_non_granular_index is not None:
                # Frozen sequences skip the scaling pass, so the scaling pass's cache would miss
                # their blocks; a prefix hit on such a block would read stale K/V.
                opts = attrs.evolve(opts, prefix_cache_n=0)
        else:
            plan = lora_plan(which, opts)
            base_id = getattr(which, "model_id", None) or (plan.ordering.base_model_id if plan.ordering else None)
            if base_id is None and type(which).__name__ == "Lora":
                from mistralrs_core.adapters.peft_config import read_lora_config
                base_id = read_lora_config(plan.sources[0][1] / "adapter_config.json").base_model_name_or_path
        if type(which).__name__ in ("Lora", "XLora") and not base_id:
            raise ValueError("model_id: the base model is not given and the adapters do not name one")
        pipeline = _load_pipeline(base_which(which, base_id), opts, name)
        model = pipeline.model
        try:
            if xlora:
                attach_xlora(model, root, ordering, which.tgt_non_granular_index)
            else:
                attach_lora(model, plan.sources, plan.default, which=which)
        except BaseException:
            pipeline.shutdown()
            raise
        return pipeline
