"""Options shared by several commands, defined once, and the helpers that read them.

    add_config_option      --config
    add_kafka_options      --bootstrap-servers, --prompts-topic, --completions-topic, --dlq-topic
    add_database_options   --database-url (and --config)
    add_deployment_options --deployment, --json (and the database options)

Where a value comes from: the flag, else --config (whose values the environment overrides, see daemon.config),
else the environment, else the built-in default.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

# flag (argparse dest) -> settings key; a flag left out keeps the value from the file or the environment
SETTINGS_FLAGS = {
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
    "log_level": "daemon.log_level",
}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (default: built-in defaults)")


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,host:port]")
    parser.add_argument("--prompts-topic")
    parser.add_argument("--completions-topic")
    parser.add_argument("--dlq-topic")


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: from --config or $ONLINESPEC_DATABASE_URL)")
    add_config_option(parser)


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    add_database_options(parser)
    parser.add_argument("--deployment", help="deployment name (default: learning.deployment, else `default`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def settings_from_args(args: argparse.Namespace):
    """The daemon's Settings: --config, the environment, then every settings flag the command has and was given."""
    from daemon.config import load_settings

    overrides = {key: getattr(args, flag) for flag, key in SETTINGS_FLAGS.items() if hasattr(args, flag)}
    if getattr(args, "auto_migrate", False):
        overrides["database.auto_migrate"] = True
    return load_settings(getattr(args, "config", None), overrides)


def database_url(args: argparse.Namespace) -> str:
    """--database-url, else database.url of --config (the environment overriding the file), else the
    environment, else the default SQLite file."""
    if getattr(args, "database_url", None):
        return args.database_url
    if getattr(args, "config", None):
        from daemon.config import load_settings

        return load_settings(args.config).database.url.get_secret_value()
    from storage.db import resolve_database_url

    return resolve_database_url()


def deployment_of(args: argparse.Namespace) -> str:
    if getattr(args, "deployment", None):
        return args.deployment
    if getattr(args, "config", None):
        from daemon.config import load_settings

        return load_settings(args.config).learning.deployment
    from storage.models import DEFAULT_DEPLOYMENT

    return DEFAULT_DEPLOYMENT


@contextmanager
def session_scope(args: argparse.Namespace):
    """One unit of work on a database whose schema is at head."""
    from storage.db import make_engine, make_session_factory
    from storage.migrate import assert_at_head

    engine = make_engine(database_url(args))
    try:
        assert_at_head(engine)
        with make_session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
