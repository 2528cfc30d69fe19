"""The AnyMoE block that replaces a dense MLP, and how it routes.

Routing follows upstream's gate (a linear layer, softmax over experts, the mean of the
probabilities over the sequence, top-1 expert), with one deliberate difference: each token
is routed by the mean over its sequence *so far* (positions 0..p), not by the mean over the
tokens of the forward call it happens to be in. Upstream's rule makes the output depend on
how a prompt was chunked, on prefix-cache hits and on speculative verification, because the
same token sees a different mean in each case. Ours depends only on the token's prefix, like
its K/V: the last prompt token is routed by the mean over the whole prompt, which is exactly
what the gate is trained on, and generated tokens follow the conversation's mean.

The running sums of gate probabilities live in a table laid out like the engine's paged KV
pool (one row per pool slot), so prefix-cache blocks, preemption and KV rollback need
nothing extra: a sequence reads the sum at its position ``start - 1`` from its own block
table and writes the sums of the tokens it computes.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch
from torch import nn


class StepLayout:
    """Where each row of the flat batch sits: its sequence, its absolute position, and the
    pool slot holding the running sum just before each sequence's first row."""

    def __init__(self, meta, block_size: int | None, device):
        if meta is None:
            # A bare call (tests, parity helpers without metadata): one fresh sequence.
            self.meta = None
            return
        self.meta = meta
        b, q_max = meta.num_seqs, meta.q_max
        starts = [c - q for c, q in zip(meta.context_lens, meta.query_lens)]
        self.num_seqs, self.q_max = b, q_max
        self.token_index = meta.token_index
        self.seq_of_row = torch.div(meta.token_index, q_max, rounding_mode="floor")
        start_t = torch.tensor(starts, device=device, dtype=torch.long)
        self.position = start_t[self.seq_of_row] + meta.token_index % q_max
        self.query_lens = torch.tensor(meta.query_lens, device=device, dtype=torch.float32)
        self.slot_mapping = meta.slot_mapping
        self.prev_slot = None
        if any(s > 0 for s in starts):
            if block_size is None:
                raise RuntimeError("AnyMoE: a step continues sequences but no gate-sum pool is bound")
            prev = [max(s - 1, 0) for s in starts]
            cols = torch.tensor([p // block_size for p in prev], device=device, dtype=torch.long)
            blocks = meta.block_tables[torch.arange(b, device=device), cols]
            offs = torch.tensor([p % block_size for p in prev], device=device, dtype=torch.long)
            self.prev_slot = blocks * block_size + offs
            self.has_prev = torch.tensor([s > 0 for s in starts], device=device)


class _Pass(threading.local):
    """What one thread's current forward knows (the engine thread serves while another thread
    may run ``AnyMoeModel.route`` on scratch tables)."""
    meta = None
    layout: StepLayout | None = None
    scratch: dict | None = None        # layer -> its scratch table, inside ``Routing.scratch``
    scratch_geometry: tuple[int, int] | None = None
    choices: dict | None = None        # layer index -> per-row experts, inside ``Routing.scratch``
    stop_after: int | None = None      # inside ``Routing.scratch``: the last layer anyone needs


class StopForward(Exception):
    """Ends a scratch forward at its last AnyMoE layer: nothing after it is needed."""


class Routing:
    """Shared by every AnyMoE layer of one model: the current step's layout (set by the
    model's ``forward_embeds`` wrapper) and the geometry of the pool the sums follow."""

    def __init__(self):
        self.block_size: int | None = None     # the engine pool's, once bound
        self._pass = _Pass()

    def begin(self, meta) -> None:
        self._pass.meta, self._pass.layout = meta, None

    def end(self) -> None:
        self._pass.meta, self._pass.layout = None, None

    def layout(self, device) -> StepLayout:
        p = self._pass
        if p.layout is None:
            block = p.scratch_geometry[1] if p.scratch is not None else self.block_size
            p.layout = StepLayout(p.meta, block, device)
        return p.layout

    @contextmanager
    def scratch(self, num_blocks: int, block_size: int, stop_after: int | None = None):
        """Forwards in this thread read and write private sum tables laid out for a cache of
        ``num_blocks`` x ``block_size`` (training, ``route``, tests), never the engine's;
        yields the experts each layer picked, per row. With ``stop_after`` (a layer index) the
        forward ends by ``StopForward`` once that AnyMoE layer has routed."""
        p = self._pass
        p.scratch, p.scratch_geometry, p.choices, p.stop_after = {}, (num_blocks, block_size), {}, stop_after
        try:
            yield p.choices
        finally:
            p.scratch = p.scratch_geometry = p.choices = p.stop_after = None

    def table(self, layer: "AnyMoeMlp", device) -> torch.Tensor:
        p = self._pass
        if p.scratch is None:
            if layer.sums is None:
                raise RuntimeError("AnyMoE: no gate-sum pool is bound to this layer")
            return layer.sums
        t = p.scratch.get(layer.layer)
        if t is None:
            n, b = p.scratch_geometry
            t = p.scratch[layer.layer] = torch.zeros(n * b, layer.num_experts, dtype=torch.float32, device=device)
        return t

    def note(self, layer: "AnyMoeMlp", choice: torch.Tensor) -> None:
        if self._pass.choices is not None:
            self._pass.choices[layer.layer] = choice
            if self._pass.stop_after == layer.layer:
                raise StopForward


def install_routing(model: nn.Module, routing: Routing) -> None:
    """Make every forward of ``model`` tell its AnyMoE layers the step's layout (the MLP
    call itself only sees the flat rows)."""
    inner = model.forward_embeds

    def forward_embeds(h, positions, meta, caches):
        routing.begin(meta)
        try:
            return inner(h, positions, meta, caches)
        finally:
            routing.end()

    model.forward_embeds = forward_embeds


class AnyMoeMlp(nn.Module):
    """``experts[0]`` is the base model's own MLP; the others come from the fine-tuned
    models or LoRA adapters, in ``model_ids`` order. ``moe_gate`` maps the MLP's input to
    one logit per expert."""

    def __init__(self, experts: list[nn.Module], hidden_size: int, layer: int, routing: Routing,
                 device, generator: torch.Generator | None = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.layer = layer
        self.num_experts = len(experts)
        self.routing = routing
        self.moe_gate = nn.Linear(hidden_size, self.num_experts, bias=True, device=device, dtype=torch.float32)
        # torch's default Linear init, drawn from our generator so a seed reproduces training.
        bound = 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            for p in self.moe_gate.parameters():
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        self.moe_gate.requires_grad_(False)
        self.sums: torch.Tensor | None = None      # [pool slots, experts] running sums
        #: while training: per sequence of the last forward, the mean gate probabilities
        #: over all its rows (with autograd), what the loss is computed on
        self.recording = False
        self.recorded: torch.Tensor | None = None

    def bind_pool(self, num_blocks: int, block_size: int, device) -> None:
        self.sums = torch.zeros(num_blocks * block_size, self.num_experts, dtype=torch.float32, device=device)

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.moe_gate(x.float()), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            layout = self.routing.layout(x.device)
            with torch.enable_grad():
                probs = self.gate_probs(x)
                self.recorded = _sequence_means(probs, layout)
            probs = probs.detach()
        else:
            probs = self.gate_probs(x)
            layout = self.routing.layout(x.device)
        choice = self._running_mean(probs, layout).argmax(dim=-1)
        self.routing.note(self, choice)
        return self._dispatch(x, choice)

    def _running_mean(self, probs: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """[T, E]: per row, the mean gate probabilities over its sequence up to and including it."""
        if layout.meta is None:
            n = torch.arange(1, probs.shape[0] + 1, device=probs.device, dtype=probs.dtype)
            return probs.cumsum(0) / n[:, None]
        e = probs.shape[1]
        table = self.routing.table(self, probs.device)
        padded = probs.new_zeros(layout.num_seqs * layout.q_max, e)
        padded.index_copy_(0, layout.token_index, probs)
        sums = padded.view(layout.num_seqs, layout.q_max, e).cumsum(1)
        if layout.prev_slot is not None:
            prev = table.index_select(0, layout.prev_slot) * layout.has_prev[:, None]
            sums = sums + prev[:, None, :]
        rows = sums.view(-1, e).index_select(0, layout.token_index)
        table.index_copy_(0, layout.slot_mapping, rows)
        return rows / (layout.position + 1).to(rows.dtype)[:, None]

    def _dispatch(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return self.experts[0](x)
        counts = torch.bincount(choice, minlength=self.num_experts).tolist()
        used = [i for i, c in enumerate(counts) if c]
        if len(used) == 1:
            return self.experts[used[0]](x)
        out = torch.empty_like(x)
        for i in used:
            rows = (choice == i).nonzero().squeeze(1)
            out.index_copy_(0, rows, self.experts[i](x.index_select(0, rows)).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}"


def _sequence_means(probs: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[B, E]: each sequence's mean gate probabilities over its rows (a fresh prefill, so
    its rows are the whole prompt)."""
    if layout.meta is None:
        return probs.mean(0, keepdim=True)
    total = probs.new_zeros(layout.num_seqs, probs.shape[1]).index_add(0, layout.seq_of_row, probs)
    return total / layout.query_lens[:, None]
