"""Command-line options for config dataclasses: an option per field (`--steps`,
`--model-channels`), help from the class docstrings, and the config built from its defaults,
a `--config` file and the options, every value checked by `isomod.config.from_dict`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from isomod.config import field_types, from_dict, is_config, merge
from isomod.errors import IsomodError


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
