"""Options shared by several commands, defined once, and the helpers that read them.

    add_config_option      --config
    add_kafka_options      --bootstrap-servers, --prompts-topic, --completions-topic, --dlq-topic [--group-id]
    add_database_options   --database-url (and --config)
    add_deployment_options --deployment, --json (and the database options)
    configure_logging      the root level (--log-level, or daemon.log_level for `serve`); libraries at WARNING
    session_scope          one unit of work on an existing database at the schema head

Where a value comes from: the flag, else --config (whose values the environment overrides, see daemon.config),
else the environment, else the built-in default.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Libraries that log every connection attempt (kafka), plugin load (alembic) or job run (apscheduler) at INFO:
# their warnings are what an operator needs.
NOISY_LOGGERS = ("kafka", "alembic", "apscheduler")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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


KAFKA_TOPIC_FLAGS = {
    "prompts": "topic of prompt records (default kafka.prompts_topic)",
    "completions": "topic of completions (default kafka.completions_topic)",
    "dlq": "topic of rejected records (default kafka.dlq_topic)",
}


def add_kafka_options(
    parser: argparse.ArgumentParser, topics: tuple[str, ...] = tuple(KAFKA_TOPIC_FLAGS), group: bool = False
) -> None:
    """--bootstrap-servers, a --TOPIC-topic flag per topic the command uses, and --group-id when it reads the
    daemons' consumer group."""
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,host:port]")
    for topic in topics:
        parser.add_argument(f"--{topic}-topic", help=KAFKA_TOPIC_FLAGS[topic])
    if group:
        parser.add_argument("--group-id", help="consumer group shared by the daemons (default kafka.group_id)")


def add_database_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (default: from --config, else $ONLINESPEC_DATABASE_URL; prefer the variable for secrets)",
    )


def add_database_options(parser: argparse.ArgumentParser) -> None:
    add_database_url_option(parser)
    add_config_option(parser)


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    add_database_options(parser)
    parser.add_argument("--deployment", help="deployment name (default: learning.deployment, else `default`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


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


def configure_logging(level: str, libraries: int = logging.WARNING) -> None:
    """Log lines to stderr at `level`; the noisy libraries at `libraries` whatever the level."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(libraries)


@contextmanager
def database_errors(url: str):
    """A database that cannot be reached or read is an operator error naming it (its password masked)."""
    from sqlalchemy.exc import OperationalError

    from daemon.cli.errors import CommandError, first_line
    from storage.db import masked

    try:
        yield
    except OperationalError as exc:
        raise CommandError(f"database {masked(url)}: {first_line(exc.orig or exc)}") from None


@contextmanager
def session_scope(args: argparse.Namespace):
    """One unit of work on an existing database whose schema is at head (a missing SQLite file is an error,
    never created here)."""
    from storage.db import make_engine, make_session_factory
    from storage.migrate import assert_at_head

    url = database_url(args)
    with database_errors(url):
        engine = make_engine(url, must_exist=True)
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
