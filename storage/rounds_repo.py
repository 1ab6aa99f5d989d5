"""Learning rounds: one row per round, written when it starts (reserving its feedback window against pruning)
and completed when it finishes, whatever the outcome. Exactly one process runs rounds per deployment.

    round_ = start_round(session, learner="osd", settings=..., target_identity=t, after_id=last_window_end(...))
    ... train on feedback_window(round_.window_first_id, round_.window_last_id), replay, decide ...
    finish_round(session, round_.id, decision="promoted", candidate_checkpoint_id=..., candidate_metrics=...)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from storage.errors import StorageError
from storage.models import DEFAULT_DEPLOYMENT, Feedback, LearningRound, RoundDecision, utcnow


def start_round(
    session: Session,
    *,
    learner: str,
    settings: dict[str, Any],
    target_identity: str,
    after_id: int | None = None,
    max_rows: int | None = None,
    deployment: str = DEFAULT_DEPLOYMENT,
    started_at: datetime | None = None,
) -> LearningRound:
    """Open a round over the feedback of `target_identity` with id > after_id (the oldest `max_rows` of them).

    The row is inserted before the window is measured so that, once committed, a concurrent prune either
    finished first (the window covers what is left) or sees the reservation.

    Feedback ids are taken from a sequence when a row is inserted, but several workers' transactions commit in
    any order: on PostgreSQL the window is measured only once every transaction writing feedback has ended
    (SHARE mode waits for them and holds new writers off until this transaction ends), else it could pass over
    a lower id committed a moment later, which no round would ever learn from (the next window starts after
    this one's last id). SQLite has one writer at a time: the insert above already waited."""
    round_ = LearningRound(
        deployment=deployment,
        learner=learner,
        settings=settings,
        target_identity=target_identity,
        window_rows=0,
        started_at=started_at or utcnow(),
    )
    session.add(round_)
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE feedback IN SHARE MODE"))
    ids = select(Feedback.id).where(Feedback.target_identity == target_identity).order_by(Feedback.id)
    if after_id is not None:
        ids = ids.where(Feedback.id > after_id)
    if max_rows is not None:
        ids = ids.limit(max_rows)
    window = ids.subquery()
    first, last, rows = session.execute(select(func.min(window.c.id), func.max(window.c.id), func.count())).one()
    round_.window_first_id, round_.window_last_id, round_.window_rows = first, last, int(rows)
    session.flush()
    return round_


def finish_round(
    session: Session,
    round_id: int,
    *,
    decision: str,
    active_checkpoint_id: int | None = None,
    candidate_checkpoint_id: int | None = None,
    candidate_metrics: dict[str, Any] | None = None,
    active_metrics: dict[str, Any] | None = None,
    error: str | None = None,
    duration_seconds: float | None = None,
) -> LearningRound:
    """Record the outcome; releases the window's reservation. `duration_seconds` defaults to wall time since
    start (pass a monotonic measurement when you have one)."""
    if decision not in set(RoundDecision):
        raise ValueError(f"decision must be one of {[d.value for d in RoundDecision]}, got {decision!r}")
    round_ = get_round(session, round_id)
    if round_.finished_at is not None:
        raise StorageError(f"learning round {round_id} already finished ({round_.decision})")
    now = utcnow()
    round_.finished_at = now
    round_.duration_seconds = (
        duration_seconds if duration_seconds is not None else (now - round_.started_at).total_seconds()
    )
    round_.decision = str(decision)
    round_.active_checkpoint_id = active_checkpoint_id
    round_.candidate_checkpoint_id = candidate_checkpoint_id
    round_.candidate_metrics = candidate_metrics
    round_.active_metrics = active_metrics
    round_.error = error
    session.flush()
    return round_


def fail_unfinished_rounds(session: Session, *, deployment: str = DEFAULT_DEPLOYMENT, reason: str) -> int:
    """Close rounds left open by a process that died (call when this process becomes the deployment's learner);
    otherwise their windows would be protected from pruning forever. Returns how many were closed."""
    result = session.execute(
        update(LearningRound)
        .where(LearningRound.deployment == deployment, LearningRound.finished_at.is_(None))
        .values(finished_at=utcnow(), decision=RoundDecision.FAILED.value, error=reason)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def get_round(session: Session, round_id: int) -> LearningRound:
    round_ = session.get(LearningRound, round_id)
    if round_ is None:
        raise StorageError(f"no learning round {round_id}")
    return round_


def list_rounds(session: Session, *, deployment: str | None = None, limit: int = 50) -> list[LearningRound]:
    """Newest first."""
    query = select(LearningRound).order_by(LearningRound.id.desc()).limit(limit)
    if deployment is not None:
        query = query.where(LearningRound.deployment == deployment)
    return list(session.scalars(query))


def last_window_end(
    session: Session, *, deployment: str = DEFAULT_DEPLOYMENT, target_identity: str | None = None
) -> int | None:
    """The last feedback id a round of `deployment` trained on (promoted or rejected): the next round's
    `after_id`. Skipped and failed rounds do not advance it, so their feedback is offered again."""
    consumed = [RoundDecision.PROMOTED.value, RoundDecision.REJECTED.value]
    query = select(func.max(LearningRound.window_last_id)).where(
        LearningRound.deployment == deployment, LearningRound.decision.in_(consumed)
    )
    if target_identity is not None:
        query = query.where(LearningRound.target_identity == target_identity)
    return session.scalar(query)
