"""What the learner reads (pages, windows, held-out), learning rounds, and retention that spares open rounds."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from storage import feedback_repo, rounds_repo
from storage.errors import StorageError
from storage.models import Feedback, RoundDecision, utcnow
from storage.requests_repo import CompletedRequest, record_request_received, store_results
from tests.storage_fixtures import make_result
from tests.test_storage_packing import assert_same_feedback

TARGET = "target-a"


def store(session_factory, count, start=0, target=TARGET, age=timedelta(0)):
    """`count` completed requests with feedback created `age` ago; returns their results."""
    with session_factory.begin() as session:
        return store_in(session, count, start, target, age)


def store_in(session, count, start=0, target=TARGET, age=timedelta(0)):
    """store() inside a transaction of the caller's."""
    results = [make_result(f"r{i}", n=8, m=4, seed=i) for i in range(start, start + count)]
    for result in results:
        record_request_received(session, result.id, "prompts", 0, int(result.id[1:]), {}, 5)
    completed = [CompletedRequest(r, json.dumps({"id": r.id})) for r in results]
    store_results(session, completed, target_identity=target, completed_at=utcnow() - age)
    return results


def ids(records):
    return [record.id for record in records]


def test_feedback_since_pages_in_id_order_and_filters_by_target(db_session_factory):
    results = store(db_session_factory, 5)
    store(db_session_factory, 2, start=5, target="target-b")
    with db_session_factory() as session:
        first = feedback_repo.feedback_since(session, None, 3, target_identity=TARGET)
        rest = feedback_repo.feedback_since(session, first[-1].id, 100, target_identity=TARGET)
        assert ids(first) == [1, 2, 3] and ids(rest) == [4, 5]
        assert [r.request_id for r in first + rest] == [r.id for r in results]
        assert_same_feedback(first[0].feedback, results[0].feedback)
        assert first[0].counters.emitted == results[0].counters.emitted
        assert first[0].target_identity == TARGET and first[0].created_at.tzinfo is not None
        assert ids(feedback_repo.feedback_since(session, None, 100)) == [1, 2, 3, 4, 5, 6, 7]
        assert ids(feedback_repo.feedback_since(session, 2, 100, until_id=4)) == [3, 4]
        assert ids(feedback_repo.feedback_window(session, 2, 6, target_identity=TARGET, page=2)) == [2, 3, 4, 5]
        assert ids(feedback_repo.recent_feedback(session, 2, target_identity=TARGET)) == [4, 5]
        assert ids(feedback_repo.recent_feedback(session, 2, until_id=3)) == [2, 3]


def test_round_reserves_window_and_records_outcome(db_session_factory):
    store(db_session_factory, 6)
    store(db_session_factory, 2, start=6, target="target-b")
    with db_session_factory.begin() as session:
        round_ = rounds_repo.start_round(
            session, learner="osd", settings={"lr": 1e-4}, target_identity=TARGET, max_rows=4
        )
        assert (round_.window_first_id, round_.window_last_id, round_.window_rows) == (1, 4, 4)
        assert round_.finished_at is None
    with db_session_factory.begin() as session:
        rounds_repo.finish_round(
            session,
            round_.id,
            decision=RoundDecision.REJECTED,
            active_checkpoint_id=None,
            candidate_metrics={"avg_len": 1.9},
            active_metrics={"avg_len": 2.0},
        )
        assert rounds_repo.last_window_end(session) == 4
        following = rounds_repo.start_round(
            session, learner="osd", settings={}, target_identity=TARGET, after_id=rounds_repo.last_window_end(session)
        )
        assert (following.window_first_id, following.window_last_id, following.window_rows) == (5, 6, 2)
        rounds_repo.finish_round(session, following.id, decision="skipped")
        assert rounds_repo.last_window_end(session) == 4  # skipped rounds do not consume their window
        empty = rounds_repo.start_round(session, learner="osd", settings={}, target_identity="target-c")
        assert (empty.window_first_id, empty.window_rows) == (None, 0)
    with db_session_factory() as session:
        done = rounds_repo.get_round(session, round_.id)
        assert done.decision == "rejected" and done.duration_seconds >= 0
        assert done.candidate_metrics == {"avg_len": 1.9} and done.settings == {"lr": 1e-4}
        assert [r.id for r in rounds_repo.list_rounds(session)] == [3, 2, 1]
        with pytest.raises(StorageError, match="already finished"):
            rounds_repo.finish_round(session, round_.id, decision="promoted")
        with pytest.raises(ValueError, match="decision must be one of"):
            rounds_repo.finish_round(session, empty.id, decision="maybe")


def test_a_window_never_passes_over_feedback_still_being_written(db_backend, db_session_factory):
    """Feedback ids come from a sequence when a row is inserted, but several workers' transactions commit in any
    order. A round reserving its window while a lower id is not committed yet must wait for it: the next round
    starts after this window's last id, so a row passed over would never be learned from."""
    if db_backend != "postgresql":
        pytest.skip("SQLite has one writer at a time: the round's own insert already waits for an open batch")
    inserted, release, windows = threading.Event(), threading.Event(), []

    def open_batch():  # a worker's batch, its transaction still open
        with db_session_factory.begin() as session:
            store_in(session, 1, start=0)
            session.flush()
            inserted.set()
            release.wait(30)

    def reserve():
        with db_session_factory.begin() as session:
            round_ = rounds_repo.start_round(session, learner="osd", settings={}, target_identity=TARGET)
            windows.append((round_.window_first_id, round_.window_last_id, round_.window_rows))

    def waiting_on_a_lock() -> bool:
        with db_session_factory() as session:
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return session.scalar(text(sql)) > 0

    batch, round_thread = threading.Thread(target=open_batch), threading.Thread(target=reserve)
    batch.start()
    assert inserted.wait(30)
    store(db_session_factory, 1, start=1)  # another worker's batch: a higher id, committed first
    round_thread.start()
    deadline = time.monotonic() + 30
    while round_thread.is_alive() and not waiting_on_a_lock() and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    batch.join(30)
    round_thread.join(30)
    with db_session_factory() as session:
        first, last = session.execute(select(func.min(Feedback.id), func.max(Feedback.id))).one()
    assert windows == [(first, last, 2)]


def test_prune_deletes_old_rows_except_open_round_windows(db_session_factory):
    store(db_session_factory, 6, age=timedelta(days=10))  # ids 1..6
    store(db_session_factory, 2, start=6, age=timedelta(hours=1))  # ids 7..8
    with db_session_factory.begin() as session:
        rounds_repo.start_round(session, learner="osd", settings={}, target_identity=TARGET, after_id=2, max_rows=2)
        finished = rounds_repo.start_round(
            session, learner="osd", settings={}, target_identity=TARGET, after_id=4, max_rows=1
        )
        rounds_repo.finish_round(session, finished.id, decision="promoted")
    with db_session_factory.begin() as session:
        assert feedback_repo.prune_feedback(session, timedelta(days=7), limit=1) == 1  # oldest first
    with db_session_factory.begin() as session:
        assert feedback_repo.prune_feedback(session, timedelta(days=7)) == 3
    with db_session_factory() as session:
        assert list(session.scalars(select(Feedback.id).order_by(Feedback.id))) == [3, 4, 7, 8]
    with db_session_factory.begin() as session:  # the learner restarts: the open round died with its process
        assert rounds_repo.fail_unfinished_rounds(session, reason="learner restarted") == 1
        assert feedback_repo.prune_feedback(session, timedelta(days=7)) == 2
        assert rounds_repo.get_round(session, 1).decision == RoundDecision.FAILED
    with pytest.raises(ValueError, match="must be positive"), db_session_factory() as session:
        feedback_repo.prune_feedback(session, timedelta(0))


def test_times_are_utc_on_both_backends(db_session_factory):
    store(db_session_factory, 1)
    with db_session_factory.begin() as session:
        session.execute(update(Feedback).values(created_at=utcnow() - timedelta(days=3)))
    with db_session_factory() as session:
        (record,) = feedback_repo.feedback_since(session, None, 10)
        age = utcnow() - record.created_at
        assert timedelta(days=3) <= age < timedelta(days=3, minutes=1)


def test_feedback_totals_since_counts_rows_and_tokens_of_one_target(db_session_factory):
    store(db_session_factory, 4)  # 8 tokens each
    store(db_session_factory, 2, start=4, target="target-b")
    with db_session_factory() as session:
        everything = feedback_repo.feedback_totals_since(session, None, target_identity=TARGET)
        after_two = feedback_repo.feedback_totals_since(session, 2, target_identity=TARGET)
        none_left = feedback_repo.feedback_totals_since(session, everything.last_id, target_identity=TARGET)
    assert (everything.rows, everything.tokens) == (4, 32)
    assert (after_two.rows, after_two.tokens, after_two.last_id) == (2, 16, everything.last_id)
    assert (none_left.rows, none_left.tokens, none_left.last_id) == (0, 0, None)
