"""Continuous batching, paged KV, prefix caching and preemption against a one-sequence reference."""
import threading

import pytest

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.testing.parity import our_greedy

WORDS = "the quick brown fox jumps over the lazy dog and then the compiler borrows a lifetime".split()


def prompt_of(n_words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words))


def expected_text(pipe, prompt: str, n: int) -> str:
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=True)
    return pipe.tokenizer.decode(our_greedy(pipe.model, ids, n))


def greedy_req(prompt, n=12):
    return CompletionRequest(prompt=prompt, model="default", max_tokens=n, temperature=0.0, ignore_eos=True)


def make_runner(tiny_dir, **kw):
    return Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), **kw)


def run_concurrently(runner, prompts, n):
    results = [None] * len(prompts)

    def work(i):
        results[i] = runner.send_completion_request(greedy_req(prompts[i], n)).choices[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_sixteen_concurrent_mixed_lengths(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    prompts = [prompt_of(2 + 5 * i, salt=i) for i in range(16)]
    got = run_concurrently(tiny_runner, prompts, 10)
    want = [expected_text(pipe, p, 10) for p in prompts]
    assert got == want


def test_chunked_prefill_matches(tiny_dir):
    r = make_runner(tiny_dir, pa_blk_size=8)
    try:
        pipe = r._pipeline(None)
        pipe.engine.scheduler.max_batch_tokens = 16   # forces 4+ chunks for this prompt
        p = prompt_of(40)
        assert len(pipe.tokenizer.encode(p)) > 48
        assert r.send_completion_request(greedy_req(p)).choices[0].text == expected_text(pipe, p, 12)
        assert pipe.engine.stats["steps"] > 12 + 3
    finally:
        r.shutdown()


def test_prefix_cache_hit_same_output_less_prefill(tiny_dir):
    r = make_runner(tiny_dir, pa_blk_size=8, prefix_cache_n=16)
    try:
        pipe = r._pipeline(None)
        p = prompt_of(60)
        first = r.send_completion_request(greedy_req(p)).choices[0].text
        computed_first = pipe.engine.stats["prompt_tokens_computed"]
        second = r.send_completion_request(greedy_req(p)).choices[0].text
        computed_second = pipe.engine.stats["prompt_tokens_computed"] - computed_first
        assert first == second == expected_text(pipe, p, 12)
        n_prompt = len(pipe.tokenizer.encode(p))
        assert computed_first == n_prompt
        assert computed_second < 8 + 1  # only the last partial block is recomputed
        assert pipe.engine.blocks.hits >= n_prompt - 8
    finally:
        r.shutdown()


def test_prefix_cache_disabled(tiny_dir):
    r = make_runner(tiny_dir, pa_blk_size=8, prefix_cache_n=0)
    try:
        pipe = r._pipeline(None)
        p = prompt_of(30)
        r.send_completion_request(greedy_req(p))
        r.send_completion_request(greedy_req(p))
        assert pipe.engine.blocks.hits == 0
        assert pipe.engine.stats["prompt_tokens_computed"] == 2 * len(pipe.tokenizer.encode(p))
    finally:
        r.shutdown()


def test_preemption_with_tiny_pool(tiny_dir):
    # 12 blocks of 8 tokens; each request needs ~7 blocks, so four cannot run together.
    r = make_runner(tiny_dir, pa_blk_size=8, pa_ctxt_len=96, prefix_cache_n=0)
    try:
        pipe = r._pipeline(None)
        prompts = [prompt_of(12, salt=i) for i in range(4)]
        got = run_concurrently(r, prompts, 30)
        assert got == [expected_text(pipe, p, 30) for p in prompts]
        assert pipe.engine.scheduler.preemptions > 0
        assert pipe.engine.blocks.num_used == 0
    finally:
        r.shutdown()


def test_no_kv_cache_mode(tiny_dir):
    r = make_runner(tiny_dir, no_kv_cache=True)
    try:
        pipe = r._pipeline(None)
        p = prompt_of(9)
        assert r.send_completion_request(greedy_req(p, 8)).choices[0].text == expected_text(pipe, p, 8)
        # every step recomputes the whole sequence
        assert pipe.engine.stats["tokens_computed"] > 8 * len(pipe.tokenizer.encode(p))
    finally:
        r.shutdown()


def test_pool_returns_to_empty_after_requests(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    run_concurrently(tiny_runner, [prompt_of(5 + i) for i in range(4)], 5)
    blocks = pipe.engine.blocks
    # finished sequences leave only prefix-cache blocks, which are reclaimable
    assert blocks.num_free == blocks.num_blocks
    assert all(r == 0 for r in blocks.ref)


@pytest.mark.parametrize("n", [1, 3])
def test_n_choices_greedy_identical(tiny_runner, n):
    res = tiny_runner.send_completion_request(
        CompletionRequest(prompt=prompt_of(6), model="default", max_tokens=6, n_choices=n, temperature=0,
                          ignore_eos=True))
    assert len(res.choices) == n
    assert len({c.text for c in res.choices}) == 1
    assert res.usage.completion_tokens == 6 * n
