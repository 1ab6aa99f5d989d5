"""Alembic, driven from code: the CLI (`onlinespec db upgrade | current`), tests and the daemon's start-up check.

The migration scripts live in the `migrations` package and are found next to its `__init__.py`, so they work
from an installed wheel whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine

import migrations
from storage.db import make_engine, masked
from storage.errors import SchemaNotAtHeadError

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic config for our scripts; with `connection`, migrations run on it (inside its transaction)."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Programmatic runs keep the caller's logging setup (alembic.ini's [loggers] are for the alembic CLI).
    config.attributes["configure_logging"] = False
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this code expects (the chain is linear: exactly one head)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(url: str | URL, revision: str = "head") -> None:
    _run(url, command.upgrade, revision)


def downgrade(url: str | URL, revision: str) -> None:
    _run(url, command.downgrade, revision)


def upgrade_to_head(url: str | URL) -> None:
    """Create or upgrade the schema, all steps in one transaction (both SQLite and PostgreSQL have
    transactional DDL, so a failing step leaves the database as it was)."""
    upgrade(url, "head")


def current_revision(url: str | URL, *, must_exist: bool = False) -> str | None:
    """The database's revision, or None for an empty (never migrated) database. With `must_exist`, a missing
    SQLite file is DatabaseNotFoundError instead of an empty database created on the spot."""
    engine = make_engine(url, must_exist=must_exist)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def assert_at_head(engine: Engine) -> None:
    """Refuse to run against a schema this code was not written for; the message says how to fix it."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    head = head_revision()
    if current == head:
        return
    url = masked(engine.url)
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise SchemaNotAtHeadError(
            f"database {url} is at schema revision {current}, which this version of onlinespec does not know "
            f"(expects {head}); a newer onlinespec migrated it: run that version, or downgrade with it"
        )
    state = "empty (no schema)" if current is None else f"at schema revision {current}"
    password_hint = " (put the real password where *** is shown)" if engine.url.password else ""
    raise SchemaNotAtHeadError(
        f"database {url} is {state}, but this version of onlinespec needs revision {head}; "
        f"run `onlinespec db upgrade --database-url {url}`{password_hint}"
    )


def _run(url: str | URL, step, revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            step(alembic_config(connection), revision)
    finally:
        engine.dispose()
