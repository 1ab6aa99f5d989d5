"""Fixtures and helpers for daemon tests: tiny real models, databases at head, the daemon as a subprocess,
Kafka produce/consume helpers and a private PostgreSQL server that a test may stop and start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from devtools.fleet import REPO, DaemonProcess, header  # noqa: F401  (REPO: the daemon tests import it from here)
from tests.kafka_fixtures import KafkaNames, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/{database}"


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    from devtools.tiny_models import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


# ---------------------------------------------------------------------------------------------- databases


def migrate(url: str) -> str:
    from storage.migrate import upgrade_to_head

    upgrade_to_head(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A SQLite file database at head."""
    return migrate(f"sqlite:///{tmp_path / 'onlinespec.db'}")


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server, at head, dropped afterwards."""
    import psycopg

    name = f"daemon_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = LOCAL_POSTGRES.format(database=name)
    migrate(url)
    yield url
    from sqlalchemy import create_engine

    create_engine(url).dispose()
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port, so a test can stop it without touching the shared one."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture
def private_postgres():
    if shutil.which("runuser") is None or not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries or runuser not available")
    root = Path(tempfile.mkdtemp(prefix="onlinespec-pg-"))
    server = PrivatePostgres(root)
    server.init()
    server.start()
    try:
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- settings


def daemon_settings(names: KafkaNames, database_url: str, target: Path, draft: Path | None, **sections) -> dict:
    """Settings for a test daemon: short Kafka sessions for Tansu, no metrics port, small limits."""
    settings = {
        "kafka": {
            **names.daemon_kafka(),
            "max_poll_interval_ms": 10000,
            "request_timeout_ms": 5000,
            "produce_timeout_s": 5.0,
        },
        "database": {"url": database_url},
        "models": {"target": str(target), "draft": str(draft) if draft else None, "device": "cpu"},
        "engine": {
            "proposer": "draft" if draft else "none",
            "k": 3,
            "max_seq_len": 256,
            "top_m": 4,
            "max_batch_size": 4,
        },
        "batching": {"max_wait_ms": 20, "queue_size": 16},
        "limits": {"max_message_bytes": 4096, "default_max_new_tokens": 16, "max_new_tokens": 64},
        "daemon": {
            "shutdown_grace_s": 20.0,
            "metrics_port": 0,
            "status_interval_s": 1.0,
            "log_level": "DEBUG",
            "retry_initial_s": 0.2,
            "retry_max_s": 1.0,
        },
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    return settings


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


# ---------------------------------------------------------------------------------------------- subprocess


def start_daemon(
    tmp_path, daemon_processes, names, database_url, tiny_models, *extra_args, env=None, **sections
) -> DaemonProcess:
    """Write tmp_path/config.yaml for a test daemon and start `onlinespec serve` on it (log: tmp_path/daemon.log)."""
    target_dir, draft_dir = tiny_models
    config = write_config(
        tmp_path / "config.yaml", daemon_settings(names, database_url, target_dir, draft_dir, **sections)
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log", extra_args, env=env)
    daemon_processes.append(daemon)
    return daemon.start()


@pytest.fixture
def daemon_processes():
    """Collects DaemonProcess objects and stops any still running at the end of the test."""
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.stop()


# ---------------------------------------------------------------------------------------------- kafka helpers


def produce(bootstrap: str, topic: str, records: list[tuple], max_request_size: int = 1_048_576) -> None:
    """Send (key, value) or (key, value, headers) records with kafka-python and wait for every ack."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=max_request_size)
    try:
        futures = [
            producer.send(topic, key=record[0], value=record[1], headers=record[2] if len(record) > 2 else None)
            for record in records
        ]
        producer.flush()
        for future in futures:
            future.get(timeout=10)
    finally:
        producer.close()


def prompt_records(ids: list[str], max_new_tokens: int = 12, **fields) -> list[tuple[bytes, bytes]]:
    prompts = ["def add(a, b):", "The quick brown", "SELECT name FROM", "To be, or not", "for i in range("]
    return [
        (
            rid.encode(),
            json.dumps(
                {"id": rid, "prompt": prompts[i % len(prompts)], "max_new_tokens": max_new_tokens, **fields}
            ).encode(),
        )
        for i, rid in enumerate(ids)
    ]


class TopicReader:
    """Reads a topic from the beginning with a group-less kafka-python consumer."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.consumer.assign([TopicPartition(topic, 0)])
        self.consumer.seek_to_beginning()
        self.records = []

    def read_until(self, predicate, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while not predicate(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out with {len(self.records)} records")
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
        return self.records

    def read_for(self, seconds: float) -> list:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
        return self.records

    def close(self) -> None:
        self.consumer.close()


def ids_of(records) -> list[str]:
    return [header(record, "request-id") for record in records]
