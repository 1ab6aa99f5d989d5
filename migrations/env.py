"""Alembic environment. Runs on a connection handed over by storage.migrate (the normal path), or builds an
engine from $ONLINESPEC_DATABASE_URL when the alembic CLI is used directly (developers writing revisions)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from storage.db import make_engine, resolve_database_url
from storage.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def configure(**options) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead. Harmless on PostgreSQL.
        render_as_batch=True,
        **options,
    )


def run_migrations_offline() -> None:
    configure(url=resolve_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(resolve_database_url())
    try:
        with engine.begin() as connection:
            configure(connection=connection)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
