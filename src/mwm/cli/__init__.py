"""The ``mwm`` command line: parsing and printing only; the work is in the library.

Every command's flags are generated from its config dataclass (:mod:`mwm.cli.flags`), the
commands are listed once in :data:`mwm.cli.commands.COMMANDS`, and every command accepts
``--config FILE.yaml`` (values for its flags; flags win), uses the same flag names for the
same settings (``--out``, ``--seed``, ``--quiet``, ``--device``, ``--workers`` ...) and
writes ``run_manifest.json`` into its output folder. Every command also takes the options
of :class:`mwm.runtime.RunOptions` (``--threads``, ``--overwrite``). Process-wide settings
(threads, denormals) are made here, once, before a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import DataError
from .commands import COMMANDS, EXIT_USAGE, Command
from ..runtime import RunOptions
from .flags import add_flags, add_option_flags, config_defaults, config_from_args

__all__ = ["build_parser", "main", "parse_args"]

BY_NAME = {c.name: c for c in COMMANDS}
DESCRIPTION = ("Mask What Matters: text-guided masked image modeling for medical imaging. "
               "Run `mwm demo` for the whole pipeline on synthetic data.")
#: The commands that train: they flush denormals (the others ran without it before, and
#: their outputs stay bit for bit what they were). Every command sets its threads.
TRAINING = ("clip train", "pretrain", "finetune", "detect", "experiment", "demo")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; the flags only of ``command`` (the one being run), so
    that listing the commands imports no config module."""
    parser = argparse.ArgumentParser(prog="mwm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mwm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        group, _, action = cmd.name.partition(" ")
        if action:  # "clip train": the group "clip" with the action "train"
            if group not in groups:
                parent = sub.add_parser(group, help=f"{cmd.help} (`mwm {cmd.name} ...`)")
                groups[group] = parent.add_subparsers(dest="action", metavar="ACTION")
            p = _command_parser(groups[group], action, cmd)
        else:
            p = _command_parser(sub, cmd.name, cmd)
        if cmd.name == command:
            add_flags(p, cmd.config_class())
            add_option_flags(p, RunOptions)
    return parser


def _command_parser(sub, name: str, cmd: Command) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
    p.set_defaults(command_name=cmd.name)
    return p


def _requested(argv: Sequence[str]) -> str | None:
    """The command ``argv`` asks for (its first words that name one)."""
    words = [a for a in argv if not a.startswith("-")]
    for length in (2, 1):
        name = " ".join(words[:length])
        if name in BY_NAME:
            return name
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file supplies values that flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _requested(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        _command_subparser(parser, command).set_defaults(**config_defaults(
            _command_subparser(parser, command), args.config))
        args = parser.parse_args(argv)
    return args


def _command_subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for word in name.split(" "):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except DataError as err:
        print(f"mwm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    name = getattr(args, "command_name", None)
    if name is None:
        build_parser().print_help()
        return EXIT_USAGE
    cmd = BY_NAME[name]
    try:
        cfg = config_from_args(cmd.config_class(), args)
        opts = config_from_args(RunOptions, args)
        from ..runtime import configure_process

        configure_process(threads=opts.threads, flush_denormal=name in TRAINING)
        return cmd.run(cfg, opts)
    except DataError as err:
        print(f"mwm {name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mwm {name}: interrupted; outputs written so far are complete and a re-run "
              "resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
