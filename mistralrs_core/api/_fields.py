"""attrs field builders shared by the API classes.

Two metadata keys steer the JSON converter (see converter.py), so each class
states its own wire shape next to the field instead of in a distant table:
`JSON_NAME` renames a field on the wire, `OMIT_IF_NONE` drops it when None
(OpenAI leaves optional extras out rather than sending null), `NO_JSON` keeps
callables and other process-local values out of JSON entirely.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any

import attrs

from .enums import parse_enum

JSON_NAME = "mistralrs_json_name"
OMIT_IF_NONE = "mistralrs_omit_if_none"
NO_JSON = "mistralrs_no_json"


def _meta(omit_if_none: bool, json_name: str | None, no_json: bool) -> dict:
    meta: dict[str, Any] = {}
    if omit_if_none:
        meta[OMIT_IF_NONE] = True
    if json_name:
        meta[JSON_NAME] = json_name
    if no_json:
        meta[NO_JSON] = True
    return meta


def field(
    default: Any = attrs.NOTHING,
    *,
    factory: Any = None,
    kw_only: bool = False,
    converter: Any = None,
    validator: Any = None,
    omit_if_none: bool = False,
    json_name: str | None = None,
    no_json: bool = False,
) -> Any:
    """attrs.field with this package's JSON metadata."""
    if factory is not None:
        default = attrs.Factory(factory)
    return attrs.field(
        default=default,
        kw_only=kw_only,
        converter=converter,
        validator=validator,
        metadata=_meta(omit_if_none, json_name, no_json),
    )


def enum_field(
    enum_cls: type[Enum],
    default: Any = attrs.NOTHING,
    *,
    optional: bool = False,
    kw_only: bool = False,
    omit_if_none: bool = False,
    json_name: str | None = None,
) -> Any:
    """A field holding a member of `enum_cls`; strings are parsed on the way in."""

    def convert(value: Any, fld: attrs.Attribute) -> Any:
        if value is None and optional:
            return None
        return parse_enum(enum_cls, value, fld.name)

    return field(
        default,
        kw_only=kw_only,
        converter=attrs.Converter(convert, takes_field=True),
        omit_if_none=omit_if_none,
        json_name=json_name,
    )


def _is_str(_inst: Any, att: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{att.name}: must be a str, got {type(value).__name__}")


def _is_opt_str(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _is_str(inst, att, value)


def _fspath(value: Any) -> Any:
    # Model ids are often pathlib.Path objects in user code; the engine wants str.
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def str_field(default: Any = attrs.NOTHING, *, kw_only: bool = False, **kw: Any) -> Any:
    """A str (or os.PathLike) field; optional when its default is None."""
    check = _is_opt_str if default is None else _is_str
    return field(default, kw_only=kw_only, converter=_fspath, validator=check, **kw)


def _str_or_list(value: Any) -> Any:
    value = _fspath(value)
    if isinstance(value, (list, tuple)):
        return [_fspath(v) for v in value]
    return value


def _is_str_or_list(_inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is None and att.default is None:
        return
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return
    raise TypeError(f"{att.name}: must be a str or a non-empty list of str, got {value!r}")


def str_or_list_field(default: Any = attrs.NOTHING, *, kw_only: bool = False) -> Any:
    """Fields the spec types `str | list[str]` (sharded GGUF files, UQFF parts)."""
    return field(default, kw_only=kw_only, converter=_str_or_list, validator=_is_str_or_list)


def _is_opt_int(_inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is None and att.default is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{att.name}: must be an int, got {value!r}")


def int_field(default: Any = attrs.NOTHING, *, kw_only: bool = False, **kw: Any) -> Any:
    return field(default, kw_only=kw_only, validator=_is_opt_int, **kw)


def instance_field(
    cls: type | tuple[type, ...], default: Any = None, *, kw_only: bool = False, **kw: Any
) -> Any:
    """An optional field that must hold an instance of `cls` when set."""
    validator = attrs.validators.optional(attrs.validators.instance_of(cls))
    return field(default, kw_only=kw_only, validator=validator, **kw)


def list_field(*, kw_only: bool = False, **kw: Any) -> Any:
    """A list defaulting to a fresh []; tuples are accepted and copied."""
    return field(factory=list, kw_only=kw_only, converter=_to_list, **kw)


def _to_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
