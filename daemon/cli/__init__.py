"""The `onlinespec` command line. Each command group lives in its own module exposing `register(subparsers)`;
options shared by several commands are in daemon.cli.options."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

DESCRIPTION = (
    "OnlineSpec: a Kafka daemon that serves prompts with lossless speculative decoding and trains its draft "
    "online. Run `onlinespec COMMAND --help` for a command's options."
)

# One module per command group; each defines register(subparsers) and sets a `func` default taking the args.
COMMAND_MODULES = [
    "daemon.cli.generate",
    "daemon.cli.serve",
    "daemon.cli.submit",
    "daemon.cli.demo",
    "daemon.cli.db",
    "daemon.cli.checkpoints",
    "daemon.cli.rounds",
]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onlinespec", description=DESCRIPTION)
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO; for `serve` it overrides "
                             "daemon.log_level of the config)")  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level or "INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
