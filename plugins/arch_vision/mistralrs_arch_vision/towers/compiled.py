"""A ViT tower's encoder layers compiled once per model load for CPU inference.

On CPU the eager tower spends its non-GEMM time in separate passes over the activations
(bias adds, layer norms, GELU, residual adds: ~10% of the eager tower's time in float32 and
~22% in bf16 for CLIP-L at 336 px, see bench/README.md). Inductor fuses those passes into a
few C++ loops. The GEMMs and the attention are the same library kernels either way, so the
gain is bounded by the non-GEMM share.

``freezing`` is asked for, but on torch 2.13 it folds nothing: dynamo inlines the layers, so
inductor sees the weights as graph inputs (its freezing pass finds no parameters) and the
GEMMs are ``aten::mm`` on the plain weights. Prepacking them ourselves does not pay: the
tower with its 1024-wide linears on oneDNN's prepacked GEMM (through a custom op) against
this graph, interleaved in one process, had the same best time (0.569 against 0.562 s), and
for the 4096 -> 1024 linear the prepacked GEMM is slower (0.70 against 0.95 TFLOP/s, see
``bench/amx_gemm_ceiling.py``).

The graph is compiled for one shape, [1, tokens, hidden] (one image; a tower's processor
resizes every image to one size), and a batch runs image by image through it: a GEMM with
577 or 4096 rows is already at the library's speed (in bf16, 8 x 577 rows ran slower per row
than 577), and one shape means one compile, paid at load by a warm-up call, never by a request. Any
other shape (or a compile that failed) runs the eager layers.

``MISTRALRS_VISION_COMPILE``: ``auto`` (default: compile CPU towers of at least
``AUTO_MIN_PARAMS`` parameters when a C++ compiler is found), ``1`` (compile any tower on
CPU), ``0`` (never). A failed compile logs a warning and the tower stays eager.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import torch
from torch import nn

from mistralrs_core import progress
from mistralrs_core.layers.attention_backends import EncoderBatch

log = logging.getLogger(__name__)

ENV = "MISTRALRS_VISION_COMPILE"
#: below this many encoder parameters the compile (seconds) costs more than it saves
AUTO_MIN_PARAMS = 50_000_000
#: inductor settings of the compile
INDUCTOR_OPTIONS = {"freezing": True}


def compile_setting() -> str:
    """``auto``, ``on`` or ``off`` from the environment (unknown values read as ``auto``)."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    return "auto"


def have_cxx() -> bool:
    """Whether inductor's C++ backend has a compiler to call."""
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


class FrozenEncoder:
    """Encoder layers as one compiled graph over [1, tokens, hidden].

    ``keep``: the hidden states returned, as HF numbers them (0: the input, i: after layer i);
    the graph runs the layers up to ``max(keep)``."""

    def __init__(self, layers: list[nn.Module], keep: tuple[int, ...], tokens: int, hidden: int):
        self.layers = layers[:max(keep)]
        self.keep = tuple(keep)
        self.shape = (tokens, hidden)
        self.batch = EncoderBatch.padded()     # built outside the graph: dynamo cannot trace attrs' __init__
        self.compile_s: float | None = None
        self._fn = torch.compile(self._run, dynamic=False, fullgraph=True, options=dict(INDUCTOR_OPTIONS))

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [x] if 0 in self.keep else []
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, self.batch)
            if i in self.keep:
                out.append(x)
        return tuple(out)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dim() == 3 and tuple(x.shape[1:]) == self.shape and x.device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, tokens, hidden] -> the kept states, each [B, tokens, hidden]."""
        per_image = [self._fn(x[i:i + 1]) for i in range(x.shape[0])]
        if len(per_image) == 1:
            return list(per_image[0])
        return [torch.cat(parts) for parts in zip(*per_image)]

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile now (not on the first request) and check the graph against the eager
        layers on one random input."""
        with torch.inference_mode():
            # Made inside inference mode like the engine's inputs: dynamo guards on the
            # tensor's dispatch keys, and a plain tensor here would mean a second compile on
            # the first request.
            x = torch.randn(1, *self.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            t = time.perf_counter()
            got = self(x)
            self.compile_s = time.perf_counter() - t
            want = self._run(x)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for g, w in zip(got, want):
            err = (g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-6)
            if not err <= tol:
                raise RuntimeError(f"compiled encoder differs from eager by {err:.3g} (relative)")


def maybe_compile_encoder(layers: list[nn.Module], keep: tuple[int, ...], tokens: int,
                          hidden: int) -> FrozenEncoder | None:
    """The tower's ``FrozenEncoder`` when the setting, device and size call for one, else None.
    Never raises: a missing compiler or a failed compile leaves the tower eager."""
    setting = compile_setting()
    if setting == "off" or not layers or not keep or max(keep) == 0:
        return None
    params = [p for layer in layers[:max(keep)] for p in layer.parameters()]
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cpu":
        return None
    if setting == "auto" and (sum(p.numel() for p in params) < AUTO_MIN_PARAMS or not have_cxx()):
        return None
    progress.notice(f"compiling the vision tower for {tokens} tokens (once per load, takes seconds; "
                    f"MISTRALRS_VISION_COMPILE=0 skips it)")
    try:
        enc = FrozenEncoder(layers, keep, tokens, hidden)
        enc.warm_up(params[0].dtype)
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; eager always works
        log.warning("vision tower compile failed, running it eager: %s: %s", type(e).__name__, e)
        return None
    log.info("vision tower compiled for %s tokens in %.1f s", tokens, enc.compile_s)
    return enc
