"""The two worker stages, each on its own thread with one batch handed between them:

    decode stage   micro-batch from the inbox → admit (record requests, one transaction) → decode what has no
                   stored completion → hand over
    sink stage     store completions + feedback + dead letters (one transaction) → produce completions and DLQ
                   records and wait for the acks → mark the offsets done (the poll thread commits them)

So the accelerator decodes batch n+1 while batch n is being stored and published. A failing database or
producer is retried with backoff, and `SinkHealth` tells the poll thread to pause consumption meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from daemon.serving.batching import Inbound, OffsetTracker, collect_batch
from daemon.config import Settings
from daemon.serving.kafka_io import OutboundRecord, ProduceError, Publisher, completion_record, dlq_record
from daemon.serving.messages import InvalidMessage, completion_payload, encode_json
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.ledger import Admission, BatchStore, Decoded
from daemon.serving.request_log import log_answered

log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
HANDOFF_POLL_S = 0.2


class Abandoned(Exception):
    """The grace period ran out while work was still in flight; its offsets stay uncommitted."""


class SinkHealth:
    """Which sinks (database, kafka) are failing right now; the poll thread pauses while any is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}

    @property
    def healthy(self) -> bool:
        with self._lock:
            return not self._failing

    def describe(self) -> str:
        with self._lock:
            return "; ".join(f"{sink} unavailable: {why}" for sink, why in sorted(self._failing.items()))

    def failing(self, sink: str, why: str) -> bool:
        """Mark sink as failing; True if it was fine until now."""
        with self._lock:
            new = sink not in self._failing
            self._failing[sink] = why
            return new

    def recovered(self, sink: str) -> bool:
        with self._lock:
            return self._failing.pop(sink, None) is not None


@dataclass
class Totals:
    """Raw counts for the summary line and STATUS."""

    decoded: int = 0
    resent: int = 0
    dead_lettered: int = 0
    tokens: int = 0
    target_forwards: int = 0
    batches: int = 0
    decode_seconds: float = 0.0
    database_retries: int = 0
    produce_retries: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Prepared:
    """A batch after admission and decoding, on its way to the sink stage."""

    batch: list[Inbound]
    admission: Admission
    decoded: list[Decoded]
    dead: list[tuple[Inbound, InvalidMessage]]  # rejected by validation or the engine: recorded and dead-lettered


class Pipeline:
    def __init__(self, settings: Settings, engine, store: BatchStore, publisher: Publisher, tracker: OffsetTracker,
                 inbox: queue.Queue, health: SinkHealth, metrics: DaemonMetrics, notifier, follower=None):  # fmt: skip
        self.settings = settings
        self.engine = engine
        self.store = store
        self.publisher = publisher
        self.tracker = tracker
        self.inbox = inbox
        self.health = health
        self.metrics = metrics
        self.notifier = notifier
        self.totals = Totals()
        self.handoff: queue.Queue[Prepared] = queue.Queue(maxsize=1)
        self.stopping = threading.Event()  # finish the batch in hand, take no more
        self.hard_stop = threading.Event()  # abandon retries and hand-offs now
        self.decode_finished = threading.Event()
        self.sink_finished = threading.Event()
        self.beats = {"decode": time.monotonic(), "sink": time.monotonic()}  # last sign of life per stage
        self.follower = follower  # daemon.learning.draft_follower.DraftFollower: the deployment's active draft version
        self._swap_lock = threading.Lock()
        self._pending_swap = None

    def request_draft_swap(self, weights, version: str) -> None:
        with self._swap_lock:
            self._pending_swap = (weights, version)

    # ------------------------------------------------------------------ decode stage

    def run_decode(self) -> None:
        batching = self.settings.batching
        try:
            while not self.stopping.is_set():
                self.beats["decode"] = time.monotonic()
                batch = collect_batch(self.inbox, self.settings.engine.max_batch_size, batching.max_wait_ms / 1000)
                batch = [item for item in batch if self.tracker.is_current(item.tp, item.epoch)]
                self._follow_active_draft()
                self._apply_pending_swap()  # between batches: the collected batch decodes with the new draft
                if batch:
                    self._hand_over(self._prepare(batch))
        except Abandoned:
            pass
        finally:
            self.decode_finished.set()

    def _follow_active_draft(self) -> None:
        """A promotion or rollback anywhere in the deployment reaches this worker at its next batch boundary."""
        if self.follower is None:
            return
        swap = self.follower.poll(self.engine.draft_version)
        if swap is not None:
            self.request_draft_swap(*swap)

    def _apply_pending_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is not None:
            weights, version = pending
            self.engine.swap_draft(weights, version)
            log.info("draft swapped to version %s", version)

    def _prepare(self, batch: list[Inbound]) -> Prepared:
        self.metrics.batch_size.observe(len(batch))
        dead = [(item, item.error) for item in batch if item.error is not None]
        valid = [item for item in batch if item.error is None]
        admission = self._retry("decode", "record requests", "database", DATABASE_UNAVAILABLE,
                                lambda: self.store.admit(valid))  # fmt: skip
        decoded, failed = self._decode(admission.decode)
        return Prepared(batch, admission, decoded, dead + failed)

    def _decode(self, items: list[Inbound]) -> tuple[list[Decoded], list[tuple[Inbound, InvalidMessage]]]:
        """Decode a batch; if the engine fails on it, decode one by one and dead-letter the requests that fail."""
        if not items:
            return [], []
        started = time.monotonic()
        try:
            results = self.engine.generate([item.request for item in items])
        except Exception as exc:
            if len(items) == 1:
                log.exception("engine failed on %s (id %s)", items[0].where, items[0].request.id)
                reason = f"engine error: {type(exc).__name__}: {exc}"
                return [], [(items[0], InvalidMessage("engine_error", reason, items[0].request.id))]
            log.warning("engine failed on a batch of %d (%s); decoding one by one", len(items), exc)
            decoded, failed = [], []
            for item in items:
                ok, bad = self._decode([item])
                decoded += ok
                failed += bad
            return decoded, failed
        seconds = time.monotonic() - started
        self.metrics.decode_seconds.observe(seconds)
        self.metrics.record_results(results)
        self.metrics.record_choice(self.engine)
        self.metrics.decode_tps.set(sum(r.counters.emitted for r in results) / seconds if seconds > 0 else 0.0)
        self.totals.decode_seconds += seconds
        decoded = []
        for item, result in zip(items, results):
            payload = completion_payload(result, len(item.request.input_ids), item.message.metadata,
                                         started - item.queued_at)  # fmt: skip
            decoded.append(Decoded(item, result, encode_json(payload), payload["timings"]))
        return decoded, []

    def _hand_over(self, prepared: Prepared) -> None:
        while True:
            try:
                self.handoff.put(prepared, timeout=HANDOFF_POLL_S)
                return
            except queue.Full:
                if self.hard_stop.is_set():
                    raise Abandoned() from None
                self.beats["decode"] = time.monotonic()

    # ------------------------------------------------------------------ sink stage

    def run_sink(self) -> None:
        try:
            while True:
                self.beats["sink"] = time.monotonic()
                try:
                    prepared = self.handoff.get(timeout=HANDOFF_POLL_S)
                except queue.Empty:
                    if self.decode_finished.is_set() and self.handoff.empty():
                        return
                    continue
                self._finish(prepared)
        except Abandoned:
            pass
        finally:
            self.sink_finished.set()

    def _finish(self, prepared: Prepared) -> None:
        admission, decoded = prepared.admission, prepared.decoded
        store_started = time.monotonic()
        messages = self._retry("sink", "store results", "database", DATABASE_UNAVAILABLE,
                               lambda: self.store.save(decoded, prepared.dead))  # fmt: skip
        self.metrics.store_seconds.observe(time.monotonic() - store_started)

        rejected = prepared.dead + admission.rejected
        outbound = self._outbound(decoded, messages, admission.resend, rejected)
        produce_started = time.monotonic()
        self._retry("sink", "produce", "kafka", (ProduceError,), lambda: self.publisher.send_all(outbound))
        self.metrics.produce_seconds.observe(time.monotonic() - produce_started)

        for item in prepared.batch:
            self.tracker.done(item.tp, item.epoch, item.offset)
        log_answered(decoded, admission.resend)
        self._count(decoded, admission.resend, rejected)
        tokens = sum(d.result.counters.emitted for d in decoded)
        elapsed = time.monotonic() - min(item.queued_at for item in prepared.batch)
        if tokens and elapsed > 0:
            self.metrics.e2e_tps.set(tokens / elapsed)
        log.debug("batch of %d: %d decoded, %d resent, %d rejected; store %.3f s, produce %.3f s",
                  len(prepared.batch), len(decoded), len(admission.resend), len(rejected),
                  produce_started - store_started, time.monotonic() - produce_started)  # fmt: skip

    def _outbound(self, decoded, messages, resend, rejected) -> list[OutboundRecord]:
        """Completions as stored (another worker's message if it stored first), re-sends, dead letters."""
        kafka = self.settings.kafka
        records = [
            completion_record(kafka.completions_topic, d.item.key, d.item.request.id,
                              messages.get(d.item.request.id, d.message_json).encode(), False)  # fmt: skip
            for d in decoded
        ]
        records += [completion_record(kafka.completions_topic, item.key, item.message.id, message.encode(), True)
                    for item, message in resend]  # fmt: skip
        records += [
            dlq_record(kafka.dlq_topic, item.tp.topic, item.tp.partition, item.offset, item.key, item.value,
                       error.code, error.reason, error.request_id)  # fmt: skip
            for item, error in rejected
        ]
        return records

    def _count(self, decoded, resend, rejected) -> None:
        t = self.totals
        t.batches += 1
        t.decoded += len(decoded)
        t.resent += len(resend)
        t.dead_lettered += len(rejected)
        for d in decoded:
            t.tokens += d.result.counters.emitted
            t.target_forwards += d.result.counters.target_forwards
        for _, error in rejected:
            t.by_reason[error.code] = t.by_reason.get(error.code, 0) + 1
            self.metrics.dlq.labels(error.code).inc()
        self.metrics.requests.labels("completed").inc(len(decoded))
        self.metrics.requests.labels("resent").inc(len(resend))
        self.metrics.requests.labels("dead_lettered").inc(len(rejected))

    # ------------------------------------------------------------------ retries

    def _retry(self, stage: str, what: str, sink: str, transient: tuple, operation):
        """Run operation until it succeeds; while it fails, consumption is paused and we back off."""
        delay = self.settings.daemon.retry_initial_s
        failures = 0
        while True:
            try:
                result = operation()
            except transient as exc:
                self.beats[stage] = time.monotonic()
                failures += 1
                if sink == "database":
                    self.totals.database_retries += 1
                    self.metrics.database_up.set(0)
                else:
                    self.totals.produce_retries += 1
                    self.metrics.producer_recreated.inc()
                if self.health.failing(sink, _short(exc)):
                    log.warning("%s unavailable during %s (%s); pausing consumption and retrying",
                                sink, what, _short(exc))  # fmt: skip
                    self.notifier.status(f"{sink} unavailable, retrying: {_short(exc)}")
                else:
                    log.info("%s still unavailable (%s), retry %d in %.1f s", sink, _short(exc), failures, delay)
                if self.hard_stop.wait(delay):
                    raise Abandoned() from exc
                delay = min(delay * 2, self.settings.daemon.retry_max_s)
                continue
            if failures and self.health.recovered(sink):
                log.info("%s available again after %d retries; resuming consumption", sink, failures)
                if sink == "database":
                    self.metrics.database_up.set(1)
            return result


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"
