"""Kafka clients against the real Tansu broker: acks, DLQ headers, dead letters that always fit, per-record
failures sorted into permanent and transient, producer replacement after a broker restart."""

from __future__ import annotations

import hashlib
import time

import pytest
from kafka import errors as kafka_errors

from daemon.config import KafkaSettings
from daemon.serving.kafka_io import (
    PERMANENT,
    TRANSIENT,
    UNCLASSIFIED,
    Publisher,
    classify,
    completion_record,
    dlq_record,
    record_size,
)
from tests.daemon_fixtures import TopicReader, header
from tests.kafka_fixtures import TansuBroker, fresh_names

pytestmark = pytest.mark.kafka


def kafka_settings(names, **extra) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=names.bootstrap,
        prompts_topic=names.prompts,
        completions_topic=names.completions,
        dlq_topic=names.dlq,
        group_id=names.group,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        request_timeout_ms=3000,
        produce_timeout_s=3.0,
        **extra,
    )


def test_dlq_and_completion_records_carry_their_headers(kafka_names):
    publisher = Publisher(kafka_settings(kafka_names))
    try:
        publisher.send_all(
            [
                dlq_record(
                    kafka_names.dlq,
                    kafka_names.prompts,
                    0,
                    41,
                    b"k",
                    b"{bad",
                    "not_json",
                    "value is not JSON",
                    None,
                    1_048_576,
                ),
                completion_record(kafka_names.completions, b"k2", "r2", b'{"id": "r2"}', resent=True),
            ]
        )
    finally:
        publisher.close()
    reader = TopicReader(kafka_names.bootstrap, kafka_names.dlq)
    (record,) = reader.read_until(lambda records: len(records) == 1, timeout=20)
    reader.close()
    assert (record.key, record.value) == (b"k", b"{bad")
    assert header(record, "reason") == "value is not JSON" and header(record, "reason-code") == "not_json"
    assert header(record, "original-size") == "4" and header(record, "truncated") is None
    assert header(record, "original-sha256") == hashlib.sha256(b"{bad").hexdigest()
    assert (
        header(record, "original-topic"),
        header(record, "original-partition"),
        header(record, "original-offset"),
    ) == (kafka_names.prompts, "0", "41")
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
            delivery = publisher.send_all([completion_record(names.completions, None, "b", b"2", False)])
            if delivery.complete:
                break
            failures += 1
            assert {f.kind for f in delivery.failures} == {TRANSIENT}, delivery.failures
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


def test_a_dead_letter_of_any_size_fits_the_producer_limit(kafka_names):
    """The worst case: a 1.2 MB value, a key over the limit, a reason and an id at their largest."""
    limit = 1_048_576
    value = b'{"id": "x", "prompt": "' + b"A" * 1_200_000 + b'"}'
    reason, request_id, key = "r\u00e9ason " * 400, "\u00e9" * 512, b"k" * 5000
    record = dlq_record(kafka_names.dlq, "t" * 249, 3, 2**40, key, value, "too_large", reason, request_id, limit)
    assert record_size(record.key, record.value, record.headers) <= limit
    assert limit - record_size(record.key, record.value, record.headers) < 200  # as much of the value as fits
    publisher = Publisher(kafka_settings(kafka_names, max_request_size=limit))
    try:
        assert publisher.send_all([record]).complete
    finally:
        publisher.close()
    reader = TopicReader(kafka_names.bootstrap, kafka_names.dlq)
    (stored,) = reader.read_until(lambda records: len(records) == 1, timeout=20)
    reader.close()
    assert value.startswith(stored.value) and len(stored.value) > 1_000_000
    assert header(stored, "truncated") == "1" and header(stored, "original-size") == str(len(value))
    assert header(stored, "original-sha256") == hashlib.sha256(value).hexdigest()
    assert stored.key == key[:1024] and header(stored, "original-key-size") == "5000"
    assert len(header(stored, "reason").encode()) <= 1024 and header(stored, "reason").startswith("r\u00e9ason")
    assert header(stored, "request-id") == request_id and header(stored, "original-offset") == str(2**40)


def test_a_tombstone_is_dead_lettered_with_an_empty_value():
    record = dlq_record("dlq", "prompts", 0, 1, None, None, "empty", "record has no value (tombstone)", None, 16_384)
    assert record.value == b"" and dict(record.headers)["tombstone"] == b"1"
    assert "original-size" not in dict(record.headers)


def test_one_record_too_large_fails_alone_and_permanently(kafka_names):
    publisher = Publisher(kafka_settings(kafka_names, max_request_size=16_384))
    records = [
        completion_record(kafka_names.completions, None, f"r{i}", b"x" * size, False)
        for i, size in enumerate([10, 20_000, 30])
    ]
    try:
        delivery = publisher.send_all(records)
    finally:
        publisher.close()
    assert [(f.index, f.kind, type(f.error).__name__) for f in delivery.failures] == [
        (1, PERMANENT, "MessageSizeTooLargeError")
    ]
    assert publisher.recreations == 0  # refused before it was sent: the producer is fine
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    records = reader.read_until(lambda rs: len(rs) == 2, timeout=20)
    reader.close()
    assert [header(r, "request-id") for r in records] == ["r0", "r2"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (kafka_errors.MessageSizeTooLargeError("too big"), PERMANENT),
        (kafka_errors.TopicAuthorizationFailedError("no"), PERMANENT),
        (kafka_errors.InvalidTopicError("bad name"), PERMANENT),
        (kafka_errors.InvalidRecordError("bad record"), PERMANENT),
        (TypeError("not bytes"), PERMANENT),
        (kafka_errors.KafkaTimeoutError("no metadata"), TRANSIENT),
        (kafka_errors.KafkaConnectionError("refused"), TRANSIENT),
        (kafka_errors.NotEnoughReplicasError("1 of 3"), TRANSIENT),
        (kafka_errors.NotLeaderForPartitionError("moved"), TRANSIENT),
        (kafka_errors.UnknownTopicOrPartitionError("being created"), TRANSIENT),
        (kafka_errors.UnknownProducerIdError("broker restarted"), TRANSIENT),
        (ConnectionResetError("reset"), TRANSIENT),
        (kafka_errors.UnknownError("?"), UNCLASSIFIED),
        (RuntimeError("?"), UNCLASSIFIED),
    ],
)
def test_produce_errors_are_sorted_by_what_a_retry_can_fix(error, kind):
    assert classify(error) == kind
