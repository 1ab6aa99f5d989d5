"""Draft versions and the active-draft pointer.

Checkpoints are immutable (see models.DraftCheckpoint); only the pointer moves. Every move appends a
draft_events row saying who, why and from where, so "what was serving at time t, and why" is always answerable
and rollback needs no extra state: the version to return to is the one the current version replaced.

    promote   candidate -> active; the version it replaces -> retired
    rollback  active -> retired; the pointer returns to what the current version replaced (or `to_id`)
    reject    a candidate failed held-out replay (or an operator said no)

Functions that move the pointer start with a write (they ensure the pointer row exists), so on SQLite the
transaction holds the write lock before it reads the pointer, and on PostgreSQL the row is locked FOR UPDATE:
two concurrent promotions serialize instead of both reading the same "from".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.db import dialect_insert
from storage.errors import CheckpointNotFoundError, RollbackError, StorageError, TargetMismatchError
from storage.models import (
    DEFAULT_DEPLOYMENT,
    ActiveDraft,
    CheckpointStatus,
    Completion,
    DraftCheckpoint,
    DraftEvent,
    DraftKind,
    EventKind,
    utcnow,
)


def add_checkpoint(
    session: Session,
    *,
    version: str,
    sha256: str,
    size_bytes: int,
    path: str,
    learner: str,
    learner_settings: dict[str, Any],
    target_identity: str,
    parent_id: int | None = None,
    window_first_id: int | None = None,
    window_last_id: int | None = None,
    window_rows: int | None = None,
    kind: str = "draft",
    settings: dict[str, Any] | None = None,
    heldout_metrics: dict[str, Any] | None = None,
    deployment: str = DEFAULT_DEPLOYMENT,
    reason: str | None = None,
) -> DraftCheckpoint:
    """Record a new candidate version (its file already written by storage.artifacts.CheckpointStore.put)."""
    checkpoint = DraftCheckpoint(
        deployment=deployment,
        version=version,
        parent_id=parent_id,
        sha256=sha256,
        size_bytes=size_bytes,
        path=str(path),
        learner=learner,
        learner_settings=learner_settings,
        target_identity=target_identity,
        window_first_id=window_first_id,
        window_last_id=window_last_id,
        window_rows=window_rows,
        kind=kind,
        settings=settings,
        heldout_metrics=heldout_metrics or {},
        live_metrics=None,
        status=CheckpointStatus.CANDIDATE.value,
        reason=reason,
        created_at=utcnow(),
    )
    session.add(checkpoint)
    session.flush()  # assigns the id
    return checkpoint


def get_checkpoint(session: Session, checkpoint: int | str) -> DraftCheckpoint:
    """By id (int) or version label (str); raises CheckpointNotFoundError."""
    if isinstance(checkpoint, int):
        row = session.get(DraftCheckpoint, checkpoint)
    else:
        row = session.scalar(select(DraftCheckpoint).where(DraftCheckpoint.version == checkpoint))
    if row is None:
        raise CheckpointNotFoundError(f"no draft checkpoint {checkpoint!r}")
    return row


def list_checkpoints(
    session: Session, *, deployment: str | None = None, status: str | None = None, limit: int = 100
) -> list[DraftCheckpoint]:
    """Newest first."""
    query = select(DraftCheckpoint).order_by(DraftCheckpoint.id.desc()).limit(limit)
    if deployment is not None:
        query = query.where(DraftCheckpoint.deployment == deployment)
    if status is not None:
        query = query.where(DraftCheckpoint.status == status)
    return list(session.scalars(query))


def get_active_pointer(session: Session, deployment: str = DEFAULT_DEPLOYMENT) -> ActiveDraft | None:
    """The pointer row (None before anything was ever promoted). Workers poll `generation` to notice a swap."""
    return session.get(ActiveDraft, deployment)


def get_active_checkpoint(
    session: Session, deployment: str = DEFAULT_DEPLOYMENT, *, expected_target: str | None = None
) -> DraftCheckpoint | None:
    """The checkpoint serving now, or None for the base draft.

    With `expected_target`, raises TargetMismatchError when the active draft was trained against another
    target model: such a draft must not be served (serve the base draft and alert instead).
    """
    pointer = session.get(ActiveDraft, deployment)
    if pointer is None or pointer.checkpoint_id is None:
        return None
    checkpoint = session.get(DraftCheckpoint, pointer.checkpoint_id)
    if expected_target is not None and checkpoint.target_identity != expected_target:
        raise TargetMismatchError(
            f"active draft {checkpoint.version} (deployment {deployment!r}) was trained against target "
            f"{checkpoint.target_identity}, but the target being served is {expected_target}"
        )
    return checkpoint


def set_active(
    session: Session,
    checkpoint_id: int | None,
    actor: str,
    reason: str,
    kind: str = EventKind.PROMOTE,
    *,
    deployment: str = DEFAULT_DEPLOYMENT,
    metrics: dict[str, Any] | None = None,
) -> DraftEvent:
    """Point `deployment` at `checkpoint_id` (None = base draft) and append the event. `kind` is promote or
    rollback. The version it replaces becomes retired. Setting the version that is already active is refused."""
    if kind not in (EventKind.PROMOTE, EventKind.ROLLBACK):
        raise ValueError(f"set_active kind must be promote or rollback, got {kind!r}")
    pointer = _lock_pointer(session, deployment)
    if checkpoint_id == pointer.checkpoint_id:
        raise StorageError(f"{_label(session, checkpoint_id)} is already active for deployment {deployment!r}")
    new = None if checkpoint_id is None else _checkpoint_of(session, checkpoint_id, deployment)
    previous_id = pointer.checkpoint_id
    if previous_id is not None:
        previous = session.get(DraftCheckpoint, previous_id)
        previous.status = CheckpointStatus.RETIRED.value
        previous.reason = reason if kind == EventKind.ROLLBACK else f"replaced by {_label(session, checkpoint_id)}"
    if new is not None:
        new.status = CheckpointStatus.ACTIVE.value
        new.reason = reason
    now = utcnow()
    pointer.checkpoint_id = checkpoint_id
    pointer.generation += 1
    pointer.changed_at = now
    return _append_event(session, deployment, kind, checkpoint_id, previous_id, actor, reason, metrics, now)


def rollback(
    session: Session,
    to_id: int | None = None,
    *,
    actor: str,
    reason: str,
    deployment: str = DEFAULT_DEPLOYMENT,
    to_base: bool = False,
    metrics: dict[str, Any] | None = None,
) -> DraftEvent:
    """Move the pointer back: to `to_id`, to the base draft with `to_base`, or by default to the version the
    current one replaced when it was promoted (earlier rollbacks are not undone by a later one)."""
    pointer = _lock_pointer(session, deployment)
    if to_id is None and not to_base:
        promoted = session.scalar(
            select(DraftEvent)
            .where(
                DraftEvent.deployment == deployment,
                DraftEvent.kind == EventKind.PROMOTE.value,
                _is(DraftEvent.checkpoint_id, pointer.checkpoint_id),
            )
            .order_by(DraftEvent.id.desc())
            .limit(1)
        )
        if promoted is None:
            raise RollbackError(
                f"deployment {deployment!r}: {_label(session, pointer.checkpoint_id)} is active and was never "
                "promoted over another version; give the version to roll back to"
            )
        to_id = promoted.from_checkpoint_id
    return set_active(session, to_id, actor, reason, EventKind.ROLLBACK, deployment=deployment, metrics=metrics)


def reject(
    session: Session,
    checkpoint_id: int,
    *,
    actor: str,
    reason: str,
    deployment: str = DEFAULT_DEPLOYMENT,
    metrics: dict[str, Any] | None = None,
) -> DraftEvent:
    """A candidate that lost the held-out replay (or that an operator refused)."""
    return _change_status(
        session, deployment, checkpoint_id, EventKind.REJECT, CheckpointStatus.REJECTED, actor, reason, metrics
    )


def list_events(session: Session, *, deployment: str = DEFAULT_DEPLOYMENT, limit: int = 100) -> list[DraftEvent]:
    """Newest first."""
    query = select(DraftEvent).where(DraftEvent.deployment == deployment).order_by(DraftEvent.id.desc())
    return list(session.scalars(query.limit(limit)))


def current_activation(session: Session, deployment: str = DEFAULT_DEPLOYMENT) -> DraftEvent | None:
    """The promote or rollback event that set the pointer to what it is now (None if it never moved).

    Every pointer move appends exactly one such event, so the newest one is the current activation: the live
    guard reads its `from_checkpoint_id` (the predecessor) and `at` (when the version went live)."""
    query = (
        select(DraftEvent)
        .where(
            DraftEvent.deployment == deployment,
            DraftEvent.kind.in_([EventKind.PROMOTE.value, EventKind.ROLLBACK.value]),
        )
        .order_by(DraftEvent.id.desc())
        .limit(1)
    )
    return session.scalar(query)


def update_live_metrics(session: Session, checkpoint_id: int, metrics: dict[str, Any]) -> None:
    """Replace the live-metrics snapshot of a version (the one mutable measurement on a checkpoint)."""
    get_checkpoint(session, checkpoint_id).live_metrics = dict(metrics)


@dataclass(frozen=True)
class LiveCounters:
    """Sums over completions served by one draft version. Ratios are derived here, never stored.

    With several proposers (engine.proposer auto or hybrid) a request's tokens came partly from other drafts; the
    `model_*` counters are the versioned draft's own rounds: completions.by_proposer[proposer], where proposer is the
    draft's kind ("draft" for a draft model, "head" for a head: DraftKind, the proposers' names); rows written before
    by_proposer existed count wholly as the draft model's. `draft_avg_len`, tokens per round in which that draft
    drafted, is what a version is judged by."""

    requests: int
    drafted: int
    accepted: int
    target_forwards: int
    emitted: int
    model_requests: int = 0  # requests in which the draft model drafted at least once
    model_rounds: int = 0
    model_accepted: int = 0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_avg_len(self) -> float:
        """Tokens per round of the draft model's own rounds (accepted + the recovered or bonus token)."""
        return 1.0 + self.model_accepted / self.model_rounds if self.model_rounds else 0.0


def live_counters(
    session: Session, draft_version: str, *, since: datetime | None = None, proposer: str = DraftKind.DRAFT.value
) -> LiveCounters:
    """What the live guard compares: raw counters of completions stamped with `draft_version`."""
    return live_counters_by_version(session, [draft_version], since=since, proposer=proposer)[draft_version]


def live_counters_by_version(
    session: Session, versions: list[str], *, since: datetime | None = None, proposer: str = DraftKind.DRAFT.value
) -> dict[str, LiveCounters]:
    """LiveCounters of each version in one query; a version that served nothing gets zeros. The one source of
    live numbers for the live guard, `checkpoints list | show` and `status`. `proposer`: the versions' kind."""
    old_row = Completion.by_proposer.is_(None)
    model = Completion.by_proposer[proposer]
    legacy = proposer == DraftKind.DRAFT.value  # rows without by_proposer came from the draft model alone
    old_rounds, old_accepted = (Completion.draft_steps, Completion.accepted) if legacy else (0, 0)
    rounds = case((old_row, old_rounds), else_=func.coalesce(model["rounds"].as_integer(), 0))
    accepted = case((old_row, old_accepted), else_=func.coalesce(model["accepted"].as_integer(), 0))
    columns = [
        Completion.drafted,
        Completion.accepted,
        Completion.target_forwards,
        Completion.emitted,
        rounds,
        accepted,
    ]
    query = (
        select(
            Completion.draft_version,
            func.count(),
            func.coalesce(func.sum(case((rounds > 0, 1), else_=0)), 0),
            *(func.coalesce(func.sum(c), 0) for c in columns),
        )
        .where(Completion.draft_version.in_(set(versions)))
        .group_by(Completion.draft_version)
    )
    if since is not None:
        query = query.where(Completion.created_at >= since)
    counters = {version: LiveCounters(0, 0, 0, 0, 0) for version in versions}
    for (
        version,
        requests,
        model_requests,
        drafted,
        accepted_all,
        forwards,
        emitted,
        model_rounds,
        model_accepted,
    ) in session.execute(query):
        counters[version] = LiveCounters(
            *(
                int(v)
                for v in (
                    requests,
                    drafted,
                    accepted_all,
                    forwards,
                    emitted,
                    model_requests,
                    model_rounds,
                    model_accepted,
                )
            )
        )
    return counters


def _lock_pointer(session: Session, deployment: str) -> ActiveDraft:
    # The INSERT comes first on purpose: on SQLite it takes the write lock before anything is read (a read
    # followed by a write in a deferred transaction can fail with "database is locked" mid-transaction).
    session.execute(
        dialect_insert(session, ActiveDraft)
        .values(deployment=deployment, checkpoint_id=None, generation=0, changed_at=utcnow())
        .on_conflict_do_nothing()
    )
    return session.scalars(
        select(ActiveDraft)
        .where(ActiveDraft.deployment == deployment)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def _change_status(
    session: Session,
    deployment: str,
    checkpoint_id: int,
    kind: EventKind,
    status: CheckpointStatus,
    actor: str,
    reason: str,
    metrics: dict[str, Any] | None,
) -> DraftEvent:
    pointer = _lock_pointer(session, deployment)
    checkpoint = _checkpoint_of(session, checkpoint_id, deployment)
    if pointer.checkpoint_id == checkpoint.id:
        raise StorageError(f"{checkpoint.version} is active; roll back or promote another version first")
    checkpoint.status = status.value
    checkpoint.reason = reason
    return _append_event(session, checkpoint.deployment, kind, checkpoint.id, None, actor, reason, metrics, utcnow())


def _append_event(session, deployment, kind, checkpoint_id, from_id, actor, reason, metrics, at) -> DraftEvent:
    event = DraftEvent(
        deployment=deployment,
        kind=str(kind),
        checkpoint_id=checkpoint_id,
        from_checkpoint_id=from_id,
        actor=actor,
        reason=reason,
        metrics=metrics,
        at=at,
    )
    session.add(event)
    session.flush()
    return event


def _checkpoint_of(session: Session, checkpoint_id: int, deployment: str) -> DraftCheckpoint:
    checkpoint = get_checkpoint(session, checkpoint_id)
    if checkpoint.deployment != deployment:
        raise StorageError(
            f"checkpoint {checkpoint.version} belongs to deployment {checkpoint.deployment!r}, not {deployment!r}"
        )
    return checkpoint


def _is(column, value):
    return column.is_(None) if value is None else column == value


def _label(session: Session, checkpoint_id: int | None) -> str:
    return "the base draft" if checkpoint_id is None else get_checkpoint(session, checkpoint_id).version
