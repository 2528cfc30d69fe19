"""Ask a model that hears about an audio clip (and, optionally, an image in the same message):
``python examples/audio_chat.py MODEL_DIR AUDIO [IMAGE] [ARCH]``.

MODEL_DIR is a Hugging Face folder (config.json, safetensors, tokenizer, chat template,
preprocessor_config.json) or a hub id already in the local cache, e.g. google/gemma-3n-E2B-it;
AUDIO a wav/flac/ogg/mp3 path, file:// or http(s) URL, or a data URI (any sample rate: clips are
resampled to the encoder's); IMAGE likewise for an image; ARCH a ``VisionArchitecture`` name
(default Gemma3n).
"""
from __future__ import annotations

import sys
import time

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which


def main() -> int:
    args = sys.argv[1:]
    arch_name = args.pop() if len(args) > 2 and hasattr(VisionArchitecture, args[-1]) else "Gemma3n"
    if len(args) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir, audio = args[0], args[1]
    t = time.perf_counter()
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=getattr(VisionArchitecture, arch_name)))
    print(f"loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    parts: list[dict[str, object]] = [{"type": "audio_url", "audio_url": {"url": audio}}]
    question = "What do you hear?"
    if len(args) == 3:
        parts.append({"type": "image_url", "image_url": {"url": args[2]}})
        question = "What do you hear, and what do you see?"
    parts.append({"type": "text", "text": question})
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", max_tokens=64, temperature=0.0, messages=[{"role": "user", "content": parts}]))
    print(res.choices[0].message.content)
    print(f"{res.usage.prompt_tokens} prompt tokens, time to first token "
          f"{res.usage.total_prompt_time_sec:.2f} s", file=sys.stderr)
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
