"""Speculative decoding (engine/speculative.py): a draft model or prompt lookup proposes
tokens, the target verifies them in one step. Greedy output must be the target's own,
token for token; sampled output must follow the target's distribution exactly."""
import math
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.api.converter import to_json_dict
from mistralrs_core.engine.engine import RequestGroup
from mistralrs_core.engine.speculative import PromptLookupDrafter, rejection_sample
from mistralrs_core.sampling.params import SamplingParams
from mistralrs_core.sampling.state import SamplingState
from mistralrs_core.testing.parity import SingleSequence, load_for_test
from mistralrs_core.testing.tiny import write_random_llama, write_tiny_test_family, write_tiny_tokenizer

PROMPTS = ["the quick brown fox", "Once upon a time there was", "def main():\n    print(",
           "What is the capital of France?", "Numbers: 0 1 2 3", "Tell me a story about the Rust",
           "The quick brown fox jumps over the lazy dog. The quick", "lifetimes and borrowing"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = write_tiny_test_family(root / "target", hidden=64, layers=2, heads=4, kv_heads=2)
    # A draft that mostly agrees with the target: its weights plus noise (both accepted and
    # rejected drafts occur), with the same tokenizer.
    draft = root / "draft"
    draft.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (draft / f).write_bytes((target / f).read_bytes())
    g = torch.Generator().manual_seed(1)
    w = load_file(str(target / "model.safetensors"))
    save_file({k: v + 0.15 * v.std() * torch.randn(v.shape, generator=g) for k, v in w.items()},
              str(draft / "model.safetensors"))
    other = root / "other_tok"
    write_tiny_tokenizer(other, vocab_size=300)
    write_random_llama(other, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    return {"target": target, "draft": draft, "other": other}


def plain(d):
    return Which.Plain(model_id=str(d), dtype="F32")


def runner(dirs, **kw):
    return Runner(which=plain(dirs["target"]), seed=0, pa_blk_size=4, **kw)


def completion(prompt, n=64, **kw):
    kw.setdefault("temperature", 0.0)
    return CompletionRequest(prompt=prompt, model="default", max_tokens=n, ignore_eos=True, **kw)


def run_all(r, reqs, stream=False):
    """Send the requests concurrently (so that they batch) and return their texts."""
    out = [None] * len(reqs)

    def one(i):
        if stream:
            out[i] = "".join(c.choices[0].text for c in r.stream_completion_request(reqs[i]))
        else:
            out[i] = r.send_completion_request(reqs[i]).choices[0].text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def assert_no_leaks(r):
    engine = r._pipeline(None).engine
    assert engine.blocks.num_used == 0
    drafter = engine.drafter
    if hasattr(drafter, "blocks"):
        assert drafter.blocks.num_used == 0 and not drafter.states


@pytest.fixture(scope="module")
def reference(dirs):
    """The target alone: 64 greedy tokens for each prompt, and some sampled ones."""
    r = runner(dirs)
    try:
        reqs = [completion(p) for p in PROMPTS]
        return {"greedy": run_all(r, reqs),
                "stop": r.send_completion_request(completion(PROMPTS[6], stop_seqs=["lazy"])).choices[0].text,
                "short": r.send_completion_request(completion(PROMPTS[0], n=5)).choices[0].text,
                "penalized": r.send_completion_request(completion(PROMPTS[4], 32, frequency_penalty=0.7,
                                                                  logit_bias={5: 2.0})).choices[0].text,
                "seeded": [r.send_completion_request(completion(p, 24, temperature=0.9, seed=3)).choices[0].text
                           for p in PROMPTS[:3]]}
    finally:
        r.shutdown()


def test_draft_model_greedy_is_the_target_alone_batched_and_streamed(dirs, reference):
    r = runner(dirs, which_draft=plain(dirs["draft"]), speculative_gamma=3)
    try:
        engine = r._pipeline(None).engine
        reqs = [completion(p) for p in PROMPTS]
        assert run_all(r, reqs) == reference["greedy"]
        assert run_all(r, reqs, stream=True) == reference["greedy"]
        s = engine.stats
        # Both kinds of verification outcome happened: kept drafts and rolled-back ones.
        assert 0 < s["accepted_draft_tokens"] < s["draft_tokens"]
        assert engine.drafter.stats["draft_forwards"] > 0
        # Stop strings and max_tokens hold exactly, whatever was drafted past them.
        assert r.send_completion_request(completion(PROMPTS[6], stop_seqs=["lazy"])).choices[0].text \
            == reference["stop"]
        res = r.send_completion_request(completion(PROMPTS[0], n=5))
        assert res.choices[0].text == reference["short"] and res.usage.completion_tokens == 5
        # Penalties and logit bias shape both the drafts and the verification.
        assert r.send_completion_request(completion(PROMPTS[4], 32, frequency_penalty=0.7, logit_bias={5: 2.0})
                                         ).choices[0].text == reference["penalized"]
        assert_no_leaks(r)
    finally:
        r.shutdown()


def test_same_model_as_draft_keeps_everything_and_cuts_steps(dirs, reference):
    r = runner(dirs, which_draft=plain(dirs["target"]), speculative_gamma=4)
    try:
        engine = r._pipeline(None).engine
        res = r.send_completion_request(completion(PROMPTS[1]))
        assert res.choices[0].text == reference["greedy"][1]
        assert engine.stats["accepted_draft_tokens"] == engine.stats["draft_tokens"] > 0
        # prefill + 63 tokens at 5 per step
        assert engine.stats["steps"] == 1 + math.ceil(63 / 5)
        d = res.usage.completion_tokens_details
        assert d.accepted_prediction_tokens == engine.stats["draft_tokens"] and d.rejected_prediction_tokens == 0
        body = to_json_dict(res)
        assert body["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": d.accepted_prediction_tokens,
                                                              "rejected_prediction_tokens": 0}
        from mistralrs_core.server.metrics import Metrics
        text = Metrics().render(r)
        assert f'mistralrs_engine_accepted_draft_tokens_total{{model="{r.get_default_model_id()}"}} ' \
               f'{d.accepted_prediction_tokens}' in text
        assert_no_leaks(r)
    finally:
        r.shutdown()


def test_long_catch_up_is_chunked_over_rounds(dirs, reference):
    """A draft that may compute only 3 tokens of catch-up per round prefills the prompt over
    several rounds (drafting nothing meanwhile), then drafts exactly what the target says."""
    r = runner(dirs, which_draft=plain(dirs["target"]), speculative_gamma=2)
    try:
        engine = r._pipeline(None).engine
        engine.drafter.max_batch_tokens = 3
        res = r.send_completion_request(completion(PROMPTS[6]))
        assert res.choices[0].text == reference["greedy"][6]
        assert engine.stats["accepted_draft_tokens"] == engine.stats["draft_tokens"] > 0
        assert_no_leaks(r)
    finally:
        r.shutdown()


def test_plain_usage_has_no_prediction_details(dirs):
    r = runner(dirs)
    try:
        res = r.send_completion_request(completion(PROMPTS[0], n=4))
        assert res.usage.completion_tokens_details is None
        assert "completion_tokens_details" not in to_json_dict(res)["usage"]
    finally:
        r.shutdown()


def test_rollback_keeps_the_draft_cache_exact(dirs):
    """The draft is the target itself, but the target alone sees a logits processor that
    bans its favourite token every 8th position: exactly there a draft is rejected. If the
    draft's KV were not rolled back past rejected tokens, its later proposals (computed on
    stale K/V) would stop matching and acceptance would collapse."""
    r = runner(dirs, which_draft=plain(dirs["target"]), speculative_gamma=4)
    ref = runner(dirs)
    try:
        def ban(output_ids, logits):
            if len(output_ids) % 8 == 7:
                logits[int(logits.argmax())] = -float("inf")
            return logits

        def generate(rr):
            pipe = rr._pipeline(None)
            ids = pipe.tokenizer.encode(PROMPTS[2], add_special_tokens=True)
            params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
            g = RequestGroup(ids, params, 2, False, 64, logits_processors=[ban, ban])
            pipe.engine.submit(g)
            while g.events.get()[0] != "done":
                pass
            return [s.output_ids for s in g.seqs]

        want = generate(ref)
        assert generate(r) == want
        stats = r._pipeline(None).engine.stats
        bans = 2 * (64 // 8)
        assert stats["draft_tokens"] - stats["accepted_draft_tokens"] <= bans * 4
        assert stats["accepted_draft_tokens"] >= 0.6 * stats["draft_tokens"]
        assert_no_leaks(r)
    finally:
        r.shutdown()
        ref.shutdown()


def test_prompt_lookup_is_the_target_alone(dirs, reference):
    r = runner(dirs, speculative_ngram=3, speculative_gamma=4)
    try:
        engine = r._pipeline(None).engine
        assert run_all(r, [completion(p) for p in PROMPTS]) == reference["greedy"]
        assert engine.stats["accepted_draft_tokens"] > 0
        # Seeded sampling too: exact-match verification keeps the target's own draws.
        assert [r.send_completion_request(completion(p, 24, temperature=0.9, seed=3)).choices[0].text
                for p in PROMPTS[:3]] == reference["seeded"]
        assert_no_leaks(r)
    finally:
        r.shutdown()


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = PromptLookupDrafter(gamma=3, max_ngram=3)
    assert d.lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], 3) == [4, 5, 9]   # the 3-gram first
    assert d.lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3], 3) == [7, 8, 6]   # the latest 2-gram
    assert d.lookup([5, 6, 7, 5, 6], 4) == [7, 5, 6]
    assert d.lookup([1, 2, 3], 4) == []
    assert d.lookup([4, 4, 4, 4], 2) == [4]        # the tail's own window is not a match
    assert d.lookup([1, 2, 1], 0) == []


def test_mismatched_tokenizer_is_a_clear_error(dirs):
    with pytest.raises(ValueError, match=r"^which_draft: the draft model's tokenizer differs"):
        runner(dirs, which_draft=plain(dirs["other"]), speculative_gamma=2)


def test_bad_speculation_arguments(dirs, tiny_dir):
    with pytest.raises(ValueError, match=r"^speculative_gamma"):
        runner(dirs, which_draft=plain(dirs["draft"]), speculative_gamma=0)
    with pytest.raises(ValueError, match=r"^speculative_ngram"):
        runner(dirs, which_draft=plain(dirs["draft"]), speculative_ngram=2)
    with pytest.raises(ValueError, match=r"^speculative_ngram"):
        runner(dirs, speculative_ngram=0)
    with pytest.raises(ValueError, match=r"^which_draft: .*no_kv_cache"):
        runner(dirs, which_draft=plain(dirs["draft"]), no_kv_cache=True)
    with pytest.raises(ValueError, match=r"^which_draft: .*one target"):
        Runner(which=[plain(dirs["target"]), plain(tiny_dir)], which_draft=plain(dirs["draft"]))


# --------------------------------------------------------------------- distributions

def chi2_bound(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at 1 - 1e-4 (z = 3.72), Wilson-Hilferty: the tests use fixed
    seeds, so this only sets how far the one observed sample may sit from the expectation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs), set(counts) - set(probs)
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


class FakeSeq:
    def __init__(self, gen):
        self.state = SamplingState(SamplingParams(temperature=1.0), [0], [], gen)
        self.output_ids = self.state.output_ids
        self.finished = False


def test_rejection_sampling_gives_the_target_distribution():
    """Synthetic rows: p_i (target) and q_i (draft) over 5 tokens, drafts drawn from q. The
    first two emitted tokens must follow p_0 x p_1 (the rows do not depend on the context);
    when only one token came out of the round, the next round would draw from p_1."""
    g = torch.Generator().manual_seed(0)
    V, k = 5, 2
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    logits = p.log()
    N = 6000
    counts: dict = {}
    gen = torch.Generator().manual_seed(1)
    for _ in range(N):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        seq = FakeSeq(gen)
        rejection_sample(seq, logits, drafts, q, None, lambda s, tok: s.output_ids.append(tok.token_id))
        out = seq.output_ids
        if len(out) == 1:
            out.append(int(torch.multinomial(p[1], 1, generator=g)))
        counts[tuple(out[:2])] = counts.get(tuple(out[:2]), 0) + 1
    probs = {(a, b): float(p[0, a] * p[1, b]) for a in range(V) for b in range(V)}
    assert chi2(counts, probs, N) < chi2_bound(V * V - 1)
    # The test can tell: the draft's own distribution is far off in the same statistic.
    wrong = {(a, b): float(q[0, a] * q[1, b]) for a in range(V) for b in range(V)}
    expected_from_q = {kk: v * N for kk, v in wrong.items()}
    assert chi2({kk: round(v) for kk, v in expected_from_q.items()}, probs, N) > 10 * chi2_bound(V * V - 1)


def test_sampled_output_follows_the_target_distribution(dirs):
    """Through the engine: 4 tokens at temperature 1, top-k 2 (16 possible outputs) and a
    presence penalty (so every row depends on the drafted context) from a draft that often
    disagrees with the target, against the target's exact probabilities."""
    r = Runner(which=plain(dirs["target"]), seed=0, pa_blk_size=4, max_seqs=64,
               which_draft=plain(dirs["draft"]), speculative_gamma=2)
    try:
        pipe = r._pipeline(None)
        ids = pipe.tokenizer.encode(PROMPTS[1], add_special_tokens=True)
        params = SamplingParams(temperature=1.0, top_k=2, presence_penalty=1.5, max_tokens=4, ignore_eos=True)
        groups = []
        for i in range(24):
            g = RequestGroup(ids, params, 64, False, 4, seed=1000 + i)
            pipe.engine.submit(g)
            groups.append(g)
        counts: dict = {}
        for g in groups:
            while g.events.get()[0] != "done":
                pass
            for s in g.seqs:
                counts[tuple(s.output_ids)] = counts.get(tuple(s.output_ids), 0) + 1
        stats = pipe.engine.stats
        assert 0 < stats["accepted_draft_tokens"] < stats["draft_tokens"]
        assert_no_leaks(r)
    finally:
        r.shutdown()
    model = load_for_test(dirs["target"])
    probs = {(): 1.0}
    for _ in range(4):
        nxt = {}
        for prefix, pr in probs.items():
            row = SingleSequence(model).step(ids + list(prefix))[-1].clone()
            for t in set(prefix):
                row[t] -= 1.5
            top = torch.topk(row, 2)
            w = torch.softmax(top.values, -1)
            for t, wt in zip(top.indices.tolist(), w.tolist()):
                nxt[prefix + (t,)] = pr * wt
        probs = nxt
    n = sum(counts.values())
    assert chi2(counts, probs, n) < chi2_bound(len(probs) - 1)


def test_speculation_is_attached_again_on_reload_and_lookup_serves_added_models(dirs, tiny_dir):
    r = runner(dirs, speculative_ngram=2, speculative_gamma=3)
    try:
        mid = r.get_default_model_id()
        r.unload_model(mid)
        r.reload_model(mid)
        assert isinstance(r._pipeline(None).engine.drafter, PromptLookupDrafter)
        r.add_model(plain(tiny_dir), model_id="other")
        assert isinstance(r._pipeline("other").engine.drafter, PromptLookupDrafter)
    finally:
        r.shutdown()
    r = runner(dirs, which_draft=plain(dirs["draft"]), speculative_gamma=2)
    try:
        mid = r.get_default_model_id()
        r.unload_model(mid)
        r.reload_model(mid)
        assert type(r._pipeline(None).engine.drafter).__name__ == "DraftModelDrafter"
        r.add_model(plain(tiny_dir), model_id="other")    # a draft serves its own target only
        assert r._pipeline("other").engine.drafter is None
    finally:
        r.shutdown()
