"""Build requests from OpenAI-style JSON bodies (used by the HTTP server).

Each known OpenAI key is type-checked under its OpenAI name and mapped to
our field (`n` -> n_choices, `stop` -> stop_seqs, `max_completion_tokens` ->
max_tokens, `tools` -> tool_schemas as JSON text, `response_format` and
mistral.rs's `grammar: {"type", "value"}` -> grammar/grammar_type).  The
result then goes through validate.py; its messages are rewritten to the
OpenAI key names the client actually sent.

JSON null counts as absent.  Unknown keys (`user`, `metadata`, `store`,
`stream_options`, `parallel_tool_calls`, ...) are ignored, as OpenAI-
compatible servers usually do; the server reads what it needs from the raw
body itself.  `seed` is kept on the request (our extension, see
requests.py).  Completions' integer `logprobs` has no upstream counterpart
and is ignored.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, NoReturn

from .enums import ToolChoice
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .tools import ApproximateUserLocation, WebSearchOptions, WebSearchUserLocation
from .validate import (
    token_id_key,
    validate_chat_request,
    validate_completion_request,
    validate_embedding_request,
)


def _fail(name: str, message: str) -> NoReturn:
    raise ValueError(f"{name}: {message}")


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        # JSON has one number type; 3.0 is an acceptable 3.
        if isinstance(v, float) and v.is_integer():
            return int(v)
        _fail(name, f"must be an integer, got {v!r}")
    return v


def _num(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(name, f"must be a number, got {v!r}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        _fail(name, f"must be a boolean, got {v!r}")
    return v


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        _fail(name, f"must be a string, got {v!r}")
    return v


def _str_list(name: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        _fail(name, f"must be a list of strings, got {v!r}")
    return v


def _stop(name: str, v: Any) -> list[str]:
    return [v] if isinstance(v, str) else _str_list(name, v)


def _logit_bias(name: str, v: Any) -> dict[int, float]:
    if not isinstance(v, dict):
        _fail(name, f"must be an object mapping token ids to biases, got {v!r}")
    out = {}
    for key, bias in v.items():
        token = token_id_key(key)
        if token is None:
            _fail(name, f"key {key!r} is not a token id")
        out[token] = _num(f"{name}[{key!r}]", bias)
    return out


def _tools(name: str, v: Any) -> list[str]:
    if not isinstance(v, list):
        _fail(name, f"must be a list of tool objects, got {v!r}")
    for i, tool in enumerate(v):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            _fail(f"{name}[{i}]", "must be an object with type 'function'")
        if not isinstance(tool.get("function"), dict):
            _fail(f"{name}[{i}].function", "must be an object")
    return [json.dumps(tool) for tool in v]


_COMMON: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "model": ("model", _str),
    "n": ("n_choices", _int),
    "max_tokens": ("max_tokens", _int),
    "stop": ("stop_seqs", _stop),
    "temperature": ("temperature", _num),
    "top_p": ("top_p", _num),
    "top_k": ("top_k", _int),
    "min_p": ("min_p", _num),
    "presence_penalty": ("presence_penalty", _num),
    "frequency_penalty": ("frequency_penalty", _num),
    "repetition_penalty": ("repetition_penalty", _num),
    "logit_bias": ("logit_bias", _logit_bias),
    "seed": ("seed", _int),
    "cache_salt": ("cache_salt", _str),
    # mistral.rs: the loaded LoRA adapter this request uses (see mistralrs_core/adapters)
    "adapter": ("adapter", _str),
    "dry_multiplier": ("dry_multiplier", _num),
    "dry_base": ("dry_base", _num),
    "dry_allowed_length": ("dry_allowed_length", _int),
    "dry_sequence_breakers": ("dry_sequence_breakers", _str_list),
    "truncate_sequence": ("truncate_sequence", _bool),
    "ignore_eos": ("ignore_eos", _bool),
    "tools": ("tool_schemas", _tools),
}

_CHAT = {
    **_COMMON,
    "max_completion_tokens": ("max_tokens", _int),
    "logprobs": ("logprobs", _bool),
    "top_logprobs": ("top_logprobs", _int),
    "stream": ("stream", _bool),
    "enable_thinking": ("enable_thinking", _bool),
    "reasoning_effort": ("reasoning_effort", _str),
    "max_tool_rounds": ("max_tool_rounds", _int),
    "tool_dispatch_url": ("tool_dispatch_url", _str),
    "session_id": ("session_id", _str),
    "enable_code_execution": ("enable_code_execution", _bool),
    "enable_shell": ("enable_shell", _bool),
}

_COMPLETION = {
    **_COMMON,
    "best_of": ("best_of", _int),
    "echo": ("echo_prompt", _bool),
    "suffix": ("suffix", _str),
}

# Our field name -> the OpenAI key, for error messages.
_OPENAI_NAMES = {
    "n_choices": "n",
    "stop_seqs": "stop",
    "tool_schemas": "tools",
    "echo_prompt": "echo",
}


def _mapped(body: Mapping[str, Any], table: dict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, (target, check) in table.items():
        value = body.get(key)
        if value is not None:
            kwargs[target] = check(key, value)
    return kwargs


def _body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ValueError(f"body: must be a JSON object, got {type(body).__name__}")
    return body


def _tool_choice(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if v == "none":
        return {"tool_choice": ToolChoice.NoTools}
    if v == "auto":
        return {"tool_choice": ToolChoice.Auto}
    if v == "required" or (isinstance(v, dict) and v.get("type") in ("function", "allowed_tools")):
        return {"tool_choice": ToolChoice.Auto, "tool_choice_openai": v}
    raise ValueError(
        f"tool_choice: must be 'none', 'auto', 'required' or a function choice, got {v!r}"
    )


def _response_format(v: Any) -> tuple[str, str] | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        _fail("response_format", f"must be an object with a 'type', got {v!r}")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        # Any JSON object: the loosest schema that still forces JSON output.
        return "json_schema", json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = v.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            _fail("response_format.json_schema.schema", "must be a JSON schema object")
        # `strict` true or not, the output is constrained to the schema (stricter than
        # OpenAI's non-strict best effort, never looser).
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            _fail("response_format.json_schema.strict", f"must be a boolean, got {spec['strict']!r}")
        return "json_schema", json.dumps(schema)
    _fail("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _grammar(v: Any) -> tuple[str, str]:
    # mistral.rs's HTTP form: {"type": "regex"|"lark"|"json_schema"|"llguidance", "value": ...}
    if not isinstance(v, dict) or not isinstance(v.get("type"), str) or "value" not in v:
        _fail("grammar", f"must be an object with 'type' and 'value', got {v!r}")
    value = v["value"]
    return v["type"], value if isinstance(value, str) else json.dumps(value)


def _constraint(body: Mapping[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format")
    grammar = body.get("grammar")
    picked = _response_format(fmt) if fmt is not None else None
    if grammar is not None:
        if picked is not None:
            _fail("grammar", "cannot be combined with a structured response_format")
        picked = _grammar(grammar)
    if picked is None:
        return {}
    return {"grammar_type": picked[0], "grammar": picked[1]}


def _web_search(v: Any) -> WebSearchOptions:
    name = "web_search_options"
    if not isinstance(v, dict):
        _fail(name, f"must be an object, got {v!r}")
    location = None
    loc = v.get("user_location")
    if loc is not None:
        approx = loc.get("approximate") if isinstance(loc, dict) else None
        if not isinstance(approx, dict):
            _fail(f"{name}.user_location", "must be {'type': 'approximate', 'approximate': {...}}")
        parts = {}
        for key in ("city", "country", "region", "timezone"):
            if approx.get(key) is not None:
                parts[key] = _str(f"{name}.user_location.approximate.{key}", approx[key])
        location = WebSearchUserLocation(ApproximateUserLocation(**parts))
    size = v.get("search_context_size")
    if size is not None and size not in ("low", "medium", "high"):
        _fail(f"{name}.search_context_size", f"must be low, medium or high, got {size!r}")
    texts = {}
    for key in ("search_description", "extract_description"):
        if v.get(key) is not None:
            texts[key] = _str(f"{name}.{key}", v[key])
    return WebSearchOptions(search_context_size=size, user_location=location, **texts)


def _validated(validate: Callable[[Any], Any], req: Any) -> Any:
    try:
        return validate(req)
    except ValueError as exc:
        message = str(exc)
        field, sep, rest = message.partition(":")
        head, bracket, tail = field.partition("[")
        if sep and head in _OPENAI_NAMES:
            raise ValueError(f"{_OPENAI_NAMES[head]}{bracket}{tail}{sep}{rest}") from None
        raise


def chat_request_from_openai(body: Mapping[str, Any]) -> ChatCompletionRequest:
    """An OpenAI `/v1/chat/completions` body as a validated ChatCompletionRequest."""
    body = _body(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        _fail("messages", f"must be a list of messages, got {messages!r}")
    kwargs = _mapped(body, _CHAT)
    kwargs.update(_tool_choice(body.get("tool_choice")))
    kwargs.update(_constraint(body))
    if body.get("web_search_options") is not None:
        kwargs["web_search_options"] = _web_search(body["web_search_options"])
    # Copies, so later normalisation never mutates the caller's JSON.
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    req = ChatCompletionRequest(messages=messages, **kwargs)
    return _validated(validate_chat_request, req)


def completion_request_from_openai(body: Mapping[str, Any]) -> CompletionRequest:
    """An OpenAI `/v1/completions` body as a validated CompletionRequest."""
    body = _body(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        _fail("prompt", f"must be a string (or a list holding one string), got {prompt!r}")
    kwargs = _mapped(body, _COMPLETION)
    kwargs.update(_tool_choice(body.get("tool_choice")))
    kwargs.pop("tool_choice_openai", None)
    kwargs.update(_constraint(body))
    return _validated(validate_completion_request, CompletionRequest(prompt=prompt, **kwargs))


def embedding_request_from_openai(body: Mapping[str, Any]) -> EmbeddingRequest:
    """An OpenAI `/v1/embeddings` body as a validated EmbeddingRequest."""
    body = _body(body)
    if "input" not in body:
        _fail("input", "missing")
    table = {"model": ("model", _str), "truncate_sequence": ("truncate_sequence", _bool)}
    kwargs = _mapped(body, table)
    return _validated(validate_embedding_request, EmbeddingRequest(body["input"], **kwargs))
