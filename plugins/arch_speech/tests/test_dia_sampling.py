"""The engine's sampler (``sample_frame``: the CFG filter's top-k candidates, all codebooks
and requests at once) against the first full-row implementation (``reference_sampler``):
the same candidates and probabilities, the same greedy tokens, the same end-of-speech and
delay-pattern bookkeeping, draws that follow the distribution, and a request's draw that
does not depend on the others in its batch."""
from __future__ import annotations

import pytest
import torch

from mistralrs_arch_speech.sampling import SpeechSampling, candidate_scores, sample_frame

from reference_sampler import eos_channel_filter, guided_scores, reference_sample, top_k_top_p

SETTINGS = [
    SpeechSampling(cfg_scale=3.0, temperature=1.3, top_p=0.95, top_k=35),       # Dia's defaults
    SpeechSampling(cfg_scale=3.0, temperature=1.0, top_p=0.8, top_k=5),
    SpeechSampling(cfg_scale=3.0, temperature=1.3, top_p=None, top_k=35),
    SpeechSampling(cfg_scale=2.0, temperature=1.2, top_p=0.9, top_k=None),      # guidance, no filter
    SpeechSampling(cfg_scale=1.0, temperature=1.3, top_p=0.95, top_k=35),       # no guidance
    SpeechSampling(cfg_scale=1.0, temperature=1.0, top_p=None, top_k=None),
    SpeechSampling(cfg_scale=3.0, temperature=1.0, top_p=None, top_k=6, greedy=True),
    SpeechSampling(cfg_scale=1.0, temperature=1.0, top_p=None, top_k=None, greedy=True),
]
VOCAB = {"tiny": (20, 16, 17), "dia": (1028, 1024, 1025)}       # (V, EOS, PAD)


def _case(seed: int, n: int, channels: int, vocab: int, eos: int):
    """Random logits where some codebooks prefer EOS (codebook 0: may end; others: must
    not), with ties, and random end-of-speech states."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, channels, vocab, generator=g) * 3
    for i in range(n):
        # codebook 0 ends / another codebook wants EOS (never allowed) / codebook 0 is near it
        c = int(torch.randint(1, channels, (), generator=g)) if i % 3 == 2 else 0
        logits[i, 0, c, eos] += 2.0 if i % 3 == 0 else 12.0
    logits[0, 0, 0, 3] = logits[0, 0, 0, 4] = logits[0, 0, 0].max() + 1     # a tie for the best token
    ended = torch.rand(n, generator=g) < 0.3
    delay_left = torch.randint(-2, 4, (n, channels), generator=g)
    delay_left[~ended] = torch.randint(0, 4, (channels,), generator=g)
    at_max = torch.rand(n, generator=g) < 0.2
    return logits, ended, delay_left, at_max


def _full_row(scores, ids, vocab):
    return torch.full((*scores.shape[:2], vocab), float("-inf")).scatter(-1, ids.expand_as(scores), scores)


@pytest.mark.parametrize("s", SETTINGS, ids=str)
@pytest.mark.parametrize("size", ["tiny", "dia"])
def test_candidates_equal_the_full_row_filters(s, size):
    vocab, eos, _ = VOCAB[size]
    for seed in range(6):
        logits, *_ = _case(seed, 3, 9, vocab, eos)
        want = eos_channel_filter(guided_scores(logits, s), eos)
        if not s.greedy:
            want = top_k_top_p(want, s.top_k, s.top_p)
        scores, ids, eos_best = candidate_scores(logits, s, eos)
        got = _full_row(scores, ids, vocab)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])   # same values, bit for bit
        assert torch.equal(eos_best[:, 0], want[:, 0].argmax(-1) == eos)
        torch.testing.assert_close(got.softmax(-1), want.softmax(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("s", SETTINGS, ids=str)
def test_frame_bookkeeping_and_greedy_tokens_equal_the_reference(s):
    vocab, eos, pad = VOCAB["dia"]
    for seed in range(5):
        logits, ended, delay_left, at_max = _case(100 + seed, 4, 9, vocab, eos)
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        draw = sample_frame(logits, s, ended, delay_left, at_max, gens, eos, pad)
        tok, want_ended, want_delay, want_natural, probs = reference_sample(
            logits, s, ended, delay_left, at_max, [torch.Generator().manual_seed(i) for i in range(4)], eos, pad)
        assert torch.equal(draw.ended, want_ended)
        assert torch.equal(draw.delay_left, want_delay)
        assert torch.equal(draw.natural_end, want_natural)
        determined = (delay_left < 0) | (want_ended[:, None] & (delay_left == 0))    # padding / forced EOS
        if s.greedy:
            assert torch.equal(draw.tokens, tok)
        else:
            assert torch.equal(draw.tokens[determined], tok[determined])
            # every sampled token is one the reference could have drawn
            assert bool((probs.gather(-1, draw.tokens[..., None])[..., 0][~determined] > 0).all())


def test_draws_follow_the_distribution():
    vocab, eos, pad = VOCAB["tiny"]
    s = SpeechSampling(cfg_scale=3.0, temperature=1.3, top_p=0.95, top_k=6)
    logits, *_ = _case(7, 1, 3, vocab, eos)
    logits[..., eos] = -30.0                          # no natural end: codebook 0 samples too
    n = 400
    batch = logits.expand(n, -1, -1, -1)
    never = torch.zeros(n, dtype=torch.bool)
    delay = torch.full((n, 3), 5)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    counts = torch.zeros(3, vocab)
    rounds = 60
    for _ in range(rounds):
        tokens = sample_frame(batch, s, never, delay, never, gens, eos, pad).tokens
        counts.scatter_add_(-1, tokens.t(), torch.ones(3, n))
    freq = counts / (n * rounds)
    scores, ids, _ = candidate_scores(logits, s, eos)
    p = _full_row(scores, ids, vocab).softmax(-1)[0]
    assert bool((freq[p == 0] == 0).all())
    # within 5 standard errors of the exact probability, for every token of every codebook
    bound = 5 * (p * (1 - p) / (n * rounds)).sqrt() + 1e-4
    assert bool(((freq - p).abs() <= bound).all()), ((freq - p).abs() - bound).max()


def test_a_requests_draw_does_not_depend_on_its_batch():
    vocab, eos, pad = VOCAB["dia"]
    s = SETTINGS[0]
    logits, ended, delay_left, at_max = _case(11, 3, 9, vocab, eos)
    together = sample_frame(logits, s, ended, delay_left, at_max,
                            [torch.Generator().manual_seed(40 + i) for i in range(3)], eos, pad).tokens
    for i in range(3):
        alone = sample_frame(logits[i:i + 1], s, ended[i:i + 1], delay_left[i:i + 1], at_max[i:i + 1],
                             [torch.Generator().manual_seed(40 + i)], eos, pad).tokens
        assert torch.equal(alone[0], together[i])
