"""Rendering Hugging Face chat templates (Jinja) in a sandbox.

Templates come from model repos, i.e. from strangers, so they run in Jinja's immutable
sandbox. The environment mirrors what transformers gives templates (same whitespace
options, `raise_exception`, `strftime_now`, a JSON-faithful `tojson`), because models are
trained on exactly that output and a stray space changes what they generate.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that cannot be compiled or that refused the conversation."""


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' which would leak into prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GuardedNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses dunder/underscore attributes (a classic sandbox escape route)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same calling trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _GuardedNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _GuardedNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for inference it only has to render its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


# Bounds on one rendering. Jinja's sandbox stops attribute escapes, not resource abuse: a
# template from a model file could loop for hours ({% for a in range(100000) %}{% for b in
# range(100000) %}...) or build a huge string ('x' * 10**10, '%999999999s', 'x'.ljust(10**10)).
# No real chat template comes near these; a prompt this long exceeds every context anyway.
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 8_000_000

_budget = threading.local()
_WIDE_FORMAT = re.compile(r"\d{7,}")   # a width or precision of a million characters or more


def _check_deadline() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise jinja2.exceptions.SecurityError(
            f"chat template rendering ran past {MAX_RENDER_SECONDS:g} s (an endless or runaway loop?)")


def _check_size(n: int, what: str) -> None:
    if n > MAX_RENDER_CHARS:
        raise jinja2.exceptions.SecurityError(f"chat template {what} would make {n} items, over the "
                                              f"limit of {MAX_RENDER_CHARS}")


def _bounded(iterable: Any):
    """What every template `for` loop iterates: the items, with the deadline checked."""
    for item in iterable:
        _check_deadline()
        yield item


def _guard_filter(fn):
    def guarded(*args, **kwargs):
        _check_deadline()
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                _check_size(abs(a), "filter argument")
        return fn(*args, **kwargs)
    for attr in ("jinja_pass_arg",):   # keep @pass_context / @pass_environment markers
        if hasattr(fn, attr):
            setattr(guarded, attr, getattr(fn, attr))
    return guarded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on time and on the size of what a template builds."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        # Route every loop through _bounded, so no loop outlives the deadline.
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, "mistralrs_bounded", [], [], None, None,
                                            lineno=loop.lineno)
        return tree

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _check_size(len(seq) * max(times, 0), "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and left.bit_length() * right > (1 << 20):
                raise jinja2.exceptions.SecurityError("chat template power is too large")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise jinja2.exceptions.SecurityError("chat template format width is too large")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj, attribute):
        # The sandbox would render an unsafe attribute as an empty string; an escape attempt
        # is better refused outright than silently turned into a different prompt.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        _check_deadline()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            for a in (*args, *kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool):
                    _check_size(abs(a), "string method argument")
            if getattr(__obj, "__name__", "") in ("format", "format_map") and _WIDE_FORMAT.search(owner):
                raise jinja2.exceptions.SecurityError("chat template format width is too large")
        return super().call(__context, __obj, *args, **kwargs)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _GuardedNamespace
    for name, fn in list(env.filters.items()):
        env.filters[name] = _guard_filter(fn)
    env.filters["mistralrs_bounded"] = _bounded
    return env


_ENV = _make_env()


def _plain(value: Any) -> Any:
    """Copy request data into plain JSON types so templates cannot reach object methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _plain(value.item()) if getattr(value, "ndim", 0) == 0 else _plain(value.tolist())
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Any) -> Any:
    """Templates read a turn's reasoning as `reasoning_content` (most) or `thinking`
    (gpt-oss); accept any of the names callers use and expose both."""
    if not isinstance(message, dict):
        return message
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A compiled chat template. `source` is the Jinja text; `origin` says where it came from."""

    def __init__(self, source: str, origin: str | None = None):
        if not isinstance(source, str):
            raise TypeError(f"chat template must be a str, got {type(source).__name__}")
        self.source = source
        self.origin = origin or "chat template"
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"{self.origin} has a Jinja syntax error at line {exc.lineno}: {exc.message}"
            ) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str | None = "",
        eos_token: str | None = "",
        unk_token: str | None = "",
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        context: dict[str, Any] = {k: _plain(v) for k, v in extra.items() if v is not None}
        context.update(
            messages=[_alias_reasoning(m) for m in _plain(list(messages))],
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=bos_token if bos_token is not None else "",
            eos_token=eos_token if eos_token is not None else "",
            unk_token=unk_token if unk_token is not None else "",
        )
        # Left undefined rather than None: templates test `enable_thinking is defined` and
        # `tools is not none` to pick their default behaviour.
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        if tools is not None:
            context["tools"] = _plain(list(tools))
        try:
            return self._render_bounded(context)
        except ChatTemplateError:
            raise
        except RecursionError:
            raise ChatTemplateError(f"{self.origin} recursed too deeply") from None
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"{self.origin} tried an unsafe operation: {exc}") from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.origin} failed to render: {exc}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError, ArithmeticError) as exc:
            raise ChatTemplateError(f"{self.origin} failed to render: {type(exc).__name__}: {exc}") from None

    def _render_bounded(self, context: dict) -> str:
        _budget.deadline = time.monotonic() + MAX_RENDER_SECONDS
        try:
            parts, total = [], 0
            for chunk in self._template.generate(**context):
                total += len(chunk)
                _check_size(total, "output")
                _check_deadline()
                parts.append(chunk)
            return "".join(parts)
        finally:
            _budget.deadline = None

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, {len(self.source)} chars)"


def _looks_like_file(value: str) -> bool:
    # A literal template always contains Jinja markup; a path never needs to.
    return not any(m in value for m in ("{{", "{%", "{#")) and "\n" not in value


def _template_from_json(path: Path) -> str:
    from ..loading.hf_config import load_json

    data = load_json(path)
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, list):
        from .tokenizer import _named_templates, _pick_default

        value = _pick_default(_named_templates(value))
    if not isinstance(value, str):
        raise ChatTemplateError(f"{str(path)!r} has no 'chat_template' string")
    return value


def load_template_arg(value: str, what: str) -> ChatTemplate:
    """A user-supplied template: a .json file with "chat_template", a Jinja file, or the literal text."""
    if _looks_like_file(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {value!r} does not exist")
        origin = f"{what} {str(path)!r}"
        if path.suffix.lower() == ".json":
            return ChatTemplate(_template_from_json(path), origin)
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), origin)
        except UnicodeDecodeError:
            raise ChatTemplateError(f"{origin} is not UTF-8 text") from None
    return ChatTemplate(value, f"{what} (literal template)")


def resolve_chat_template(
    model_dir: str | os.PathLike | None,
    tokenizer,
    chat_template: str | None = None,
    jinja_explicit: str | None = None,
) -> ChatTemplate | None:
    """Pick the template to use: jinja_explicit > chat_template > chat_template.jinja
    in the model dir > the tokenizer's (tokenizer_config.json) template > None."""
    if jinja_explicit:
        return load_template_arg(jinja_explicit, "jinja_explicit")
    if chat_template:
        return load_template_arg(chat_template, "chat_template")
    if model_dir is not None:
        directory = Path(model_dir)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            return ChatTemplate(jinja_file.read_text(encoding="utf-8"), f"chat template {str(jinja_file)!r}")
        json_file = directory / "chat_template.json"
        if json_file.is_file():
            return ChatTemplate(_template_from_json(json_file), f"chat template {str(json_file)!r}")
    source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if source:
        return ChatTemplate(source, "tokenizer_config.json chat_template")
    return None
