"""Every hook a plugin may implement (pluggy project name ``mistralrs``).

Registration hooks receive a ``register`` callback owned by the core; plugins pass it
``"module:attr"`` strings so that listing plugins never imports model code or CUDA.
Selection hooks answer "who handles this?" and stop at the first non-None answer.
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
    gguf_architectures=(), aliases=())`` once per family. ``name`` is the spec's enum
    name (``"Llama"``), ``target`` a ``"module:Class"`` string for the model class and
    ``kind`` one of text, vision, diffusion, speech, embedding.
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
    """Register sampler implementations: ``register(name, target)``."""


@hookspec
def mistralrs_register_tool_providers(register):
    """Register tool providers (MCP, web search, code execution): ``register(name, target)``."""


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
