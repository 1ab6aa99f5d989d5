"""The two worker stages, each on its own thread, with finished work handed from the first to the second:

    decode stage   records from the inbox into free engine slots → admit (record requests, one transaction) →
                   submit what has no stored completion → one engine step (a round, newcomers' prefill) at a time
                   → hand over each request as soon as it finishes (continuous batching: pipelines.engine); records
                   answered at admission (resent, dead-lettered) are handed over at once
    sink stage     store completions + feedback + dead letters of everything handed over since it last stored (one
                   transaction) → produce completions and DLQ records and wait for the acks → mark the offsets done
                   (the poll thread commits them)

So the accelerator keeps decoding while finished requests are being stored and published. An unavailable database is
retried with backoff, and `SinkHealth` tells the poll thread to pause consumption meanwhile. Produce failures
are sorted per record (daemon.serving.kafka_io.classify): transient ones are retried the same way, only the
records not yet acknowledged; a permanent one is never retried: a completion that cannot be produced is
dead-lettered (recorded first), a dead letter that cannot be produced stays recorded in the database, and both
are counted (onlinespec_undeliverable_records_total) and logged with topic, partition, offset and request id.
Either way the offset moves on: no record can hold its partition.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import DataError, DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from daemon.config import Settings
from daemon.serving.batching import Inbound, OffsetTracker, collect_batch
from daemon.serving.kafka_io import (
    PERMANENT,
    UNCLASSIFIED,
    UNCLASSIFIED_ATTEMPTS,
    OutboundRecord,
    Publisher,
    completion_record,
    dlq_record,
)
from daemon.serving.ledger import Admission, BatchStore, Decoded, Saved
from daemon.serving.messages import InvalidMessage, completion_payload, encode_json
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.request_log import log_answered

log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# The database refused what a record holds: no retry helps, the record is dead-lettered (storage_error) alone.
RECORD_REFUSED = (DataError, IntegrityError)
HANDOFF_POLL_S = 0.2
SINK_GROUP = 64  # hand-overs the sink stores in one transaction at most
COMPLETION, DEAD_LETTER = "completion", "dead_letter"


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
    undeliverable: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Outgoing:
    """One record to produce, with the prompt record it answers (for logs and for dead-lettering it)."""

    record: OutboundRecord
    item: Inbound
    role: str  # COMPLETION | DEAD_LETTER
    request_id: str | None
    unclassified_failures: int = 0

    @property
    def context(self) -> str:
        return f"{self.role} of {self.item.where} (id {self.request_id}) to {self.record.topic}"


@dataclass
class Prepared:
    """Records on their way to the sink stage: answered at admission, or decoded (with the copies that waited for
    them). `batch` holds every record whose offset becomes committable once this is stored and produced."""

    batch: list[Inbound]
    admission: Admission
    decoded: list[Decoded]
    dead: list[tuple[Inbound, InvalidMessage]]  # rejected by validation or the engine: recorded and dead-lettered

    def merge(self, other: Prepared) -> None:
        self.batch += other.batch
        self.admission.extend(other.admission)
        self.decoded += other.decoded
        self.dead += other.dead


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine,
        store: BatchStore,
        publisher: Publisher,
        tracker: OffsetTracker,
        inbox: queue.Queue,
        health: SinkHealth,
        metrics: DaemonMetrics,
        notifier,
        follower=None,
    ):
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
        self.handoff: queue.Queue[Prepared] = queue.Queue(maxsize=2 * settings.engine.max_batch_size + 8)
        self.stopping = threading.Event()  # finish the requests the engine holds, take no more
        self.hard_stop = threading.Event()  # abandon retries and hand-offs now
        self.decode_finished = threading.Event()
        self.sink_finished = threading.Event()
        self.beats = {"decode": time.monotonic(), "sink": time.monotonic()}  # last sign of life per stage
        self.follower = follower  # daemon.learning.draft_follower.DraftFollower: the deployment's active draft version
        self._swap_lock = threading.Lock()
        self._pending_swap = None
        self._in_flight: set[str] = set()  # ids admitted for decoding whose batch is not stored yet
        self._in_flight_lock = threading.Lock()
        # Per id submitted to the engine and not finished: the copies of it answered when it finishes (decode thread)
        self._waiters: dict[str, list[Inbound]] = {}
        self._tps_window = (time.monotonic(), 0)  # (since, tokens) for the decode tokens/s gauge

    def request_draft_swap(self, weights, version: str) -> None:
        with self._swap_lock:
            self._pending_swap = (weights, version)

    # ------------------------------------------------------------------ decode stage

    def run_decode(self) -> None:
        """Until stopped: take records into free slots, run one engine step, hand over what finished. Once stopping,
        take no more and finish what the engine holds (within the worker's grace period)."""
        try:
            while not (self.stopping.is_set() and not self.engine.busy):
                if self.hard_stop.is_set():
                    raise Abandoned()
                self.beats["decode"] = time.monotonic()
                if not self.stopping.is_set():
                    self._take_in()
                self._follow_active_draft()
                self._apply_pending_swap()  # between rounds: rows in flight go on with the new draft
                if self.engine.busy:
                    self._step()
        except Abandoned:
            pass
        finally:
            self.decode_finished.set()

    def _take_in(self) -> None:
        """Records from the inbox, as many as the engine has free slots for: admitted (one transaction), then
        submitted to the engine, held for a copy in flight, or handed over answered (resent, dead-lettered).
        While the engine is idle this waits up to HANDOFF_POLL_S for a record; with static batching it also
        gathers a micro-batch for up to batching.max_wait_ms, as engines without continuous batching do."""
        room = self.engine.free_slots
        idle = not self.engine.busy
        static = self.settings.engine.scheduling == "static"
        if room <= 0 or (static and not idle):  # a static batch forms only while the engine is idle
            return
        gather = idle and static
        batch = collect_batch(
            self.inbox,
            room,
            self.settings.batching.max_wait_ms / 1000 if gather else 0.0,
            first_timeout_s=HANDOFF_POLL_S if idle else 0.0,
            counts=_to_decode,
            max_records=self.settings.batching.queue_size,
        )
        batch = [item for item in batch if self.tracker.is_current(item.tp, item.epoch)]
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        admission = self._claim(self._admit_valid(batch))
        answered = Admission(resend=admission.resend, rejected=admission.rejected)
        held = set()
        now = time.monotonic()
        for item in admission.decode:  # first: a copy later in this batch waits for it
            item.submitted_at = now
            self.engine.submit(item.request, tag=item)
            self._waiters.setdefault(item.request.id, [])
            held.add(id(item))
        for item in admission.wait:
            if item.request.id in self._waiters:
                self._waiters[item.request.id].append(item)
                held.add(id(item))
            else:  # its first copy was handed over already: the sink stores it first
                answered.wait.append(item)
        rest = [item for item in batch if id(item) not in held]
        if rest:
            dead = [(item, item.error) for item in rest if item.error is not None]
            self._hand_over(Prepared(rest, answered, [], dead))

    def _step(self) -> None:
        started = time.monotonic()
        try:
            finished = self.engine.step()
        except Exception as exc:
            self._recover_from_engine_error(exc)
            return
        self.totals.decode_seconds += time.monotonic() - started
        decoding, slots = self.engine.occupancy()
        self.metrics.slot_occupancy.set(decoding / slots)
        if not self.engine.busy:  # idle: the phase seconds are exported now, not at the next 1 s window
            self._record_engine_phases()
        if finished:
            self._hand_over(self._finished([item for item, _ in finished], [result for _, result in finished]))

    def _finished(self, items: list[Inbound], results) -> Prepared:
        """Finished requests, with the copies that waited for them, on their way to the sink."""
        decoded = self._completions(items, results, [item.submitted_at - item.queued_at for item in items])
        waiters = []
        for item in items:
            waiters += self._waiters.pop(item.request.id, [])
        return Prepared(items + waiters, Admission(decode=list(items), wait=waiters), decoded, [])

    def _recover_from_engine_error(self, exc: BaseException) -> None:
        """The engine failed with requests in flight: drop them all from it, then decode each alone, so only a
        request that fails by itself is dead-lettered (engine_error) and the others are answered."""
        items = self.engine.abort()
        log.warning("engine failed with %d requests in flight (%s); decoding them one by one", len(items), exc)
        for item in items:
            decoded, failed = self._decode([item])
            waiters = self._waiters.pop(item.request.id, [])
            self._hand_over(Prepared([item, *waiters], Admission(decode=[item], wait=waiters), decoded, failed))

    def _completions(self, items: list[Inbound], results, before_engine_s: list[float]) -> list[Decoded]:
        """Finished requests counted (results, the engine's variant, tokens/s, latencies) and encoded as their
        completions; `before_engine_s`: each one's wait from its arrival until it was handed to the engine."""
        self.metrics.record_results(results)
        self.metrics.record_choice(self.engine)
        self._gauge_decode_rate(results)
        decoded = []
        for item, result, waited in zip(items, results, before_engine_s):
            payload = completion_payload(result, len(item.request.input_ids), item.message.metadata, waited)
            self.metrics.record_latencies(payload["timings"], len(result.token_ids))
            decoded.append(Decoded(item, result, encode_json(payload), payload["timings"]))
        return decoded

    def _gauge_decode_rate(self, results) -> None:
        """Tokens/s of finished requests over the last second or more (a gauge for dashboards). The engine's phase
        seconds are exported at the same rhythm (and when it goes idle, _step), not after every engine step."""
        since, tokens = self._tps_window
        tokens += sum(r.counters.emitted for r in results)
        now = time.monotonic()
        if now - since >= 1.0:
            self.metrics.decode_tps.set(tokens / (now - since))
            self._record_engine_phases()
            since, tokens = now, 0
        self._tps_window = (since, tokens)

    def _record_engine_phases(self) -> None:
        self.metrics.record_engine_phases(self.engine.clock.totals())

    def _follow_active_draft(self) -> None:
        """A promotion or rollback anywhere in the deployment reaches this worker at its next round boundary. The
        follower's thread reads, verifies and prepares the weights; here they are only taken (a running follower)
        or, without one, polled for."""
        if self.follower is None:
            return
        swap = self.follower.take_ready() if self.follower.running else self.follower.poll(self.engine.draft_version)
        if swap is not None:
            self.request_draft_swap(*swap)

    def _apply_pending_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is not None:
            weights, version = pending
            started = time.monotonic()
            self.engine.swap_draft(weights, version)
            seconds = time.monotonic() - started
            self.metrics.draft_swap_seconds.observe(seconds)
            log.info("draft swapped to version %s (%.3f s on the decode thread)", version, seconds)

    def _prepare(self, batch: list[Inbound]) -> Prepared:
        """Synchronous: admit a batch, topped up from the inbox while admission left room in the engine's batch
        (records answered from storage or dead-lettered at admission need none), decode it whole, hand it back. The
        serving loop takes records in and steps the engine instead (_take_in, _step); tests use this to drive the
        sink stage, which is the same either way, one step at a time."""
        batching = self.settings.batching
        admission = self._claim(self._admit_valid(batch))
        size = self.settings.engine.max_batch_size
        while len(admission.decode) < size and not self.stopping.is_set():
            more = collect_batch(
                self.inbox,
                size - len(admission.decode),
                0.0,
                first_timeout_s=0.0,
                counts=_to_decode,
                max_records=max(1, batching.queue_size - len(batch)),
            )
            more = [item for item in more if self.tracker.is_current(item.tp, item.epoch)]
            if not more:
                break
            batch = batch + more
            admission.extend(self._claim(self._admit_valid(more)))
        self.metrics.batch_size.observe(len(batch))
        decoded, failed = self._decode(admission.decode)
        dead = [(item, item.error) for item in batch if item.error is not None]
        return Prepared(batch, admission, decoded, dead + failed)

    def _admit_valid(self, batch: list[Inbound]) -> Admission:
        with self._in_flight_lock:
            in_flight = set(self._in_flight)
        return self._admit([item for item in batch if item.error is None], in_flight)

    def _claim(self, admission: Admission) -> Admission:
        """The ids admitted for decoding are in flight here until their batch is stored."""
        with self._in_flight_lock:
            self._in_flight.update(item.request.id for item in admission.decode)
        return admission

    def _admit(self, items: list[Inbound], in_flight: set[str]) -> Admission:
        """Admit a batch; if the database refuses a record in it, admit one by one and dead-letter that one."""
        try:
            return self._with_database("decode", "record requests", lambda: self.store.admit(items, in_flight))
        except RECORD_REFUSED as exc:
            if len(items) == 1:
                return Admission(rejected=[self._refused(items[0], "record the request", exc)])
        admission = Admission()
        for item in items:
            decoding = {i.request.id for i in admission.decode}  # a copy later in the batch waits for the first
            admission.extend(self._admit([item], in_flight | decoding))
        return admission

    @staticmethod
    def _refused(item: Inbound, what: str, exc: BaseException) -> tuple[Inbound, InvalidMessage]:
        """The dead letter of a record the database refused: without its id, which may be what was refused."""
        request_id = item.request.id if item.request is not None else None
        log.error("the database refused to %s for %s (id %r): %s", what, item.where, request_id, _short(exc))
        return item, InvalidMessage("storage_error", f"the database refused to {what}: {_short(exc)}")

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
        self.totals.decode_seconds += seconds
        return self._completions(items, results, [started - item.queued_at for item in items]), []

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
                for _ in range(SINK_GROUP - 1):  # what else finished meanwhile goes into the same transaction
                    try:
                        prepared.merge(self.handoff.get_nowait())
                    except queue.Empty:
                        break
                self._finish(prepared)
        except Abandoned:
            pass
        finally:
            self.sink_finished.set()

    def _finish(self, prepared: Prepared) -> None:
        admission, decoded = prepared.admission, prepared.decoded
        rejected = prepared.dead + admission.rejected
        store_started = time.monotonic()
        saved = self._save(decoded, rejected, admission.wait)
        self.metrics.store_seconds.observe(time.monotonic() - store_started)
        with self._in_flight_lock:  # stored: a copy admitted from now on finds the completion
            self._in_flight.difference_update(item.request.id for item in admission.decode)

        decoded = [d for d in decoded if (d.item.tp, d.item.offset) not in saved.refused]  # dead-lettered instead
        rejected = rejected + saved.dead
        resend = admission.resend + saved.answered
        produce_started = time.monotonic()
        rejected += self._deliver(self._outgoing(decoded, saved, resend, rejected))  # + completions undeliverable
        self.metrics.produce_seconds.observe(time.monotonic() - produce_started)

        # Only now, after the database commit and every ack (or a permanent failure, recorded): committable.
        for item in prepared.batch:
            self.tracker.done(item.tp, item.epoch, item.offset)
        log_answered(decoded, resend)
        self._count(decoded, resend, rejected)
        acked = time.monotonic()
        for d in decoded:
            self.metrics.e2e_seconds.observe(acked - d.item.queued_at)
        log.debug(
            "batch of %d: %d decoded, %d resent, %d rejected; store %.3f s, produce %.3f s",
            len(prepared.batch),
            len(decoded),
            len(resend),
            len(rejected),
            produce_started - store_started,
            time.monotonic() - produce_started,
        )

    def _save(self, decoded: list[Decoded], dead: list, waiting: list[Inbound]) -> Saved:
        """Save a batch; if the database refuses a record in it, save one by one (see _save_one_by_one)."""
        try:
            return self._with_database("sink", "store results", lambda: self.store.save(decoded, dead, waiting))
        except RECORD_REFUSED as exc:
            log.warning(
                "the database refused a batch of %d (%s); storing its records one by one",
                len(decoded) + len(dead) + len(waiting),
                _short(exc),
            )
            return self._save_one_by_one(decoded, dead, waiting)

    def _save_one_by_one(self, decoded: list[Decoded], dead: list, waiting: list[Inbound]) -> Saved:
        """A decoded or waiting record the database refuses is dead-lettered (storage_error; those dead letters
        are saved last, and if even they are refused the database is broken for every record and the sink
        fails). A refused dead letter still goes to the DLQ topic, with its own reason."""
        saved, refused = Saved(), []
        units = [(d.item, ([d], [], [])) for d in decoded] + [(w, ([], [], [w])) for w in waiting]
        units += [(x[0], ([], [x], [])) for x in dead]
        for item, unit in units:
            try:
                part = self._with_database("sink", "store results", lambda unit=unit: self.store.save(*unit))
            except RECORD_REFUSED as exc:
                if unit[1]:
                    log.error("the database refused the dead letter of %s: %s", item.where, _short(exc))
                else:
                    refused.append(self._refused(item, "store the result", exc))
                continue
            saved.messages.update(part.messages)
            saved.answered += part.answered
            saved.dead += part.dead
        if refused:
            self._with_database("sink", "record dead letters", lambda: self.store.record_dead_letters(refused))
            saved.dead += refused
            saved.refused = {(item.tp, item.offset) for item, _ in refused}
        return saved

    def _outgoing(self, decoded: list[Decoded], saved: Saved, resend, rejected) -> list[Outgoing]:
        """Completions as stored (another worker's message if it stored first), re-sends, dead letters."""
        topic = self.settings.kafka.completions_topic
        records = []
        for d in decoded:
            request_id = d.item.request.id
            message = saved.messages.get(request_id, d.message_json).encode()
            records.append(
                Outgoing(
                    completion_record(topic, d.item.key, request_id, message, False), d.item, COMPLETION, request_id
                )
            )
        for item, message in resend:
            records.append(
                Outgoing(
                    completion_record(topic, item.key, item.request.id, message.encode(), True),
                    item,
                    COMPLETION,
                    item.request.id,
                )
            )
        records += [self._dead_letter(item, error) for item, error in rejected]
        return records

    def _dead_letter(self, item: Inbound, error: InvalidMessage) -> Outgoing:
        kafka = self.settings.kafka
        record = dlq_record(
            kafka.dlq_topic,
            item.tp.topic,
            item.tp.partition,
            item.offset,
            item.key,
            item.value,
            error.code,
            error.reason,
            error.request_id,
            kafka.max_request_size,
        )
        return Outgoing(record, item, DEAD_LETTER, error.request_id)

    def _deliver(self, outgoing: list[Outgoing]) -> list[tuple[Inbound, InvalidMessage]]:
        """Produce until every record is acknowledged or failed for good; only transient failures are retried.
        Returns the dead letters of the completions that failed for good (produced here too)."""
        backoff = _Backoff(self, "sink", "produce", "kafka")
        pending, undeliverable = outgoing, []
        while pending:
            recreations = self.publisher.recreations
            delivery = self.publisher.send_all([o.record for o in pending])
            self.metrics.producer_recreated.inc(self.publisher.recreations - recreations)
            retry, permanent = [], []
            for failure in delivery.failures:
                item = pending[failure.index]
                if failure.kind == UNCLASSIFIED:
                    item.unclassified_failures += 1
                if failure.kind == PERMANENT or item.unclassified_failures >= UNCLASSIFIED_ATTEMPTS:
                    permanent.append((item, failure.error))
                else:
                    retry.append((item, failure.error))
            letters = self._undeliverable(permanent)
            undeliverable += letters
            if retry:
                backoff.failed(retry[0][1])
            pending = [item for item, _ in retry] + [self._dead_letter(item, error) for item, error in letters]
        backoff.succeeded()
        return undeliverable

    def _undeliverable(self, failed: list[tuple[Outgoing, BaseException]]) -> list[tuple[Inbound, InvalidMessage]]:
        """Records no retry can deliver: count and log each; dead-letter the requests whose completion it was
        (recorded before their dead letter is produced); returns those dead letters."""
        letters = []
        for outgoing, error in failed:
            self.totals.undeliverable += 1
            self.metrics.undeliverable.labels(outgoing.role, type(error).__name__).inc()
            if outgoing.role == DEAD_LETTER:
                log.error(
                    "%s failed for good (%s); it stays recorded in the database only", outgoing.context, _short(error)
                )
                continue
            log.error("%s failed for good (%s); dead-lettering the request", outgoing.context, _short(error))
            reason = f"the completion could not be produced to {outgoing.record.topic}: {_short(error)}"
            letters.append((outgoing.item, InvalidMessage("undeliverable", reason, outgoing.request_id)))
        if letters:
            self._with_database("sink", "record dead letters", lambda: self.store.record_dead_letters(letters))
        return letters

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

    def _with_database(self, stage: str, what: str, operation):
        """Run operation until it succeeds; while the database is unavailable, consumption is paused."""
        backoff = _Backoff(self, stage, what, "database")
        while True:
            try:
                result = operation()
            except DATABASE_UNAVAILABLE as exc:
                backoff.failed(exc)
                continue
            backoff.succeeded()
            return result


class _Backoff:
    """The retry rhythm of one operation against one sink: pause consumption, back off doubling, log once per
    outage (and each retry at INFO), resume when it works again. Raises Abandoned on a hard stop."""

    def __init__(self, pipeline: Pipeline, stage: str, what: str, sink: str):
        self.pipeline = pipeline
        self.stage, self.what, self.sink = stage, what, sink
        self.delay = pipeline.settings.daemon.retry_initial_s
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        p = self.pipeline
        p.beats[self.stage] = time.monotonic()
        self.failures += 1
        if self.sink == "database":
            p.totals.database_retries += 1
            p.metrics.database_up.set(0)
        else:
            p.totals.produce_retries += 1
        if p.health.failing(self.sink, _short(exc)):
            log.warning(
                "%s unavailable during %s (%s); pausing consumption and retrying", self.sink, self.what, _short(exc)
            )
            p.notifier.status(f"{self.sink} unavailable, retrying: {_short(exc)}")
        else:
            log.info("%s still unavailable (%s), retry %d in %.1f s", self.sink, _short(exc), self.failures, self.delay)
        if p.hard_stop.wait(self.delay):
            raise Abandoned() from exc
        self.delay = min(self.delay * 2, p.settings.daemon.retry_max_s)

    def succeeded(self) -> None:
        if self.failures and self.pipeline.health.recovered(self.sink):
            log.info("%s available again after %d retries; resuming consumption", self.sink, self.failures)
            if self.sink == "database":
                self.pipeline.metrics.database_up.set(1)


def _to_decode(item: Inbound) -> bool:
    return item.error is None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    text = text[len(name) + 1 :].strip() if text.startswith(f"{name}:") else text  # kafka errors name themselves
    return f"{name}: {text[:200]}"
