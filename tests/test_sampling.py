import math
import random

import pytest
import torch

from mistralrs_core.sampling import (
    SampledToken,
    Sampler,
    SamplingParams,
    SamplingState,
    encode_sequence_breakers,
)
from mistralrs_core.sampling import pipeline

SAMPLER = Sampler()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def state(prompt=(0,), output=(), seed=None, **kw):
    return SamplingState(SamplingParams(**kw), list(prompt), list(output), None if seed is None else gen(seed))


def tokens(logits, states, **kw):
    return [t.token_id for t in SAMPLER.sample(logits, states, **kw)]


def support(logits_row, n=1000, seed=0, **kw):
    """Distinct tokens drawn in n seeded draws (one batch of n rows sharing a generator)."""
    g = gen(seed)
    states = [SamplingState(SamplingParams(**kw), [0], [], g) for _ in range(n)]
    drawn = tokens(logits_row.expand(n, -1).contiguous(), states)
    return drawn


# A known distribution: p = [0.5, 0.3, 0.15, 0.05].
KNOWN = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


# ----------------------------------------------------------------- greedy


def test_greedy_fast_path_is_argmax():
    logits = torch.randn(5, 50, generator=gen(1))
    assert tokens(logits, [state() for _ in range(5)]) == logits.argmax(-1).tolist()
    half = logits.to(torch.bfloat16)
    assert tokens(half, [state() for _ in range(5)]) == half.float().argmax(-1).tolist()


def test_greedy_tokens_match_argmax_on_ties_nan_and_inf():
    from mistralrs_core.sampling.sampler import greedy_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 262144, generator=g)
    x[0, [5, 9, 200000]] = 50.0                      # ties: the first wins
    x[1, [3, 70000]] = float("nan")                  # NaN is the largest, the first one
    x[2] = float("-inf")                             # all -inf: index 0
    x[3, [100, 101]] = float("inf")
    x[4] = 0.0                                       # all equal
    x[5, -1] = 1e30                                  # the last element
    for rows in (x, x[2:3], x[:, :1000], x.t().contiguous().t()):
        assert torch.equal(greedy_tokens(rows), torch.argmax(rows, dim=-1))


def test_top_k_one_equals_greedy():
    logits = torch.randn(4, 100, generator=gen(2))
    assert SamplingParams(temperature=1.0, top_k=1).greedy
    for seed in range(5):
        states = [state(seed=seed + r, temperature=1.5, top_k=1) for r in range(4)]
        assert tokens(logits, states) == logits.argmax(-1).tolist()


def test_temperature_zero_and_near_zero_equal_argmax():
    logits = torch.randn(4, 100, generator=gen(3))
    assert tokens(logits, [state(temperature=0.0) for _ in range(4)]) == logits.argmax(-1).tolist()
    # Sampling (not the greedy path) at a tiny temperature collapses onto the argmax.
    assert not SamplingParams(temperature=1e-4).greedy
    for seed in range(5):
        states = [state(seed=seed * 10 + r, temperature=1e-4) for r in range(4)]
        assert tokens(logits, states) == logits.argmax(-1).tolist()


def test_raw_logits_not_modified():
    logits = torch.randn(2, 30, generator=gen(4))
    before = logits.clone()
    states = [
        state(output=[1, 2], seed=0, temperature=0.7, top_p=0.5, presence_penalty=1.0, logit_bias={3: 5.0}),
        state(output=[1], repetition_penalty=1.3, dry_multiplier=1.0),
    ]
    SAMPLER.sample(logits, states)
    assert torch.equal(logits, before)


# -------------------------------------------------------------- logit bias


def test_logit_bias_forces_and_bans():
    logits = torch.randn(1, 50, generator=gen(5))
    best = int(logits.argmax())
    target = (best + 7) % 50
    assert tokens(logits, [state(logit_bias={target: 100.0})]) == [target]
    banned = tokens(logits, [state(logit_bias={best: -100.0})])
    assert banned[0] != best and banned[0] == int(logits[0].clone().index_fill_(0, torch.tensor([best]), -1e9).argmax())
    # Sampled rows honour the bias too.
    drawn = support(logits[0], n=500, temperature=1.0, logit_bias={target: 100.0})
    assert set(drawn) == {target}
    flat = torch.zeros(8)
    drawn = support(flat, n=500, temperature=1.0, logit_bias={3: -100.0, "5": -100.0})
    assert 3 not in drawn and 5 not in drawn and len(set(drawn)) == 6


def test_logit_bias_exact_and_out_of_range_ignored():
    x = torch.zeros(2, 5)
    pipeline.apply_logit_bias(x, [state(logit_bias={1: 2.5, 99: 1.0, -1: 3.0}), state(logit_bias={4: -1.0})])
    assert torch.equal(x, torch.tensor([[0, 2.5, 0, 0, 0], [0, 0, 0, 0, -1.0]]))


# --------------------------------------------------------------- penalties

ROW = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]
PROMPT = [0, 1]
OUTPUT = [2, 2, 3]


def reference_penalties(row, prompt, output, presence=0.0, frequency=0.0, repetition=1.0):
    out = list(row)
    for tok in range(len(out)):
        count = output.count(tok)
        out[tok] -= frequency * count + (presence if count else 0.0)
        if tok in prompt or count:
            out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    return out


def penalised(**kw):
    x = torch.tensor([ROW])
    pipeline.apply_penalties(x, [state(PROMPT, OUTPUT, **kw)])
    return x[0].tolist()


def test_presence_penalty():
    assert penalised(presence_penalty=0.5) == pytest.approx([2.0, -1.0, 0.0, -1.0, 3.0, 0.0])


def test_frequency_penalty():
    assert penalised(frequency_penalty=0.25) == pytest.approx([2.0, -1.0, 0.0, -0.75, 3.0, 0.0])


def test_repetition_penalty_covers_prompt_and_output():
    # prompt tokens 0, 1 and generated 2, 3 are penalised once each (not per occurrence).
    assert penalised(repetition_penalty=2.0) == pytest.approx([1.0, -2.0, 0.25, -1.0, 3.0, 0.0])


def test_penalties_combined_match_reference():
    kw = dict(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    expected = reference_penalties(ROW, PROMPT, OUTPUT, 0.5, 0.25, 1.5)
    assert expected == pytest.approx([2.0 / 1.5, -1.5, -0.75, -1.875, 3.0, 0.0])
    assert penalised(**kw) == pytest.approx(expected)


def test_penalties_batched_random_match_reference():
    rng = random.Random(0)
    vocab = 40
    logits = torch.randn(6, vocab, generator=gen(6))
    states, expected = [], []
    for r in range(6):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        kw = dict(presence_penalty=rng.choice([None, 0.7]), frequency_penalty=rng.choice([None, -0.3, 0.4]),
                  repetition_penalty=rng.choice([None, 1.0, 1.3]))
        states.append(state(prompt, output, **kw))
        expected.append(reference_penalties(logits[r].tolist(), prompt, output, kw["presence_penalty"] or 0.0,
                                            kw["frequency_penalty"] or 0.0, kw["repetition_penalty"] or 1.0))
    x = logits.clone()
    pipeline.apply_penalties(x, states)
    assert torch.allclose(x, torch.tensor(expected), atol=1e-6)


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    assert tokens(logits, [state(output=[0])]) == [0]
    assert tokens(logits, [state(output=[0], presence_penalty=0.5)]) == [1]
    assert tokens(logits, [state(prompt=[0], repetition_penalty=1.5)]) == [1]


# ------------------------------------------------------------ top-k/p, min-p


def test_top_k_support():
    drawn = support(KNOWN, temperature=1.0, top_k=2)
    assert set(drawn) == {0, 1}
    # top_k <= 0 or >= vocab means "off".
    assert set(support(KNOWN, temperature=1.0, top_k=0)) == {0, 1, 2, 3}
    assert set(support(KNOWN, temperature=1.0, top_k=10)) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p,nucleus", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_minimal_nucleus(top_p, nucleus):
    drawn = support(KNOWN, n=2000, temperature=1.0, top_p=top_p)
    assert set(drawn) == nucleus
    if nucleus == {0, 1}:
        # Renormalised inside the nucleus: 0.5 / 0.8.
        assert drawn.count(0) / len(drawn) == pytest.approx(0.625, abs=0.05)


def test_top_p_applies_after_temperature():
    # At T=2 the distribution flattens: sqrt-probabilities renormalised -> top token < 0.75.
    drawn = support(KNOWN, n=1000, temperature=2.0, top_p=0.5)
    assert set(drawn) == {0, 1}


@pytest.mark.parametrize("min_p,kept", [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p(min_p, kept):
    assert set(support(KNOWN, n=1000, temperature=1.0, min_p=min_p)) == kept


def test_filters_exact_masks():
    logits = KNOWN[None].repeat(3, 1)
    for top_k, top_p, min_p in [([2, None, 4], [None] * 3, [None] * 3), ([None] * 3, [0.75, 1.0, None], [None] * 3),
                                ([None] * 3, [None] * 3, [0.5, 0.0, None])]:
        out = pipeline.filtered_probs(logits, top_k, top_p, min_p)
        assert out[0].tolist() == pytest.approx([0.625, 0.375, 0, 0])
        assert torch.allclose(out[1:], KNOWN.exp()[None].expand(2, -1))


def test_filters_compose_on_renormalised_probabilities():
    # top-k 3 leaves [0.5, 0.3, 0.15]; renormalised, 0.5 + 0.3 is 0.84 >= 0.82, so two
    # tokens make the nucleus. Without top-k they hold only 0.8 and a third is needed.
    out = pipeline.filtered_probs(KNOWN[None], [3], [0.82], [None])
    assert (out[0] > 0).tolist() == [True, True, False, False]
    out = pipeline.filtered_probs(KNOWN[None], [None], [0.82], [None])
    assert (out[0] > 0).tolist() == [True, True, True, False]


def test_filters_escalate_past_candidate_windows():
    vocab = 6000
    logits = torch.randn(6, vocab, generator=gen(11)) * 0.1  # nearly flat: supports of thousands
    params = [(None, 0.02, None), (None, 0.5, None), (None, 0.97, None), (3000, None, None), (5000, 0.9, None),
              (None, None, 0.75)]
    out = pipeline.filtered_probs(logits, *zip(*params))
    for r, p in enumerate(params):
        ref = reference_filtered_probs(logits[r], 1.0, *p)
        assert torch.equal(out[r] > 0, ref > 0), p
        assert 20 < int((ref > 0).sum()) < vocab


def reference_filtered_probs(row, temperature, top_k, top_p, min_p):
    """Textbook filters: mask logits to -inf and renormalise after each one."""
    inf = float("-inf")
    x = (row / temperature).clone()
    if top_k and 0 < top_k < x.numel():
        x[x.sort(descending=True).indices[top_k:]] = inf
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(x, -1)
        ordered, order = probs.sort(descending=True)
        above = torch.cat([torch.zeros(1), ordered.cumsum(0)[:-1]])
        x[order[above >= top_p]] = inf
    if min_p:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < min_p * probs.max(), inf)
    return torch.softmax(x, -1)


def test_filter_chain_matches_textbook_reference():
    rng = random.Random(12)
    logits = torch.randn(12, 300, generator=gen(12)) * 3
    params = [
        (rng.choice([0.3, 1.0, 1.7]), rng.choice([None, 0, 1, 5, 50, 299, 1000]), rng.choice([None, 0.3, 0.9, 1.0]),
         rng.choice([None, 0.0, 0.05, 0.3]))
        for _ in range(12)
    ]
    scaled = pipeline.apply_temperature(logits, [p[0] for p in params])
    out = pipeline.filtered_probs(scaled, [p[1] for p in params], [p[2] for p in params], [p[3] for p in params])
    for r, p in enumerate(params):
        ref = reference_filtered_probs(logits[r], *p)
        assert torch.equal(out[r] > 0, ref > 0), p
        assert torch.allclose(out[r], ref, atol=1e-6), p


def test_sampled_frequencies_follow_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 4000
    drawn = support(logits, n=n, seed=7, temperature=2.0)
    probs = torch.softmax(logits / 2.0, -1).tolist()
    for tok, p in enumerate(probs):
        assert drawn.count(tok) / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


# ------------------------------------------------------------------- DRY


def reference_dry(context, vocab, multiplier, base, allowed, breakers):
    """The DRY definition written out token by token (single-token breakers)."""
    out = [0.0] * vocab
    if len(context) < 2 or context[-1] in breakers:
        return out
    best = {}
    for i in range(len(context) - 1):
        if context[i] != context[-1] or context[i + 1] in breakers:
            continue
        length = 1
        while length < pipeline.DRY_MAX_MATCH:
            j = i - length
            if j < 0:
                break
            prev = context[-(length + 1)]
            if context[j] != prev or prev in breakers:
                break
            length += 1
        nxt = context[i + 1]
        best[nxt] = max(best.get(nxt, 0), length)
    for tok, length in best.items():
        if length >= allowed:
            out[tok] -= multiplier * base ** (length - allowed)
    return out


def dry_delta(prompt, output=(), vocab=10, **kw):
    x = torch.zeros(1, vocab)
    pipeline.apply_dry(x, [state(prompt, output, **kw)])
    return x[0].tolist()


def test_dry_penalises_token_continuing_repetition():
    # ... 1 2 3 4 ... 1 2 3 -> token 4 would extend a repeat of length 3.
    delta = dry_delta([1, 2, 3, 4, 1, 2], [3], dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    expected = [0.0] * 10
    expected[4] = -0.8 * 1.75 ** (3 - 2)
    assert delta == pytest.approx(expected)
    # A repeat shorter than allowed_length is left alone.
    assert dry_delta([1, 2, 3, 4, 1, 2], [3], dry_multiplier=0.8, dry_allowed_length=4) == [0.0] * 10


def test_dry_stops_at_sequence_breakers():
    kw = dict(dry_multiplier=0.8, dry_allowed_length=2)
    # Breaker inside the repeated tail: the match stops at it (length 1 < 2).
    assert dry_delta([1, 2, 3, 4, 1, 2, 3], dry_sequence_breakers=[[2]], **kw) == [0.0] * 10
    # Last token is a breaker: nothing to extend.
    assert dry_delta([1, 2, 9, 4, 1, 2, 9], dry_sequence_breakers=[[9]], **kw) == [0.0] * 10
    # The continuation itself is a breaker: never penalised.
    assert dry_delta([1, 2, 3, 9, 1, 2, 3], dry_sequence_breakers=[[9]], **kw) == [0.0] * 10
    # Without the breaker the same context is penalised.
    assert dry_delta([1, 2, 3, 9, 1, 2, 3], **kw)[9] < 0


def test_dry_multi_token_breaker():
    kw = dict(dry_multiplier=1.0, dry_allowed_length=2)
    ctx = [5, 6, 7, 1, 2, 8, 5, 6, 7, 1, 2]  # tail "... 7 1 2" repeats, followed by 8 before
    assert dry_delta(ctx, **kw)[8] < 0
    # Unbroken, the repeat is 5 tokens long (5 6 7 1 2).
    assert dry_delta(ctx, **kw)[8] == pytest.approx(-(1.75 ** (5 - 2)))
    # [6, 7] as a two-token breaker makes that 7 a breaker, so the match is "1 2" only.
    assert dry_delta(ctx, dry_sequence_breakers=[[6, 7]], **kw)[8] == pytest.approx(-(1.75 ** (2 - 2)))
    # A 7 not preceded by 6 is no breaker: the same ids as a pair elsewhere do not cut.
    assert dry_delta(ctx, dry_sequence_breakers=[[3, 7]], **kw)[8] == pytest.approx(-(1.75 ** (5 - 2)))


def test_dry_matches_reference_on_random_contexts():
    rng = random.Random(1)
    vocab = 6
    for _ in range(40):
        ctx = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        breakers = rng.choice([[], [0], [0, 5]])
        kw = dict(dry_multiplier=0.5, dry_base=1.3, dry_allowed_length=rng.choice([1, 2, 3]))
        got = dry_delta(ctx, vocab=vocab, dry_sequence_breakers=[[b] for b in breakers], **kw)
        want = reference_dry(ctx, vocab, 0.5, 1.3, kw["dry_allowed_length"], set(breakers))
        assert got == pytest.approx(want, rel=1e-5), ctx


def test_dry_match_length_capped():
    ctx = [1] * 200
    tokens, lengths = pipeline.dry_match_lengths(torch.tensor(ctx), [])
    assert tokens.tolist() == [1] and lengths.tolist() == [pipeline.DRY_MAX_MATCH]


def test_dry_changes_greedy_choice():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0
    assert tokens(logits, [state([1, 2, 3, 4, 1, 2, 3])]) == [4]
    assert tokens(logits, [state([1, 2, 3, 4, 1, 2, 3], dry_multiplier=1.0)]) != [4]


# ------------------------------------------------------------ reproducibility


def run_steps(seed, steps=20, vocab=1000, **kw):
    g = gen(seed)
    logits = torch.zeros(1, vocab)
    st = SamplingState(SamplingParams(temperature=1.0, **kw), [0], [], g)
    out = []
    for _ in range(steps):
        out.append(tokens(logits, [st])[0])
        st.output_ids.append(out[-1])
    return out


def test_seed_reproducibility():
    assert run_steps(42) == run_steps(42)
    assert run_steps(42) != run_steps(43)
    assert run_steps(42, top_p=0.9) == run_steps(42, top_p=0.9)


def test_unseeded_state_samples():
    logits = torch.zeros(1, 1000)
    drawn = {tokens(logits, [state(temperature=1.0)])[0] for _ in range(5)}
    assert len(drawn) > 1


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, 64, generator=gen(8))
    states = [
        state([1, 2], [3], seed=0, temperature=0.7, top_k=5, presence_penalty=2.0, logit_bias={10: 3.0},
              logprobs=True, top_logprobs=5),
        state([1], [], logprobs=True, top_logprobs=3, repetition_penalty=1.2),
        state(logprobs=True),
    ]
    out = SAMPLER.sample(logits, states)
    ref = torch.log_softmax(logits, -1)
    for r, tok in enumerate(out):
        assert tok.logprob == pytest.approx(ref[r, tok.token_id].item(), abs=1e-6)
    for r, k in [(0, 5), (1, 3)]:
        tl = out[r].top_logprobs
        assert len(tl) == k
        assert [v for _, v in tl] == sorted((v for _, v in tl), reverse=True)
        vals, ids = ref[r].topk(k)
        assert [i for i, _ in tl] == ids.tolist()
        assert [v for _, v in tl] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out[2].top_logprobs == []


def test_no_logprobs_when_not_requested():
    out = SAMPLER.sample(torch.randn(2, 10), [state(top_logprobs=3), state(seed=1, temperature=1.0)])
    assert all(t.logprob is None and t.top_logprobs is None for t in out)
    assert isinstance(out[0], SampledToken) and isinstance(out[0].token_id, int)


# ------------------------------------------------------------ mixed batches


MIXED = [
    dict(),
    dict(temperature=0.8, top_k=20),
    dict(temperature=1.2, top_p=0.7, logprobs=True, top_logprobs=2),
    dict(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5),
    dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3, logit_bias={7: 2.0}),
    dict(temperature=0.9, dry_multiplier=0.8, dry_sequence_breakers=[[0]]),
    dict(logit_bias={3: 10.0}, logprobs=True),
]


def mixed_states():
    rng = random.Random(3)
    return [
        SamplingState(SamplingParams(**kw), [rng.randrange(32) for _ in range(10)],
                      [rng.randrange(32) for _ in range(6)], gen(100 + i))
        for i, kw in enumerate(MIXED)
    ]


def test_mixed_batch_equals_each_row_alone():
    logits = torch.randn(len(MIXED), 32, generator=gen(9)) * 2
    for _ in range(3):
        batch_states, solo_states = mixed_states(), mixed_states()
        batch = SAMPLER.sample(logits, batch_states)
        solo = [SAMPLER.sample(logits[r : r + 1], [solo_states[r]])[0] for r in range(len(MIXED))]
        assert [t.token_id for t in batch] == [t.token_id for t in solo]
        for b, s in zip(batch, solo):
            assert (b.logprob is None) == (s.logprob is None)
            if b.logprob is not None:
                assert b.logprob == pytest.approx(s.logprob, abs=1e-6)


def test_seeded_row_independent_of_batch_composition():
    logits = torch.randn(1, 500, generator=gen(10))
    g = gen(5)
    a = [tokens(logits, [SamplingState(SamplingParams(temperature=1.0), [0], [], g)])[0] for _ in range(10)]
    g = gen(5)
    b = []
    for step in range(10):
        companions = [state(seed=step, temperature=0.5, top_p=0.3), state()]
        batch = torch.cat([torch.randn(1, 500), logits, torch.randn(1, 500)])
        res = tokens(batch, [companions[0], SamplingState(SamplingParams(temperature=1.0), [0], [], g), companions[1]])
        b.append(res[1])
    assert a == b


# -------------------------------------------------------------- processors


def test_custom_processor_runs_after_bias_before_temperature():
    seen = []

    def only_five(ids, row):
        seen.append((list(ids), row[2].item()))
        mask = torch.full_like(row, float("-inf"))
        mask[5] = 0.0
        return row + mask

    logits = torch.zeros(2, 10)
    states = [state(output=[1, 2], logit_bias={2: 1.5}), state(output=[3], seed=0, temperature=1.0)]
    assert tokens(logits, states, processors=[only_five, only_five]) == [5, 5]
    assert seen == [([1, 2], 1.5), ([3], 0.0)]
    assert tokens(logits[:1], states[:1], processors=[None]) == [2]


def test_pipeline_order_dry_penalties_bias_then_processors():
    # Token 4 continues a 3-token repeat, is in the prompt and is biased. In upstream's
    # order: DRY 1.0 - 1.75 = -0.75, repetition (negative, so multiplied) -1.5, bias -1.0.
    captured = []

    def capture(ids, row):
        captured.append(row.clone())
        return row

    logits = torch.zeros(1, 8)
    logits[0, 4] = 1.0
    st = state([1, 2, 3, 4, 1, 2, 3], dry_multiplier=1.0, repetition_penalty=2.0, logit_bias={4: 0.5})
    SAMPLER.sample(logits, [st], processors=[capture])
    assert captured[0][4].item() == pytest.approx(-1.0)


def test_processor_in_place_edit_and_none_entries():
    def ban_argmax(ids, row):
        row[row.argmax()] = float("-inf")
        return row

    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    assert tokens(logits, [state(), state()], processors=[ban_argmax, None]) == [2, 1]


# ------------------------------------------------------------------ params


def test_params_validation_and_conversion():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=0)
    p = SamplingParams(logit_bias={"12": -100}, stop_token_ids=[2, 3], stop_strings=["</s>"],
                       dry_sequence_breakers=[(1,), [2, 3]])
    assert p.logit_bias == {12: -100.0}
    assert p.stop_token_ids == (2, 3) and p.stop_strings == ("</s>",)
    assert p.dry_sequence_breakers == [[1], [2, 3]]
    assert p.dry_base == 1.75 and p.dry_allowed_length == 2 and p.n == 1
    assert SamplingParams().greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_with_defaults():
    cfg = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.1}
    p = SamplingParams().with_defaults(cfg)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.6, 20, 0.95, 0.0, 1.1)
    # Request values win over the file.
    p = SamplingParams(temperature=0.0, top_p=0.5).with_defaults(cfg)
    assert p.temperature == 0.0 and p.top_p == 0.5 and p.greedy and p.top_k == 20
    # Without do_sample transformers decodes greedily: sampling knobs stay unset.
    for no_sample in ({k: v for k, v in cfg.items() if k != "do_sample"}, {**cfg, "do_sample": False}):
        p = SamplingParams().with_defaults(no_sample)
        assert p.greedy and p.temperature is None and p.top_k is None and p.top_p is None
        assert p.repetition_penalty == 1.1  # transformers applies it in greedy search too
    # do_sample without a temperature samples at transformers' default of 1.0, no implicit top_k.
    p = SamplingParams().with_defaults({"do_sample": True})
    assert p.temperature == 1.0 and p.top_k is None and not p.greedy
    assert SamplingParams().with_defaults(None) == SamplingParams()
    assert SamplingParams().with_defaults({"do_sample": True, "temperature": None}).temperature == 1.0


def test_encode_sequence_breakers():
    # Fake tokenizer: "a" -> [1]; "\n" -> 10; ":" -> 11; '"' -> two ids; "*" -> 13; lone text adds a prefix id 99.
    table = {"a": [1], "\n": [10], ":": [11], '"': [12, 14], "*": [13]}

    def encode(text):
        ids = [99]
        for ch in text:
            ids += table[ch]
        return ids

    assert encode_sequence_breakers(encode) == [[10], [11], [12, 14], [13]]
    assert encode_sequence_breakers(encode, ["\n", "\n"]) == [[10]]
