"""Each attention backend against explicit float32 softmax(q k^T * scale + mask) v, and the
masks that need a reference (Gemma 3 image spans, Mllama cross-attention) against
transformers' own mask code."""
from __future__ import annotations

import math

import pytest
import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.layers.attention import KVCacheSpec, LayerKVCache, attention
from mistralrs_core.layers.attention_backends import (
    AttentionBackend, CrossAttention, CrossAttentionBatch, CrossAttentionCache, EncoderAttention,
    EncoderBatch, PagedSelfAttention, cross_attention, encoder_attention, paged_self_attention, token_spans,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def ref_attention(q, k, v, allowed, scale, bias=None):
    """q [Sq, Hq, D], k/v [Sk, Hkv, D], allowed [Sq, Sk] (or [Hq, Sq, Sk]) -> [Sq, Hq, Dv].
    Rows with no allowed key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return torch.einsum("hqk,khd->qhd", probs, v).float()


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_backends_share_one_interface():
    for b in (paged_self_attention, encoder_attention, cross_attention):
        assert isinstance(b, AttentionBackend)
    assert isinstance(paged_self_attention, PagedSelfAttention)
    assert isinstance(encoder_attention, EncoderAttention)
    assert isinstance(cross_attention, CrossAttention)


# ------------------------------------------------------------------ paged self-attention

def _paged_step(chunks, cache, hq=4, hkv=2, d=8, seed=0, spans=None, **opts):
    """Run one step through the backend; returns (out [T, Hq, D], q, k, v, meta)."""
    _, _, meta = build_metadata(chunks, cache.block_size, "cpu")
    meta.bidirectional_spans = spans
    t = sum(meta.query_lens)
    q, k, v = rand(t, hq, d, seed=seed), rand(t, hkv, d, seed=seed + 1), rand(t, hkv, d, seed=seed + 2)
    out = paged_self_attention(q, k, v, meta, cache, scale=1 / math.sqrt(d), **opts)
    return out, q, k, v, meta


def _causal_allowed(q_pos, k_len, spans=(), window=None):
    qp = torch.tensor(q_pos)[:, None]
    kj = torch.arange(k_len)[None, :]
    same = torch.zeros(len(q_pos), k_len, dtype=torch.bool)
    for s, e in spans:
        same |= (qp >= s) & (qp < e) & (kj >= s) & (kj < e)
    allowed = (kj <= qp) | same
    if window is not None:
        allowed &= kj > qp - window
    return allowed


def test_paged_self_attention_is_the_attention_function_and_matches_math():
    cache = LayerKVCache(KVCacheSpec(2, 8, 8), num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    # Two sequences prefilling (lengths 6 and 3), then one decode step for both.
    chunks = [([1] * 6, 0, [0, 1]), ([2] * 3, 0, [2])]
    out, q, k, v, meta = _paged_step(chunks, cache)
    assert torch.equal(out, attention(q, k, v, meta, cache, scale=1 / math.sqrt(8)))
    ks, vs = [k[:6], k[6:]], [v[:6], v[6:]]
    off = 0
    for i, n in enumerate((6, 3)):
        exp = ref_attention(q[off:off + n], ks[i], vs[i], _causal_allowed(list(range(n)), n), 1 / math.sqrt(8))
        torch.testing.assert_close(out[off:off + n], exp, **TOL)
        off += n
    out2, q2, k2, v2, _ = _paged_step([([1], 6, [0, 1]), ([2], 3, [2])], cache, seed=10)
    for i, n in enumerate((6, 3)):
        kk, vv = torch.cat([ks[i], k2[i:i + 1]]), torch.cat([vs[i], v2[i:i + 1]])
        exp = ref_attention(q2[i:i + 1], kk, vv, _causal_allowed([n], n + 1), 1 / math.sqrt(8))
        torch.testing.assert_close(out2[i:i + 1], exp, **TOL)


def test_chunked_local_attention_matches_math():
    """Llama 4's chunked layers: each query sees only causal keys in its own block of
    ``chunk`` positions, in a fresh prefill and in a continuing step over the cache."""
    cache = LayerKVCache(KVCacheSpec(2, 8, 8), num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    chunks = [([1] * 7, 0, [0, 1]), ([2] * 3, 0, [2])]
    out, q, k, v, _ = _paged_step(chunks, cache, chunk=3)
    off = 0
    for n in (7, 3):
        pos = torch.arange(n)
        allowed = _causal_allowed(list(range(n)), n) & ((pos[:, None] // 3) == (pos[None, :] // 3))
        exp = ref_attention(q[off:off + n], k[off:off + n], v[off:off + n], allowed, 1 / math.sqrt(8))
        torch.testing.assert_close(out[off:off + n], exp, **TOL)
        off += n
    assert not torch.allclose(out[:7], _paged_step(chunks, LayerKVCache(
        KVCacheSpec(2, 8, 8), 16, 4, torch.float32, "cpu"))[0][:7], **TOL)   # the chunks matter
    out2, q2, k2, v2, _ = _paged_step([([1, 1], 7, [0, 1, 3])], cache, seed=10, chunk=3)
    kk, vv = torch.cat([k[:7], k2]), torch.cat([v[:7], v2])
    pos = torch.tensor([7, 8])
    allowed = _causal_allowed([7, 8], 9) & ((pos[:, None] // 3) == (torch.arange(9)[None, :] // 3))
    torch.testing.assert_close(out2, ref_attention(q2, kk, vv, allowed, 1 / math.sqrt(8)), **TOL)


# ------------------------------------------------------------------ Gemma 3 bidirectional spans

def _hf_gemma3_masks(token_types: list[int], sliding_window: int):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model, get_block_sequence_ids_for_mask,
    )
    cfg = Gemma3TextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                           sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "sdpa"
    tt = torch.tensor([token_types])
    s = tt.shape[1]
    masks = create_masks_for_vision_model(
        config=cfg, inputs_embeds=torch.zeros(1, s, 8), attention_mask=torch.ones(1, s, dtype=torch.long),
        cache=None, position_ids=torch.arange(s)[None], block_sequence_ids=get_block_sequence_ids_for_mask(tt))
    return masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]


def _spans(token_types):
    return token_spans(token_types, 1)


GEMMA3_TYPES = [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0]


def test_token_spans_are_transformers_image_blocks():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
    for types in (GEMMA3_TYPES, [1, 1, 0, 1], [0, 0], [1]):
        blocks = get_block_sequence_ids_for_mask(torch.tensor([types]))[0].tolist()
        ours = [-1] * len(types)
        for n, (s, e) in enumerate(token_spans(types, 1)):
            ours[s:e] = [n] * (e - s)
        assert ours == blocks


@pytest.mark.parametrize("window", [3, 5])
def test_span_mask_matches_transformers_gemma3(window):
    full, sliding = _hf_gemma3_masks(GEMMA3_TYPES, window)
    n = len(GEMMA3_TYPES)
    _, _, meta = build_metadata([([0] * n, 0, [0, 1, 2, 3])], 4, "cpu")
    meta.bidirectional_spans = [_spans(GEMMA3_TYPES)]
    assert torch.equal(meta.mask("cpu")[0, 0], full)
    assert torch.equal(meta.mask("cpu", sliding_window=window)[0, 0], sliding)
    # A second sequence in the batch without spans keeps the plain causal mask.
    _, _, meta2 = build_metadata([([0] * n, 0, [0, 1, 2, 3]), ([0] * 5, 0, [4, 5])], 4, "cpu")
    meta2.bidirectional_spans = [_spans(GEMMA3_TYPES), []]
    assert torch.equal(meta2.mask("cpu")[0, 0], full)
    assert torch.equal(meta2.mask("cpu")[1, 0, :5, :5], torch.ones(5, 5, dtype=torch.bool).tril())


def test_span_mask_on_a_later_chunk_matches_the_full_mask_rows():
    """Chunked prefill that does not split a span: the second chunk's rows equal the reference's."""
    full, sliding = _hf_gemma3_masks(GEMMA3_TYPES, 4)
    n, first = len(GEMMA3_TYPES), 7            # chunk boundary at 7 (no span crosses it)
    _, _, meta = build_metadata([([0] * (n - first), first, [0, 1, 2, 3])], 4, "cpu")
    meta.bidirectional_spans = [_spans(GEMMA3_TYPES)]
    assert torch.equal(meta.mask("cpu")[0, 0], full[first:])
    assert torch.equal(meta.mask("cpu", sliding_window=4)[0, 0], sliding[first:])


def test_no_spans_keeps_the_causal_mask_and_fast_path(monkeypatch):
    n = 9
    _, _, plain = build_metadata([([0] * n, 0, [0, 1, 2])], 4, "cpu")
    _, _, empty = build_metadata([([0] * n, 0, [0, 1, 2])], 4, "cpu")
    empty.bidirectional_spans = [[]]
    assert torch.equal(plain.mask("cpu"), empty.mask("cpu"))
    assert torch.equal(plain.mask("cpu")[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    # The fresh single-sequence prefill takes the is_causal kernel only without spans.
    import mistralrs_core.layers.attention as attn_mod
    calls = []
    real = attn_mod.F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw.get("is_causal", False))
        return real(*a, **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    q, k, v = rand(n, 2, 8, seed=3), rand(n, 2, 8, seed=4), rand(n, 2, 8, seed=5)
    attention(q, k, v, plain, None, scale=0.3)
    attention(q, k, v, empty, None, scale=0.3)
    spans = build_metadata([([0] * n, 0, [0, 1, 2])], 4, "cpu")[2]
    spans.bidirectional_spans = [[(2, 6)]]
    attention(q, k, v, spans, None, scale=0.3)
    assert calls == [True, True, False]


@pytest.mark.parametrize("window", [None, 4])
def test_paged_attention_with_spans_matches_math(window):
    spans = _spans(GEMMA3_TYPES)
    n = len(GEMMA3_TYPES)
    cache = LayerKVCache(KVCacheSpec(2, 8, 8), num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    # Fresh prefill of one sequence (the path that would otherwise be is_causal SDPA) ...
    out, q, k, v, _ = _paged_step([([0] * n, 0, [0, 1, 2, 3])], cache, spans=[spans], sliding_window=window)
    exp = ref_attention(q, k, v, _causal_allowed(list(range(n)), n, spans, window), 1 / math.sqrt(8))
    torch.testing.assert_close(out, exp, **TOL)
    # ... and a batch of two where only the first has spans, reading from the cache.
    cache2 = LayerKVCache(KVCacheSpec(2, 8, 8), num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    out, q, k, v, _ = _paged_step([([0] * n, 0, [0, 1, 2, 3]), ([0] * 6, 0, [4, 5])], cache2,
                                  spans=[spans, []], sliding_window=window, softcap=30.0)
    sc = 1 / math.sqrt(8)

    def capped(qs, ks, vs, allowed):
        # softcap: tanh(s/c)*c before the mask; checked with the explicit formula.
        qs, ks, vs = qs.double(), ks.repeat_interleave(2, 1).double(), vs.repeat_interleave(2, 1).double()
        s = torch.einsum("qhd,khd->hqk", qs, ks) * sc
        s = torch.tanh(s / 30.0) * 30.0
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        return torch.einsum("hqk,khd->qhd", p, vs).float()

    torch.testing.assert_close(out[:n], capped(q[:n], k[:n], v[:n],
                                               _causal_allowed(list(range(n)), n, spans, window)), **TOL)
    torch.testing.assert_close(out[n:], capped(q[n:], k[n:], v[n:],
                                               _causal_allowed(list(range(6)), 6, (), window)), **TOL)


# ------------------------------------------------------------------ encoder attention

def test_encoder_packed_variable_lengths_block_diagonal_gqa():
    lens = [5, 0, 9, 3]
    t = sum(lens)
    q, k, v = rand(t, 4, 8, seed=1), rand(t, 2, 8, seed=2), rand(t, 2, 8, seed=3)
    for batch in (EncoderBatch.packed(lens), EncoderBatch.from_cu_seqlens(torch.tensor([0, 5, 5, 14, 17]))):
        out = encoder_attention(q, k, v, batch, scale=0.25)
        off = 0
        for n in lens:
            if n:
                exp = ref_attention(q[off:off + n], k[off:off + n], v[off:off + n],
                                    torch.ones(n, n, dtype=torch.bool), 0.25)
                torch.testing.assert_close(out[off:off + n], exp, **TOL)
            off += n
    # The block-diagonal layout is the whole-sequence attention with a block-diagonal mask.
    blocks = torch.block_diag(*[torch.ones(n, n) for n in lens if n]).bool()
    torch.testing.assert_close(encoder_attention(q, k, v, EncoderBatch.packed(lens), scale=0.25),
                               ref_attention(q, k, v, blocks, 0.25), **TOL)


def test_encoder_packed_equal_lengths_and_single_sequence():
    q, k, v = rand(12, 4, 8, seed=4), rand(12, 4, 8, seed=5), rand(12, 4, 8, seed=6)
    out = encoder_attention(q, k, v, EncoderBatch.packed([4, 4, 4]), scale=0.3)
    for i in range(3):
        s = slice(4 * i, 4 * i + 4)
        torch.testing.assert_close(out[s], ref_attention(q[s], k[s], v[s], torch.ones(4, 4, dtype=torch.bool), 0.3),
                                   **TOL)
    torch.testing.assert_close(encoder_attention(q, k, v, None, scale=0.3),
                               ref_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool), 0.3), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_padded_key_mask_bias_causal(causal):
    b, s, hq, hkv, d = 3, 7, 4, 1, 8
    q, k, v = rand(b, s, hq, d, seed=7), rand(b, s, hkv, d, seed=8), rand(b, s, hkv, d, seed=9)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    key_mask[1, 4:] = False                 # right padding
    key_mask[2, :3] = False                 # left padding (causal rows 0-2 then see nothing)
    bias = rand(1, hq, s, s, seed=10)
    batch = EncoderBatch.padded(key_mask, causal=causal)
    out = encoder_attention(q, k, v, batch, scale=0.35, bias=bias)
    out_nobias = encoder_attention(q, k, v, batch, scale=0.35)
    for i in range(b):
        allowed = key_mask[i][None, :].expand(s, s)
        if causal:
            allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
        torch.testing.assert_close(out[i], ref_attention(q[i], k[i], v[i], allowed, 0.35, bias[0]), **TOL)
        torch.testing.assert_close(out_nobias[i], ref_attention(q[i], k[i], v[i], allowed, 0.35), **TOL)
    assert torch.isfinite(out).all()
    # No mask, no bias: the plain kernel (causal or not).
    plain = encoder_attention(q, k, v, EncoderBatch.padded(None, causal=causal), scale=0.35)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    torch.testing.assert_close(plain[0], ref_attention(q[0], k[0], v[0], allowed, 0.35), **TOL)


def test_encoder_packed_with_bias():
    lens = [3, 5]
    q, k, v = rand(8, 2, 4, seed=11), rand(8, 2, 4, seed=12), rand(8, 2, 4, seed=13)
    bias = rand(2, 2, 5, 5, seed=14)
    out = encoder_attention(q, k, v, EncoderBatch.packed(lens), scale=0.5, bias=bias)
    torch.testing.assert_close(out[:3], ref_attention(q[:3], k[:3], v[:3], torch.ones(3, 3, dtype=torch.bool),
                                                      0.5, bias[0, :, :3, :3]), **TOL)
    torch.testing.assert_close(out[3:], ref_attention(q[3:], k[3:], v[3:], torch.ones(5, 5, dtype=torch.bool),
                                                      0.5, bias[1]), **TOL)


# ------------------------------------------------------------------ Mllama cross-attention

def _hf_cross_reference(q, k, v, cam, num_vision_tokens, scale):
    """transformers' Mllama math for one sequence: q [S, H, D], k/v [L, Hkv, D],
    cam [S, images, tiles] 0/1 -> (attention output [S, H, D], full_text_row mask [S])."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    mask, row = _prepare_cross_attention_mask(cam[None].long(), num_vision_tokens, torch.float32)
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale + mask[0].double()
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv).float()
    return out, row[0, 0, :, 0]


def _key_mask(cam, num_vision_tokens):
    return cam.bool().repeat_interleave(num_vision_tokens, dim=2).reshape(cam.shape[0], -1)


def test_cross_attention_matches_transformers_mllama_over_prefill_and_decode():
    h, hkv, d, nvt = 4, 2, 8, 3
    scale = d ** -0.5
    # Sequence A (slot 2): 2 images x 2 tiles; its first 2 tokens precede the images (masked rows).
    # Sequence B (slot 0): no image. Sequence C (slot 5): 1 image x 1 tile.
    lens_a, lens_c = 2 * 2 * nvt, 1 * 1 * nvt
    sa, sb, sc = 6, 4, 3
    cam_a = torch.zeros(sa, 2, 2)
    cam_a[2:, 0, :] = 1
    cam_a[4:, 1, 0] = 1                     # second image: only its first tile is real
    cam_c = torch.ones(sc, 1, 1)
    ka, va = rand(lens_a, hkv, d, seed=20), rand(lens_a, hkv, d, seed=21)
    kc, vc = rand(lens_c, hkv, d, seed=22), rand(lens_c, hkv, d, seed=23)
    q = rand(sa + sb + sc, h, d, seed=24)
    _, _, meta = build_metadata([([0] * sa, 0, [0]), ([0] * sb, 0, [1]), ([0] * sc, 0, [2])], 16, "cpu",
                                state_slots=[2, 0, 5])
    k_all = torch.zeros(sa + sb + sc, lens_a, dtype=torch.bool)
    k_all[:sa] = _key_mask(cam_a, nvt)
    k_all[sa + sb:, :lens_c] = _key_mask(cam_c, nvt)
    batch = CrossAttentionBatch.from_meta(meta, new_slots=[2, 5], new_lens=[lens_a, lens_c], key_mask=k_all)
    cache = CrossAttentionCache(max_seqs=8)
    out = cross_attention(q, torch.cat([ka, kc]), torch.cat([va, vc]), batch, cache, scale=scale)
    exp_a, row_a = _hf_cross_reference(q[:sa], ka, va, cam_a, nvt, scale)
    exp_c, row_c = _hf_cross_reference(q[sa + sb:], kc, vc, cam_c, nvt, scale)
    torch.testing.assert_close(out[:sa], exp_a, **TOL)
    torch.testing.assert_close(out[sa + sb:], exp_c, **TOL)
    assert torch.equal(out[sa:sa + sb], torch.zeros(sb, h, d))     # no image: nothing added
    rows = batch.text_row_mask(cache)
    assert torch.equal(rows, torch.cat([row_a, torch.zeros(sb), row_c]))
    assert row_a[:2].eq(0).all() and row_a[2:].eq(1).all()
    assert (cache.length(2), cache.length(0), cache.length(5)) == (lens_a, 0, lens_c)

    # Decode: one token each, no new encoder states; transformers repeats the last mask row.
    q2 = rand(3, h, d, seed=25)
    _, _, meta2 = build_metadata([([0], sa, [0]), ([0], sb, [1]), ([0], sc, [2])], 16, "cpu",
                                 state_slots=[2, 0, 5])
    km2 = torch.zeros(3, lens_a, dtype=torch.bool)
    km2[0] = _key_mask(cam_a[-1:], nvt)[0]
    km2[2, :lens_c] = _key_mask(cam_c[-1:], nvt)[0]
    batch2 = CrossAttentionBatch.from_meta(meta2, key_mask=km2)
    out2 = cross_attention(q2, None, None, batch2, cache, scale=scale)
    torch.testing.assert_close(out2[0:1], _hf_cross_reference(q2[0:1], ka, va, cam_a[-1:], nvt, scale)[0], **TOL)
    torch.testing.assert_close(out2[2:3], _hf_cross_reference(q2[2:3], kc, vc, cam_c[-1:], nvt, scale)[0], **TOL)
    assert torch.equal(out2[1], torch.zeros(h, d))
    # Without a key mask every token sees all of its sequence's keys.
    out3 = cross_attention(q2, None, None, CrossAttentionBatch.from_meta(meta2), cache, scale=scale)
    full = torch.ones(1, 2, 2)
    torch.testing.assert_close(out3[0:1], _hf_cross_reference(q2[0:1], ka, va, full, nvt, scale)[0], **TOL)


def test_cross_attention_cache_slots_and_no_image_batches():
    cache = CrossAttentionCache(max_seqs=4)
    q = rand(3, 2, 4, seed=30)
    _, _, meta = build_metadata([([0] * 3, 0, [0])], 16, "cpu", state_slots=[1])
    batch = CrossAttentionBatch.from_meta(meta)
    # Nothing stored at all: zero output, zero row mask.
    assert torch.equal(cross_attention(q, None, None, batch, cache, scale=0.5), torch.zeros_like(q))
    assert torch.equal(batch.text_row_mask(cache), torch.zeros(3))
    k, v = rand(5, 2, 4, seed=31), rand(5, 2, 4, seed=32)
    cache.store(1, k, v)
    out = cross_attention(q, None, None, CrossAttentionBatch.from_meta(meta), cache, scale=0.5)
    torch.testing.assert_close(out, ref_attention(q, k, v, torch.ones(3, 5, dtype=torch.bool), 0.5), **TOL)
    # A key mask narrower than the stored keys hides the keys past its width.
    narrow = CrossAttentionBatch.from_meta(meta, key_mask=torch.ones(3, 3, dtype=torch.bool))
    allowed = torch.zeros(3, 5, dtype=torch.bool)
    allowed[:, :3] = True
    torch.testing.assert_close(cross_attention(q, None, None, narrow, cache, scale=0.5),
                               ref_attention(q, k, v, allowed, 0.5), **TOL)
    # A finished sequence's slot is cleared and reused by a sequence without an image.
    cache.clear(1)
    assert cache.length(1) == 0 and cache.nbytes == 0
    assert torch.equal(cross_attention(q, None, None, CrossAttentionBatch.from_meta(meta), cache, scale=0.5),
                       torch.zeros_like(q))
    with pytest.raises(ValueError):
        CrossAttentionBatch.from_meta(build_metadata([([0], 0, [0])], 16, "cpu")[2])


def test_cross_cache_gather_is_reused_until_contents_change():
    cache = CrossAttentionCache(max_seqs=3)
    cache.store(0, torch.ones(2, 1, 2), torch.ones(2, 1, 2))
    cache.store(2, torch.ones(4, 1, 2), torch.ones(4, 1, 2))
    k1, _, lens = cache.gather([0, 2])
    assert lens == [2, 4] and k1.shape == (2, 4, 1, 2) and k1[0, 2:].eq(0).all()
    assert cache.gather([0, 2])[0] is k1
    cache.store(0, torch.full((3, 1, 2), 2.0), torch.ones(3, 1, 2))
    k2, _, lens = cache.gather([0, 2])
    assert k2 is not k1 and lens == [3, 4] and k2[0, :3].eq(2).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backends_on_cuda_match_cpu():
    """Masks and index tensors are built on the query's device (no host/device mix-ups)."""
    n = len(GEMMA3_TYPES)
    q, k, v = rand(n, 4, 8, seed=40), rand(n, 2, 8, seed=41), rand(n, 2, 8, seed=42)
    outs = []
    for dev in ("cpu", "cuda"):
        _, _, meta = build_metadata([([0] * n, 0, [0, 1, 2, 3])], 4, dev, state_slots=[1])
        meta.bidirectional_spans = [_spans(GEMMA3_TYPES)]
        span = attention(q.to(dev), k.to(dev), v.to(dev), meta, None, scale=0.3, sliding_window=4)
        enc = encoder_attention(q.to(dev), k.to(dev), v.to(dev), EncoderBatch.packed([4, 0, 11]), scale=0.3)
        cache = CrossAttentionCache(max_seqs=2)
        km = torch.ones(n, 5, dtype=torch.bool, device=dev)
        km[:3] = False
        batch = CrossAttentionBatch.from_meta(meta, new_slots=[1], new_lens=[5], key_mask=km)
        cross = cross_attention(q.to(dev), k[:5].to(dev), v[:5].to(dev), batch, cache, scale=0.3)
        outs.append([t.cpu() for t in (span, enc, cross, batch.text_row_mask(cache))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
