"""Admission and save on SQLite and PostgreSQL: what the request id and its hash decide for a record (decode,
resend, wait for the copy in flight, conflict, a corrected resend, the same dead letter again), and that every
dead letter is recorded."""

from __future__ import annotations

import json

import pytest
from kafka.structs import TopicPartition

from daemon.config import LimitSettings
from daemon.serving.batching import Inbound
from daemon.serving.ledger import BatchStore, Decoded
from daemon.serving.messages import InvalidMessage, parse_prompt, request_hash
from pipelines.types import GenerationRequest
from storage.dead_letters_repo import dead_letters_at
from storage.models import Request
from tests.storage_fixtures import make_result

TP = TopicPartition("prompts", 0)
LIMITS = LimitSettings()


def record(offset: int, request_id: str, prompt: str = "hello", **fields) -> Inbound:
    """A validated record as the poll thread hands it over."""
    value = json.dumps({"id": request_id, "prompt": prompt, **fields}).encode()
    item = Inbound(TP, offset, request_id.encode(), value, [], epoch=1)
    item.message = parse_prompt(value, LIMITS)
    item.request = GenerationRequest(request_id, input_ids=[1, 2, 3], max_new_tokens=item.message.max_new_tokens)
    item.request_hash = request_hash(item.message)
    return item


def rejected(offset: int, request_id: str | None, code: str = "prompt_too_long") -> tuple[Inbound, InvalidMessage]:
    value = json.dumps({"id": request_id, "prompt": "far too long"}).encode()
    return Inbound(TP, offset, None, value, [], epoch=1), InvalidMessage(code, "a reason", request_id)


def complete(store: BatchStore, *items: Inbound) -> dict[str, str]:
    decoded = [
        Decoded(item, make_result(item.request.id), json.dumps({"id": item.request.id, "at": item.offset}))
        for item in items
    ]
    return store.save(decoded, []).messages


def sorted_ids(admission) -> dict[str, list]:
    return {
        "decode": [i.offset for i in admission.decode],
        "resend": [i.offset for i, _ in admission.resend],
        "wait": [i.offset for i in admission.wait],
        "rejected": [(i.offset, e.code) for i, e in admission.rejected],
    }


@pytest.fixture
def store(db_session_factory) -> BatchStore:
    return BatchStore(db_session_factory, target_identity="tiny", keep_dead_letter_values=True)


def test_new_ids_decode_and_a_copy_in_the_same_batch_waits_for_the_first(store):
    admission = store.admit([record(0, "a"), record(1, "b"), record(2, "a")])
    assert sorted_ids(admission) == {"decode": [0, 1], "resend": [], "wait": [2], "rejected": []}
    first = Decoded(admission.decode[0], make_result("a"), '{"id": "a"}')
    saved = store.save([first], [], admission.wait)
    assert [(item.offset, message) for item, message in saved.answered] == [(2, '{"id": "a"}')] and not saved.dead


def test_a_retry_of_a_stored_request_is_answered_from_storage(store):
    complete(store, *store.admit([record(0, "a")]).decode)
    admission = store.admit([record(7, "a"), record(0, "a")])  # a client retry and a redelivery
    assert sorted_ids(admission) == {"decode": [], "resend": [7, 0], "wait": [], "rejected": []}
    assert {message for _, message in admission.resend} == {json.dumps({"id": "a", "at": 0})}


def test_a_copy_of_a_request_in_flight_in_this_daemon_waits_and_elsewhere_decodes(store):
    store.admit([record(0, "a")])  # admitted, not stored yet
    assert sorted_ids(store.admit([record(5, "a")], in_flight={"a"}))["wait"] == [5]
    # Not in flight here: its first copy died mid-batch (or another worker has it): decode, first store wins.
    assert sorted_ids(store.admit([record(6, "a")]))["decode"] == [6]
    assert sorted_ids(store.admit([record(0, "a")]))["decode"] == [0]  # the redelivery after a crash


def test_the_same_id_with_another_request_is_a_conflict_that_names_the_first_position(
    store, db_session_factory, caplog
):
    complete(store, *store.admit([record(3, "a")]).decode)
    for changed in (
        record(9, "a", prompt="another"),
        record(10, "a", max_new_tokens=5),
        record(11, "a", metadata={"user": 1}),
    ):
        ((item, error),) = store.admit([changed]).rejected
        assert error.code == "id_conflict" and "first received at prompts/0@3" in error.reason
        assert error.request_id == "a" and "new id" in error.reason
    first_hash = record(3, "a").request_hash
    assert first_hash in caplog.text and record(9, "a", prompt="another").request_hash in caplog.text
    store.save([], [(item, error)])
    with db_session_factory() as session:
        assert session.get(Request, "a").status == "completed"  # the first request is untouched
        assert [(r.kafka_offset, r.reason_code) for r in dead_letters_at(session, "prompts")] == [(11, "id_conflict")]


def test_a_dead_lettered_request_sent_again_corrected_is_served(store, db_session_factory):
    store.save([], [rejected(4, "t")])
    with db_session_factory() as session:
        assert session.get(Request, "t").status == "dead_lettered"
    admission = store.admit([record(8, "t", prompt="short now")])
    assert sorted_ids(admission)["decode"] == [8]
    complete(store, admission.decode[0])
    with db_session_factory() as session:
        row = session.get(Request, "t")
        assert (row.status, row.kafka_offset, row.error) == ("completed", 8, None)
        assert row.request_hash == record(8, "t", prompt="short now").request_hash
    assert sorted_ids(store.admit([record(9, "t", prompt="short now")]))["resend"] == [9]


def test_a_redelivered_dead_letter_is_sent_again_with_its_reason_not_decoded(store):
    item = record(2, "e")
    store.admit([item])
    store.save([], [(item, InvalidMessage("engine_error", "engine error: RuntimeError: boom", "e"))])
    ((again, error),) = store.admit([record(2, "e")]).rejected
    assert (error.code, error.reason) == ("engine_error", "engine error: RuntimeError: boom")


def test_a_waiting_copy_whose_first_copy_failed_is_dead_lettered(store):
    first = store.admit([record(0, "a")]).decode[0]
    waiting = store.admit([record(1, "a")], in_flight={"a"}).wait
    saved = store.save([], [(first, InvalidMessage("engine_error", "boom", "a"))], waiting)
    assert [(item.offset, error.code) for item, error in saved.dead] == [(1, "not_completed")]


def test_every_dead_letter_has_a_row_with_or_without_an_id_and_its_value_when_kept(store, db_session_factory):
    no_id = (Inbound(TP, 20, None, b"\xff\xfe", [], epoch=1), InvalidMessage("not_utf8", "not UTF-8"))
    tombstone = (Inbound(TP, 21, b"k", None, [], epoch=1), InvalidMessage("empty", "tombstone"))
    store.save([], [no_id, tombstone, rejected(22, "x")])
    store.save([], [no_id])  # redelivered: recorded once
    with db_session_factory() as session:
        rows = dead_letters_at(session, "prompts")
        assert [(r.kafka_offset, r.request_id, r.reason_code, r.value_size) for r in rows] == [
            (20, None, "not_utf8", 2),
            (21, None, "empty", None),
            (22, "x", "prompt_too_long", rows[2].value_size),
        ]
        assert rows[0].value == b"\xff\xfe"  # keep_dead_letter_values
