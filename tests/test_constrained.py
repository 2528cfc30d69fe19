"""Constrained decoding on the tiny random model: the mask and consume logic of one
sequence's grammar, masks prefetched off the critical path, and the engine paths a grammar
must survive (mixed batches, n > 1, preemption, recompute, drafts, streaming, stop strings,
bad grammars next to running requests). A random model picks its tokens almost at random,
so every output that matches is the grammar's doing."""
import json
import re
import threading

import jsonschema
import llguidance
import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_core.constrained import masks as mask_ops
from mistralrs_core.constrained import state as state_mod
from mistralrs_core.constrained.compile import GrammarCompiler
from mistralrs_core.constrained.state import SequenceGrammar
from mistralrs_core.constrained.vocab import grammar_tokenizer

EMAIL = r"[a-z]{3,6}@(example|test)\.com"
SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "kind": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
              "required": ["name"], "additionalProperties": False}},
    "required": ["id", "kind", "tags", "owner"], "additionalProperties": False}


@pytest.fixture(scope="module")
def runner(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0)
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def pipe(runner):
    return runner._pipeline(None)


def complete(runner, prompt="the quick brown fox", **kw):
    kw.setdefault("max_tokens", 40)
    return runner.send_completion_request(CompletionRequest(prompt=prompt, model="default", **kw))


def allowed_by_llguidance(matcher, vocab):
    """Bool [vocab] read bit by bit from llguidance's own mask bytes (not through our unpacking)."""
    raw = matcher.compute_bitmask()
    return torch.tensor([bool((raw[t // 8] >> (t % 8)) & 1) for t in range(vocab)])


def test_mask_bias_unpacks_bits_in_token_order():
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32)
    bias = mask_ops.mask_bias(bitmask)
    for r in range(3):
        for t in range(160):
            bit = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert bias[r, t].item() == (0.0 if bit else float("-inf"))
    logits = torch.randn(170)
    mask_ops.apply_bias(logits, bias[0])
    assert torch.equal(torch.isfinite(logits[:160]), bias[0] == 0) and not torch.isfinite(logits[160:]).any()


# --- one sequence's grammar ------------------------------------------------------------------
def test_mask_consume_and_stop(pipe):
    tok = pipe.tokenizer
    compiled = pipe.grammar_compiler.compile("regex", "ab(c|d)")
    g = SequenceGrammar(compiled)
    ids = tok.encode("abd", add_special_tokens=False)
    reference = compiled.new_matcher()
    out = []
    for tid in ids:
        logits = torch.randn(tok.vocab_size + 7)        # a head wider than the tokenizer
        g(out, logits)
        allowed = torch.isfinite(logits)
        assert torch.equal(allowed[:tok.vocab_size], allowed_by_llguidance(reference, tok.vocab_size))
        assert not allowed[tok.vocab_size:].any()
        assert allowed[tid]
        out.append(tid)
        g.sync(out)
        g.sync(out)                                     # idempotent: never consumed twice
        assert reference.consume_token(tid)
        assert g.consumed == len(out)
    assert g.stopped and g.accepting and g.error is None
    assert not g.wants_mask()


def test_a_refused_token_is_an_error_that_leaves_only_end_tokens(pipe):
    g = SequenceGrammar(pipe.grammar_compiler.compile("regex", "a+"))
    bad = pipe.tokenizer.encode("z", add_special_tokens=False)
    g.sync(bad)
    assert g.error and not g.stopped
    allowed = g.bias()[:pipe.tokenizer.vocab_size] == 0
    assert set(torch.nonzero(allowed).flatten().tolist()) == set(pipe.engine.eos_ids)


def test_byte_table_vocabulary_gives_the_same_masks(pipe):
    tok, eos = pipe.tokenizer, pipe.engine.eos_ids
    a, b = grammar_tokenizer(tok, eos), grammar_tokenizer(tok, eos, from_bytes=True)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    ma, mb = llguidance.LLMatcher(a, grammar), llguidance.LLMatcher(b, grammar)
    for tid in tok.encode('{"id": 12, "kind": "dog", "tags": ["ab"], "owner": {"name": "x"}}',
                          add_special_tokens=False):
        assert torch.equal(allowed_by_llguidance(ma, tok.vocab_size), allowed_by_llguidance(mb, tok.vocab_size))
        assert ma.consume_token(tid) and mb.consume_token(tid)
    assert ma.is_accepting() and mb.is_accepting()


def test_sampler_editing_the_logits_in_place_draws_the_same(pipe):
    """The engine lets the sampler mask its logits in place (no private copy): same draws,
    and logprobs still come from the raw values."""
    from mistralrs_core.sampling import SamplingParams, SamplingState, Sampler
    compiled = pipe.grammar_compiler.compile("regex", "[a-m]+")
    vocab = pipe.tokenizer.vocab_size
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    kinds = [dict(), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, presence_penalty=1.0),
             dict(temperature=0.7, logprobs=True, top_logprobs=2)]

    def draw(in_place):
        states = [SamplingState(SamplingParams(**k), [1, 2], [], torch.Generator().manual_seed(i))
                  for i, k in enumerate(kinds)]
        procs = [SequenceGrammar(compiled) for _ in kinds]
        x = logits.clone()
        return Sampler().sample(x, states, processors=procs, may_edit_logits=in_place), x
    (copied, untouched), (edited, x) = draw(False), draw(True)
    assert copied == edited and torch.equal(untouched, logits)
    assert copied[3].logprob == pytest.approx(torch.log_softmax(logits[3], -1)[copied[3].token_id].item())
    assert all(re.fullmatch("[a-m]+", pipe.tokenizer.decode([t.token_id])) for t in copied)


# --- through the engine ----------------------------------------------------------------------
def test_sampled_outputs_always_match(runner):
    res = complete(runner, temperature=1.0, n_choices=8, seed=3, grammar=EMAIL, grammar_type="regex")
    for c in res.choices:
        assert re.fullmatch(EMAIL, c.text), c.text
        assert c.finish_reason == "stop"
    chat = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "a pet"}], max_tokens=40, temperature=1.0, seed=1, n_choices=2,
        grammar=r"(cat|dog|hamster)(, (cat|dog|hamster)){0,2}", grammar_type="regex"))
    for c in chat.choices:
        assert re.fullmatch(r"(cat|dog|hamster)(, (cat|dog|hamster)){0,2}", c.message.content)


def test_lark_with_embedded_json_schema(runner):
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["x"], "additionalProperties": False}
    # %json takes llguidance's defaults (any whitespace); x-guidance asks for compact JSON.
    embedded = {**schema, "x-guidance": {"whitespace_flexible": False}}
    lark = f'start: "CALL " NAME " " args\nNAME: "add" | "sub"\nargs: %json {json.dumps(embedded)}\n'
    res = complete(runner, temperature=1.0, n_choices=4, seed=5, grammar=lark, grammar_type="lark")
    for c in res.choices:
        assert c.finish_reason == "stop", c.text
        m = re.fullmatch(r"CALL (add|sub) (.*)", c.text, re.S)
        assert m, c.text
        jsonschema.validate(json.loads(m.group(2)), schema)


def test_masks_are_computed_off_the_critical_path(runner, pipe, monkeypatch):
    """Every mask the sampler used came from the worker: none was computed on the spot."""
    on_the_spot = []
    real = state_mod.fill_bitmask
    monkeypatch.setattr(state_mod, "fill_bitmask", lambda *a: (on_the_spot.append(1), real(*a)))
    steps = pipe.engine.stats["steps"]
    res = complete(runner, temperature=0.0, grammar=r"[a-z ]{20}", grammar_type="regex")
    assert len(res.choices[0].text) == 20
    assert pipe.engine.stats["steps"] - steps >= 5
    assert on_the_spot == []
    assert pipe.engine._masks.jobs > 0


def run_together(runner, requests):
    out = [None] * len(requests)

    def work(i):
        out[i] = runner.send_completion_request(requests[i]).choices[0].text
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def mixed_requests():
    base = dict(model="default", max_tokens=16, temperature=0.0)
    return [CompletionRequest(prompt="the lazy dog", grammar=EMAIL, grammar_type="regex",
                              **{**base, "max_tokens": 24}),
            CompletionRequest(prompt="fox jumps", **base),
            CompletionRequest(prompt="compiler borrows", ignore_eos=True, **base),
            CompletionRequest(prompt="the quick", grammar=r"(yes|no|maybe)", grammar_type="regex", **base)]


def test_mixed_batch_equals_each_alone(runner):
    alone = [runner.send_completion_request(r).choices[0].text for r in mixed_requests()]
    assert run_together(runner, mixed_requests()) == alone
    assert re.fullmatch(EMAIL, alone[0]) and alone[3] in ("yes", "no", "maybe")


@pytest.mark.parametrize("options", [dict(pa_blk_size=8, pa_ctxt_len=48, prefix_cache_n=0),
                                     dict(no_kv_cache=True)])
def test_preemption_and_recompute_keep_the_matcher_in_step(runner, tiny_dir, options):
    """Recomputing a sequence (preempted, or no KV cache) replays its tokens through the
    model but never through its matcher again."""
    reqs = [CompletionRequest(prompt="the quick brown fox jumps over the lazy dog and then the", model="default",
                              max_tokens=24, temperature=1.0, seed=i, grammar=r"[a-z]{5}( [a-z]{5}){2}",
                              grammar_type="regex") for i in range(4)]
    want = [runner.send_completion_request(r).choices[0].text for r in reqs]
    other = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), **options)
    try:
        got = run_together(other, reqs)
        engine = other._pipeline(None).engine
        if "pa_ctxt_len" in options:
            assert engine.scheduler.preemptions > 0
    finally:
        other.shutdown()
    assert got == want


def test_drafts_are_masked_row_by_row(runner, pipe):
    from test_step_records import RandomDrafter
    req = dict(temperature=0.9, seed=11, grammar=EMAIL, grammar_type="regex")
    plain = complete(runner, **req).choices[0].text
    pipe.engine.drafter = RandomDrafter(pipe.tokenizer.vocab_size, 3)
    try:
        assert complete(runner, **req).choices[0].text == plain
        assert pipe.engine.stats["draft_tokens"] > 0
    finally:
        pipe.engine.drafter = None
    assert re.fullmatch(EMAIL, plain)


def test_streaming_and_stop_strings(runner):
    req = dict(temperature=1.0, seed=2, grammar=EMAIL, grammar_type="regex")
    whole = complete(runner, **req).choices[0].text
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="the quick brown fox", max_tokens=40, stream=True, **req))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole
    cut = complete(runner, stop_seqs=["@"], **req).choices[0]
    assert cut.text == whole.split("@")[0] and cut.finish_reason == "stop"


def test_bad_grammars_are_refused_while_another_request_runs(runner):
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        r=complete(runner, prompt="the lazy dog", max_tokens=24, temperature=0.0, ignore_eos=True)))
    worker.start()
    with pytest.raises(ValueError, match=r"^grammar: the lark grammar does not compile: .*Expected"):
        complete(runner, grammar="start: (", grammar_type="lark")
    with pytest.raises(ValueError, match=r"^grammar: the regex grammar does not compile"):
        complete(runner, grammar="a(b", grammar_type="regex")
    with pytest.raises(ValueError, match=r"^grammar: the json_schema grammar does not compile"):
        complete(runner, grammar={"type": "no-such-type"}, grammar_type="json_schema")
    with pytest.raises(ValueError, match=r"^grammar_type: must be one of regex, lark, json_schema, llguidance"):
        complete(runner, grammar="a+", grammar_type="ebnf")
    worker.join(timeout=120)
    assert result["r"].usage.completion_tokens == 24


def test_llguidance_grammar_type(runner):
    grammar = {"grammars": [{"lark_grammar": 'start: "x" /[0-9]{3}/'}]}
    text = complete(runner, temperature=1.0, seed=4, grammar=grammar, grammar_type="llguidance").choices[0].text
    assert re.fullmatch(r"x[0-9]{3}", text)


def test_compiler_reports_unknown_type_itself(pipe):
    with pytest.raises(ValueError, match="^grammar_type: "):
        GrammarCompiler(pipe.tokenizer, pipe.engine.eos_ids).compile("yaml", "a")
