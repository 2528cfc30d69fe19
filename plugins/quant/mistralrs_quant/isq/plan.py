"""Which ISQ type each layer gets: upstream's rules, decided by HF layer name.

Order (as upstream's ``resolve_immediate_isq``): a topology ``/regex/`` key that matches
``<layer>.weight`` (the last such key in the file wins), else the topology entry of the
layer index (``0-8``, ``12``), else the default type. An entry without ``isq`` means the
default. The default of the token embeddings and the LM head is promoted to a higher-
precision type (Q4K -> Q6K ...); an explicit topology type is kept as written. Under
``organization=MoQE`` only MoE expert weights take the default; other layers stay dense
unless the topology names them. MoE routers (``...mlp.gate``, ``router``) stay dense by
default (their logits decide which experts run), except in the families whose upstream
loader lists the router among its ISQ layers (``QUANTIZED_ROUTERS``: Mixtral's
``block_sparse_moe.gate``, ``normal_loaders.rs`` ``MixtralLoader::isq_layer_regexes``;
Llama4's ``feed_forward.router``, ``multimodal_loaders.rs``), and never under MoQE.
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

#: family (registry name) -> the router names its upstream ISQ quantizes with the default type
QUANTIZED_ROUTERS = {"Mixtral": re.compile(r"(?:^|\.)block_sparse_moe\.gate$"),
                     "Llama4": re.compile(r"(?:^|\.)feed_forward\.router$")}


_EXPERT_PART = re.compile(r"(?:^|\.)layers\.(\d+)\..*\bexperts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down",
         "input_linear": "gate", "output_linear": "down"}
# Shared experts: DeepSeek's ``mlp.shared_experts``, Qwen2-MoE's / Llama4's ``shared_expert``,
# Granite's ``shared_mlp`` (gate and up fused as ``input_linear``: they read the same input).
_SHARED_PART = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(shared_experts?|shared_mlp)\."
                          r"(w1|w2|w3|gate_proj|up_proj|down_proj|input_linear|output_linear)$")
_LAYER_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(?:mlp\.gate|block_sparse_moe\.gate|router|gate\.wg)$")


def expert_key(hf_name: str) -> Optional[tuple[int, int, str]]:
    """(layer, expert, gate|up|down) of a per-expert weight name, whatever the family calls it."""
    m = _EXPERT_PART.search(hf_name)
    return None if m is None else (int(m.group(1)), int(m.group(2)), _PART[m.group(3)])


def moe_key(hf_name: str) -> Optional[tuple]:
    """A family-independent key of a MoE layer's weight, so an importance matrix named one
    way (llama.cpp's ``ffn_*_exps`` / ``ffn_*_shexp`` / ``ffn_gate_inp``, read under the
    canonical names of ``imatrix._to_hf``) finds the family's names: ("expert", layer, e,
    part), ("shared", layer, part) or ("router", layer); None for other weights."""
    if (key := expert_key(hf_name)) is not None:
        return ("expert", *key)
    if (m := _SHARED_PART.search(hf_name)) is not None:
        return ("shared", int(m.group(1)), _PART[m.group(3)])
    if (m := _LAYER_ROUTER.search(hf_name)) is not None:
        return ("router", int(m.group(1)))
    return None


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
    routers: Optional[re.Pattern] = None           # routers quantized with the default (QUANTIZED_ROUTERS)
    _experts: Optional[tuple] = field(default=None, repr=False, compare=False)

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
        router = _ROUTER.search(hf_name) is not None
        if (router and not (self.routers is not None and self.routers.search(hf_name))) \
                or (is_embedding and not _EMBED.search(hf_name)):
            return None
        m = _LAYER_INDEX.search(hf_name)
        if m is not None and self.layers.get(int(m.group(1))) is not None:
            return self.layers[int(m.group(1))]
        if self.moqe and not _EXPERT.search(hf_name):
            return None
        return base

    def type_for(self, hf_name: str, module=None) -> Optional[str]:
        from mistralrs_core.layers.linear import Embedding
        if module is not None and module.__dict__.get("isq_dense"):
            return None   # outside the language model (loader.keep_dense): even a topology regex
        isq = self.resolve(hf_name, isinstance(module, Embedding))
        return None if isq is None else isq.name

    def imatrix_for(self, hf_name: str):
        if self.imatrix is None:
            return None
        found = self.imatrix.get(hf_name)
        if found is None and (key := moe_key(hf_name)) is not None:
            # A MoE weight named otherwise by the imatrix (llama.cpp's ``ffn_gate_exps`` read
            # as ``mlp.experts.E.gate_proj`` where Mixtral's checkpoint says
            # ``block_sparse_moe.experts.E.w1``; ``ffn_gate_shexp`` as
            # ``mlp.shared_experts.gate_proj``): matched by what it is, not by its spelling.
            if self._experts is None or self._experts[0] is not self.imatrix:
                index = {k: v for n, v in self.imatrix.items() if (k := moe_key(n)) is not None}
                self._experts = (self.imatrix, index)
            found = self._experts[1].get(key)
            if found is None and key[0] == "shared" and ".shared_mlp." in hf_name:
                # Granite's shared MLP on a layer without routed experts: llama.cpp names it
                # as a plain feed-forward (``ffn_gate``), as upstream's lookup also tries.
                found = self.imatrix.get(f"model.layers.{key[1]}.mlp.{key[2]}_proj")
        return found

    def types_used(self) -> set[str]:
        out = {t.name for t in [self.default, *self.layers.values(), *(t for _, t in self.patterns)] if t}
        if self.default is not None and self.promote:
            out.add(promoted(self.default).name)
        return out


def build_plan(default, topology=None, moqe: bool = False, imatrix: Optional[dict] = None,
               family: Optional[str] = None) -> IsqPlan:
    """``default``: the ``in_situ_quant`` value (or None); ``topology``: a parsed
    ``topology.Topology`` or None; ``family``: the registry name of the model's family."""
    isq = parse_isq_type(default) if default is not None else None
    plan = IsqPlan(isq, moqe=moqe, imatrix=imatrix, routers=QUANTIZED_ROUTERS.get(family))
    if topology is not None:
        plan.patterns = list(topology.patterns)
        plan.layers = dict(topology.layers)
    return plan
