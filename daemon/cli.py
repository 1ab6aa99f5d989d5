"""The `onlinespec` command line. Each command group lives in its own module exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# One module per command group; each defines register(subparsers) and sets a `func` default taking the args.
COMMAND_MODULES = [
    "daemon.commands_generate",
    "daemon.commands_serve",
    "daemon.commands_submit",
    "daemon.commands_demo",
    "daemon.commands_db",
    "daemon.commands_checkpoints",
    "daemon.commands_rounds",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onlinespec", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
