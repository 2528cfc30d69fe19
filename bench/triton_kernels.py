"""The Triton kernels of mistralrs_quant against the torch paths, on a CUDA device.

    .venv/bin/python bench/triton_kernels.py [--types Q4_0,Q4_K,...] [--m 1,8,512]
                                             [--shapes 4096x4096,11008x4096] [--no-attention]

Quantized matmuls: for each weight shape [out, in], format and M, the Triton kernel
(GEMV for M ≤ 8, tiled GEMM above, bf16 activations) against the torch path on the same
device: dequantize the packed weight with the torch dequantizer, then ``F.linear`` in bf16
(what a CUDA weight without triton runs), and a dense bf16 ``F.linear`` as the yardstick.
Paged attention: one decode step (one query per sequence, GQA 32/8 heads of 128, pages of
32 tokens): the kernel alone, ``attention()`` reaching it through the core's decode-attention
seam, and the torch backend (gather the context, SDPA; ``MISTRALRS_DECODE_ATTENTION=torch``). Times are medians from
``triton.testing.do_bench``; the table is markdown.

Without a CUDA device (or without triton) it says so and exits with status 0: the kernels
are exercised on CPU by plugins/quant/tests/test_quant_triton.py under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import sys

import torch

DEFAULT_TYPES = "Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,MXFP4,AFQ4,HQQ4"


def _requirements() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); install mistralrs-quant[cuda]"
    return None


def _views(name: str, out_f: int, in_f: int):
    """(Triton view, torch forward of x) for format ``name`` on a random weight."""
    import torch.nn.functional as F

    from mistralrs_quant.formats import GGML_TYPES, T
    from mistralrs_quant.formats.afq import AFQMethod
    from mistralrs_quant.formats.hqq import HQQMethod
    from mistralrs_quant.kernels.triton import quant_matmul as qm
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    if name.startswith("AFQ"):
        m = AFQMethod.from_float(w, int(name[3:]))
        view = qm.afq_view(m.w_q, m.scales, m.biases, m.bits, m.group_size)
        return view, lambda x: F.linear(x, m.dequantize().to(x.dtype))
    if name.startswith("HQQ"):
        m = HQQMethod.from_float(w, int(name[3:]))
        view = qm.hqq_view(m.w_q, m.scales, m.zeros, out_f, in_f, m.bits, m.group_size)
        return view, lambda x: F.linear(x, m.dequantize().to(x.dtype))
    spec = GGML_TYPES[getattr(T, name)]
    # Timing does not depend on the values: random bytes with small f16 scales where the
    # format has a quantizer, else random bytes.
    raw = spec.quantize(w.cpu()).cuda() if spec.quantize is not None else torch.randint(
        0, 256, (out_f, in_f // spec.block_size * spec.type_size), dtype=torch.uint8, device="cuda")
    view = qm.ggml_view(raw, spec.ggml_type, spec.block_size, spec.type_size)
    return view, lambda x: F.linear(x, spec.dequantize(raw).to(x.dtype))


def bench_matmuls(shapes, types, ms):
    from triton.testing import do_bench

    from mistralrs_quant.kernels.triton import quant_matmul as qm
    print("| shape | format | M | triton µs | torch dequant+matmul µs | speed-up | dense bf16 µs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for out_f, in_f in shapes:
        dense = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        for name in types:
            view, torch_fwd = _views(name, out_f, in_f)
            for m in ms:
                x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
                t_tri = do_bench(lambda: qm.matmul(x, view)) * 1e3
                t_ref = do_bench(lambda: torch_fwd(x)) * 1e3
                t_dense = do_bench(lambda: torch.nn.functional.linear(x, dense)) * 1e3
                print(f"| {out_f}x{in_f} | {name} | {m} | {t_tri:.1f} | {t_ref:.1f} | {t_ref / t_tri:.2f}x "
                      f"| {t_dense:.1f} |", flush=True)


def bench_attention(batches, contexts):
    from triton.testing import do_bench

    import os

    from mistralrs_core.layers.attention import AttentionMetadata, KVCacheSpec, LayerKVCache, attention
    from mistralrs_core.layers.decode_kernels import ENV
    from mistralrs_quant.kernels.triton.paged_attention import paged_decode_attention
    hq, hkv, d, page = 32, 8, 128, 32
    saved = os.environ.get(ENV)

    def through_core(mode):
        # attention() as a model calls it: "auto" reaches the kernel through the core's
        # decode-attention seam (K/V write included), "torch" is the torch backend.
        os.environ[ENV] = mode
        return do_bench(lambda: attention(q, k, k, meta, cache, scale=d ** -0.5)) * 1e3

    print("\n| batch | context | triton µs | attention() auto µs | torch backend µs | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in batches:
        for ctx in contexts:
            per_seq = -(-ctx // page)
            cache = LayerKVCache(KVCacheSpec(hkv, d, d), b * per_seq, page, torch.bfloat16, "cuda")
            cache.k.normal_()
            cache.v.normal_()
            bt = torch.randperm(b * per_seq, device="cuda").reshape(b, per_seq)
            meta = AttentionMetadata(query_lens=[1] * b, context_lens=[ctx] * b,
                                     slot_mapping=bt[:, -1] * page + (ctx - 1) % page, block_tables=bt,
                                     token_index=torch.arange(b, device="cuda"), q_max=1, k_max=ctx)
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, hkv, d, device="cuda", dtype=torch.bfloat16)
            t_tri = do_bench(lambda: paged_decode_attention(q, cache, meta, scale=d ** -0.5)) * 1e3
            t_auto, t_ref = through_core("auto"), through_core("torch")
            print(f"| {b} | {ctx} | {t_tri:.1f} | {t_auto:.1f} | {t_ref:.1f} | {t_ref / t_auto:.2f}x |", flush=True)
    if saved is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--m", default="1,8,512")
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--no-attention", action="store_true")
    args = ap.parse_args(argv)
    missing = _requirements()
    if missing:
        print(f"bench/triton_kernels.py: nothing to time: {missing}. The kernels are tested on CPU by "
              "plugins/quant/tests/test_quant_triton.py (TRITON_INTERPRET=1).")
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bench_matmuls(shapes, args.types.split(","), [int(m) for m in args.m.split(",")])
    if not args.no_attention:
        bench_attention([1, 16], [1024, 8192])
    return 0


if __name__ == "__main__":
    sys.exit(main())
