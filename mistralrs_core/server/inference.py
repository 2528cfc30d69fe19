"""Inference routes: chat, completions, embeddings, images, speech."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mistralrs_core.api.converter import (chat_request_from_openai, completion_request_from_openai,
                                          embedding_request_from_openai, to_json_dict)
from mistralrs_core.api.enums import ImageGenerationResponseFormat, parse_enum
from mistralrs_core.errors import WrongModelKind
from mistralrs_core.server import wire
from mistralrs_core.server.context import ServerState, openai_errors, read_json, state
from mistralrs_core.server.errors import APIError, from_exception
from mistralrs_core.server.streaming import EventStreamResponse, iterate_in_threads

router = APIRouter()


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, f"stream_options: must be an object, got {opts!r}", param="stream_options")
    return bool(opts.get("include_usage"))


def _stream(st: ServerState, stream, model: str, route: str, include_usage: bool, t0: float):
    """Relay a Runner stream as SSE; usage is counted even when the client does not ask for it."""
    metrics = st.metrics

    async def events():
        usage, first = None, None
        metrics.active_streams += 1
        try:
            async for chunk in iterate_in_threads(stream, st.limiter):
                data, u = wire.stream_chunk(chunk)
                # The last chunk holds the real usage (completion chunks carry zeros before).
                usage = u or usage
                if first is None:
                    first = data
                    metrics.ttft.observe(time.perf_counter() - t0, model)
                yield wire.sse(data)
            if include_usage and usage is not None and first is not None:
                yield wire.sse(wire.usage_chunk(first, usage))
        except Exception as exc:
            # Headers are gone already: the error travels as an event, as OpenAI does.
            yield wire.sse(from_exception(exc).body())
        finally:
            metrics.active_streams -= 1
            metrics.record_usage(model, usage)
        yield wire.SSE_DONE

    def disconnected():
        metrics.disconnects.inc(route)
        # Also covers a client gone before the first event, when events() never ran.
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            cancel()

    return EventStreamResponse(events(), on_disconnect=disconnected)


async def run_chat(st: ServerState, body: dict, route: str = "/v1/chat/completions",
                   request: Request | None = None):
    """The one chat path: an OpenAI chat body routed, validated and sent to the Runner.
    ``/v1/responses`` and ``/v1/messages`` translate their bodies into this shape and come
    here too. Returns ``(model id, request, response or stream)``. With the HTTP ``request``,
    a non-streamed answer is cancelled when its client disconnects first."""
    model = st.resolve_model(body.get("model"))
    req = chat_request_from_openai(body)
    try:
        if request is not None and not req.stream:
            result = await st.run_until_disconnect(request, route, st.runner.send_chat_completion_request,
                                                   req, model)
        else:
            result = await st.run(st.runner.send_chat_completion_request, req, model)
    except WrongModelKind as exc:
        raise _wrong_kind(exc, route) from None
    return model, req, result


@router.post("/v1/chat/completions")
@openai_errors
async def chat_completions(request: Request):
    t0 = time.perf_counter()
    st = state(request)
    body = await read_json(request)
    include_usage = _include_usage(body)
    model, req, result = await run_chat(st, body, request=request)
    if req.stream:
        return _stream(st, result, model, "/v1/chat/completions", include_usage, t0)
    out = wire.chat_response(result)
    st.metrics.record_usage(model, out.get("usage"))
    return JSONResponse(out)


@router.post("/v1/completions")
@openai_errors
async def completions(request: Request):
    t0 = time.perf_counter()
    st = state(request)
    body = await read_json(request)
    model = st.resolve_model(body.get("model"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream: must be a boolean, got {stream!r}", param="stream")
    include_usage = _include_usage(body)
    req = completion_request_from_openai(body)
    if stream:
        try:
            result = await st.run(st.runner.stream_completion_request, req, model)
        except WrongModelKind as exc:
            raise _wrong_kind(exc, "/v1/completions") from None
        return _stream(st, result, model, "/v1/completions", include_usage, t0)
    try:
        result = await st.run_until_disconnect(request, "/v1/completions", st.runner.send_completion_request,
                                               req, model)
    except WrongModelKind as exc:
        raise _wrong_kind(exc, "/v1/completions") from None
    out = to_json_dict(result)
    st.metrics.record_usage(model, out.get("usage"))
    return JSONResponse(out)


@router.post("/v1/embeddings")
@openai_errors
async def embeddings(request: Request):
    st = state(request)
    body = await read_json(request)
    model = st.resolve_model(body.get("model"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise APIError(400, f"encoding_format: must be 'float' or 'base64', got {encoding!r}",
                       param="encoding_format")
    if body.get("dimensions") is not None:
        raise APIError(400, "dimensions: shortening embeddings is not supported", param="dimensions")
    req = embedding_request_from_openai(body)
    try:
        vectors = await st.run(st.runner.send_embedding_request, req, model)
    except WrongModelKind as exc:
        raise _wrong_kind(exc, "/v1/embeddings") from None
    # Usage: the ids the model embedded (special tokens included).
    ids = await st.run(st.runner.embedding_token_ids, req, model)
    tokens = sum(len(x) for x in ids)
    st.metrics.record_usage(model, {"prompt_tokens": tokens})
    return JSONResponse(wire.embeddings(vectors, model, encoding, tokens))


def _wrong_kind(exc: WrongModelKind, route: str) -> APIError:
    wanted = " or ".join(exc.needed)
    return APIError(400, f"model `{exc.model_id}` is not {_a(exc.needed[0])} {wanted} model (it is "
                         f"{_a(exc.kind)} {exc.kind} model); {route} needs one (serve one with --kind "
                         f"{exc.needed[0]})", param="model")


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _size(body: dict) -> tuple[int, int]:
    size = body.get("size")
    if size is None:
        h, w = body.get("height", 720), body.get("width", 1280)
    else:
        try:
            w, h = (int(x) for x in str(size).lower().split("x"))
        except ValueError:
            raise APIError(400, f"size: must look like '1024x768', got {size!r}", param="size") from None
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise APIError(400, f"{name}: must be a positive integer, got {v!r}", param=name)
    return h, w


@router.post("/v1/images/generations")
@openai_errors
async def images(request: Request):
    st = state(request)
    body = await read_json(request)
    model = st.resolve_model(body.get("model"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt: must be a non-empty string", param="prompt")
    if body.get("n") not in (None, 1):
        raise APIError(400, "n: only 1 image per request is supported", param="n")
    fmt = parse_enum(ImageGenerationResponseFormat, body.get("response_format") or "url", "response_format")
    height, width = _size(body)
    try:
        result = await st.run(st.runner.generate_image, prompt, fmt, height, width, model_id=model)
    except WrongModelKind as exc:
        raise _wrong_kind(exc, "/v1/images/generations") from None
    return JSONResponse(to_json_dict(result))


@router.post("/v1/audio/speech")
@openai_errors
async def speech(request: Request):
    st = state(request)
    body = await read_json(request)
    model = st.resolve_model(body.get("model"))
    text = body.get("input")
    if not isinstance(text, str) or not text:
        raise APIError(400, "input: must be a non-empty string", param="input")
    fmt = body.get("response_format") or "wav"
    if fmt not in ("wav", "pcm"):
        raise APIError(400, f"response_format: only 'wav' and 'pcm' are supported, got {fmt!r}",
                       param="response_format")
    try:
        result = await st.run(st.runner.generate_audio, text, model_id=model)
    except WrongModelKind as exc:
        raise _wrong_kind(exc, "/v1/audio/speech") from None
    if fmt == "pcm":
        return Response(wire.pcm16(result.pcm), media_type="audio/pcm",
                        headers={"X-Sample-Rate": str(result.rate), "X-Channels": str(result.channels)})
    return Response(wire.wav(result.pcm, result.rate, result.channels), media_type="audio/wav")
