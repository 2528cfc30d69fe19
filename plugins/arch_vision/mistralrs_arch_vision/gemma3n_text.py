"""The Gemma 3n text decoder on the core's paged attention.

What differs from a Gemma 3 decoder, all kept here:

* **AltUp**: the residual stream is ``altup_num_inputs`` copies ``[N, T, hidden]``. The input
  embedding is the first; the others are its projections rescaled to its RMS. Each layer
  *predicts* all copies from a router over the active one (``altup_active_idx``), runs
  attention + MLP on the active prediction only, then *corrects* every copy by the
  innovation. At the end the copies are projected back, rescaled and averaged.
* **Laurel**: a low-rank residual branch (``linear_left`` → ``linear_right`` → norm) next
  to attention; the two are summed and divided by sqrt(2).
* **Per-layer embeddings**: every token also gets a ``hidden_size_per_layer_input`` vector
  per layer: its own table entry (``embed_tokens_per_layer``, ids outside that table read
  row 0) plus a projection of the input embedding, normalised; each layer gates its
  active output with it and adds the result to the other copies.
* **KV sharing**: the last ``num_kv_shared_layers`` layers have no K/V of their own; they
  attend over the K/V of the last earlier layer of their attention type. They have no
  cache (``kv_cache_specs`` gives None), never write, and read the source layer's paged
  blocks (or, on a fresh prefill, the K/V that layer computed in the same step).
* activation sparsity: on the layers of ``activation_sparsity_pattern`` > 0 the gate is
  cut to ``relu(g - (mean + std * icdf(p)))`` before the activation (a Gaussian top-k);
* q/k norms with weights, a weightless v norm, attention scale 1, Gemma 3n's RMSNorm
  (``x * w``, not ``x * (1 + w)``), final logit soft-capping.

The embedding of a step carries the per-layer token embeddings next to the ordinary ones
(``embed`` returns ``[T, hidden + layers * per_layer]``): the per-layer part depends on
the token ids, which ``forward_embeds`` never sees, and image / audio features replace only
the first ``hidden`` columns (``merge_features``), as transformers keeps the placeholder
ids' per-layer rows when it splices features in.
"""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention import KVCacheSpec, attention
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.layers.rope import apply_rotary
from mistralrs_core.models.decoder import DecoderConfig, DecoderLM
from mistralrs_core.models.gemma_config import gemma_activation, layer_type_rope
from mistralrs_core.models.text_config import base_config

# transformers' Gemma3nTextConfig defaults (gemma-3n-E4B): a text_config lists only what differs.
GEMMA3N_TEXT_DEFAULTS = dict(
    vocab_size=262_400, hidden_size=2048, intermediate_size=16_384, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32_768,
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, sliding_window=512,
    final_logit_softcapping=30.0, vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256,
    altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True, altup_num_inputs=4,
    num_kv_shared_layers=15, laurel_rank=64)


@attrs.define
class Gemma3nTextConfig(DecoderConfig):
    intermediate_sizes: list[int] = attrs.Factory(list)       # per layer
    activation_sparsity: list[float] = attrs.Factory(list)    # per layer, 0 = dense
    per_layer_vocab: int = 0
    per_layer_dim: int = 0
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = None
    altup_correct_scale: bool = True
    laurel_rank: int = 0
    # per layer: the layer whose K/V it attends over (its own index unless KV-shared)
    kv_source: list[int] = attrs.Factory(list)

    def shares_kv(self, layer: int) -> bool:
        return self.kv_source[layer] != layer


def kv_sources(layer_types: list[str], num_shared: int) -> list[int]:
    """Per layer the layer whose K/V it uses: the last ``num_shared`` layers reuse the last
    earlier layer of their own attention type (transformers' ``kv_sharing_modes``)."""
    n = len(layer_types)
    if not 0 <= num_shared < n:
        raise ValueError(f"num_kv_shared_layers: {num_shared} for {n} layers (must leave one layer with its "
                         f"own K/V)")
    first = n - num_shared
    out = list(range(n))
    for i in range(first, n):
        owners = [j for j in range(first) if layer_types[j] == layer_types[i]]
        if not owners:
            raise ValueError(f"num_kv_shared_layers: shared layer {i} ({layer_types[i]}) has no earlier "
                             f"{layer_types[i]} layer to take K/V from")
        out[i] = owners[-1]
    return out


def gemma3n_text_config(text: dict) -> Gemma3nTextConfig:
    # An explicit null keeps its meaning (final_logit_softcapping: null = no cap), as in transformers.
    t = {**GEMMA3N_TEXT_DEFAULTS, **text}
    n = int(t["num_hidden_layers"])
    inter = t["intermediate_size"]
    inter = list(inter) if isinstance(inter, (list, tuple)) else [int(inter)] * n
    types = t.get("layer_types") or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                                     for i in range(n)]
    sparsity = t.get("activation_sparsity_pattern")
    if sparsity is None:
        sparse = 10 if n > 10 else 0
        sparsity = [0.95] * sparse + [0.0] * (n - sparse)
    elif isinstance(sparsity, (int, float)):
        sparsity = [float(sparsity)] * n
    for name, values in (("intermediate_size", inter), ("layer_types", types),
                         ("activation_sparsity_pattern", sparsity)):
        if len(values) != n:
            raise ValueError(f"text_config.{name}: {len(values)} values for {n} layers")
    if any(not 0.0 <= float(s) < 1.0 for s in sparsity):
        raise ValueError("text_config.activation_sparsity_pattern: each value must be in [0, 1)")
    head_dim = int(t["head_dim"])
    active = int(t["altup_active_idx"])
    if not 0 <= active < int(t["altup_num_inputs"]):
        raise ValueError(f"text_config.altup_active_idx: {active} is not one of the "
                         f"{t['altup_num_inputs']} AltUp inputs")
    base = attrs.asdict(base_config(
        t, intermediate_size=max(inter), norm_offset=0.0, hidden_act=gemma_activation(t),
        tie_word_embeddings=bool(t["tie_word_embeddings"]), qkv_bias=bool(t["attention_bias"]),
        o_bias=bool(t["attention_bias"]), qk_norm=True, attn_scale=1.0, sandwich_norms=True,
        embed_scale=math.sqrt(t["hidden_size"]), final_softcap=t.get("final_logit_softcapping"),
        sliding_window=t["sliding_window"], layer_types=list(types),
        rope=layer_type_rope(t, "full_attention", head_dim), local_rope=layer_type_rope(t, "sliding_attention", head_dim)),
        recurse=False)
    clip = t.get("altup_coef_clip")
    return Gemma3nTextConfig(
        **base, intermediate_sizes=[int(x) for x in inter], activation_sparsity=[float(s) for s in sparsity],
        per_layer_vocab=int(t["vocab_size_per_layer_input"]), per_layer_dim=int(t["hidden_size_per_layer_input"]),
        altup_num_inputs=int(t["altup_num_inputs"]), altup_active_idx=active,
        altup_coef_clip=None if clip is None else float(clip), altup_correct_scale=bool(t["altup_correct_scale"]),
        laurel_rank=int(t["laurel_rank"]), kv_source=kv_sources(list(types), int(t["num_kv_shared_layers"])))


# --------------------------------------------------------------------------- small pieces
def rms_norm(dim: int, eps: float) -> RMSNorm:
    """Gemma 3n's RMSNorm: ``x * w`` (not Gemma's 1 + w), the product taken in float32."""
    return RMSNorm(dim, eps, cast_before_scale=False)


def unscaled_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The weightless RMSNorm (v norm, the embedders' post-projection norm), in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class CoefProjection(nn.Module):
    """A tiny bias-free projection (AltUp's coefficient maps, [N, N] and [N*N, N]) kept
    dense: too small for any quantized format."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))


def rescale_to(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """``x`` with its per-token RMS set to ``target_rms`` (AltUp's (un)embedding projections)."""
    rms = torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target_rms / rms


class ReadOnlyKV:
    """Another layer's paged cache, seen by a KV-shared layer: reads its blocks, never writes."""

    def __init__(self, cache):
        self._cache = cache

    def write(self, slot_mapping, k, v) -> None:
        pass

    def gather(self, block_tables, max_len):
        return self._cache.gather(block_tables, max_len)


# --------------------------------------------------------------------------- the layer
class Gemma3nAttention(nn.Module):
    def __init__(self, cfg: Gemma3nTextConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.shared = cfg.shares_kv(layer)
        # K/V another layer reads in the same step (kept only for those layers)
        self.lends_kv = not self.shared and layer in cfg.kv_source[layer + 1:]
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, cfg.qkv_bias)
        self.q_norm = rms_norm(self.hd, cfg.norm_eps)
        if not self.shared:
            self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, cfg.qkv_bias)
            self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, cfg.qkv_bias)
            self.k_norm = rms_norm(self.hd, cfg.norm_eps)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, cfg.o_bias)
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer) else None

    def forward(self, x, rope_cs, meta, caches, step_kv: dict):
        t = x.shape[0]
        cos, sin = rope_cs
        q = apply_rotary(self.q_norm(self.q_proj(x).view(t, self.nh, self.hd)), cos, sin)
        if self.shared:
            src = self.cfg.kv_source[self.layer]
            k, v = step_kv[src]
            cache = caches[src] if caches is not None else None
            cache = ReadOnlyKV(cache) if cache is not None else None
        else:
            k = apply_rotary(self.k_norm(self.k_proj(x).view(t, self.nkv, self.hd)), cos, sin)
            v = unscaled_rms_norm(self.v_proj(x).view(t, self.nkv, self.hd), self.cfg.norm_eps)
            if self.lends_kv:
                step_kv[self.layer] = (k, v)
            cache = caches[self.layer] if caches is not None else None
        o = attention(q, k, v, meta, cache, scale=1.0, sliding_window=self.sliding_window)
        return self.o_proj(o.reshape(t, self.nh * self.hd))


class Gemma3nMLP(nn.Module):
    def __init__(self, cfg: Gemma3nTextConfig, layer: int):
        super().__init__()
        inter = cfg.intermediate_sizes[layer]
        self.gate_proj = Linear(cfg.hidden_size, inter)
        self.up_proj = Linear(cfg.hidden_size, inter)
        self.down_proj = Linear(inter, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)
        self.sparsity = cfg.activation_sparsity[layer]
        if self.sparsity > 0:
            # icdf of the standard normal at the target sparsity, as torch's Normal computes it
            p = torch.tensor(self.sparsity, dtype=torch.float32, device="cpu")
            self.std_multiplier = float(torch.erfinv(2 * p - 1) * math.sqrt(2))

    def forward(self, x):
        g = self.gate_proj(x)
        if self.sparsity > 0:
            # Gaussian top-k: keep what lies above mean + std * icdf(sparsity) of the row.
            mult = torch.tensor(self.std_multiplier, dtype=g.dtype, device=g.device)
            cutoff = g.mean(-1, keepdim=True) + g.std(-1, keepdim=True, unbiased=False) * mult
            g = torch.relu(g - cutoff)
        return self.down_proj(self.act(g) * self.up_proj(x))


class Gemma3nAltUp(nn.Module):
    def __init__(self, cfg: Gemma3nTextConfig):
        super().__init__()
        n = cfg.altup_num_inputs
        self.n, self.active, self.clip = n, cfg.altup_active_idx, cfg.altup_coef_clip
        self.correct_output_scale = nn.Parameter(torch.empty(cfg.hidden_size, device="meta"), requires_grad=False)
        self.correction_coefs = CoefProjection(n, n)
        self.prediction_coefs = CoefProjection(n, n * n)
        self.modality_router = CoefProjection(cfg.hidden_size, n)
        self.router_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.router_input_scale = 1.0 / cfg.hidden_size

    def post_load(self) -> None:
        # The coefficient bound of training, applied once to the weights (trained weights lie
        # inside it; transformers clamps only while training).
        if self.clip is not None:
            for w in (self.correction_coefs.weight, self.prediction_coefs.weight):
                w.data.clamp_(-self.clip, self.clip)

    def modalities(self, x):
        scale = torch.tensor(self.router_input_scale, dtype=x.dtype, device=x.device)
        return torch.tanh(self.modality_router(self.router_norm(x) * scale).float()).to(x.dtype)

    def predict(self, h):
        """h [N, T, hidden] -> predictions [N, T, hidden]."""
        m = self.modalities(h[self.active])
        coefs = self.prediction_coefs(m).view(-1, self.n, self.n).transpose(1, 2)    # [T, N, N]
        pred = torch.matmul(h.permute(1, 2, 0), coefs).permute(2, 0, 1)
        return (pred + h).to(h.dtype)

    def correct(self, pred, activated):
        m = self.modalities(activated)
        innovation = activated - pred[self.active]
        coefs = (self.correction_coefs(m) + 1.0).t().unsqueeze(-1)                    # [N, T, 1]
        return (innovation.unsqueeze(0) * coefs + pred).to(activated.dtype)

    def scale_output(self, x):
        return (x * self.correct_output_scale.to(x.dtype)).to(x.dtype)


class Gemma3nLaurel(nn.Module):
    def __init__(self, cfg: Gemma3nTextConfig):
        super().__init__()
        self.linear_left = Linear(cfg.hidden_size, cfg.laurel_rank)
        self.linear_right = Linear(cfg.laurel_rank, cfg.hidden_size)
        self.post_laurel_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x):
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nDecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3nTextConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.self_attn = Gemma3nAttention(cfg, layer)
        self.mlp = Gemma3nMLP(cfg, layer)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            setattr(self, name, rms_norm(cfg.hidden_size, cfg.norm_eps))
        self.altup = Gemma3nAltUp(cfg)
        self.laurel = Gemma3nLaurel(cfg)
        self.per_layer_input_gate = Linear(cfg.hidden_size, cfg.per_layer_dim)
        self.per_layer_projection = Linear(cfg.per_layer_dim, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, h, rope_cs, per_layer_input, meta, caches, step_kv):
        """h [N, T, hidden], per_layer_input [T, per_layer_dim] -> [N, T, hidden]."""
        c = self.cfg
        pred = self.altup.predict(h)
        active = pred[c.altup_active_idx]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn = self.post_attention_layernorm(self.self_attn(normed, rope_cs, meta, caches, step_kv))
        x = (active + attn + laurel) / math.sqrt(2)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(pred, x)
        first = corrected[c.altup_active_idx]
        if c.altup_correct_scale:
            first = self.altup.scale_output(first)
        gate = self.act(self.per_layer_input_gate(first)) * per_layer_input
        extra = self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return torch.cat([corrected[:1], corrected[1:] + extra], dim=0)


# --------------------------------------------------------------------------- the model
class Gemma3nTextLM(DecoderLM):
    """Gemma 3n's text model (``model.*`` as ``Gemma3nForCausalLM`` names it, tied head)."""
    layer_cls = Gemma3nDecoderLayer
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    def __init__(self, cfg: Gemma3nTextConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, dtype)
        m, n_layers, p = self.model, cfg.num_layers, cfg.per_layer_dim
        m.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        m.embed_tokens_per_layer = Embedding(cfg.per_layer_vocab, n_layers * p)
        m.per_layer_model_projection = Linear(cfg.hidden_size, n_layers * p)
        m.per_layer_projection_norm = rms_norm(p, cfg.norm_eps)
        m.altup_projections = nn.ModuleList(
            [Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(cfg.altup_num_inputs - 1)])
        m.altup_unembed_projections = nn.ModuleList(
            [Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(cfg.altup_num_inputs - 1)])

    @classmethod
    def config_from_hf(cls, hf: dict) -> Gemma3nTextConfig:
        return gemma3n_text_config(hf)

    def kv_cache_specs(self):
        c = self.cfg
        return [None if c.shares_kv(i) else KVCacheSpec(c.num_kv_heads, c.head_dim, c.head_dim)
                for i in range(c.num_layers)]

    def map_weight_name(self, name):
        name = super().map_weight_name(name)
        if name is None:
            return None
        # Released checkpoints keep (unused) K/V weights for the KV-shared layers.
        if name.startswith("model.layers.") and any(f".self_attn.{w}." in name
                                                    for w in ("k_proj", "v_proj", "k_norm", "v_norm")):
            layer = int(name.split(".")[2])
            if layer < self.cfg.num_layers and self.cfg.shares_kv(layer):
                return None
        return name

    # --- embeddings: [T, hidden] ordinary + [T, layers * per_layer_dim] per-layer
    def per_layer_token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Each token's own per-layer rows, ``[T, layers * per_layer_dim]`` (ids outside the
        per-layer table, image and audio ones among them, read row 0 as the reference does)."""
        c = self.cfg
        inside = (ids >= 0) & (ids < c.per_layer_vocab)
        rows = self.model.embed_tokens_per_layer(torch.where(inside, ids, torch.zeros_like(ids)), self.dtype)
        return rows * torch.tensor(math.sqrt(c.per_layer_dim), dtype=rows.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().embed(input_ids), self.per_layer_token_embeddings(input_ids)], dim=-1)

    def merge_features(self, embeds, rows, features):
        h = embeds.clone()
        h[rows, :self.cfg.hidden_size] = features.to(h.dtype)
        return h

    def per_layer_inputs(self, h: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
        """[T, layers, per_layer_dim]: the projection of the (feature-spliced) embeddings,
        normalised, plus the token's own rows, over sqrt(2)."""
        c = self.cfg
        proj = self.model.per_layer_model_projection(h)
        proj = proj * torch.tensor(c.hidden_size ** -0.5, dtype=h.dtype)
        proj = self.model.per_layer_projection_norm(proj.view(-1, c.num_layers, c.per_layer_dim))
        scale = torch.rsqrt(torch.tensor(2.0)).to(h.dtype)
        return (proj + token_rows.view(-1, c.num_layers, c.per_layer_dim)) * scale

    def forward_embeds(self, packed, positions, meta, caches):
        c, m = self.cfg, self.model
        h0, token_rows = packed[:, :c.hidden_size], packed[:, c.hidden_size:]
        per_layer = self.per_layer_inputs(h0, token_rows)
        target = torch.mean(h0 ** 2, dim=-1, keepdim=True) ** 0.5
        h = torch.stack([h0] + [rescale_to(p(h0), target) for p in m.altup_projections])
        cs = self.rope.cos_sin(positions, h0.dtype)
        cs_local = self.local_rope.cos_sin(positions, h0.dtype)
        step_kv: dict = {}
        for i, layer in enumerate(m.layers):
            h = layer(h, cs_local if c.is_sliding(i) else cs, per_layer[:, i], meta, caches, step_kv)
        target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [h[0]] + [rescale_to(p(h[k + 1]), target) for k, p in enumerate(m.altup_unembed_projections)]
        return m.norm(torch.stack(outs).mean(0))
