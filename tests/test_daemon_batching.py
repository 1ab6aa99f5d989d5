"""Offsets are committable only up to the first unfinished record; micro-batches respect size and wait."""

from __future__ import annotations

import queue
import threading
import time

from kafka.structs import TopicPartition

from daemon.serving.batching import OffsetTracker, collect_batch

TP0 = TopicPartition("prompts", 0)
TP1 = TopicPartition("prompts", 1)


def test_commit_position_stops_at_the_first_unfinished_record():
    tracker = OffsetTracker()
    tracker.assign([TP0, TP1])
    epochs = {offset: tracker.track(TP0, offset) for offset in range(10, 15)}
    assert tracker.committable() == {}
    tracker.done(TP0, epochs[12], 12)
    tracker.done(TP0, epochs[11], 11)
    assert tracker.committable() == {}  # 10 is still open
    tracker.done(TP0, epochs[10], 10)
    assert tracker.committable() == {TP0: 13}
    tracker.committed({TP0: 13})
    assert tracker.committable() == {}
    tracker.done(TP0, epochs[14], 14)
    assert tracker.committable() == {}
    tracker.done(TP0, epochs[13], 13)
    assert tracker.committable() == {TP0: 15}
    assert tracker.in_flight() == 0


def test_partitions_are_independent():
    tracker = OffsetTracker()
    tracker.assign([TP0, TP1])
    e0, e1 = tracker.track(TP0, 0), tracker.track(TP1, 7)
    tracker.track(TP0, 1)
    tracker.done(TP1, e1, 7)
    assert tracker.committable() == {TP1: 8}
    assert tracker.in_flight() == 2
    tracker.done(TP0, e0, 0)
    assert tracker.committable() == {TP0: 1, TP1: 8}


def test_records_of_revoked_partitions_are_stale_even_after_reassignment():
    tracker = OffsetTracker()
    tracker.assign([TP0])
    old = tracker.track(TP0, 5)
    tracker.revoke([TP0])
    assert tracker.track(TP0, 6) is None  # not assigned: dropped
    assert not tracker.done(TP0, old, 5)
    tracker.assign([TP0])
    assert not tracker.is_current(TP0, old)
    assert not tracker.done(TP0, old, 5)  # finished under the old assignment: not ours to commit
    new = tracker.track(TP0, 5)
    assert tracker.is_current(TP0, new)
    assert tracker.done(TP0, new, 5)
    assert tracker.committable() == {TP0: 6}


def test_collect_batch_returns_full_batches_without_waiting():
    inbox = queue.Queue()
    for i in range(10):
        inbox.put(i)
    started = time.monotonic()
    assert collect_batch(inbox, 4, max_wait_s=5.0) == [0, 1, 2, 3]
    assert time.monotonic() - started < 1.0


def test_collect_batch_waits_at_most_max_wait_after_the_first_item():
    inbox = queue.Queue()
    inbox.put("first")
    threading.Timer(0.05, inbox.put, args=("second",)).start()
    started = time.monotonic()
    batch = collect_batch(inbox, 8, max_wait_s=0.3)
    elapsed = time.monotonic() - started
    assert batch == ["first", "second"]
    assert 0.25 <= elapsed < 1.0


def test_collect_batch_on_an_empty_queue_returns_nothing_quickly():
    assert collect_batch(queue.Queue(), 8, max_wait_s=10.0, first_timeout_s=0.05) == []
