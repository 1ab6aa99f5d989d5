"""The operator commands that talk to Kafka, against the real broker: `status --json` beside a running daemon and
after it stopped, `submit` on a fresh broker (topics created, oversized lines reported, every line summed up),
and --wait reading a DLQ topic that appears only after it started."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from daemon.config import load_settings
from devtools.local_broker import TansuBroker, fresh_names
from tests.daemon_fixtures import (
    REPO,
    DaemonProcess,
    TopicReader,
    daemon_settings,
    produce,
    prompt_records,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def onlinespec(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def status_of(config) -> tuple[int, dict]:
    result = onlinespec("status", "--config", str(config), "--json")
    return result.returncode, json.loads(result.stdout)


def test_status_reports_broker_lag_schema_draft_and_learning(
    tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models
):
    target_dir, draft_dir = tiny_models
    config = write_config(tmp_path / "config.yaml", daemon_settings(kafka_names, sqlite_url, target_dir, draft_dir))
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon_processes.append(daemon.start())
    daemon.wait_ready()
    ids = [f"st-{i}" for i in range(5)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids, max_new_tokens=6))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    reader.read_until(lambda records: len(records) >= len(ids), timeout=60)
    reader.close()
    wait_until_committed(kafka_names, 5)

    code, running = status_of(config)
    assert code == 0 and running["ok"] is True
    assert running["kafka"] | {"partitions": None} == {
        "bootstrap_servers": kafka_names.bootstrap,
        "reachable": True,
        "error": None,
        "topic": kafka_names.prompts,
        "group_id": kafka_names.group,
        "partitions": None,
        "total_lag": 0,
    }
    assert running["kafka"]["partitions"] == [{"partition": 0, "committed": 5, "high_watermark": 5, "lag": 0}]
    assert running["database"] | {"url": None} == {
        "url": None,
        "reachable": True,
        "revision": "0002",
        "head": "0002",
        "at_head": True,
        "error": None,
    }
    assert running["draft"]["deployment"] == "default" and running["draft"]["proposer"] == "draft"
    assert running["draft"]["active_version"] == "base" and running["draft"]["active_checkpoint_id"] is None
    live = running["draft"]["live"]
    assert live["requests"] == 5 and live["drafted"] > 0 and live["avg_len"] >= 1.0
    assert running["last_round"] is None  # learning is off here

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["late-0", "late-1"]))
    code, stopped = status_of(config)  # nobody consumes: the lag is what the group still has to serve
    assert code == 0 and stopped["kafka"]["partitions"] == [
        {"partition": 0, "committed": 5, "high_watermark": 7, "lag": 2}
    ]
    result = onlinespec("status", "--config", str(config))
    assert result.returncode == 0 and f"lag 2 on {kafka_names.prompts}" in result.stdout
    assert "active base, proposer draft; live AvgLen" in result.stdout and "learning  no round yet" in result.stdout


def test_status_reports_each_part_on_its_own(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("kafka:\n  bootstrap_servers: 127.0.0.1:1\n  request_timeout_ms: 1000\n")
    missing = tmp_path / "none.db"
    result = onlinespec("status", "--config", str(config), "--database-url", f"sqlite:///{missing}", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False
    assert report["kafka"]["reachable"] is False and "KafkaTimeoutError" in report["kafka"]["error"]
    assert report["database"]["reachable"] is False and "no SQLite database at" in report["database"]["error"]
    assert not missing.exists()


def test_submit_on_a_fresh_broker_creates_its_topics_and_sums_up_every_line(tmp_path):
    broker = TansuBroker(tmp_path)
    broker.start()
    try:
        names = fresh_names(broker)
        config = tmp_path / "config.yaml"
        config.write_text(
            f"kafka:\n  bootstrap_servers: {broker.bootstrap}\n  prompts_topic: {names.prompts}\n"
            f"  completions_topic: {names.completions}\n  dlq_topic: {names.dlq}\n"
            "  max_request_size: 16384\n"
        )
        lines = [
            json.dumps({"id": "a", "prompt": "x"}),
            json.dumps({"id": "big", "prompt": "x" * 20_000}),
            "{broken",
            json.dumps({"id": "c", "prompt": "y"}),
        ]
        (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
        result = onlinespec("submit", str(tmp_path / "in.jsonl"), "--config", str(config), "--wait", "--timeout", "1")

        assert result.returncode == 1, result.stderr  # a line not sent, and nobody answers
        assert "Traceback" not in result.stderr
        for topic in (names.prompts, names.completions, names.dlq):
            assert f"submit: created topic {topic} (1 partition)" in result.stderr
        summary = result.stderr.strip().splitlines()[-1]
        big = len(lines[1].encode())
        assert summary == (
            f"submit: 3/4 lines sent, 1 not sent (line 2: {big} bytes, over kafka.max_request_size "
            "16384), 0 completed, 0 rejected, 2 unanswered, 1 without an id (not tracked)"
        )
        reader = TopicReader(broker.bootstrap, names.prompts)
        sent = reader.read_until(lambda records: len(records) >= 3, timeout=30)
        reader.close()
        assert [r.value.decode() for r in sent] == [lines[0], lines[2], lines[3]]
    finally:
        broker.stop()


def test_wait_reads_a_dlq_topic_that_appears_after_it_started(kafka_broker):
    from daemon.cli.progress import Progress
    from daemon.cli.submit import Tally, Watcher

    names = fresh_names(kafka_broker)
    kafka_broker.create_topics(names.completions)  # the DLQ topic does not exist yet
    kafka = load_settings(
        None,
        {
            "kafka.bootstrap_servers": kafka_broker.bootstrap,
            "kafka.completions_topic": names.completions,
            "kafka.dlq_topic": names.dlq,
        },
    ).kafka
    watcher = Watcher(kafka)
    try:
        started_ms = int(time.time() * 1000)
        kafka_broker.create_topics(names.dlq)  # as a daemon's first dead letter would make it
        produce_with_header(kafka_broker.bootstrap, names.dlq, "r1", reason="`top_p` must be in (0, 1]")
        produce_with_header(kafka_broker.bootstrap, names.completions, "r2", value=b'{"id": "r2"}')
        tally, stdout = Tally(lines=2, sent=2), io.StringIO()
        watcher.wait({"r1", "r2"}, started_ms - 5000, 30.0, tally, Progress(), stdout)
    finally:
        watcher.close()
    assert (tally.completed, tally.rejected, tally.unanswered) == (1, 1, 0)
    assert stdout.getvalue().strip() == '{"id": "r2"}'


def wait_until_committed(names, offset: int, timeout: float = 30.0) -> None:
    """Until the daemon's group has committed `offset` on partition 0 (it commits after the produce acks)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=names.bootstrap, group_id=names.group, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        while consumer.committed(TopicPartition(names.prompts, 0)) != offset:
            assert time.monotonic() < deadline, f"the group never committed {offset}"
            time.sleep(0.1)
    finally:
        consumer.close(autocommit=False)


def produce_with_header(bootstrap: str, topic: str, request_id: str, value: bytes = b"{}", reason: str = "") -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    headers = [("request-id", request_id.encode())] + ([("reason", reason.encode())] if reason else [])
    producer.send(topic, value=value, headers=headers).get(timeout=10)
    producer.close()
