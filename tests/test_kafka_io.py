"""Kafka clients against the real Tansu broker: acks, DLQ headers, producer replacement after a broker restart."""

from __future__ import annotations

import time

import pytest

from daemon.config import KafkaSettings
from daemon.serving.kafka_io import ProduceError, Publisher, completion_record, dlq_record
from tests.daemon_fixtures import TopicReader, header
from tests.kafka_fixtures import TansuBroker, fresh_names

pytestmark = pytest.mark.kafka


def kafka_settings(names, **extra) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=names.bootstrap, prompts_topic=names.prompts, completions_topic=names.completions,
        dlq_topic=names.dlq, group_id=names.group, session_timeout_ms=2000, heartbeat_interval_ms=500,
        request_timeout_ms=3000, produce_timeout_s=3.0, **extra,
    )  # fmt: skip


def test_dlq_and_completion_records_carry_their_headers(kafka_names):
    publisher = Publisher(kafka_settings(kafka_names))
    try:
        publisher.send_all([
            dlq_record(kafka_names.dlq, kafka_names.prompts, 0, 41, b"k", b"{bad", "not_json", "value is not JSON"),
            completion_record(kafka_names.completions, b"k2", "r2", b'{"id": "r2"}', resent=True),
        ])  # fmt: skip
    finally:
        publisher.close()
    reader = TopicReader(kafka_names.bootstrap, kafka_names.dlq)
    (record,) = reader.read_until(lambda records: len(records) == 1, timeout=20)
    reader.close()
    assert (record.key, record.value) == (b"k", b"{bad")
    assert header(record, "reason") == "value is not JSON" and header(record, "reason-code") == "not_json"
    assert (header(record, "original-topic"), header(record, "original-partition"),
            header(record, "original-offset")) == (kafka_names.prompts, "0", "41")  # fmt: skip
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    (record,) = reader.read_until(lambda records: len(records) == 1, timeout=20)
    reader.close()
    assert header(record, "request-id") == "r2" and header(record, "resent") == "1" and record.key == b"k2"


@pytest.mark.slow
def test_publisher_replaces_its_producer_after_a_broker_restart(tmp_path):
    broker = TansuBroker(tmp_path)
    broker.start()
    try:
        names = fresh_names(broker)
        broker.create_topics(names.completions)
        publisher = Publisher(kafka_settings(names))
        publisher.send_all([completion_record(names.completions, None, "a", b"1", False)])

        broker.stop()
        broker.start()  # memory storage: topics and producer ids are gone
        broker.create_topics(names.completions)
        deadline = time.monotonic() + 30
        failures = 0
        while True:
            try:
                publisher.send_all([completion_record(names.completions, None, "b", b"2", False)])
                break
            except ProduceError:
                failures += 1
                assert time.monotonic() < deadline, "producer never recovered"
                time.sleep(0.5)
        assert failures >= 1 and publisher.recreations == failures
        publisher.close()
        reader = TopicReader(broker.bootstrap, names.completions)
        records = reader.read_until(lambda records: len(records) >= 1, timeout=20)
        reader.close()
        assert [header(r, "request-id") for r in records] == ["b"]
    finally:
        broker.stop()
