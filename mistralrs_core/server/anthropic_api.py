"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) as a
translation onto the chat path.

A Messages body becomes an OpenAI chat body (``system`` as the system message, content
blocks as text / ``image_url`` parts, ``stop_sequences`` as ``stop``) and runs through
``inference.run_chat``, the code ``/v1/chat/completions`` runs; the answer (or its chunks)
becomes a Message (or Anthropic's event sequence). Errors leave in Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, with the offending field first in the
message. Tools map onto the chat path's tools: ``tool_use`` blocks are an assistant turn's
``tool_calls``, ``tool_result`` blocks are ``tool`` messages, and the answer's calls come
back as ``tool_use`` blocks with ``stop_reason: "tool_use"``.
"""
from __future__ import annotations

import functools
import json
import re
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mistralrs_core.api.converter import to_json_dict
from mistralrs_core.api.openai import chat_request_from_openai
from mistralrs_core.server import wire
from mistralrs_core.server.context import ServerState, read_json, state
from mistralrs_core.server.errors import APIError, from_exception
from mistralrs_core.server.inference import run_chat
from mistralrs_core.server.streaming import EventStreamResponse, iterate_in_threads

router = APIRouter()

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}
# Blocks a client sends back from earlier turns that carry nothing a local model can use.
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")


def error_body(err: APIError) -> dict:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def anthropic_errors(route: Callable) -> Callable:
    """Every failure of ``route`` leaves in Anthropic's error shape with its status."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as exc:
            err = from_exception(exc)
            return JSONResponse(error_body(err), status_code=err.status)
    return wrapper


def _fail(field: str, message: str):
    raise APIError(400, f"{field}: {message}", param=field)


# --- request translation ------------------------------------------------------------

def _str(field: str, v: Any) -> str:
    if not isinstance(v, str):
        _fail(field, f"must be a string, got {v!r}")
    return v


def _image(field: str, block: dict) -> dict:
    src = block.get("source")
    if not isinstance(src, dict):
        _fail(f"{field}.source", f"must be an object, got {src!r}")
    if src.get("type") == "base64":
        media = _str(f"{field}.source.media_type", src.get("media_type"))
        url = f"data:{media};base64,{_str(f'{field}.source.data', src.get('data'))}"
    elif src.get("type") == "url":
        url = _str(f"{field}.source.url", src.get("url"))
    else:
        _fail(f"{field}.source.type", f"must be 'base64' or 'url', got {src.get('type')!r}")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_use(field: str, block: dict) -> dict:
    """A ``tool_use`` block as one OpenAI chat tool call."""
    args = block.get("input")
    if not isinstance(args, dict):
        _fail(f"{field}.input", f"must be an object, got {args!r}")
    return {"id": _str(f"{field}.id", block.get("id")), "type": "function",
            "function": {"name": _str(f"{field}.name", block.get("name")), "arguments": json.dumps(args)}}


def _tool_result(field: str, block: dict) -> dict:
    """A ``tool_result`` block as a ``tool`` message (text only: a text model reads no images)."""
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                _fail(f"{field}.content[{k}]", f"must be a text block, got {part!r}")
            texts.append(_str(f"{field}.content[{k}].text", part.get("text")))
        content = "\n".join(texts)
    content = _str(f"{field}.content", content)
    if block.get("is_error") and not content.startswith("Error"):
        # How the agentic loop words a failed tool for the model.
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": _str(f"{field}.tool_use_id", block.get("tool_use_id")),
            "content": content}


def _blocks(field: str, content: Any, role: str) -> tuple[list[dict], list[dict], list[dict]]:
    """A message's content as (tool messages from tool_result blocks, text/image parts,
    tool calls from tool_use blocks)."""
    if isinstance(content, str):
        return [], [{"type": "text", "text": content}], []
    if not isinstance(content, list):
        _fail(field, f"must be a string or a list of content blocks, got {content!r}")
    results, parts, calls = [], [], []
    for j, block in enumerate(content):
        where = f"{field}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _str(f"{where}.text", block.get("text"))})
        elif kind == "image":
            parts.append(_image(where, block))
        elif kind in _DROPPED_BLOCKS:
            continue
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(where, block))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(where, block))
        else:
            allowed = "'text', 'image' or 'tool_use'" if role == "assistant" else "'text', 'image' or 'tool_result'"
            _fail(f"{where}.type", f"must be {allowed} in a {role} message, got {kind!r}")
    return results, parts, calls


def _content(parts: list[dict]) -> str | list[dict]:
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tools(v: Any) -> list[dict]:
    """Anthropic's client tools as OpenAI chat tools."""
    if not isinstance(v, list):
        _fail("tools", f"must be a list of tools, got {v!r}")
    out = []
    for i, tool in enumerate(v):
        if not isinstance(tool, dict):
            _fail(f"tools[{i}]", f"must be a tool object, got {tool!r}")
        if tool.get("type") not in (None, "custom"):
            _fail(f"tools[{i}].type", f"only client tools (type 'custom' or none) are supported, "
                                      f"got {tool.get('type')!r}")
        if not isinstance(tool.get("input_schema"), dict):
            _fail(f"tools[{i}].input_schema", f"must be a JSON schema object, got {tool.get('input_schema')!r}")
        fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        for key in ("description", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(v: Any) -> Any:
    """Anthropic's ``tool_choice`` in the chat API's shape."""
    kind = v.get("type") if isinstance(v, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": _str("tool_choice.name", v.get("name"))}}
    _fail("tool_choice", f"must be {{'type': 'auto' | 'any' | 'none'}} or {{'type': 'tool', 'name': ...}}, "
                         f"got {v!r}")


def _system(v: Any) -> list[dict]:
    if v is None:
        return []
    if isinstance(v, list):
        texts = []
        for i, block in enumerate(v):
            if not isinstance(block, dict) or block.get("type") != "text":
                _fail(f"system[{i}]", f"must be a text block, got {block!r}")
            texts.append(_str(f"system[{i}].text", block.get("text")))
        v = "\n\n".join(texts)
    return [{"role": "system", "content": _str("system", v)}]


def chat_body(body: dict, *, counting: bool = False) -> tuple[dict, list[int]]:
    """A Messages body as an OpenAI chat body, and for each chat message the index of the
    message it came from (-1 for the system message): a user message with tool results
    becomes one ``tool`` message per result, then the rest of its content."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None and not counting:
        _fail("max_tokens", "is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _fail("messages", f"must be a non-empty list of messages, got {messages!r}")
    system = _system(body.get("system"))
    out: list[dict] = []
    where = [-1] * len(system)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail(f"messages[{i}]", f"must be an object, got {m!r}")
        role = m.get("role")
        if role not in ("user", "assistant"):
            _fail(f"messages[{i}].role", f"must be 'user' or 'assistant', got {role!r}")
        results, parts, calls = _blocks(f"messages[{i}].content", m.get("content"), role)
        turns = list(results)
        if calls:
            turns.append({"role": role, "content": _content(parts) if parts else None, "tool_calls": calls})
        elif parts or not results:
            turns.append({"role": role, "content": _content(parts)})
        out += turns
        where += [i] * len(turns)
    chat: dict = {"model": body.get("model"), "messages": system + out}
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if not counting:
        chat["max_tokens"] = max_tokens
        for key in ("temperature", "top_p", "top_k", "stream"):
            if body.get(key) is not None:
                chat[key] = body[key]
        if body.get("stop_sequences") is not None:
            stops = body["stop_sequences"]
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                _fail("stop_sequences", f"must be a list of strings, got {stops!r}")
            chat["stop"] = stops
    return chat, where


_MESSAGES = re.compile(r"^messages\[(\d+)\](.*)$")
_TOOLS = re.compile(r"^(?:tools|tool_schemas)\[(\d+)\]\.function(.*)$")


def renamed(exc: ValueError, where: list[int]) -> ValueError:
    """A chat-path ValueError with its field named as the Messages request names it."""
    head, sep, rest = str(exc).partition(":")
    m = _MESSAGES.match(head)
    t = _TOOLS.match(head)
    if m and sep:
        k = int(m.group(1))
        i = where[k] if k < len(where) else -1
        head = f"messages[{i}]{m.group(2)}" if i >= 0 else "system"
    elif t and sep:
        tail = t.group(2)
        head = f"tools[{t.group(1)}]" + (".input_schema" + tail[len(".parameters"):]
                                         if tail.startswith(".parameters") else tail)
    elif sep and head.startswith("stop"):
        head = "stop_sequences" + head[len("stop"):]
    else:
        return exc
    return ValueError(head + sep + rest)


# --- answers --------------------------------------------------------------------------

def _stop_reason(finish: str | None) -> str:
    # A stop sequence and the end-of-turn token both finish as "stop" on the chat path,
    # which does not say which one it was.
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish or "", "end_turn")


def _tool_use_id(call_id: str) -> str:
    # Anthropic's ids read toolu_...; the suffix keeps the chat call's id recognisable.
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str | None) -> dict:
    """A call's argument text as the tool_use block's ``input`` (the parser only returns
    calls whose arguments are a JSON object)."""
    args = json.loads(arguments or "{}")
    return args if isinstance(args, dict) else {}


def _usage(u: dict | None) -> dict:
    u = u or {}
    return {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def message(result, model: str) -> dict:
    d = to_json_dict(result)
    choice = d["choices"][0]
    text = choice["message"].get("content") or ""
    calls = choice["message"].get("tool_calls") or []
    blocks = [{"type": "text", "text": text}] if text or not calls else []
    blocks += [{"type": "tool_use", "id": _tool_use_id(c["id"]), "name": c["function"]["name"],
                "input": _input(c["function"].get("arguments"))} for c in calls]
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model,
            "content": blocks,
            "stop_reason": _stop_reason(choice.get("finish_reason")), "stop_sequence": None,
            "usage": _usage(d.get("usage"))}


def _has_images(chat: dict) -> bool:
    return any(isinstance(m["content"], list) for m in chat["messages"])


def _stream(st: ServerState, stream, model: str, input_tokens: int):
    def ev(payload: dict) -> bytes:
        return wire.sse_event(payload)

    async def events():
        usage, finish = None, None
        start = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model,
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**_usage(None), "input_tokens": input_tokens}}
        yield ev({"type": "message_start", "message": start})
        # Blocks open as their content arrives: text first, then one tool_use block per
        # call (the chat stream sends a call's id and name, then its argument text).
        index, open_kind = -1, None

        def start_block(block: dict):
            nonlocal index, open_kind
            out = [ev({"type": "content_block_stop", "index": index})] if open_kind else []
            index, open_kind = index + 1, block["type"]
            return out + [ev({"type": "content_block_start", "index": index, "content_block": block})]
        try:
            async for chunk in iterate_in_threads(stream, st.limiter):
                d = to_json_dict(chunk)
                usage = d.get("usage") or usage
                for choice in d["choices"]:
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        if open_kind != "text":
                            for e in start_block({"type": "text", "text": ""}):
                                yield e
                        yield ev({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "text_delta", "text": delta["content"]}})
                    for piece in delta.get("tool_calls") or []:
                        fn = piece.get("function") or {}
                        if piece.get("id"):
                            for e in start_block({"type": "tool_use", "id": _tool_use_id(piece["id"]),
                                                  "name": fn.get("name"), "input": {}}):
                                yield e
                        if fn.get("arguments") and open_kind == "tool_use":
                            yield ev({"type": "content_block_delta", "index": index,
                                      "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})
        except Exception as exc:
            # Headers are gone already: the error travels as an event, as Anthropic does.
            yield ev(error_body(from_exception(exc)))
            return
        finally:
            st.metrics.record_usage(model, usage)
        if open_kind is None:
            # An empty answer still has its (empty) text block.
            for e in start_block({"type": "text", "text": ""}):
                yield e
        yield ev({"type": "content_block_stop", "index": index})
        u = _usage(usage)
        yield ev({"type": "message_delta", "delta": {"stop_reason": _stop_reason(finish), "stop_sequence": None},
                  "usage": {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"]}})
        yield ev({"type": "message_stop"})

    def disconnected():
        st.metrics.disconnects.inc("/v1/messages")
        stream.cancel()

    return EventStreamResponse(events(), on_disconnect=disconnected)


# --- routes ---------------------------------------------------------------------------

@router.post("/v1/messages")
@anthropic_errors
async def messages(request: Request):
    st = state(request)
    body = await read_json(request)
    chat, where = chat_body(body)
    try:
        input_tokens = 0
        if chat.get("stream") is True and not _has_images(chat):
            # message_start reports the prompt's size before any token exists; counting
            # renders the template once more, cheap for text (images would be decoded twice,
            # so for them the count comes with message_delta only).
            model = st.resolve_model(chat.get("model"))
            input_tokens = await st.run(st.runner.count_chat_tokens, chat_request_from_openai(chat), model)
        model, req, result = await run_chat(st, chat, "/v1/messages", request=request)
    except ValueError as exc:
        raise renamed(exc, where) from None
    if req.stream:
        return _stream(st, result, model, input_tokens)
    out = message(result, model)
    st.metrics.record_usage(model, to_json_dict(result).get("usage"))
    return JSONResponse(out)


@router.post("/v1/messages/count_tokens")
@anthropic_errors
async def count_tokens(request: Request):
    st = state(request)
    body = await read_json(request)
    chat, where = chat_body(body, counting=True)
    model = st.resolve_model(chat.get("model"))
    try:
        n = await st.run(st.runner.count_chat_tokens, chat_request_from_openai(chat), model)
    except ValueError as exc:
        raise renamed(exc, where) from None
    return JSONResponse({"input_tokens": n})
