"""`onlinespec serve`: run the daemon until SIGTERM/SIGINT (drain, commit, exit 0)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from daemon.cli.options import (
    add_config_option,
    add_database_url_option,
    add_kafka_options,
    configure_logging,
    settings_from_args,
)
from daemon.config import ConfigError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="consume prompts from Kafka and publish completions (the daemon)")
    add_config_option(parser)
    add_kafka_options(parser, group=True)
    add_database_url_option(parser)
    parser.add_argument("--target", help="target model: HF folder or .gguf file")
    parser.add_argument("--draft", help="draft model sharing the target's vocabulary")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, 0 disables")
    parser.add_argument("--auto-migrate", action="store_true", help="upgrade the database schema to head first")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.service import StartupError, build_worker

    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.resolved(), indent=2))
        return 0
    configure_logging(settings.daemon.log_level)  # --log-level, when given, is daemon.log_level (SETTINGS_FLAGS)
    log.info("settings: %s", json.dumps(settings.resolved(), sort_keys=True))
    try:
        worker = build_worker(settings)
    except StartupError as exc:
        log.error("%s", exc)
        return exc.exit_code
    signal.signal(signal.SIGTERM, worker.handle_signal)
    signal.signal(signal.SIGINT, worker.handle_signal)
    code = worker.run()
    if not worker.join_abandoned(1.0):
        # A decode abandoned at the end of the grace period is still inside the engine; interpreter shutdown
        # under a running torch thread can abort, so leave at once (everything is committed or redelivered).
        logging.shutdown()
        os._exit(code)
    return code
