"""Every hook a plugin may implement (pluggy project name ``mistralrs``).

Registration hooks receive a ``register`` callback owned by the core; plugins pass it
``"module:attr"`` strings so that listing plugins never imports model code or CUDA.
Names are unique per table (architectures: per kind): registering a name another plugin
already registered fails, naming both plugins. Selection hooks answer "who handles
this?" and stop at the first non-None answer. A hook implementation whose name is not
declared here (a misspelling) makes its plugin fail to load.
"""
from __future__ import annotations

import pluggy

PROJECT = "mistralrs"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mistralrs_register_architectures(register):
    """Register model families.

    Call ``register(name, target, *, kind, hf_model_types=(), hf_architectures=(),
    gguf_architectures=(), aliases=(), processor=None, pipeline=None,
    config_from_gguf=None)`` once per family. ``name`` is the spec's enum name
    (``"Llama"``), ``target`` a ``"module:Class"`` string for the model class and ``kind``
    one of text, vision, diffusion, speech, embedding. ``processor`` / ``pipeline``:
    ``"module:attr"`` of the family's input processor and pipeline class when it needs its
    own. ``config_from_gguf``: ``"module:func"`` with the signature
    ``func(meta, vocab_size, tied) -> dict`` (``meta``: ``mistralrs_quant.gguf_config.GGUFMeta``)
    turning a GGUF file's metadata into the HF config dict the family reads; it wins over
    the GGUF loader's built-in table for the family's ``gguf_architectures``.
    """


@hookspec
def mistralrs_register_loaders(register):
    """Register model-source loaders: ``register(name, target)`` where ``target`` is a
    ``"module:Class"`` string of a loader that turns a ``Which`` into a loaded model."""


@hookspec
def mistralrs_register_quantizers(register):
    """Register quantization formats: ``register(name, target)`` (e.g. ``"Q4_K"``)."""


@hookspec
def mistralrs_register_samplers(register):
    """Register sampler implementations: ``register(name, target)``; the engine builds
    ``"default"`` (``mistralrs_core.plugins.make_sampler``)."""


@hookspec
def mistralrs_register_tool_providers(register):
    """Register tool providers: ``register(name, target)``, ``target`` a ``"module:Class"``
    of a ``mistralrs_core.tools.ToolProvider``. The Runner hands its tool arguments
    (``tool_callbacks``, ``mcp_client_config``, ``enable_search`` ...) to the providers
    that claim them."""


@hookspec
def mistralrs_register_capabilities(register):
    """Declare what this plugin implements: ``register(name, *, provides="")`` with a name
    from ``mistralrs_core.capabilities.KNOWN`` (``"grammar"``, ``"isq"``, ``"mcp"`` ...).
    Until some plugin registers a capability, the arguments that need it raise
    ``NotAvailableYet``; once registered, the plugin must really handle them."""


@hookspec
def mistralrs_register_logits_processors(register):
    """Register logits processors: ``register(name, target)``, ``target`` a
    ``"module:func"`` factory ``(request, tokenizer) -> processor | None``; a processor is
    ``callable(output_ids: list[int], logits: Tensor[vocab]) -> Tensor``. Every factory is
    asked for each request; those returning None do not apply to it."""


@hookspec
def mistralrs_register_decode_attention(register):
    """Register kernels for pure-decode paged attention: ``register(name, target, *,
    device_types=("cuda",))``, ``target`` a ``"module:attr"`` of an object with
    ``supports(q, cache, meta, **options) -> bool`` and ``__call__(q, cache, meta, *, scale,
    **options) -> Tensor`` (contract in ``mistralrs_core.layers.decode_kernels``). The core
    asks it only on the listed device types unless ``MISTRALRS_DECODE_ATTENTION`` names it."""


@hookspec
def mistralrs_register_dense_kernels(register):
    """Register small-M dense matmul kernels for prepacked bf16/f16 linears: ``register(name,
    target, *, device_types=("cpu",))``, ``target`` a ``"module:attr"`` of an object with
    ``supports(dtype, device) -> bool``, ``max_rows(dtype) -> int`` and ``bind(w) -> mm``
    (contract in ``mistralrs_core.layers.dense_kernels``). Asked only for layers prepacked
    with ``small_m=True``, unless ``MISTRALRS_DENSE_KERNEL=torch``."""


@hookspec(firstresult=True)
def mistralrs_select_loader(which, kind):
    """Return the registered loader name that handles this ``Which`` variant, or None."""


@hookspec(firstresult=True)
def mistralrs_select_architecture(config, kind):
    """Return the architecture name for an HF ``config`` dict when the plain
    ``model_type`` / ``architectures`` tables do not decide it, or None."""


@hookspec(firstresult=True)
def mistralrs_quant_method(quant_config, hf_name, module, weight):
    """Decide how one layer's weight is stored, as it streams in at load.

    Called for the ``weight`` of every layer that can hold a quantized method (``Linear``,
    ``Embedding``) with the load's ``QuantConfig`` (``compute_dtype`` and ``device`` filled
    in), the layer's HF name (``model.layers.0.self_attn.q_proj``), the layer, and the
    weight exactly as the source produced it: a checkpoint tensor (not yet cast or moved)
    or a pre-quantized ``QuantizedWeight``. Return an object the layer's
    ``set_quant_method`` accepts (a ``QuantMethod``) to keep the layer quantized, or None
    to leave it dense. The loader drops the weight right after, so an implementation must
    not keep a reference to a dense tensor it was given.
    """


@hookspec(firstresult=True)
def mistralrs_packed_weights(quant_config, weights):
    """Group a pre-quantized checkpoint's packed tensors, before any family sees them.

    ``quant_config.kind`` names the format (``gptq``, ``awq``, ``fp8``, ``mxfp4``: see
    ``loading/quant_config.py``); ``weights`` is the ``(hf_name, tensor)`` stream. Return a
    new stream in which each layer's parts (``q_proj.qweight``, ``q_proj.qzeros`` ...) are
    replaced by one ``(prefix + ".weight", QuantizedWeight)`` (stacked expert tensors keep
    their stacked name), or None when the format is not yours. Parts are buffered only until
    their layer is complete, so the load still holds one layer's tensors at a time.
    """
