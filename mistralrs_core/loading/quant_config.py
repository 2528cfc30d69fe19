"""What quantization a model gets, decided once when loading starts.

A ``QuantConfig`` travels with the weight stream to the ``mistralrs_quant_method`` hook.
The plugin that answers the hook reads it (``kind``, ``for_layer``) to decide, layer by
layer, whether to replace the dense weight by a quantized method; the core only carries
the decision, it never quantizes.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import attrs
import torch

KINDS = ("none", "gguf", "isq", "uqff", "gptq", "awq", "fp8", "mxfp4")
#: kinds whose checkpoint tensors arrive already quantized, named by
#: ``quantization_config.quant_method`` in config.json
PREQUANTIZED = ("gptq", "awq", "fp8", "mxfp4")


def _compile_topology(value) -> tuple[tuple[re.Pattern, str | None], ...]:
    """Regex -> type pairs, in order (the first matching pattern wins); a mapping works too."""
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for pattern, qtype in items:
        out.append((pattern if isinstance(pattern, re.Pattern) else re.compile(pattern), qtype))
    return tuple(out)


def _check_kind(_inst, _attr, value):
    if value not in KINDS:
        raise ValueError(f"QuantConfig.kind must be one of {', '.join(KINDS)}, got {value!r}")


@attrs.frozen
class QuantConfig:
    """``kind``:

    * ``none``: dense weights (a pre-quantized weight that no plugin claims is dequantized);
    * ``gguf``: weights arrive already packed (``QuantizedWeight``), the format plugin keeps them packed;
    * ``isq``: quantize dense checkpoint tensors as they stream in, to ``default_type`` or to the
      type of the first ``topology`` pattern (``re.search`` on the layer's HF name, e.g.
      ``model.layers.0.self_attn.q_proj``) that matches; a ``None`` type keeps that layer dense;
    * ``uqff``: pre-quantized weights read from ``path``;
    * ``gptq``, ``awq``, ``fp8``, ``mxfp4``: a checkpoint saved quantized, detected from
      ``quantization_config`` in config.json (``from_hf_config``); ``params`` holds that
      object (bits, group size, ``desc_act``, ``weight_block_size`` ...). The plugin that
      knows the format groups each layer's packed tensors (``qweight``/``qzeros``/
      ``scales``/``g_idx``, ``weight``/``weight_scale_inv``, ``*_blocks``/``*_scales``) into one
      ``QuantizedWeight`` (hook ``mistralrs_packed_weights``) before the loader sees them.

    ``compute_dtype`` and ``device`` are filled in by the loader (the model's quantized-product
    dtype and target device) when left as None, so a hook always sees both.
    """

    kind: str = attrs.field(default="none", validator=_check_kind)
    default_type: str | None = None
    topology: tuple[tuple[re.Pattern, str | None], ...] = attrs.field(default=(), converter=_compile_topology)
    path: str | None = None
    compute_dtype: torch.dtype | None = None
    device: torch.device | None = attrs.field(default=None, converter=lambda d: None if d is None else torch.device(d))
    params: Mapping = attrs.field(factory=dict, hash=False)
    #: A plugin's ISQ plan: an object whose ``type_for(hf_name, module)`` decides instead of
    #: ``default_type``/``topology`` (upstream's topology files, promotion of embeddings and
    #: LM heads, MoQE), carrying what the plugin's hook also needs (an importance matrix).
    plan: object = attrs.field(default=None, eq=False, hash=False)

    def for_layer(self, hf_name: str, module=None) -> str | None:
        """The quantization type of the layer called ``hf_name`` (no ``.weight`` suffix), or
        None to keep it dense. ``gguf`` and ``uqff`` answer their kind: the block type comes
        with the stored weight."""
        if self.kind == "none":
            return None
        if self.kind in ("gguf", "uqff") or self.kind in PREQUANTIZED:
            return self.kind
        if self.plan is not None:
            return self.plan.type_for(hf_name, module)
        for pattern, qtype in self.topology:
            if pattern.search(hf_name):
                return qtype
        return self.default_type

    @classmethod
    def isq(cls, default_type: str | None, topology: Iterable | Mapping = (), **kw) -> "QuantConfig":
        return cls(kind="isq", default_type=default_type, topology=topology, **kw)


def from_hf_config(hf_config: Mapping) -> "QuantConfig | None":
    """The pre-quantized format named by config.json's ``quantization_config`` (as upstream
    detects it), or None for a dense checkpoint. An unknown ``quant_method`` is a
    ``ValueError``: loading its packed tensors as dense weights could only fail later, or
    silently compute garbage."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise ValueError("quantization_config: must be an object")
    method = str(qc.get("quant_method", "")).lower()
    if method not in PREQUANTIZED:
        raise ValueError(f"quantization_config.quant_method: {qc.get('quant_method')!r} is not supported; "
                         f"supported: {', '.join(PREQUANTIZED)}")
    return QuantConfig(kind=method, params=dict(qc))
