"""Speculative decoding, offline on tiny random models.

A draft model proposes ``speculative_gamma`` tokens per step and the target verifies them in
one forward; the output is the target's own (greedy: the same tokens; sampled: the same
distribution). Without a draft model, ``speculative_ngram`` proposes what followed an earlier
occurrence of the last tokens (prompt lookup). ``usage.completion_tokens_details`` reports the
drafted tokens kept and rejected. For real models and timings see ``bench/speculative.py``
(float32 SmolLM2-135M drafted by its own Q4_1 GGUF: 1.6-2.4x greedy tok/s).

    python examples/speculative_decoding.py
"""
import tempfile
from typing import Any
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama

root = Path(tempfile.mkdtemp())
target_dir = write_random_llama(root / "target", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
# A stand-in for a smaller model of the same family: the target's weights plus noise, with the
# same tokenizer (a draft with another vocabulary is refused with a ValueError).
draft_dir = root / "draft"
draft_dir.mkdir()
for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    (draft_dir / name).write_bytes((target_dir / name).read_bytes())
g = torch.Generator().manual_seed(0)
save_file({k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g)
           for k, v in load_file(str(target_dir / "model.safetensors")).items()},
          str(draft_dir / "model.safetensors"))

target = Which.Plain(model_id=str(target_dir), dtype=ModelDType.F32)
request = CompletionRequest(prompt="The quick brown fox jumps over the lazy dog. The quick", model="default",
                            max_tokens=48, temperature=0.0, ignore_eos=True)

alone = Runner(which=target)
expected = alone.send_completion_request(request).choices[0].text
alone.shutdown()

runs: list[tuple[str, dict[str, Any]]] = [
    ("draft model, gamma 4",
     dict(which_draft=Which.Plain(model_id=str(draft_dir), dtype=ModelDType.F32), speculative_gamma=4)),
    ("prompt lookup, n-gram 3, gamma 4", dict(speculative_ngram=3, speculative_gamma=4))]
for label, options in runs:
    runner = Runner(which=target, **options)
    res = runner.send_completion_request(request)
    details = res.usage.completion_tokens_details
    assert details is not None
    print(f"{label}: same text as the target alone: {res.choices[0].text == expected}; "
          f"drafts kept {details.accepted_prediction_tokens}, rejected {details.rejected_prediction_tokens}")
    runner.shutdown()
