"""The engine's step-record seams on the tiny test family: draft verification (several
tokens per step, KV rollback), per-sequence adapter ids and logits processors, and chunking
around bidirectional feature spans."""
import random

import pytest
import torch

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.engine.block_manager import BlockManager
from mistralrs_core.engine.engine import RequestGroup
from mistralrs_core.engine.scheduler import Scheduler
from mistralrs_core.engine.sequence import Sequence
from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.testing.parity import our_greedy

PROMPT = "the quick brown fox jumps over the lazy dog and then the compiler borrows"


def completion(n=24, **kw):
    return CompletionRequest(prompt=PROMPT, model="default", max_tokens=n, ignore_eos=True, **kw)


class OracleDrafter:
    """Proposes the model's own greedy continuation (all accepted) for k tokens."""
    def __init__(self, continuation, prompt_len, k):
        self.cont, self.plen, self.k = continuation, prompt_len, k

    def propose(self, seqs):
        return [self.cont[s.num_tokens - self.plen:s.num_tokens - self.plen + self.k] for s in seqs]


class RandomDrafter:
    def __init__(self, vocab, k, seed=0):
        self.rng, self.vocab, self.k = random.Random(seed), vocab, k

    def propose(self, seqs):
        return [[self.rng.randrange(self.vocab) for _ in range(self.k)] for _ in seqs]


@pytest.fixture
def runner(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0, pa_blk_size=4)
    yield r
    r.shutdown()


def test_drafts_verified_in_one_step_give_plain_greedy_output(runner):
    pipe = runner._pipeline(None)
    engine = pipe.engine
    ids = pipe.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = our_greedy(pipe.model, ids, 24)
    engine.drafter = OracleDrafter(want, len(ids), 4)
    steps = engine.stats["steps"]
    out = runner.send_completion_request(completion(temperature=0.0)).choices[0].text
    assert out == pipe.tokenizer.decode(want)
    # prefill, then 23 more tokens at 5 a step
    assert engine.stats["steps"] - steps == 1 + 5
    assert engine.stats["accepted_draft_tokens"] == engine.stats["draft_tokens"] > 0
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rejected_drafts_roll_back_and_change_nothing(runner, temperature):
    """Every kept token is the target's own draw from its own seeded generator, so random
    drafts (mostly rejected, their KV rolled back) leave even sampled output unchanged."""
    pipe = runner._pipeline(None)
    engine = pipe.engine
    plain = runner.send_completion_request(completion(temperature=temperature, seed=7)).choices[0].text
    engine.drafter = RandomDrafter(pipe.tokenizer.vocab_size, 3)
    drafted = runner.send_completion_request(completion(temperature=temperature, seed=7)).choices[0].text
    assert drafted == plain
    assert engine.stats["draft_tokens"] > engine.stats["accepted_draft_tokens"]
    assert engine.blocks.num_used == 0
    # Rolled-back tails must not reach the prefix cache: a fresh request reuses only true blocks.
    engine.drafter = None
    assert runner.send_completion_request(completion(temperature=temperature, seed=7)).choices[0].text == plain


def test_adapter_ids_and_logits_processors_reach_their_sequence(runner):
    pipe = runner._pipeline(None)
    engine, model = pipe.engine, pipe.model
    seen = []
    inner = model.forward_embeds

    def spy(h, pos, meta, caches):
        seen.append(meta.adapter_ids)
        return inner(h, pos, meta, caches)
    model.forward_embeds = spy
    try:
        ids = pipe.tokenizer.encode(PROMPT, add_special_tokens=True)
        banned = our_greedy(model, ids, 1)[0]

        def ban(output_ids, logits):
            logits[banned] = -float("inf")
            return logits
        from mistralrs_core.sampling.params import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        a = RequestGroup(ids, params, 2, False, 3, adapter_id="A", logits_processors=[ban, None])
        b = RequestGroup(ids, params, 1, False, 3)
        engine.submit(a)
        engine.submit(b)
        for g in (a, b):
            while g.events.get()[0] != "done":
                pass
        assert a.seqs[0].output_ids[0] != banned          # processed choice
        assert a.seqs[1].output_ids[0] == banned          # its sibling is untouched
        assert b.seqs[0].output_ids[0] == banned
        assert any(m is not None and "A" in m and None in m for m in seen)
        # Different adapters never share prefix-cache blocks.
        assert a.cache_extras is not None and b.cache_extras is None
    finally:
        model.forward_embeds = inner


def test_chunks_never_end_inside_a_bidirectional_span():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=5)
    group = type("G", (), {})()
    group.spans = (FeatureSpan(start=3, length=6, content_hash=b"x", bidirectional=True),)
    group.cache_extras = None
    s = Sequence(group, 0, list(range(16)), None, None, max_tokens=8)
    sched.add(s)
    sizes = []
    while s.num_computed < s.num_tokens:
        (seq, n), = sched.schedule()
        sizes.append(n)
        sched.after_step([(seq, n)])
    # 5 would end at 5 (inside [3, 9)): cut to 3; then the whole span (6 > budget); then the rest
    assert sizes == [3, 6, 5, 2]
    # A causal span may be split.
    group.spans = (FeatureSpan(start=3, length=6, content_hash=b"x"),)
    s2 = Sequence(group, 0, list(range(100, 116)), None, None, max_tokens=8)
    sched.finish(s)
    sched.add(s2)
    (seq, n), = sched.schedule()
    assert n == 5


def test_bidirectional_spans_of_a_record_reach_the_attention_mask():
    from mistralrs_core.engine.model_runner import build_metadata
    from mistralrs_core.engine.step import StepRecord
    span = FeatureSpan(start=3, length=6, content_hash=b"x", bidirectional=True)
    causal_span = FeatureSpan(start=1, length=2, content_hash=b"y")
    recs = [StepRecord(0, list(range(12)), 0, [0, 1, 2], spans=(span,)),
            StepRecord(1, list(range(5)), 0, [3, 4], spans=(causal_span,))]
    _, _, meta = build_metadata(recs, 4, "cpu")
    assert meta.bidirectional_spans == [[(3, 9)], []]
    m = meta.mask("cpu")[:, 0]
    assert bool(m[0, 3, 8]) and not bool(m[0, 2, 3]) and not bool(m[0, 9, 10])
    assert not bool(m[1, 1, 2])                      # a causal span stays causal


def test_cache_salt_isolates_prefix_cache_through_the_runner(runner):
    from mistralrs_core.api.openai import completion_request_from_openai
    engine = runner._pipeline(None).engine
    long_prompt = " ".join([PROMPT] * 3)

    def ask(**kw):
        before = engine.blocks.hits
        out = runner.send_completion_request(CompletionRequest(
            prompt=long_prompt, model="default", max_tokens=2, temperature=0.0, **kw)).choices[0].text
        return engine.blocks.hits - before, out
    _, plain = ask()
    hits, text = ask(cache_salt="tenant-a")
    assert hits == 0 and text == plain                 # same answer, nothing shared
    hits, _ = ask(cache_salt="tenant-a")
    assert hits > 0                                    # the same tenant shares
    assert ask(cache_salt="tenant-b")[0] == 0
    assert ask()[0] > 0
    req = completion_request_from_openai({"model": "m", "prompt": "x", "cache_salt": "tenant-a"})
    assert req.cache_salt == "tenant-a"
    with pytest.raises(ValueError, match="cache_salt"):
        runner.send_completion_request(CompletionRequest(prompt="x", model="default", cache_salt=""))


def test_models_with_per_sequence_state_get_slots_and_hear_when_one_changes_hands(tiny_dir):
    """A slot reused by a new sequence is flagged on that sequence's first step even when a
    prefix-cache hit makes the step start past position 0 (so "start == 0" cannot tell)."""
    from mistralrs_core.engine.engine import Engine, EngineConfig
    from mistralrs_core.sampling.params import SamplingParams
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0)
    try:
        pipe = r._pipeline(None)
        model = pipe.model
        model.uses_state_slots = True
        seen = []
        inner = model.forward_embeds

        def spy(h, pos, meta, caches):
            seen.append((meta.state_slots.tolist(), list(meta.fresh_slots),
                         [c - q for c, q in zip(meta.context_lens, meta.query_lens)]))
            return inner(h, pos, meta, caches)
        model.forward_embeds = spy
        engine = Engine(model, pipe.tokenizer, EngineConfig(max_seqs=1, block_size=4, num_blocks=64), set())
        ids = pipe.tokenizer.encode(PROMPT, add_special_tokens=True)
        for _ in range(2):
            g = RequestGroup(ids, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), 1, False, 3)
            engine.submit(g)
            while g.events.get()[0] != "done":
                pass
        engine.shutdown()
        assert [s for s, _, _ in seen] == [[0]] * 6
        assert [f for _, f, _ in seen] == [[True], [False], [False]] * 2
        assert seen[3][2][0] > 0          # the second request's first step started from cached blocks
    finally:
        del model.uses_state_slots
        model.forward_embeds = inner
        r.shutdown()
