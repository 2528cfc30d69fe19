"""What the vision families' tests share: random images, data URIs, greedy chat requests
with logprobs, and sending requests to a Runner at once."""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image


def random_image(seed: int, size=(37, 29)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(parts, n=6):
    from mistralrs import ChatCompletionRequest
    return ChatCompletionRequest(model="default", messages=[{"role": "user", "content": parts}],
                                 max_tokens=n, temperature=0.0, logprobs=True, ignore_eos=True)


def run_concurrently(runner, reqs) -> list:
    """Each request from its own thread, so the engine batches them; results in order."""
    results = [None] * len(reqs)

    def work(i):
        results[i] = runner.send_chat_completion_request(reqs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results
