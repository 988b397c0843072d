"""Config dataclasses from plain data (YAML, JSON, a checkpoint's `config.json`), checked
against their field types where they are read, so that `steps: abc`, `steps: 5.5`,
`augment: maybe` or `channels: 8.5` fail at once, in one line, before anything is written.
The command line's options for the same dataclasses are built in `isomod.cli.options`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Union

from isomod.errors import IsomodError

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@functools.cache
def field_types(cls) -> types.MappingProxyType:
    """Each field's type, resolved from the (string) annotations (once per class: the
    command line asks for every field of every command's config on each call)."""
    return types.MappingProxyType(typing.get_type_hints(cls))


def is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return f"a list whose items are {' or '.join(describe(a) for a in args if a is not Ellipsis)}"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if is_config(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(value, tp, where: str):
    """`value` as type `tp`, or an IsomodError naming `where`, the value and what is accepted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is list or tp is dict:
        if isinstance(value, tp):
            return value
        raise IsomodError(f"{where}: expected {'a list' if tp is list else 'a mapping'}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            try:
                return check_value(value, option, where)
            except IsomodError:
                continue
        raise IsomodError(f"{where}: expected {describe(tp)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise IsomodError(f"{where}: expected a mapping, got {value!r}")
        key_t, value_t = args or (Any, Any)
        return {check_value(k, key_t, where): check_value(v, value_t, f"{where}[{k!r}]") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise IsomodError(f"{where}: expected {describe(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise IsomodError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if is_config(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise IsomodError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise IsomodError(f"{where}: expected {describe(tp)}, got {value!r}")


def from_dict(cls, data, what: str):
    """`cls(**data)` with every value checked against its field's type (nested config
    dataclasses from nested mappings); unknown keys are refused in one line that lists
    the known ones."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise IsomodError(f"{what}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                          f"got {data!r}")
    types_ = field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise IsomodError(f"{what}: unknown keys {unknown}; known: {sorted(known)}")
    values = {k: check_value(v, types_[k], f"{what} {k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise IsomodError(f"{what}: {exc}") from None


def merge(base: dict, update: dict) -> dict:
    """`base` updated by `update`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
