"""The worker's write path on SQLite and PostgreSQL: idempotent receipt, one completion per request, feedback
stored with the batch, redeliveries answered from the stored message."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from storage.errors import KafkaPositionConflictError
from storage.models import Completion, Feedback, Request, RequestStatus
from storage.packing import unpack_feedback, unpack_token_ids
from storage.requests_repo import (
    CompletedRequest,
    ReceivedRequest,
    find_completion,
    find_completions,
    mark_dead_lettered,
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


def test_batch_receipt_reports_duplicates_and_position_conflicts(db_session_factory):
    with db_session_factory.begin() as session:
        receive(session, "old", offset=3)
    items = [
        ReceivedRequest("a", "prompts", 0, 1, PARAMS, 5),
        ReceivedRequest("a", "prompts", 0, 2, PARAMS, 5),  # same id twice in one poll
        ReceivedRequest("b", "prompts", 0, 3, PARAMS, 5),  # position already belongs to "old"
        ReceivedRequest("old", "prompts", 0, 3, PARAMS, 5),  # redelivery
        ReceivedRequest("cli", None, None, None, PARAMS, 5),  # not from Kafka: NULL positions never collide
        ReceivedRequest("cli2", None, None, None, PARAMS, 5),
    ]
    with db_session_factory.begin() as session:
        batch = record_requests_received(session, items)
        assert {rid: is_new for rid, (_, is_new) in batch.requests.items()} == {
            "a": True, "old": False, "cli": True, "cli2": True,
        }  # fmt: skip
        assert batch.requests["a"][0].kafka_offset == 1
        assert [(c.received.request_id, c.existing_request_id) for c in batch.conflicts] == [("b", "old")]
        assert "prompts/0@3" in batch.conflicts[0].describe()
        with pytest.raises(KafkaPositionConflictError, match="already recorded for 'old'"):
            receive(session, "c", offset=3)


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
            result.counters.drafted, result.counters.accepted, result.counters.emitted,
        )  # fmt: skip
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
        rejected = mark_dead_lettered(session, "bad", "validation: unknown field 'x'", topic="prompts", partition=0,
                                      offset=2)  # fmt: skip
        duplicate = mark_dead_lettered(session, "r1", "duplicate id", topic="prompts", partition=0, offset=3)
        completed_row = mark_dead_lettered(session, "done", "must not apply", topic="prompts", partition=0, offset=1)
    with db_session_factory() as session:
        assert session.get(Request, "r1").status == RequestStatus.RECEIVED  # the duplicate left the original alone
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
