"""Response objects as OpenAI JSON.

The SDK keeps upstream's Python shapes (a streamed chunk carries one ``ResponseLogprob``;
``TopLogprob.token`` is a token id). Over HTTP the official OpenAI clients are the
audience, so logprobs are rewritten to OpenAI's shape (``{"content": [...]}``, string
tokens) and usage moves to the dedicated final chunk that ``stream_options.include_usage``
asks for.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import wave

from mistralrs_core.api.converter import to_json_dict


def sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


SSE_DONE = sse("[DONE]")


def sse_event(payload: dict) -> bytes:
    """A named event (``event: <type>``), as the Responses and Anthropic streams frame them."""
    data = json.dumps(payload, ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n".encode("utf-8")


def _top(entry: dict) -> dict:
    text = entry.get("bytes")
    text = text if isinstance(text, str) else ""
    return {"token": text, "logprob": entry["logprob"], "bytes": list(text.encode("utf-8"))}


def _logprob(entry: dict) -> dict:
    out = dict(entry)
    out["top_logprobs"] = [_top(t) for t in entry.get("top_logprobs") or []]
    return out


def chat_response(resp) -> dict:
    d = to_json_dict(resp)
    for choice in d["choices"]:
        lp = choice.get("logprobs")
        if lp and lp.get("content") is not None:
            choice["logprobs"] = {"content": [_logprob(e) for e in lp["content"]], "refusal": None}
    return d


def stream_chunk(chunk) -> tuple[dict, dict | None]:
    """A chat or completion chunk without its usage, and that usage (set on the last one)."""
    d = to_json_dict(chunk)
    usage = d.pop("usage", None)
    for choice in d["choices"]:
        lp = choice.get("logprobs")
        if lp:
            choice["logprobs"] = {"content": [_logprob(lp)], "refusal": None}
    return d, usage


def usage_chunk(template: dict, usage: dict) -> dict:
    """OpenAI's ``include_usage`` chunk: same id/model/object as the stream, no choices."""
    keys = ("id", "object", "created", "model", "system_fingerprint")
    return {**{k: template[k] for k in keys if k in template}, "choices": [], "usage": usage}


def embeddings(vectors: list[list[float]], model: str, encoding: str, prompt_tokens: int) -> dict:
    def encode(v):
        if encoding == "base64":
            # OpenAI's base64 form: little-endian float32, what its client decodes.
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")
        return [float(x) for x in v]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def pcm16(samples: list[float]) -> bytes:
    import numpy as np
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(x * 32767).astype("<i2").tobytes()


def wav(samples: list[float], rate: int, channels: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(samples))
    return buf.getvalue()
