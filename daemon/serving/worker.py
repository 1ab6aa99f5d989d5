"""The daemon's Worker: owns the threads and the lifecycle (`run()`, `stop()`, `handle_signal()`, `close()`).

    poll thread     daemon.serving.poller     consumer: validate → bounded inbox; pause/resume; commit done offsets
    decode thread   daemon.serving.stages     inbox → admit → free engine slots; one engine step at a time; each
                                              finished request handed over
    sink thread     daemon.serving.stages     store (one transaction) → produce + acks → offsets done
    main thread     here                      systemd READY / WATCHDOG / STATUS / STOPPING, signals, grace, summary
    scheduler       daemon.learning.scheduler learning rounds and the live guard (APScheduler's threads), when
                                              configured

Between engine steps (round boundaries) the decode thread follows the deployment's active draft
(daemon.learning.draft_follower).

On SIGTERM/SIGINT: stop taking records (partitions paused, polling continues so the group keeps us) and stop
scheduling learning rounds, finish the requests the engine holds and store what was handed over, commit, wait for
a running round to stop, close, log one summary line, exit 0. Records still queued are left uncommitted and are
redelivered to the next consumer. After the grace period, whatever is still in flight is abandoned the same way
(an abandoned round is closed as failed by the next one).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time

from daemon.config import Settings
from daemon.serving.batching import Inbound, OffsetTracker
from daemon.serving.kafka_io import Publisher, make_consumer, make_producer
from daemon.serving.ledger import BatchStore
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.poller import Poller
from daemon.serving.stages import Pipeline, SinkHealth
from daemon.serving.systemd import SystemdNotifier

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 15.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine,
        tokenizer,
        store: BatchStore,
        *,
        metrics: DaemonMetrics | None = None,
        notifier: SystemdNotifier | None = None,
        consumer_factory=make_consumer,
        producer_factory=make_producer,
        follower=None,
        learning=None,
    ):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or DaemonMetrics()
        self.notifier = notifier or SystemdNotifier()
        self.publisher = Publisher(settings.kafka, producer_factory)
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=settings.batching.queue_size)
        self.tracker = OffsetTracker()
        self.health = SinkHealth()
        self.poller = Poller(
            settings,
            consumer_factory,
            self.tracker,
            self.inbox,
            self.health,
            self.metrics,
            tokenizer,
            engine.max_prompt_tokens,
        )
        self.pipeline = Pipeline(
            settings,
            engine,
            store,
            self.publisher,
            self.tracker,
            self.inbox,
            self.health,
            self.metrics,
            self.notifier,
            follower,
        )
        self.learning = learning  # daemon.learning.scheduler.LearningScheduler or None
        self.assigned = self.poller.assigned  # set once partitions were assigned
        self._stopping = threading.Event()
        self._stop_requested = False  # set by signal handlers: a plain flag is safe there
        self._stop_reason = "running"
        self._fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._started_at = time.monotonic()
        self._abandoned = 0
        self._abandon_reason = "stop requested"  # what set hard_stop before the grace period ran out
        self._closed = False

    @property
    def totals(self):
        return self.pipeline.totals

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until stop() or a signal; returns the process exit code (0 after a clean drain)."""
        self._started_at = time.monotonic()
        self.metrics.serve(self.settings.daemon.metrics_host, self.settings.daemon.metrics_port)
        self._threads = [
            threading.Thread(target=self._guard, args=(self.poller.run,), name="poll", daemon=True),
            threading.Thread(target=self._guard, args=(self.pipeline.run_decode,), name="decode", daemon=True),
            threading.Thread(target=self._guard, args=(self.pipeline.run_sink,), name="sink", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if self.learning is not None:
            self.learning.start()
        if self.pipeline.follower is not None:
            self.pipeline.follower.start(self.engine.draft_version)  # weights prepared off the decode thread
        kafka = self.settings.kafka
        self.notifier.ready(f"consuming {kafka.prompts_topic}")
        log.info(
            "serving %s -> %s (group %s, draft %s)",
            kafka.prompts_topic,
            kafka.completions_topic,
            kafka.group_id,
            self.engine.draft_version,
        )
        self._supervise_until_stop()
        self._drain()
        self.close()
        self._log_summary()
        return 1 if self._fatal is not None else 0

    def stop(self, reason: str = "stop requested") -> None:
        """Stop taking records and finish what is in hand (thread-safe)."""
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._stopping.set()

    def handle_signal(self, signum, _frame=None) -> None:
        """SIGTERM/SIGINT: the first one drains, a second one abandons in-flight work at once. Only flags are set
        here; the main thread logs what it does about them."""
        if self._stop_requested:
            self._abandon_reason = f"second {signal.Signals(signum).name}"
            self.pipeline.hard_stop.set()
        self._stop_requested = True
        self._stop_reason = signal.Signals(signum).name

    def serving_counters(self) -> tuple[int, float]:
        """Tokens decoded and seconds spent decoding so far: learning rounds compare tokens/s during and between."""
        return self.totals.tokens, self.totals.decode_seconds

    def request_draft_swap(self, weights, version: str) -> None:
        """Swap the draft at the next round boundary (weights: a state dict or a model)."""
        self.pipeline.request_draft_swap(weights, version)

    def close(self) -> None:
        """Final commit, then release the consumer, the producer and the metrics server; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.pipeline.follower is not None:
            self.pipeline.follower.stop()
        self.poller.exit.set()
        for thread in self._threads:
            if thread.name == "poll":
                thread.join(JOIN_TIMEOUT_S)
        try:
            self.publisher.close(timeout_s=5)
        except Exception as exc:
            log.warning("closing the producer: %s", exc)
        self.metrics.close()

    def join_abandoned(self, timeout: float) -> bool:
        """Wait for threads (and a learning round) left running after an abandoned drain; True when none is."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        round_done = self.learning is None or self.learning.wait_idle(deadline - time.monotonic())
        return round_done and not any(thread.is_alive() for thread in self._threads)

    def _guard(self, target) -> None:
        try:
            target()
        except BaseException as exc:
            if self._fatal is None:
                self._fatal = exc
                log.error("fatal error in the %s thread: %s", threading.current_thread().name, exc, exc_info=exc)
            self.stop("fatal error")

    def _supervise_until_stop(self) -> None:
        next_status = time.monotonic()
        while not self._stopping.wait(0.2):
            if self._stop_requested:
                log.info(
                    "%s received: taking no more records, finishing those in hand (grace %g s; a second "
                    "signal abandons them)",
                    self._stop_reason,
                    self.settings.daemon.shutdown_grace_s,
                )
                self.stop(self._stop_reason)
                break
            if not all(thread.is_alive() for thread in self._threads):
                self.stop("a worker thread ended")
                break
            if self._alive():
                self.notifier.watchdog()
            if time.monotonic() >= next_status:
                self.notifier.status(self.status_line())
                next_status = time.monotonic() + self.settings.daemon.status_interval_s

    def _alive(self) -> bool:
        """False once a stage has shown no sign of life for WatchdogSec: systemd then restarts us.

        A stage beats between engine steps (and sink transactions) and on every retry, so one step must finish within
        WatchdogSec."""
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return True
        now = time.monotonic()
        return all(now - beat < 2 * interval for beat in self.pipeline.beats.values())

    def _drain(self) -> None:
        grace = self.settings.daemon.shutdown_grace_s
        self.notifier.stopping(f"draining ({self._stop_reason}), grace {grace:g} s")
        self.poller.stopping.set()
        self.pipeline.stopping.set()
        if self.learning is not None:
            self.learning.stop()
        deadline = time.monotonic() + grace
        while not self.pipeline.sink_finished.wait(0.2):
            self.notifier.watchdog()
            if time.monotonic() >= deadline or self.pipeline.hard_stop.is_set():
                self.pipeline.hard_stop.set()
                self._abandoned = self.tracker.in_flight() - self.inbox.qsize()
                why = "grace period over" if time.monotonic() >= deadline else self._abandon_reason
                log.warning("%s: abandoning %d in-flight records (they will be redelivered)", why, self._abandoned)
                break
        if self.learning is not None and self.learning.round_running:
            self.notifier.status("waiting for the learning round to stop")
            while not self.learning.wait_idle(0.2):
                self.notifier.watchdog()
                if time.monotonic() >= deadline or self.pipeline.hard_stop.is_set():
                    why = "grace period over" if time.monotonic() >= deadline else self._abandon_reason
                    log.warning("%s: leaving the learning round (closed as failed at next start)", why)
                    break

    def status_line(self) -> str:
        t = self.totals
        paused = "" if self.health.healthy else f", paused: {self.health.describe()}"
        return (
            f"served {t.decoded + t.resent}, dlq {t.dead_lettered}, queue {self.inbox.qsize()}, "
            f"tokens {t.tokens}{paused}"
        )

    def _log_summary(self) -> None:
        t = self.totals
        avg_len = t.tokens / t.target_forwards if t.target_forwards else 0.0
        tps = t.tokens / t.decode_seconds if t.decode_seconds else 0.0
        if self._fatal is not None:
            outcome = f"error: {type(self._fatal).__name__}"
        elif self._abandoned:
            outcome = f"abandoned {self._abandoned} in flight"
        else:
            outcome = "drained"
        log.info(
            "onlinespec stopped (%s, %s): %d decoded, %d resent, %d dead-lettered %s, %d tokens in %d hand-overs, "
            "AvgLen %.2f, decode %.1f tok/s, %d left queued for redelivery, %d database retries, "
            "%d produce retries, %d producer recreations, %d undeliverable, %d stalls, %d rebalances, uptime %.1f s",
            self._stop_reason,
            outcome,
            t.decoded,
            t.resent,
            t.dead_lettered,
            dict(sorted(t.by_reason.items())),
            t.tokens,
            t.batches,
            avg_len,
            tps,
            self.inbox.qsize(),
            t.database_retries,
            t.produce_retries,
            self.publisher.recreations,
            t.undeliverable,
            self.poller.stalls.found,
            self.poller.rebalances,
            time.monotonic() - self._started_at,
        )
