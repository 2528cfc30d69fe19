"""LoRA at serving time: one base matmul per layer, low-rank updates per token.

Every targeted ``Linear`` gets a ``LayerAdapters`` (its ``lora`` slot): per adapter the
pieces that touch it (a fused q/k/v holds up to three, each on its own rows). Before each
forward the runtime turns the step's per-sequence adapter ids (``meta.adapter_ids``) into a
``RoutingPlan``: groups of token rows that share an adapter selection. A layer then adds
``scale * B (A x)`` for each group's adapters on the group's rows only, so requests with
different adapters (or none) share one batch and one base matmul. When a single adapter
serves every request of a dense model, it is merged into the weights at load instead.

A request picks an adapter by name (``adapter="name"``): that adapter alone. A request
without one gets the default set: the ordering file's ``order`` (all summed, as upstream
activates them), or the base model when the default set is empty.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_core.adapters.weights import AdapterWeights, base_weight


@attrs.define(eq=False)
class Piece:
    adapter: int
    rows: slice | None       # output rows of the (possibly fused) layer; None = all
    At: torch.Tensor | None  # lora_A transposed [in, r]; None for a piece without a low-rank update
    Bt: torch.Tensor | None  # lora_B transposed [r, out_part], pre-multiplied by the scale
    bias: torch.Tensor | None = None   # added on the adapter's rows (trained bias - base bias)
    D: torch.Tensor | None = None      # modules_to_save: saved weight - base weight [out_part, in]
    xlayer: int | None = None          # X-LoRA: the classifier's layer index of this module


@attrs.define(eq=False)
class RoutingPlan:
    """Token rows -> the adapters (and weights) they use this step."""
    groups: list[tuple[torch.Tensor | None, tuple[tuple[int, float], ...]]]


@attrs.define(eq=False)
class ScalingPlan:
    """X-LoRA: every token uses every adapter, weighted by ``scalings`` [T, layers, adapters]."""
    scalings: torch.Tensor
    weight: float = 1.0


def _add(y: torch.Tensor, rows: torch.Tensor | None, cols: slice | None, d: torch.Tensor) -> None:
    target = y if cols is None else y[:, cols]
    if rows is None:
        target += d
    else:
        target.index_add_(0, rows, d)


def _low_rank(y, rows, cols, xs, p: "Piece", coef: float) -> None:
    """y[rows, cols] += coef * (xs At) Bt, in place (addmm when the rows are all of them)."""
    h = torch.mm(xs, p.At)
    if rows is None:
        (y if cols is None else y[:, cols]).addmm_(h, p.Bt, alpha=coef)
    else:
        d = torch.mm(h, p.Bt)
        _add(y, rows, cols, d if coef == 1.0 else d * coef)


class LayerAdapters:
    """Sits in a ``Linear``'s ``lora`` slot: ``y = base(x)`` -> ``y + updates``."""

    def __init__(self, runtime: "AdapterRuntime"):
        self.runtime = runtime
        self.by_adapter: dict[int, list[Piece]] = {}

    def add(self, piece: Piece) -> None:
        self.by_adapter.setdefault(piece.adapter, []).append(piece)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        plan = self.runtime.current
        if plan is None:
            return y
        out = y
        if x.dim() != 2:   # the engine's batches are flat [T, features]; others are viewed so
            x, y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if isinstance(plan, ScalingPlan):
            self._scaled(plan, x, y)
            return out
        for rows, selection in plan.groups:
            xs = x if rows is None else x.index_select(0, rows)
            for adapter, coef in selection:
                for p in self.by_adapter.get(adapter, ()):
                    if p.At is not None:
                        _low_rank(y, rows, p.rows, xs, p, coef)
                    if p.D is not None:
                        d = xs @ p.D.t()
                        _add(y, rows, p.rows, d if coef == 1.0 else d * coef)
                    if p.bias is not None:
                        _add(y, rows, p.rows, p.bias.expand(xs.shape[0], -1) * coef)
        return out

    def _scaled(self, plan: ScalingPlan, x: torch.Tensor, y: torch.Tensor) -> None:
        s = plan.scalings
        for adapter, pieces in self.by_adapter.items():
            for p in pieces:
                if p.At is None:
                    continue
                h = torch.mm(x, p.At) * s[:, p.xlayer, adapter, None]
                (y if p.rows is None else y[:, p.rows]).addmm_(h, p.Bt, alpha=plan.weight)


class AdapterRuntime:
    """The adapters of one model and the routing of the current step (``current``)."""

    def __init__(self, model: nn.Module, adapters: list[AdapterWeights], default: list[str]):
        self.model = model
        self.names = [a.name for a in adapters]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.default = tuple((self.index[n], 1.0) for n in default)
        self.current: RoutingPlan | ScalingPlan | None = None
        self.merged = False
        self.layers: list[tuple[nn.Module, LayerAdapters]] = []

    # --- installation -----------------------------------------------------
    def install(self, adapters: list[AdapterWeights], linears: dict, merge: bool,
                xlayers: dict[str, int] | None = None) -> None:
        dtype = getattr(self.model, "dtype", torch.float32)
        if merge:
            self._merge(adapters[0], linears)
            return
        slots: dict[int, LayerAdapters] = {}

        def slot_of(layer) -> LayerAdapters:
            slot = slots.get(id(layer))
            if slot is None:
                slot = slots[id(layer)] = LayerAdapters(self)
                self.layers.append((layer, slot))
            return slot

        for i, a in enumerate(adapters):
            for module, u in a.updates.items():
                layer, rows = linears[module]
                xl = None if xlayers is None else xlayers[module]
                slot_of(layer).add(Piece(i, rows, u.A.t().contiguous().to(dtype),
                                         (u.B * u.scale).t().contiguous().to(dtype), xlayer=xl))
            for module, weight in a.weights.items():
                layer, rows = linears[module]
                slot_of(layer).add(Piece(i, rows, None, None, D=(weight - base_weight(layer, rows)).to(dtype)))
            for module, bias in a.biases.items():
                layer, rows = linears[module]
                base = layer.bias.detach().float()
                base = base[rows] if rows is not None else base
                slot_of(layer).add(Piece(i, rows, None, None, bias=(bias - base).to(dtype)))
        for layer, slot in self.layers:
            layer.lora = slot
        self._wrap_forward()

    def _merge(self, a: AdapterWeights, linears: dict) -> None:
        """W[rows] += scale * B A, and the adapter's biases replace the base's (dense weights)."""
        with torch.no_grad():
            for module, weight in a.weights.items():
                layer, rows = linears[module]
                sl = slice(None) if rows is None else rows
                layer.weight[sl] = weight.to(layer.weight.dtype)
            for module, u in a.updates.items():
                layer, rows = linears[module]
                w = layer.weight
                sl = slice(None) if rows is None else rows
                w[sl] = (w[sl].float() + u.scale * (u.B @ u.A)).to(w.dtype)
            for module, bias in a.biases.items():
                layer, rows = linears[module]
                sl = slice(None) if rows is None else rows
                layer.bias[sl] = bias.to(layer.bias.dtype)
        self.merged = True

    def _wrap_forward(self) -> None:
        """Route each step before the layers run; the plugin's fused decode step (which reads
        the base weights only) is offered only the steps no adapter touches."""
        model = self.model
        inner = model.forward_embeds

        def forward_embeds(h, positions, meta, caches):
            plan = self.plan(meta, h.shape[0], h.device)
            self._remember(meta, h.shape[0], plan, h.device)
            return self.run_with(plan, inner, h, positions, meta, caches)

        model.forward_embeds = forward_embeds
        self._wrap_tail()

    def run_with(self, plan, fn, *args):
        self.current = plan
        try:
            return fn(*args)
        finally:
            self.current = None

    def _wrap_tail(self) -> None:
        """The fused decode step only for unadapted steps; the LM head routed by logits row."""
        model = self.model
        fast = model.fast_forward
        inner_logits = model.compute_logits

        def guarded_fast_forward(h, positions, meta, caches):
            return None if self.current is not None else fast(h, positions, meta, caches)

        def compute_logits(hidden):
            return self.run_with(self._plan_for_rows(hidden.shape[0]), inner_logits, hidden)

        if fast is not None:
            model.fast_forward = guarded_fast_forward
        model.compute_logits = compute_logits

    def _remember(self, meta, num_tokens: int, plan, device) -> None:
        """The step's plans for the LM head, which sees only the rows whose logits are wanted
        (each sequence's last ``num_logits`` tokens), or, in tests, every row."""
        counts = getattr(meta, "num_logits", None)
        logits_plan, n = None, -1
        if counts is not None and plan is not None:
            n = sum(counts)
            logits_plan = self.rows_plan(plan, meta, counts, device)
        self._tail = (num_tokens, plan, n, logits_plan)

    def rows_plan(self, plan, meta, counts, device):
        return self._route(getattr(meta, "adapter_ids", None), counts, device)

    def _plan_for_rows(self, n: int):
        tokens, plan, n_logits, logits_plan = getattr(self, "_tail", (0, None, -1, None))
        if plan is None:
            return None
        if n == n_logits:
            return logits_plan
        if n == tokens:
            return plan
        if isinstance(plan, RoutingPlan) and len(plan.groups) == 1 and plan.groups[0][0] is None:
            return plan
        raise ValueError(f"adapter: {n} logits rows match neither the step's {tokens} tokens nor its "
                         f"{n_logits} wanted rows")

    # --- routing ------------------------------------------------------------
    def selection(self, adapter_id: str | None) -> tuple[tuple[int, float], ...]:
        if adapter_id is None:
            return self.default
        return ((self.index[adapter_id], 1.0),)

    def plan(self, meta, num_tokens: int, device) -> RoutingPlan | None:
        return self._route(getattr(meta, "adapter_ids", None), meta.query_lens, device)

    def _route(self, ids, lens, device) -> RoutingPlan | None:
        """Rows (``lens`` per sequence) grouped by the adapters their sequence uses."""
        if ids is None:
            return RoutingPlan([(None, self.default)]) if self.default else None
        sels = [self.selection(a) for a in ids]
        if all(s == sels[0] for s in sels):
            return RoutingPlan([(None, sels[0])]) if sels[0] else None
        rows: dict[tuple, list[int]] = {}
        off = 0
        for sel, n in zip(sels, lens):
            if sel and n:
                rows.setdefault(sel, []).extend(range(off, off + n))
            off += n
        if not rows:
            return None
        return RoutingPlan([(torch.tensor(r, dtype=torch.long, device=device), sel) for sel, r in rows.items()])

    # --- requests -------------------------------------------------------------
    def request_adapter(self, adapter) -> str:
        if not isinstance(adapter, str):
            raise ValueError("adapter: pinning an adapter generation needs runtime adapter loading, which "
                             "is not available; name a loaded adapter instead")
        if adapter not in self.index:
            raise ValueError(f"adapter: {adapter!r} is not loaded; loaded adapters: {', '.join(self.names)}")
        if self.merged and (self.index[adapter], 1.0) not in self.default:
            raise ValueError(f"adapter: {adapter!r} cannot be selected: the model runs merged weights")
        return adapter


def request_adapter_id(model, req) -> str | None:
    """The adapter id a request's ``adapter`` field selects on ``model`` (None: the default)."""
    adapter = getattr(req, "adapter", None)
    if adapter is None:
        return None
    runtime = getattr(model, "adapters", None)
    if runtime is None:
        raise ValueError("adapter: this model was loaded without LoRA adapters (load it with Which.Lora, "
                         "Which.LoraGGUF or Which.LoraGGML)")
    return runtime.request_adapter(adapter)
