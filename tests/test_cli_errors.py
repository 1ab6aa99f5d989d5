"""Operator errors are one line `error: ...` on stderr and a non-zero exit, never a traceback; read-only commands
create nothing. In-process where the output is all the command's own, as subprocesses where library logging
could add lines too."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from daemon.cli import main as cli
from devtools.local_broker import free_port
from tests.daemon_fixtures import REPO


def one_line_error(capsys, *argv: str) -> str:
    """Run the command in-process; it must fail with exactly one line on stderr, starting with `error:`."""
    try:
        code = cli(list(argv))
    except SystemExit as exit_:  # argparse reports usage errors this way
        code = exit_.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code not in (0, None), (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_subprocess(*argv: str, cwd, env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "ONLINESPEC_DATABASE_URL"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.fixture
def no_schema_url(tmp_path) -> str:
    """A SQLite file that exists but was never migrated."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    return f"sqlite:///{path}"


def test_a_missing_checkpoint_and_base_are_one_line_errors(capsys, sqlite_url):
    assert "no draft checkpoint 999" in one_line_error(
        capsys, "checkpoints", "show", "999", "--database-url", sqlite_url
    )
    assert "no draft checkpoint 'v9'" in one_line_error(
        capsys, "checkpoints", "promote", "v9", "--database-url", sqlite_url
    )
    line = one_line_error(capsys, "checkpoints", "show", "base", "--database-url", sqlite_url)
    assert "`base` is the draft of models.draft, not a stored checkpoint" in line


def test_prune_needs_a_positive_age(capsys, sqlite_url):
    line = one_line_error(capsys, "feedback", "prune", "--older-than", "0s", "--database-url", sqlite_url)
    assert "--older-than: the age must be positive, got '0s'" in line


@pytest.mark.parametrize(
    "argv",
    [
        ("checkpoints", "list"),
        ("checkpoints", "show", "1"),
        ("checkpoints", "promote", "1"),
        ("checkpoints", "rollback"),
        ("rounds", "list"),
        ("feedback", "prune", "--older-than", "7d"),
    ],
)
def test_every_database_command_on_a_database_without_schema(capsys, no_schema_url, argv):
    line = one_line_error(capsys, *argv, "--database-url", no_schema_url)
    assert "is empty (no schema)" in line and "run `onlinespec db upgrade" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("notaurl", "invalid database URL 'notaurl': use sqlite:///PATH"),
        ("mysql://", "unsupported database backend 'mysql' in mysql://"),
        ("postgres//u:secret@h/db", "invalid database URL 'postgres//u:***@h/db'"),
    ],
)
@pytest.mark.parametrize(
    "argv",
    [
        ("db", "current"),
        ("db", "upgrade"),
        ("checkpoints", "list"),
        ("rounds", "list"),
        ("feedback", "prune", "--older-than", "7d"),
    ],
)
def test_a_bad_database_url_is_named_without_its_password(capsys, argv, url, expected):
    line = one_line_error(capsys, *argv, "--database-url", url)
    assert expected in line and "secret" not in line


def test_an_unreachable_database_is_named_with_its_password_masked(capsys):
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nothing"
    line = one_line_error(capsys, "checkpoints", "list", "--database-url", url)
    assert line.startswith(f"error: database postgresql://postgres:***@127.0.0.1:{url.rsplit(':', 1)[1]}")
    assert "Connection refused" in line and "secret" not in line


def test_submit_input_and_broker_errors(capsys, tmp_path):
    line = one_line_error(capsys, "submit", str(tmp_path / "missing.jsonl"))
    assert line == f"error: cannot read {tmp_path / 'missing.jsonl'}: No such file or directory"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    config = tmp_path / "config.yaml"
    config.write_text("kafka:\n  request_timeout_ms: 1000\n")  # a refused connection: the bootstrap gives up in 1 s
    broker = f"127.0.0.1:{free_port()}"
    result = run_subprocess(
        "submit", str(prompts), "--config", str(config), "--bootstrap-servers", broker, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: no Kafka broker answered at {broker} in 1 s"]


def test_generate_argument_and_model_errors(capsys, tmp_path, tiny_models):
    target, _ = tiny_models
    line = one_line_error(capsys, "generate", "--target", str(tmp_path / "nowhere"), "--no-draft")
    assert line == f"error: no such model folder or file: {tmp_path / 'nowhere'}"
    line = one_line_error(capsys, "generate", "--target", str(target), "--no-draft", "--k", "99")
    assert line == "error: k: Input should be less than or equal to 16 (got 99)"
    line = one_line_error(capsys, "generate", "--target", str(target), "--no-draft", "--max-new-tokens", "4096")
    assert "--max-new-tokens must be between 1 and --max-seq-len - 1 (2047), got 4096" in line
    assert "drop --no-draft" in one_line_error(
        capsys, "generate", "--target", str(target), "--no-draft", "--proposer", "draft"
    )
    line = one_line_error(capsys, "demo", "--target", str(tmp_path / "nowhere"), "--no-draft")
    assert f"no such model folder: {tmp_path / 'nowhere'}" in line


def test_a_missing_draft_is_reported_before_the_target_loads(tiny_models, monkeypatch, tmp_path):
    from pipelines import models

    loaded = []
    monkeypatch.setattr(models, "load_model", lambda ref, *a, **kw: loaded.append(ref))
    with pytest.raises(models.ModelLoadError, match="no such model folder or file: .*missing-draft"):
        models.load_pair(str(tiny_models[0]), str(tmp_path / "missing-draft"))
    assert loaded == []


def test_read_only_commands_create_no_database_file_or_folder(tmp_path):
    typo = tmp_path / "typo" / "onlinspec.db"
    result = run_subprocess("db", "current", "--database-url", f"sqlite:///{typo}", cwd=tmp_path)
    assert result.returncode == 1 and not typo.parent.exists()
    assert result.stderr.strip().splitlines() == [
        f"error: no SQLite database at {typo} (`onlinespec db upgrade` creates one)"
    ]
    for argv in (("checkpoints", "list"), ("rounds", "list"), ("db", "current")):
        result = run_subprocess(*argv, cwd=tmp_path)  # the default URL, sqlite:///var/onlinespec.db
        assert result.returncode == 1 and "no SQLite database at var/onlinespec.db" in result.stderr
    assert not (tmp_path / "var").exists()


def test_database_commands_print_their_answer_and_nothing_else(tmp_path):
    url = f"sqlite:///{tmp_path / 'quiet.db'}"
    for argv in (("db", "upgrade"), ("db", "current"), ("checkpoints", "list"), ("rounds", "list")):
        result = run_subprocess(*argv, "--database-url", url, cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == "", (argv, result.stderr)  # no alembic INFO lines
    assert len(run_subprocess("db", "upgrade", "--database-url", url, cwd=tmp_path).stdout.splitlines()) == 1


def test_help_shows_only_options_that_do_something(capsys):
    with pytest.raises(SystemExit):
        cli(["submit", "--help"])
    text = capsys.readouterr().out
    assert "--database-url" not in text and "--group-id" not in text and "--bootstrap-servers" in text
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    for command in ("serve", "status", "submit", "generate", "demo", "db", "checkpoints", "rounds"):
        assert f"    {command} " in text


def test_log_level_reaches_serve_and_overrides_the_config(capsys, tmp_path):
    import json

    config = tmp_path / "config.yaml"
    config.write_text("daemon:\n  log_level: WARNING\n")
    assert cli(["--log-level", "debug", "serve", "--config", str(config), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["daemon"]["log_level"] == "DEBUG"
    assert cli(["serve", "--config", str(config), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["daemon"]["log_level"] == "WARNING"


@pytest.mark.parametrize(("answered", "code"), [(0, 1), (1, 1), (2, 0)])
def test_the_demo_exits_non_zero_unless_every_prompt_was_answered(capsys, tmp_path, monkeypatch, answered, code):
    """The demo once exited 0 with `0/4 completions`. Broker, daemon and stream are stood in for here (the real run
    is tests/test_daemon_e2e.py::test_the_demo_runs_again_and_again_in_one_folder); the database is real."""
    import devtools.local_broker
    from daemon.cli import demo

    class Broker:
        bootstrap = "127.0.0.1:1"

        def __init__(self, workdir):
            pass

        def start(self):
            pass

        def stop(self):
            pass

        def create_topics(self, *topics):
            pass

    class Daemon:  # a daemon that drained and exited 0
        def send_signal(self, sig):
            pass

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(devtools.local_broker, "TansuBroker", Broker)
    monkeypatch.setattr(demo, "_start_daemon", lambda config, log: Daemon())
    monkeypatch.setattr(demo, "_wait_until_serving", lambda log, daemon, deadline: None)
    monkeypatch.setattr(demo, "_feed_and_show", lambda *a: (answered, f"{answered}/2 completions"))
    (tmp_path / "target").mkdir()
    argv = ["demo", "--target", str(tmp_path / "target"), "--no-draft", "--prompts", "2"]
    assert cli([*argv, "--workdir", str(tmp_path / "demo")]) == code
    err = capsys.readouterr().err
    assert f"daemon exited with 0; {answered}/2 completions" in err
    assert (f"only {answered} of 2 prompts were answered" in err) == (answered < 2)


def test_serve_names_a_missing_target_or_draft_before_loading_anything(tmp_path, sqlite_url):
    """As `generate` does: a mistyped model path is one error line naming it and a non-zero exit, never the hub's
    "Repo id must be ..." nor a traceback; a missing draft is found before the target (an empty folder here,
    which would fail differently if it were loaded) is touched."""
    (tmp_path / "target").mkdir()
    cases = [
        (tmp_path / "nowhere-target", tmp_path / "target"),
        (tmp_path / "target", tmp_path / "nowhere-draft"),
    ]
    for target, draft in cases:
        argv = ("serve", "--database-url", sqlite_url, "--target", str(target), "--draft", str(draft))
        result = run_subprocess(*argv, cwd=tmp_path)
        missing = target if "nowhere" in target.name else draft
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
        assert result.returncode == 2, result.stderr
        assert len(errors) == 1 and errors[0].endswith(f"no such model folder or file: {missing}"), result.stderr
        assert "Traceback" not in result.stderr and "Repo id" not in result.stderr


def test_serve_logs_at_the_level_given_by_log_level(tmp_path, sqlite_url):
    """Not only the resolved config (above): the level reaches the daemon's logging. Serve logs its settings at
    INFO before loading the models; a missing model stops it right after, so no broker is needed."""
    (tmp_path / "config.yaml").write_text("daemon:\n  log_level: DEBUG\n")
    argv = ("serve", "--config", str(tmp_path / "config.yaml"), "--database-url", sqlite_url)
    argv += ("--target", str(tmp_path / "nowhere"))
    quiet = run_subprocess("--log-level", "warning", *argv, cwd=tmp_path)
    assert quiet.returncode == 2 and len(quiet.stderr.splitlines()) == 1, quiet.stderr
    assert " ERROR daemon.cli.serve: no such model folder or file" in quiet.stderr
    chatty = run_subprocess(*argv, cwd=tmp_path)  # daemon.log_level from the file
    assert chatty.returncode == 2 and " INFO daemon.cli.serve: settings: " in chatty.stderr
