"""Dead letters: every record the daemon sends to the DLQ, also those without a usable request id.

The DLQ topic has the reason in headers and at most a prefix of the value (what fits in one record); this table is
where an operator finds every dead letter by id or position, with the original value's size and sha256 and, with
limits.keep_dead_letter_values, the whole value. A redelivered record (same position, same sha256) adds no second
row; a re-created topic's record at an old position (another sha256) adds its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import DeadLetter, storable_text, utcnow

MAX_REASON_CHARS = 4096


@dataclass(frozen=True)
class DeadLetterRecord:
    request_id: str | None  # None when the record had no usable id
    topic: str
    partition: int
    offset: int
    reason_code: str
    reason: str
    value: bytes | None  # None for a tombstone

    @cached_property  # a dead letter may be megabytes: hash it once
    def value_sha256(self) -> str | None:
        return None if self.value is None else hashlib.sha256(self.value).hexdigest()

    def key(self) -> tuple:
        return self.topic, self.partition, self.offset, self.value_sha256


def record_dead_letters(
    session: Session, letters: Sequence[DeadLetterRecord], *, keep_values: bool, created_at: datetime | None = None
) -> int:
    """Add a row per dead letter not recorded before, in the caller's transaction; returns how many were added."""
    if not letters:
        return 0
    offsets = {letter.offset for letter in letters}
    topics = {letter.topic for letter in letters}
    key = (DeadLetter.kafka_topic, DeadLetter.kafka_partition, DeadLetter.kafka_offset, DeadLetter.value_sha256)
    recorded = set(
        session.execute(
            select(*key).where(DeadLetter.kafka_topic.in_(topics), DeadLetter.kafka_offset.in_(offsets))
        ).tuples()
    )
    now = created_at or utcnow()
    new = []
    for letter in letters:
        if letter.key() in recorded:
            continue
        recorded.add(letter.key())
        new.append(
            dict(
                request_id=letter.request_id,
                kafka_topic=letter.topic,
                kafka_partition=letter.partition,
                kafka_offset=letter.offset,
                reason_code=letter.reason_code,
                reason=storable_text(letter.reason[:MAX_REASON_CHARS]),
                value_size=None if letter.value is None else len(letter.value),
                value_sha256=letter.value_sha256,
                value=letter.value if keep_values else None,
                created_at=now,
            )
        )
    if new:
        session.execute(DeadLetter.__table__.insert(), new)  # Core: one multi-row INSERT, no ORM bookkeeping
    return len(new)


def dead_letters_at(session: Session, topic: str, partition: int | None = None) -> list[DeadLetter]:
    """The dead letters of a topic (or one partition), in offset order."""
    query = select(DeadLetter).where(DeadLetter.kafka_topic == topic)
    if partition is not None:
        query = query.where(DeadLetter.kafka_partition == partition)
    return list(session.scalars(query.order_by(DeadLetter.kafka_partition, DeadLetter.kafka_offset, DeadLetter.id)))
