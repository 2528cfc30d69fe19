"""Qwen2-VL / Qwen2.5-VL with video: a ``video_url`` part (an mp4 here, any image source works:
data URI, path, file://, http) and a video given as its frames' image URLs.

    python examples/qwen2_vl_video.py                      # a tiny random Qwen2.5-VL, offline
    python examples/qwen2_vl_video.py MODEL_DIR [Qwen2VL]  # e.g. Qwen/Qwen2.5-VL-3B-Instruct

The file is decoded by PyAV and sampled at 2 frames a second (at least 4 frames, an even
count); every frame is resized alike and two frames make one temporal patch, so the
``<|video_pad|>`` placeholder becomes t x h x w / 4 tokens. Qwen2.5-VL spaces the temporal
patches' positions by seconds. The tiny model's answer is noise; the point is the path.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from qwen2_vl_chat import TEMPLATE, data_uri, write_tiny_qwen25_vl  # noqa: E402

from mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which  # noqa: E402

VIDEO_TEMPLATE = TEMPLATE.replace(
    "{% elif part['type'] == 'text' %}",
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}")


def tiny_model(out: Path) -> Path:
    """The chat example's tiny Qwen2.5-VL (its tokenizer has ``<|video_pad|>``) with a template
    that writes the video placeholder."""
    write_tiny_qwen25_vl(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": VIDEO_TEMPLATE}))
    return out


def mp4_uri(seconds: float = 3.0, fps: int = 10, width: int = 96, height: int = 64) -> str:
    import av
    buf, rng = io.BytesIO(), np.random.default_rng(0)
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    if len(sys.argv) > 1:
        model_dir, arch = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Qwen2_5VL"
    else:
        model_dir, arch = str(tiny_model(Path(tempfile.mkdtemp()))), "Qwen2_5VL"
    runner = Runner(which=Which.VisionPlain(model_id=model_dir, arch=getattr(VisionArchitecture, arch)))
    requests = {
        "a 3 s mp4 at 10 fps": [{"type": "video_url", "video_url": {"url": mp4_uri()}},
                                {"type": "text", "text": "What happens in this video?"}],
        "4 frames as images, 1 s apart": [{"type": "video_url", "video_url": {
            "url": [data_uri(84, 56, seed) for seed in range(4)], "fps": 1}},
            {"type": "text", "text": "Describe the frames."}],
    }
    for what, content in requests.items():
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", max_tokens=12, temperature=0.0, messages=[{"role": "user", "content": content}]))
        print(f"{what}: prompt tokens {res.usage.prompt_tokens}; answer {res.choices[0].message.content!r}")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
