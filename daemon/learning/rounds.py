"""One learning round, read top to bottom like a training loop (RoundRunner._round, one comment per phase):

    reserve   start_round: the feedback after the last consumed window (its oldest `window_max_rows` rows)
    split     the window's newest rows are held out (`heldout_rows`, growing to at most half the window until they
              hold `min_heldout_tokens` emitted tokens: pipelines.gate.heldout_split), plus up to
              `train_history_rows` of the newest rows before the window to train on
    replay    held-out AvgLen of the active draft, on a training copy holding its weights (sha256-verified)
    train     learner.fit turns the copy into the candidate; every weight must stay finite
    replay    held-out AvgLen of the candidate, same rows
    decide    promote when candidate >= active * (1 + promote_margin) on >= min_heldout_tokens held-out tokens
              (pipelines.gate.decide)
    record    the one exit, whatever the outcome: candidate file (safetensors, sha256) + checkpoint row with the
              whole resolved config + promote or reject event + the round row, in one transaction

Outcomes (storage.models.RoundDecision): promoted / rejected consume the window; skipped (too few rows to hold
some out) and failed (an error, or the process stopped) leave it to the next round. A non-finite candidate is
*rejected* with the error: its window is consumed, so a poisonous window cannot stall learning forever, and the
learner's state is reset. The active draft never changes unless the candidate won. Each phase logs one line.

Drafts of both kinds (pipelines.drafts): a draft LM, or a head (pipelines.heads.model.HeadDraft). A head's training
copy is HeadDraft.copy_for_training() (the target is shared, not copied), on the target's device in the head's own
dtype whatever learning.device and training_dtype say; its replay simulates the engine's rounds with the engine's
catch-up window (`window`: the engine's max k + 1); its rounds recompute the target's features of the window's
requests once per round (pipelines.heads.feedback: the cost); its checkpoints are rows of kind `head` whose files
carry the HeadConfig (pipelines.drafts).

Training must not stall serving: the round runs on the scheduler's thread. On CPU it is limited to
`learning.cpu_threads` intra-op threads (torch's setting is per thread with OpenMP, so the decode thread keeps
its own); on CUDA it runs on a side stream, so its kernels interleave with the decode graphs instead of queuing
ahead of them. Serving tokens/s during the round and between rounds are recorded with the round.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from daemon.config import Settings
from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftWeights
from pipelines.gate import decide, heldout_split

__all__ = ["INTERRUPTED", "RoundResult", "RoundRunner", "RoundStopped", "heldout_split"]

log = logging.getLogger(__name__)

ACTOR = "scheduler"
INTERRUPTED = "interrupted"  # the reason recover() gives a round whose process died starts with this
ServingCounters = Callable[[], tuple[int, float]]  # (tokens decoded, seconds spent decoding), cumulative


class RoundStopped(Exception):
    """The daemon is shutting down; the round ends at a phase boundary and is recorded as failed."""


class _PointerMoved(Exception):
    """The active draft changed during the round: the candidate was compared with a version no longer active."""


@dataclass(frozen=True)
class RoundResult:
    round_id: int
    decision: str  # promoted | rejected | skipped | failed
    reason: str
    candidate_version: str | None = None
    candidate_avg_len: float | None = None
    active_avg_len: float | None = None


@dataclass
class _Window:
    """The feedback a round reserved, and the version that was active when it did."""

    round_id: int
    first_id: int | None
    last_id: int | None
    rows: int
    active_id: int | None
    active_version: str


@dataclass
class _Outcome:
    """How a round ended: what record() writes, whatever the decision."""

    decision: str  # promoted | rejected | skipped | failed
    reason: str
    active: dict[str, Any] | None = None  # held-out metrics of the active draft
    candidate: dict[str, Any] | None = None  # held-out metrics of the candidate
    error: str | None = None
    stored: Any = None  # storage.artifacts.StoredCheckpoint: the candidate's weights, when kept
    version: str | None = None  # the candidate's version label, when its weights were kept


class RoundRunner:
    def __init__(
        self,
        settings: Settings,
        session_factory,
        weights: DraftWeights,
        draft,
        *,
        target_identity: str,
        serving: ServingCounters | None = None,
        window: int | None = None,
    ):
        """`draft` is the served draft (a draft LM or a HeadDraft): copied once (on the training device) to train
        and replay on. `window`: a head's catch-up window in the engine (its max k + 1; default k + 1)."""
        from pipelines.drafts import training_device

        self.settings = settings
        self.learning = settings.learning
        self.session_factory = session_factory
        self.weights = weights
        self.target_identity = target_identity
        self.serving = serving or (lambda: (0, 0.0))
        self.device = training_device(draft, self.learning.device or settings.models.device)
        self.k = settings.engine.k
        self.window = window
        self._served_draft = draft
        self._training_draft = None
        self._learner = None
        self._serving_mark = (self.serving(), time.monotonic())  # end of the previous round

    # ------------------------------------------------------------------ the round

    def run(self, stop: threading.Event | None = None) -> RoundResult:
        """Run one round (the caller holds the learner lock) and record its outcome, whatever it is. Only a
        failure to reserve the window, or to record the round at all, raises."""
        journal = _Journal(self.serving, self._serving_mark)
        window = self._reserve()
        try:
            with self._training_context():
                outcome = self._round(window, stop or threading.Event(), journal)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("round %d failed: %s", window.round_id, error, exc_info=not isinstance(exc, RoundStopped))
            outcome = _Outcome("failed", error, error=error)
        try:
            return self.record(window, outcome, journal)
        except Exception as exc:
            if outcome.decision == "failed":
                raise
            # The candidate could not be recorded (the database went away, say): the round is failed, its window
            # offered again, and the active draft unchanged.
            error = f"recording the {outcome.decision} round failed: {type(exc).__name__}: {exc}"
            log.error("round %d: %s", window.round_id, error)
            return self.record(window, _Outcome("failed", error, error=error), journal)
        finally:
            self._serving_mark = (self.serving(), time.monotonic())

    def _round(self, window: _Window, stop: threading.Event, journal: _Journal) -> _Outcome:
        """The round's body, phase by phase; every way out is an _Outcome for record()."""
        from pipelines.learners import NonFiniteError

        # split: hold out the window's newest rows; train on the rest, plus rows from before the window
        with journal.phase("load_s"):
            train, heldout = self._load_feedback(window, journal)
        if not train:
            return _Outcome(
                "skipped",
                f"window of {window.rows} rows leaves nothing to train on after holding out "
                f"{self.learning.heldout_rows}",
            )
        rows = journal.notes["train_rows"]
        self._say(
            window,
            f"split: training on {len(train)} rows ({rows['window']} of the window, {rows['history']} "
            f"from before it), {len(heldout)} held out",
        )

        # replay the active draft on the held-out rows (the training copy holds its weights, verified)
        with journal.phase("replay_active_s"):
            draft = self._draft_with(window)
            active = self._replay(draft, heldout)
        self._say(
            window,
            f"replayed {window.active_version}: held-out AvgLen {_number(active.get('avg_len'))} "
            f"({journal.timings['replay_active_s']:.1f} s)",
        )
        _check_stop(stop)

        # train: the learner turns the active weights into the candidate; every weight must stay finite
        learner = self._learner_instance()
        try:
            with journal.phase("fit_s"):
                journal.notes["fit"] = _as_dict(learner.fit(draft, train, base_version=window.active_version))
                _assert_finite(draft)
        except NonFiniteError as exc:
            self._learner = None  # its state (momentum, ensemble weights) may be poisoned too
            # Rejected, not failed: the window is consumed, so a poisonous window cannot stall learning.
            return _Outcome(
                "rejected",
                f"candidate not finite, {window.active_version} stays active: {exc}",
                active=active,
                error=f"NonFiniteError: {exc}",
            )
        journal.notes["learner_state"] = _json_ready(learner.state_summary())
        fit = journal.notes["fit"]
        self._say(
            window,
            f"trained {fit.get('learner')}: {fit.get('steps')} steps, loss {_number(fit.get('loss_before'))}"
            f" -> {_number(fit.get('loss_after'))} ({journal.timings['fit_s']:.1f} s)",
        )
        _check_stop(stop)

        # replay the candidate on the same rows, and decide
        with journal.phase("replay_candidate_s"):
            candidate = self._replay(draft, heldout)
        promote, reason = self._decide(candidate, active, window)
        _check_stop(stop)
        outcome = _Outcome("promoted" if promote else "rejected", reason, active=active, candidate=candidate)

        # keep the candidate's weights: always when promoted, a rejected one's only with store_rejected
        if promote or self.learning.store_rejected:
            with journal.phase("store_s"):
                outcome.stored = self.weights.put(draft)  # the same weights are the same file
            outcome.version = f"r{window.round_id}-{outcome.stored.sha256[:8]}"
            learner.note_candidate_version(outcome.version)
        return outcome

    def _replay(self, draft, heldout) -> dict[str, Any]:
        from pipelines.replay import replay

        return _as_dict(replay(draft, heldout, k=self.k, device=self.device, window=self.window))

    def _decide(self, candidate: dict, active: dict, window: _Window) -> tuple[bool, str]:
        """(promote, reason): pipelines.gate.decide on the held-out numbers; the reason always carries them."""
        margin, minimum = self.learning.promote_margin, self.learning.min_heldout_tokens
        tokens = int(active.get("tokens") or 0)
        c, a = float(candidate.get("avg_len") or 0.0), float(active.get("avg_len") or 0.0)
        gain = f"{c / a - 1:+.1%}" if a else "n/a"
        numbers = (
            f"held-out AvgLen {c:.3f} vs {a:.3f} for {window.active_version} ({gain}, margin {margin:.1%}) "
            f"on {tokens} tokens of {int(active.get('requests') or 0)} requests"
        )
        decision = decide(c, a, tokens, margin=margin, min_tokens=minimum)
        return decision.promote, numbers if decision.promote else f"{numbers}: {decision.why_not}"

    # ------------------------------------------------------------------ the one exit

    def record(self, window: _Window, outcome: _Outcome, journal: _Journal) -> RoundResult:
        """Write the outcome, in one transaction: the candidate's checkpoint row (when its weights were kept), the
        promote or reject event, the round row. Then one log line.

        A promotion is taken only if the pointer still holds the version the candidate was compared with; an
        operator or the live guard may have moved it during the round, and then the candidate is rejected."""
        from storage.checkpoints_repo import reject, set_active
        from storage.models import EventKind

        journal.notes["serving"] = journal.serving_stats()
        actor_reason = f"round {window.round_id}: {outcome.reason}"
        if outcome.decision == "promoted":
            try:
                with self.session_factory.begin() as session:
                    checkpoint = self._add_candidate(session, window, outcome)
                    event = set_active(
                        session,
                        checkpoint.id,
                        ACTOR,
                        actor_reason,
                        EventKind.PROMOTE,
                        deployment=self.learning.deployment,
                        metrics=self._evidence(window, outcome),
                    )
                    if event.from_checkpoint_id != window.active_id:
                        raise _PointerMoved(
                            f"the active draft changed during the round (it is no longer {window.active_version})"
                        )
                    self._finish_round(session, window, outcome, journal, checkpoint.id)
                return self._report(window, outcome, journal)
            except _PointerMoved as moved:
                outcome = dataclasses.replace(
                    outcome, decision="rejected", reason=f"{outcome.reason}; not promoted: {moved}"
                )
                actor_reason = f"round {window.round_id}: {outcome.reason}"
        with self.session_factory.begin() as session:
            checkpoint_id = None
            if outcome.stored is not None:
                checkpoint_id = self._add_candidate(session, window, outcome).id
                reject(
                    session,
                    checkpoint_id,
                    actor=ACTOR,
                    reason=actor_reason,
                    deployment=self.learning.deployment,
                    metrics=self._evidence(window, outcome),
                )
            self._finish_round(session, window, outcome, journal, checkpoint_id)
        return self._report(window, outcome, journal)

    def _evidence(self, window: _Window, outcome: _Outcome) -> dict[str, Any]:
        return {
            "candidate": outcome.candidate or {},
            "active": {"version": window.active_version, **(outcome.active or {})},
        }

    def _add_candidate(self, session, window: _Window, outcome: _Outcome):
        """The candidate's checkpoint row, with the round's whole resolved configuration (secrets masked)."""
        from storage.checkpoints_repo import add_checkpoint

        stored, evidence = outcome.stored, self._evidence(window, outcome)
        return add_checkpoint(
            session,
            version=outcome.version,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            path=str(stored.path),
            learner=self._learner_name(),
            learner_settings=self._learner_settings(),
            target_identity=self.target_identity,
            parent_id=window.active_id,
            window_first_id=window.first_id,
            window_last_id=window.last_id,
            window_rows=window.rows,
            kind=self.weights.kind,
            settings=self.settings.resolved(),
            heldout_metrics={**(outcome.candidate or {}), "baseline": evidence["active"]},
            deployment=self.learning.deployment,
            reason=f"round {window.round_id}: {outcome.reason}",
        )

    def _finish_round(self, session, window: _Window, outcome: _Outcome, journal: _Journal, candidate_id) -> None:
        """The round row: the candidate's held-out metrics plus the round's own notes (why it decided so, phase
        timings, fit report, learner state, serving tokens/s during and between rounds) under candidate_metrics."""
        from storage.rounds_repo import finish_round

        candidate_metrics = {
            **(outcome.candidate or {}),
            "reason": outcome.reason,
            "timings": dict(journal.timings),
            **journal.notes,
        }
        finish_round(
            session,
            window.round_id,
            decision=outcome.decision,
            active_checkpoint_id=window.active_id,
            candidate_checkpoint_id=candidate_id,
            candidate_metrics=candidate_metrics,
            active_metrics=outcome.active,
            error=outcome.error,
            duration_seconds=journal.elapsed(),
        )

    def _report(self, window: _Window, outcome: _Outcome, journal: _Journal) -> RoundResult:
        """One log line for the round, and its result."""
        serving = journal.notes["serving"]
        rates = (
            f"fit {journal.timings.get('fit_s', 0.0):.1f} s, round {journal.elapsed():.1f} s; decode "
            f"{_rate(serving['decode_tps_during'])} tok/s during the round, "
            f"{_rate(serving['decode_tps_between'])} between rounds"
        )
        if outcome.version is not None:
            log.info(
                "round %d %s %s: %s; %s", window.round_id, outcome.decision, outcome.version, outcome.reason, rates
            )
        elif outcome.decision == "rejected" and outcome.error is None:
            log.info("round %d rejected (weights not kept): %s; %s", window.round_id, outcome.reason, rates)
        elif outcome.decision != "failed":  # a failure was logged with its traceback where it happened
            log.log(
                logging.WARNING if outcome.error else logging.INFO,
                "round %d %s: %s",
                window.round_id,
                outcome.decision,
                outcome.reason,
            )
        candidate, active = outcome.candidate or {}, outcome.active or {}
        return RoundResult(
            window.round_id,
            outcome.decision,
            outcome.reason,
            outcome.version,
            candidate.get("avg_len"),
            active.get("avg_len"),
        )

    def _say(self, window: _Window, text: str) -> None:
        """A round takes minutes: one line per phase shows where it is."""
        log.info("round %d %s", window.round_id, text)

    # ------------------------------------------------------------------ phases

    def recover(self) -> None:
        """Close rounds a dead process left open, and remove its half-written checkpoint files (lock held)."""
        from storage.rounds_repo import fail_unfinished_rounds

        with self.session_factory.begin() as session:
            closed = fail_unfinished_rounds(
                session,
                deployment=self.learning.deployment,
                reason=f"{INTERRUPTED}: its process stopped before the round finished",
            )
        removed = self.weights.store.cleanup_temp(min_age_seconds=0)
        if closed or removed:
            log.warning(
                "closed %d unfinished learning rounds as failed, removed %d partial checkpoint files",
                closed,
                len(removed),
            )

    def _reserve(self) -> _Window:
        """reserve: the feedback after the last consumed window (its oldest window_max_rows rows)."""
        from storage.checkpoints_repo import get_active_pointer, get_checkpoint
        from storage.rounds_repo import last_window_end, start_round

        deployment = self.learning.deployment
        with self.session_factory.begin() as session:
            after = last_window_end(session, deployment=deployment, target_identity=self.target_identity)
            round_ = start_round(
                session,
                learner=self._learner_name(),
                settings=self.settings.resolved(),
                target_identity=self.target_identity,
                after_id=after,
                max_rows=self.learning.window_max_rows,
                deployment=deployment,
            )
            pointer = get_active_pointer(session, deployment)
            active_id = None if pointer is None else pointer.checkpoint_id
            active_version = BASE_DRAFT_VERSION if active_id is None else get_checkpoint(session, active_id).version
            window = _Window(
                round_.id, round_.window_first_id, round_.window_last_id, round_.window_rows, active_id, active_version
            )
        self._say(
            window,
            f"started: {window.rows} feedback rows ({window.first_id}..{window.last_id}), "
            f"{self._learner_name()} learner, {active_version} active",
        )
        return window

    def _load_feedback(self, window: _Window, journal: _Journal) -> tuple[list, list]:
        """(train, held-out) RequestFeedback lists: held-out = the window's newest rows (heldout_split); train =
        up to train_history_rows rows from before the window, then the window's other rows (oldest first)."""
        from storage.feedback_repo import feedback_window, recent_feedback

        if window.rows == 0:
            return [], []
        with self.session_factory() as session:
            rows = [
                r.feedback
                for r in feedback_window(session, window.first_id, window.last_id, target_identity=self.target_identity)
            ]
            split = heldout_split(rows, self.learning.heldout_rows, self.learning.min_heldout_tokens)
            history = []
            if split and self.learning.train_history_rows:
                history = [
                    r.feedback
                    for r in recent_feedback(
                        session,
                        self.learning.train_history_rows,
                        target_identity=self.target_identity,
                        until_id=window.first_id - 1,
                    )
                ]
        journal.notes["train_rows"] = {"window": split, "history": len(history), "heldout": len(rows) - split}
        return history + rows[:split], rows[split:]

    def _draft_with(self, window: _Window):
        """The training copy, holding the active version's weights (verified against their sha256)."""
        from pipelines.drafts import training_copy
        from storage.checkpoints_repo import get_checkpoint
        from storage.errors import TargetMismatchError

        if self._training_draft is None:
            self._training_draft = training_copy(self._served_draft, self.device, self.learning.training_dtype)
        active = None
        if window.active_id is not None:
            with self.session_factory() as session:
                active = get_checkpoint(session, window.active_id)
            if active.target_identity != self.target_identity:
                raise TargetMismatchError(
                    f"active draft {active.version} was trained against target "
                    f"{active.target_identity}, this daemon serves {self.target_identity}"
                )
        self._training_draft.load_state_dict(self.weights.load(active), strict=True)
        return self._training_draft

    # ------------------------------------------------------------------ helpers

    def _learner_instance(self):
        from pipelines.learners import make_learner

        if self._learner is None:
            self._learner = make_learner(self.learning.learner)
        return self._learner

    def _learner_name(self) -> str:
        return self.learning.learner.name

    def _learner_settings(self) -> dict[str, Any]:
        return self.learning.learner.model_dump(mode="json")

    def _training_context(self):
        """CPU: few intra-op threads on this thread only. CUDA: a side stream for the round's kernels."""
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.stream(torch.cuda.Stream(device=self.device))
        torch.set_num_threads(self.learning.cpu_threads)
        return nullcontext()


class _Journal:
    """What a round measures about itself: phase timings, notes, and serving throughput during vs between."""

    def __init__(self, serving: ServingCounters, previous_mark: tuple[tuple[int, float], float]):
        self.serving = serving
        self.started = time.monotonic()
        self.serving_at_start = serving()
        self.previous_mark = previous_mark[0]  # serving counters when the previous round ended
        self.timings: dict[str, float] = {}
        self.notes: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - started

    def serving_stats(self) -> dict[str, float | int | None]:
        """Decode tokens/s (tokens per second of engine time) while the round ran and since the previous one."""
        now = self.serving()
        tokens, seconds = now[0] - self.serving_at_start[0], now[1] - self.serving_at_start[1]
        tokens_between = self.serving_at_start[0] - self.previous_mark[0]
        seconds_between = self.serving_at_start[1] - self.previous_mark[1]
        return {
            "tokens_during": tokens,
            "decode_tps_during": tokens / seconds if seconds > 0 else None,
            "tokens_between": tokens_between,
            "decode_tps_between": tokens_between / seconds_between if seconds_between > 0 else None,
        }


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise RoundStopped("stopped: the daemon is shutting down")


def _assert_finite(draft) -> None:
    import torch

    from pipelines.learners import NonFiniteError

    for name, tensor in draft.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"weight {name} has non-finite values")


def _as_dict(value) -> dict[str, Any]:
    """Metrics and reports as JSON-ready dicts (dataclasses or pydantic models)."""
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        data = value.to_dict()
    elif dataclasses.is_dataclass(value):
        data = dataclasses.asdict(value)
    elif hasattr(value, "model_dump"):
        data = value.model_dump(mode="json")
    else:
        data = dict(value)
    return {key: _json_ready(item) for key, item in data.items()}


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value
