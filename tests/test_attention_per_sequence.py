"""Steps that hold a prefill chunk attend sequence by sequence (``attention._per_sequence``):
the same numbers as the one padded, masked call, and each sequence's rows the same bits as
when it runs alone."""
import pytest
import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.layers import attention as attn
from mistralrs_core.layers.attention import KVCacheSpec, LayerKVCache

HQ, HKV, D, BS = 4, 2, 16, 4
SCALE = D ** -0.5


def _qkv(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


def _run(chunks, cache, seed, **opts):
    """One step over ``chunks`` ((ids, start, blocks) per sequence) -> attention output."""
    _, _, meta = build_metadata(chunks, BS, "cpu")
    q, k, v = _qkv(sum(len(c[0]) for c in chunks), seed)
    return attn.attention(q, k, v, meta, cache, scale=SCALE, **opts)


def _cache():
    return LayerKVCache(KVCacheSpec(HKV, D, D), num_blocks=64, block_size=BS, dtype=torch.float32, device="cpu")


def _history(cache):
    """Sequence 1 has 40 tokens in the cache, sequence 2 has 9 (written by earlier steps)."""
    _run([(list(range(40)), 0, list(range(19)))], cache, seed=1)
    _run([(list(range(9)), 0, list(range(20, 23)))], cache, seed=2)


# A fresh 37-token prompt, a 33-token second chunk after 40 cached tokens, a decode token
# after 9: every kind of sequence a prefill step holds.
STEP = [(list(range(37)), 0, list(range(30, 40))), (list(range(33)), 40, list(range(19))),
        ([5], 9, list(range(20, 23)))]


@pytest.mark.parametrize("window", [None, 16])
def test_matches_the_padded_call(monkeypatch, window):
    a, b = _cache(), _cache()
    _history(a)
    _history(b)
    got = _run(STEP, a, seed=3, sliding_window=window)
    monkeypatch.setattr(attn, "PER_SEQUENCE_MIN_Q", 10 ** 6)   # the padded, masked call
    want = _run(STEP, b, seed=3, sliding_window=window)
    assert got.shape == want.shape == (71, HQ, D)
    assert (got - want).abs().max().item() <= 1e-5


def test_each_sequence_as_alone():
    batched = _cache()
    _history(batched)
    got = _run(STEP, batched, seed=3)
    q, k, v = _qkv(71, 3)
    off = 0
    for i, chunk in enumerate(STEP):
        n = len(chunk[0])
        alone = _cache()
        _history(alone)
        _, _, meta = build_metadata([chunk], BS, "cpu")
        want = attn.attention(q[off:off + n], k[off:off + n], v[off:off + n], meta, alone, scale=SCALE)
        assert torch.equal(got[off:off + n], want), f"sequence {i}"
        off += n


def test_decode_steps_keep_one_padded_call(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "_per_sequence", lambda *a, **k: calls.append(1))
    cache = _cache()
    _history(cache)
    _run([([1, 2], 40, list(range(19))), ([5], 9, list(range(20, 23)))], cache, seed=4)
    assert not calls
