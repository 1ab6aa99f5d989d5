"""The `onlinespec` command line. Each command group lives in its own module exposing `register(subparsers)`;
options shared by several commands are in daemon.cli.options, operator errors in daemon.cli.errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from daemon.cli.errors import EXIT_USAGE, explain
from daemon.cli.options import LOG_LEVELS, configure_logging

log = logging.getLogger(__name__)

DESCRIPTION = (
    "OnlineSpec: a Kafka daemon that serves prompts with lossless speculative decoding and trains its draft "
    "online. Run `onlinespec COMMAND --help` for a command's options."
)

# One module per command group; each defines register(subparsers) and sets a `func` default taking the args.
COMMAND_MODULES = [
    "daemon.cli.serve",
    "daemon.cli.status",
    "daemon.cli.submit",
    "daemon.cli.generate",
    "daemon.cli.demo",
    "daemon.cli.db",
    "daemon.cli.checkpoints",
    "daemon.cli.rounds",
    "daemon.cli.draft",
]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that names the command and where to read more, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onlinespec", description=DESCRIPTION)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (default INFO; for `serve` it overrides daemon.log_level of the config)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" or not sys.stderr.isatty():
        # transformers draws tqdm bars while loading weights: in a log file they are noise. Set before it is
        # imported (it reads the variable once); an explicit setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # One-shot commands report a broker or database they cannot reach themselves, in one line: the libraries'
    # retry-by-retry lines only with DEBUG. `serve` sets its own levels from its settings.
    level = args.log_level or "INFO"
    configure_logging(level, libraries=logging.WARNING if level == "DEBUG" else logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        error = explain(exc)
        if error is None:
            raise
        log.debug("%s failed", args.command, exc_info=exc)  # --log-level DEBUG shows where it came from
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
