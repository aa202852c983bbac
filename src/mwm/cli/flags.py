"""Command-line flags generated from config dataclasses, and configs built from flags.

Each field declared with :func:`mwm.config.opt` becomes one flag: ``input_size`` →
``--input-size`` (type from the annotation, help, choices, ``nargs`` and ``metavar`` from
the metadata, the default from the field); a ``bool`` field is a switch (``--amp``, or
``--no-fill`` when it defaults to True), or both ``--standardize``/``--no-standardize``
when it defaults to None (not given); ``positional`` fields are positional arguments; a
field with ``flatten`` contributes the flags of its own dataclass (``mwm localize``'s M2IB
settings). ``--config FILE.yaml`` supplies values for any flag (keys = flag names, dashes or
underscores); flags on the command line win. Required settings may come from either, so
they are checked when the config is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from ..config import check_ranges, flag_name, load_yaml
from ..errors import DataError


@dataclasses.dataclass(frozen=True)
class Flag:
    field: dataclasses.Field
    kind: Any  # the annotated type, without None

    @property
    def dest(self) -> str:
        return flag_name(self.field)

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING

    @property
    def label(self) -> str:
        """How an error names it: ``OUT`` for a positional, ``--out`` for a flag."""
        meta = self.field.metadata
        if meta.get("positional"):
            return str(meta.get("metavar") or self.dest.upper())
        return "--" + self.dest.replace("_", "-")


def _without_none(kind: Any) -> Any:
    """``X | None`` → ``X`` (other unions are left to the field's ``parse``)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def flags_of(cls: type) -> list[tuple[Flag, str | None]]:
    """The flags of a config class as (flag, parent field) — parent for flattened fields."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[Flag, str | None]] = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if f.metadata.get("flatten"):
            out.extend((flag, f.name) for flag, _ in flags_of(hints[f.name]))
        else:
            out.append((Flag(f, _without_none(hints[f.name])), None))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the flags of config class ``cls`` (and ``--config``, and ``--quiet`` if it lacks one)."""
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file with values for this command's flags (flags override it)")
    names = set()
    for flag, _ in flags_of(cls):
        _add(parser, flag)
        names.add(flag.dest)
    if "quiet" not in names:
        parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add only the flags of ``cls`` (options every command takes, beside its config's)."""
    for flag, _ in flags_of(cls):
        _add(parser, flag)


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    f, meta = flag.field, flag.field.metadata
    default = None if flag.required else (
        f.default if f.default is not MISSING else f.default_factory())
    text = (meta.get("help") or "").replace("%", "%%")  # argparse formats help with %
    option = "--" + flag.dest.replace("_", "-")
    if flag.kind is bool:
        if default is None:  # not given stays None, so the library can tell it from either value
            parser.add_argument(option, dest=flag.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        elif default:
            parser.add_argument("--no-" + option[2:], dest=flag.dest, action="store_false",
                                default=True, help=f"turn off: {text}" if text else None)
        else:
            parser.add_argument(option, dest=flag.dest, action="store_true", default=False,
                                help=text)
        return
    if default is not None and not isinstance(default, (tuple, list, dict)):
        text += f" (default: {default})"
    kwargs: dict[str, Any] = dict(default=default, help=text, choices=meta.get("choices"),
                                  type=meta.get("parse") or _scalar(flag.kind))
    if meta.get("nargs") is not None:
        kwargs["nargs"] = meta["nargs"]
    if meta.get("metavar") is not None:
        kwargs["metavar"] = meta["metavar"]
    if meta.get("positional"):
        kwargs.setdefault("nargs", "?")
        kwargs.setdefault("metavar", flag.dest.upper())
        parser.add_argument(flag.dest, **kwargs)
    else:
        parser.add_argument(option, dest=flag.dest, **kwargs)


def _scalar(kind: Any):
    for base in (bool, int, float, str):
        if kind is base:
            return base
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        return args[0] if args and args[0] in (int, float, str) else str
    return str


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of ``cls`` from the parsed flags; a missing required setting is a
    :class:`DataError` naming it."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if f.metadata.get("flatten"):
            values[f.name] = config_from_args(hints[f.name], args)
            continue
        flag = Flag(f, hints[f.name])
        value = getattr(args, flag.dest)
        if value is None and flag.required:
            raise DataError(f"missing {flag.label}: give it on the command line or in --config.")
        values[f.name] = tuple(value) if isinstance(value, list) else value
    config = cls(**values)
    check_ranges(config)  # also for configs that do not check themselves
    return config


def config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """Values from the YAML file ``path`` checked against the flags ``parser`` knows."""
    values = load_yaml(path)
    known = {action.dest: action for action in parser._actions
             if action.dest not in ("help", "config", "version", argparse.SUPPRESS)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(sorted(k.replace("_", "-") for k in known))
        raise DataError(f"{path}: unknown option(s) {', '.join(unknown)} for this command. "
                        f"Valid keys: {valid}.")
    for key, value in values.items():
        action = known[key]
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = values[key] = action.type(value)
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: {key} = {value!r}: {err}") from err
        if action.choices is not None and value not in action.choices:
            raise DataError(f"{path}: {key} = {value!r} is not one of {list(action.choices)}.")
    return values
