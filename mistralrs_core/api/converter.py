"""The one cattrs converter of the API: objects <-> JSON-ready dicts.

Per-field wire details (renames such as `tp` -> "type", omitting None extras,
never serialising callables) are declared on the fields themselves through
_fields metadata; this module turns that metadata into cattrs overrides once
per class.  Enums are written as their values and read through `parse_enum`,
so any accepted spelling structures.  Bytes travel as base64 text.

The OpenAI request parsers live in openai.py and are re-exported here.
"""

from __future__ import annotations

import base64
import types
import typing
from enum import Enum
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._fields import JSON_NAME, NO_JSON, OMIT_IF_NONE
from .enums import parse_enum
from .openai import (  # noqa: F401  (re-exported)
    chat_request_from_openai,
    completion_request_from_openai,
    embedding_request_from_openai,
)

T = TypeVar("T")

CONVERTER = cattrs.Converter()


def _unstructure_overrides(cls: type) -> dict[str, Any]:
    overrides = {}
    for att in attrs.fields(cls):
        meta = att.metadata
        if meta.get(NO_JSON):
            overrides[att.name] = override(omit=True)
            continue
        kw: dict[str, Any] = {}
        if JSON_NAME in meta:
            kw["rename"] = meta[JSON_NAME]
        if meta.get(OMIT_IF_NONE):
            # Such fields always default to None, so "omit if default" is
            # exactly "omit if None".
            kw["omit_if_default"] = True
        if kw:
            overrides[att.name] = override(**kw)
    return overrides


def _structure_overrides(cls: type) -> dict[str, Any]:
    return {
        att.name: override(rename=att.metadata[JSON_NAME])
        for att in attrs.fields(cls)
        if JSON_NAME in att.metadata
    }


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Enum)


CONVERTER.register_unstructure_hook_factory(
    attrs.has, lambda cls: make_dict_unstructure_fn(cls, CONVERTER, **_unstructure_overrides(cls))
)
CONVERTER.register_structure_hook_factory(
    attrs.has, lambda cls: make_dict_structure_fn(cls, CONVERTER, **_structure_overrides(cls))
)
CONVERTER.register_structure_hook_func(_is_enum, lambda v, tp: parse_enum(tp, v, tp.__name__))
CONVERTER.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
CONVERTER.register_structure_hook(
    bytes, lambda v, _: base64.b64decode(v) if isinstance(v, str) else bytes(v)
)


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return ()


def _is_str_union(tp: Any) -> bool:
    # cattrs cannot pick a branch for e.g. `str | LoraAdapterGeneration | None`
    # or `str | dict | None`; the JSON value's own type decides instead.
    args = [a for a in _union_args(tp) if a is not type(None)]
    return str in args and len(args) > 1


def _structure_str_union(value: Any, tp: Any) -> Any:
    args = _union_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if attrs.has(arg) and isinstance(value, dict):
            return CONVERTER.structure(value, arg)
    plain = tuple(typing.get_origin(a) or a for a in args if not attrs.has(a))
    if isinstance(value, plain):
        return value
    raise ValueError(f"cannot read {value!r} as {tp}")


CONVERTER.register_structure_hook_func(_is_str_union, _structure_str_union)


def to_json_dict(obj: Any) -> Any:
    """`obj` (any API object, or lists/dicts of them) as JSON-ready builtins."""
    return CONVERTER.unstructure(obj)


def from_json_dict(data: Any, cls: type[T]) -> T:
    """Build `cls` from the shape `to_json_dict` writes (e.g. to parse a response)."""
    return CONVERTER.structure(data, cls)
