"""Settings as dataclasses whose fields name their command-line flags, for every `draftfeed` command
(the trainer's `TrainConfig` / `EvalConfig` in trainer/config.py, the server's `ServeConfig` in
server/config.py).

Sources, later ones winning: the dataclass defaults, a YAML file (sections as nested mappings), values
the command computes (`extra`: e.g. torchrun's ranks), then command-line flags. Each field that has a
flag names it, and its help text, with `flag(...)`; `add_flags` builds a parser from the dataclasses
and `build_config` merges the sources into one validated config (the dataclass's `__post_init__`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

__all__ = ["ConfigError", "flag", "add_flags", "build_config", "config_from_dict", "config_to_dict"]

_SWITCHES = ("store_true", "store_false")


class ConfigError(InvalidArgument, ValueError):
    """A setting is invalid; the message names the flag / key, the value and what is expected."""


def flag(
    name: str | None,
    help: str,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    action: str | None = None,
    type: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    off: tuple[str, str] | None = None,
) -> Any:
    """A dataclass field with its command-line flag (None: YAML only) and help text.

    By default the field's type picks the option: a bool gets `--x/--no-x`, a list comma-separated
    values, int and float their own parsers. `action`: "store_true" / "store_false" (a switch named
    `name`, e.g. `--no-cuda-graphs` for a field that defaults to True) or "append" (repeatable);
    `type`: the parser of one value; `off`: (flag, help) of a second spelling that sets the field to
    None (e.g. `--no-data-plane`)."""
    meta = {"flag": name, "help": help}
    for key, value in (("action", action), ("type", type), ("metavar", metavar), ("off", off)):
        if value is not None:
            meta[key] = value
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _base_type(tp):
    """int for `int | None`, list for `list[int]`, ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _item_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return _item_type(args[0])
    inner = typing.get_args(tp)
    return inner[0] if inner else str


def _list_parser(item):
    def parse(text: str):
        return [item(x) for x in text.split(",") if x.strip()]

    return parse


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", only: set[str] | None = None) -> None:
    """One option per field that names a flag (nested sections recursively); dest = dotted path;
    `only`: just the fields of these dotted paths. The help text is the field's, plus its default.

    Defaults are SUPPRESS, so the namespace holds only the flags the user gave."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if _is_section(tp):
            add_flags(parser, tp, path + ".", only)
            continue
        name = f.metadata.get("flag")
        if not name or (only is not None and path not in only):
            continue
        action = f.metadata.get("action")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None and action not in _SWITCHES:
            help_text += f" (default {f.default})"
        base = _base_type(tp)
        kw = dict(dest=path, default=argparse.SUPPRESS, help=help_text)
        metavar = f.metadata.get("metavar")
        if action in _SWITCHES:
            parser.add_argument(name, action=action, **kw)
        elif base is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif action == "append":
            parser.add_argument(name, action="append", metavar=metavar or f.name.upper(), **kw)
        elif base is list:
            item_type = f.metadata.get("type") or _list_parser(_item_type(tp))
            parser.add_argument(name, type=item_type, metavar=metavar or "A,B,..", **kw)
        else:
            item_type = f.metadata.get("type") or (base if base in (int, float) else str)
            parser.add_argument(name, type=item_type, metavar=metavar or f.name.upper(), **kw)
        off = f.metadata.get("off")
        if off is not None:  # a second spelling that turns the setting off (stores None)
            off_name, off_help = off
            parser.add_argument(
                off_name,
                action="store_const",
                const=None,
                dest=path,
                default=argparse.SUPPRESS,
                help=off_help,
            )


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(cls, values: dict, where: str = ""):
    """Build `cls` from a nested mapping; unknown keys are an error that lists the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where or cls.__name__!r} must be a mapping, got {values!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        kwargs[name] = config_from_dict(tp, value, f"{where}{name}.") if _is_section(tp) else value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {err}") from err


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def build_config(cls, args: argparse.Namespace, yaml_path: str | None = None, extra: dict | None = None):
    """defaults <- YAML file <- `extra` (e.g. the positional algorithm, torchrun's ranks) <- flags."""
    values: dict = {}
    if yaml_path:
        import yaml

        path = Path(yaml_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {yaml_path!r}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"--config {yaml_path!r}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        values = loaded
    values = _merge(values, extra or {})
    flags: dict = {}
    for dest, value in vars(args).items():
        if "." in dest or dest in {f.name for f in dataclasses.fields(cls)}:
            _set(flags, dest, value)
    return config_from_dict(cls, _merge(values, flags))
