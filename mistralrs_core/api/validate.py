"""Request validation.

Every failure is a ValueError whose message starts with the offending field
(`"max_tokens: must be >= 1, got -3"`, `"messages[2].role: ..."`), so callers
and HTTP clients can tell at once what to fix.  The engine relies on a
validated request being well-typed: numbers are numbers, lists are lists.

Choices where the spec is silent:
- `top_k=0` is accepted and means "disabled" (as in llama.cpp and vLLM).
- `temperature=0` is accepted and means greedy.
- Multi-part content may appear in any role as long as it is text only;
  image/audio/video parts are accepted in user messages only (upstream
  rejects any multi-part content outside user messages).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, NoReturn

from .config import InputFile, LoraAdapterGeneration, RequestedFile
from .enums import Role
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Message
from .tools import WebSearchOptions

U32_MAX = 2**32 - 1
MAX_TOP_LOGPROBS = 20
# Bounds on what one request may ask of the engine: n sequences each holding KV blocks,
# and stop strings that every sampled token is checked against.
MAX_CHOICES = 128
MAX_STOP_SEQS = 64
MAX_STOP_CHARS = 4096
ROLES = frozenset(r.value for r in Role)
CONTENT_PART_TYPES = ("text", "image_url", "audio_url", "input_audio", "video_url")
GRAMMAR_TYPES = ("regex", "lark", "json_schema", "llguidance")
REASONING_EFFORTS = ("off", "none", "low", "medium", "high", "xhigh")
_EFFORT_OFF = ("off", "none")


def _fail(name: str, message: str) -> NoReturn:
    raise ValueError(f"{name}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if value is None:
        return
    if not _is_int(value):
        _fail(name, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        _fail(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        _fail(name, f"must be <= {hi}, got {value}")


def _float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> None:
    if value is None:
        return
    if not _is_number(value):
        _fail(name, f"must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        _fail(name, f"must be <= {hi}, got {value}")


def _bool(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        _fail(name, f"must be a bool, got {value!r}")


def _str(name: str, value: Any, optional: bool = True, non_empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        _fail(name, f"must be a string, got {value!r}")
    if non_empty and not value:
        _fail(name, "must not be empty")


def _str_list(name: str, value: Any, non_empty_items: bool = True) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        _fail(name, f"must be a list of strings, got {value!r}")
    for i, item in enumerate(value):
        _str(f"{name}[{i}]", item, optional=False, non_empty=non_empty_items)


def _instances(name: str, value: Any, cls: type) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        _fail(name, f"must be a list of {cls.__name__}, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, cls):
            _fail(f"{name}[{i}]", f"must be a {cls.__name__}, got {item!r}")


def _token_id(name: str, value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= U32_MAX:
        _fail(name, f"must be a token id in [0, {U32_MAX}], got {value!r}")


def _logit_bias(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        _fail("logit_bias", f"must be a dict of token id to bias, got {value!r}")
    for key, bias in value.items():
        token = token_id_key(key)
        if token is None:
            _fail(f"logit_bias[{key!r}]", "key must be a token id (int or integer string)")
        if bias is None:
            _fail(f"logit_bias[{key!r}]", "bias must be a number, got None")
        _float(f"logit_bias[{key!r}]", bias, -100.0, 100.0)


def token_id_key(key: Any) -> int | None:
    """`key` as a token id when it is one (OpenAI JSON sends "50256"), else None."""
    if isinstance(key, str) and key.strip().lstrip("+").isdigit():
        key = int(key)
    if _is_int(key) and 0 <= key <= U32_MAX:
        return key
    return None


def _json_text(name: str, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        _fail(name, f"{what} is not valid JSON ({exc})")


def _stop_seqs(value: Any) -> None:
    _str_list("stop_seqs", value)
    if value is None:
        return
    if len(value) > MAX_STOP_SEQS:
        _fail("stop_seqs", f"at most {MAX_STOP_SEQS} stop strings, got {len(value)}")
    for i, s in enumerate(value):
        if len(s) > MAX_STOP_CHARS:
            _fail(f"stop_seqs[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}")


def _grammar(grammar: Any, grammar_type: Any) -> None:
    if (grammar is None) != (grammar_type is None):
        missing = "grammar_type" if grammar_type is None else "grammar"
        _fail(missing, "grammar and grammar_type must be set together")
    if grammar is None:
        return
    if grammar_type not in GRAMMAR_TYPES:
        _fail("grammar_type", f"must be one of {', '.join(GRAMMAR_TYPES)}, got {grammar_type!r}")
    _str("grammar", grammar, optional=False, non_empty=True)
    if grammar_type in ("json_schema", "llguidance"):
        _json_text("grammar", grammar, f"a {grammar_type} grammar")


def _tool_schemas(value: Any) -> None:
    _str_list("tool_schemas", value)
    for i, text in enumerate(value or ()):
        if not isinstance(_json_text(f"tool_schemas[{i}]", text, "the tool schema"), dict):
            _fail(f"tool_schemas[{i}]", "must be a JSON object")


def _dry(req: Any) -> None:
    _float("dry_multiplier", req.dry_multiplier, 0.0)
    _float("dry_base", req.dry_base, 1.0)
    _int("dry_allowed_length", req.dry_allowed_length, 0)
    _str_list("dry_sequence_breakers", req.dry_sequence_breakers)


def _adapter(value: Any) -> None:
    if value is None or isinstance(value, LoraAdapterGeneration):
        return
    _str("adapter", value, non_empty=True)


def _sampling(req: Any) -> None:
    """Rules shared by chat and completion requests."""
    _str("model", req.model, optional=False)
    _int("max_tokens", req.max_tokens, 1)
    _int("n_choices", req.n_choices, 1, MAX_CHOICES)
    _float("temperature", req.temperature, 0.0)
    _float("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    _int("top_k", req.top_k, 0)
    _float("min_p", req.min_p, 0.0, 1.0)
    _float("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _float("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _float("repetition_penalty", req.repetition_penalty, 0.0, lo_open=True)
    _logit_bias(req.logit_bias)
    _stop_seqs(req.stop_seqs)
    _grammar(req.grammar, req.grammar_type)
    _tool_schemas(req.tool_schemas)
    _dry(req)
    _bool("truncate_sequence", req.truncate_sequence)
    _bool("ignore_eos", req.ignore_eos)
    _int("seed", req.seed, 0)
    _str("cache_salt", getattr(req, "cache_salt", None), non_empty=True)
    _adapter(req.adapter)


def _url_part(name: str, part: dict, kind: str) -> None:
    if kind == "input_audio":           # OpenAI's form: base64 ``data`` plus its ``format``
        ref = part.get(kind)
        if not isinstance(ref, dict) or not isinstance(ref.get("data"), str) or not ref["data"]:
            _fail(f"{name}.input_audio", "must be a dict with non-empty base64 'data' (and 'format')")
        return
    if kind not in part:
        _fail(name, f"a {kind} part needs a {kind!r} key")
    ref = part[kind]
    url = ref.get("url") if isinstance(ref, dict) else ref
    if kind == "video_url" and isinstance(url, list):   # a video given as its frames' image URLs
        if not url or not all(isinstance(u, str) and u for u in url):
            _fail(f"{name}.{kind}", "a frame list must hold non-empty URL strings")
        return
    if not isinstance(url, str) or not url:
        _fail(f"{name}.{kind}", "must be a URL string or a dict with a non-empty 'url'")


def _content_part(name: str, part: Any, role: str) -> None:
    if not isinstance(part, dict):
        _fail(name, f"content parts must be dicts, got {part!r}")
    kind = part.get("type")
    if kind not in CONTENT_PART_TYPES:
        _fail(f"{name}.type", f"must be one of {', '.join(CONTENT_PART_TYPES)}, got {kind!r}")
    if kind == "text":
        _str(f"{name}.text", part.get("text"), optional=False)
        return
    if role != "user":
        _fail(f"{name}.type", f"{kind} parts are only allowed in user messages, not {role}")
    _url_part(name, part, kind)


def _message_fields(name: str, message: Any) -> tuple[Any, Any, bool, Any]:
    """(role, content, has_content, tool_calls) of a dict or Message."""
    if isinstance(message, Message):
        return message.role.value, message.content, True, message.tool_calls
    if isinstance(message, dict):
        role = message.get("role")
        if isinstance(role, Role):
            role = role.value
        return role, message.get("content"), "content" in message, message.get("tool_calls")
    _fail(name, f"must be a dict or Message, got {type(message).__name__}")


def _message(i: int, message: Any) -> None:
    name = f"messages[{i}]"
    role, content, has_content, tool_calls = _message_fields(name, message)
    if not isinstance(role, str) or role not in ROLES:
        _fail(f"{name}.role", f"must be one of {', '.join(sorted(ROLES))}, got {role!r}")
    if tool_calls is not None and not isinstance(tool_calls, list):
        _fail(f"{name}.tool_calls", f"must be a list, got {tool_calls!r}")
    if content is None:
        # OpenAI: an assistant turn that only calls tools has content null/absent.
        if role != "assistant":
            _fail(f"{name}.content", "missing" if not has_content else "must not be None")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        _fail(f"{name}.content", f"must be a string, a list of parts or None, got {content!r}")
    if not content:
        _fail(f"{name}.content", "must not be an empty list")
    for j, part in enumerate(content):
        _content_part(f"{name}.content[{j}]", part, role)


def _messages(messages: Any) -> None:
    if isinstance(messages, str):
        # A pre-templated prompt.
        if not messages:
            _fail("messages", "must not be empty")
        return
    if not isinstance(messages, list):
        _fail("messages", f"must be a list of messages or a string, got {type(messages).__name__}")
    if not messages:
        _fail("messages", "must not be empty")
    for i, message in enumerate(messages):
        _message(i, message)


def _reasoning(enable_thinking: Any, effort: Any) -> None:
    _bool("enable_thinking", enable_thinking, optional=True)
    if effort is None:
        return
    if effort not in REASONING_EFFORTS:
        _fail("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    if enable_thinking is False and effort not in _EFFORT_OFF:
        _fail("reasoning_effort", f"{effort!r} contradicts enable_thinking=False")
    if enable_thinking is True and effort in _EFFORT_OFF:
        _fail("reasoning_effort", f"{effort!r} contradicts enable_thinking=True")


def _token_ids(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        _fail(name, f"must be a list of token ids, got {value!r}")
    for i, token in enumerate(value):
        _token_id(f"{name}[{i}]", token)


def validate_chat_request(req: ChatCompletionRequest) -> ChatCompletionRequest:
    """Raise ValueError naming the first invalid field; return `req` unchanged."""
    if not isinstance(req, ChatCompletionRequest):
        raise TypeError(f"expected a ChatCompletionRequest, got {type(req).__name__}")
    _messages(req.messages)
    _sampling(req)
    _bool("logprobs", req.logprobs)
    _int("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if req.top_logprobs is not None and not req.logprobs:
        _fail("top_logprobs", "requires logprobs=True")
    _token_ids("stop_token_ids", req.stop_token_ids)
    _bool("stream", req.stream)
    _reasoning(req.enable_thinking, req.reasoning_effort)
    _int("max_tool_rounds", req.max_tool_rounds, 1)
    _str("tool_dispatch_url", req.tool_dispatch_url, non_empty=True)
    _str("session_id", req.session_id, non_empty=True)
    _bool("enable_code_execution", req.enable_code_execution)
    _bool("enable_shell", req.enable_shell)
    if req.web_search_options is not None and not isinstance(
        req.web_search_options, WebSearchOptions
    ):
        _fail("web_search_options", f"must be a WebSearchOptions, got {req.web_search_options!r}")
    if req.agent_approval_callback is not None and not callable(req.agent_approval_callback):
        _fail("agent_approval_callback", "must be callable")
    _instances("files", req.files, RequestedFile)
    _instances("input_files", req.input_files, InputFile)
    return req


def validate_completion_request(req: CompletionRequest) -> CompletionRequest:
    if not isinstance(req, CompletionRequest):
        raise TypeError(f"expected a CompletionRequest, got {type(req).__name__}")
    _str("prompt", req.prompt, optional=False, non_empty=True)
    _sampling(req)
    _int("best_of", req.best_of, 1)
    # best_of=1 is the SDK default and means "as many as n_choices" (OpenAI's default).
    if 1 < req.best_of < req.n_choices:
        _fail("best_of", f"must be >= n_choices ({req.n_choices}), got {req.best_of}")
    _bool("echo_prompt", req.echo_prompt)
    _str("suffix", req.suffix)
    return req


def normalize_embedding_input(value: Any) -> list[str] | list[list[int]]:
    """The embedding input as a batch: list[str] or list[list[int]].

    Raises ValueError naming `input` (or `input[i]`) for anything else.
    """
    if isinstance(value, str):
        _str("input", value, non_empty=True)
        return [value]
    if not isinstance(value, list) or not value:
        _fail("input", "must be a non-empty string, list of strings, list of token ids "
              "or list of token-id lists")
    first = value[0]
    if isinstance(first, str):
        _str_list("input", value)
        return list(value)
    if _is_int(first):
        _token_ids("input", value)
        return [list(value)]
    if isinstance(first, list):
        for i, tokens in enumerate(value):
            if not isinstance(tokens, list) or not tokens:
                _fail(f"input[{i}]", "must be a non-empty list of token ids")
            _token_ids(f"input[{i}]", tokens)
        return [list(tokens) for tokens in value]
    _fail("input[0]", f"must be a string, a token id or a list of token ids, got {first!r}")


def validate_embedding_request(req: EmbeddingRequest) -> EmbeddingRequest:
    if not isinstance(req, EmbeddingRequest):
        raise TypeError(f"expected an EmbeddingRequest, got {type(req).__name__}")
    normalize_embedding_input(req.input)
    _bool("truncate_sequence", req.truncate_sequence)
    _str("model", req.model, optional=False)
    return req


def normalize_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Plain dicts `{"role": str, "content": str | list | None, ...}`.

    Keys other than role/content are kept (tool_calls, tool_call_id, name) for
    chat templates that use them.  A str (pre-templated prompt) is not a
    message list: callers handle it before calling this.
    """
    if isinstance(messages, str):
        _fail("messages", "a pre-templated prompt string has no messages to normalize")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if isinstance(message, Message):
            out.append(message.to_dict())
        elif isinstance(message, dict):
            item = dict(message)
            role = item.get("role")
            item["role"] = role.value if isinstance(role, Role) else role
            item.setdefault("content", None)
            out.append(item)
        else:
            _fail(f"messages[{i}]", f"must be a dict or Message, got {type(message).__name__}")
    return out
