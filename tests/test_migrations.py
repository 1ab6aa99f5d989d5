"""Alembic: empty -> head -> base -> head on SQLite and PostgreSQL, one linear chain, no drift between the
models and the migrations, the start-up check's message, and the `onlinespec db` / `feedback prune` commands."""

from __future__ import annotations

import json
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect, make_url

from storage import migrate
from storage.db import ENV_DATABASE_URL, make_engine
from storage.errors import SchemaNotAtHeadError
from storage.models import Base

REPO = Path(__file__).resolve().parent.parent
TABLES = {t.name for t in Base.metadata.sorted_tables}


def table_names(url) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_empty_to_head_to_base_to_head(empty_db_url):
    assert migrate.current_revision(empty_db_url) is None
    migrate.upgrade_to_head(empty_db_url)
    assert migrate.current_revision(empty_db_url) == migrate.head_revision()
    assert table_names(empty_db_url) == TABLES
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current_revision(empty_db_url) is None
    assert table_names(empty_db_url) == set()
    migrate.upgrade_to_head(empty_db_url)
    assert table_names(empty_db_url) == TABLES
    migrate.upgrade_to_head(empty_db_url)  # at head already: nothing to do


def test_one_linear_chain():
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    revisions = list(scripts.walk_revisions())  # head first
    assert len(scripts.get_heads()) == 1 and len(scripts.get_bases()) == 1
    for newer, older in zip(revisions, revisions[1:], strict=False):
        assert newer.down_revision == older.revision
    assert revisions[-1].down_revision is None
    for script in revisions:
        assert Path(script.path).name.startswith(f"{script.revision}_"), script.path


def test_models_and_migrations_do_not_drift(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            # The comparison is live: a column the migrations lack is reported.
            drifted = MetaData(naming_convention=Base.metadata.naming_convention)
            for table in Base.metadata.sorted_tables:
                table.to_metadata(drifted)
            drifted.tables["feedback"].append_column(Column("extra", Integer, nullable=True))
            assert [diff[0] for diff in compare_metadata(context, drifted)] == ["add_column"]
    finally:
        engine.dispose()


def test_daemon_refuses_a_schema_not_at_head(empty_db_url):
    engine = make_engine(empty_db_url)
    try:
        expected = r"empty \(no schema\).*run `onlinespec db upgrade --database-url "
        with pytest.raises(SchemaNotAtHeadError, match=expected):
            migrate.assert_at_head(engine)
        migrate.upgrade_to_head(empty_db_url)
        migrate.assert_at_head(engine)
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        with pytest.raises(SchemaNotAtHeadError, match="revision 9999, which this version of onlinespec does not know"):
            migrate.assert_at_head(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_password_is_masked_in_the_message(postgres_databases):
    # The local server trusts every connection, so any password is accepted - and must not be printed.
    url = make_url(postgres_databases.create()).set(password="s3cret")
    engine = make_engine(url)
    try:
        with pytest.raises(SchemaNotAtHeadError) as failure:
            migrate.assert_at_head(engine)
    finally:
        engine.dispose()
    assert "s3cret" not in str(failure.value)
    assert ":***@" in str(failure.value) and "put the real password where *** is shown" in str(failure.value)


def test_migrations_ship_with_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"storage", "migrations", "migrations.versions"} <= set(project["tool"]["setuptools"]["packages"])
    assert {"*.ini", "*.mako"} <= set(project["tool"]["setuptools"]["package-data"]["migrations"])
    assert migrate.MIGRATIONS_DIR == (REPO / "migrations").resolve()


# ---------------------------------------------------------------------------------------------- commands


def cli(*argv) -> int:
    from daemon.cli import main

    return main(list(argv))


def test_db_upgrade_and_current_commands(empty_db_url, capsys):
    assert cli("db", "current", "--database-url", empty_db_url, "--check") == 1
    out, err = capsys.readouterr()
    if empty_db_url.startswith("sqlite"):  # no file yet: `db current` reports it and creates nothing
        assert "no SQLite database at" in err and not Path(empty_db_url.removeprefix("sqlite:///")).exists()
    else:
        assert "empty (head is" in out
    assert cli("db", "upgrade", "--database-url", empty_db_url) == 0
    assert f"schema empty -> {migrate.head_revision()}" in capsys.readouterr().out
    assert cli("db", "current", "--database-url", empty_db_url, "--check") == 0
    assert f"{migrate.head_revision()} (head)" in capsys.readouterr().out


def test_database_url_from_environment_then_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # also proves the scripts are found without the repo as working directory
    monkeypatch.setenv(ENV_DATABASE_URL, f"sqlite:///{tmp_path / 'from-env.db'}")
    assert cli("db", "upgrade") == 0
    assert (tmp_path / "from-env.db").exists()
    monkeypatch.delenv(ENV_DATABASE_URL)
    assert cli("db", "upgrade") == 0
    assert (tmp_path / "var" / "onlinespec.db").exists()  # the default, parent folder created
    assert "sqlite:///var/onlinespec.db" in capsys.readouterr().out


def test_database_url_from_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATABASE_URL, raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'from-config.db'}\n")
    assert cli("db", "upgrade", "--config", str(config)) == 0
    assert migrate.current_revision(f"sqlite:///{tmp_path / 'from-config.db'}") == migrate.head_revision()


def test_feedback_prune_command(db_url, db_session_factory, capsys):
    from storage.models import utcnow
    from storage.requests_repo import CompletedRequest, record_request_received, store_results
    from tests.storage_fixtures import make_result

    with db_session_factory.begin() as session:
        for i, age in enumerate([timedelta(days=9), timedelta(days=8), timedelta(hours=2)]):
            result = make_result(f"r{i}", seed=i)
            record_request_received(session, result.id, "prompts", 0, i, {}, 5)
            store_results(
                session,
                [CompletedRequest(result, json.dumps({"id": result.id}))],
                target_identity="t",
                completed_at=utcnow() - age,
            )
    assert cli("feedback", "prune", "--older-than", "7d", "--database-url", db_url) == 0
    assert "deleted 2 feedback rows older than 7 days" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli("feedback", "prune", "--older-than", "a week", "--database-url", db_url)
