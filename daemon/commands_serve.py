"""`onlinespec serve`: run the daemon until SIGTERM/SIGINT (drain, commit, exit 0)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from daemon.config import ConfigError, load_settings

log = logging.getLogger(__name__)

# flag -> settings key; every flag left out keeps the value from the file or the environment
OVERRIDES = {
    "bootstrap_servers": "kafka.bootstrap_servers",
    "prompts_topic": "kafka.prompts_topic",
    "completions_topic": "kafka.completions_topic",
    "dlq_topic": "kafka.dlq_topic",
    "group_id": "kafka.group_id",
    "database_url": "database.url",
    "target": "models.target",
    "draft": "models.draft",
    "device": "models.device",
    "metrics_port": "daemon.metrics_port",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="consume prompts from Kafka and publish completions (the daemon)")
    add_settings_arguments(parser)
    parser.add_argument("--target", help="target model: HF folder or .gguf file")
    parser.add_argument("--draft", help="draft model sharing the target's vocabulary")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, 0 disables")
    parser.add_argument("--auto-migrate", action="store_true", help="upgrade the database schema to head first")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    parser.set_defaults(func=run)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (default: built-in defaults)")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,host:port]")
    parser.add_argument("--prompts-topic")
    parser.add_argument("--completions-topic")
    parser.add_argument("--dlq-topic")
    parser.add_argument("--group-id")
    parser.add_argument("--database-url", help="SQLAlchemy URL (prefer ONLINESPEC_DATABASE_URL for secrets)")


def settings_from_args(args: argparse.Namespace):
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if hasattr(args, flag)}
    if getattr(args, "auto_migrate", False):
        overrides["database.auto_migrate"] = True
    return load_settings(args.config, overrides)


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
    _configure_logging(settings.daemon.log_level)
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


def _configure_logging(level: str) -> None:
    logging.getLogger().setLevel(level)
    # kafka-python logs every connection attempt, alembic every plugin and APScheduler every job run at INFO;
    # warnings are what matter here.
    for noisy in ("kafka", "alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
