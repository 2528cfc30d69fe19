"""The whole decoder forward of small steps in one C++ call (``csrc/decoder_step.cpp``).

A decode step of a small model run op by op from Python is mostly overhead: ~30 tensor
ops per layer, each a dispatch and an allocation. ``FusedDecoder`` describes a loaded
``DecoderLM`` to the C++ step once (pointers to the ggml blocks or dense float rows of
every projection, the norm weights, the layer options) and then runs steps of up to
``max_tokens`` tokens there, from the input embeddings; embedding, rotary tables and
logits stay in Python (one call each per step). It is installed as the model's
``fast_forward`` and declines (returns None) any step it does not cover, which then takes
the torch path.

Covered: float32 and bfloat16 models of the ``models/decoder.py`` layout with RMS norms (offsets,
q/k norms, sandwich norms), rotate-half rope (any scaling: the tables come from the
model), sliding windows, attention soft-capping, gated MLPs (silu / gelu / gelu-tanh),
biases, and weights as ggml blocks of the C++ kernels' types or dense float32/float16/
bfloat16 rows, over a float32 or bfloat16 paged KV cache (a bfloat16 model's residual
stream is float32 inside the step: rounded where the torch path stores, the cache and the
hidden state it returns, so it is at least as close to float32 as the op-by-op bf16 path); sparse MoE feed-forwards (``layers/moe.py``,
softmax routing, top-k, optional renormalisation and scaling, no shared experts) with each
expert's weights as ggml blocks (ISQ, UQFF) or rows of the dense stacks. Anything else keeps
the torch path.
``MISTRALRS_QUANT_NO_FUSED=1`` turns it off.

Its thread count (and the kernels' for the rest of the step, e.g. the LM head) follows a
``ThreadTuner``: all of torch's threads on a quiet machine, fewer when measurement says
other processes hold cores (``MISTRALRS_QUANT_NO_THREAD_TUNING=1`` keeps torch's count).
"""
from __future__ import annotations

import ctypes
import logging
import time
from typing import Optional

import torch
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.moe import MoEExperts, SparseMoE
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.models.decoder import DecoderAttention, DecoderLayer, DecoderLM

from ._env import env_flag
from .kernels import cpp as cpp_kernels
from .thread_tuner import ThreadTuner

log = logging.getLogger(__name__)

ENV_DISABLE = "MISTRALRS_QUANT_NO_FUSED"
ENV_NO_TUNING = "MISTRALRS_QUANT_NO_THREAD_TUNING"
# Steps with more tokens than this take the torch path: there a prefill's large matmuls
# run on dense tiles (BLAS/AMX), and the per-op overhead is amortised anyway.
MAX_TOKENS = 16

_DENSE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
_ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "gelu": 2}

c_i32, c_i64, c_f32, c_vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("type", c_i32), ("_pad", c_i32), ("w", c_vp), ("w_stride", c_i64), ("n", c_i64),
                ("k", c_i64), ("bias", c_vp)]


_LINS = ("q", "k", "v", "o", "gate", "up", "down")
_NORMS = ("in_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "q_norm", "k_norm")


class _MoE(ctypes.Structure):
    _fields_ = ([(n, c_i32) for n in ("n_experts", "top_k", "inter", "act", "renormalize", "softmax_after_topk")]
                + [("renorm_eps", c_f32), ("routed_scale", c_f32), ("router", _Lin), ("experts", c_vp)])


class _Layer(ctypes.Structure):
    _fields_ = ([(n, _Lin) for n in _LINS] + [(n, c_vp) for n in _NORMS]
                + [("kc", c_vp), ("vc", c_vp), ("window", c_i32), ("rope", c_i32), ("moe", c_vp)])


class _Model(ctypes.Structure):
    _fields_ = ([(n, c_i32) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "rot_dim",
                                      "act", "sandwich", "block_size")]
                + [(n, c_f32) for n in ("eps", "scale", "softcap")] + [("force_scalar", c_i32)]
                + [("layers", c_vp), ("final_norm", c_vp), ("kv_bf16", c_i32)])


class _Step(ctypes.Structure):
    _fields_ = [("T", c_i64), ("h", c_vp), ("cos", c_vp), ("sin", c_vp), ("cos_l", c_vp), ("sin_l", c_vp),
                ("slots", c_vp), ("pos", c_vp), ("seq", c_vp), ("btab", c_vp), ("btab_stride", c_i64)]


class Unsupported(Exception):
    """The model has a part the C++ step does not implement (the reason is the message)."""


def disabled_by_env() -> bool:
    return env_flag(ENV_DISABLE)


class FusedDecoder:
    def __init__(self, model, max_tokens: int = MAX_TOKENS, force_scalar: bool = False):
        """``force_scalar``: use the portable C++ code paths even on an AVX-512 CPU (so that
        tests on such a CPU cover what other CPUs run)."""
        self.lib = cpp_kernels._lib()
        self.max_tokens = max_tokens
        self._keep: list = []  # every tensor whose pointer the C++ side holds
        cfg = model.cfg
        # Only the layer stack is replaced: a model may embed its inputs its own way (encoder
        # features merged into placeholder rows) and still use the step.
        if not isinstance(model, DecoderLM) or type(model).forward_embeds is not DecoderLM.forward_embeds:
            raise Unsupported(f"{type(model).__name__} is not a plain DecoderLM")
        if model.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"model dtype {model.dtype} (the step serves float32 and bfloat16 models)")
        checks = {"norm_kind": cfg.norm_kind == "rms", "parallel_block": not cfg.parallel_block,
                  "mlp_kind": cfg.mlp_kind == "gated", "attn_sinks": not cfg.attn_sinks,
                  "rope_interleaved": not cfg.rope_interleaved, "causal": cfg.causal,
                  "qk_norm_kind": not cfg.qk_norm or cfg.qk_norm_kind == "rms",
                  "hidden_act": cfg.hidden_act in _ACTS}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise Unsupported(f"config option(s) {', '.join(bad)}")
        self.model = model
        self.rot_dim = model.rope.rotary_dim if model.rope is not None else 0
        if model.local_rope is not None and model.local_rope.rotary_dim != self.rot_dim:
            raise Unsupported("local and global rope of different widths")
        if self.rot_dim % 2 or self.rot_dim > cfg.head_dim:
            raise Unsupported(f"rotary dim {self.rot_dim}")

        layers = (_Layer * cfg.num_layers)()
        inter = None
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            moe = isinstance(mlp, SparseMoE)
            if (type(layer).forward is not DecoderLayer.forward or not isinstance(attn, DecoderAttention)
                    or type(attn).forward is not DecoderAttention.forward
                    or type(attn).project_qkv is not DecoderAttention.project_qkv
                    or not (moe or isinstance(mlp, GatedMLP) and type(mlp).forward is GatedMLP.forward)):
                raise Unsupported(f"layer {i} overrides the decoder layout")
            L = layers[i]
            q_out, kv_out = attn.nh * attn.hd, attn.nkv * attn.hd
            fused = getattr(attn, "_qkv_runtime", None) or (attn.qkv_proj if cfg.qkv_fused else None)
            if fused is not None:
                L.q, L.k, L.v = self._split(fused, [q_out, kv_out, kv_out])
            else:
                L.q, L.k, L.v = (self._lin(attn.q_proj), self._lin(attn.k_proj), self._lin(attn.v_proj))
            L.o = self._lin(getattr(attn, cfg.o_name))
            if moe:
                L.moe = self._moe(mlp, cfg, i)
            else:
                L.gate, L.up, L.down = self._mlp(mlp)
                inter = L.gate.n if inter is None else inter
                if L.gate.n != inter or L.down.k != inter:
                    raise Unsupported(f"layer {i} projection shapes differ from the config")
            if L.q.n != q_out or L.k.n != kv_out:
                raise Unsupported(f"layer {i} projection shapes differ from the config")
            L.in_norm = self._norm(layer.input_layernorm)
            L.post_attn_norm = self._norm(layer.post_attention_layernorm)
            if cfg.sandwich_norms:
                L.pre_ffn_norm = self._norm(layer.pre_feedforward_layernorm)
                L.post_ffn_norm = self._norm(layer.post_feedforward_layernorm)
            if cfg.qk_norm:
                qn, kn = cfg.qk_norm_names
                L.q_norm, L.k_norm = self._norm(getattr(attn, qn)), self._norm(getattr(attn, kn))
            if attn.scale != model.model.layers[0].self_attn.scale:
                raise Unsupported("per-layer attention scales")   # the step takes one scale
            L.window = attn.sliding_window or 0
            L.rope = 0 if not attn.use_rope else (2 if cfg.is_sliding(i) and model.local_rope is not None else 1)
        eps = {layer.input_layernorm.eps for layer in model.model.layers}
        final = getattr(model.model, cfg.final_norm_name)
        eps.add(final.eps)
        if len(eps) != 1:
            raise Unsupported("norms with different eps")
        self.layers = layers
        self.desc = _Model(n_layers=cfg.num_layers, hidden=cfg.hidden_size, n_heads=cfg.num_heads,
                           n_kv=cfg.num_kv_heads, head_dim=cfg.head_dim, inter=inter or 0, rot_dim=self.rot_dim,
                           act=_ACTS[cfg.hidden_act], sandwich=int(cfg.sandwich_norms), block_size=0,
                           eps=eps.pop(), scale=model.model.layers[0].self_attn.scale,
                           softcap=cfg.attn_softcap or 0.0, force_scalar=int(force_scalar),
                           layers=ctypes.addressof(layers),
                           final_norm=self._norm(final))
        self._caches_key = None
        self.tune = not env_flag(ENV_NO_TUNING)
        self.tuner: Optional[ThreadTuner] = None
        self._step = _Step()
        self._step_ref = ctypes.byref(self._step)
        self._desc_ref = ctypes.byref(self.desc)

    # --- description ------------------------------------------------------
    def _ptr(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm) -> int:
        """The float32 weight the torch RMSNorm multiplies by (offset folded in, computed
        the way RMSNorm.forward computes it)."""
        if type(norm) is not RMSNorm:
            raise Unsupported(f"{type(norm).__name__} norm")
        w = norm.weight.float() + norm.offset if norm.offset else norm.weight.float()
        return self._ptr(w.contiguous())

    def _mlp(self, mlp) -> tuple[_Lin, _Lin, _Lin]:
        if not isinstance(mlp, GatedMLP) or type(mlp).forward is not GatedMLP.forward:
            raise Unsupported(f"{type(mlp).__name__} feed-forward")
        if mlp.fused:
            half = mlp.gate_up_proj.out_features // 2
            gate, up = self._split(mlp.gate_up_proj, [half, half])
        else:
            gate, up = self._lin(mlp.gate_proj), self._lin(mlp.up_proj)
        return gate, up, self._lin(mlp.down_proj)

    def _moe(self, moe, cfg, i: int) -> int:
        """A SparseMoE layer as the C++ step's ``MqMoE``: the routings it implements, each
        expert's gate / up / down as ggml blocks (ISQ, UQFF) or rows of the dense stacks."""
        from mistralrs_core.layers.moe import QuantizedExperts
        c, ex = moe.cfg, moe.experts
        if (type(moe).forward is not SparseMoE.forward or type(moe).dispatch is not SparseMoE.dispatch
                or type(ex).expert_forward is not MoEExperts.expert_forward or "expert_forward" in ex.__dict__):
            raise Unsupported(f"layer {i}: {type(moe).__name__} overrides the MoE layout")
        checks = {"scoring": c.scoring == "softmax", "groups": c.n_group is None or c.n_group <= 1,
                  "score_correction_bias": not c.score_correction_bias, "activation": c.activation == "gated",
                  "expert_bias": not c.expert_bias, "hidden_act": c.hidden_act in _ACTS, "top_k": 0 < c.top_k <= 64,
                  "shared_experts": not c.shared_intermediate_size}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise Unsupported(f"layer {i}: MoE option(s) {', '.join(bad)}")
        router = getattr(moe, c.router_name)
        e, h, inter = ex.num_experts, ex.hidden, ex.intermediate
        parts = (_Lin * (3 * e))()
        if isinstance(ex.quant, QuantizedExperts):
            for j in range(e):
                for n, p in enumerate(("gate", "up", "down")):
                    q = ex.quant.parts[(j, p)]
                    parts[3 * j + n] = self._weight(q, None, q.in_features, q.out_features, None)
        elif ex.quant is None and ex.gate_up_proj is not None:
            for j in range(e):
                gu, dn = ex.gate_up_proj.data[j], ex.down_proj.data[j]
                parts[3 * j] = self._weight(None, gu, h, 2 * inter, None, 0, inter)
                parts[3 * j + 1] = self._weight(None, gu, h, 2 * inter, None, inter, 2 * inter)
                parts[3 * j + 2] = self._weight(None, dn, inter, h, None)
        else:
            raise Unsupported(f"layer {i}: experts run by {type(ex.quant).__name__}")
        self._keep.append(parts)
        desc = _MoE(n_experts=e, top_k=c.top_k, inter=inter, act=_ACTS[c.hidden_act], renormalize=int(c.renormalize),
                    softmax_after_topk=int(c.softmax_after_topk), renorm_eps=c.renormalize_eps,
                    routed_scale=c.routed_scaling_factor,
                    router=self._weight(getattr(router, "qmethod", None), router.weight, h, e, router.bias),
                    experts=ctypes.addressof(parts))
        self._keep.append(desc)
        return ctypes.addressof(desc)

    def _lin(self, lin, r0: int = 0, r1: Optional[int] = None) -> _Lin:
        """Rows [r0, r1) of a Linear as the C++ step sees them."""
        return self._weight(lin.qmethod, lin.weight, lin.in_features, lin.out_features, lin.bias, r0, r1)

    def _weight(self, q, w, k: int, n: int, bias, r0: int = 0, r1: Optional[int] = None) -> _Lin:
        """Rows [r0, r1) of a weight [n, k] (a quant method ``q``, else the dense ``w``)."""
        from .qlinear import GGMLQuantMethod

        r1 = n if r1 is None else r1
        if q is not None:
            if type(q) is not GGMLQuantMethod or q.raw is None or not cpp_kernels.supports(q.ggml_type):
                raise Unsupported(f"weight storage {q!r}")
            raw = q.raw
            self._keep.append(raw)
            typ, base, stride = q.ggml_type, raw.data_ptr(), raw.stride(0)
        else:
            if w is None or w.dtype not in _DENSE_TYPES or w.device.type != "cpu" or w.shape[1] % 16:
                raise Unsupported(f"dense weight {None if w is None else (w.dtype, tuple(w.shape))}")
            w = w.data.contiguous()
            self._keep.append(w)
            typ, base, stride = _DENSE_TYPES[w.dtype], w.data_ptr(), w.stride(0) * w.element_size()
        b = 0
        if bias is not None:
            b = self._ptr(bias.data.float()[r0:r1].contiguous())
        return _Lin(type=typ, w=base + r0 * stride, w_stride=stride, n=r1 - r0, k=k, bias=b or None)

    def _split(self, lin, sizes) -> list[_Lin]:
        out, r0 = [], 0
        for s in sizes:
            out.append(self._lin(lin, r0, r0 + s))
            r0 += s
        return out

    # --- running ------------------------------------------------------------
    def _bind_caches(self, caches) -> bool:
        key = tuple(id(c) for c in caches)
        if key == self._caches_key:
            return True
        kv_dtype = getattr(getattr(caches[0], "k", None), "dtype", None)
        for L, c in zip(self.layers, caches):
            k, v = getattr(c, "k", None), getattr(c, "v", None)
            if (k is None or v is None or k.dtype not in (torch.float32, torch.bfloat16) or k.dtype != kv_dtype
                    or v.dtype != kv_dtype or not k.is_contiguous() or not v.is_contiguous()
                    or k.device.type != "cpu"):
                return False
            L.kc, L.vc = k.data_ptr(), v.data_ptr()
        self.desc.block_size = caches[0].block_size
        self.desc.kv_bf16 = int(kv_dtype == torch.bfloat16)
        self._caches_key = key
        self._bound_caches = list(caches)  # keep them alive while their pointers are held
        return True

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, meta, caches) -> Optional[torch.Tensor]:
        t = embeds.shape[0]
        # Multi-axis rope positions and bidirectional spans are outside what the step covers.
        if (t == 0 or t > self.max_tokens or caches is None or not meta.causal or positions.dim() != 1
                or meta.bidirectional_spans is not None
                or len(caches) != len(self.layers) or not self._bind_caches(caches)):
            return None
        model = self.model
        # The step writes its output over its input: never over the caller's tensor.
        h = embeds.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        # The tensors below are locals, so they outlive the C++ call that reads them.
        s = self._step
        s.T, s.h = t, h.data_ptr()
        if model.rope is not None:
            cos, sin = (x.contiguous() for x in model.rope.cos_sin(positions, torch.float32))
            cos_l, sin_l = cos, sin
            if model.local_rope is not None:
                cos_l, sin_l = (x.contiguous() for x in model.local_rope.cos_sin(positions, torch.float32))
            s.cos, s.sin, s.cos_l, s.sin_l = cos.data_ptr(), sin.data_ptr(), cos_l.data_ptr(), sin_l.data_ptr()
        pos = positions.to(torch.int64).contiguous()
        seq = torch.div(meta.token_index, meta.q_max, rounding_mode="floor")
        btab = meta.block_tables.contiguous()
        slots = meta.slot_mapping.contiguous()
        s.slots, s.pos, s.seq, s.btab = slots.data_ptr(), pos.data_ptr(), seq.data_ptr(), btab.data_ptr()
        s.btab_stride = btab.shape[1]
        if self.tune:
            n = torch.get_num_threads()
            if self.tuner is None or self.tuner.levels[-1] != n:
                self.tuner = ThreadTuner(n)
            k = self.tuner.pick(t)
            # Set every step: the cap is one per process, and other models' steps set it too.
            self.lib.mq_set_thread_cap(k if k < n else 0)
            t0 = time.perf_counter()
            rc = self.lib.mq_decoder_step(self._desc_ref, self._step_ref)
            self.tuner.record(t, time.perf_counter() - t0)
        else:
            rc = self.lib.mq_decoder_step(self._desc_ref, self._step_ref)
        if rc:
            raise RuntimeError(f"mistralrs_quant decoder step failed (code {rc})")
        # A bfloat16 model's residual stream runs in float32 inside the step (rounded only
        # where the torch path stores: the cache, and the hidden state handed back).
        return h if embeds.dtype == torch.float32 else h.to(embeds.dtype)


def install(model) -> Optional[FusedDecoder]:
    """Attach a ``FusedDecoder`` as ``model.fast_forward`` when the model fits and the
    kernels are available; otherwise leave the model as it is (logged at debug level)."""
    if disabled_by_env() or not cpp_kernels.available():
        return None
    try:
        fused = FusedDecoder(model)
    except Unsupported as exc:
        log.debug("mistralrs_quant: decoder step not used for %s: %s", type(model).__name__, exc)
        return None
    model.fast_forward = fused
    return fused
