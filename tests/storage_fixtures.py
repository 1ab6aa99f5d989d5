"""Databases for storage tests: every test that takes `db_session_factory` runs on a SQLite file AND on the
local PostgreSQL server (a fresh `onlinespec_test_<uuid>` database per run, dropped at the end).

- db_backend          "sqlite" | "postgresql" (session-scoped parameter)
- db_url              a database migrated to head once per run and backend
- db_engine           an engine on it; every table is emptied before each test
- db_session_factory  sessionmaker on db_engine
- empty_db_url        a brand-new empty database per test (migration tests)

PostgreSQL: $ONLINESPEC_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test) names the
database used to create and drop the test databases. If the server is unreachable the PostgreSQL cases are
skipped with the reason, unless $ONLINESPEC_REQUIRE_POSTGRES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, make_url, text

from pipelines.types import (
    KIND_ACCEPTED,
    KIND_BONUS,
    KIND_RECOVERED,
    NO_DRAFT_TOKEN,
    GenerationResult,
    RequestCounters,
    RequestFeedback,
)

POSTGRES_ADMIN_URL = os.environ.get("ONLINESPEC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("ONLINESPEC_REQUIRE_POSTGRES") == "1"
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


class PostgresDatabases:
    """Creates uniquely named databases on the shared server and drops them (with their connections) later."""

    def __init__(self, admin_url: str):
        self.admin_url = make_url(admin_url)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def create(self) -> str:
        name = f"onlinespec_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as connection:
            for name in self.created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_databases():
    try:
        databases = PostgresDatabases(POSTGRES_ADMIN_URL)
        with databases.admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # the reason is shown in the skip/failure line
        reason = f"PostgreSQL at {make_url(POSTGRES_ADMIN_URL).render_as_string()} is unreachable: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    yield databases
    databases.drop_all()


def new_database_url(backend: str, request, directory: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory / f'onlinespec-{uuid.uuid4().hex[:8]}.db'}"
    return request.getfixturevalue("postgres_databases").create()


@pytest.fixture(scope="session", params=BACKENDS)
def db_backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def db_url(db_backend, request, tmp_path_factory) -> str:
    from storage.migrate import upgrade_to_head

    url = new_database_url(db_backend, request, tmp_path_factory.mktemp("db"))
    upgrade_to_head(url)
    return url


@pytest.fixture(scope="session")
def _shared_db_engine(db_url):
    from storage.db import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_engine(_shared_db_engine):
    """The run's engine, with every table emptied first (ids restart at 1)."""
    from storage.models import Base

    tables = list(reversed(Base.metadata.sorted_tables))
    with _shared_db_engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"TRUNCATE {', '.join(t.name for t in tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                connection.execute(table.delete())
    return _shared_db_engine


@pytest.fixture
def db_session_factory(db_engine):
    from storage.db import make_session_factory

    return make_session_factory(db_engine)


@pytest.fixture
def empty_db_url(db_backend, request, tmp_path) -> str:
    return new_database_url(db_backend, request, tmp_path)


# ---------------------------------------------------------------------------------------------- data


def make_feedback(n: int = 12, m: int = 4, prompt_len: int = 5, seed: int = 0, version: str = "base"):
    """Feedback shaped like the engine's, with values that exercise the full dtype ranges."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice([KIND_ACCEPTED, KIND_RECOVERED, KIND_BONUS], size=n).astype(np.uint8)
    draft_tokens = rng.integers(0, 150_000, size=n, dtype=np.int32)
    draft_tokens[kinds == KIND_BONUS] = NO_DRAFT_TOKEN
    return RequestFeedback(
        prompt_ids=rng.integers(0, 2**31 - 1, size=prompt_len, dtype=np.int32),
        token_ids=rng.integers(0, 150_000, size=n, dtype=np.int32),
        kinds=kinds,
        draft_tokens=draft_tokens,
        target_topk_ids=rng.integers(0, 150_000, size=(n, m), dtype=np.int32),
        target_topk_logprobs=np.sort(-rng.exponential(3.0, size=(n, m)), axis=1)[:, ::-1].astype(np.float16),
        draft_version=version,
    )


def make_result(request_id: str, n: int = 12, m: int = 4, seed: int = 0, version: str = "base") -> GenerationResult:
    feedback = make_feedback(n=n, m=m, seed=seed, version=version)
    accepted = int((feedback.kinds == KIND_ACCEPTED).sum())
    forwards = n - accepted
    counters = RequestCounters(
        draft_steps=forwards - 1,
        drafted=accepted + forwards - 1,
        accepted=accepted,
        target_forwards=forwards,
        emitted=n,
        accepted_at_position=[accepted, 0, 0],
    )
    return GenerationResult(
        id=request_id,
        token_ids=feedback.token_ids.tolist(),
        text=f"text of {request_id}",
        finish_reason="length",
        counters=counters,
        feedback=feedback,
        seconds=0.25,
    )
