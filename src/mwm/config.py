"""Configuration: a YAML file supplies defaults, command-line flags override them.

Keys in the YAML file are the long flag names of the command, with dashes or
underscores (``input-size: 128`` or ``input_size: 128``). An unknown key is an error
that names the file and lists the keys the command accepts, so a typo never passes
silently.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError


def load_yaml(path: str | Path) -> dict[str, Any]:
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


def config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """Values from ``path`` checked against the options ``parser`` knows."""
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
        if action.choices is not None and value not in action.choices:
            raise DataError(f"{path}: {key} = {value!r} is not one of {list(action.choices)}.")
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                values[key] = action.type(value)
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: {key} = {value!r}: {err}") from err
    return values
