"""Dia (Nari Labs) in torch: a byte-level text encoder and an audio-code decoder over
parallel codebooks, built from core layers (``Linear``, ``RMSNorm``, ``GatedMLP``, rope,
``EncoderAttention``, ``CrossAttentionCache``).

Module names follow the transformers 5 layout (``DiaForConditionalGeneration`` without
its ``model.`` prefix); the original release's names and multi-axis ("DenseGeneral")
kernels are rewritten to it while the weights stream in (``original_layout.py``).

Attention is unscaled (Dia trains with ``scale = 1``). The cross-attention has no rope
(as transformers computes it; the first original release rotated it too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import CrossAttentionCache, EncoderAttention, EncoderBatch
from mistralrs_core.layers.linear import Embedding, Linear, fuse_linears
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.layers.rope import apply_rotary

from mistralrs_arch_speech.dia_config import DiaConfig, StackConfig
from mistralrs_arch_speech.kv_pool import DecoderKVPool

_attend = EncoderAttention()


class DiaRMSNorm(RMSNorm):
    """The core's RMSNorm (float32 statistics, cast back, then the weight) with the
    statistics in one ``F.rms_norm`` call instead of five Python-level ops: a decode step
    runs nineteen norms on a couple of rows, where dispatch costs more than arithmetic
    (measured ~11 against ~19 us a norm). Same results, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset or not self.cast_before_scale:
            return super().forward(x)
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight.to(x.dtype) * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Projections(nn.Module):
    def __init__(self, q_in: int, kv_in: int, heads: int, kv_heads: int, head_dim: int, out: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = Linear(q_in, heads * head_dim)
        self.k_proj = Linear(kv_in, kv_heads * head_dim)
        self.v_proj = Linear(kv_in, kv_heads * head_dim)
        self.o_proj = Linear(heads * head_dim, out)
        self.qkv_proj: Linear | None = None

    def fuse_self(self) -> None:
        """Self-attention reads q, k and v from the same input: one matmul instead of three
        (the decode step is a few rows, so per-call overhead counts)."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x: torch.Tensor):
        """x [..., hidden] -> q [..., H, D], k/v [..., Hkv, D]."""
        lead = x.shape[:-1]
        q_n, kv_n = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split((q_n, kv_n, kv_n), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.reshape(*lead, self.heads, self.head_dim), k.reshape(*lead, self.kv_heads, self.head_dim),
                v.reshape(*lead, self.kv_heads, self.head_dim))

    def qk_v(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, hidden] -> (q and k as one [R, H + Hkv, D], v [R, Hkv, D]): the rotary
        embedding then runs once over both."""
        r, d = x.shape[0], self.head_dim
        if self.qkv_proj is not None:
            out = self.qkv_proj(x).view(r, self.heads + 2 * self.kv_heads, d)
            return out[:, :self.heads + self.kv_heads], out[:, self.heads + self.kv_heads:]
        q, k, v = self.qkv(x)
        return torch.cat((q, k), 1), v


class EncoderLayer(nn.Module):
    def __init__(self, c: StackConfig):
        super().__init__()
        self.pre_sa_norm = DiaRMSNorm(c.hidden, c.norm_eps)
        self.self_attention = Projections(c.hidden, c.hidden, c.heads, c.kv_heads, c.head_dim, c.hidden)
        self.post_sa_norm = DiaRMSNorm(c.hidden, c.norm_eps)
        self.mlp = GatedMLP(c.hidden, c.intermediate, c.act, fused=True)

    def forward(self, x, cos, sin, batch: EncoderBatch):
        b, s, _ = x.shape
        q, k, v = self.self_attention.qkv(self.pre_sa_norm(x))
        q = apply_rotary(q.flatten(0, 1), cos, sin).view_as(q)
        k = apply_rotary(k.flatten(0, 1), cos, sin).view_as(k)
        a = _attend(q, k, v, batch, scale=1.0)
        x = x + self.self_attention.o_proj(a.reshape(b, s, -1))
        return x + self.mlp(self.post_sa_norm(x))


class DiaEncoder(nn.Module):
    def __init__(self, cfg: DiaConfig):
        super().__init__()
        c = cfg.encoder
        self.cfg = c
        self.embedding = Embedding(cfg.text_vocab, c.hidden)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))
        self.norm = DiaRMSNorm(c.hidden, c.norm_eps)

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, S] (right-padded when ``key_mask`` [B, S] marks the real bytes)."""
        b, s = ids.shape
        x = self.embedding(ids)
        pos = torch.arange(s, device=ids.device).repeat(b)
        cos, sin = rope_cos_sin(pos, self.cfg.inv_freq, x.dtype)
        batch = EncoderBatch.padded(key_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DiaConfig):
        super().__init__()
        c = cfg.decoder
        self.pre_sa_norm = DiaRMSNorm(c.hidden, c.norm_eps)
        self.self_attention = Projections(c.hidden, c.hidden, c.heads, c.kv_heads, c.head_dim, c.hidden)
        self.pre_ca_norm = DiaRMSNorm(c.hidden, c.norm_eps)
        self.cross_attention = Projections(c.hidden, cfg.encoder.hidden, cfg.cross_heads, cfg.cross_kv_heads,
                                           cfg.cross_head_dim, c.hidden)
        self.pre_mlp_norm = DiaRMSNorm(c.hidden, c.norm_eps)
        self.mlp = GatedMLP(c.hidden, c.intermediate, c.act, fused=True)

    def cross_kv(self, enc: torch.Tensor):
        a = self.cross_attention
        lead = enc.shape[:-1]
        return (a.k_proj(enc).view(*lead, a.kv_heads, a.head_dim),
                a.v_proj(enc).view(*lead, a.kv_heads, a.head_dim))

    def forward(self, x, step: "DecodeStep", layer: int):
        """x [R, hidden]: one new frame per row (R = 2 x requests: conditional, unconditional)."""
        r = x.shape[0]
        sa = self.self_attention
        qk, v = sa.qk_v(self.pre_sa_norm(x))
        qk = step.rotate(qk)
        q, k = qk[:, :sa.heads], qk[:, sa.heads:]
        keys, values = step.pool.write_and_view(layer, step.rows, step.positions, k, v, step.kv_len, step.leading,
                                                same_position=step.self_mask is None)
        a = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=step.self_mask, scale=1.0, enable_gqa=sa.heads != sa.kv_heads)
        x = x + sa.o_proj(a.reshape(r, -1))

        ca = self.cross_attention
        q = ca.q_proj(self.pre_ca_norm(x)).view(r, ca.heads, 1, ca.head_dim)
        ck, cv, _ = step.cross[layer].gather(step.rows_list)
        a = F.scaled_dot_product_attention(q, ck.transpose(1, 2).to(q.dtype), cv.transpose(1, 2).to(q.dtype),
                                           attn_mask=step.cross_mask, scale=1.0,
                                           enable_gqa=ca.heads != ca.kv_heads)
        x = x + ca.o_proj(a.reshape(r, -1))
        return x + self.mlp(self.pre_mlp_norm(x))


class MultiChannelEmbedding(nn.Module):
    """One table for all codebooks: codebook c's token t is row c * vocab + t; a frame's
    embedding is the sum over its codebooks."""

    def __init__(self, cfg: DiaConfig):
        super().__init__()
        self.embed = Embedding(cfg.channels * cfg.audio_vocab, cfg.decoder.hidden)
        self.register_buffer("offsets", torch.arange(cfg.channels) * cfg.audio_vocab, persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, C] -> [N, hidden]."""
        return self.embed(frames + self.offsets.to(frames.device)).sum(1)


class DiaDecoder(nn.Module):
    def __init__(self, cfg: DiaConfig):
        super().__init__()
        self.cfg = cfg.decoder
        self.embeddings = MultiChannelEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder.layers))
        self.norm = DiaRMSNorm(cfg.decoder.hidden, cfg.decoder.norm_eps)


class DecodeStep:
    """What every decoder layer reads in one step: the rows (two per request) and their
    positions, the self-attention pool and masks, the per-layer cross-attention caches, the
    rotary tables. Built once per step, so the layers do no bookkeeping of their own."""

    def __init__(self, pool: DecoderKVPool, cross: list[CrossAttentionCache], rows: torch.Tensor,
                 positions: torch.Tensor, enc_lens: list[int]):
        self.pool, self.cross, self.rows, self.positions = pool, cross, rows, positions
        self.rows_list = rows.tolist()
        self.leading = self.rows_list == list(range(len(self.rows_list)))
        pos = positions.tolist()
        self.kv_len = kv_len = max(pos) + 1
        dev = rows.device
        # Rows at one position (a lone request, or requests admitted together) see every key:
        # no mask, SDPA's plain path. Masks are [R, 1, 1, keys], True where a key is visible.
        self.self_mask = None if min(pos) == kv_len - 1 else \
            (torch.arange(kv_len, device=dev)[None, :] <= positions[:, None])[:, None, None, :]
        self.cross_mask = None
        if min(enc_lens) != max(enc_lens):
            lens = torch.tensor(enc_lens, device=dev)
            self.cross_mask = (torch.arange(max(enc_lens), device=dev)[None, :] < lens[:, None])[:, None, None, :]
        self.cos = self.sin = None

    def set_rope(self, tables: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The rows' cos and signed sin [R, 1, D] from per-position tables (``rope_tables``)."""
        cos, sin = tables
        self.cos = cos.index_select(0, self.positions)[:, None, :]
        self.sin = sin.index_select(0, self.positions)[:, None, :]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, heads, D] (every head dim rotated, as Dia does)."""
        return x * self.cos + x.roll(self.cos.shape[-1] // 2, -1) * self.sin


def rope_tables(positions: int, inv_freq: torch.Tensor, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [positions, D] for the decode step's rotary embedding.
    rotate_half(x) * sin equals roll(x, D/2) * sin with its first half negated, which saves
    the split, negation and concatenation in every layer (bit for bit the same products)."""
    cos, sin = rope_cos_sin(torch.arange(positions, device=device), inv_freq, dtype)
    half = cos.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), -1)


class DiaModel(nn.Module):
    """Encoder + decoder + the per-codebook logits head."""

    def __init__(self, cfg: DiaConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.encoder = DiaEncoder(cfg)
        self.decoder = DiaDecoder(cfg)
        self.logits_dense = Linear(cfg.decoder.hidden, cfg.channels * cfg.audio_vocab)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def post_load(self) -> None:
        for layer in list(self.encoder.layers) + list(self.decoder.layers):
            layer.self_attention.fuse_self()

    # transformers 5 names carry a ``model.`` prefix on everything but the head.
    @staticmethod
    def map_weight_name(name: str) -> str | None:
        return name[len("model."):] if name.startswith("model.") else name

    @property
    def device(self) -> torch.device:
        # (The embedding table: linear layers may hold their weight packed.)
        return self.decoder.embeddings.embed.weight.device

    @torch.inference_mode()
    def encode(self, text_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(text_ids, key_mask)

    @torch.inference_mode()
    def cross_kv(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, cross-attention (k, v) [B, S, Hkv, D] of encoder states [B, S, hidden]."""
        return [layer.cross_kv(enc) for layer in self.decoder.layers]

    @torch.inference_mode()
    def decode(self, frames: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """frames [R, C] (already duplicated per guidance branch) -> logits [R, C, V] float32."""
        dec = self.decoder
        x = dec.embeddings(frames).to(self.dtype)
        if self._rope is None or self._rope[0].dtype != x.dtype or self._rope[0].device != x.device:
            # Every position at once (the decoder's maximum: a few MB), computed on first use.
            self._rope = rope_tables(dec.cfg.max_positions, dec.cfg.inv_freq, x.dtype, x.device)
        step.set_rope(self._rope)
        for i, layer in enumerate(dec.layers):
            x = layer(x, step, i)
        logits = self.logits_dense(dec.norm(x)).float()
        return logits.view(frames.shape[0], self.cfg.channels, self.cfg.audio_vocab)
