"""Delivery guarantees of the Worker in process, on the real broker, the real engine (tiny models) and SQLite:

- the held-out scenario: librdkafka as the producer, valid prompts among poison including a valid-JSON prompt of
  1.2 MB: every valid prompt served, the oversized one on the DLQ cut to fit, with its size and sha256; a re-sent
  id answered from storage, byte for byte, decoded once;
- idempotency keys: a conflict is dead-lettered naming the first offset; a corrected resend is served;
- a completion that cannot be produced is dead-lettered and the partition moves on; a producer that keeps
  failing transiently is retried and the partition is reported stalled, then moving again;
- offsets become committable only after the database commit and every ack, checked by holding each step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from daemon.serving.batching import Inbound
from daemon.serving.kafka_io import make_producer
from tests.daemon_fixtures import TopicReader, header, ids_of, produce, prompt_records
from tests.kafka_fixtures import free_port
from tests.worker_fixtures import (
    CountingEngine,
    RunningWorker,
    completion_rows,
    dead_letter_rows,
    make_worker,
    metric_value,
    request_statuses,
    wait_for_metric,
)

pytestmark = pytest.mark.kafka


def read(bootstrap: str, topic: str, predicate, timeout: float = 90.0) -> list:
    """The topic from the beginning once predicate holds, plus what arrives in the next half second."""
    reader = TopicReader(bootstrap, topic)
    try:
        reader.read_until(predicate, timeout=timeout)
        return reader.read_for(0.5)
    finally:
        reader.close()


def test_held_out_scenario_librdkafka_producer_and_a_valid_json_prompt_of_1_2_mb(
    kafka_names, sqlite_url, tiny_models, engine
):
    from confluent_kafka import Producer

    ids = [f"v-{i:02d}" for i in range(40)]
    valid = prompt_records(ids, max_new_tokens=8)
    huge = json.dumps({"id": "huge", "prompt": "A" * 1_200_000}).encode()
    poison = [(b"huge", huge), (b"broken", b"{not json"), (b"tomb", None), (b"bytes", b"\xff\xfe\x00")]
    stream = valid[:10] + poison[:2] + [valid[3]] + valid[10:30] + poison[2:] + valid[30:]  # v-03 twice, in flight
    counting = CountingEngine(engine)
    port = free_port()
    worker = make_worker(
        kafka_names,
        sqlite_url,
        tiny_models,
        counting,
        daemon={"metrics_port": port},
        limits={"max_message_bytes": 1_000_000},
        kafka={"max_request_size": 1_048_576},
    )
    producer = Producer(
        {"bootstrap.servers": kafka_names.bootstrap, "enable.idempotence": True, "message.max.bytes": 2_000_000}
    )
    with RunningWorker(worker):
        for key, value in stream:
            producer.produce(kafka_names.prompts, key=key, value=value)
        assert producer.flush(30) == 0
        served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: set(ids_of(rs)) >= set(ids))
        producer.produce(kafka_names.prompts, key=valid[7][0], value=valid[7][1])  # v-07 again, once it is stored
        assert producer.flush(30) == 0
        served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: len(rs) >= len(ids) + 2)
        dead = read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: len(rs) >= len(poison))
        text = wait_for_metric(port, "onlinespec_consumer_lag", 0, topic=kafka_names.prompts, partition="0")

    assert sorted(counting.decoded_ids) == ids  # every valid prompt decoded once, the re-sent ones never again
    assert sorted(ids_of(served)) == sorted(ids + ["v-03", "v-07"])
    for request_id in ("v-03", "v-07"):
        copies = [r for r in served if header(r, "request-id") == request_id]
        assert len({r.value for r in copies}) == 1, "a re-sent id must get the stored completion, byte for byte"
        assert [header(r, "resent") for r in copies] == [None, "1"]
    assert not any(header(r, "resent") for r in served if header(r, "request-id") not in ("v-03", "v-07"))

    assert len(dead) == len(poison)
    codes = {record.key: header(record, "reason-code") for record in dead}
    assert codes == {b"huge": "too_large", b"broken": "not_json", b"tomb": "empty", b"bytes": "not_utf8"}
    oversized = next(record for record in dead if record.key == b"huge")
    assert f"{len(huge)} bytes, the limit is 1000000" in header(oversized, "reason")
    assert header(oversized, "original-size") == str(len(huge)) and header(oversized, "truncated") == "1"
    assert header(oversized, "original-sha256") == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(oversized.value) and 1_000_000 < len(oversized.value) < 1_048_576
    assert metric_value(text, "onlinespec_dlq_records_total", reason="too_large") == 1
    assert metric_value(text, "onlinespec_requests_total", outcome="resent") == 2
    assert {code for _, _, code in dead_letter_rows(sqlite_url)} == {"too_large", "not_json", "empty", "not_utf8"}
    assert completion_rows(sqlite_url) == {i: 1 for i in ids}


def test_a_conflicting_id_is_dead_lettered_and_a_corrected_resend_is_served(
    kafka_names, sqlite_url, tiny_models, engine, caplog
):
    long_prompt = "The quick brown fox " * 190  # fits the 4096-byte limit, not the 256-slot KV cache
    first = [
        (b"c1", json.dumps({"id": "c1", "prompt": "def add(a, b):", "max_new_tokens": 6}).encode()),
        (b"t1", json.dumps({"id": "t1", "prompt": long_prompt}).encode()),
        (b"m1", json.dumps({"id": "m1", "prompt": "SELECT", "max_new_tokens": 1000}).encode()),
    ]
    second = [
        (b"c1", json.dumps({"id": "c1", "prompt": "another prompt", "max_new_tokens": 6}).encode()),
        (b"t1", json.dumps({"id": "t1", "prompt": "The quick brown", "max_new_tokens": 6}).encode()),
        (b"m1", json.dumps({"id": "m1", "prompt": "SELECT", "max_new_tokens": 6}).encode()),
    ]
    port = free_port()
    worker = make_worker(kafka_names, sqlite_url, tiny_models, engine, daemon={"metrics_port": port})
    with RunningWorker(worker):
        produce(kafka_names.bootstrap, kafka_names.prompts, first)
        read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: len(rs) >= 2)
        produce(kafka_names.bootstrap, kafka_names.prompts, second)
        served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: len(rs) >= 3)
        dead = read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: len(rs) >= 3)
        text = wait_for_metric(port, "onlinespec_consumer_lag", 0, topic=kafka_names.prompts, partition="0")

    assert sorted(ids_of(served)) == ["c1", "m1", "t1"]
    answers = {header(r, "request-id"): json.loads(r.value) for r in served}
    assert answers["t1"]["usage"]["completion_tokens"] <= 6 and answers["m1"]["usage"]["completion_tokens"] <= 6
    assert [(header(r, "request-id"), header(r, "reason-code")) for r in dead] == [
        ("t1", "prompt_too_long"),
        ("m1", "out_of_range"),
        ("c1", "id_conflict"),
    ]
    conflict = header(dead[2], "reason")
    assert f"first received at {kafka_names.prompts}/0@0" in conflict and int(header(dead[2], "original-offset")) == 3
    assert "conflicts with the request first received at" in caplog.text  # logged with both hashes
    assert metric_value(text, "onlinespec_dlq_records_total", reason="id_conflict") == 1
    statuses = request_statuses(sqlite_url)
    assert {i: statuses[i] for i in ("c1", "t1", "m1")} == dict.fromkeys(("c1", "t1", "m1"), ("completed", None))
    assert completion_rows(sqlite_url) == {"c1": 1, "t1": 1, "m1": 1}


def test_a_completion_too_large_to_produce_is_dead_lettered_and_the_partition_moves_on(
    kafka_names, sqlite_url, tiny_models, engine
):
    big = json.dumps(
        {"id": "big", "prompt": "def add(a, b):", "max_new_tokens": 4, "metadata": {"blob": "x" * 17_000}}
    ).encode()  # echoed back: over max_request_size
    port = free_port()
    worker = make_worker(
        kafka_names,
        sqlite_url,
        tiny_models,
        engine,
        daemon={"metrics_port": port},
        kafka={"max_request_size": 16_384},
        limits={"max_message_bytes": 40_000, "max_metadata_bytes": 20_000},
    )
    with RunningWorker(worker):
        produce(kafka_names.bootstrap, kafka_names.prompts, [(b"big", big)] + prompt_records(["after-0", "after-1"]))
        served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: len(rs) >= 2)
        (dead,) = read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: len(rs) >= 1)
        text = wait_for_metric(port, "onlinespec_consumer_lag", 0, topic=kafka_names.prompts, partition="0")
    assert sorted(ids_of(served)) == ["after-0", "after-1"]
    assert (header(dead, "reason-code"), header(dead, "request-id"), header(dead, "original-offset")) == (
        "undeliverable",
        "big",
        "0",
    )
    assert "MessageSizeTooLargeError" in header(dead, "reason")
    assert header(dead, "truncated") == "1" and header(dead, "original-size") == str(len(big))
    assert big.startswith(dead.value)
    assert (
        metric_value(
            text, "onlinespec_undeliverable_records_total", record="completion", error="MessageSizeTooLargeError"
        )
        == 1
    )
    assert metric_value(text, "onlinespec_dlq_records_total", reason="undeliverable") == 1
    assert request_statuses(sqlite_url)["big"] == ("completed", None)  # decoded and stored; only undeliverable
    assert (0, "big", "undeliverable") in dead_letter_rows(sqlite_url)


class FlakyProducer:
    """A real producer whose sends fail with a timeout while `down` is set, as when the cluster is unreachable."""

    def __init__(self, producer, down: threading.Event, attempts: list):
        self.producer, self.down, self.attempts = producer, down, attempts

    def send(self, *args, **kwargs):
        self.attempts.append(time.monotonic())
        if self.down.is_set():
            raise KafkaTimeoutError("injected: failed to update metadata after 5.0 secs")
        return self.producer.send(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.producer, name)


def test_transient_produce_failures_are_retried_and_the_stalled_partition_is_reported(
    kafka_names, sqlite_url, tiny_models, engine, caplog
):
    caplog.set_level(logging.INFO, logger="daemon")
    down, attempts = threading.Event(), []
    down.set()
    port = free_port()
    worker = make_worker(
        kafka_names,
        sqlite_url,
        tiny_models,
        engine,
        daemon={"metrics_port": port, "stall_after_s": 2.0, "retry_initial_s": 0.2, "retry_max_s": 0.5},
        producer_factory=lambda s: FlakyProducer(make_producer(s), down, attempts),
    )
    ids = ["f0", "f1", "f2"]
    with RunningWorker(worker):
        produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids))
        wait_for_metric(port, "onlinespec_partition_stalled", 1, timeout=30, topic=kafka_names.prompts, partition="0")
        assert "stalled: committed offset" in caplog.text and "kafka unavailable" in caplog.text
        assert len(attempts) >= 3 and worker.tracker.committable() == {}
        down.clear()
        served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: len(rs) >= len(ids))
        text = wait_for_metric(port, "onlinespec_partition_stalled", 0, topic=kafka_names.prompts, partition="0")
        dead = read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: True, timeout=1)
    assert sorted(ids_of(served)) == ids and dead == []
    assert metric_value(text, "onlinespec_partition_stalls_total", topic=kafka_names.prompts, partition="0") == 1
    assert "moving again" in caplog.text and worker.totals.undeliverable == 0
    assert completion_rows(sqlite_url) == {i: 1 for i in ids}


class Gate:
    """Holds a step until released, and tells when it was reached."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()

    def hold(self) -> None:
        self.reached.set()
        assert self.opened.wait(60), "gate never opened"


class Gated:
    """Wraps an object; the named method waits at the gate first."""

    def __init__(self, inner, method: str, gate: Gate):
        self.inner, self.method, self.gate = inner, method, gate

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name != self.method:
            return attribute

        def held(*args, **kwargs):
            self.gate.hold()
            return attribute(*args, **kwargs)

        return held


def test_offsets_become_committable_only_after_the_database_commit_and_every_ack(
    kafka_names, sqlite_url, tiny_models, engine
):
    worker = make_worker(kafka_names, sqlite_url, tiny_models, engine)
    tp = TopicPartition(kafka_names.prompts, 0)
    worker.tracker.assign([tp])
    records = prompt_records(["o-0", "o-1"]) + [(b"bad", b"{not json")]
    batch = []
    for offset, (key, value) in enumerate(records):
        item = Inbound(tp, offset, key, value, [], worker.tracker.track(tp, offset))
        worker.poller._validate(item)
        batch.append(item)
    stored, acked = Gate(), Gate()
    pipeline = worker.pipeline
    pipeline.store = Gated(pipeline.store, "save", stored)
    pipeline.publisher = Gated(pipeline.publisher, "send_all", acked)
    prepared = pipeline._prepare(batch)
    finishing = threading.Thread(target=pipeline._finish, args=(prepared,), daemon=True)
    finishing.start()
    try:
        assert stored.reached.wait(30)
        assert worker.tracker.committable() == {} and not acked.reached.is_set()  # nothing before the DB commit
        stored.opened.set()
        assert acked.reached.wait(30)
        assert completion_rows(sqlite_url) == {"o-0": 1, "o-1": 1}  # committed to the database ...
        assert worker.tracker.committable() == {}  # ... and still nothing committable before the acks
        acked.opened.set()
        finishing.join(30)
        assert not finishing.is_alive()
        assert worker.tracker.committable() == {tp: 3}
    finally:
        stored.opened.set()
        acked.opened.set()
        finishing.join(30)
        worker.publisher.close()


def test_no_offset_is_committable_while_the_produce_keeps_failing(kafka_names, sqlite_url, tiny_models, engine):
    down, attempts = threading.Event(), []
    down.set()
    worker = make_worker(
        kafka_names,
        sqlite_url,
        tiny_models,
        engine,
        daemon={"retry_initial_s": 0.05, "retry_max_s": 0.1},
        producer_factory=lambda s: FlakyProducer(make_producer(s), down, attempts),
    )
    tp = TopicPartition(kafka_names.prompts, 0)
    worker.tracker.assign([tp])
    ((key, value),) = prompt_records(["p-0"])
    item = Inbound(tp, 0, key, value, [], worker.tracker.track(tp, 0))
    worker.poller._validate(item)
    finishing = threading.Thread(target=worker.pipeline._finish, args=(worker.pipeline._prepare([item]),), daemon=True)
    finishing.start()
    try:
        deadline = time.monotonic() + 30
        while len(attempts) < 4:  # retried, with back-off, and never marked done meanwhile
            assert worker.tracker.committable() == {} and time.monotonic() < deadline
            time.sleep(0.01)
        assert worker.tracker.committable() == {} and not worker.health.healthy
        down.clear()
        finishing.join(30)
        assert worker.tracker.committable() == {tp: 1} and worker.health.healthy
    finally:
        down.clear()
        worker.pipeline.hard_stop.set()
        finishing.join(30)
        worker.publisher.close()


@pytest.mark.postgres
def test_a_record_the_database_refuses_is_dead_lettered_alone(kafka_names, postgres_url, tiny_models, engine):
    """PostgreSQL refuses NUL in text. Validation rejects such ids, so the record is built here as if it had not:
    whatever a record holds that the database refuses, it is dead-lettered and its batch is served."""
    from daemon.config import LimitSettings
    from daemon.serving.messages import parse_prompt
    from pipelines.types import GenerationRequest

    worker = make_worker(kafka_names, postgres_url, tiny_models, engine)
    tp = TopicPartition(kafka_names.prompts, 0)
    worker.tracker.assign([tp])
    batch = []
    for offset, (key, value) in enumerate(prompt_records(["ok-0", "nul\x00id", "ok-1"])):
        item = Inbound(tp, offset, key, value, [], worker.tracker.track(tp, offset))
        worker.poller._validate(item)
        if item.error is not None:  # the id check caught it; bypass it
            item.error, item.request_hash = None, "0" * 64
            item.message = dataclasses.replace(
                parse_prompt(prompt_records(["x"])[0][1], LimitSettings()), id="nul\x00id"
            )
            item.request = GenerationRequest("nul\x00id", input_ids=[1, 2, 3], max_new_tokens=4)
        batch.append(item)
    pipeline = worker.pipeline
    try:
        pipeline._finish(pipeline._prepare(batch))
    finally:
        worker.publisher.close()
    assert worker.tracker.committable() == {tp: 3}
    served = read(kafka_names.bootstrap, kafka_names.completions, lambda rs: len(rs) >= 2)
    (dead,) = read(kafka_names.bootstrap, kafka_names.dlq, lambda rs: len(rs) >= 1)
    assert sorted(ids_of(served)) == ["ok-0", "ok-1"]
    assert header(dead, "reason-code") == "storage_error" and "DataError" in header(dead, "reason")
    assert header(dead, "original-offset") == "1"
    assert (1, None, "storage_error") in dead_letter_rows(postgres_url)


@pytest.mark.slow
def test_records_queued_when_a_rebalance_gives_their_partition_back_are_still_served(
    kafka_broker, sqlite_url, tiny_models, engine, caplog
):
    """kafka-python keeps its fetch position for a partition that a rebalance assigns to the same member again, while
    the worker drops what it had queued for it as stale: those records must be fetched again, not skipped (and then
    committed past). A second member joins while a backlog waits, so the worker keeps one of its two partitions."""
    from kafka import KafkaConsumer

    from tests.kafka_fixtures import fresh_names

    caplog.set_level(logging.INFO, logger="daemon.serving.poller")
    names = fresh_names(kafka_broker)
    kafka_broker.create_topics(names.prompts, partitions=2)
    kafka_broker.create_topics(names.completions, names.dlq)
    slow = CountingEngine(engine, delay_s=0.5)
    worker = make_worker(
        names, sqlite_url, tiny_models, slow, batching={"queue_size": 16}, engine_section={"max_batch_size": 2}
    )
    ids = [f"rb-{i:02d}" for i in range(40)]
    with RunningWorker(worker):
        produce(names.bootstrap, names.prompts, prompt_records(ids, max_new_tokens=4))
        deadline = time.monotonic() + 30
        while worker.inbox.qsize() < 8:  # records queued behind the slow decodes
            assert time.monotonic() < deadline, "no backlog"
            time.sleep(0.02)
        other = KafkaConsumer(
            bootstrap_servers=names.bootstrap,
            group_id=names.group,
            enable_auto_commit=False,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
        )
        try:
            other.subscribe([names.prompts])
            deadline = time.monotonic() + 30
            while not other.assignment() or worker.poller.rebalances < 2:  # the worker kept one partition
                assert time.monotonic() < deadline, "no rebalance to two members"
                other.poll(timeout_ms=100)
                other.pause(*other.assignment())
        finally:
            other.close(autocommit=False)  # the worker gets both partitions back
        records = read(names.bootstrap, names.completions, lambda rs: set(ids_of(rs)) >= set(ids), timeout=60)
    assert set(ids_of(records)) == set(ids)
    assert completion_rows(sqlite_url) == {i: 1 for i in ids}
    assert "kept: fetching again from offset" in caplog.text
