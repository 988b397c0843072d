"""Config dataclasses from plain data (YAML, JSON, a checkpoint's `config.json`) and from
command-line options, checked against their field types where they are read, so that
`steps: abc`, `steps: 5.5`, `augment: maybe` or `channels: 8.5` fail at once, in one line,
before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
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


# --- command-line options ----------------------------------------------------------
def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_or_str(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def positive(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")


def docstring_args(cls) -> dict[str, str]:
    """Field descriptions from the `Args:` block of a class docstring."""
    out: dict[str, str] = {}
    names: list[str] = []
    lines = (cls.__doc__ or "").split("Args:", 1)[-1].splitlines()
    for line in lines[1:]:
        text = line.strip()
        head, sep, rest = text.partition(": ")
        if sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            for n in names:
                out[n] = rest
        elif text and names:
            for n in names:
                out[n] += " " + text
    return out


def _parser_for(tp):
    """The argparse `type` and `nargs` of a config field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return _parser_for(args[0])[0], "+"
    if origin in (typing.Union, types.UnionType):
        return int_or_str, None
    return {int: int, float: float, bool: _bool, str: str}[tp], None


def add_config_args(parser: argparse.ArgumentParser, base, unprefixed: str = "train",
                    hidden: tuple[str, ...] = ()) -> None:
    """Options for every field of the config dataclass instance `base`: its own fields as
    `--field-name`, each nested config's as `--section-field-name` (no prefix for the
    section named `unprefixed`), but those named in `hidden` (`section.field`: options the
    command sets itself or that mean nothing for it). The help shows the defaults; unset
    options parse to None."""
    cls = type(base)
    docs = docstring_args(cls)
    own = parser.add_argument_group("options")
    types_of = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types_of[f.name]
        value = getattr(base, f.name)
        if f.name in hidden:
            continue
        if is_config(tp):
            group = parser.add_argument_group(f"{f.name} options", docs.get(f.name))
            prefix = "" if f.name == unprefixed else f"{f.name.replace('_', '-')}-"
            sub_docs = docstring_args(tp)
            for g in dataclasses.fields(tp):
                if f"{f.name}.{g.name}" in hidden:
                    continue
                _add(group, f"--{prefix}{g.name.replace('_', '-')}", f"cfg.{f.name}.{g.name}", field_types(tp)[g.name],
                     sub_docs.get(g.name, ""), getattr(value, g.name))
        else:
            _add(own, f"--{f.name.replace('_', '-')}", f"cfg.{f.name}", tp, docs.get(f.name, ""), value)


def _add(group, flag: str, dest: str, tp, doc: str, default) -> None:
    kind, nargs = _parser_for(tp)
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else repr(default)
    group.add_argument(flag, dest=dest, type=kind, nargs=nargs, default=None,
                       metavar=getattr(kind, "__name__", "VALUE").lstrip("_").upper(),
                       help=f"{doc} (default {shown})".replace("%", "%%").strip())


def read_config_file(path: str | None) -> dict:
    """A YAML or JSON file holding a mapping (e.g. `seeds:`, `model:`, `train:`)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise IsomodError(f"config file {path} not found")
    try:
        text = file.read_text()
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise IsomodError(f"{path}: cannot parse config ({type(exc).__name__}: {detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IsomodError(f"{path}: a config file holds a mapping of options and sections, got {data!r}")
    return data


def build_config(args: argparse.Namespace, base):
    """The config dataclass `base`'s type, from its defaults <- the `--config` file <- options,
    every value checked against its field's type."""
    cls = type(base)
    file = read_config_file(getattr(args, "config", None))
    merged = merge(dataclasses.asdict(base), file)
    for key, value in vars(args).items():
        if key.startswith("cfg.") and value is not None:
            *sections, name = key.split(".")[1:]
            target = merged
            for section in sections:  # a section the file made a non-mapping is refused by from_dict below
                target = target.get(section) if isinstance(target, dict) else None
            if isinstance(target, dict):
                target[name] = value
    return from_dict(cls, merged, getattr(args, "config", None) or "options")
