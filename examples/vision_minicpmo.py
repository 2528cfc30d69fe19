"""MiniCPM-o 2.6 / MiniCPM-V 2.6 on one big image and on two images:
``python examples/vision_minicpmo.py MODEL_DIR IMAGE [IMAGE2]``.

MODEL_DIR is openbmb's folder (``openbmb/MiniCPM-o-2_6`` or ``MiniCPM-V-2_6``, config.json with
``model_type`` minicpmo/minicpmv, safetensors, tokenizer, preprocessor_config.json); IMAGE a
path, URL or data URI. A large image is read whole (the source image) and as a grid of
slices of about ``scale_resolution``² pixels each; every piece costs ``query_num`` tokens
(64 in the released models) between its ``<image>``/``<slice>`` markers, so the prompt-token
counts printed show the slicing. Images only: MiniCPM-o's audio input is not supported.
"""
from __future__ import annotations

import sys
from typing import Any

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which


def ask(runner: Runner, parts: list[dict[str, Any]]) -> None:
    req = ChatCompletionRequest(model="default", max_tokens=48, temperature=0.0,
                                messages=[{"role": "user", "content": parts}])
    res = runner.send_chat_completion_request(req)
    print(f"{res.usage.prompt_tokens} prompt tokens -> {res.choices[0].message.content!r}")


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir, first = sys.argv[1], sys.argv[2]
    second = sys.argv[3] if len(sys.argv) > 3 else first
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=VisionArchitecture.MiniCpmO))

    def image(url: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": url}}
    ask(runner, [image(first), {"type": "text", "text": "What is in this image?"}])
    ask(runner, [{"type": "text", "text": "Compare"}, image(first), image(second)])
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
