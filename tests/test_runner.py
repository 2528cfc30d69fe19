"""The public Runner API end to end on the test-only TinyTest family."""
import math
import threading

import pytest
import torch

from mistralrs import (ChatCompletionRequest, CompletionRequest, Message, NotAvailableYet, Role, Runner,
                       Which)
from mistralrs_core.testing.parity import SingleSequence, our_greedy

CHAT = [{"role": "user", "content": "Tell me a story about the Rust type system."}]


def chat(runner, **kw):
    kw.setdefault("max_tokens", 8)
    return runner.send_chat_completion_request(ChatCompletionRequest(model="default", messages=CHAT, **kw))


def test_spec_example_runs(tiny_runner):
    res = tiny_runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=CHAT, max_tokens=16, presence_penalty=1.0, top_p=0.1, temperature=0.1))
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert isinstance(res.choices[0].message.content, str)
    assert res.choices[0].finish_reason in ("stop", "length")
    u = res.usage
    assert u.prompt_tokens > 10 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.total_time_sec > 0 and u.avg_compl_tok_per_sec > 0


def test_message_objects_and_template(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    ids = pipe.chat_prompt_ids(ChatCompletionRequest(model="m", messages=[Message(Role.User, "hi")]))
    assert pipe.tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_chat_matches_reference(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    res = chat(tiny_runner, max_tokens=10, temperature=0, ignore_eos=True)
    ids = pipe.chat_prompt_ids(ChatCompletionRequest(model="m", messages=CHAT))
    assert res.choices[0].message.content == pipe.tokenizer.decode(our_greedy(pipe.model, ids, 10))


def test_streaming_chunks_concatenate_to_full_answer(tiny_runner):
    full = chat(tiny_runner, max_tokens=12, temperature=0, ignore_eos=True)
    chunks = list(chat(tiny_runner, max_tokens=12, temperature=0, ignore_eos=True, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_closed_early_frees_blocks(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    it = chat(tiny_runner, max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    next(it)
    it.close()
    for _ in range(100):
        if not pipe.engine.scheduler.has_work:
            break
        threading.Event().wait(0.05)
    assert not pipe.engine.scheduler.has_work
    assert all(r == 0 for r in pipe.engine.blocks.ref)


def test_top_k_1_equals_greedy(tiny_runner):
    a = chat(tiny_runner, max_tokens=10, temperature=0, ignore_eos=True).choices[0].message.content
    b = chat(tiny_runner, max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True).choices[0].message.content
    assert a == b


def test_logit_bias_forces_token(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    tok = pipe.tokenizer.encode(" fox", add_special_tokens=False)[0]
    res = chat(tiny_runner, max_tokens=4, temperature=0, logit_bias={tok: 100.0}, ignore_eos=True)
    assert res.choices[0].message.content == pipe.tokenizer.decode([tok] * 4)


def test_stop_sequence_across_token_boundary(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    tok = pipe.tokenizer.encode(" fox", add_special_tokens=False)[0]
    piece = pipe.tokenizer.decode([tok])
    assert len(piece) >= 2
    forced = dict(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={tok: 100.0})
    base = chat(tiny_runner, **forced).choices[0].message.content
    assert base == piece * 6
    # last char of one token + first char of the next: only visible across the boundary
    stop = piece[-1] + piece[0]
    res = chat(tiny_runner, stop_seqs=[stop], **forced)
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].message.content == piece[:-1]
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(tiny_runner, stop_seqs=[stop], stream=True, **forced))
    assert streamed == piece[:-1]


def test_seed_reproducibility(tiny_dir):
    def sample(seed):
        r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=seed)
        try:
            return [chat(r, max_tokens=12, temperature=1.0, ignore_eos=True).choices[0].message.content
                    for _ in range(2)]
        finally:
            r.shutdown()
    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_logprobs_equal_reference_log_softmax(tiny_runner):
    pipe = tiny_runner._pipeline(None)
    res = chat(tiny_runner, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    content = res.choices[0].logprobs.content
    ids = pipe.chat_prompt_ids(ChatCompletionRequest(model="m", messages=CHAT))
    run = SingleSequence(pipe.model, num_blocks=64)
    logits = run.step(ids)[-1]
    for entry in content:
        ref = torch.log_softmax(logits.double(), -1)
        tok = int(ref.argmax())
        assert entry.token == pipe.tokenizer.decode([tok], skip_special_tokens=False)
        assert math.isclose(entry.logprob, float(ref[tok]), abs_tol=1e-4)
        top = torch.topk(ref, 3)
        assert [t.token for t in entry.top_logprobs] == top.indices.tolist()
        assert entry.bytes == list(pipe.tokenizer.token_bytes(tok))
        logits = run.step([tok])[-1]


def test_completion_echo_suffix_best_of(tiny_runner):
    res = tiny_runner.send_completion_request(CompletionRequest(
        prompt="Once upon", model="default", max_tokens=4, echo_prompt=True, suffix="!", temperature=0,
        ignore_eos=True))
    assert res.object == "text_completion"
    assert res.choices[0].text.startswith("Once upon") and res.choices[0].text.endswith("!")
    res = tiny_runner.send_completion_request(CompletionRequest(
        prompt="Once upon", model="default", max_tokens=4, best_of=3, n_choices=2, temperature=1.0,
        ignore_eos=True))
    assert len(res.choices) == 2


def test_tokenize_detokenize_and_context(tiny_runner):
    ids = tiny_runner.tokenize_text("hello world", add_special_tokens=False)
    assert tiny_runner.detokenize_text(ids, skip_special_tokens=True) == "hello world"
    assert tiny_runner.max_sequence_length() == 2048


def test_many_threads_share_one_runner(tiny_runner):
    want = chat(tiny_runner, max_tokens=6, temperature=0, ignore_eos=True).choices[0].message.content
    out, errors = [], []

    def work():
        try:
            out.append(chat(tiny_runner, max_tokens=6, temperature=0, ignore_eos=True).choices[0].message.content)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert not errors and out == [want] * 8


# --- bad input: clear errors, and the runner keeps serving -------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_invalid_fields_raise_value_error(tiny_runner, kwargs, field):
    with pytest.raises(ValueError, match=field):
        chat(tiny_runner, **kwargs)
    assert chat(tiny_runner, max_tokens=2).choices[0].message.content is not None


def test_unknown_role_and_empty_messages(tiny_runner):
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        tiny_runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "wizard", "content": "x"}]))
    with pytest.raises(ValueError, match="messages"):
        tiny_runner.send_chat_completion_request(ChatCompletionRequest(model="default", messages=[]))


def test_prompt_over_context(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), pa_ctxt_len=64, pa_blk_size=8)
    try:
        long = "the quick brown fox " * 40
        with pytest.raises(ValueError, match="context length"):
            r.send_completion_request(CompletionRequest(prompt=long, model="default", max_tokens=2))
        res = r.send_completion_request(CompletionRequest(prompt=long, model="default", max_tokens=2,
                                                          truncate_sequence=True))
        assert res.usage.prompt_tokens < 64
    finally:
        r.shutdown()


def test_unknown_model_id(tiny_runner):
    with pytest.raises(ValueError, match="model_id"):
        chat(tiny_runner, max_tokens=2) if False else tiny_runner.send_chat_completion_request(
            ChatCompletionRequest(model="default", messages=CHAT, max_tokens=2), model_id="nope")


def test_missing_and_broken_model_files(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError):
        Runner(which=Which.Plain(model_id=str(tmp_path / "does-not-exist")))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((tiny_dir / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="model.safetensors"):
        Runner(which=Which.Plain(model_id=str(broken)))
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        Runner(which=Which.Plain(model_id=str(broken)))


def test_unavailable_arguments_are_refused(tiny_dir):
    with pytest.raises(NotAvailableYet, match="mtp_model"):
        Runner(which=Which.Plain(model_id=str(tiny_dir)), mtp_model=Which.Plain(model_id=str(tiny_dir)))


def test_unavailable_request_fields_are_refused(tiny_runner, without_tools_distribution):
    # (tool_schemas is served by the core now: the sandboxed tools' fields stand in, gated
    # as they are where mistralrs-tools-mcp is not installed)
    with pytest.raises(NotAvailableYet, match="enable_code_execution"):
        chat(tiny_runner, enable_code_execution=True)
    with pytest.raises(NotAvailableYet, match="tool_dispatch_url"):
        chat(tiny_runner, tool_dispatch_url="http://127.0.0.1:9/tools")


# --- several models in one runner --------------------------------------------------------
def test_multi_model_routing_unload_reload(tiny_dir, tmp_path):
    from mistralrs_core.testing.tiny import write_tiny_test_family
    other = write_tiny_test_family(tmp_path / "other", seed=1)
    r = Runner(which=[Which.Plain(model_id=str(tiny_dir), dtype="F32"), Which.Plain(model_id=str(other), dtype="F32")])
    try:
        a, b = str(tiny_dir), str(other)
        assert r.list_models() == [a, b]
        assert r.get_default_model_id() == a
        out_a = chat(r, max_tokens=6, temperature=0, ignore_eos=True).choices[0].message.content
        out_b = r.send_chat_completion_request(ChatCompletionRequest(
            model="x", messages=CHAT, max_tokens=6, temperature=0, ignore_eos=True), model_id=b)
        assert out_b.model == b and out_b.choices[0].message.content != out_a
        r.set_default_model_id(b)
        assert chat(r, max_tokens=6, temperature=0, ignore_eos=True).choices[0].message.content == \
            out_b.choices[0].message.content
        with pytest.raises(ValueError):
            r.set_default_model_id("nope")
        r.unload_model(a)
        assert not r.is_model_loaded(a) and r.get_model_status(a) == "unloaded"
        assert r.list_unloaded_models() == [a]
        assert dict(r.list_models_with_status()) == {a: "unloaded", b: "loaded"}
        again = r.send_chat_completion_request_to_model(ChatCompletionRequest(
            model="x", messages=CHAT, max_tokens=6, temperature=0, ignore_eos=True), a)
        assert again.choices[0].message.content == out_a
        assert r.is_model_loaded(a)
        r.unload_model(a)
        r.reload_model(a)
        assert r.get_model_status(a) == "loaded"
        r.remove_model(a)
        assert r.list_models() == [b] and r.get_model_status(a) is None
    finally:
        r.shutdown()


def test_unsupported_which_fields_are_refused(tiny_dir):
    # (from_uqff and topology, the examples here once, are served by mistralrs-quant now)
    with pytest.raises(NotAvailableYet, match="matformer_config_path"):
        Runner(which=Which.Plain(model_id=str(tiny_dir), matformer_config_path="m.yml"))
    with pytest.raises(NotAvailableYet, match="matformer_slice_name"):
        Runner(which=Which.Plain(model_id=str(tiny_dir), matformer_slice_name="s"))
