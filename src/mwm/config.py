"""Typed configuration: dataclass fields are the one source of defaults.

Every setting a user can choose is a field of a config dataclass, declared with
:func:`opt`: its default, a help text and, where it has one, a range. The command line
is generated from those fields (:mod:`mwm.cli.flags`): a field ``input_size`` is the flag
``--input-size`` and the YAML key ``input_size`` (or ``input-size``) of ``--config FILE``;
``bool`` fields that default to True become ``--no-<name>`` flags, and those that default
to None (``bool | None``: "not given") both ``--<name>`` and ``--no-<name>``. YAML files
are read by :func:`load_yaml`; an unknown key is an error that names the file and lists
the keys the command accepts, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import DataError


def opt(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
        flag: str | None = None, positional: bool = False,
        choices: Sequence | None = None,
        parse: Callable[[str], Any] | None = None, nargs: int | str | None = None,
        metavar: str | None = None, cli: bool = True, low: float | None = None,
        high: float | None = None, above: float | None = None, flatten: bool = False) -> Any:
    """A dataclass field with the metadata the command line and the checks read.

    ``flag``: the flag (and YAML key) when it is not the field name; ``positional``: a
    positional argument; ``choices``: allowed values (a
    :class:`~mwm.registry.LazyChoices` reads a registry only when used); ``parse``: the
    flag's type; ``cli=False``: not a flag;
    ``low``/``high``: an inclusive range, ``above``: an exclusive lower bound (checked by
    :func:`check_ranges`; None values are always allowed); ``flatten``: a field holding
    another config dataclass whose fields are flags of this one.
    """
    metadata = {"help": help, "flag": flag, "positional": positional, "choices": choices,
                "parse": parse, "nargs": nargs, "metavar": metavar, "cli": cli,
                "low": low, "high": high, "above": above, "flatten": flatten}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of the config dataclass ``cls``."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING \
        else f.default


def flag_name(f: dataclasses.Field) -> str:
    """The flag / YAML key of a field, with underscores (``input_size``, ``m2ib_lr``)."""
    return (f.metadata.get("flag") or f.name).replace("-", "_")


def check_ranges(config: Any) -> None:
    """Raise :class:`DataError` for a field outside its declared range or choices."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        if value is None or isinstance(value, bool):
            continue
        name = "--" + flag_name(f).replace("_", "-")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise DataError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
        if low is None and high is None and above is None:
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (low is not None and value < low) or (high is not None and value > high) \
                or (above is not None and value <= above):
            lower = f"({above}" if above is not None else f"[{low}" if low is not None else None
            if lower is not None and high is not None:
                bounds = f"in {lower}, {high}]"
            elif lower is not None:
                bounds = f"> {above}" if above is not None else f">= {low}"
            else:
                bounds = f"<= {high}"
            raise DataError(f"{name} must be a number {bounds}, got {value!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping with keys normalized to underscores; a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({err}).") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of option names to values.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
