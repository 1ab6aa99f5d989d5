"""The schema: typed SQLAlchemy 2.0 models. Alembic revisions in `migrations/` must match these exactly
(tests/test_migrations.py runs autogenerate and expects no difference).

Tables
- requests          one row per request id ever seen (the idempotency key), its hash and where it came from in Kafka
- dead_letters      one row per record sent to the DLQ (also those without a usable id): why, where from, the
                    original value's size and sha256, and the value itself with limits.keep_dead_letter_values
- completions       one per completed request: the exact output message, so a redelivery re-sends it verbatim
- feedback          one per completed request: packed verification arrays the learner trains on (pruned by age)
- draft_checkpoints immutable draft versions: provenance, identity, metrics; only status/reason/live_metrics change
- active_drafts     one pointer row per deployment (NULL = the base draft), moved only with a draft_events row
- draft_events      append-only log of promote / rollback / reject decisions
- learning_rounds   one row per round: window, learner, metrics of candidate and active, decision, error

Times are timezone-aware UTC on both backends (see UTCDateTime). Counters are raw; ratios are derived when read.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.errors import CheckpointImmutableError

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# PostgreSQL's btree index entries are capped near 2.7 kB; 512 characters of 4-byte UTF-8 stay below that.
MAX_REQUEST_ID_CHARS = 512
DEFAULT_DEPLOYMENT = "default"

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key for the high-volume table.
BigIntKey = BigInteger().with_variant(Integer(), "sqlite")


class RequestStatus(StrEnum):
    RECEIVED = "received"
    COMPLETED = "completed"
    DEAD_LETTERED = "dead_lettered"  # sent to the DLQ; a corrected request may be sent again under the same id


class DraftKind(StrEnum):
    DRAFT = "draft"  # a small LM with the target's tokenizer
    HEAD = "head"  # an EAGLE-style head over the target's hidden states


class CheckpointStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"  # was active, replaced or rolled back; can be promoted again
    REJECTED = "rejected"  # failed held-out replay or was rejected by an operator


class EventKind(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    RETIRE = "retire"  # allowed by the schema, written by nothing: a replaced version is retired by its promote
    REJECT = "reject"


class RoundDecision(StrEnum):
    PROMOTED = "promoted"
    REJECTED = "rejected"
    SKIPPED = "skipped"  # e.g. not enough new feedback
    FAILED = "failed"  # the round raised, or its process died (see rounds_repo.fail_unfinished_rounds)


def utcnow() -> datetime:
    return datetime.now(UTC)


def storable_text(text: str) -> str:
    """Text as PostgreSQL's text type can hold it: NUL becomes U+FFFD (SQLite would keep it; the exact output
    of a request is completions.message_json, where JSON escapes NUL)."""
    return text.replace("\x00", "\ufffd")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite has no time zones and would keep an aware value's wall-clock
    time, so values are converted to UTC before binding and tagged UTC when read back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime (storage.models.utcnow())")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_check(column: str, enum: type[StrEnum]) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return CheckConstraint(f"{column} IN ({values})", name=column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime}


class Request(Base):
    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID_CHARS), primary_key=True)
    # Where the record was received (a corrected resend of a dead-lettered request moves it to the resend); NULL
    # for requests that did not come from Kafka (CLI). Not unique: a re-created topic hands out offsets again.
    kafka_topic: Mapped[str | None] = mapped_column(String(255))
    kafka_partition: Mapped[int | None] = mapped_column(Integer)
    kafka_offset: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)  # NULL when dead-lettered before tokenizing
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # max_new_tokens, temperature, ..., metadata
    # sha256 of the request as parsed (daemon.serving.messages.request_hash): the same id with another hash is a
    # conflict, with the same hash a retry. NULL for rows written before it was recorded.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)  # why it was dead-lettered

    __table_args__ = (_status_check("status", RequestStatus),)


class Completion(Base):
    __tablename__ = "completions"

    request_id: Mapped[str] = mapped_column(ForeignKey("requests.request_id"), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian, see storage.packing
    finish_reason: Mapped[str] = mapped_column(String(16))
    draft_version: Mapped[str] = mapped_column(String(128))
    draft_steps: Mapped[int] = mapped_column(Integer)
    drafted: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    target_forwards: Mapped[int] = mapped_column(Integer)
    emitted: Mapped[int] = mapped_column(Integer)
    accepted_at_position: Mapped[list[int]] = mapped_column(JSON)
    decode_seconds: Mapped[float] = mapped_column(Float)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The serialized output message exactly as produced to Kafka: a redelivery re-sends these characters.
    message_json: Mapped[str] = mapped_column(Text)
    # Raw counters per proposer that drafted for this request: {"draft": {"rounds", "drafted", "accepted"}, ...}.
    by_proposer: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime]

    __table_args__ = (Index(None, "draft_version", "created_at"),)  # live counters per version


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(String(MAX_REQUEST_ID_CHARS), index=True)  # when it had one
    kafka_topic: Mapped[str] = mapped_column(String(255))
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    reason_code: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    value_size: Mapped[int | None] = mapped_column(BigInteger)  # NULL for a tombstone
    value_sha256: Mapped[str | None] = mapped_column(String(64))
    value: Mapped[bytes | None] = mapped_column(LargeBinary)  # only with limits.keep_dead_letter_values
    created_at: Mapped[datetime] = mapped_column(index=True)

    # Not unique: a re-created topic hands out offsets again. A redelivery of the same record (same position and
    # sha256) adds no second row (storage.dead_letters_repo).
    __table_args__ = (Index(None, "kafka_topic", "kafka_partition", "kafka_offset"),)


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.request_id"), unique=True)
    draft_version: Mapped[str] = mapped_column(String(128))
    target_identity: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(index=True)  # pruning walks this
    prompt_len: Mapped[int] = mapped_column(Integer)  # P
    n_tokens: Mapped[int] = mapped_column(Integer)  # n
    top_m: Mapped[int] = mapped_column(Integer)  # m
    # Raw little-endian arrays; shapes and dtypes are fixed by storage.packing.
    prompt_ids: Mapped[bytes] = mapped_column(LargeBinary)  # [P] int32
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # [n] int32
    kinds: Mapped[bytes] = mapped_column(LargeBinary)  # [n] uint8
    draft_tokens: Mapped[bytes] = mapped_column(LargeBinary)  # [n] int32
    target_topk_ids: Mapped[bytes] = mapped_column(LargeBinary)  # [n, m] int32
    target_topk_logprobs: Mapped[bytes] = mapped_column(LargeBinary)  # [n, m] float16
    draft_sources: Mapped[bytes | None] = mapped_column(LargeBinary)  # [n] uint8; NULL = all from the draft model
    draft_steps: Mapped[int] = mapped_column(Integer)
    drafted: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    target_forwards: Mapped[int] = mapped_column(Integer)
    emitted: Mapped[int] = mapped_column(Integer)


class DraftCheckpoint(Base):
    __tablename__ = "draft_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128), unique=True)  # the label feedback rows are stamped with
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    learner: Mapped[str] = mapped_column(String(64))
    learner_settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    target_identity: Mapped[str] = mapped_column(String(128))
    # The feedback it was trained on: ids survive as provenance after the rows themselves are pruned.
    window_first_id: Mapped[int | None] = mapped_column(BigInteger)
    window_last_id: Mapped[int | None] = mapped_column(BigInteger)
    window_rows: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), server_default=DraftKind.DRAFT.value)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # resolved config, masked
    heldout_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    live_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # mutable
    status: Mapped[str] = mapped_column(String(16))  # mutable
    reason: Mapped[str | None] = mapped_column(Text)  # mutable: why it has its current status
    created_at: Mapped[datetime]

    __table_args__ = (_status_check("status", CheckpointStatus), _status_check("kind", DraftKind))


MUTABLE_CHECKPOINT_FIELDS = frozenset({"status", "reason", "live_metrics"})


@event.listens_for(DraftCheckpoint, "before_update")
def _refuse_checkpoint_rewrite(_mapper, _connection, checkpoint: DraftCheckpoint) -> None:
    # A version label must always mean the same weights and provenance: rollback and audit depend on it.
    state = inspect(checkpoint)
    changed = {attr.key for attr in state.attrs if attr.history.has_changes()} - MUTABLE_CHECKPOINT_FIELDS
    if changed:
        raise CheckpointImmutableError(
            f"checkpoint {checkpoint.id} ({checkpoint.version}) is immutable; refused change to {sorted(changed)}"
        )


class ActiveDraft(Base):
    __tablename__ = "active_drafts"

    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))  # NULL = base draft
    generation: Mapped[int] = mapped_column(Integer)  # +1 on every move; workers compare it to notice a swap
    changed_at: Mapped[datetime]


class DraftEvent(Base):
    __tablename__ = "draft_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))  # NULL = base draft
    from_checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))
    actor: Mapped[str] = mapped_column(String(128))  # "scheduler", "live-guard", "operator:alice", ...
    reason: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # evidence at decision time
    at: Mapped[datetime]

    __table_args__ = (_status_check("kind", EventKind),)


class LearningRound(Base):
    __tablename__ = "learning_rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    learner: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    target_identity: Mapped[str] = mapped_column(String(128))
    # Reserved when the round starts: prune_feedback keeps these rows while finished_at is NULL.
    window_first_id: Mapped[int | None] = mapped_column(BigInteger)
    window_last_id: Mapped[int | None] = mapped_column(BigInteger)
    window_rows: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(16))
    active_checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))
    candidate_checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("draft_checkpoints.id"))
    candidate_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    active_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(
            "decision IS NULL OR decision IN (" + ", ".join(f"'{d.value}'" for d in RoundDecision) + ")",
            name="decision",
        ),
    )
