"""Pre-quantized checkpoints and the FP8 KV cache, offline on a tiny random model.

Writes a tiny 4-bit GPTQ checkpoint (``qweight``/``qzeros``/``scales``/``g_idx`` and a
``quantization_config`` in config.json, as AutoGPTQ saves one) and loads it with a plain
``Which.Plain``: the format is detected from config.json and the projections stay packed.
A dense folder holding the GPTQ weights dequantized gives the same tokens and logprobs.
Then the same model runs with ``pa_cache_type=PagedCacheType.F8E4M3`` (K/V cached as FP8).

AWQ and FP8 (per-tensor or DeepSeek-V3 128x128 blocks) checkpoints load the same way; see
``mistralrs_quant.checkpoint_writers`` for their layouts.

    python examples/prequantized.py
"""
import tempfile
from typing import Any
from pathlib import Path

from mistralrs import ChatCompletionRequest, ModelDType, PagedCacheType, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama
from mistralrs_quant.checkpoint_writers import write_dense, write_gptq

root = Path(tempfile.mkdtemp())
dense = write_random_llama(root / "dense", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
dequantized = write_gptq(dense, root / "gptq", bits=4, group_size=32, desc_act=True)
reference = write_dense(dense, root / "gptq_dequantized", dequantized)

request = ChatCompletionRequest(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
                                temperature=0.0, logprobs=True, ignore_eos=True)


def run(model_dir: Path, **options: Any) -> tuple[Any, list[str]]:
    runner = Runner(which=Which.Plain(model_id=str(model_dir), dtype=ModelDType.F32), **options)
    res = runner.send_chat_completion_request(request)
    layer = runner._pipeline(None).model.model.layers[0].self_attn
    kinds = sorted({type(m.qmethod).__name__ for m in layer.modules() if getattr(m, "qmethod", None) is not None})
    runner.shutdown()
    return res.choices[0], kinds


gptq, kinds = run(root / "gptq")
ref, _ = run(reference)
print(f"GPTQ layers: {kinds}; text: {gptq.message.content!r}")
print("same tokens as the dense dequantized model:",
      [t.token for t in gptq.logprobs.content] == [t.token for t in ref.logprobs.content])
print("max logprob difference:",
      max(abs(a.logprob - b.logprob) for a, b in zip(gptq.logprobs.content, ref.logprobs.content)))

# A random tiny model has near-ties everywhere, so greedy text may part ways once a cached
# value rounds differently; tests/test_fp8_kv_cache.py bounds the drift token by token.
fp8, _ = run(root / "gptq", pa_cache_type=PagedCacheType.F8E4M3)
same = 0
for a, b in zip(fp8.logprobs.content, gptq.logprobs.content):
    if a.token != b.token:
        break
    same += 1
print(f"with the FP8 KV cache: {fp8.message.content!r}; first {same} tokens equal the model-dtype cache's")
