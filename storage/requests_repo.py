"""The worker's write path: requests as they arrive, then completion + feedback for a whole batch.

Exactly-once effects on top of at-least-once Kafka delivery rest on two keys:
- `requests.request_id` (the message's `id`): a redelivered or re-sent id is recognised, never inserted twice;
  `requests.request_hash` tells a retry of the same request from a different request under the same id;
- `completions.request_id`: at most one completion per request, even when two workers decode the same id
  (a rebalance mid-batch); the later one gets the stored message back and produces that instead of its own.

Serving a record (the daemon's admission, daemon/serving/ledger.py, decides with these rows):
    another request hash       -> a conflict: dead-letter the record, leave the request alone
    completion exists          -> produce completion.message_json again, do not decode
    status == dead_lettered    -> the same record again: re-send its dead letter; a corrected request
                                  (readmit_dead_lettered): decode it
    otherwise                  -> decode, then store_results(...) and produce what it returns

Inserts use INSERT ... ON CONFLICT DO NOTHING (SQLite and PostgreSQL), so concurrent writers of the same id
never raise: the first commit wins and the others see its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipelines.types import GenerationResult
from storage.db import dialect_insert
from storage.models import (
    MAX_REQUEST_ID_CHARS,
    Completion,
    Feedback,
    Request,
    RequestStatus,
    storable_text,
    utcnow,
)
from storage.packing import pack_feedback, pack_token_ids


@dataclass(frozen=True)
class ReceivedRequest:
    request_id: str
    topic: str | None  # None (with partition and offset) for requests that did not come from Kafka
    partition: int | None
    offset: int | None
    params: dict[str, Any]
    prompt_tokens: int | None
    request_hash: str | None = None  # daemon.serving.messages.request_hash; None when not parsed

    def same_position(self, row: Request) -> bool:
        return (row.kafka_topic, row.kafka_partition, row.kafka_offset) == (self.topic, self.partition, self.offset)


@dataclass
class ReceivedBatch:
    """Outcome of record_requests_received: one entry per distinct request id."""

    requests: dict[str, tuple[Request, bool]] = field(default_factory=dict)  # id -> (row, is_new)


@dataclass(frozen=True)
class CompletedRequest:
    """One decoded request ready to store: the engine's result and the output message exactly as produced."""

    result: GenerationResult
    message_json: str
    timings: dict[str, float] = field(default_factory=dict)


def record_request_received(
    session: Session,
    request_id: str,
    topic: str | None,
    partition: int | None,
    offset: int | None,
    params: dict[str, Any],
    prompt_tokens: int | None,
    *,
    request_hash: str | None = None,
    received_at: datetime | None = None,
) -> tuple[Request, bool]:
    """Record one request; returns (row, is_new). Idempotent and safe when processes race on the same id."""
    received = ReceivedRequest(request_id, topic, partition, offset, params, prompt_tokens, request_hash)
    return record_requests_received(session, [received], received_at=received_at).requests[request_id]


def record_requests_received(
    session: Session, received: Sequence[ReceivedRequest], *, received_at: datetime | None = None
) -> ReceivedBatch:
    """Record a poll's worth of requests in one statement. An id seen before (earlier, or twice in this batch)
    comes back with is_new False and its first row."""
    for item in received:
        if not item.request_id or len(item.request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request id must be 1-{MAX_REQUEST_ID_CHARS} characters, got {len(item.request_id)}")
    batch = ReceivedBatch()
    if not received:
        return batch
    now = received_at or utcnow()
    rows = [
        dict(
            request_id=r.request_id,
            kafka_topic=r.topic,
            kafka_partition=r.partition,
            kafka_offset=r.offset,
            status=RequestStatus.RECEIVED.value,
            received_at=now,
            prompt_tokens=r.prompt_tokens,
            params=r.params,
            request_hash=r.request_hash,
        )
        for r in sorted(received, key=_request_id)
    ]
    insert = dialect_insert(session, Request).on_conflict_do_nothing().returning(Request.request_id)
    inserted = set(session.scalars(insert, rows))
    ids = {r.request_id for r in received}
    stored = {row.request_id: row for row in session.scalars(select(Request).where(Request.request_id.in_(ids)))}
    for item in received:
        if item.request_id not in batch.requests:
            batch.requests[item.request_id] = (stored[item.request_id], item.request_id in inserted)
    return batch


def _request_id(item: ReceivedRequest) -> str:
    # Rows go in in id order: two PostgreSQL transactions inserting overlapping ids (a rebalance hands a batch to
    # a second worker) then wait on each other in the same order instead of deadlocking.
    return item.request_id


def readmit_dead_lettered(session: Session, received: ReceivedRequest, *, received_at: datetime | None = None) -> bool:
    """A dead-lettered request sent again, corrected, under its id: the row becomes this record's (position,
    hash, params) and is received again. False when the row is no longer dead-lettered (another worker got it)."""
    result = session.execute(
        update(Request)
        .where(Request.request_id == received.request_id, Request.status == RequestStatus.DEAD_LETTERED.value)
        .values(
            status=RequestStatus.RECEIVED.value,
            error=None,
            kafka_topic=received.topic,
            kafka_partition=received.partition,
            kafka_offset=received.offset,
            params=received.params,
            prompt_tokens=received.prompt_tokens,
            request_hash=received.request_hash,
            received_at=received_at or utcnow(),
        )
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


def find_completion(session: Session, request_id: str) -> Completion | None:
    return session.get(Completion, request_id)


def find_completions(session: Session, request_ids: Sequence[str]) -> dict[str, Completion]:
    """The stored completions among `request_ids` (one query for a batch of redeliveries)."""
    if not request_ids:
        return {}
    rows = session.scalars(select(Completion).where(Completion.request_id.in_(set(request_ids))))
    return {row.request_id: row for row in rows}


def store_results(
    session: Session,
    completed: Sequence[CompletedRequest],
    *,
    target_identity: str,
    completed_at: datetime | None = None,
) -> dict[str, str]:
    """Store completion + feedback rows for a batch and mark the requests completed, in the caller's transaction.

    Every request must have been recorded (record_request_received) first. Returns request id -> the message
    to produce: the given one when this call stored it, the earlier stored one when another worker got there
    first (its completion, feedback and status are left untouched).
    """
    if not completed:
        return {}
    now = completed_at or utcnow()
    completed = sorted(completed, key=lambda item: item.result.id)
    completion_rows = [_completion_row(item, now) for item in completed]
    insert = dialect_insert(session, Completion).on_conflict_do_nothing().returning(Completion.request_id)
    inserted = set(session.scalars(insert, completion_rows))
    feedback_rows = [
        _feedback_row(item.result, target_identity, now) for item in completed if item.result.id in inserted
    ]
    if feedback_rows:
        session.execute(dialect_insert(session, Feedback).on_conflict_do_nothing(), feedback_rows)
    if inserted:
        session.execute(
            update(Request)
            .where(Request.request_id.in_(inserted))
            .values(status=RequestStatus.COMPLETED.value, completed_at=now, error=None)
        )
    to_produce = {item.result.id: item.message_json for item in completed if item.result.id in inserted}
    already_stored = [item.result.id for item in completed if item.result.id not in inserted]
    for request_id, completion in find_completions(session, already_stored).items():
        to_produce[request_id] = completion.message_json
    return to_produce


def _completion_row(item: CompletedRequest, now: datetime) -> dict[str, Any]:
    result, counters = item.result, item.result.counters
    return dict(
        request_id=result.id,
        text=storable_text(result.text),
        token_ids=pack_token_ids(result.token_ids),
        finish_reason=result.finish_reason,
        draft_version=result.feedback.draft_version,
        draft_steps=counters.draft_steps,
        drafted=counters.drafted,
        accepted=counters.accepted,
        target_forwards=counters.target_forwards,
        emitted=counters.emitted,
        accepted_at_position=list(counters.accepted_at_position),
        decode_seconds=float(result.seconds),
        timings=dict(item.timings),
        message_json=item.message_json,
        by_proposer=counters.by_proposer or None,
        created_at=now,
    )


def _feedback_row(result: GenerationResult, target_identity: str, now: datetime) -> dict[str, Any]:
    counters = result.counters
    return dict(
        request_id=result.id,
        target_identity=target_identity,
        created_at=now,
        draft_steps=counters.draft_steps,
        drafted=counters.drafted,
        accepted=counters.accepted,
        target_forwards=counters.target_forwards,
        emitted=counters.emitted,
        **pack_feedback(result.feedback).columns(),
    )


@dataclass(frozen=True)
class DeadLetteredRequest:
    """A record with a usable request id that went to the DLQ."""

    request_id: str
    topic: str | None
    partition: int | None
    offset: int | None
    reason: str


def mark_dead_lettered(
    session: Session,
    request_id: str,
    reason: str,
    *,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> Request:
    """mark_requests_dead_lettered for one record; returns the request's row."""
    mark_requests_dead_lettered(session, [DeadLetteredRequest(request_id, topic, partition, offset, reason)])
    return session.get(Request, request_id, populate_existing=True)


def mark_requests_dead_lettered(session: Session, letters: Sequence[DeadLetteredRequest]) -> None:
    """Record that these records went to the DLQ with their reasons, recording each request first if it was never
    received (input rejected before it got that far). Two statements however many letters.

    Only the row of the very record changes: a completed request stays completed, and an id received earlier at
    another position (a retry, a conflict) leaves that request alone - the DLQ message and the dead_letters row
    carry this record's reason."""
    if not letters:
        return
    now = utcnow()
    first_of_id = {}
    for letter in letters:
        first_of_id.setdefault(letter.request_id, letter)
    rows = [
        dict(
            request_id=letter.request_id,
            kafka_topic=letter.topic,
            kafka_partition=letter.partition,
            kafka_offset=letter.offset,
            status=RequestStatus.DEAD_LETTERED.value,
            received_at=now,
            prompt_tokens=None,
            params={},
            error=storable_text(letter.reason),
        )
        for letter in sorted(first_of_id.values(), key=lambda letter: letter.request_id)
    ]
    insert = dialect_insert(session, Request).on_conflict_do_nothing().returning(Request.request_id)
    inserted = set(session.scalars(insert, rows))
    known = [letter for letter in letters if letter.request_id not in inserted]
    if not known:
        return
    stored = {
        row.request_id: row
        for row in session.scalars(
            select(Request).where(Request.request_id.in_({letter.request_id for letter in known}))
        )
    }
    for letter in known:
        row = stored[letter.request_id]
        same_record = (row.kafka_topic, row.kafka_partition, row.kafka_offset) == (
            letter.topic,
            letter.partition,
            letter.offset,
        )
        if same_record and row.status != RequestStatus.COMPLETED:
            row.status = RequestStatus.DEAD_LETTERED.value
            row.error = storable_text(letter.reason)
    session.flush()
