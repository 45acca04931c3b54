"""The ``rankstream`` command line. Each subcommand lives in its own module, which
exposes ``register(subparsers)``; the parser it adds sets ``func`` to its handler."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# One module per subcommand group; the order is the order of `rankstream --help`.
COMMAND_MODULES = [
    "rayjobs.demo",
    "rayjobs.cluster",
    "rayjobs.broker",
    "rayjobs.serve",
    "rayjobs.produce",
    "rayjobs.prepare",
    "rayjobs.synth",
    "rayjobs.train",
    "rayjobs.train_gibbs",
    "rayjobs.tune",
    "rayjobs.bench",
    "rayjobs.experiment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankstream",
        description="Distributed streaming CTR scoring with field-weighted factorization machines on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, PermissionError, TimeoutError) as error:
        # Users get one clear line, not a traceback, for bad paths, bad arguments and waits that ran out.
        print(f"rankstream {args.command}: error: {error}", file=sys.stderr)
        return 2


def run_module(command: list[str]) -> NoReturn:
    """``python -m rayjobs.<module> ARGS`` runs ``rankstream <command> ARGS``: the form Ray
    job entrypoints use, with the same parser and error handling."""
    sys.exit(main([*command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
