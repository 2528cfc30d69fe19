"""Tool calling through the Runner and the server: calls come back as OpenAI tool_calls
(ids, names, JSON-text arguments, finish_reason "tool_calls"), streamed as OpenAI streams
them; tools and past calls reach the chat template; bad tools are ValueErrors naming the
field while other requests keep running. The model is scripted (tests/tool_testing.py)."""
import json
import threading

import pytest

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, ToolChoice, Which
from mistralrs_core.tokenization.detokenizer import IncrementalDetokenizer
from tool_testing import SCRIPT, call_text, running_server, scripted, tool

WEATHER = tool("get_weather", {"city": {"type": "string"}}, ["city"])


def chat(**kw):
    kw.setdefault("messages", [SCRIPT, {"role": "user", "content": "Weather in Paris?"}])
    kw.setdefault("max_tokens", 80)
    return ChatCompletionRequest(**kw)


def test_call_comes_back_as_tool_calls(tiny_runner):
    with scripted([call_text("get_weather", {"city": "Paris"})]):
        res = tiny_runner.send_chat_completion_request(chat(tool_schemas=[json.dumps(WEATHER)]))
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.index == 0 and call.id.startswith("call_") and call.type.value == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_text_answer_and_no_tools(tiny_runner):
    with scripted(["It is sunny."]):
        res = tiny_runner.send_chat_completion_request(chat(tool_schemas=[json.dumps(WEATHER)]))
        assert res.choices[0].message.content == "It is sunny." and res.choices[0].message.tool_calls is None
        assert res.choices[0].finish_reason == "stop"
    # tool_choice=NoTools: a call-shaped answer is plain text.
    with scripted([call_text("get_weather", {"city": "Paris"})]):
        res = tiny_runner.send_chat_completion_request(
            chat(tool_schemas=[json.dumps(WEATHER)], tool_choice=ToolChoice.NoTools))
        assert res.choices[0].message.tool_calls is None and "<tool_call>" in res.choices[0].message.content


def test_streamed_tool_calls(tiny_runner):
    text = "Let me check. " + call_text("get_weather", {"city": "Paris"})
    with scripted([text]):
        chunks = list(tiny_runner.send_chat_completion_request(chat(tool_schemas=[json.dumps(WEATHER)], stream=True)))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content.strip() == "Let me check."
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or ())]
    # OpenAI's shape: the first piece has id, type and name; then argument text.
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert pieces[0].function.arguments == "" and pieces[0].type.value == "function"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_history_with_calls_and_results_renders(tiny_runner):
    """Assistant tool_calls and tool messages go through the template (tools as a system
    message for this template, which knows no tools)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [SCRIPT, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    pipe = tiny_runner._pipeline(None)
    req, calling = pipe.tool_calling(chat(messages=messages, tool_schemas=[json.dumps(WEATHER)]))
    text = pipe.tokenizer.decode(pipe.chat_prompt(req).ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]        # tools in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "The get_weather tool returned: 21 C and sunny" in text
    with scripted(["Sunny, 21 C.", "Sunny, 21 C."]):
        res = tiny_runner.send_chat_completion_request(chat(messages=messages, tool_schemas=[json.dumps(WEATHER)]))
    assert res.choices[0].message.content == "Sunny, 21 C."


def test_special_call_markers_survive_detokenisation():
    """A marker that is a special token reaches the parser; other specials stay hidden."""
    import tokenizers
    from mistralrs_core.agent.formats import keep_token_ids
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eot|>", "<tool_call>", "</tool_call>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = Tokenizer.from_tokenizers(t, eos_token="<|eot|>")
    keep = keep_token_ids(tok)
    assert keep == {tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")}
    ids = tok.encode('<|eot|><tool_call>{"a": 1}</tool_call>', add_special_tokens=False)
    plain = IncrementalDetokenizer(tok)
    kept = IncrementalDetokenizer(tok, keep_ids=keep)
    assert plain.push_many(ids) + plain.flush() == '{"a": 1}'
    assert kept.push_many(ids) + kept.flush() == '<tool_call>{"a": 1}</tool_call>'


def test_bad_tools_are_value_errors_and_others_keep_running(tiny_runner):
    bad_schema = tool("f", {"a": {"type": "strin"}})
    errors = {}
    with scripted(["fine"]):
        results = []
        worker = threading.Thread(target=lambda: results.append(
            tiny_runner.send_chat_completion_request(chat(max_tokens=40))))
        worker.start()
        with pytest.raises(ValueError, match=r"^tool_schemas\[0\]\.function\.parameters\.?.*not a valid JSON Schema"):
            tiny_runner.send_chat_completion_request(chat(tool_schemas=[json.dumps(bad_schema)]))
        with pytest.raises(ValueError, match=r"^tool_choice: names the unknown tool 'nope'"):
            tiny_runner.send_chat_completion_request(chat(
                tool_schemas=[json.dumps(WEATHER)], tool_choice_openai={"type": "function", "function": {"name": "nope"}}))
        with pytest.raises(ValueError, match=r"^tool_schemas: completion requests cannot return tool calls"):
            tiny_runner.send_completion_request(CompletionRequest(prompt="x", tool_schemas=[json.dumps(WEATHER)]))
        worker.join(60)
        assert results and results[0].choices[0].message.content == "fine", errors


def test_server_tools_with_the_openai_client(tiny_runner):
    openai = pytest.importorskip("openai")
    messages = [SCRIPT, {"role": "user", "content": "Weather in Paris?"}]
    with running_server(tiny_runner) as base, openai.OpenAI(base_url=f"{base}/v1", api_key="x",
                                                            max_retries=0) as client:
        with scripted([call_text("get_weather", {"city": "Paris"}), "It is 21 C."]):
            res = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=80)
            choice = res.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.tool_calls[0].function.name == "get_weather"
            assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
            # Streamed: the client puts the pieces back together.
            stream = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER],
                                                    max_tokens=80, stream=True)
            calls, finish = {}, None
            for chunk in stream:
                for tc in chunk.choices[0].delta.tool_calls or ():
                    c = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                    c["name"] += tc.function.name or ""
                    c["arguments"] += tc.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            assert finish == "tool_calls"
            assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
            assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
            # The result goes back as a tool message after the assistant's call; the answer comes.
            follow = messages + [choice.message.model_dump(exclude_none=True),
                                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "21 C"}]
            res = client.chat.completions.create(model="default", messages=follow, tools=[WEATHER], max_tokens=80)
            assert res.choices[0].message.content == "It is 21 C." and res.choices[0].finish_reason == "stop"
            with pytest.raises(openai.BadRequestError, match="tool_choice"):
                client.chat.completions.create(model="default", messages=messages, tools=[WEATHER],
                                               tool_choice={"type": "function", "function": {"name": "nope"}})


QWENISH = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_with_tools_gets_them(tiny_dir):
    """A template that renders tools gets ``tools=`` (OpenAI objects) and past arguments as
    objects (rendered once by tojson, not a JSON string encoded twice)."""
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), chat_template=QWENISH)
    try:
        pipe = r._pipeline(None)
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
        req, calling = pipe.tool_calling(chat(messages=messages, tool_schemas=[json.dumps(WEATHER)]))
        text = pipe.tokenizer.decode(pipe.chat_prompt(req).ids, skip_special_tokens=False)
        assert '"name": "get_weather"' in text.split("<|im_end|>")[0] and "# Tools" in text
        assert '"arguments": {"city": "Paris"}}' in text
        assert "<|im_start|>tool\n21 C" in text
        # tool_choice none: no tools shown, the history still renders.
        req, calling = pipe.tool_calling(chat(messages=messages, tool_schemas=[json.dumps(WEATHER)],
                                              tool_choice=ToolChoice.NoTools))
        text = pipe.tokenizer.decode(pipe.chat_prompt(req).ids, skip_special_tokens=False)
        assert calling is None and "# Tools" not in text and '"arguments": {"city": "Paris"}}' in text
    finally:
        r.shutdown()
