"""Ask a vision model about an image: ``python examples/vision_chat.py MODEL_DIR IMAGE [ARCH]``.

MODEL_DIR is a Hugging Face folder (config.json, safetensors, tokenizer, chat template,
preprocessor_config.json) or hub id already in the local cache; IMAGE a path, file:// or
http(s) URL, or a data URI; ARCH a ``VisionArchitecture`` name (default LLaVa; e.g.
Gemma3 or Gemma3n for google/gemma-3n-E2B-it).

On CPU a big CLIP/SigLIP tower (LLaVa, LLaVaNext, Gemma3) is compiled once while loading;
run with ``MISTRALRS_VISION_COMPILE=0`` to skip that and compare the load and answer times.
"""
from __future__ import annotations

import sys
import time

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir, image = sys.argv[1], sys.argv[2]
    arch = getattr(VisionArchitecture, sys.argv[3] if len(sys.argv) > 3 else "LLaVa")
    t = time.perf_counter()
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=arch))
    print(f"loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", max_tokens=64, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "What is in this image?"}]}]))
    print(res.choices[0].message.content)
    print(f"time to first token {res.usage.total_prompt_time_sec:.2f} s", file=sys.stderr)
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
