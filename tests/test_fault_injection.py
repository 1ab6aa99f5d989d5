"""Fault injection: `onlinespec serve` as a subprocess on the Tansu broker, PostgreSQL (or SQLite) and the tiny models,
with faults at random (seeded) moments. Every scenario asserts the delivery invariants - every id exactly one
completion row, every id on the output topic, every copy there byte for byte the stored message, nothing stalled -
and records its figures (tests/fault_fixtures.py prints them and writes var/fault-figures.json).

    (a) kill -9 at random moments, 21 cycles over 320 unique ids
    (b) the broker restarted mid-stream (Tansu loses topics and offsets: topics re-created, unanswered ids resent)
    (c) PostgreSQL stopped 10-15 s mid-stream, then started
    (d) 1000 fuzzed bad records among 200 good ones; throughput against a clean stream of 200
    (e) SIGTERM mid-stream: exit 0 within the grace period, the rest answered once after a restart
    (f) a checkpoint file with one flipped byte: refused on load, on promote and rollback, at daemon start

Run alone with `pytest -m fault`. Waits are on conditions with deadlines; the only sleeps choose when a fault hits
or how long it lasts.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest

from tests.daemon_fixtures import (
    DaemonProcess,
    TopicReader,
    daemon_settings,
    header,
    migrate,
    produce,
    prompt_records,
    start_daemon,
    write_config,
)
from tests.fault_fixtures import Supervised, answered, assert_exactly_once, delivery_figures, stall_lines
from tests.kafka_fixtures import TansuBroker, fresh_names
from tests.worker_fixtures import completion_rows, rows

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

# Short answers and full batches: the tiny models decode a batch in a fraction of a second, so a stream of hundreds
# of requests passes many batch boundaries, each a place for a fault to land.
FAST = {
    "batching": {"queue_size": 32},
    "engine": {"proposer": "draft", "k": 3, "max_seq_len": 256, "top_m": 4, "max_batch_size": 8},
    "limits": {"default_max_new_tokens": 6},
}


def stream_records(ids: list[str]) -> list[tuple[bytes, bytes]]:
    return prompt_records(ids, max_new_tokens=6)


def run_until(daemon: DaemonProcess, done, readers: list[TopicReader], timeout: float = 300.0) -> float:
    """Wait for a started daemon to be ready, read the topics until done(), then stop it as systemd does
    (SIGTERM, exit 0) and read what else arrived; returns the seconds from ready to done()."""
    daemon.wait_ready()
    started = time.monotonic()
    while not done():
        assert time.monotonic() < started + timeout, f"not done in {timeout} s: {[len(r.records) for r in readers]}"
        for reader in readers:
            reader.read_for(0.1)
    seconds = time.monotonic() - started
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    for reader in readers:
        reader.read_for(0.5)
        reader.close()
    return seconds


def serve_the_rest(daemon: DaemonProcess, reader: TopicReader, ids: list[str]) -> list:
    run_until(daemon, lambda: answered(reader.records) >= set(ids), [reader])
    return reader.records


@pytest.mark.postgres
def test_a_kill_9_at_random_moments(tmp_path, daemon_processes, kafka_names, postgres_url, tiny_models, fault_figures):
    started = time.monotonic()
    rng = random.Random(20261203)
    ids = [f"k{i:03d}" for i in range(320)]
    cycles, mid_batch, before_ready = 21, 0, 0
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, postgres_url, tiny_models, **FAST)
    produce(kafka_names.bootstrap, kafka_names.prompts, stream_records(ids))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    for _ in range(cycles):
        if rng.random() < 0.15:  # while it starts: loading models, joining the group
            time.sleep(rng.uniform(0.5, 4.0))
            before_ready += 1
        else:
            daemon.wait_ready()
            target = min(len(ids), len(answered(reader.records)) + rng.randint(1, 24))
            reader.read_until(lambda rs, target=target: len(answered(rs)) >= target, timeout=90)
            time.sleep(rng.uniform(0.0, 0.2))  # anywhere in the next batch: decoding, storing or producing
        daemon.kill()
        counts = completion_rows(postgres_url)
        mid_batch += any(n == 0 for n in counts.values())  # recorded, not completed: the kill hit a batch
        daemon = DaemonProcess(daemon.config, daemon.log_path)
        daemon_processes.append(daemon.start())
    records = serve_the_rest(daemon, reader, ids)  # the last start serves what is left and stops cleanly

    figures = delivery_figures(postgres_url, ids, records)
    log = daemon.log_path.read_text(errors="replace")
    figures.update(
        cycles=cycles,
        kills_mid_batch=mid_batch,
        kills_before_ready=before_ready,
        stalls=stall_lines(log),
        seconds=round(time.monotonic() - started, 1),
    )
    fault_figures.record("a_kill_9", **figures)
    assert_exactly_once(figures)
    assert figures["stalls"] == 0 and mid_batch >= 3, figures


def test_b_broker_restart_mid_stream(tmp_path, daemon_processes, sqlite_url, tiny_models, fault_figures):
    """Tansu keeps nothing: after the restart the test re-creates the topics and resends every id it has not seen
    answered, as a client would. The daemon reconnects by itself (or exits non-zero and is started again, as
    systemd would); completions stored before the restart are answered from storage."""
    started = time.monotonic()
    broker = TansuBroker(tmp_path)
    broker.start()
    try:
        names = fresh_names(broker)
        broker.create_topics(names.prompts, names.completions, names.dlq)
        supervised = Supervised(start_daemon(tmp_path, daemon_processes, names, sqlite_url, tiny_models, **FAST))
        supervised.daemon.wait_ready()
        ids = [f"b{i:03d}" for i in range(200)]
        record_of = dict(zip(ids, prompt_records(ids, max_new_tokens=24)))  # a resend is the same record again
        produce(names.bootstrap, names.prompts, list(record_of.values()))
        reader = TopicReader(names.bootstrap, names.completions)
        before = supervised.read_until(reader, lambda rs: len(answered(rs)) >= 40, timeout=90)
        reader.close()
        seen_before = answered(before)

        broker.stop()
        time.sleep(random.Random(7).uniform(0.5, 2.0))  # the outage
        broker.start()  # memory storage: topics, records, offsets, groups and producer ids are gone
        broker.create_topics(names.prompts, names.completions, names.dlq)
        unanswered = [i for i in ids if i not in seen_before]
        produce(names.bootstrap, names.prompts, [record_of[i] for i in unanswered])
        reader = TopicReader(names.bootstrap, names.completions)
        after = supervised.read_until(reader, lambda rs: answered(rs) >= set(unanswered), timeout=180)
        reader.read_for(1.0)
        reader.close()
        supervised.daemon.signal(signal.SIGTERM)
        assert supervised.daemon.wait(30) == 0
    finally:
        broker.stop()

    figures = delivery_figures(sqlite_url, ids, before + after)
    log = supervised.log()
    figures.update(
        answered_before_restart=len(seen_before),
        resent_by_the_test=len(unanswered),
        decoded_after_restart=len(unanswered) - figures["resent_copies"],
        daemon_restarts=supervised.restarts,
        producer_recreations=int(re.findall(r"(\d+) producer recreations", log)[-1]),
        stalls=stall_lines(log),
        seconds=round(time.monotonic() - started, 1),
    )
    fault_figures.record("b_broker_restart", **figures)
    assert_exactly_once(figures)
    assert answered(before + after) == set(ids) and figures["stalls"] == 0, figures


@pytest.mark.postgres
def test_c_postgresql_stopped_mid_stream(
    tmp_path, daemon_processes, kafka_names, tiny_models, private_postgres, fault_figures
):
    started = time.monotonic()
    url = migrate(private_postgres.url)
    supervised = Supervised(start_daemon(tmp_path, daemon_processes, kafka_names, url, tiny_models, **FAST))
    supervised.daemon.wait_ready()
    ids = [f"c{i:03d}" for i in range(160)]
    produce(kafka_names.bootstrap, kafka_names.prompts, stream_records(ids))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    supervised.read_until(reader, lambda rs: len(answered(rs)) >= 40, timeout=90)
    outage = random.Random(11).uniform(10.0, 15.0)
    private_postgres.stop()
    stopped = time.monotonic()
    try:
        answered_during = len(answered(reader.read_for(outage)))  # the outage: nothing can be stored meanwhile
    finally:
        private_postgres.start()
    outage = time.monotonic() - stopped
    records = supervised.read_until(reader, lambda rs: answered(rs) >= set(ids), timeout=180)
    reader.read_for(1.0)
    reader.close()
    supervised.daemon.signal(signal.SIGTERM)
    assert supervised.daemon.wait(30) == 0

    figures = delivery_figures(url, ids, records)
    log = supervised.log()
    retries = int(re.findall(r"(\d+) database retries", log)[-1])
    figures.update(
        outage_seconds=round(outage, 1),
        database_retries=retries,
        daemon_restarts=supervised.restarts,
        stalls=stall_lines(log),
        seconds=round(time.monotonic() - started, 1),
    )
    fault_figures.record("c_postgres_outage", **figures)
    assert_exactly_once(figures)
    assert "database unavailable during" in log and "database available again" in log
    assert retries > 0 and figures["stalls"] == 0 and answered_during < len(ids), figures


GOOD_PROMPTS = ["def add(a, b):", "The quick brown", "SELECT name FROM", "To be, or not", "for i in range("]
ODD_HEADERS = [
    [("request-id", b"spoofed"), ("reason", b"not mine")],  # names the daemon itself writes on its output
    [("", b"")],
    [("h\u00e9ader", b"\xff\xfe\x00binary")],
    [(f"h{i}", b"x" * 100) for i in range(100)],
    [("big", b"v" * 100_000)],
    [("dup", b"1"), ("dup", b"2")],
    [("empty-value", b"")],
]


def good_record(rng: random.Random, request_id: str) -> tuple:
    fields: dict = {"id": request_id, "max_new_tokens": rng.randint(2, 6)}
    if rng.random() < 0.2:
        fields["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    else:
        fields["prompt"] = rng.choice(GOOD_PROMPTS)
    if rng.random() < 0.3:
        fields["metadata"] = {"user": rng.randint(0, 9), "tags": ["a", "b"], "nested": {"x": [1, {"y": None}]}}
    if rng.random() < 0.2:
        fields.update(temperature=0.8, top_p=0.9, seed=rng.randint(0, 2**40))
    if rng.random() < 0.2:
        fields["stop"] = ["\n", "xyz"]
    headers = rng.choice(ODD_HEADERS) if rng.random() < 0.3 else None
    return request_id.encode(), json.dumps(fields).encode(), headers


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def bad_value(rng: random.Random, index: int, good_ids: list[str]) -> tuple[bytes | None, set[str], bytes | None]:
    """One bad record of many kinds: (value, the reason codes it may get, a key if it needs a special one)."""
    rid = f"bad-{index}"
    ok = {"id": rid, "prompt": "p"}
    wrong_types = {  # every field, each with values of the wrong JSON type (or out of range)
        "id": [7, 1.5, True, None, [], {}],
        "prompt": [3, False, None, ["p"], {"p": 1}, ""],
        "messages": ["hi", 1, {}, [], [1], [{"role": 1, "content": "x"}], [{"role": "user"}]],
        "max_new_tokens": ["5", 5.5, True, [], {}, 0, -3, 1000],
        "temperature": ["hot", True, [], {}, -1, 101],
        "top_p": ["x", False, [], 0, 2, -0.5],
        "seed": ["s", 1.5, -1, 2**64, True],
        "stop": [5, [1], [""], {}, ["x" * 300], ["s"] * 100],
        "metadata": ["m", 5, [1], True, {"b": "x" * 20_000}],
    }
    kind = index % 16
    if kind == 0:
        return rng.choice([b"{not json", b"", b"   ", b'{"id": "x", ', b"}{", b"\x00\x01"]), {"not_json"}, None
    if kind == 1:
        body = json.dumps({**ok, "prompt": "p"}).encode()  # \xff never occurs in UTF-8
        return (
            body[: rng.randint(0, len(body))] + b"\xff" + bytes(rng.randrange(256) for _ in range(8)),
            {"not_utf8"},
            None,
        )
    if kind in (2, 3, 4):
        field = rng.choice(sorted(wrong_types))
        value = rng.choice(wrong_types[field])
        body = {**ok, field: value} if field != "messages" else {"id": rid, "messages": value}
        return json.dumps(body).encode(), {"wrong_type", "out_of_range", "too_large", "missing_field"}, None
    if kind == 5:
        return rng.choice([b"[1, 2]", b'"a string"', b"42", b"null", b"true"]), {"not_object"}, None
    if kind == 6:
        return None, {"empty"}, b"tombstone-key"
    if kind == 7:
        return (
            json.dumps({**ok, "id": rng.choice(["", "   ", "x" * 10_000, "a\u0000b", "tab\there"])}).encode(),
            {"out_of_range"},
            None,
        )
    if kind == 8:
        return (
            json.dumps({**ok, **{f"extra{i}": i for i in range(rng.randint(1, 30))}}).encode(),
            {"unknown_field"},
            None,
        )
    if kind == 9:
        return (
            b'{"id": "' + rid.encode() + b'", "prompt": "p", "metadata": {"a": ' + nested(5000).encode() + b"}}",
            {"not_json"},
            None,
        )
    if kind == 10:
        return (
            rng.choice(
                [
                    b'{"id": "%s", "prompt": "p", "temperature": NaN}' % rid.encode(),
                    b'{"id": "%s", "prompt": "\\ud800"}' % rid.encode(),
                    b'{"id": "%s", "prompt": "p", "metadata": {"n": 1e999}}' % rid.encode(),
                ]
            ),
            {"not_json", "not_utf8"},
            None,
        )
    if kind == 11:
        return json.dumps({"id": rid, "prompt": "The quick brown fox " * 160}).encode(), {"prompt_too_long"}, None
    if kind == 12:
        return json.dumps({"id": rid, "prompt": "p", "messages": []}).encode(), {"conflicting_fields"}, None
    if kind == 13 and index % 32 == 13:  # an id already used by a good request, with another request
        return json.dumps({"id": rng.choice(good_ids), "prompt": "a different prompt"}).encode(), {"id_conflict"}, None
    if kind == 14 and index % 192 == 14:  # a few 2 MB prompts (valid JSON)
        return json.dumps({**ok, "prompt": "A" * 2_000_000}).encode(), {"too_large"}, None
    if kind == 14 and index % 192 == 62:  # valid, but its completion could never be produced: a 1.1 MB key
        return json.dumps({**ok, "max_new_tokens": 2}).encode(), {"undeliverable"}, b"K" * 1_100_000
    return json.dumps({"id": rid}).encode(), {"missing_field"}, None


@pytest.mark.postgres
def test_d_fuzzed_bad_records_among_good_ones(
    tmp_path, daemon_processes, kafka_names, postgres_url, tiny_models, fault_figures
):
    started = time.monotonic()
    rng = random.Random(1503)
    target_dir, draft_dir = tiny_models
    settings = daemon_settings(
        kafka_names,
        postgres_url,
        target_dir,
        draft_dir,
        batching={"queue_size": 128},
        engine={"proposer": "draft", "k": 3, "max_seq_len": 256, "top_m": 4, "max_batch_size": 8},
        limits={"max_message_bytes": 1_000_000, "default_max_new_tokens": 6},
        daemon={"log_level": "INFO"},
    )
    daemon = DaemonProcess(write_config(tmp_path / "config.yaml", settings), tmp_path / "daemon.log")
    daemon_processes.append(daemon)
    clean_ids = [f"clean-{i:03d}" for i in range(200)]
    produce(kafka_names.bootstrap, kafka_names.prompts, [good_record(rng, i) for i in clean_ids])
    # Each stream is in Kafka before the daemon starts: the time from ready to done is the daemon's alone.
    completions = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    clean_seconds = run_until(daemon.start(), lambda: answered(completions.records) >= set(clean_ids), [completions])

    good_ids = [f"good-{i:03d}" for i in range(200)]
    stream, expected = [], {}  # expected: offset -> reason codes it may get
    first_offset = len(clean_ids)
    for index in range(1000):
        if index % 5 == 0:
            stream.append(good_record(rng, good_ids[index // 5]))
        value, codes, key = bad_value(rng, index, good_ids[: index // 5 + 1])
        expected[first_offset + len(stream)] = codes
        stream.append((key or f"bad-{index}".encode(), value, rng.choice(ODD_HEADERS) if rng.random() < 0.1 else None))
    produce(kafka_names.bootstrap, kafka_names.prompts, stream, max_request_size=8_000_000)
    completions = TopicReader(kafka_names.bootstrap, kafka_names.completions)  # both streams' answers
    dlq = TopicReader(kafka_names.bootstrap, kafka_names.dlq)
    fuzz_seconds = run_until(
        daemon.start(),
        lambda: answered(completions.records) >= set(good_ids) and len(dlq.records) >= len(expected),
        [completions, dlq],
    )

    by_offset: dict[int, list] = {}
    for record in dlq.records:
        by_offset.setdefault(int(header(record, "original-offset")), []).append(record)
    assert sorted(by_offset) == sorted(expected)  # every bad record on the DLQ, nothing else
    wrong = {
        o: (header(rs[0], "reason-code"), header(rs[0], "reason"))
        for o, rs in by_offset.items()
        if header(rs[0], "reason-code") not in expected[o] or not header(rs[0], "reason")
    }
    assert not wrong, wrong
    codes: dict[str, int] = {}
    for records in by_offset.values():
        codes[header(records[0], "reason-code")] = codes.get(header(records[0], "reason-code"), 0) + 1
    dead_rows = rows(postgres_url, "SELECT kafka_offset, COUNT(*) FROM dead_letters GROUP BY kafka_offset")
    figures = delivery_figures(postgres_url, clean_ids + good_ids, completions.records)
    clean_rate, fuzz_rate = len(clean_ids) / clean_seconds, len(good_ids) / fuzz_seconds
    log = daemon.log_path.read_text(errors="replace")
    figures.update(
        bad_records=len(expected),
        dlq_records=len(dlq.records),
        dlq_duplicates=len(dlq.records) - len(by_offset),
        dead_letter_rows=sum(n for _, n in dead_rows),
        dlq_by_reason=dict(sorted(codes.items())),
        stalls=stall_lines(log),
        clean_seconds=round(clean_seconds, 2),
        fuzzed_seconds=round(fuzz_seconds, 2),
        clean_good_per_s=round(clean_rate, 1),
        fuzzed_good_per_s=round(fuzz_rate, 1),
        seconds=round(time.monotonic() - started, 1),
    )
    fault_figures.record("d_fuzz", **figures)
    assert_exactly_once(figures)
    assert figures["copies_on_topic"] == len(clean_ids + good_ids) and figures["resent_copies"] == 0, figures
    assert dict(dead_rows) == dict.fromkeys(expected, 1), "one dead_letters row per bad record"
    assert figures["stalls"] == 0 and fuzz_rate >= clean_rate / 2, figures


def test_e_sigterm_mid_stream(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models, fault_figures):
    started = time.monotonic()
    grace = 15.0
    ids = [f"t{i:03d}" for i in range(120)]
    sections = {**FAST, "daemon": {"shutdown_grace_s": grace}, "limits": {"default_max_new_tokens": 24}}
    daemon = start_daemon(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models, **sections)
    daemon.wait_ready()
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids, max_new_tokens=24))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    reader.read_until(lambda rs: len(answered(rs)) >= random.Random(3).randint(10, 40), timeout=90)
    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(grace + 5) == 0
    exit_seconds = time.monotonic() - signalled
    summary = [line for line in daemon.log().splitlines() if "onlinespec stopped" in line]
    assert len(summary) == 1 and "SIGTERM" in summary[0] and "drained" in summary[0]
    served_first = sum(completion_rows(sqlite_url).values())
    assert 0 < served_first < len(ids), "SIGTERM should arrive while the stream is busy"

    restarted = DaemonProcess(daemon.config, daemon.log_path)
    daemon_processes.append(restarted.start())
    records = serve_the_rest(restarted, reader, ids)

    figures = delivery_figures(sqlite_url, ids, records)
    figures.update(
        exit_code=0,
        exit_seconds=round(exit_seconds, 2),
        grace_seconds=grace,
        served_before_sigterm_exit=served_first,
        stalls=stall_lines(restarted.log_path.read_text()),
        seconds=round(time.monotonic() - started, 1),
    )
    fault_figures.record("e_sigterm", **figures)
    assert_exactly_once(figures)
    assert exit_seconds < grace and figures["copies_on_topic"] == len(ids) and figures["resent_copies"] == 0, figures


def test_f_a_checkpoint_with_one_flipped_byte_is_refused_everywhere(
    tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models, fault_figures
):
    from pipelines.models import load_model, model_identity
    from storage.artifacts import CheckpointStore
    from storage.checkpoints_repo import add_checkpoint, get_active_checkpoint, set_active
    from storage.db import make_engine, make_session_factory
    from storage.errors import CheckpointIntegrityError

    started = time.monotonic()
    target_dir, draft_dir = tiny_models
    store = CheckpointStore(tmp_path / "checkpoints")
    base = load_model(str(draft_dir)).state_dict()
    identity = model_identity(load_model(str(target_dir)))
    engine = make_engine(sqlite_url)
    session_factory = make_session_factory(engine)
    stored, ids_of_version = {}, {}
    with session_factory.begin() as session:
        for version, shift in (("A", 0.01), ("B", 0.02)):
            stored[version] = store.put({n: t + shift for n, t in base.items()})
            ids_of_version[version] = add_checkpoint(
                session,
                version=version,
                sha256=stored[version].sha256,
                size_bytes=stored[version].size_bytes,
                path=str(stored[version].path),
                learner="manual",
                learner_settings={},
                target_identity=identity,
            ).id
        set_active(session, ids_of_version["A"], "operator:test", "A first")
        set_active(session, ids_of_version["B"], "operator:test", "then B")
    damaged = stored["A"].path
    damaged.chmod(0o644)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    damaged.write_bytes(bytes(data))
    refusals = {}

    with pytest.raises(CheckpointIntegrityError, match="is damaged") as caught:  # on load
        store.get(stored["A"].sha256)
    refusals["load"] = str(caught.value)
    rolled = onlinespec_checkpoints(sqlite_url, "rollback", "--reason", "B regressed")  # back to the damaged A
    assert rolled.returncode == 1 and "not rolling back to A" in rolled.stderr and "damaged" in rolled.stderr
    refusals["rollback"] = rolled.stderr.strip().splitlines()[-1]
    promoted = onlinespec_checkpoints(sqlite_url, "promote", "A")
    assert promoted.returncode == 1 and "damaged" in promoted.stderr
    refusals["promote"] = promoted.stderr.strip().splitlines()[-1]
    with session_factory.begin() as session:
        assert get_active_checkpoint(session).version == "B"  # neither command moved the pointer
        set_active(session, ids_of_version["A"], "operator:test", "A again")  # as if damaged after promotion
    engine.dispose()

    daemon = start_daemon(
        tmp_path,
        daemon_processes,
        kafka_names,
        sqlite_url,
        tiny_models,
        **FAST,
        learning={"checkpoint_dir": str(tmp_path / "checkpoints"), "follow_interval_ms": 0},
    )
    daemon.wait_ready()
    ids = [f"f{i}" for i in range(8)]
    produce(kafka_names.bootstrap, kafka_names.prompts, stream_records(ids))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    records = reader.read_until(lambda rs: answered(rs) >= set(ids), timeout=90)
    reader.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    log = daemon.log()
    refusal = next(line for line in log.splitlines() if "cannot follow the active draft" in line)
    assert "CheckpointIntegrityError" in refusal and "refusing to load it" in refusal
    assert {json.loads(r.value)["draft_version"] for r in records} == {"base"}  # A is never served
    assert "-> A" not in log
    refusals["daemon_start"] = refusal

    fault_figures.record(
        "f_flipped_byte",
        refusals=len(refusals),
        served_by_the_damaged_version=0,
        completions=len(records),
        seconds=round(time.monotonic() - started, 1),
    )


def onlinespec_checkpoints(database_url: str, *argv: str):
    import subprocess
    import sys

    from tests.daemon_fixtures import REPO

    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "checkpoints", *argv, "--database-url", database_url],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
