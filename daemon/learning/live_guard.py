"""Live guard: a promoted version must do as well in service as the version it replaced, or it is rolled back.

Held-out replay decides promotion on recent feedback; live traffic is the final judge. After a promotion
(the newest pointer move is a `promote` event), once the new version has drafted for `min_requests` requests since
it went live, its live AvgLen (tokens per round of the rounds it drafted: storage LiveCounters.draft_avg_len, so
rounds the goodput controller gave to other proposers do not count; a head's rounds are those of proposer `head`,
a draft model's those of `draft`: the version's kind) is compared with a reference for its predecessor:

    1. the predecessor's own live AvgLen, over every completion it served;
    2. if it never served: its held-out AvgLen from the round that promoted the new version (same rows);
    3. else its held-out AvgLen from the round that created it.

Below `reference * (1 - margin)`: roll back to the predecessor (actor "live-guard", reason with both numbers).
Each activation is judged once; the verdict and the counters are kept in the version's live_metrics. Every
daemon may run the guard: the rollback is taken only if the pointer still holds the version that was judged, so
two guards deciding at once move it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from daemon.config import LiveGuardSettings
from daemon.learning.draft_follower import BASE_DRAFT_VERSION

log = logging.getLogger(__name__)

ACTOR = "live-guard"


class _PointerMoved(Exception):
    """Someone else moved the pointer while we were judging: our rollback is void."""


@dataclass(frozen=True)
class GuardVerdict:
    action: str  # idle | watching | kept | rolled_back | moved
    version: str | None = None
    reason: str = ""


class LiveGuard:
    def __init__(self, settings: LiveGuardSettings, session_factory, *, deployment: str):
        self.settings = settings
        self.session_factory = session_factory
        self.deployment = deployment

    def check(self) -> GuardVerdict:
        try:
            with self.session_factory.begin() as session:
                return self._check(session)
        except _PointerMoved as moved:
            return GuardVerdict("moved", reason=str(moved))

    def _check(self, session) -> GuardVerdict:
        from storage.checkpoints_repo import (
            current_activation,
            get_checkpoint,
            live_counters,
            rollback,
            update_live_metrics,
        )
        from storage.models import EventKind, utcnow

        activation = current_activation(session, self.deployment)
        if activation is None or activation.kind != EventKind.PROMOTE or activation.checkpoint_id is None:
            return GuardVerdict("idle")
        new = get_checkpoint(session, activation.checkpoint_id)
        judged = (new.live_metrics or {}).get("guard", {})
        if judged.get("activation_event_id") == activation.id and judged.get("verdict") != "watching":
            return GuardVerdict("idle", new.version, "already judged")

        live = live_counters(session, new.version, since=activation.at, proposer=new.kind)
        snapshot = {
            "requests": live.requests,
            "drafted": live.drafted,
            "accepted": live.accepted,
            "target_forwards": live.target_forwards,
            "emitted": live.emitted,
            "avg_len": live.draft_avg_len,
            "acceptance_rate": live.acceptance_rate,
            "model_requests": live.model_requests,
            "model_rounds": live.model_rounds,
            "model_accepted": live.model_accepted,
            "mean_accepted_length": live.mean_accepted_length,
            "since": activation.at.isoformat(),
            "measured_at": utcnow().isoformat(),
        }
        guard = {
            "activation_event_id": activation.id,
            "min_requests": self.settings.min_requests,
            "margin": self.settings.margin,
        }
        if live.model_requests < self.settings.min_requests:
            update_live_metrics(session, new.id, {**snapshot, "guard": {**guard, "verdict": "watching"}})
            return GuardVerdict("watching", new.version, f"{live.model_requests}/{self.settings.min_requests} requests")

        predecessor = (
            None if activation.from_checkpoint_id is None else get_checkpoint(session, activation.from_checkpoint_id)
        )
        previous_version = BASE_DRAFT_VERSION if predecessor is None else predecessor.version
        served = live_counters(session, previous_version, proposer=new.kind)  # a lineage is of one kind
        reference, source = self._reference(activation, predecessor, served)
        guard.update(reference_version=previous_version, reference_avg_len=reference, reference_source=source)
        if reference is None:
            update_live_metrics(session, new.id, {**snapshot, "guard": {**guard, "verdict": "kept"}})
            return GuardVerdict("kept", new.version, f"no reference for {previous_version}")

        floor = reference * (1 - self.settings.margin)
        numbers = (
            f"live AvgLen {live.draft_avg_len:.3f} over {live.model_requests} requests vs "
            f"{reference:.3f} for {previous_version} ({source}); floor {floor:.3f} at margin "
            f"{self.settings.margin:.0%}"
        )
        if live.draft_avg_len >= floor:
            update_live_metrics(session, new.id, {**snapshot, "guard": {**guard, "verdict": "kept"}})
            log.info("live guard keeps %s: %s", new.version, numbers)
            return GuardVerdict("kept", new.version, numbers)

        reason = f"{new.version} does worse in service than {previous_version}: {numbers}"
        event = rollback(
            session,
            activation.from_checkpoint_id,
            to_base=predecessor is None,
            actor=ACTOR,
            reason=reason,
            deployment=self.deployment,
            metrics={"live": snapshot, **guard},
        )
        if event.from_checkpoint_id != new.id:
            raise _PointerMoved(f"the pointer left {new.version} before the guard could roll it back")
        update_live_metrics(session, new.id, {**snapshot, "guard": {**guard, "verdict": "rolled_back"}})
        log.warning("live guard rolled back %s -> %s: %s", new.version, previous_version, numbers)
        return GuardVerdict("rolled_back", new.version, reason)

    @staticmethod
    def _reference(activation, predecessor, served) -> tuple[float | None, str]:
        if served.model_rounds:
            return served.draft_avg_len, f"live over {served.model_requests} requests"
        promoted_against = ((activation.metrics or {}).get("active") or {}).get("avg_len")
        if promoted_against:
            return float(promoted_against), "held-out in the promoting round"
        if predecessor is not None and predecessor.heldout_metrics.get("avg_len"):
            return float(predecessor.heldout_metrics["avg_len"]), "held-out when it was created"
        return None, "none"
