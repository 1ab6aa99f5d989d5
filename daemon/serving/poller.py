"""The poll thread: the only user of the KafkaConsumer (it is not thread-safe).

Each loop: commit what the pipeline finished, pause or resume the assigned partitions, poll, validate and
tokenize the records into the bounded inbox, and now and then publish consumer lag and look for stalled
partitions (daemon.serving.stalls). It keeps polling while a batch decodes (paused partitions return nothing),
so the group never sees a stalled member, however long a decode takes. Validation never raises: a record that
breaks it in an unforeseen way is rejected with reason code `invalid` like any other bad input.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from daemon.config import Settings
from daemon.serving.batching import Inbound, OffsetTracker
from daemon.serving.messages import InvalidMessage, parse_prompt, request_hash, tokenize
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.stages import SinkHealth
from daemon.serving.stalls import StallWatch

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
COMMIT_TIMEOUT_MS = 5_000
LAG_INTERVAL_S = 1.0


class Poller:
    def __init__(
        self,
        settings: Settings,
        consumer_factory,
        tracker: OffsetTracker,
        inbox: queue.Queue,
        health: SinkHealth,
        metrics: DaemonMetrics,
        tokenizer,
        max_prompt_tokens: int,
    ):
        self.settings = settings
        self.consumer_factory = consumer_factory
        self.tracker = tracker
        self.inbox = inbox
        self.health = health
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.stopping = threading.Event()  # take no more records; keep polling (membership) and committing
        self.exit = threading.Event()  # final commit, close the consumer
        self.assigned = threading.Event()  # set on the first assignment
        self.rebalances = 0
        self.stalls = StallWatch(settings.daemon.stall_after_s, metrics)

    def run(self) -> None:
        """Thread target; exceptions propagate to the caller's wrapper."""
        consumer = self.consumer_factory(self.settings.kafka)
        try:
            consumer.subscribe([self.settings.kafka.prompts_topic], listener=_Rebalance(self, consumer))
            next_lag = 0.0
            while not self.exit.is_set():
                self.commit_done(consumer)
                free = self._apply_backpressure(consumer)
                records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=max(1, free))
                for tp, batch in records.items():
                    for record in batch:
                        self._enqueue(tp, record)
                self.metrics.queue_depth.set(self.inbox.qsize())
                if time.monotonic() >= next_lag:
                    self._update_lag(consumer)
                    next_lag = time.monotonic() + LAG_INTERVAL_S
            self.commit_done(consumer)
        finally:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:
                log.warning("closing the consumer: %s", exc)

    def _apply_backpressure(self, consumer) -> int:
        """Pause every assigned partition while we must not take more; returns how many records fit the inbox."""
        depth = self.inbox.qsize()
        capacity = self.settings.batching.queue_size
        free = capacity - depth
        currently_paused = bool(consumer.paused())
        if self.stopping.is_set() or not self.health.healthy or free <= 0:
            should_pause = True
        elif currently_paused:
            should_pause = depth > capacity * self.settings.batching.resume_below  # hysteresis
        else:
            should_pause = False
        if should_pause:
            assignment = consumer.assignment()
            if assignment - consumer.paused():
                consumer.pause(*assignment)
                log.debug(
                    "paused %s (queue %d/%d%s)",
                    _names(assignment),
                    depth,
                    capacity,
                    "" if self.health.healthy else f", {self.health.describe()}",
                )
        elif currently_paused:
            consumer.resume(*consumer.paused())
            log.debug("resumed (queue %d/%d)", depth, capacity)
        self.metrics.paused.set(1 if should_pause else 0)
        return min(free, self.settings.kafka.max_poll_records)

    def _enqueue(self, tp: TopicPartition, record) -> None:
        if self.stopping.is_set():
            return  # neither tracked nor committed: redelivered to whoever consumes next
        epoch = self.tracker.track(tp, record.offset)
        if epoch is None:
            return  # partition revoked meanwhile
        item = Inbound(tp, record.offset, record.key, record.value, list(record.headers or []), epoch)
        self._validate(item)
        self.inbox.put(item)

    def _validate(self, item: Inbound) -> None:
        try:
            item.message = parse_prompt(item.value, self.settings.limits)
            item.request = tokenize(item.message, self.tokenizer, self.max_prompt_tokens)
            item.request_hash = request_hash(item.message)
        except InvalidMessage as exc:
            item.error = exc
            log.info("rejecting %s (id %s): %s", item.where, exc.request_id, exc.reason)
        except Exception as exc:  # a bug or a tokenizer limit must not take the poll thread (and the group) down
            request_id = item.message.id if item.message is not None else None
            item.error = InvalidMessage(
                "invalid", f"could not be validated: {type(exc).__name__}: {exc}"[:1000], request_id
            )
            log.exception("rejecting %s (id %s): validation failed unexpectedly", item.where, request_id)

    def commit_done(self, consumer) -> None:
        offsets = self.tracker.committable()
        if not offsets:
            return
        try:
            consumer.commit(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}, timeout_ms=COMMIT_TIMEOUT_MS
            )
            self.tracker.committed(offsets)
            log.debug("committed %s", {f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()})
        except KafkaError as exc:
            # Retried on the next loop; if the partition moved meanwhile, its new owner re-sends the stored
            # completions instead of decoding again.
            log.warning("offset commit failed (%s: %s); will retry", type(exc).__name__, exc)

    def _update_lag(self, consumer) -> None:
        """Consumer lag per partition, and with it (plus what is queued or in flight) the stall check."""
        for tp in consumer.assignment():
            unfetched = 0
            highwater = consumer.highwater(tp)  # not end_offsets(): wrong on some brokers, and a request each
            try:
                position = consumer.position(tp, timeout_ms=0) if highwater is not None else None
            except KafkaError:
                position = None
            if position is not None:
                unfetched = max(0, highwater - position)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(unfetched)
            committed, tracked, first = self.tracker.progress(tp)
            context = ", ".join(
                part
                for part in (
                    f"first unfinished offset {first}" if first is not None else "",
                    "" if self.health.healthy else self.health.describe(),
                )
                if part
            )
            self.stalls.observe(tp, committed, tracked + unfetched, context)


class _Rebalance(ConsumerRebalanceListener):
    """Called on the consumer's IO thread, where a blocking consumer call raises: nothing here waits."""

    def __init__(self, poller: Poller, consumer):
        self.poller = poller
        self.consumer = consumer
        self._unfinished: dict[TopicPartition, int] = {}  # revoked partition -> its first unfinished offset

    def on_partitions_revoked(self, revoked):
        # Send what is finished while we still own it, without waiting (if that commit is lost, the next owner
        # answers those records from storage); queued records of revoked partitions become stale.
        offsets = self.poller.tracker.committable()
        if offsets:
            try:
                self.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            except Exception as exc:
                log.warning("committing before the revocation failed (%s: %s)", type(exc).__name__, exc)
        for tp in revoked:  # kept until the next assignment (or a loss), which may keep some of them
            if (first := self.poller.tracker.progress(tp)[2]) is not None:
                self._unfinished[tp] = first
        self._forget(revoked, "revoked")

    def on_partitions_lost(self, lost):
        # No longer a member (the broker restarted, the session expired): a commit would be refused. The client
        # drops its positions with the partitions, so a later assignment starts from the committed offsets.
        self._unfinished = {}
        self._forget(lost, "lost")

    def _forget(self, tps, how: str) -> None:
        self.poller.tracker.revoke(tps)
        self.poller.stalls.forget(tps)
        if tps:
            log.info("partitions %s: %s", how, _names(tps))

    def on_partitions_assigned(self, assigned):
        # A partition we owned before the rebalance and own again keeps the client's fetch position (kafka-python
        # 3 keeps it under the eager protocol too), past the records just dropped as stale: fetch from the first
        # of them again, or they would never be served and the next commit would pass them.
        for tp in sorted(set(assigned) & set(self._unfinished)):
            offset = self._unfinished[tp]
            self.consumer.seek(tp, offset)
            log.info("partition %s/%d kept: fetching again from offset %d", tp.topic, tp.partition, offset)
        self._unfinished = {}
        self.poller.tracker.assign(assigned)
        self.poller.rebalances += 1
        self.poller.assigned.set()
        log.info("partitions assigned: %s", _names(assigned))


def _names(tps) -> str:
    return ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in tps)) or "none"
