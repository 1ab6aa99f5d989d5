"""The daemon as a subprocess (`onlinespec serve`) against the real broker, real databases and tiny real models:
end to end with an independent client, kill -9 and restart, database outage, broker restart (the SIGTERM drain
mid-stream, and many more of each fault, are in tests/test_fault_injection.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.daemon_fixtures import (
    REPO,
    DaemonProcess,
    TopicReader,
    header,
    ids_of,
    migrate,
    produce,
    prompt_records,
    start_daemon,
)
from tests.kafka_fixtures import TansuBroker, fresh_names
from tests.worker_fixtures import completion_rows

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OUTPUT_FIELDS = {
    "id",
    "text",
    "token_ids",
    "finish_reason",
    "draft_version",
    "usage",
    "acceptance",
    "timings",
    "metadata",
}


class NotifyListener:
    """Reads sd_notify datagrams as systemd does, in the background."""

    def __init__(self, path: str):
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self._running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> list[str]:
        self._running = False
        self.thread.join(2)
        self.sock.close()
        return self.messages


@pytest.mark.postgres
def test_end_to_end_with_confluent_kafka_as_the_client(
    tmp_path, daemon_processes, kafka_names, postgres_url, tiny_models
):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    notify = NotifyListener(str(tmp_path / "notify.sock"))
    notify_path = notify.path
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "2000000"}  # as systemd sets them (WatchdogSec=2)
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, postgres_url, tiny_models, env=env)
    daemon.wait_ready()

    ids = [f"e2e-{i}" for i in range(12)]
    producer = Producer({"bootstrap.servers": kafka_names.bootstrap, "enable.idempotence": True})
    for key, value in prompt_records(ids, max_new_tokens=10, metadata={"n": 1}):
        producer.produce(kafka_names.prompts, key=key, value=value)
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_names.bootstrap,
            "group.id": f"{kafka_names.group}-reader",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(kafka_names.completions, 0, OFFSET_BEGINNING)])
    received = {}
    deadline = time.monotonic() + 90
    while len(received) < len(ids) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        headers = dict(message.headers() or [])
        received[headers["request-id"].decode()] = (message.key(), json.loads(message.value()))
    consumer.close()

    assert sorted(received) == sorted(ids)
    for request_id, (key, payload) in received.items():
        assert key == request_id.encode()
        assert set(payload) == OUTPUT_FIELDS
        assert payload["id"] == request_id and payload["metadata"] == {"n": 1}
        assert payload["finish_reason"] in ("length", "eos", "stop")
        assert 1 <= len(payload["token_ids"]) <= 10 and payload["usage"]["completion_tokens"] == len(
            payload["token_ids"]
        )
        assert payload["draft_version"] == "base"
        assert payload["acceptance"]["target_forwards"] >= 1
    assert completion_rows(postgres_url) == {i: 1 for i in ids}
    deadline = time.monotonic() + 10  # STATUS= is refreshed every daemon.status_interval_s (1 s here)
    while not any(m.startswith("STATUS=served 12,") for m in notify.messages) and time.monotonic() < deadline:
        time.sleep(0.1)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert "onlinespec stopped" in daemon.log()
    messages = notify.close()
    assert any(m.startswith("READY=1") for m in messages)
    assert "WATCHDOG=1" in messages and any(m.startswith("STATUS=served 12,") for m in messages)
    assert messages[-1].startswith("STOPPING=1")


def test_refuses_a_schema_that_is_not_at_head(tmp_path, daemon_processes, kafka_names, tiny_models):
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, empty, tiny_models)
    assert daemon.wait(60) == 3
    assert "onlinespec db upgrade" in daemon.log()

    migrated = DaemonProcess(daemon.config, tmp_path / "daemon2.log", ("--auto-migrate",))
    daemon_processes.append(migrated.start())
    migrated.wait_ready()
    migrated.signal(signal.SIGTERM)
    assert migrated.wait(30) == 0


def test_kill_9_mid_batch_then_restart_loses_and_duplicates_nothing(
    tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models
):
    ids = [f"k{i:02d}" for i in range(24)]
    # Long decodes so the kill lands inside a batch: 4 requests x 64 tokens per batch.
    sections = {"batching": {"queue_size": 8}, "engine": {"max_batch_size": 4}}
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models, **sections)
    daemon.wait_ready()
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids, max_new_tokens=64))
    daemon.wait_for_log(r"batch of \d+: \d+ decoded", timeout=60, count=2)
    time.sleep(0.15)  # the third batch is recorded and decoding (a batch takes about 0.5 s here)
    daemon.kill()  # SIGKILL: no drain, no commit

    before = completion_rows(sqlite_url)
    assert 0 < sum(before.values()) < len(ids), "the kill should land in the middle of the stream"
    assert any(n == 0 for n in before.values()), "the kill should land in a batch: recorded, not yet completed"

    restarted = DaemonProcess(daemon.config, tmp_path / "daemon.log")
    daemon_processes.append(restarted.start())
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    records = reader.read_until(lambda rs: set(ids_of(rs)) >= set(ids), timeout=120)
    reader.read_for(1.0)
    reader.close()
    restarted.signal(signal.SIGTERM)
    assert restarted.wait(30) == 0

    assert completion_rows(sqlite_url) == {i: 1 for i in ids}  # exactly one completion row each
    assert set(ids_of(records)) == set(ids)  # at least one on the topic each
    # What was stored before the kill is re-sent, not decoded again; what was not stored is decoded now.
    resent = {header(r, "request-id") for r in records if header(r, "resent") == "1"}
    assert resent <= {i for i, n in before.items() if n}
    summary = re.search(r"onlinespec stopped .*?: (\d+) decoded, (\d+) resent", restarted.log())
    assert int(summary.group(1)) == len(ids) - sum(before.values())
    assert int(summary.group(2)) == len(resent)


@pytest.mark.postgres
def test_database_outage_pauses_consumption_and_resumes_with_nothing_lost(
    tmp_path, daemon_processes, kafka_names, tiny_models, private_postgres
):
    url = migrate(private_postgres.url)
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, url, tiny_models)
    daemon.wait_ready()
    first = [f"before-{i}" for i in range(4)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(first))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    reader.read_until(lambda rs: len(rs) >= len(first), timeout=60)

    private_postgres.stop()
    try:
        during = [f"during-{i}" for i in range(8)]
        produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(during))
        daemon.wait_for_log(r"database unavailable during", timeout=30)
        daemon.wait_for_log(r"database still unavailable", timeout=30, count=2)
        assert len(reader.read_for(1.0)) == len(first)  # nothing is published while the database is down
    finally:
        private_postgres.start()
    daemon.wait_for_log(r"database available again", timeout=60)
    records = reader.read_until(lambda rs: set(ids_of(rs)) >= set(first + during), timeout=60)
    reader.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert sorted(ids_of(records)) == sorted(first + during)
    assert completion_rows(url) == {i: 1 for i in first + during}
    assert "paused" in daemon.log() or "pausing consumption" in daemon.log()


def test_broker_restart_the_daemon_reconnects_recreates_its_producer_and_resumes(
    tmp_path, daemon_processes, sqlite_url, tiny_models
):
    """Tansu keeps nothing across a restart, so the re-created topic hands out offsets 0, 1, 2 again, the positions
    of the requests served before. The id identifies a request, not its position: the new records there are
    served like any other."""
    broker = TansuBroker(tmp_path)
    broker.start()
    try:
        names = fresh_names(broker)
        broker.create_topics(names.prompts, names.completions, names.dlq)
        daemon = start_daemon(tmp_path, daemon_processes, names, sqlite_url, tiny_models)
        daemon.wait_ready()
        before = ["a0", "a1", "a2"]
        produce(names.bootstrap, names.prompts, prompt_records(before))
        reader = TopicReader(names.bootstrap, names.completions)
        reader.read_until(lambda rs: len(rs) >= 3, timeout=60)
        reader.close()

        broker.stop()
        time.sleep(1.0)
        broker.start()  # memory storage: topics, offsets, groups and producer ids are gone
        broker.create_topics(names.prompts, names.completions, names.dlq)
        daemon.wait_for_log(r"partitions assigned", timeout=60, count=2)
        after = ["b0", "b1", "b2", "b3", "b4", "b5"]
        produce(names.bootstrap, names.prompts, prompt_records(after))
        reader = TopicReader(names.bootstrap, names.completions)
        records = reader.read_until(lambda rs: set(ids_of(rs)) >= set(after), timeout=60)
        reader.read_for(1.0)
        reader.close()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        broker.stop()
    assert sorted(ids_of(records)) == after
    assert completion_rows(sqlite_url) == {i: 1 for i in before + after}
    log = daemon.log()
    assert "replacing it" in log and "kafka available again" in log
    assert re.search(r"[1-9]\d* producer recreations", log)


def test_submit_waits_for_and_prints_completions(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models):
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models)
    daemon.wait_ready()
    lines = [json.dumps({"id": f"s{i}", "prompt": "def add(a, b):", "max_new_tokens": 6}) for i in range(5)]
    lines.append("{broken")
    lines.append(json.dumps({"id": "s-bad", "prompt": "x", "top_p": 7}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "submit",
            "--bootstrap-servers",
            kafka_names.bootstrap,
            "--prompts-topic",
            kafka_names.prompts,
            "--completions-topic",
            kafka_names.completions,
            "--dlq-topic",
            kafka_names.dlq,
            "--wait",
            "--timeout",
            "90",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(p["id"] for p in printed) == [f"s{i}" for i in range(5)]
    assert "rejected s-bad: `top_p` must be in (0, 1]" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "submit: 7/7 lines sent, 5 completed, 1 rejected, 0 unanswered, 1 without an id (not tracked)"
    )


def test_the_demo_runs_again_and_again_in_one_folder(tmp_path, tiny_models):
    target_dir, draft_dir = tiny_models
    workdir = tmp_path / "demo"
    for run in (1, 2):  # the second run must not be served from the first run's database or read its log
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemon.cli",
                "demo",
                "--target",
                str(target_dir),
                "--draft",
                str(draft_dir),
                "--prompts",
                "3",
                "--max-new-tokens",
                "8",
                "--workdir",
                str(workdir),
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=240,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, (run, result.stderr[-3000:])
        assert result.stdout.count("── demo-") == 3
        assert "3/3 completions" in result.stderr and "mean accepted length" in result.stderr
        assert "database: 3 requests, 3 completions, 3 feedback" in result.stderr
        assert "daemon exited with 0" in result.stderr
    runs = sorted(workdir.iterdir())
    assert len(runs) == 2
    for folder in runs:  # what the daemon's own log shows an operator
        log = (folder / "daemon.log").read_text()
        assert len(re.findall(r"served demo-\d \(demo-prompts/0@\d\): \d+ tokens, \w+, AvgLen", log)) == 3
        assert "SIGTERM received: taking no more records" in log and "grace period over" not in log
        assert "Loading weights" not in log and "it/s]" not in log  # no progress bars in a log file
