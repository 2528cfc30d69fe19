"""OpenAI's Responses API (``/v1/responses``) as a translation onto the chat path.

A request becomes an OpenAI chat body (``instructions`` as the system message, then the
conversation of ``previous_response_id``, then ``input``) and goes through
``inference.run_chat``, the code ``/v1/chat/completions`` runs; the chat answer (or its
chunks) becomes a Response object (or OpenAI's event sequence). Responses live in a
bounded in-memory store, so that they can be fetched, chained, deleted, and cancelled
while they run (streamed or ``background``). Function tools map onto the chat path's
tools: ``function_call`` / ``function_call_output`` items are an assistant turn's
``tool_calls`` and ``tool`` messages, and the chat answer's calls come back as
``function_call`` items.
"""
from __future__ import annotations

import asyncio
import copy
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mistralrs_core.api.converter import to_json_dict
from mistralrs_core.server import wire
from mistralrs_core.server.context import ServerState, openai_errors, read_json, state
from mistralrs_core.server.errors import APIError, from_exception
from mistralrs_core.server.inference import run_chat
from mistralrs_core.server.responses_store import ResponseStore, Stored, store_of
from mistralrs_core.server.streaming import EventStreamResponse, iterate_in_threads

router = APIRouter()

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Sampling fields beyond OpenAI's Responses API that the chat path understands; sent
# through the clients' extra_body.
_PASS_THROUGH = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "ignore_eos", "logit_bias")


def _fail(field: str, message: str, status: int = 400, code: str | None = None):
    raise APIError(status, f"{field}: {message}", param=field, code=code)


# --- request translation ------------------------------------------------------------

def _text(field: str, v: Any) -> str:
    if not isinstance(v, str):
        _fail(field, f"must be a string, got {v!r}")
    return v


def _part(field: str, part: Any) -> dict:
    if not isinstance(part, dict):
        _fail(field, f"must be a content object, got {part!r}")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "refusal"):
        key = "refusal" if kind == "refusal" else "text"
        return {"type": "text", "text": _text(f"{field}.{key}", part.get(key))}
    if kind == "input_image":
        url = part.get("image_url")
        if url is None:
            _fail(f"{field}.image_url", "is required (a URL or a data: URI); file_id is not supported")
        image = {"url": _text(f"{field}.image_url", url)}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    _fail(f"{field}.type", f"must be 'input_text' or 'input_image', got {kind!r}")


def _output_text(field: str, v: Any) -> str:
    """A ``function_call_output``'s output: a string, or text parts joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "".join(_part(f"{field}[{j}]", p).get("text", "") for j, p in enumerate(v))
    _fail(field, f"must be a string or a list of input_text parts, got {v!r}")


def _call_item(field: str, item: dict) -> dict:
    """A ``function_call`` item as one OpenAI chat tool call."""
    call_id = _text(f"{field}.call_id", item.get("call_id"))
    args = _text(f"{field}.arguments", item.get("arguments"))
    return {"id": call_id, "type": "function",
            "function": {"name": _text(f"{field}.name", item.get("name")), "arguments": args}}


def _message(field: str, item: Any) -> dict:
    if not isinstance(item, dict):
        _fail(field, f"must be a message object, got {item!r}")
    kind = item.get("type", "message")
    if kind == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": [_call_item(field, item)]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": _text(f"{field}.call_id", item.get("call_id")),
                "content": _output_text(f"{field}.output", item.get("output"))}
    if kind != "message":
        _fail(f"{field}.type", f"must be 'message', 'function_call' or 'function_call_output', got {kind!r}")
    role = item.get("role")
    if role not in _ROLES:
        _fail(f"{field}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": _ROLES[role], "content": content}
    if not isinstance(content, list):
        _fail(f"{field}.content", f"must be a string or a list of content parts, got {content!r}")
    parts = [_part(f"{field}.content[{j}]", p) for j, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        # The chat templates of text models take one string; the text model path joins parts
        # the same way.
        return {"role": _ROLES[role], "content": "".join(p["text"] for p in parts)}
    return {"role": _ROLES[role], "content": parts}


def input_messages(v: Any) -> tuple[list[dict], list[int]]:
    """``input`` (a string, or a list of items) as chat messages, and the item each message
    came from: one per item, except that consecutive ``function_call`` items join the
    assistant turn before them (a chat assistant turn holds all its calls)."""
    if isinstance(v, str):
        return [{"role": "user", "content": v}], [0]
    if not isinstance(v, list) or not v:
        _fail("input", f"must be a string or a non-empty list of items, got {v!r}")
    out: list[dict] = []
    where: list[int] = []
    for i, item in enumerate(v):
        m = _message(f"input[{i}]", item)
        last = out[-1] if out else None
        if m.get("tool_calls") and last is not None and last["role"] == "assistant" and \
                (last.get("tool_calls") or isinstance(last.get("content"), str)):
            last.setdefault("tool_calls", []).extend(m["tool_calls"])
            continue
        out.append(m)
        where.append(i)
    return out, where


def _tools(v: Any) -> list[dict]:
    """Responses function tools (flat) as chat tools (nested under ``function``)."""
    if not isinstance(v, list):
        _fail("tools", f"must be a list of tools, got {v!r}")
    out = []
    for i, tool in enumerate(v):
        if not isinstance(tool, dict):
            _fail(f"tools[{i}]", f"must be a tool object, got {tool!r}")
        if tool.get("type") != "function":
            _fail(f"tools[{i}].type", f"only 'function' tools are supported, got {tool.get('type')!r}")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(v: Any) -> Any:
    """Responses ``tool_choice`` in the chat API's shape."""
    if v is None or v in ("auto", "none", "required"):
        return v
    if isinstance(v, dict) and v.get("type") == "function":
        return {"type": "function", "function": {"name": _text("tool_choice.name", v.get("name"))}}
    if isinstance(v, dict) and v.get("type") == "allowed_tools":
        tools = v.get("tools")
        if not isinstance(tools, list):
            _fail("tool_choice.tools", f"must be a list of tools, got {tools!r}")
        named = [{"type": "function", "function": {"name": t.get("name") if isinstance(t, dict) else t}}
                 for t in tools]
        return {"type": "allowed_tools", "allowed_tools": {"mode": v.get("mode", "auto"), "tools": named}}
    _fail("tool_choice", f"must be 'none', 'auto', 'required', {{'type': 'function', 'name': ...}} or "
                         f"allowed_tools, got {v!r}")


def _text_format(text: Any) -> dict | None:
    """``text.format`` in the chat API's ``response_format`` shape."""
    if text is None:
        return None
    if not isinstance(text, dict):
        _fail("text", f"must be an object, got {text!r}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        _fail("text.format", f"must be an object with a 'type', got {fmt!r}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"),
                                                       "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return dict(fmt)


def chat_body(body: dict, history: list[dict], stream: bool) -> tuple[dict, list[dict], list[int]]:
    """A Responses body as an OpenAI chat body; also this request's input messages, and
    for each chat message the input item it came from (-1 before ``input``; to name fields
    in error messages)."""
    instructions = body.get("instructions")
    system = []
    if instructions is not None:
        system = [{"role": "system", "content": _text("instructions", instructions)}]
    if "input" not in body:
        _fail("input", "is required")
    new, where = input_messages(body["input"])
    out: dict = {"model": body.get("model"), "messages": system + history + new, "stream": stream}
    if body.get("tools") is not None:
        out["tools"] = _tools(body["tools"])
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        out["tool_choice"] = choice
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for key in _PASS_THROUGH:
        if body.get(key) is not None:
            out[key] = body[key]
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    return out, new, [-1] * (len(system) + len(history)) + where


_MESSAGES = re.compile(r"^messages\[(\d+)\](.*)$")
_TOOLS = re.compile(r"^(?:tools|tool_schemas)\[(\d+)\]\.function(.*)$")


def renamed(exc: ValueError, body: dict, where: list[int]) -> ValueError:
    """A chat-path ValueError with its field named as the Responses request names it."""
    msg = str(exc)
    head, sep, rest = msg.partition(":")
    if not sep:
        return exc
    m = _MESSAGES.match(head)
    t = _TOOLS.match(head)
    if m:
        k = int(m.group(1))
        if k < len(where) and where[k] >= 0:
            new = "input" if isinstance(body.get("input"), str) else f"input[{where[k]}]{m.group(2)}"
        else:
            new = "instructions" if k == 0 and body.get("instructions") is not None else "previous_response_id"
    elif t:
        new = f"tools[{t.group(1)}]{t.group(2)}"
    elif head.startswith("max_tokens"):
        new = "max_output_tokens" + head[len("max_tokens"):]
    elif head.startswith("response_format"):
        new = "text.format" + head[len("response_format"):]
    elif head == "messages":
        new = "input"
    else:
        return exc
    return ValueError(new + sep + rest)


# --- response objects -----------------------------------------------------------------

def _usage(u: dict | None) -> dict | None:
    if not u:
        return None
    return {"input_tokens": u.get("prompt_tokens", 0),
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.get("total_tokens", 0)}


def new_response(body: dict, model: str, previous: str | None) -> dict:
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": bool(body.get("background")), "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
        "parallel_tool_calls": True, "previous_response_id": previous,
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "text": {"format": fmt or {"type": "text"}}, "tool_choice": body.get("tool_choice") or "auto",
        "tools": [{"type": "function", "name": t.get("name"), "description": t.get("description"),
                   "parameters": t.get("parameters"), "strict": t.get("strict")}
                  for t in body.get("tools") or []],
        "truncation": "disabled", "usage": None, "metadata": body.get("metadata") or {},
        "store": body.get("store") is not False, "user": body.get("user"),
    }


def _message_item(text: str, status: str) -> dict:
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text)]}


def _call_output(call: dict, status: str) -> dict:
    """A chat tool call as a ``function_call`` output item."""
    return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"].get("arguments") or ""}


def _assistant_turn(text: str, calls: list[dict]) -> dict:
    """The answer as the chat message that ``previous_response_id`` replays."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _finish(resp: dict, finish_reason: str | None, cancelled: bool, usage: dict | None) -> str:
    """Set the final status; the item's status follows it."""
    if cancelled:
        resp["status"] = "cancelled"
    elif finish_reason == "length":
        resp["status"] = "incomplete"
        resp["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        resp["status"] = "completed"
    resp["usage"] = _usage(usage)
    resp["completed_at"] = int(time.time())
    return "completed" if resp["status"] == "completed" else "incomplete"


def complete(rec: Stored, result) -> None:
    """Fill ``rec`` from a non-streamed chat answer."""
    d = to_json_dict(result)
    choice = d["choices"][0]
    text = choice["message"].get("content") or ""
    calls = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
             for c in choice["message"].get("tool_calls") or []]
    item_status = _finish(rec.response, choice.get("finish_reason"), False, d.get("usage"))
    # As OpenAI: a turn that only calls tools has no message item.
    items = [_message_item(text, item_status)] if text or not calls else []
    rec.response["output"] = items + [_call_output(c, item_status) for c in calls]
    rec.history.append(_assistant_turn(text, calls))


class _Output:
    """The output items of one streamed answer: a message item opened by the first text,
    then one ``function_call`` item per call (the chat stream sends a call's id and name,
    then its argument text, once the answer has ended). Each method returns the events
    its change makes."""

    def __init__(self, resp: dict, event):
        self.resp, self.event = resp, event
        self.msg: dict | None = None
        self.part: dict | None = None
        self.call: dict | None = None
        self.calls: list[dict] = []   # the chat tool calls, for the stored conversation
        resp["output"] = []

    @property
    def text(self) -> str:
        return self.part["text"] if self.part is not None else ""

    def _ids(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.resp["output"].index(item)}

    def open_message(self) -> list[dict]:
        self.msg = _message_item("", "in_progress")
        self.msg["content"] = []
        self.part = _text_part("")
        self.resp["output"].append(self.msg)
        evs = [self.event("response.output_item.added", output_index=len(self.resp["output"]) - 1,
                          item=copy.deepcopy(self.msg))]
        self.msg["content"].append(self.part)
        evs.append(self.event("response.content_part.added", **self._ids(self.msg), content_index=0,
                              part=copy.deepcopy(self.part)))
        return evs

    def add_text(self, text: str) -> list[dict]:
        evs = self.open_message() if self.msg is None else []
        self.part["text"] += text
        return evs + [self.event("response.output_text.delta", **self._ids(self.msg), content_index=0,
                                 delta=text, logprobs=[])]

    def close_message(self, status: str) -> list[dict]:
        if self.msg is None or self.msg["status"] != "in_progress":
            return []
        self.msg["status"] = status
        ids = self._ids(self.msg)
        return [self.event("response.output_text.done", **ids, content_index=0, text=self.part["text"],
                           logprobs=[]),
                self.event("response.content_part.done", **ids, content_index=0, part=copy.deepcopy(self.part)),
                self.event("response.output_item.done", output_index=ids["output_index"],
                           item=copy.deepcopy(self.msg))]

    def add_call_piece(self, piece: dict) -> list[dict]:
        fn = piece.get("function") or {}
        evs: list[dict] = []
        if piece.get("id"):
            evs += self.close_message("completed") + self.close_call("completed")
            self.calls.append({"id": piece["id"], "type": "function",
                               "function": {"name": fn.get("name"), "arguments": ""}})
            self.call = _call_output(self.calls[-1], "in_progress")
            self.resp["output"].append(self.call)
            evs.append(self.event("response.output_item.added", output_index=len(self.resp["output"]) - 1,
                                  item=copy.deepcopy(self.call)))
        delta = fn.get("arguments")
        if delta and self.call is not None:
            self.call["arguments"] += delta
            self.calls[-1]["function"]["arguments"] += delta
            evs.append(self.event("response.function_call_arguments.delta", **self._ids(self.call), delta=delta))
        return evs

    def close_call(self, status: str) -> list[dict]:
        call, self.call = self.call, None
        if call is None:
            return []
        call["status"] = status
        ids = self._ids(call)
        return [self.event("response.function_call_arguments.done", **ids, arguments=call["arguments"]),
                self.event("response.output_item.done", output_index=ids["output_index"],
                           item=copy.deepcopy(call))]

    def close(self, status: str) -> list[dict]:
        # An answer with neither text nor calls still has its (empty) message item.
        evs = self.open_message() if self.msg is None and not self.calls else []
        return evs + self.close_message(status) + self.close_call(status)

    def abandon(self) -> None:
        for item in (self.msg, self.call):
            if item is not None and item["status"] == "in_progress":
                item["status"] = "incomplete"


async def drive(st: ServerState, store: ResponseStore, rec: Stored, stream, model: str) -> AsyncIterator[dict]:
    """Run a streamed chat answer into ``rec``, yielding OpenAI's Responses events."""
    resp = rec.response
    seq = 0

    def event(kind: str, **fields) -> dict:
        nonlocal seq
        seq += 1
        return {"type": kind, "sequence_number": seq - 1, **fields}

    def snapshot() -> dict:
        return copy.deepcopy(resp)

    out = _Output(resp, event)
    finish, usage, finished = None, None, False
    try:
        yield event("response.created", response=snapshot())
        yield event("response.in_progress", response=snapshot())
        try:
            async for chunk in iterate_in_threads(stream, st.limiter):
                d = to_json_dict(chunk)
                usage = d.get("usage") or usage
                for choice in d["choices"]:
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        for ev in out.add_text(delta["content"]):
                            yield ev
                    for piece in delta.get("tool_calls") or []:
                        for ev in out.add_call_piece(piece):
                            yield ev
        except Exception as exc:
            err = from_exception(exc)
            resp["status"] = "failed"
            resp["error"] = {"code": err.code or "server_error", "message": err.message}
            finished = True
            yield event("response.failed", response=snapshot())
            return
        status = _finish(resp, finish, rec.cancelled, usage)
        finished = True
        st.metrics.record_usage(model, usage)
        rec.history.append(_assistant_turn(out.text, out.calls))
        for ev in out.close(status):
            yield ev
        last = "response.completed" if resp["status"] == "completed" else "response.incomplete"
        yield event(last, response=snapshot())
    finally:
        if not finished:
            # The client left mid-stream (or the task was cancelled): the engine has been told
            # to stop; what was generated stays readable.
            rec.cancelled = True
            _finish(resp, finish, True, usage)
            out.abandon()
            rec.history.append(_assistant_turn(out.text, out.calls))
        store.finished(rec)


# --- routes ---------------------------------------------------------------------------

@router.post("/v1/responses")
@openai_errors
async def create_response(request: Request):
    st = state(request)
    store = store_of(request)
    body = await read_json(request)
    stream, background = body.get("stream"), body.get("background")
    for name, v in (("stream", stream), ("background", background), ("store", body.get("store"))):
        if v is not None and not isinstance(v, bool):
            _fail(name, f"must be a boolean, got {v!r}")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or
                                 not all(isinstance(v, str) for v in metadata.values())):
        _fail("metadata", f"must be an object of string values, got {metadata!r}")
    if stream and background:
        _fail("background", "streaming a background response is not supported; poll it with "
                            "GET /v1/responses/{id} instead", code="not_available")
    previous = body.get("previous_response_id")
    history: list[dict] = []
    if previous is not None:
        prev = store.get(_text("previous_response_id", previous), "previous_response_id")
        if prev.running:
            _fail("previous_response_id", f"response '{previous}' has not finished yet")
        history = [dict(m) for m in prev.history]
    incremental = bool(stream or background)
    chat, new, where = chat_body(body, history, incremental)
    try:
        model, _, result = await run_chat(st, chat, "/v1/responses", request=request)
    except ValueError as exc:
        raise renamed(exc, body, where) from None
    rec = Stored(new_response(body, model, previous), history + new, body.get("store") is not False)
    if not incremental:
        complete(rec, result)
        st.metrics.record_usage(model, to_json_dict(result).get("usage"))
        if rec.store:
            store.put(rec)
        return JSONResponse(rec.response)
    rec.stream = result
    store.put(rec)
    events = drive(st, store, rec, result, model)
    if background:
        async def run() -> None:
            async for _ in events:
                pass
        rec.task = asyncio.get_running_loop().create_task(run())
        return JSONResponse(copy.deepcopy(rec.response))

    async def sse():
        try:
            async for ev in events:
                yield wire.sse_event(ev)
        finally:
            # At once, not when the garbage collector finalizes it: a client that left must
            # see its response marked cancelled.
            await events.aclose()

    def disconnected():
        st.metrics.disconnects.inc("/v1/responses")
        rec.cancel()

    return EventStreamResponse(sse(), on_disconnect=disconnected)


@router.get("/v1/responses/{response_id}")
@openai_errors
async def get_response(request: Request, response_id: str):
    return JSONResponse(store_of(request).get(response_id).response)


@router.delete("/v1/responses/{response_id}")
@openai_errors
async def delete_response(request: Request, response_id: str):
    store = store_of(request)
    rec = store.get(response_id)
    if rec.running:
        rec.cancel()
    store.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.post("/v1/responses/{response_id}/cancel")
@openai_errors
async def cancel_response(request: Request, response_id: str):
    rec = store_of(request).get(response_id)
    if rec.running:
        if rec.stream is None:
            _fail("response_id", "only streamed or background responses can be cancelled")
        rec.cancel()
        # The run notices the cancelled stream within one engine step.
        try:
            await asyncio.wait_for(rec.done.wait(), timeout=10)
        except asyncio.TimeoutError:
            pass
    elif rec.response["status"] != "cancelled":
        _fail("response_id", f"response '{response_id}' has already finished "
                             f"({rec.response['status']}); only a running response can be cancelled")
    return JSONResponse(rec.response)


@router.get("/v1/responses/{response_id}/input_items")
@openai_errors
async def input_items(request: Request, response_id: str):
    """The conversation that went in (previous responses' turns included), as items."""
    rec = store_of(request).get(response_id)
    turns = rec.history[:-1] if not rec.running and rec.history and \
        rec.history[-1]["role"] == "assistant" else rec.history
    data = []
    for m in turns:
        content = m["content"]
        if m["role"] == "tool":
            data.append({"id": f"fco_{uuid.uuid4().hex}", "type": "function_call_output", "status": "completed",
                         "call_id": m.get("tool_call_id"), "output": content})
            continue
        if content is not None:
            kind = "output_text" if m["role"] == "assistant" else "input_text"
            parts = [{"type": kind, "text": content}] if isinstance(content, str) else \
                [{"type": "input_text", "text": p["text"]} if p["type"] == "text" else
                 {"type": "input_image", "image_url": p["image_url"]["url"], "detail": "auto"} for p in content]
            data.append({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": m["role"],
                         "status": "completed", "content": parts})
        data += [_call_output(c, "completed") for c in m.get("tool_calls") or []]
    data.reverse()   # newest first, OpenAI's default order
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": False})
