"""Engine and session factories. Nothing here runs at import time: the daemon, the CLI and tests each build
their own engine from a URL.

    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    with session_factory.begin() as session:   # one unit of work; commits on success, rolls back on error
        ...

SQLite is the embedded default, PostgreSQL (psycopg 3) the multi-worker one. `postgresql://` URLs are mapped to
the psycopg 3 driver because SQLAlchemy would otherwise pick psycopg2, which we do not ship.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import DatabaseNotFoundError, DatabaseURLError

ENV_DATABASE_URL = "ONLINESPEC_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///var/onlinespec.db"  # relative to the working directory
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another writer's lock before failing
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
URL_FORMS = "use sqlite:///PATH (a file) or postgresql+psycopg://USER@HOST:PORT/DATABASE"


def resolve_database_url(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The URL to use: an explicit one (flag or config), else $ONLINESPEC_DATABASE_URL, else the SQLite default."""
    environ = os.environ if environ is None else environ
    return explicit or environ.get(ENV_DATABASE_URL) or DEFAULT_DATABASE_URL


def normalize_url(url: str | URL) -> URL:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def masked(url: str | URL) -> str:
    """The URL as it may appear in logs and error messages."""
    return make_url(url).render_as_string(hide_password=True)


def display_url(url: str | URL) -> str:
    """masked(url), also for a URL that does not parse (its would-be password is hidden all the same)."""
    try:
        return masked(url)
    except ArgumentError:
        return _without_password(str(url))


def check_url(url: str | URL) -> URL:
    """The parsed URL of a backend we support (SQLite or PostgreSQL); DatabaseURLError says what is wrong."""
    try:
        parsed = normalize_url(url)
    except ArgumentError:
        raise DatabaseURLError(f"invalid database URL {display_url(url)!r}: {URL_FORMS}") from None
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise DatabaseURLError(
            f"unsupported database backend {parsed.get_backend_name()!r} in {masked(parsed)}: {URL_FORMS}"
        )
    return parsed


def make_engine(url: str | URL, *, must_exist: bool = False, **engine_options: Any) -> Engine:
    """Build an engine for SQLite (file) or PostgreSQL. A SQLite file and its folder are created on first use,
    unless `must_exist` (read-only commands): then a missing file is DatabaseNotFoundError and nothing is made."""
    parsed = check_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _make_sqlite_engine(parsed, engine_options, must_exist)
    # pre_ping: after a PostgreSQL restart the first checkout fails over to a fresh connection instead of
    # handing the worker a dead one.
    engine_options.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **engine_options)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows returned from a unit of work stay readable after it commits (the worker
    # reads stored completions after the transaction that fetched them has ended).
    return sessionmaker(bind=engine, expire_on_commit=False)


def _make_sqlite_engine(url: URL, engine_options: dict[str, Any], must_exist: bool) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        if must_exist and not Path(database).is_file():
            raise DatabaseNotFoundError(f"no SQLite database at {database} (`onlinespec db upgrade` creates one)")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = engine_options.pop("connect_args", {})
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = create_engine(url, connect_args=connect_args, **engine_options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Take BEGIN away from the sqlite3 module: its legacy mode starts transactions only before DML, which
        # breaks transactional DDL (a half-applied migration) and savepoints. We emit BEGIN in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite; our foreign keys are real
        # WAL: readers (the learner) never block the writer (the worker) and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def _without_password(url: str) -> str:
    """An unparseable URL may still hold a password between `user:` and `@`: never echo it."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def dialect_insert(session: Session, model):
    """An INSERT that supports ON CONFLICT DO NOTHING on the session's backend (SQLite or PostgreSQL)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"unsupported database backend {name!r}: use SQLite or PostgreSQL")
    return insert(model)
