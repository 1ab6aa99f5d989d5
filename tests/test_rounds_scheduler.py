"""Scheduling of learning rounds (APScheduler jobs, the new-tokens trigger, shutdown) and the learner lock: one
round at a time per deployment, across processes on PostgreSQL (two contenders, one wins) and inside one on SQLite.
The round itself is a stub here; tests/test_rounds.py runs real ones.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import pytest

from daemon.learning.learner_lock import LearnerLock, advisory_key
from daemon.learning.rounds import RoundResult
from daemon.learning.scheduler import GUARD_JOB, ROUND_JOB, TRIGGER_JOB, LearningScheduler
from tests.rounds_fixtures import TARGET_IDENTITY, learning_settings, session_factory_for
from tests.storage_fixtures import make_result


class StubRunner:
    """Stands in for RoundRunner: counts rounds, can take its time and honours the stop request."""

    def __init__(self, seconds: float = 0.0, decision: str = "rejected"):
        self.seconds = seconds
        self.decision = decision
        self.runs = 0
        self.recovered = 0
        self.running = threading.Event()

    def recover(self) -> None:
        self.recovered += 1

    def run(self, stop: threading.Event) -> RoundResult:
        self.runs += 1
        self.running.set()
        if stop.wait(self.seconds):
            return RoundResult(self.runs, "failed", "stopped: the daemon is shutting down")
        return RoundResult(self.runs, self.decision, "stub")


@pytest.fixture
def database(sqlite_url):
    engine, session_factory = session_factory_for(sqlite_url)
    yield engine, session_factory
    engine.dispose()


def add_feedback(session_factory, count: int, start: int, tokens: int = 8) -> None:
    from storage.requests_repo import CompletedRequest, record_request_received, store_results

    results = [make_result(f"f{i}", n=tokens, m=4, seed=i) for i in range(start, start + count)]
    with session_factory.begin() as session:
        for result in results:
            record_request_received(session, result.id, None, None, None, {}, 5)
        store_results(
            session, [CompletedRequest(r, json.dumps({"id": r.id})) for r in results], target_identity=TARGET_IDENTITY
        )


def scheduler_for(tmp_path, database, runner, **learning) -> LearningScheduler:
    engine, session_factory = database
    values = {"heldout_rows": 2, "min_new_tokens": 40, "interval_s": 3600.0, "check_interval_s": 3600.0, **learning}
    settings = learning_settings(tmp_path, str(engine.url), **values)
    lock = LearnerLock(engine, settings.learning.deployment)
    return LearningScheduler(
        settings, session_factory, target_identity=TARGET_IDENTITY, lock=lock, runner=runner, guard=None
    )


def test_every_job_is_single_instance_and_coalesced(tmp_path, database):
    from daemon.learning.live_guard import LiveGuard

    engine, session_factory = database
    settings = learning_settings(
        tmp_path, str(engine.url), interval_s=600.0, check_interval_s=5.0, guard={"check_interval_s": 7.0}
    )
    scheduler = LearningScheduler(
        settings,
        session_factory,
        target_identity=TARGET_IDENTITY,
        lock=LearnerLock(engine, "default"),
        runner=StubRunner(),
        guard=LiveGuard(settings.learning.live_guard, session_factory, deployment="default"),
    )
    jobs = {job.id: job for job in scheduler.scheduler.get_jobs()}
    assert set(jobs) == {ROUND_JOB, TRIGGER_JOB, GUARD_JOB}
    for job in jobs.values():
        assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, None)
    assert jobs[ROUND_JOB].trigger.interval.total_seconds() == 600
    assert jobs[TRIGGER_JOB].trigger.interval.total_seconds() == 5
    assert jobs[GUARD_JOB].trigger.interval.total_seconds() == 7

    guard_only = LearningScheduler(
        settings,
        session_factory,
        target_identity=TARGET_IDENTITY,
        lock=None,
        runner=None,
        guard=LiveGuard(settings.learning.live_guard, session_factory, deployment="default"),
    )
    assert [job.id for job in guard_only.scheduler.get_jobs()] == [GUARD_JOB]


def test_the_new_tokens_trigger_wakes_the_round_job(tmp_path, database):
    runner = StubRunner()
    scheduler = scheduler_for(tmp_path, database, runner, min_new_tokens=40)
    scheduler.start()
    try:
        assert runner.recovered == 1  # unfinished rounds are closed when the scheduler starts
        add_feedback(database[1], 3, start=0)  # 24 tokens
        assert scheduler.trigger_job() is False
        add_feedback(database[1], 3, start=3)  # 48 tokens in 6 rows
        woken_at = datetime.now(UTC)
        assert scheduler.trigger_job() is True
        assert runner.running.wait(10), "the round job did not run"
        job = scheduler.scheduler.get_job(ROUND_JOB)
        assert (job.next_run_time - woken_at).total_seconds() > 3000  # back on its interval after the early run
    finally:
        scheduler.stop()
    assert scheduler.wait_idle(10) and runner.runs == 1


def test_no_round_without_enough_feedback_to_hold_some_out(tmp_path, database):
    runner = StubRunner()
    scheduler = scheduler_for(tmp_path, database, runner, heldout_rows=4, min_new_tokens=1)
    add_feedback(database[1], 4, start=0)
    assert scheduler.round_job() is None and scheduler.trigger_job() is False
    add_feedback(database[1], 1, start=4)
    assert scheduler.round_job().decision == "rejected" and runner.runs == 1


def test_a_failed_round_quiets_the_trigger_for_a_while(tmp_path, database):
    runner = StubRunner(decision="failed")
    scheduler = scheduler_for(tmp_path, database, runner, check_interval_s=1.0, min_new_tokens=1)
    add_feedback(database[1], 5, start=0)
    assert scheduler.round_job().decision == "failed"
    assert scheduler.trigger_job() is False  # would loop on the same window otherwise
    runner.decision = "rejected"
    scheduler._quiet_until = 0.0
    scheduler.start()
    try:
        assert scheduler.trigger_job() is True
    finally:
        scheduler.stop()


def test_rounds_in_one_process_never_overlap(tmp_path, database):
    runner = StubRunner(seconds=1.0)
    scheduler = scheduler_for(tmp_path, database, runner)
    add_feedback(database[1], 5, start=0)
    results = []
    threads = [threading.Thread(target=lambda: results.append(scheduler.round_job())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert runner.runs == 1 and sorted(r is None for r in results) == [False, True]


def test_stop_ends_a_running_round_within_the_grace_period(tmp_path, database):
    runner = StubRunner(seconds=60.0)
    scheduler = scheduler_for(tmp_path, database, runner)
    add_feedback(database[1], 5, start=0)
    scheduler.start()
    worker = threading.Thread(target=scheduler.round_job)
    worker.start()
    assert runner.running.wait(10) and scheduler.round_running
    started = time.monotonic()
    scheduler.stop()
    assert scheduler.wait_idle(5) and time.monotonic() - started < 5
    worker.join(5)
    assert scheduler.last_result.decision == "failed" and not scheduler.scheduler.running


# ---------------------------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_the_advisory_lock_lets_one_of_two_contenders_run(postgres_url):
    from storage.db import make_engine

    engines = [make_engine(postgres_url), make_engine(postgres_url)]  # two pools: as two daemons
    locks = [LearnerLock(engine, "default") for engine in engines]
    assert all(lock.shared for lock in locks)
    barrier = threading.Barrier(2)
    winners, release = [], threading.Event()

    def contend(index: int) -> None:
        with locks[index].hold() as held:
            barrier.wait(10)  # both have tried before either lets go
            if held:
                winners.append(index)
                release.wait(10)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while not winners and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(winners) == 1
    with locks[1 - winners[0]].hold() as held:
        assert not held  # still taken by the winner
    with LearnerLock(engines[1 - winners[0]], "other-deployment").hold() as held:
        assert held  # deployments learn independently
    release.set()
    for thread in threads:
        thread.join(10)
    with locks[1 - winners[0]].hold() as held:
        assert held  # released with the round
    for engine in engines:
        engine.dispose()
    assert advisory_key("default") != advisory_key("other-deployment")


@pytest.mark.postgres
def test_two_daemons_on_postgresql_run_one_round_at_a_time(tmp_path, postgres_url):
    from storage.db import make_engine, make_session_factory

    schedulers, runners, engines = [], [], []
    for index in range(2):
        engine = make_engine(postgres_url)
        engines.append(engine)
        runner = StubRunner(seconds=1.0)
        runners.append(runner)
        schedulers.append(scheduler_for(tmp_path / str(index), (engine, make_session_factory(engine)), runner))
    add_feedback(make_session_factory(engines[0]), 5, start=0)
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.round_job())) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert sum(r.runs for r in runners) == 1 and sum(r is None for r in results) == 1
    for engine in engines:
        engine.dispose()
