"""What the learner reads, and retention.

Feedback ids increase with insertion, so a learning round's window is an id range (first_id..last_id);
rounds reserve their window when they start (rounds_repo.start_round) and prune_feedback never deletes a row
inside the window of a round that has not finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select, text
from sqlalchemy.orm import Session, aliased

from pipelines.types import RequestCounters, RequestFeedback
from storage.models import Feedback, LearningRound, utcnow
from storage.packing import unpack_feedback


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    request_id: str
    created_at: datetime
    target_identity: str
    feedback: RequestFeedback  # arrays unpacked, writable, native dtypes
    counters: RequestCounters  # accepted_at_position is not kept per feedback row


def feedback_since(
    session: Session,
    after_id: int | None,
    limit: int,
    *,
    until_id: int | None = None,
    target_identity: str | None = None,
) -> list[FeedbackRecord]:
    """Up to `limit` rows with id > after_id (and <= until_id), oldest first. Page with the last id returned.

    Pass `target_identity`: feedback from another target model must not train a draft for this one."""
    query = select(Feedback).order_by(Feedback.id).limit(limit)
    if after_id is not None:
        query = query.where(Feedback.id > after_id)
    if until_id is not None:
        query = query.where(Feedback.id <= until_id)
    if target_identity is not None:
        query = query.where(Feedback.target_identity == target_identity)
    return [_record(row) for row in session.scalars(query)]


def feedback_window(
    session: Session, first_id: int, last_id: int, *, target_identity: str | None = None, page: int = 1000
) -> list[FeedbackRecord]:
    """Every row of a round's window, oldest first (rows pruned meanwhile are simply absent)."""
    records: list[FeedbackRecord] = []
    after = first_id - 1
    while True:
        batch = feedback_since(session, after, page, until_id=last_id, target_identity=target_identity)
        records.extend(batch)
        if len(batch) < page:
            return records
        after = batch[-1].id


@dataclass(frozen=True)
class FeedbackTotals:
    rows: int
    tokens: int  # emitted tokens (n_tokens summed)
    last_id: int | None


def feedback_totals_since(
    session: Session, after_id: int | None, *, target_identity: str | None = None
) -> FeedbackTotals:
    """How much feedback arrived after `after_id`: what the learning scheduler's new-tokens trigger reads."""
    query = select(func.count(), func.coalesce(func.sum(Feedback.n_tokens), 0), func.max(Feedback.id))
    if after_id is not None:
        query = query.where(Feedback.id > after_id)
    if target_identity is not None:
        query = query.where(Feedback.target_identity == target_identity)
    rows, tokens, last_id = session.execute(query).one()
    return FeedbackTotals(int(rows), int(tokens), last_id)


def recent_feedback(
    session: Session, limit: int, *, target_identity: str | None = None, until_id: int | None = None
) -> list[FeedbackRecord]:
    """The newest `limit` rows (up to `until_id`), oldest first: the held-out set candidate and active share."""
    query = select(Feedback).order_by(Feedback.id.desc()).limit(limit)
    if until_id is not None:
        query = query.where(Feedback.id <= until_id)
    if target_identity is not None:
        query = query.where(Feedback.target_identity == target_identity)
    return [_record(row) for row in reversed(list(session.scalars(query)))]


def prune_feedback(
    session: Session, older_than: timedelta, *, now: datetime | None = None, limit: int | None = None
) -> int:
    """Delete feedback created more than `older_than` ago, except rows inside the window of an unfinished
    round. Deletes at most `limit` rows (oldest first) so a large prune can run as many short transactions.
    Returns the number of rows deleted."""
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    if session.get_bind().dialect.name == "postgresql":
        # Hold off rounds that start meanwhile: a round reserving its window while this DELETE runs would not be
        # visible to it. SQLite needs nothing: its writers are already serialized.
        session.execute(text(f"LOCK TABLE {LearningRound.__tablename__} IN SHARE MODE"))
    cutoff = (now or utcnow()) - older_than
    candidate = aliased(Feedback)
    reserved = exists().where(
        LearningRound.finished_at.is_(None),
        LearningRound.window_first_id <= candidate.id,
        LearningRound.window_last_id >= candidate.id,
    )
    doomed = select(candidate.id).where(candidate.created_at < cutoff, ~reserved).order_by(candidate.id)
    if limit is not None:
        doomed = doomed.limit(limit)
    result = session.execute(
        delete(Feedback).where(Feedback.id.in_(doomed)).execution_options(synchronize_session=False)
    )
    return result.rowcount


def _record(row: Feedback) -> FeedbackRecord:
    counters = RequestCounters(
        draft_steps=row.draft_steps,
        drafted=row.drafted,
        accepted=row.accepted,
        target_forwards=row.target_forwards,
        emitted=row.emitted,
    )
    return FeedbackRecord(row.id, row.request_id, row.created_at, row.target_identity, unpack_feedback(row), counters)


def recent_streams(
    session: Session, *, target_identity: str, max_tokens: int, batch_rows: int = 1_000
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, emitted ids) of the newest feedback rows of this target, oldest first, as many as hold
    `max_tokens` emitted tokens: what the suffix proposer's stream cache is rebuilt from at start. Reads only the
    two token columns, newest first, `batch_rows` at a time."""
    from storage.packing import FEEDBACK_DTYPES, unpack_array

    streams: list[tuple[list[int], list[int]]] = []
    tokens, before = 0, None
    while tokens < max_tokens:
        query = (
            select(Feedback.id, Feedback.prompt_len, Feedback.n_tokens, Feedback.prompt_ids, Feedback.token_ids)
            .where(Feedback.target_identity == target_identity)
            .order_by(Feedback.id.desc())
            .limit(batch_rows)
        )
        if before is not None:
            query = query.where(Feedback.id < before)
        rows = session.execute(query).all()
        for row in rows:
            prompt = unpack_array(row.prompt_ids, FEEDBACK_DTYPES["prompt_ids"], (row.prompt_len,)).tolist()
            emitted = unpack_array(row.token_ids, FEEDBACK_DTYPES["token_ids"], (row.n_tokens,)).tolist()
            streams.append((prompt, emitted))
            tokens += len(emitted)
            if tokens >= max_tokens:
                break
        if len(rows) < batch_rows:
            break
        before = rows[-1].id
    streams.reverse()
    return streams
