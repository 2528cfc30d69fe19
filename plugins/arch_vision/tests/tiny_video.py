"""Small test videos written with PyAV: smooth random frames (so resizing has detail to
work on), encoded with a codec the PyAV wheel ships."""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np


def random_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, height, width, 3]: a moving gradient plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for k in range(n):
        base = np.stack([(x * 3 + k * 11) % 256, (y * 5 + k * 7) % 256, ((x + y) * 2 + k * 13) % 256], -1)
        frames.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255))
    return np.asarray(frames, dtype=np.uint8)


def encode_video(frames: np.ndarray, fps: int = 10, codec: str = "mpeg4", container: str = "mp4") -> bytes:
    """uint8 [T, H, W, 3] -> an encoded clip (even sides for yuv420p codecs)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
