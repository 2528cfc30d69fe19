"""HQQ, AFQ, FP8 and F8Q8 quant methods against their references (mlx for AFQ, the hqq
package's solver step for HQQ, the published definitions for FP8/F8Q8)."""
import numpy as np
import pytest
import torch

from mistralrs_quant.formats.afq import AFQMethod
from mistralrs_quant.formats.f8q8 import F8Q8Method
from mistralrs_quant.formats.fp8 import FP8Method
from mistralrs_quant.formats.hqq import HQQMethod


def _weight(out=96, inn=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    w[3] = 0.0                                   # a constant group
    w[5, :64] = torch.linspace(-1, 3, 64)        # max-dominated group
    w[6, :64] = torch.linspace(-3, 1, 64)        # min-dominated group
    return w


def _check_method(m, w_deq, x_rows=3):
    x = torch.randn(x_rows, m.in_features, generator=torch.Generator().manual_seed(1))
    # The quantized-kernel contract (qlinear's): |y - x W^T| <= 1e-5 sum |x||w|, against the
    # float64 product. The C++ kernels sum in another order than torch's BLAS, so an
    # absolute 1e-5 only held while forward and reference used the same BLAS (FP8 blocks
    # with |w| ~ 50: either order is ~3e-4 off the float64 product there).
    ref = x.double() @ w_deq.double().T
    bound = x.abs().double() @ w_deq.abs().double().T
    err = (m.forward(x).double() - ref).abs()
    assert (err <= 1e-5 * bound).all(), float((err / bound).max())
    ids = torch.tensor([[4, 1], [0, 4]])
    torch.testing.assert_close(m.embedding(ids), w_deq[ids])
    assert m.dequantize().dtype == torch.float32 and m.dequantize().shape == (m.out_features, m.in_features)


# --- AFQ ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_afq_matches_mlx_bit_for_bit(bits, group):
    mx = pytest.importorskip("mlx.core")
    w = _weight()
    m = AFQMethod.from_float(w, bits, group)
    q, s, b = mx.quantize(mx.array(w.numpy()), group_size=group, bits=bits)
    assert np.array_equal(m.w_q.to(torch.int64).numpy().astype(np.uint32), np.array(q))
    assert np.array_equal(m.scales.numpy(), np.array(s))
    assert np.array_equal(m.biases.numpy(), np.array(b))
    ref = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits))
    np.testing.assert_allclose(m.dequantize().numpy(), ref, rtol=0, atol=1e-6)
    _check_method(m, m.dequantize())


def test_afq_rejects_bad_shapes_and_bits():
    with pytest.raises(ValueError, match="group size"):
        AFQMethod.from_float(torch.zeros(4, 96), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        AFQMethod.from_float(torch.zeros(4, 64), 5, 64)


def test_afq_concat():
    a, b = AFQMethod.from_float(_weight(32), 4), AFQMethod.from_float(_weight(64, seed=2), 4)
    c = AFQMethod.concat([a, b])
    torch.testing.assert_close(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


# --- HQQ ---------------------------------------------------------------------------
def _hqq_reference(w, bits, group, steps):
    """Upstream's procedure written with the hqq package's own step and bitpack."""
    opt = pytest.importorskip("hqq.core.optimize")
    from hqq.core.bitpack import BitPack
    W = w.float().reshape(group, -1)
    qmax = 2 ** bits - 1
    lo, hi = W.amin(0, keepdim=True), W.amax(0, keepdim=True)
    scale = (qmax / (hi - lo)).clamp(0.0, 2e4)
    zero = -lo * scale
    beta, best = 10.0, float("inf")
    for _ in range(steps):
        W_r, W_q, zero, scale = opt.optimize_weights_proximal_legacy_step(W, scale, zero, [0, qmax], beta, 0.7, 0)
        beta *= 1.01
        err = float((W - W_r).abs().mean())
        if err < best:
            best = err
        else:
            break
    W_q = torch.round(W * scale + zero).clamp(0, qmax)
    packed = BitPack.pack_4bit_u8(W_q) if bits == 4 else W_q.to(torch.uint8)
    return packed, 1.0 / scale, zero


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_matches_reference(bits):
    w = _weight()
    m = HQQMethod.from_float(w, bits)
    packed, scales, zeros = _hqq_reference(w, bits, 64, 10)
    assert torch.equal(m.w_q, packed)
    torch.testing.assert_close(m.scales, scales, rtol=0, atol=0)
    torch.testing.assert_close(m.zeros, zeros, rtol=1e-6, atol=1e-6)
    deq = m.dequantize()
    ref = ((torch.cat([packed >> 4, packed & 15]) if bits == 4 else packed).float() - zeros) * scales
    torch.testing.assert_close(deq, ref.reshape(w.shape), rtol=1e-6, atol=1e-6)
    # The solver helps: mean error below plain min/max rounding's.
    err = (deq - w).abs().mean()
    assert err < (0.02 if bits == 4 else 0.002)
    _check_method(m, deq)


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_shards_equal_the_whole_layer_sliced(bits):
    """A tensor-parallel shard's forward is the whole layer's output at its rows, or the
    whole layer's output for its columns' inputs (zeros elsewhere). Whole bands of rows and
    any columns of a layer with rows a multiple of the group are HQQ layers of their own
    (``local``: own codes, the C++ kernel over only them); other ranges run the whole layer."""
    from mistralrs_quant.formats.hqq import HQQShard
    from mistralrs_quant.kernels import cpp as cpp_kernels
    torch.manual_seed(1)
    full = HQQMethod.from_float(torch.randn(128, 96), bits, steps=2)    # 2 rows per band
    odd = HQQMethod.from_float(torch.randn(96, 128), bits, steps=2)     # rows not whole bands
    cases = [(full, {"rows": [(0, 64)]}, True), (full, {"rows": [(64, 128)]}, True),
             (full, {"rows": [(0, 32), (96, 128)]}, True),              # a fused q/k/v's parts
             (full, {"rows": [(0, 2)]}, bits == 8),                     # one band: 4-bit packs pairs
             (full, {"rows": [(0, 31), (64, 97)]}, False),              # not whole bands
             (full, {"cols": (0, 48)}, True), (full, {"cols": (40, 96)}, True),
             (odd, {"rows": [(0, 48)]}, False), (odd, {"cols": (64, 128)}, False)]
    for layer, part, local in cases:
        shard = layer.take_rows(part["rows"]) if "rows" in part else layer.take_cols(*part["cols"])
        assert isinstance(shard, HQQShard) and (shard.local is not None) == local, part
        whole = layer.dequantize()
        for m in (1, 3, 40):                  # the fused decode path and the tiled prefill path
            x = torch.randn(m, layer.in_features)
            if "rows" in part:
                idx = torch.cat([torch.arange(a, b) for a, b in part["rows"]])
                assert torch.equal(shard.dequantize(), whole[idx])
                want, got = layer.forward(x)[:, idx], shard.forward(x)
            else:
                c0, c1 = part["cols"]
                assert torch.equal(shard.dequantize(), whole[:, c0:c1])
                wide = torch.zeros_like(x)
                wide[:, c0:c1] = x[:, c0:c1]
                want, got = layer.forward(wide), shard.forward(x[:, c0:c1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda e: f"{part} M={m}: {e}")
        if local:
            assert shard.nbytes < layer.nbytes and shard.full is None
            if cpp_kernels.available():
                assert shard.local._cpu_kernel is not None      # the C++ kernel ran, not the torch path
        assert torch.equal(shard.to("cpu").dequantize(), shard.dequantize())
    # Two column shards add up to the whole layer (what the all-reduce of a row-parallel layer does).
    x = torch.randn(2, 96)
    halves = full.take_cols(0, 48).forward(x[:, :48]) + full.take_cols(48, 96).forward(x[:, 48:])
    torch.testing.assert_close(halves, full.forward(x), rtol=1e-5, atol=1e-5)


# --- FP8 ---------------------------------------------------------------------------
def test_fp8_per_tensor_isq():
    w = _weight()
    m = FP8Method.from_float(w)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight.shape == w.shape
    wb = w.to(torch.bfloat16)
    scale = (torch.reciprocal(wb.abs().max()) * 448.0).to(torch.bfloat16)
    ref_q = (wb * scale).to(torch.float8_e4m3fn)
    assert torch.equal(m.weight.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(m.dequant_scale, (1.0 / scale.float()))
    deq = m.dequantize()
    torch.testing.assert_close(deq, ref_q.float() / scale.float())
    assert (deq - w).abs().max() < 0.07 * w.abs().max()
    _check_method(m, deq)


def test_fp8_block_scales():
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(200, 300, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.5
    m = FP8Method(q, s, block=(128, 128))
    ref = torch.empty(200, 300)
    for i in range(200):
        for j in range(0, 300, 4):
            ref[i, j:j + 4] = q[i, j:j + 4].float() * s[i // 128, j // 128]
    torch.testing.assert_close(m.dequantize(), ref, rtol=0, atol=0)
    _check_method(m, ref)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        FP8Method(q, torch.ones(1, 3), block=(128, 128))


# --- F8Q8 --------------------------------------------------------------------------
def _f8q8_reference(w):
    out = []
    for row in w.numpy().astype(np.float32):
        r = []
        for blk in row.reshape(-1, 32):
            d = np.float32(np.abs(blk).max() / np.float32(127))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            q = np.clip(np.sign(blk * inv) * np.floor(np.abs(blk * inv) + np.float32(0.5)), -128, 127).astype(np.int8)
            ds = torch.tensor(d * np.float32(448)).to(torch.float8_e4m3fn).float().item() / 448.0
            r.append(q.astype(np.float32) * np.float32(ds))
        out.append(np.concatenate(r))
    return torch.tensor(np.stack(out))


def test_f8q8_matches_definition():
    w = _weight(16, 128)
    m = F8Q8Method.from_float(w)
    assert m.blocks.shape == (16, 4, 33)
    torch.testing.assert_close(m.dequantize(), _f8q8_reference(w), rtol=1e-6, atol=0)
    _check_method(m, m.dequantize())
    c = F8Q8Method.concat([m, m])
    assert c.out_features == 32


# --- UQFF entries ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda w: HQQMethod.from_float(w, 4), lambda w: HQQMethod.from_float(w, 8),
                                  lambda w: AFQMethod.from_float(w, 3), lambda w: AFQMethod.from_float(w, 6),
                                  lambda w: FP8Method.from_float(w), lambda w: F8Q8Method.from_float(w)])
def test_uqff_tensors_round_trip_through_safetensors(make, tmp_path):
    from safetensors.torch import load_file, save_file
    m = make(_weight())
    entries = m.to_uqff_tensors()
    save_file({f"model.layers.0.q_proj.{k}": v.contiguous() for k, v in entries.items()}, tmp_path / "x.safetensors")
    back = {k[len("model.layers.0.q_proj."):]: v for k, v in load_file(tmp_path / "x.safetensors").items()}
    assert back["weight.format"].dtype == torch.uint8
    m2 = type(m).from_uqff_tensors(back)
    assert torch.equal(m2.dequantize(), m.dequantize())
    bad = dict(back, **{"weight.format": torch.tensor(1, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="weight.format"):
        type(m).from_uqff_tensors(bad)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_afq4_bf16_runs_on_the_int4_kernel_within_bf16_rounding(group):
    from mistralrs_quant.kernels.int4pack import kernel_available
    if not kernel_available():
        pytest.skip("torch has no CPU int4 kernel")
    w = _weight(40, 256)                       # 40 rows: padded to the kernel's 16-row tiles
    m = AFQMethod.from_float(w, 4, group)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = m.forward(x)
    assert m._int4_packed is not None and y.dtype == torch.bfloat16 and y.shape == (5, 40)
    deq = m.dequantize().double()
    ref = x.double() @ deq.T
    bound = 2 ** -7 * (x.double().abs() @ deq.abs().T)
    assert bool(((y.double() - ref).abs() <= bound).all())
