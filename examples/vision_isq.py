"""A vision model quantized while it loads, saved as UQFF and loaded back:
``python examples/vision_isq.py MODEL_DIR IMAGE [ARCH] [ISQ]``.

MODEL_DIR is a Hugging Face vision folder (as for ``examples/vision_chat.py``), IMAGE a path,
URL or data URI, ARCH a ``VisionArchitecture`` name (default LLaVa), ISQ an in-situ
quantization type (default Q8_0). The language model's layers are quantized; the vision
tower and projector stay dense (as upstream mistral.rs does). The UQFF copy goes to a
temporary directory and answers the same question with no quantization pass.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which


def ask(runner: Runner, image: str) -> str:
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", max_tokens=32, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "What is in this image?"}]}]))
    return str(res.choices[0].message.content)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir, image = sys.argv[1], sys.argv[2]
    arch = getattr(VisionArchitecture, sys.argv[3] if len(sys.argv) > 3 else "LLaVa")
    isq = sys.argv[4] if len(sys.argv) > 4 else "Q8_0"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=arch, write_uqff=tmp), in_situ_quant=isq)
        print(f"ISQ {isq} load + UQFF write: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print("ISQ: ", ask(runner, image))
        runner.shutdown()
        shard = sorted(Path(tmp).glob("*.uqff"))[0]
        t = time.perf_counter()
        runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=arch, from_uqff=str(shard)))
        print(f"UQFF load: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print("UQFF:", ask(runner, image))
        runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
