"""``Runner(pa_cache_type=PagedCacheType.F8E4M3)``: paged K/V stored as float8 E4M3 with
scale 1.0 (MLA latents and recurrent state stay in the model dtype), half the bytes of a
bf16 cache, and a bounded logprob drift against the model-dtype cache."""
import pytest
import torch

from mistralrs_core.engine import kv_pool
from mistralrs_core.engine.model_runner import ModelRunner, build_metadata
from mistralrs_core.layers.attention import FP8_CACHE_DTYPE, KVCacheSpec, LayerKVCache, layer_cache_dtype
from mistralrs_core.testing.parity import load_for_test
from mistralrs_core.testing.tiny import write_random_llama

# Measured on the tiny bf16 model below over 2 prefill chunks + 11 decode steps: max
# |Δ logprob| over each step's top-20 tokens 0.085, max KL 4.1e-4 (E4M3 keeps 3 mantissa
# bits: a relative error up to 2^-4 per cached element). Bounds at ~2x the measurement.
MAX_LOGPROB_DRIFT = 0.2
MAX_KL = 1e-3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("fp8kv"), hidden=64, layers=2, heads=4, kv_heads=2)


def test_cache_writes_saturate_and_read_back_as_fp8():
    cache = LayerKVCache(KVCacheSpec(2, 4, 4), num_blocks=3, block_size=2, dtype=FP8_CACHE_DTYPE, device="cpu",
                         lazy_zero=True)
    cache.zero_blocks(torch.tensor([0, 1, 2]))
    k = torch.tensor([[[0.1, -1.3, 500.0, -1e4]] * 2, [[3.0, 0.0, -0.02, 7.7]] * 2])
    cache.write(torch.tensor([1, 4]), k, -k)
    kc, vc = cache.gather(torch.tensor([[0, 2]]), 4)
    assert kc.dtype == FP8_CACHE_DTYPE
    want = k.clamp(-448, 448).to(FP8_CACHE_DTYPE).float()
    assert torch.equal(kc[0, 1].float(), want[0]) and torch.equal(kc[0, 2].float(), want[1])
    assert torch.equal(vc[0, 2].float(), -want[1])
    assert cache.k.nbytes == 3 * 2 * 2 * 4                           # one byte per element


def test_fp8_applies_to_kv_only():
    kv, latent = KVCacheSpec(2, 8, 8), KVCacheSpec(1, 40, 0, latent=True)
    assert layer_cache_dtype(kv, FP8_CACHE_DTYPE, torch.bfloat16) == FP8_CACHE_DTYPE
    assert layer_cache_dtype(latent, FP8_CACHE_DTYPE, torch.bfloat16) == torch.bfloat16
    assert layer_cache_dtype(None, FP8_CACHE_DTYPE, torch.bfloat16) == torch.bfloat16
    assert layer_cache_dtype(kv, torch.bfloat16, torch.bfloat16) == torch.bfloat16
    # bytes per token: K/V at 1 byte, latents at the model's 2
    assert kv_pool.bytes_per_token([kv, latent], FP8_CACHE_DTYPE, torch.bfloat16) == 2 * 16 + 40 * 2
    assert kv_pool.bytes_per_token([kv], torch.bfloat16) == 2 * 2 * 16
    with pytest.raises(ValueError, match="pa_cache_type"):
        kv_pool.cache_dtype("f16", torch.float32)


def _run_logprobs(model, cache_dtype, prompt, steps):
    """Prefill in two chunks (the second reads cached K/V), then greedy decode: per step
    the log-softmax row; the token fed is the float cache's greedy choice (``steps``)."""
    runner = ModelRunner(model, num_blocks=16, block_size=4, device="cpu", cache_dtype=cache_dtype)
    runner._zeroed.update(range(16))
    for c in runner.caches:
        c.zero_blocks(torch.arange(16))
    blocks = list(range(16))
    rows, pos = [], 0
    with torch.inference_mode():
        for chunk in (prompt[:6], prompt[6:]) + tuple([t] for t in steps):
            ids, positions, meta = build_metadata([(chunk, pos, blocks)], 4, "cpu")
            h = model(ids, positions, meta, runner.caches)
            rows.append(torch.log_softmax(model.compute_logits(h[-1:]).float(), -1)[0])
            pos += len(chunk)
    return torch.stack(rows), runner


def test_logprob_drift_is_bounded(tiny_dir):
    model = load_for_test(tiny_dir, dtype=torch.bfloat16)
    prompt = [5, 17, 3, 99, 42, 7, 250, 11, 64, 2]
    # greedy continuation under the model-dtype cache, then the same tokens through FP8
    steps = []
    for _ in range(12):
        rows, _ = _run_logprobs(model, torch.bfloat16, prompt, steps)
        steps.append(int(rows[-1].argmax()))
    ref, ref_runner = _run_logprobs(model, torch.bfloat16, prompt, steps[:-1])
    got, fp8_runner = _run_logprobs(model, FP8_CACHE_DTYPE, prompt, steps[:-1])
    assert all(c.k.dtype == FP8_CACHE_DTYPE for c in fp8_runner.caches)
    assert sum(c.nbytes for c in fp8_runner.caches) * 2 == sum(c.nbytes for c in ref_runner.caches)
    top = ref.topk(20, dim=-1).indices
    drift = float((got.gather(1, top) - ref.gather(1, top)).abs().max())
    kl = float((ref.exp() * (ref - got)).sum(-1).max())
    print(f"fp8 kv: max |dlogprob| (top-20) {drift:.4f}, max KL {kl:.2e}")
    assert 0 < drift <= MAX_LOGPROB_DRIFT           # > 0: the cache really is FP8
    assert kl <= MAX_KL


def test_runner_with_fp8_cache_halves_kv_memory(tiny_dir):
    from mistralrs import ChatCompletionRequest, PagedCacheType, Runner, Which
    sizes = {}
    for kind in (PagedCacheType.Auto, PagedCacheType.F8E4M3):
        runner = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="bf16"), pa_cache_type=kind,
                        pa_ctxt_len=512, max_seqs=2)
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0, ignore_eos=True))
        assert res.usage.completion_tokens == 8
        caches = runner._pipeline(None).engine.runner.caches
        sizes[kind.name] = (sum(c.nbytes for c in caches), {c.k.dtype for c in caches})
        runner.shutdown() if hasattr(runner, "shutdown") else None
    assert sizes["Auto"][1] == {torch.bfloat16} and sizes["F8E4M3"][1] == {FP8_CACHE_DTYPE}
    assert sizes["F8E4M3"][0] * 2 == sizes["Auto"][0]
