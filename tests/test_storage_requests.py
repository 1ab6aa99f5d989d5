"""The worker's write path on SQLite and PostgreSQL: idempotent receipt, one completion per request, feedback
stored with the batch, redeliveries answered from the stored message, dead-lettered requests taken back when sent
again corrected, and the dead_letters table."""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import func, select

from storage.dead_letters_repo import DeadLetterRecord, dead_letters_at, record_dead_letters
from storage.models import Completion, DeadLetter, Feedback, Request, RequestStatus
from storage.packing import unpack_feedback, unpack_token_ids
from storage.requests_repo import (
    CompletedRequest,
    ReceivedRequest,
    find_completion,
    find_completions,
    mark_dead_lettered,
    readmit_dead_lettered,
    record_request_received,
    record_requests_received,
    store_results,
)
from tests.storage_fixtures import make_result
from tests.test_storage_packing import assert_same_feedback

TARGET = "target-0123456789abcdef"
PARAMS = {"max_new_tokens": 12, "temperature": 0.0, "metadata": {"user": "u1"}}


def receive(session, request_id, offset, topic="prompts", partition=0):
    return record_request_received(session, request_id, topic, partition, offset, PARAMS, prompt_tokens=5)


def completed(request_id, seed=0):
    result = make_result(request_id, seed=seed)
    message = json.dumps({"id": request_id, "text": result.text, "seed": seed})
    return CompletedRequest(result, message, {"queue_ms": 1.5, "decode_ms": 250.0})


def count(session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_first_receipt_is_new_and_repeats_are_not(db_session_factory):
    with db_session_factory.begin() as session:
        row, is_new = receive(session, "r1", offset=10)
        assert is_new and row.status == RequestStatus.RECEIVED and row.params == PARAMS
        assert row.received_at.tzinfo is not None
    with db_session_factory.begin() as session:
        again, is_new = receive(session, "r1", offset=10)  # redelivery of the same record
        assert not is_new and (again.kafka_topic, again.kafka_offset) == ("prompts", 10)
        resent, is_new = receive(session, "r1", offset=11)  # the producer re-sent the id as a new record
        assert not is_new and resent.kafka_offset == 10  # the first position is kept
        assert count(session, Request) == 1


def test_batch_receipt_keeps_the_first_row_of_an_id_and_positions_may_repeat(db_session_factory):
    with db_session_factory.begin() as session:
        receive(session, "old", offset=3)
    items = [
        ReceivedRequest("a", "prompts", 0, 1, PARAMS, 5, "hash-a"),
        ReceivedRequest("a", "prompts", 0, 2, PARAMS, 5, "hash-a"),  # same id twice in one poll
        ReceivedRequest("b", "prompts", 0, 3, PARAMS, 5, "hash-b"),  # a re-created topic reuses old's offset
        ReceivedRequest("old", "prompts", 0, 3, PARAMS, 5),  # redelivery
        ReceivedRequest("cli", None, None, None, PARAMS, 5),  # not from Kafka
        ReceivedRequest("cli2", None, None, None, PARAMS, 5),
    ]
    with db_session_factory.begin() as session:
        batch = record_requests_received(session, items)
        assert {rid: is_new for rid, (_, is_new) in batch.requests.items()} == {
            "a": True,
            "b": True,
            "old": False,
            "cli": True,
            "cli2": True,
        }
        first, _ = batch.requests["a"]
        assert (first.kafka_offset, first.request_hash) == (1, "hash-a")
        assert items[0].same_position(first) and not items[1].same_position(first)
        assert batch.requests["b"][0].kafka_offset == batch.requests["old"][0].kafka_offset == 3


def test_a_dead_lettered_request_is_taken_back_by_its_corrected_resend_and_nothing_else(db_session_factory):
    corrected = ReceivedRequest("bad", "prompts", 0, 9, {"max_new_tokens": 8}, 4, "hash-corrected")
    with db_session_factory.begin() as session:
        mark_dead_lettered(session, "bad", "prompt_too_long: 900 tokens", topic="prompts", partition=0, offset=2)
        receive(session, "fine", offset=3)
        assert readmit_dead_lettered(session, corrected)
        assert not readmit_dead_lettered(session, ReceivedRequest("fine", "prompts", 0, 10, {}, 4, "h"))
        assert not readmit_dead_lettered(session, corrected)  # received now: a second resend does not move it
    with db_session_factory() as session:
        bad = session.get(Request, "bad")
        assert (bad.status, bad.error, bad.kafka_offset, bad.request_hash, bad.params, bad.prompt_tokens) == (
            "received",
            None,
            9,
            "hash-corrected",
            {"max_new_tokens": 8},
            4,
        )
        assert session.get(Request, "fine").kafka_offset == 3


def test_dead_letters_get_one_row_per_record_even_without_an_id(db_session_factory):
    letters = [
        DeadLetterRecord(None, "prompts", 0, 5, "not_json", "value is not JSON", b"{broken"),
        DeadLetterRecord("r7", "prompts", 0, 6, "prompt_too_long", "x" * 10_000, b'{"id": "r7"}'),
        DeadLetterRecord(None, "prompts", 0, 7, "empty", "record has no value (tombstone)", None),
    ]
    with db_session_factory.begin() as session:
        assert record_dead_letters(session, letters, keep_values=False) == 3
    with db_session_factory.begin() as session:  # redelivered: no second row; a re-created topic's record: its own
        again = letters + [DeadLetterRecord(None, "prompts", 0, 5, "not_json", "another record", b"{other")]
        assert record_dead_letters(session, again, keep_values=True) == 1
    with db_session_factory() as session:
        rows = dead_letters_at(session, "prompts", 0)
        assert [(r.kafka_offset, r.request_id, r.reason_code) for r in rows] == [
            (5, None, "not_json"),
            (5, None, "not_json"),
            (6, "r7", "prompt_too_long"),
            (7, None, "empty"),
        ]
        broken, other, long_reason, tombstone = rows
        assert (broken.value_size, broken.value_sha256, broken.value) == (
            7,
            hashlib.sha256(b"{broken").hexdigest(),
            None,
        )
        assert other.value == b"{other"  # keep_values: the whole value is kept
        assert len(long_reason.reason) == 4096
        assert (tombstone.value_size, tombstone.value_sha256) == (None, None)
        assert count(session, DeadLetter) == 4


def test_text_with_nul_is_stored_on_every_backend(db_session_factory):
    """PostgreSQL's text type cannot hold NUL: the stored copies carry U+FFFD, the produced message is exact."""
    item = completed("nul")
    item.result.text = "before\x00after"
    with db_session_factory.begin() as session:
        receive(session, "nul", offset=0)
        store_results(session, [item], target_identity=TARGET)
        mark_dead_lettered(session, "other", "unknown field(s): a\x00b", topic="prompts", partition=0, offset=1)
        record_dead_letters(
            session, [DeadLetterRecord(None, "prompts", 0, 2, "unknown_field", "a\x00b", b"{}")], keep_values=False
        )
    with db_session_factory() as session:
        assert find_completion(session, "nul").text == "before\ufffdafter"
        assert session.get(Request, "other").error == "unknown field(s): a\ufffdb"
        assert dead_letters_at(session, "prompts")[0].reason == "a\ufffdb"


def test_request_id_length_is_checked(db_session_factory):
    with db_session_factory.begin() as session, pytest.raises(ValueError, match="1-512 characters"):
        receive(session, "x" * 513, offset=1)


def test_store_results_writes_completion_feedback_and_status(db_session_factory):
    items = [completed("r1", seed=1), completed("r2", seed=2)]
    with db_session_factory.begin() as session:
        for offset, item in enumerate(items):
            receive(session, item.result.id, offset)
    with db_session_factory.begin() as session:
        to_produce = store_results(session, items, target_identity=TARGET)
    assert to_produce == {item.result.id: item.message_json for item in items}

    with db_session_factory() as session:
        request = session.get(Request, "r1")
        assert request.status == RequestStatus.COMPLETED and request.completed_at >= request.received_at
        completion = find_completion(session, "r1")
        result = items[0].result
        assert completion.message_json == items[0].message_json
        assert unpack_token_ids(completion.token_ids) == result.token_ids
        assert (completion.drafted, completion.accepted, completion.emitted) == (
            result.counters.drafted,
            result.counters.accepted,
            result.counters.emitted,
        )
        assert completion.timings == {"queue_ms": 1.5, "decode_ms": 250.0}
        feedback = session.scalar(select(Feedback).where(Feedback.request_id == "r1"))
        assert feedback.target_identity == TARGET and feedback.draft_version == "base"
        assert_same_feedback(unpack_feedback(feedback), result.feedback)
        assert set(find_completions(session, ["r1", "r2", "missing"])) == {"r1", "r2"}
        assert find_completion(session, "missing") is None


def test_second_store_of_a_request_keeps_the_first_and_returns_its_message(db_session_factory):
    """Two workers decoded the same id (a rebalance mid-batch): exactly one completion, and both produce it."""
    first, second = completed("r1", seed=1), completed("r1", seed=2)
    with db_session_factory.begin() as session:
        receive(session, "r1", 0)
        receive(session, "r2", 1)
    with db_session_factory.begin() as session:
        assert store_results(session, [first], target_identity=TARGET) == {"r1": first.message_json}
    with db_session_factory.begin() as session:
        to_produce = store_results(session, [second, completed("r2")], target_identity=TARGET)
    assert to_produce == {"r1": first.message_json, "r2": completed("r2").message_json}
    with db_session_factory() as session:
        assert count(session, Completion) == 2 and count(session, Feedback) == 2
        assert find_completion(session, "r1").message_json == first.message_json


def test_store_results_rolls_back_with_the_callers_transaction(db_session_factory):
    with db_session_factory.begin() as session:
        receive(session, "r1", 0)
    with pytest.raises(RuntimeError), db_session_factory.begin() as session:
        store_results(session, [completed("r1")], target_identity=TARGET)
        raise RuntimeError("produce failed before commit")
    with db_session_factory() as session:
        assert count(session, Completion) == 0 and count(session, Feedback) == 0
        assert session.get(Request, "r1").status == RequestStatus.RECEIVED


def test_dead_lettered(db_session_factory):
    with db_session_factory.begin() as session:
        receive(session, "r1", 0)
        receive(session, "done", 1)
        store_results(session, [completed("done")], target_identity=TARGET)
        rejected = mark_dead_lettered(
            session, "bad", "validation: unknown field 'x'", topic="prompts", partition=0, offset=2
        )
        duplicate = mark_dead_lettered(
            session, "r1", "id_conflict: another request", topic="prompts", partition=0, offset=3
        )
        completed_row = mark_dead_lettered(session, "done", "must not apply", topic="prompts", partition=0, offset=1)
    with db_session_factory() as session:
        assert (
            session.get(Request, "r1").status == RequestStatus.RECEIVED
        )  # the conflicting copy left the original alone
        assert session.get(Request, "r1").error is None
        assert duplicate.request_id == "r1"
        bad = session.get(Request, "bad")
        assert (bad.status, bad.error, bad.prompt_tokens) == ("dead_lettered", "validation: unknown field 'x'", None)
        assert rejected.kafka_offset == 2
        assert session.get(Request, "done").status == completed_row.status == RequestStatus.COMPLETED
    with db_session_factory.begin() as session:
        again = mark_dead_lettered(session, "bad", "redelivered", topic="prompts", partition=0, offset=2)
        assert again.error == "redelivered"


def test_store_requires_a_received_request(db_session_factory):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), db_session_factory.begin() as session:
        store_results(session, [completed("never-received")], target_identity=TARGET)
