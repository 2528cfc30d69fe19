"""Sparse mixture-of-experts feed-forward, shared by every MoE family.

One implementation, configured by ``MoEConfig``: router -> scores -> (grouped) top-k ->
combine weights, then a batched expert pass. The token-expert pairs of the whole flat
batch are sorted by expert, so each expert with work runs one matmul over a contiguous
slice; results are weighted and scattered back with ``index_add_``.

Expert weights are stacked tensors, ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then
up rows) and ``experts.down_proj`` [E, H, I], because one [E, ...] tensor is what grouped
GEMM kernels and expert-parallel sharding want. Checkpoints that store one tensor per
expert (``experts.N.w1``, ``experts.N.gate_proj`` ...) are copied into their slices by
``MoEWeightsMixin``.

Quantized experts: per-expert checkpoint tensors are offered one by one to the weight
loader's quantization hook (``mistralrs_quant_method``, HF name ``...experts.N.w1``, the
``MoEExperts`` as module). When it quantizes every part of every expert of a layer, the layer
runs them through ``QuantizedExperts`` and the dense stacks are never allocated; a packed
tensor nobody claims is dequantized into the stack. ``MoEExperts.set_quant`` also takes any
object whose ``forward(expert: int, x) -> y`` computes the whole expert MLP (biases and
activation included). A family whose checkpoints store experts stacked (GPT-OSS) hands them
on per expert in its ``route_weights``.
"""
from __future__ import annotations

import re

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.quantized import QuantizedWeight


@attrs.define
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int
    hidden_act: str = "silu"
    # "softmax" | "sigmoid" | "sparsemixer" (PhiMoE; top-2 only)
    scoring: str = "softmax"
    # Top-k on the raw logits, softmax over the k winners (GPT-OSS, Granite).
    softmax_after_topk: bool = False
    renormalize: bool = False               # norm_topk_prob
    renormalize_eps: float = 0.0            # DeepSeek-V3 adds 1e-20 to the denominator
    n_group: int | None = None              # group-limited routing (DeepSeek)
    topk_group: int | None = None
    group_score: str = "max"                # "max" (V2) | "top2_sum" (V3)
    score_correction_bias: bool = False     # gate.e_score_correction_bias, used for choice only
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    router_fp32: bool = False               # logits from float32 activations and weights
    router_name: str = "gate"
    weights_fp32: bool = True               # combine weights stay float32 (else activation dtype)
    expert_bias: bool = False
    # "gated": act(gate) * up; "clamped_swiglu": GPT-OSS's clamped, offset variant
    activation: str = "gated"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    jitter_eps: float = 0.01                # sparsemixer threshold
    shared_intermediate_size: int = 0       # 0: no shared expert
    shared_name: str = "shared_experts"
    shared_gate: bool = False               # sigmoid gate on the shared expert (Qwen2-MoE)


class Router(nn.Module):
    """The gate's logits ``x @ W^T (+ b)``. Like a ``Linear`` it can hold a quantized method
    (``set_quant_method``): upstream's ISQ quantizes some families' routers (Mixtral's), and
    its UQFF files store them quantized."""

    def __init__(self, hidden: int, num_experts: int, bias: bool, correction_bias: bool):
        super().__init__()
        self.in_features, self.out_features = hidden, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device="meta"), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(num_experts, device="meta"), requires_grad=False)
                     if bias else None)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, device="meta"), requires_grad=False)
            if correction_bias else None)
        self.qmethod = None

    def set_quant_method(self, method) -> None:
        if (method.out_features, method.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"quantized router weight has shape {(method.out_features, method.in_features)}, "
                             f"expected {(self.out_features, self.in_features)}")
        self.qmethod = method
        self.weight = None

    def forward(self, x: torch.Tensor, fp32: bool) -> torch.Tensor:
        if self.qmethod is not None:
            y = self.qmethod.forward(x.float() if fp32 else x)
            y = y.float() if fp32 else y.to(x.dtype)
            return y if self.bias is None else y + (self.bias.float() if fp32 else self.bias)
        w, b = self.weight, self.bias
        if fp32:
            x, w = x.float(), w.float()
            b = b.float() if b is not None else None
        return F.linear(x, w, b)


class MoEExperts(nn.Module):
    """E expert MLPs as stacked tensors (see the module docstring for the quantized seam)."""

    def __init__(self, cfg: MoEConfig, hidden: int):
        super().__init__()
        e, i = cfg.num_experts, cfg.intermediate_size
        self.num_experts, self.hidden, self.intermediate = e, hidden, i
        self.kind = cfg.activation
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.act = get_activation(cfg.hidden_act)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)
        self.gate_up_proj = param(e, 2 * i, hidden)
        self.down_proj = param(e, hidden, i)
        self.gate_up_proj_bias = param(e, 2 * i) if cfg.expert_bias else None
        self.down_proj_bias = param(e, hidden) if cfg.expert_bias else None
        self.quant = None
        self._filled: dict[str, set] = {}
        self._quant_parts: dict[tuple[int, str], object] = {}   # (expert, part) -> hook's method
        # (global expert, part) -> the checkpoint's name for it (``...experts.3.w1``), so that
        # UQFF, re-quantization and importance matrices name an expert weight as its checkpoint does.
        self.part_names: dict[tuple[int, str], str] = {}

    def set_quant(self, method) -> None:
        """Install a quantized implementation (``method.forward(expert, x)``, the whole expert
        MLP); the dense stacks are dropped so memory holds only the packed form."""
        self.quant = method
        self.gate_up_proj = self.down_proj = self.gate_up_proj_bias = self.down_proj_bias = None
        self._filled.clear()

    # --- compute ----------------------------------------------------------
    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
        if self.kind == "clamped_swiglu":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return self.act(gate) * up

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.forward(e, x)
        b1 = self.gate_up_proj_bias[e] if self.gate_up_proj_bias is not None else None
        b2 = self.down_proj_bias[e] if self.down_proj_bias is not None else None
        return F.linear(self.activate(F.linear(x, self.gate_up_proj[e], b1)), self.down_proj[e], b2)

    # --- loading ----------------------------------------------------------
    def load_expert(self, e: int, part: str, value, device, dtype, quantize=None) -> None:
        """Copy one expert's ``gate`` / ``up`` / ``down`` weight [out, in] into its slice,
        unless ``quantize(value)`` (the loader's quantization hook) returns a method for it."""
        method = quantize(value) if quantize is not None else None
        if method is not None:
            self._quant_parts[(e, part)] = method
            name = "down_proj" if part == "down" else "gate_up_proj"
            self._filled.setdefault(name, set()).add((e, part))
            return
        if isinstance(value, QuantizedWeight) and not isinstance(value, torch.Tensor):
            value = value.dequantize()
        name = "down_proj" if part == "down" else "gate_up_proj"
        stack = getattr(self, name)
        if stack.device.type == "meta":
            stack = nn.Parameter(torch.empty(stack.shape, device=device, dtype=dtype), requires_grad=False)
            setattr(self, name, stack)
            self._filled[name] = set()
        i = self.intermediate
        rows = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(None)}[part]
        target = stack.data[e, rows]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"expert {e} {part} weight has shape {tuple(value.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(value.to(device=device, dtype=dtype))
        self._filled.setdefault(name, set()).add((e, part))

    def load_expert_bias(self, e: int, part: str, value: torch.Tensor, device, dtype) -> None:
        """One expert's ``gate`` / ``up`` / ``down`` bias (a UQFF file stores them per expert,
        next to each quantized weight) into its slice of the stacked bias."""
        name = "down_proj_bias" if part == "down" else "gate_up_proj_bias"
        stack = getattr(self, name)
        if stack is None:
            raise ValueError(f"expert {e} {part} bias given, but this family's experts have no biases")
        if stack.device.type == "meta":
            stack = nn.Parameter(torch.empty(stack.shape, device=device, dtype=dtype), requires_grad=False)
            setattr(self, name, stack)
        i = self.intermediate
        rows = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(None)}[part]
        target = stack.data[e, rows]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"expert {e} {part} bias has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value.to(device=device, dtype=dtype))

    def install_quantized_parts(self, layer_name: str) -> None:
        """After loading: run the experts from the hook's methods when it took every part."""
        if not self._quant_parts:
            return
        want = {(e, p) for e in range(self.num_experts) for p in ("gate", "up", "down")}
        if set(self._quant_parts) != want:
            raise ValueError(f"{layer_name}: the quantizer took {len(self._quant_parts)} of the "
                             f"{len(want)} expert weights; a layer's experts are quantized all or none")
        self.set_quant(QuantizedExperts(self, self._quant_parts))
        self._quant_parts = {}

    def missing_slices(self) -> list[str]:
        want = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
        out = []
        for name, filled in self._filled.items():
            out += [f"{name}[{e}].{p}" for e in range(self.num_experts) for p in want[name]
                    if (e, p) not in filled]
        return out


def _group_limit(choice: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Keep only experts of the ``topk_group`` best groups (the rest get -inf)."""
    t, e = choice.shape
    grouped = choice.view(t, cfg.n_group, e // cfg.n_group)
    if cfg.group_score == "top2_sum":
        score = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        score = grouped.max(dim=-1).values
    best = score.topk(cfg.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(t, e), float("-inf"))


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's eval-mode routing: two rounds of "argmax, then softmax over the experts
    whose logit is within a relative 2*eps of that max", the second round without the
    first winner."""
    def round_(masked):
        top, idx = masked.max(dim=-1, keepdim=True)
        far = (top - logits) / logits.abs().clamp(min=top) > 2 * eps
        return torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1).gather(-1, idx), idx

    w1, i1 = round_(logits)
    w2, i2 = round_(logits.scatter(-1, i1, float("-inf")))
    return torch.cat((w1, w2), -1), torch.cat((i1, i2), -1)


def route(logits: torch.Tensor, cfg: MoEConfig, correction: torch.Tensor | None):
    """Router logits [T, E] -> (combine weights [T, k], expert ids [T, k])."""
    if cfg.scoring == "sparsemixer":
        return _sparsemixer(logits, cfg.jitter_eps)
    if cfg.softmax_after_topk:
        top, ids = logits.topk(cfg.top_k, dim=-1)
        return torch.softmax(top.float(), dim=-1), ids
    if cfg.scoring == "sigmoid":
        scores = logits.float().sigmoid()
    else:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    choice = scores + correction.float() if correction is not None else scores
    if cfg.n_group is not None and cfg.topk_group is not None and cfg.n_group > 1:
        choice = _group_limit(choice, cfg)
    if correction is None and cfg.n_group is None:
        weights, ids = choice.topk(cfg.top_k, dim=-1)
    else:
        ids = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + cfg.renormalize_eps)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids


def dispatch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: MoEExperts) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token, grouped by expert."""
    t, k = ids.shape
    if t == 1:
        # Single-token decode: the sort / gather / scatter bookkeeping would cost as much as
        # the expert matmuls themselves.
        out = torch.cat([experts.expert_forward(e, x) for e in ids[0].tolist()])
        return (out * weights[0][:, None]).sum(0, keepdim=True).to(x.dtype)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # One host sync per layer; the loop below visits only experts that got tokens.
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    token = order // k
    xs = x.index_select(0, token)
    out = torch.empty(t * k, x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = experts.expert_forward(e, xs[start:start + n])
            start += n
    # The product is taken in the weights' dtype (float32 for most routers), as the references do.
    out = (out * weights.reshape(-1).index_select(0, order)[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


class SparseMoE(nn.Module):
    """Router + experts (+ optional shared expert); module names follow the checkpoint."""

    def __init__(self, cfg: MoEConfig, hidden: int):
        super().__init__()
        self.cfg = cfg
        setattr(self, cfg.router_name, Router(hidden, cfg.num_experts, cfg.router_bias,
                                              cfg.score_correction_bias))
        self.experts = MoEExperts(cfg, hidden)
        if cfg.shared_intermediate_size:
            setattr(self, cfg.shared_name, GatedMLP(hidden, cfg.shared_intermediate_size, cfg.hidden_act))
            if cfg.shared_gate:
                self.shared_expert_gate = Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = getattr(self, self.cfg.router_name)
        logits = router(x, self.cfg.router_fp32)
        weights, ids = route(logits, self.cfg, router.e_score_correction_bias)
        if not self.cfg.weights_fp32:
            weights = weights.to(x.dtype)
        y = self.dispatch(x, ids, weights)
        if self.cfg.shared_intermediate_size:
            shared = getattr(self, self.cfg.shared_name)(x)
            if self.cfg.shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum (expert parallelism runs only its own experts)."""
        return dispatch(x, ids, weights, self.experts)


class QuantizedExperts:
    """Every expert's gate, up and down as quantized methods (``forward(x) = x @ W^T``)."""

    def __init__(self, experts: MoEExperts, parts: dict):
        self.parts = dict(parts)
        self.activate = experts.activate
        self.gate_up_bias, self.down_bias = experts.gate_up_proj_bias, experts.down_proj_bias

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        p = self.parts
        gate_up = torch.cat([p[(e, "gate")].forward(x), p[(e, "up")].forward(x)], dim=-1)
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias[e]
        y = p[(e, "down")].forward(self.activate(gate_up))
        return y + self.down_bias[e] if self.down_bias is not None else y


_EXPERT_NAME = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<part>[A-Za-z0-9_]+)\.(?P<kind>weight|bias)$")
_PARTS = {"w1": "gate", "w3": "up", "w2": "down",
          "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MoEWeightsMixin:
    """For a ``CausalLM``: routes per-expert checkpoint tensors (``...experts.N.w1.weight``
    and ``...experts.N.gate_proj.weight`` spellings, after ``map_weight_name``) into the
    stacked ``MoEExperts`` parameters; everything else loads as usual."""

    def route_weights(self, weights, loader):
        modules = dict(self.named_modules())
        for raw, value in weights:
            name = self.map_weight_name(raw)
            m = _EXPERT_NAME.match(name) if name is not None else None
            experts = modules.get(m["moe"] + ".experts") if m else None
            if isinstance(experts, MoEExperts) and m["part"] in _PARTS:
                prefix = raw.rpartition(".")[0]
                e, part = int(m["e"]), _PARTS[m["part"]]
                if m["kind"] == "bias":
                    experts.load_expert_bias(e, part, value, loader.device_for(experts), loader.dtype)
                    continue
                experts.part_names[(e, part)] = prefix
                experts.load_expert(e, part, value, loader.device_for(experts), loader.dtype,
                                    quantize=lambda w, prefix=prefix: loader.quant_method(prefix, experts, w))
                del value      # a quantized expert's dense tensor is freed before the next arrives
                continue
            yield raw, value

    def finish_loading(self, device):
        missing = [f"{n}.{s}" for n, m in self.named_modules() if isinstance(m, MoEExperts)
                   for s in m.missing_slices()]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} expert weight(s) for "
                             f"{type(self).__name__}: {shown}")
        for n, m in self.named_modules():
            if isinstance(m, MoEExperts):
                m.install_quantized_parts(n)
        super().finish_loading(device)
