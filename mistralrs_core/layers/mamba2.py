"""Mamba-2 mixer over the flat token batch, with per-sequence state in a slot pool.

Per layer and sequence the state is the last ``d_conv - 1`` inputs of the causal
depthwise convolution and the SSM state [heads, head_dim, d_state] (float32). A step
(prefill chunk or decode) pads the batch to [B, q_max], continues every sequence from its
stored state and writes the new state back. Padding tokens get dt = 0, which leaves the
SSM state untouched (decay exp(0) = 1, input dt * x = 0), so right padding never leaks
into a sequence's state.

The scan is the chunked "state space duality" form: within a chunk, outputs are a masked
decay-weighted attention over the chunk plus the decayed incoming state; chunks are
chained through their final states.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention import AttentionMetadata
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.recurrent import (LayerRecurrentState, RecurrentStateSpec, batch_slots, pad_tokens,
                                             unpad_tokens)


@attrs.define
class Mamba2Config:
    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    norm_eps: float = 1e-6
    hidden_act: str = "silu"

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_spec(self) -> RecurrentStateSpec:
        return RecurrentStateSpec({"conv": (self.conv_kernel - 1, self.conv_dim),
                                   "ssm": (self.num_heads, self.head_dim, self.state_size)}, float32=("ssm",))


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``x * silu(z)`` over ``n_groups`` equal groups, in float32."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


class _ConvWeights(nn.Module):
    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(channels, device="meta"), requires_grad=False) if bias else None


def ssd_scan(x, dt, a, b, c, h0, chunk: int):
    """x [B, L, H, P], dt [B, L, H] (>= 0), a [H] (< 0), b/c [B, L, H, N], h0 [B, H, P, N]
    (all float32) -> (y [B, L, H, P], final state [B, H, P, N])."""
    ys = []
    h = h0
    for s in range(0, x.shape[1], chunk):
        xs, dts, bs, cs = x[:, s:s + chunk], dt[:, s:s + chunk], b[:, s:s + chunk], c[:, s:s + chunk]
        cum = torch.cumsum(dts * a, dim=1)                                   # [B, l, H]
        n = xs.shape[1]
        seg = cum[:, :, None, :] - cum[:, None, :, :]                        # [B, t, s, H]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(seg.masked_fill(~causal[None, :, :, None], float("-inf")))
        xdt = xs * dts[..., None]
        scores = torch.einsum("bthn,bshn->btsh", cs, bs) * decay
        y = torch.einsum("btsh,bshp->bthp", scores, xdt)
        y = y + torch.einsum("bthn,bhpn->bthp", cs, h) * torch.exp(cum)[..., None]
        to_end = torch.exp(cum[:, -1:] - cum)                                # [B, l, H]
        h = (torch.exp(cum[:, -1])[:, :, None, None] * h
             + torch.einsum("bshn,bshp->bhpn", bs * to_end[..., None], xdt))
        ys.append(y)
    return torch.cat(ys, 1), h


class Mamba2Mixer(nn.Module):
    """Checkpoint names: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        inter, conv_dim, heads = cfg.intermediate_size, cfg.conv_dim, cfg.num_heads
        self.in_proj = Linear(cfg.hidden_size, inter + conv_dim + heads, cfg.proj_bias)
        self.conv1d = _ConvWeights(conv_dim, cfg.conv_kernel, cfg.conv_bias)

        def vec():
            return nn.Parameter(torch.empty(heads, device="meta"), requires_grad=False)
        self.dt_bias, self.A_log, self.D = vec(), vec(), vec()
        self.norm = GatedRMSNorm(inter, cfg.n_groups, cfg.norm_eps)
        self.out_proj = Linear(inter, cfg.hidden_size, cfg.proj_bias)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, state: LayerRecurrentState | None) -> torch.Tensor:
        c = self.cfg
        inter, heads, n, g = c.intermediate_size, c.num_heads, c.state_size, c.n_groups
        z, xbc, dt = self.in_proj(x).split([inter, c.conv_dim, heads], -1)
        slots, fresh = batch_slots(meta, x.device)
        q_lens = torch.tensor(meta.query_lens, device=x.device)
        k = c.conv_kernel - 1

        # Causal depthwise conv continuing from the stored last k inputs of each sequence.
        prev = (state.read("conv", slots, fresh) if state is not None
                else xbc.new_zeros(meta.num_seqs, k, c.conv_dim))
        seq = torch.cat((prev.to(xbc.dtype), pad_tokens(xbc, meta)), 1)      # [B, k + q_max, C]
        if state is not None:
            tail = q_lens[:, None] + torch.arange(k, device=x.device)[None]
            state.write("conv", slots, seq.gather(1, tail[..., None].expand(-1, -1, c.conv_dim)))
        conv = F.conv1d(seq.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, groups=c.conv_dim)
        xbc = self.act(conv.transpose(1, 2))                                  # [B, q_max, C]

        b_, l_ = meta.num_seqs, meta.q_max
        xs, bm, cm = xbc.split([inter, g * n, g * n], -1)
        xs = xs.reshape(b_, l_, heads, c.head_dim).float()
        rep = heads // g
        bm = bm.reshape(b_, l_, g, n).float().repeat_interleave(rep, dim=2)
        cm = cm.reshape(b_, l_, g, n).float().repeat_interleave(rep, dim=2)
        dt = F.softplus(pad_tokens(dt, meta).float() + self.dt_bias.float())
        dt = dt.clamp(min=c.time_step_limit[0], max=c.time_step_limit[1])
        valid = torch.arange(l_, device=x.device)[None] < q_lens[:, None]
        dt = dt * valid[..., None]
        a = -torch.exp(self.A_log.float())
        h0 = (state.read("ssm", slots, fresh) if state is not None
              else xs.new_zeros(b_, heads, c.head_dim, n))
        y, h = ssd_scan(xs, dt, a, bm, cm, h0, c.chunk_size)
        if state is not None:
            state.write("ssm", slots, h)
        y = y + xs * self.D.float()[:, None]
        # Kept in float32 through the gated norm, as the reference's prefill path does.
        y = unpad_tokens(y.reshape(b_, l_, inter), meta)
        return self.out_proj(self.norm(y, z).to(x.dtype))
