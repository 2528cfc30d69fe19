"""Which ISQ type each layer gets: upstream's rules, decided by HF layer name.

Order (as upstream's ``resolve_immediate_isq``): a topology ``/regex/`` key that matches
``<layer>.weight`` (the last such key in the file wins), else the topology entry of the
layer index (``0-8``, ``12``), else the default type. An entry without ``isq`` means the
default. The default of the token embeddings and the LM head is promoted to a higher-
precision type (Q4K -> Q6K ...); an explicit topology type is kept as written. Under
``organization=MoQE`` only MoE expert weights take the default; other layers stay dense
unless the topology names them. MoE routers (``...mlp.gate``, ``router``) are never
quantized by default: their logits decide which experts run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from .types import IsqType, parse_isq_type, promoted

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)embed_tokens$")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head$")
_ROUTER = re.compile(r"(?:^|\.)(?:mlp\.gate|block_sparse_moe\.gate|router|gate\.wg)$")
_EXPERT = re.compile(r"(?:^|\.)experts(?:\.\d+)?\.")


@dataclass
class IsqPlan:
    default: Optional[IsqType]
    patterns: list = field(default_factory=list)   # [(compiled regex, IsqType | None)], file order
    layers: dict = field(default_factory=dict)     # layer index -> IsqType | None
    moqe: bool = False
    promote: bool = True
    imatrix: Optional[dict] = None                 # HF layer name -> float32 [in_features]
    cpp_impl: Optional[str] = None                 # Runner(quant_kernel=...) for the methods
    tick: Optional[Callable[[], None]] = None      # progress, once per quantized layer

    def resolve(self, hf_name: str, is_embedding: bool = False) -> Optional[IsqType]:
        weight_name = f"{hf_name}.weight"
        sensitive = bool(_EMBED.search(hf_name) or _LM_HEAD.search(hf_name))
        base = self.default
        if base is not None and sensitive and self.promote:
            base = promoted(base)
        for pattern, isq in reversed(self.patterns):
            if pattern.search(weight_name):
                return isq or base
        # Routers and embeddings other than the token embedding stay dense unless a regex
        # names them.
        if _ROUTER.search(hf_name) or (is_embedding and not _EMBED.search(hf_name)):
            return None
        m = _LAYER_INDEX.search(hf_name)
        if m is not None and self.layers.get(int(m.group(1))) is not None:
            return self.layers[int(m.group(1))]
        if self.moqe and not _EXPERT.search(hf_name):
            return None
        return base

    def type_for(self, hf_name: str, module=None) -> Optional[str]:
        from mistralrs_core.layers.linear import Embedding
        isq = self.resolve(hf_name, isinstance(module, Embedding))
        return None if isq is None else isq.name

    def imatrix_for(self, hf_name: str):
        return None if self.imatrix is None else self.imatrix.get(hf_name)

    def types_used(self) -> set[str]:
        out = {t.name for t in [self.default, *self.layers.values(), *(t for _, t in self.patterns)] if t}
        if self.default is not None and self.promote:
            out.add(promoted(self.default).name)
        return out


def build_plan(default, topology=None, moqe: bool = False, imatrix: Optional[dict] = None) -> IsqPlan:
    """``default``: the ``in_situ_quant`` value (or None); ``topology``: a parsed
    ``topology.Topology`` or None."""
    isq = parse_isq_type(default) if default is not None else None
    plan = IsqPlan(isq, moqe=moqe, imatrix=imatrix)
    if topology is not None:
        plan.patterns = list(topology.patterns)
        plan.layers = dict(topology.layers)
    return plan
