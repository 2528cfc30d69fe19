"""Request classes: chat, completion, embedding, and the chat `Message`.

Constructors only coerce harmless spellings (a lone stop string into a list,
a dict grammar or tool schema into its JSON text, str enum names into
members); semantic checks live in validate.py so that one function reports
every rule with the offending field's name.

Positional order: the spec's documented signature first (for chat:
`messages, model, logprobs, n_choices, logit_bias, top_logprobs, max_tokens,
presence_penalty, frequency_penalty, stop_token_ids, temperature, top_p,
top_k, stream`), then upstream's later fields in upstream's order.
`adapter` is keyword-only as upstream; `seed`, `tool_choice_openai` and
`cache_salt` are keyword-only extensions of ours (see their comments).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attrs

from ._fields import enum_field, field
from .config import InputFile, LoraAdapterGeneration, RequestedFile
from .enums import AgentPermission, Role, ToolChoice
from .tools import WebSearchOptions


def _listify(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _stop_list(value: Any) -> Any:
    # OpenAI's `stop` may be one string; upstream wants a list.
    if isinstance(value, str):
        return [value]
    return _listify(value)


def _json_text(value: Any) -> Any:
    # Grammars and tool schemas travel as JSON text; accept the parsed form too.
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _json_texts(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_text(v) for v in value]
    return value


def _messages(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


@attrs.define
class Message:
    """One chat turn: `Message(Role.User, "Hello")`.  Roles may be given as strings."""

    role: Role = enum_field(Role)
    content: Any = field(None)
    name: str | None = field(None, kw_only=True, omit_if_none=True)
    tool_calls: list[dict] | None = field(None, kw_only=True, omit_if_none=True)
    tool_call_id: str | None = field(None, kw_only=True, omit_if_none=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role.value, "content": self.content}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _opt(default: Any = None, **kw: Any) -> Any:
    return field(default, **kw)


@attrs.define
class ChatCompletionRequest:
    """`messages` is a list of dicts or `Message`s, or a str holding an already
    templated prompt.  `model` defaults to "default" (the runner's default model)."""

    messages: Any = field(converter=_messages)
    model: str = field("default")
    logprobs: bool = field(False)
    n_choices: int = field(1)
    logit_bias: dict[int, float] | None = _opt()
    top_logprobs: int | None = _opt()
    max_tokens: int | None = _opt()
    presence_penalty: float | None = _opt()
    frequency_penalty: float | None = _opt()
    stop_token_ids: list[int] | None = _opt(converter=_listify)
    temperature: float | None = _opt()
    top_p: float | None = _opt()
    top_k: int | None = _opt()
    stream: bool = field(False)
    repetition_penalty: float | None = _opt()
    stop_seqs: list[str] | None = _opt(converter=_stop_list)
    grammar: str | None = _opt(converter=_json_text)
    grammar_type: str | None = _opt()
    min_p: float | None = _opt()
    tool_schemas: list[str] | None = _opt(converter=_json_texts)
    tool_choice: ToolChoice | None = enum_field(ToolChoice, None, optional=True)
    dry_multiplier: float | None = _opt()
    dry_base: float | None = _opt()
    dry_allowed_length: int | None = _opt()
    dry_sequence_breakers: list[str] | None = _opt(converter=_listify)
    web_search_options: WebSearchOptions | None = _opt()
    enable_thinking: bool | None = _opt()
    truncate_sequence: bool = field(False)
    reasoning_effort: str | None = _opt()
    max_tool_rounds: int | None = _opt()
    tool_dispatch_url: str | None = _opt()
    enable_code_execution: bool = field(False)
    agent_permission: AgentPermission | None = enum_field(AgentPermission, None, optional=True)
    agent_approval_callback: Callable[..., Any] | None = _opt(no_json=True)
    code_execution_permission: AgentPermission | None = enum_field(
        AgentPermission, None, optional=True
    )
    session_id: str | None = _opt()
    files: list[RequestedFile] | None = _opt(converter=_listify)
    input_files: list[InputFile] | None = _opt(converter=_listify)
    enable_shell: bool = field(False)
    shell_skills: list[Any] | None = _opt(converter=_listify)
    ignore_eos: bool = field(False)
    adapter: str | LoraAdapterGeneration | None = _opt(kw_only=True)
    # Upstream seeds only at Runner start-up; a per-request seed (OpenAI's
    # `seed`) is carried so the engine can honour it where it can.
    seed: int | None = _opt(kw_only=True)
    # ToolChoice cannot express OpenAI's "required" or a named function; the
    # original value is kept here (with tool_choice=Auto) for the tool layer.
    tool_choice_openai: str | dict | None = _opt(kw_only=True)
    # Our extension (vLLM's `cache_salt`): requests share prefix-cache blocks only with
    # requests of the same salt, so tenants cannot probe each other's prompts.
    cache_salt: str | None = _opt(kw_only=True)


@attrs.define
class CompletionRequest:
    prompt: str = field()
    model: str = field("default")
    best_of: int = field(1)
    echo_prompt: bool = field(False)
    logit_bias: dict[int, float] | None = _opt()
    max_tokens: int | None = _opt()
    n_choices: int = field(1)
    presence_penalty: float | None = _opt()
    frequency_penalty: float | None = _opt()
    stop_seqs: list[str] | None = _opt(converter=_stop_list)
    temperature: float | None = _opt()
    top_p: float | None = _opt()
    top_k: int | None = _opt()
    suffix: str | None = _opt()
    grammar: str | None = _opt(converter=_json_text)
    grammar_type: str | None = _opt()
    repetition_penalty: float | None = _opt()
    min_p: float | None = _opt()
    tool_schemas: list[str] | None = _opt(converter=_json_texts)
    tool_choice: ToolChoice | None = enum_field(ToolChoice, None, optional=True)
    dry_multiplier: float | None = _opt()
    dry_base: float | None = _opt()
    dry_allowed_length: int | None = _opt()
    dry_sequence_breakers: list[str] | None = _opt(converter=_listify)
    truncate_sequence: bool = field(False)
    ignore_eos: bool = field(False)
    adapter: str | LoraAdapterGeneration | None = _opt(kw_only=True)
    seed: int | None = _opt(kw_only=True)
    cache_salt: str | None = _opt(kw_only=True)


@attrs.define
class EmbeddingRequest:
    """`input`: a str, list of str, list of token ids, or list of token-id lists."""

    input: Any = field(converter=_listify)
    truncate_sequence: bool = field(False)
    # Upstream routes by Runner's model_id argument; the HTTP server needs a name.
    model: str = field("default", kw_only=True)
