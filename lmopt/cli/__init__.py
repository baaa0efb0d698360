"""The ``lmopt`` command. Each subcommand lives in its own module here and is listed in ``SUBCOMMANDS``.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "SUBCOMMANDS"]

SUBCOMMANDS: tuple[str, ...] = (
    "lmopt.cli.list_cmd",
    "lmopt.cli.compare_cmd",
    "lmopt.cli.schedule_cmd",
    "lmopt.cli.recipe_cmd",
    "lmopt.cli.plan_cmd",
    "lmopt.cli.recommend_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmopt", description="Optimizers, schedules and memory planning for LLMs")
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
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"lmopt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
