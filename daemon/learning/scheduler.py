"""The daemon's learning side on APScheduler (a BackgroundScheduler: its own threads, never the decode thread).

    learning-round    every `learning.interval_s`: a round, if enough new feedback arrived to hold some out
    learning-trigger  every `learning.check_interval_s`: wakes learning-round at once when at least
                      `learning.min_new_tokens` feedback tokens arrived since the last round's window
    live-guard        every `learning.live_guard.check_interval_s`: judges the newest promotion
                      (daemon.learning.live_guard)

Every job has max_instances=1 and coalesce=True: a round never overlaps another, and runs missed while one was
busy collapse into one. Only learning-round trains, so its max_instances is what keeps rounds apart inside a
process; the learner lock (an advisory lock on PostgreSQL) keeps them apart across processes. The pool has two
threads so the live guard keeps watching while a long round trains.

Shutdown (SIGTERM): stop() stops scheduling and asks a running round to end at its next phase boundary (it is
then recorded as failed); wait_idle() waits for it up to what is left of the grace period. A round cut off by
process exit stays open and is closed as failed by the next round's recover().
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from daemon.config import Settings
from daemon.learning.learner_lock import LearnerLock
from daemon.learning.live_guard import LiveGuard
from daemon.learning.rounds import RoundResult, RoundRunner

log = logging.getLogger(__name__)

ROUND_JOB = "learning-round"
TRIGGER_JOB = "learning-trigger"
GUARD_JOB = "live-guard"
JOB_OPTIONS = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}


class LearningScheduler:
    def __init__(
        self,
        settings: Settings,
        session_factory,
        *,
        target_identity: str,
        lock: LearnerLock | None,
        runner: RoundRunner | None,
        guard: LiveGuard | None,
    ):
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.learning = settings.learning
        self.session_factory = session_factory
        self.target_identity = target_identity
        self.lock = lock
        self.runner = runner
        self.guard = guard
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while a round runs
        self._idle.set()
        self._failures = 0
        self._quiet_until = 0.0
        self._failing_jobs: set[str] = set()
        self.last_result: RoundResult | None = None
        self.scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults=JOB_OPTIONS, executors={"default": ThreadPoolExecutor(max_workers=2)}
        )
        if runner is not None:
            assert lock is not None, "rounds need the learner lock"
            self._add(ROUND_JOB, "learning round", self.round_job, self.learning.interval_s)
            self._add(TRIGGER_JOB, "new-feedback trigger", self.trigger_job, self.learning.check_interval_s)
        if guard is not None:
            self._add(GUARD_JOB, "live guard", self.guard_job, self.learning.live_guard.check_interval_s)

    def _add(self, job_id: str, name: str, function, every_s: float) -> None:
        from apscheduler.triggers.interval import IntervalTrigger

        trigger = IntervalTrigger(seconds=every_s, timezone=UTC)  # UTC: no local time-zone lookup
        self.scheduler.add_job(function, trigger, id=job_id, name=name, **JOB_OPTIONS)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.runner is not None:
            self._recover()
        self.scheduler.start()
        jobs = ", ".join(sorted(job.id for job in self.scheduler.get_jobs()))
        log.info("learning scheduler started (%s); deployment %r", jobs, self.learning.deployment)

    def stop(self) -> None:
        """Schedule nothing more and ask a running round to stop at its next phase boundary; does not wait."""
        self._stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def wait_idle(self, timeout: float) -> bool:
        """True once no round is running (False if one still is after `timeout` seconds)."""
        return self._idle.wait(max(0.0, timeout))

    @property
    def round_running(self) -> bool:
        return not self._idle.is_set()

    # ------------------------------------------------------------------ jobs

    def round_job(self) -> RoundResult | None:
        """One round if there is feedback to learn from and no other process is running one."""
        self._idle.clear()
        try:
            if self._stop.is_set():
                return None
            rows, tokens = self._new_feedback()
            if rows <= self.learning.heldout_rows:
                log.debug("no round: %d new feedback rows, more than %d needed", rows, self.learning.heldout_rows)
                return None
            with self.lock.hold() as held:
                if not held:
                    log.debug("no round: another process of deployment %r is running one", self.learning.deployment)
                    return None
                log.info("learning round on %d new feedback rows (%d tokens)", rows, tokens)
                self.runner.recover()
                result = self.runner.run(self._stop)
            self.last_result = result
            self._back_off(result.decision == "failed")
            return result
        except Exception as exc:
            log.error("learning round could not run: %s: %s", type(exc).__name__, exc)
            self._back_off(True)
            return None
        finally:
            self._idle.set()

    def trigger_job(self) -> bool:
        """Wake the round job now if enough new feedback tokens arrived; True when it did."""
        if self._stop.is_set() or self.round_running or time.monotonic() < self._quiet_until:
            return False
        try:
            rows, tokens = self._new_feedback()
        except Exception as exc:
            self._job_failed(TRIGGER_JOB, exc)
            return False
        self._job_ok(TRIGGER_JOB)
        if rows <= self.learning.heldout_rows or tokens < self.learning.min_new_tokens:
            return False
        log.info(
            "%d new feedback tokens in %d rows (trigger at %d): starting a round",
            tokens,
            rows,
            self.learning.min_new_tokens,
        )
        self.scheduler.modify_job(ROUND_JOB, next_run_time=datetime.now(UTC))
        return True

    def guard_job(self):
        try:
            verdict = self.guard.check()
        except Exception as exc:
            self._job_failed(GUARD_JOB, exc)
            return None
        self._job_ok(GUARD_JOB)
        return verdict

    # ------------------------------------------------------------------ helpers

    def _recover(self) -> None:
        """At start: rounds left open by a process that died are closed as failed, partial files removed."""
        try:
            with self.lock.hold() as held:
                if held:
                    self.runner.recover()
        except Exception as exc:
            log.warning("could not close unfinished rounds at start: %s: %s", type(exc).__name__, exc)

    def _new_feedback(self) -> tuple[int, int]:
        """(rows, tokens) of this target's feedback after the last consumed window."""
        from storage.feedback_repo import feedback_totals_since
        from storage.rounds_repo import last_window_end

        with self.session_factory() as session:
            after = last_window_end(session, deployment=self.learning.deployment, target_identity=self.target_identity)
            totals = feedback_totals_since(session, after, target_identity=self.target_identity)
        return totals.rows, totals.tokens

    def _job_failed(self, job_id: str, exc: Exception) -> None:
        """Warn once per outage (e.g. the database is down), not on every run of a frequent job."""
        level = logging.DEBUG if job_id in self._failing_jobs else logging.WARNING
        self._failing_jobs.add(job_id)
        log.log(level, "%s: %s: %s (retrying every run)", job_id, type(exc).__name__, exc)

    def _job_ok(self, job_id: str) -> None:
        if job_id in self._failing_jobs:
            self._failing_jobs.discard(job_id)
            log.info("%s works again", job_id)

    def _back_off(self, failed: bool) -> None:
        """After a failed round (its window is offered again) the trigger waits, doubling up to interval_s."""
        self._failures = self._failures + 1 if failed else 0
        if failed:
            delay = min(self.learning.interval_s, self.learning.check_interval_s * 2**self._failures)
            self._quiet_until = time.monotonic() + delay
        else:
            self._quiet_until = 0.0
