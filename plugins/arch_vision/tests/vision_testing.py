"""What the vision families' tests share: one sequence stepped through a model's text side
as the runner drives it, random images, data URIs, greedy chat requests with logprobs,
sending requests to a Runner at once, and checking a greedy answer against the reference
model."""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.engine.step import record
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.testing.concurrency import submitted_together


class OneSequence:
    """One sequence through a vision model with a paged cache, step by step: a step's
    feature spans go into its record (Gemma 3's bidirectional image attention comes from
    them) and their features are spliced into the step's rows, as the runner does."""

    def __init__(self, model, block_size=4, num_blocks=64):
        self.model = model
        self.caches = [make_layer_cache(s, num_blocks, block_size, model.dtype, "cpu")
                       for s in model.kv_cache_specs()]
        self.blocks, self.block_size, self.pos = list(range(num_blocks)), block_size, 0

    @torch.inference_mode()
    def step(self, ids, spans=()):
        """The logits of ``ids`` (the next tokens of the sequence); ``spans``: the feature
        spans they cover."""
        rec = record(ids, self.pos, self.blocks, spans=tuple(spans))
        tok, pos, meta = build_metadata([rec], self.block_size, "cpu")
        h = self.model.embed(tok)
        if spans:
            feats = self.model.encode_features(list(spans))
            rows = torch.cat([torch.arange(s.start, s.end) for s in spans]) - self.pos
            h = self.model.merge_features(h, rows, torch.cat(feats))
        self.pos += len(ids)
        return self.model.compute_logits(self.model.forward_embeds(h, pos, meta, self.caches))


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


def mixed_requests(url_a: str, url_b: str) -> list:
    """What the runner-batching tests send at once: text around image a, text alone, and
    images b and a with text between (two sizes in one request, a reused)."""
    return [chat([{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url_a}},
                  {"type": "text", "text": "in words."}]),
            chat("Tell me a story about the Rust type system."),
            chat([{"type": "image_url", "image_url": {"url": url_b}}, {"type": "text", "text": "and"},
                  {"type": "image_url", "image_url": url_a}])]


def run_concurrently(runner, reqs) -> list:
    """Each request from its own thread, so the engine batches them; results in order."""
    results = [None] * len(reqs)

    def work(i):
        results[i] = runner.send_chat_completion_request(reqs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    with submitted_together(runner._pipeline(None).engine, len(reqs)):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    return results


def check_against_reference(pipe, ref_logits, req, res, n=6, prepare=None):
    """Assert our greedy answer ``res`` to ``req`` is the reference's: the same prompt length,
    the same ``n`` tokens, each log-prob within 1e-4. ``ref_logits(ids, data, spans)``: the
    reference model's logits [T, V] for ``ids`` with each span's image data spliced in at
    ``(start, length)``; ``prepare(data)``, when given, turns the spans' data into what
    ``ref_logits`` takes, once (e.g. tower features). Returns the prompt."""
    prompt = pipe.chat_prompt(req)
    data = [s.data for s in prompt.spans]
    if prepare is not None:
        data = prepare(data)
    spans = [(s.start, s.length) for s in prompt.spans]
    ids, want_toks, want_lps = list(prompt.ids), [], []
    with torch.inference_mode():
        for _ in range(n):
            lp = torch.log_softmax(ref_logits(ids, data, spans)[-1].double(), -1)
            t = int(lp.argmax())
            want_toks.append(t)
            want_lps.append(float(lp[t]))
            ids.append(t)
    got = res.choices[0].logprobs.content
    assert res.usage.prompt_tokens == len(prompt.ids)
    assert [e.logprob for e in got] == pytest.approx(want_lps, abs=1e-4)
    assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
    return prompt
