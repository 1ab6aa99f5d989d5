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


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_partition_is_stalled_when_its_committed_offset_stays_put_while_records_wait(caplog):
    from daemon.serving.metrics import DaemonMetrics
    from daemon.serving.stalls import StallWatch

    clock, metrics = Clock(), DaemonMetrics()
    watch = StallWatch(30.0, metrics, clock=clock)
    stalled = lambda: metrics.stalled.labels("prompts", "0")._value.get()  # noqa: E731
    assert not watch.observe(TP0, 10, waiting=0)
    clock.now += 100
    assert not watch.observe(TP0, 10, waiting=0)  # idle for long: not stalled
    assert not watch.observe(TP0, 10, waiting=3)
    clock.now += 29
    assert not watch.observe(TP0, 10, waiting=3)
    clock.now += 1
    with caplog.at_level("WARNING"):
        assert watch.observe(TP0, 10, waiting=3, context="kafka unavailable: KafkaTimeoutError")
    assert "partition prompts/0 stalled: committed offset 10 has not moved for 30 s while 3 records wait" in caplog.text
    assert "kafka unavailable" in caplog.text and stalled() == 1
    clock.now += 60
    assert watch.observe(TP0, 10, waiting=5)  # still stalled, counted once
    assert metrics.stalls.labels("prompts", "0")._value.get() == 1 and watch.found == 1
    with caplog.at_level("INFO"):
        assert not watch.observe(TP0, 14, waiting=1)  # moving again
    assert "moving again after 90 s (committed offset 10 -> 14)" in caplog.text and stalled() == 0
    clock.now += 29
    assert not watch.observe(TP0, 14, waiting=1)  # the clock restarted when it moved
    assert not watch.observe(TP1, None, waiting=2)  # nothing committed yet counts from the first wait
    clock.now += 31
    assert watch.observe(TP1, None, waiting=2)
    watch.forget([TP1])
    assert metrics.stalled.labels("prompts", "1")._value.get() == 0


def test_progress_reports_the_committed_offset_and_what_is_not_committable_yet():
    tracker = OffsetTracker()
    tracker.assign([TP0])
    epochs = {offset: tracker.track(TP0, offset) for offset in (4, 5, 6)}
    assert tracker.progress(TP0) == (None, 3, 4)
    tracker.done(TP0, epochs[4], 4)
    tracker.committed(tracker.committable())
    assert tracker.progress(TP0) == (5, 2, 5)
    assert tracker.progress(TP1) == (None, 0, None)


def test_records_that_will_not_be_decoded_do_not_fill_a_batch():
    inbox = queue.Queue()
    for i in range(12):
        inbox.put(("bad", i) if i % 3 else ("good", i))  # good at 0, 3, 6, 9
    batch = collect_batch(inbox, 3, max_wait_s=5.0, counts=lambda item: item[0] == "good")
    assert [i for _, i in batch] == list(range(7)) and inbox.qsize() == 5  # three good ones and the bad between


def test_the_wait_starts_at_the_first_record_to_decode_and_a_batch_has_a_largest_size():
    inbox = queue.Queue()
    for i in range(5):
        inbox.put(("bad", i))
    threading.Timer(0.15, inbox.put, args=(("good", 5),)).start()  # the first to decode comes late
    started = time.monotonic()
    batch = collect_batch(inbox, 4, max_wait_s=0.3, counts=lambda item: item[0] == "good")
    assert [i for _, i in batch] == list(range(6)) and time.monotonic() - started >= 0.15 + 0.29
    for i in range(50):
        inbox.put(("bad", i))
    assert len(collect_batch(inbox, 4, max_wait_s=5.0, counts=lambda item: item[0] == "good", max_records=20)) == 20
    assert collect_batch(inbox, 4, max_wait_s=0.05, counts=lambda item: False) == [("bad", i) for i in range(20, 50)]


class RecordingConsumer:
    """Records what the rebalance listener asks of the consumer; a blocking call would raise, as on the IO thread."""

    def __init__(self):
        self.async_commits = []
        self.seeks = []

    def commit_async(self, offsets):
        self.async_commits.append({tp: meta.offset for tp, meta in offsets.items()})

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    def commit(self, *args, **kwargs):
        raise RuntimeError("Cannot block on net.run() from the IO thread itself")


def test_the_rebalance_listener_never_blocks_and_forgets_lost_partitions():
    from daemon.serving.metrics import DaemonMetrics
    from daemon.serving.poller import _Rebalance
    from daemon.serving.stalls import StallWatch

    tracker = OffsetTracker()
    poller = type("PollerParts", (), {"tracker": tracker, "stalls": StallWatch(30.0, DaemonMetrics())})()
    consumer = RecordingConsumer()
    listener = _Rebalance(poller, consumer)
    tracker.assign([TP0, TP1])
    tracker.done(TP0, tracker.track(TP0, 3), 3)
    listener.on_partitions_revoked({TP0})
    assert consumer.async_commits == [{TP0: 4}] and not tracker.is_current(TP0, 1)
    epoch = tracker.track(TP1, 9)
    listener.on_partitions_lost({TP1})  # no commit at all: the group no longer knows us
    assert consumer.async_commits == [{TP0: 4}] and not tracker.done(TP1, epoch, 9)


def test_a_partition_assigned_again_is_fetched_from_its_first_unfinished_record():
    """kafka-python keeps the fetch position of a partition a rebalance gives back to the same member; the records
    queued for it were dropped as stale, so the listener seeks back to the first of them."""
    from daemon.serving.metrics import DaemonMetrics
    from daemon.serving.poller import _Rebalance
    from daemon.serving.stalls import StallWatch

    tracker = OffsetTracker()
    poller = type("PollerParts", (), {"tracker": tracker, "stalls": StallWatch(30.0, DaemonMetrics()), "rebalances": 0})
    poller.assigned = threading.Event()
    consumer = RecordingConsumer()
    listener = _Rebalance(poller, consumer)
    listener.on_partitions_assigned({TP0, TP1})
    epoch = tracker.track(TP0, 5)
    for offset in (6, 7):
        tracker.track(TP0, offset)
    tracker.done(TP0, epoch, 5)  # 5 finished; 6 in a batch, 7 queued
    tracker.track(TP1, 2)
    listener.on_partitions_revoked({TP0, TP1})
    assert consumer.async_commits == [{TP0: 6}]
    listener.on_partitions_assigned({TP0})  # kept TP0; TP1 went to another member (it starts from the commit)
    assert consumer.seeks == [(TP0, 6)]
    listener.on_partitions_revoked({TP0})
    listener.on_partitions_lost({TP0})
    listener.on_partitions_assigned({TP0})  # after a loss the client starts from the committed offsets itself
    assert consumer.seeks == [(TP0, 6)]
