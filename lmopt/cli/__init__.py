"""The ``lmopt`` command. Each subcommand lives in its own module here and is listed in ``SUBCOMMANDS``.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.

Every expected failure (a bad argument, a file that cannot be read or written, a checkpoint that cannot be used,
an impossible configuration) prints one line, ``lmopt <command>: error: <what is wrong>``, on stderr and exits
with status 2; never a traceback. ``LMOPT_TRACEBACK=1`` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

__all__ = ["main", "SUBCOMMANDS"]

SUBCOMMANDS: tuple[str, ...] = (
    "lmopt.cli.list_cmd",
    "lmopt.cli.compare_cmd",
    "lmopt.cli.tune_cmd",
    "lmopt.cli.schedule_cmd",
    "lmopt.cli.recipe_cmd",
    "lmopt.cli.plan_cmd",
    "lmopt.cli.recommend_cmd",
    "lmopt.cli.checkpoint_cmd",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (the subparsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or "(no message)"


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmopt", description="Optimizers, schedules and memory planning for LLMs")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"lmopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed: a status, as from run()
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as err:  # bad input, files: no traceback
        print(f"lmopt {args.command}: error: {_one_line(_describe(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("LMOPT_TRACEBACK"):
            raise
        print(
            f"lmopt {args.command}: internal error: {type(err).__name__}: {_one_line(_describe(err))} "
            f"(LMOPT_TRACEBACK=1 shows the traceback; please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
