"""A request's tools and its tool choice, checked once: every error names its field."""
from __future__ import annotations

import json
import re
from typing import Any

import attrs

from mistralrs_core.api.enums import ToolChoice

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@attrs.frozen
class ToolSpec:
    name: str
    description: str | None
    parameters: dict | None      # the arguments' JSON Schema
    strict: bool

    def openai(self) -> dict:
        """The OpenAI tool object chat templates expect (``tools=`` as transformers passes)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters if self.parameters is not None else {"type": "object", "properties": {}}
        return {"type": "function", "function": fn}


@attrs.frozen
class ToolMode:
    """``kind``: "none" (tools are not offered), "auto" (the model decides), "required"
    (some call must be made) or "named" (a call to ``names[0]``). ``names``: the tools the
    model may call."""
    kind: str
    names: tuple[str, ...] = ()

    @property
    def forced(self) -> bool:
        return self.kind in ("required", "named")


def _fail(name: str, message: str):
    raise ValueError(f"{name}: {message}")


def _check_json_schema(name: str, schema: Any) -> None:
    if not isinstance(schema, dict):
        _fail(name, f"must be a JSON Schema object, got {schema!r}")
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        _fail(name, f"is not a valid JSON Schema{f' (at {where})' if where else ''}: {exc.message}")


def parse_tool_spec(index: int, text: str) -> ToolSpec:
    field = f"tool_schemas[{index}]"
    try:
        tool = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        _fail(field, f"is not valid JSON: {exc}")
    if not isinstance(tool, dict):
        _fail(field, "must be a JSON object")
    if tool.get("type", "function") != "function":
        _fail(f"{field}.type", f"must be 'function', got {tool.get('type')!r}")
    # The OpenAI form nests the function; a bare function object is accepted too.
    fn = tool.get("function", tool) if "function" in tool else tool
    where = f"{field}.function" if "function" in tool else field
    if not isinstance(fn, dict):
        _fail(where, "must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _fail(f"{where}.name", f"must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        _fail(f"{where}.description", "must be a string")
    params = fn.get("parameters")
    if params is not None:
        _check_json_schema(f"{where}.parameters", params)
    strict = fn.get("strict", tool.get("strict", False))
    if not isinstance(strict, bool) and strict is not None:
        _fail(f"{where}.strict", "must be a boolean")
    return ToolSpec(name, desc, params, bool(strict))


def parse_tool_specs(texts) -> list[ToolSpec]:
    specs, seen = [], {}
    for i, text in enumerate(texts or ()):
        spec = parse_tool_spec(i, text)
        if spec.name in seen:
            _fail(f"tool_schemas[{i}]", f"tool {spec.name!r} is also defined by tool_schemas[{seen[spec.name]}]")
        seen[spec.name] = i
        specs.append(spec)
    return specs


def _named(v: dict, field: str) -> str:
    fn = v.get("function")
    name = fn.get("name") if isinstance(fn, dict) else v.get("name")
    if not isinstance(name, str) or not name:
        _fail(field, f"a function choice needs function.name, got {v!r}")
    return name


def resolve_tool_mode(req, specs: list[ToolSpec]) -> ToolMode:
    """The request's tool choice against its tools: ``tool_choice`` (SDK ``ToolChoice``) and
    ``tool_choice_openai`` (OpenAI's ``"required"``, a named function, ``allowed_tools``)."""
    names = tuple(s.name for s in specs)
    if req.tool_choice is ToolChoice.NoTools:
        return ToolMode("none")
    choice = getattr(req, "tool_choice_openai", None)
    field = "tool_choice"
    if choice is None or choice == "auto":
        return ToolMode("auto", names) if names else ToolMode("none")
    if choice == "none":
        return ToolMode("none")
    if choice == "required":
        if not names:
            _fail(field, "'required' needs tools (tool_schemas / tools is empty)")
        return ToolMode("required", names)
    if not isinstance(choice, dict):
        _fail(field, f"must be 'none', 'auto', 'required' or a function choice, got {choice!r}")
    kind = choice.get("type")
    if kind == "function":
        name = _named(choice, field)
        if name not in names:
            _fail(field, f"names the unknown tool {name!r}; the request's tools are {list(names)}")
        return ToolMode("named", (name,))
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools", choice)
        mode = allowed.get("mode", "auto") if isinstance(allowed, dict) else None
        tools = allowed.get("tools") if isinstance(allowed, dict) else None
        if mode not in ("auto", "required") or not isinstance(tools, list) or not tools:
            _fail(field, "allowed_tools needs mode 'auto' or 'required' and a non-empty tools list")
        picked = []
        for i, t in enumerate(tools):
            name = _named(t, f"{field}.allowed_tools.tools[{i}]") if isinstance(t, dict) else None
            if name not in names:
                _fail(f"{field}.allowed_tools.tools[{i}]", f"names the unknown tool {name!r}; "
                      f"the request's tools are {list(names)}")
            picked.append(name)
        return ToolMode(mode, tuple(picked))
    _fail(field, f"must be 'none', 'auto', 'required' or a function choice, got {choice!r}")
