"""Tensor-parallel layers and the sharding of a model built on the meta device.

``shard_model(model, tp)`` walks a freshly built model (before any weight is read) and
replaces or re-shapes the blocks it knows, each with a ``weight_loader`` that keeps only
this rank's part of the checkpoint tensor (``loading/weights.py`` calls it per tensor,
packed GGUF blocks included):

* attention: q/k/v split by heads (column-parallel: rows of the weight), o by its input
  (row-parallel), one all-reduce after o. KV heads are split when there are at least as
  many as ranks, otherwise each rank keeps the one KV head its query heads read
  (replicated); the KV cache then holds only local heads.
* gated / plain MLP: gate/up (fc1) by rows, down (fc2) by input, one all-reduce.
* sparse MoE: experts split across ranks (expert parallelism: each rank keeps a
  contiguous range and runs only its experts; the router is replicated), the shared
  expert sharded like an MLP; one all-reduce for routed + shared.
* embedding and LM head: vocabulary-parallel (rows); the embedding's masked lookups are
  all-reduced, the head's logits all-gathered.

A block of a kind it does not know (latent attention, recurrent mixers, vision towers, a
family's own attention ``forward``) is left whole on every rank: every block reads a
replicated input and leaves a replicated output, so a replicated block is correct, only
not sharded. Norms, rope and routers are replicated.
"""
from __future__ import annotations

import logging

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistralrs_core.distributed.packed import take_cols, take_rows
from mistralrs_core.distributed.state import DistributedError, TensorParallel
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.mlp import GatedMLP, PlainMLP
from mistralrs_core.layers.moe import MoEExperts, SparseMoE

log = logging.getLogger("mistralrs")


# --- collectives --------------------------------------------------------------------
def all_reduce(tp: TensorParallel, x: torch.Tensor) -> torch.Tensor:
    tp.check()
    try:
        dist.all_reduce(x, group=tp.group)
    except (RuntimeError, DistributedError) as exc:
        raise tp.fail("all_reduce", exc) from None
    return x


def all_gather_last(tp: TensorParallel, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` [..., sizes[r]] along the last dim."""
    tp.check()
    width = max(sizes)
    if x.shape[-1] < width:
        x = F.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in range(tp.world)]
    try:
        dist.all_gather(parts, x.contiguous(), group=tp.group)
    except (RuntimeError, DistributedError) as exc:
        raise tp.fail("all_gather", exc) from None
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], -1)


def split_sizes(n: int, world: int) -> list[int]:
    """Near-equal contiguous parts (the first ``n % world`` one larger)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# --- weight loaders -----------------------------------------------------------------
def _row_loader(ranges: list[tuple[int, int]]):
    def load(param, name, value):
        return take_rows(value, ranges, name)
    load.packed_ok = True
    return load


def _col_loader(start: int, stop: int):
    def load(param, name, value):
        return take_cols(value, start, stop, name)
    load.packed_ok = True
    return load


def _set_loader(param, fn) -> None:
    if param is not None:
        param.__dict__["weight_loader"] = fn


def _meta(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def column_linear(src: Linear, ranges: list[tuple[int, int]]) -> Linear:
    """A plain Linear holding rows ``ranges`` of ``src``'s weight (and bias)."""
    out = sum(b - a for a, b in ranges)
    lin = Linear(src.in_features, out, bias=src.bias is not None)
    _set_loader(lin.weight, _row_loader(ranges))
    _set_loader(lin.bias, _row_loader(ranges))
    return lin


class RowParallelLinear(Linear):
    """Holds input columns ``[start, stop)``; sums the ranks' partial products (one
    all-reduce, skipped with ``reduce=False`` when the caller reduces a larger sum), then
    adds the (replicated) bias once."""

    def __init__(self, tp: TensorParallel, src: Linear, start: int, stop: int, reduce: bool = True):
        super().__init__(stop - start, src.out_features, bias=src.bias is not None)
        self.tp, self.reduce = tp, reduce
        _set_loader(self.weight, _col_loader(start, stop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qmethod is not None:
            y = self.qmethod.forward(x)
            y = y.to(x.dtype) if y.dtype != x.dtype else y
        else:
            y = F.linear(x, self.weight)
        if self.reduce:
            y = all_reduce(self.tp, y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(Embedding):
    """Rows ``[start, stop)`` of the vocabulary. Lookups of other rows give zeros here and
    the ranks' results are summed; as a tied LM head the logits are gathered."""

    def __init__(self, tp: TensorParallel, src: Embedding):
        self.tp = tp
        self.sizes = split_sizes(src.num_embeddings, tp.world)
        self.start, self.stop = split_range(src.num_embeddings, tp.world, tp.rank)
        super().__init__(self.stop - self.start, src.embedding_dim)
        self.full_vocab = src.num_embeddings
        _set_loader(self.weight, _row_loader([(self.start, self.stop)]))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        h = super().forward(local, dtype)
        h = h.masked_fill(outside[..., None], 0)
        return all_reduce(self.tp, h.contiguous())

    def as_lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.tp, super().as_lm_head(x), self.sizes)


class VocabParallelLMHead(Linear):
    def __init__(self, tp: TensorParallel, src: Linear):
        self.tp = tp
        self.sizes = split_sizes(src.out_features, tp.world)
        start, stop = split_range(src.out_features, tp.world, tp.rank)
        super().__init__(src.in_features, stop - start, bias=src.bias is not None)
        _set_loader(self.weight, _row_loader([(start, stop)]))
        _set_loader(self.bias, _row_loader([(start, stop)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.tp, super().forward(x), self.sizes)


# --- mixture of experts -------------------------------------------------------------
class ExpertShard(MoEExperts):
    """This rank's contiguous range of experts ``[first, first + num_experts)``; checkpoint
    tensors of other experts are dropped as they stream past."""

    def __init__(self, cfg, hidden: int, first: int, total: int):
        super().__init__(cfg, hidden)
        self.first, self.total = first, total

    def owns(self, e: int) -> bool:
        return self.first <= e < self.first + self.num_experts

    def load_expert(self, e: int, part: str, value, device, dtype, quantize=None) -> None:
        if self.owns(e):
            super().load_expert(e - self.first, part, value, device, dtype, quantize)

    def load_expert_bias(self, e: int, part: str, value, device, dtype) -> None:
        if self.owns(e):
            super().load_expert_bias(e - self.first, part, value, device, dtype)


def dispatch_owned(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertShard) -> torch.Tensor:
    """This rank's share of sum_k weights[t, k] * expert_{ids[t, k]}(x[t]): the pairs whose
    expert it holds, grouped by expert (as ``layers.moe.dispatch``)."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    local = flat - experts.first
    pairs = ((local >= 0) & (local < experts.num_experts)).nonzero().squeeze(1)
    if pairs.numel() == 0:
        return torch.zeros_like(x)
    local = local.index_select(0, pairs)
    order = torch.argsort(local, stable=True)
    pairs, local = pairs[order], local[order]
    counts = torch.bincount(local, minlength=experts.num_experts).tolist()
    token = pairs // k
    xs = x.index_select(0, token)
    out = torch.empty(pairs.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = experts.expert_forward(e, xs[start:start + n])
            start += n
    out = (out * weights.reshape(-1).index_select(0, pairs)[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


class ExpertParallelMoE(SparseMoE):
    """``SparseMoE`` whose experts are split across ranks (class swapped in by
    ``shard_model`` so module names and the router stay as built)."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return dispatch_owned(x, ids, weights, self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Routed experts and the sharded shared expert are both partial sums: one all-reduce.
        return all_reduce(self.tp, super().forward(x))


# --- sharding a model ---------------------------------------------------------------
def _kv_plan(nh: int, nkv: int, world: int, rank: int, where: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads, kv heads) of this rank as [start, stop) head ranges."""
    if nh % world:
        raise ValueError(f"tp: {where} has {nh} attention heads, not divisible by the "
                         f"tensor-parallel size {world}")
    q = (rank * nh // world, (rank + 1) * nh // world)
    if nkv % world == 0:
        return q, (rank * nkv // world, (rank + 1) * nkv // world)
    if world % nkv == 0 and nh % nkv == 0:
        # Fewer KV heads than ranks: each rank keeps the one KV head its query heads share.
        head = q[0] // (nh // nkv)
        return q, (head, head + 1)
    raise ValueError(f"tp: {where} has {nkv} KV heads; the tensor-parallel size {world} must divide "
                     f"it or be a multiple of it")


def _shard_attention(attn, tp: TensorParallel, name: str) -> int | None:
    """Returns the local KV head count, or None when the block is left whole."""
    from mistralrs_core.models.decoder import DecoderAttention
    if (type(attn).forward is not DecoderAttention.forward
            or type(attn).project_qkv is not DecoderAttention.project_qkv):
        log.info("tp: %s (%s) computes attention its own way: replicated", name, type(attn).__name__)
        return None
    nh, nkv, hd = attn.nh, attn.nkv, attn.hd
    (q0, q1), (k0, k1) = _kv_plan(nh, nkv, tp.world, tp.rank, name)
    qr, kr = (q0 * hd, q1 * hd), (k0 * hd, k1 * hd)
    if attn.cfg.qkv_fused:
        q_out, kv_out = nh * hd, nkv * hd
        ranges = [qr, (q_out + kr[0], q_out + kr[1]), (q_out + kv_out + kr[0], q_out + kv_out + kr[1])]
        attn.qkv_proj = column_linear(attn.qkv_proj, ranges)
    else:
        attn.q_proj = column_linear(attn.q_proj, [qr])
        attn.k_proj = column_linear(attn.k_proj, [kr])
        attn.v_proj = column_linear(attn.v_proj, [kr])
    o_name = attn.cfg.o_name
    setattr(attn, o_name, RowParallelLinear(tp, getattr(attn, o_name), *qr))
    if attn.sinks is not None:
        attn.sinks = _meta(q1 - q0)
        _set_loader(attn.sinks, lambda p, n, v: v[q0:q1])
    attn.nh, attn.nkv = q1 - q0, k1 - k0
    return attn.nkv


def _shard_mlp(mlp, tp: TensorParallel, name: str, reduce: bool = True) -> bool:
    if type(mlp) is GatedMLP:
        inter = mlp.down_proj.in_features
        r = split_range(inter, tp.world, tp.rank)
        if mlp.fused:
            mlp.gate_up_proj = column_linear(mlp.gate_up_proj, [r, (inter + r[0], inter + r[1])])
        else:
            mlp.gate_proj = column_linear(mlp.gate_proj, [r])
            mlp.up_proj = column_linear(mlp.up_proj, [r])
        mlp.down_proj = RowParallelLinear(tp, mlp.down_proj, *r, reduce=reduce)
        return True
    if type(mlp) is PlainMLP:
        up_name, down_name = mlp._names
        up, down = getattr(mlp, up_name), getattr(mlp, down_name)
        r = split_range(down.in_features, tp.world, tp.rank)
        setattr(mlp, up_name, column_linear(up, [r]))
        setattr(mlp, down_name, RowParallelLinear(tp, down, *r, reduce=reduce))
        return True
    log.info("tp: %s (%s) is not a known MLP: replicated", name, type(mlp).__name__)
    return False


def _shard_moe(moe: SparseMoE, tp: TensorParallel, name: str) -> bool:
    if type(moe) is not SparseMoE:
        log.info("tp: %s (%s) routes its own way: replicated", name, type(moe).__name__)
        return False
    cfg = moe.cfg
    first, stop = split_range(cfg.num_experts, tp.world, tp.rank)
    if stop == first:
        raise ValueError(f"tp: {name} has {cfg.num_experts} experts, fewer than the tensor-parallel size {tp.world}")
    moe.experts = ExpertShard(attrs.evolve(cfg, num_experts=stop - first), moe.experts.hidden, first, cfg.num_experts)
    if cfg.shared_intermediate_size:
        shared = getattr(moe, cfg.shared_name)
        if not _shard_mlp(shared, tp, f"{name}.{cfg.shared_name}", reduce=False):
            raise ValueError(f"tp: cannot shard the shared expert of {name}")
    moe.tp = tp
    # Same module, same parameters: only the forward (which experts run, the reduce) differs.
    moe.__class__ = ExpertParallelMoE
    return True


def shard_model(model: nn.Module, tp: TensorParallel) -> dict:
    """Shard ``model`` (still on the meta device) for rank ``tp.rank``; returns a summary
    (what was sharded, replicated) that the model keeps as ``model.tp_summary``."""
    from mistralrs_core.models.decoder import DecoderAttention
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("tp: the model must be sharded before its weights are loaded")
    summary = {"rank": tp.rank, "world": tp.world, "attention": 0, "mlp": 0, "moe": 0,
               "vocab": [], "replicated": []}
    kv_heads: dict[int, int] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, DecoderAttention):
            local = _shard_attention(module, tp, name)
            if local is None:
                summary["replicated"].append(name)
            else:
                kv_heads[module.layer] = local
                summary["attention"] += 1
        elif isinstance(module, SparseMoE):
            if _shard_moe(module, tp, name):
                summary["moe"] += 1
            else:
                summary["replicated"].append(name)
        elif isinstance(module, (GatedMLP, PlainMLP)) and not _inside_moe(name, model):
            if _shard_mlp(module, tp, name):
                summary["mlp"] += 1
            else:
                summary["replicated"].append(name)
    body = getattr(model, "model", None)
    emb = getattr(body, "embed_tokens", None)
    if type(emb) is Embedding:
        body.embed_tokens = VocabParallelEmbedding(tp, emb)
        summary["vocab"].append("model.embed_tokens")
    head = getattr(model, "lm_head", None)
    if type(head) is Linear:
        model.lm_head = VocabParallelLMHead(tp, head)
        summary["vocab"].append("lm_head")
    if kv_heads:
        _local_kv_specs(model, kv_heads)
    model.tensor_parallel = tp
    model.tp_summary = summary
    log.info("tp rank %d/%d: sharded %d attention, %d MLP, %d MoE blocks, vocab-parallel %s; replicated: %s",
             tp.rank, tp.world, summary["attention"], summary["mlp"], summary["moe"],
             summary["vocab"] or "none", summary["replicated"] or "none")
    return summary


def _inside_moe(name: str, model: nn.Module) -> bool:
    """A shared expert is sharded with its MoE block (no reduce of its own)."""
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else None, SparseMoE)


def _local_kv_specs(model: nn.Module, kv_heads: dict[int, int]) -> None:
    """The KV cache holds only this rank's KV heads of the sharded layers."""
    full = type(model).kv_cache_specs

    def kv_cache_specs():
        specs = full(model)
        return [attrs.evolve(s, num_heads=kv_heads[i]) if i in kv_heads and s is not None
                and hasattr(s, "num_heads") else s for i, s in enumerate(specs)]
    model.kv_cache_specs = kv_cache_specs
