"""The Worker in-process against the real broker, the real engine on tiny models and a real SQLite database:
poison input, redelivery, backpressure, long decodes, draft swap, metrics.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from daemon.serving.metrics import DaemonMetrics
from pipelines.models import load_model
from tests.daemon_fixtures import TopicReader, header, ids_of, produce, prompt_records
from tests.kafka_fixtures import free_port
from tests.worker_fixtures import (
    CountingEngine,
    RunningWorker,
    dead_letter_rows,
    make_worker,
    metric_value,
    request_statuses,
    wait_for_metric,
)

pytestmark = pytest.mark.kafka


def test_poison_input_goes_to_the_dlq_with_reasons_and_valid_requests_are_served(
    kafka_names, sqlite_url, tiny_models, engine
):
    valid = prompt_records([f"ok-{i}" for i in range(6)])
    chat = (
        b"chat",
        json.dumps(
            {"id": "ok-chat", "messages": [{"role": "user", "content": "hi"}], "metadata": {"user": 1}}
        ).encode(),
    )
    long_prompt = "The quick brown fox " * 200  # under the byte limit of 4096, over the 256-slot KV cache
    poison = [
        (b"p1", b"{not json"),
        (b"p2", json.dumps({"id": 7, "prompt": "x"}).encode()),
        (b"p3", json.dumps({"prompt": "no id"}).encode()),
        (b"p4", json.dumps({"id": "p4", "prompt": "x", "model": "big"}).encode()),
        (b"p5", json.dumps({"id": "p5", "prompt": "x" * 5000}).encode()),
        (b"p6", json.dumps({"id": "p6", "prompt": long_prompt[:3900]}).encode()),
        (b"ok-0", json.dumps({"id": "ok-0", "prompt": "another prompt"}).encode()),  # the id, another request
        (b"p8", json.dumps({"id": "p8", "prompt": "x", "temperature": "hot"}).encode()),
        (b"p9", None),
    ]
    expected_codes = {
        0: "not_json",
        1: "wrong_type",
        2: "missing_field",
        3: "unknown_field",
        4: "too_large",
        5: "prompt_too_long",
        6: "id_conflict",
        7: "wrong_type",
        8: "empty",
    }
    port = free_port()
    metrics = DaemonMetrics()
    worker = make_worker(kafka_names, sqlite_url, tiny_models, engine, metrics=metrics, daemon={"metrics_port": port})
    # Interleave so poison shares batches with valid requests.
    records = [
        valid[0],
        poison[0],
        valid[1],
        poison[1],
        poison[2],
        valid[2],
        poison[3],
        poison[4],
        chat,
        poison[5],
        valid[3],
        poison[6],
        poison[7],
        valid[4],
        poison[8],
        valid[5],
    ]
    with RunningWorker(worker):
        produce(kafka_names.bootstrap, kafka_names.prompts, records)
        completions = TopicReader(kafka_names.bootstrap, kafka_names.completions)
        served = completions.read_until(lambda rs: len(rs) >= 7, timeout=60)
        dlq = TopicReader(kafka_names.bootstrap, kafka_names.dlq)
        dead = dlq.read_until(lambda rs: len(rs) >= len(poison), timeout=30)
        text = wait_for_metric(port, "onlinespec_consumer_lag", 0, topic=kafka_names.prompts, partition="0")
        completions.read_for(0.5)
        dlq.read_for(0.5)
    assert sorted(ids_of(served)) == sorted([f"ok-{i}" for i in range(6)] + ["ok-chat"])
    assert len(dead) == len(poison)
    by_offset = {int(header(record, "original-offset")): record for record in dead}
    for index, (key, value) in enumerate(poison):
        offset = next(i for i, r in enumerate(records) if r is poison[index])
        record = by_offset[offset]
        assert header(record, "reason-code") == expected_codes[index], header(record, "reason")
        assert header(record, "original-topic") == kafka_names.prompts
        assert header(record, "original-partition") == "0"
        assert header(record, "reason")
        assert record.key == key and record.value == (value or b"")  # small enough to travel whole
    conflict = header(by_offset[records.index(poison[6])], "reason")
    assert f"first received at {kafka_names.prompts}/0@0" in conflict and "new id" in conflict
    assert "the limit is" in header(by_offset[records.index(poison[5])], "reason")
    statuses = request_statuses(sqlite_url)
    # Records with a usable id are recorded as dead-lettered; oversized ones are never parsed (no id). Every dead
    # letter has a dead_letters row, with or without an id.
    assert {i: statuses[i][0] for i in ("p4", "p6", "p8")} == dict.fromkeys(("p4", "p6", "p8"), "dead_lettered")
    assert "p5" not in statuses
    assert statuses["p6"][1].startswith("prompt_too_long: ")
    assert statuses["ok-0"] == ("completed", None)  # the conflicting copy did not touch the original
    assert dead_letter_rows(sqlite_url) == {
        (records.index(poison[i]), (json.loads(v)["id"] if i in (3, 5, 6, 7) else None), expected_codes[i])
        for i, (_, v) in enumerate(poison)
    }
    chat_completion = next(r for r in served if header(r, "request-id") == "ok-chat")
    assert chat_completion.key == b"chat" and json.loads(chat_completion.value)["metadata"] == {"user": 1}
    assert metric_value(text, "onlinespec_requests_total", outcome="completed") == 7
    assert metric_value(text, "onlinespec_requests_total", outcome="dead_lettered") == len(poison)
    assert metric_value(text, "onlinespec_dlq_records_total", reason="id_conflict") == 1
    assert metric_value(text, "onlinespec_queue_depth") == 0
    assert metric_value(text, "onlinespec_mean_accepted_length", draft_version="base") >= 1.0
    assert metric_value(text, "onlinespec_generated_tokens_total", draft_version="base") > 0
    assert metric_value(text, "onlinespec_time_to_first_token_seconds_count") == 7  # one per completion
    assert metric_value(text, "onlinespec_inter_token_seconds_count") == 7
    assert metric_value(text, "onlinespec_request_seconds_count") == 7
    assert 0 <= metric_value(text, "onlinespec_slot_occupancy") <= 1
    assert metric_value(text, "onlinespec_engine_seconds_total", phase="prefill") > 0
    assert metric_value(text, "onlinespec_engine_seconds_total", phase="rounds") > 0
    assert metric_value(text, "onlinespec_store_seconds_count") >= 1
    assert metric_value(text, "onlinespec_batch_size_count") >= 1


def test_a_redelivered_request_is_resent_from_the_database_not_decoded(kafka_names, sqlite_url, tiny_models, engine):
    ids = [f"r{i}" for i in range(5)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids))
    first = CountingEngine(engine)
    with RunningWorker(make_worker(kafka_names, sqlite_url, tiny_models, first)):
        reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
        reader.read_until(lambda rs: len(rs) >= 5)
    assert sorted(first.decoded_ids) == ids

    # A new group starts from the beginning: every record is delivered again.
    kafka_names.group += "-again"
    second = CountingEngine(engine)
    with RunningWorker(make_worker(kafka_names, sqlite_url, tiny_models, second)):
        records = reader.read_until(lambda rs: len(rs) >= 10)
    reader.close()
    assert second.decoded_ids == []
    originals = {header(r, "request-id"): r.value for r in records[:5]}
    resent = records[5:]
    assert all(header(r, "resent") == "1" for r in resent)
    assert {header(r, "request-id"): r.value for r in resent} == originals  # the same bytes again


@pytest.mark.slow
def test_backpressure_pauses_partitions_and_long_decodes_cause_no_rebalance(
    kafka_names, sqlite_url, tiny_models, engine
):
    slow = CountingEngine(engine, delay_s=2.5)  # longer than the 2 s session timeout and the 2 s poll interval
    metrics = DaemonMetrics()
    worker = make_worker(
        kafka_names,
        sqlite_url,
        tiny_models,
        slow,
        metrics=metrics,
        kafka={"max_poll_interval_ms": 2000},
        batching={"queue_size": 2},
        engine_section={"max_batch_size": 2},
    )
    ids = [f"b{i}" for i in range(8)]
    paused_seen = []
    with RunningWorker(worker):
        produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids, max_new_tokens=4))
        reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
        deadline = time.monotonic() + 60
        while len(reader.records) < len(ids) and time.monotonic() < deadline:
            reader.read_for(0.3)
            paused_seen.append(metrics.paused._value.get())
            assert worker.inbox.qsize() <= 2
        reader.close()
    assert sorted(ids_of(reader.records)) == ids
    assert 1 in paused_seen
    assert worker.poller.rebalances == 1, "rebalanced during slow decodes"
    assert sorted(slow.decoded_ids) == ids


def test_draft_swap_happens_at_a_batch_boundary(kafka_names, sqlite_url, tiny_models, engine):
    target_dir, draft_dir = tiny_models
    worker = make_worker(kafka_names, sqlite_url, tiny_models, engine)
    new_weights = {name: torch.zeros_like(t) for name, t in load_model(str(draft_dir)).state_dict().items()}
    original = {name: t.clone() for name, t in engine.draft.state_dict().items()}
    try:
        with RunningWorker(worker):
            produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["before"]))
            reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
            reader.read_until(lambda rs: len(rs) >= 1)
            worker.request_draft_swap(new_weights, "v2")
            produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["after"]))
            records = reader.read_until(lambda rs: len(rs) >= 2)
            reader.close()
    finally:
        engine.swap_draft(original, "base")
    versions = {header(r, "request-id"): json.loads(r.value)["draft_version"] for r in records}
    assert versions == {"before": "base", "after": "v2"}


def test_a_signal_drains_within_the_grace_period_and_a_second_one_abandons(
    kafka_names, sqlite_url, tiny_models, engine
):
    slow = CountingEngine(engine, delay_s=4.0)
    worker = make_worker(kafka_names, sqlite_url, tiny_models, slow, daemon={"shutdown_grace_s": 30.0})
    running = RunningWorker(worker)
    running.__enter__()
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["s0", "s1"]))
    deadline = time.monotonic() + 30
    while not slow.decoded_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.decoded_ids, "decoding never started"
    worker.handle_signal(signal.SIGTERM)  # drain: would wait for the 4 s decode
    time.sleep(0.5)
    assert running.thread.is_alive()
    signalled = time.monotonic()
    worker.handle_signal(signal.SIGINT)  # second signal: abandon now
    running.thread.join(10)
    assert not running.thread.is_alive() and time.monotonic() - signalled < 3.0
    assert running.exit_code == 0
    assert worker.tracker.committable() == {}  # nothing finished, nothing committed
    worker.join_abandoned(10)  # let the stuck decode finish before the next test uses the engine


def test_the_grace_period_bounds_the_drain(kafka_names, sqlite_url, tiny_models, engine):
    slow = CountingEngine(engine, delay_s=5.0)
    worker = make_worker(kafka_names, sqlite_url, tiny_models, slow, daemon={"shutdown_grace_s": 1.0})
    running = RunningWorker(worker)
    running.__enter__()
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["g0"]))
    deadline = time.monotonic() + 30
    while not slow.decoded_ids and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = time.monotonic()
    worker.handle_signal(signal.SIGTERM)
    running.thread.join(10)
    assert not running.thread.is_alive()
    assert 0.9 < time.monotonic() - stopped < 4.0
    assert running.exit_code == 0 and worker._abandoned == 1
    worker.join_abandoned(10)


def test_a_failing_consumer_stops_the_worker_with_exit_code_1(kafka_names, sqlite_url, tiny_models, engine):
    def broken_consumer(_settings):
        raise RuntimeError("no such broker")

    worker = make_worker(kafka_names, sqlite_url, tiny_models, engine)
    worker.poller.consumer_factory = broken_consumer
    assert worker.run() == 1


class PoisonEngine:
    """The real engine, except that its prefill fails whenever the request with id `poison` is among the prompts
    it prefills: an engine error that only one request causes, raised inside a step with others in flight, and
    again when that request is decoded alone."""

    def __init__(self, inner, monkeypatch, poison: str = "poison"):
        self.engine = inner
        self.failures = 0
        prefill = inner._prefill_chunks

        def failing_prefill(plan):
            if any(inner.slots.slots[chunk.slot].request.id == poison for chunk in plan):
                self.failures += 1
                raise RuntimeError("a kernel failed")
            return prefill(plan)

        monkeypatch.setattr(inner, "_prefill_chunks", failing_prefill)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_an_engine_error_dead_letters_only_the_request_that_causes_it(
    kafka_names, sqlite_url, tiny_models, engine, monkeypatch
):
    """Continuous batching puts every request in flight into the failing step: the decode stage drops them all from
    the engine, decodes each alone, answers the others and dead-letters the one that fails by itself."""
    poisoned = PoisonEngine(engine, monkeypatch)
    ids = ["a0", "a1", "poison", "a2", "a3"]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids))
    with RunningWorker(make_worker(kafka_names, sqlite_url, tiny_models, poisoned)) as worker:
        completions = TopicReader(kafka_names.bootstrap, kafka_names.completions)
        completions.read_until(lambda rs: len(rs) >= 4)
        dead = TopicReader(kafka_names.bootstrap, kafka_names.dlq).read_until(lambda rs: len(rs) >= 1)
        produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["after"]))  # still serving
        served = completions.read_until(lambda rs: len(rs) >= 5)  # everything read so far
        completions.close()
        assert worker.totals.by_reason == {"engine_error": 1}
    assert poisoned.failures >= 2  # in a shared step, then alone
    assert sorted(ids_of(served)) == ["a0", "a1", "a2", "a3", "after"]
    assert [header(r, "reason-code") for r in dead] == ["engine_error"]
    assert "a kernel failed" in header(dead[0], "reason")
    assert request_statuses(sqlite_url)["poison"][0] == "dead_lettered"


def test_two_copies_of_one_request_in_one_poll_are_both_answered(kafka_names, sqlite_url, tiny_models, engine):
    """A producer retry can put two copies of a request in one batch of records: the second waits for the first
    copy's completion (stored once) instead of being dead-lettered."""
    record = prompt_records(["dup"])[0]
    produce(kafka_names.bootstrap, kafka_names.prompts, [record, record, *prompt_records(["other"])])
    with RunningWorker(make_worker(kafka_names, sqlite_url, tiny_models, engine)) as worker:
        reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
        records = reader.read_until(lambda rs: len(rs) >= 3)
        reader.close()
        assert worker.totals.by_reason == {}
    copies = [r for r in records if header(r, "request-id") == "dup"]
    assert len(copies) == 2 and copies[0].value == copies[1].value
    assert request_statuses(sqlite_url)["dup"] == ("completed", None)
