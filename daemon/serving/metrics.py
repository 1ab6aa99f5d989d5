"""Prometheus metrics of one daemon process, on its own registry, served over HTTP when a port is set.

Raw counters first (tokens, target forwards, drafted/accepted per draft version); the AvgLen and tokens/s
gauges are derived from them for dashboards that cannot divide.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pipelines.types import GenerationResult

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "onlinespec_requests",
            "Prompt records handled, by outcome (completed, resent, dead_lettered)",
            ["outcome"],
            registry=r,
        )
        self.dlq = Counter("onlinespec_dlq_records", "Records sent to the DLQ, by reason code", ["reason"], registry=r)
        self.tokens = Counter("onlinespec_generated_tokens", "Tokens generated", ["draft_version"], registry=r)
        self.target_forwards = Counter(
            "onlinespec_target_forwards", "Target forward passes (prefill included)", ["draft_version"], registry=r
        )
        self.drafted = Counter("onlinespec_drafted_tokens", "Draft tokens proposed", ["draft_version"], registry=r)
        self.accepted = Counter("onlinespec_accepted_tokens", "Draft tokens accepted", ["draft_version"], registry=r)
        self.avg_len = Gauge(
            "onlinespec_mean_accepted_length",
            "Tokens per target forward since start (AvgLen)",
            ["draft_version"],
            registry=r,
        )
        self.decode_tps = Gauge(
            "onlinespec_decode_tokens_per_second", "Tokens/s of the requests finished over the last second", registry=r
        )
        # Latencies per request, from the record's arrival in the poll thread: to its first token (time to first
        # token), between its tokens (inter-token latency: decode time / (tokens - 1)), to the produce ack.
        self.ttft_seconds = Histogram(
            "onlinespec_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl_seconds = Histogram(
            "onlinespec_inter_token_seconds",
            "Mean time between a request's tokens",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "onlinespec_request_seconds", "Arrival to the completion's produce ack", buckets=LATENCY_BUCKETS, registry=r
        )
        self.engine_seconds = Counter(
            "onlinespec_engine_seconds",
            "Engine time by phase: prefill (newcomers' prompts), rounds (decoding), catch_up (the draft model or "
            "head following rows it did not draft for); GPU time on CUDA",
            ["phase"],
            registry=r,
        )
        self._engine_totals: dict[str, float] = {}
        self.slot_occupancy = Gauge(
            "onlinespec_slot_occupancy", "Engine slots decoding / slots, after the last engine step", registry=r
        )
        self.lag = Gauge(
            "onlinespec_consumer_lag", "Records behind the high watermark", ["topic", "partition"], registry=r
        )
        self.queue_depth = Gauge("onlinespec_queue_depth", "Records waiting between poll thread and worker", registry=r)
        self.paused = Gauge("onlinespec_consumption_paused", "1 while partitions are paused", registry=r)
        self.database_up = Gauge("onlinespec_database_up", "0 while the database is unreachable", registry=r)
        self.producer_recreated = Counter(
            "onlinespec_producer_recreations", "Producers replaced after a fatal error", registry=r
        )
        # Delivery alerts: records no retry could produce (record: completion | dead_letter, error: its type), and
        # partitions whose committed offset stopped moving while records wait (daemon.stall_after_s).
        self.undeliverable = Counter(
            "onlinespec_undeliverable_records",
            "Records that failed to produce for good (dead-lettered, or kept in the database only)",
            ["record", "error"],
            registry=r,
        )
        self.stalled = Gauge(
            "onlinespec_partition_stalled",
            "1 while the committed offset has not moved for daemon.stall_after_s with records waiting",
            ["topic", "partition"],
            registry=r,
        )
        self.stalls = Counter(
            "onlinespec_partition_stalls", "Times a partition was found stalled", ["topic", "partition"], registry=r
        )
        self.batch_size = Histogram(
            "onlinespec_batch_size", "Records taken from the inbox at once", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "onlinespec_decode_seconds",
            "Engine time per synchronous batch (isolating a failing request)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.draft_swap_seconds = Histogram(
            "onlinespec_draft_swap_seconds",
            "Decode-thread time of a draft swap (weights prepared in the background)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "onlinespec_store_seconds",
            "Database transaction time per sink transaction",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.produce_seconds = Histogram(
            "onlinespec_produce_seconds",
            "Produce-and-ack time per sink transaction",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.proposer_drafted = Counter(
            "onlinespec_proposer_drafted_tokens", "Draft tokens proposed, by proposer", ["proposer"], registry=r
        )
        self.proposer_accepted = Counter(
            "onlinespec_proposer_accepted_tokens", "Draft tokens accepted, by proposer", ["proposer"], registry=r
        )
        self.proposer_rounds = Counter(
            "onlinespec_proposer_rounds", "Row-rounds in which a proposer drafted", ["proposer"], registry=r
        )
        self.variant_batches = Counter(
            "onlinespec_variant_batches",
            "Hand-overs of finished requests after which the engine's last choice was each variant "
            "(proposer:k; none:0 is target-only)",
            ["variant"],
            registry=r,
        )
        self.expected_goodput = Gauge(
            "onlinespec_expected_goodput",
            "The goodput controller's expected tokens/s per row of each variant at its last decision",
            ["variant"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._per_version: dict[str, list[int]] = {}  # version -> [emitted, forwards]
        self.database_up.set(1)
        self._server = None

    def record_results(self, results: list[GenerationResult]) -> None:
        with self._lock:
            for result in results:
                c = result.counters
                version = result.feedback.draft_version
                self.tokens.labels(version).inc(c.emitted)
                self.target_forwards.labels(version).inc(c.target_forwards)
                self.drafted.labels(version).inc(c.drafted)
                self.accepted.labels(version).inc(c.accepted)
                for proposer, counts in c.by_proposer.items():
                    self.proposer_drafted.labels(proposer).inc(counts["drafted"])
                    self.proposer_accepted.labels(proposer).inc(counts["accepted"])
                    self.proposer_rounds.labels(proposer).inc(counts["rounds"])
                totals = self._per_version.setdefault(version, [0, 0])
                totals[0] += c.emitted
                totals[1] += c.target_forwards
                if totals[1]:
                    self.avg_len.labels(version).set(totals[0] / totals[1])

    def record_engine_phases(self, totals: dict[str, float]) -> None:
        """The engine's seconds per phase so far (pipelines.phase_clock), added to the counter as they grow."""
        for phase, seconds in totals.items():
            grown = seconds - self._engine_totals.get(phase, 0.0)
            if grown > 0:
                self.engine_seconds.labels(phase).inc(grown)
                self._engine_totals[phase] = seconds

    def record_latencies(self, timings: dict[str, float], tokens: int) -> None:
        """A completion's time to first token and mean inter-token latency (its output contract's timings)."""
        self.ttft_seconds.observe(timings["first_token_s"])
        if tokens > 1:
            self.itl_seconds.observe(timings["decode_s"] / (tokens - 1))

    def record_choice(self, engine) -> None:
        """The variant the engine chose last and, with proposer auto, what the controller expected."""
        if engine.last_variant is None:
            return
        self.variant_batches.labels(str(engine.last_variant)).inc()
        last = engine.controller.last if engine.controller is not None else None
        for variant, goodput in (last.goodput if last is not None else {}).items():
            self.expected_goodput.labels(str(variant)).set(goodput)

    def serve(self, host: str, port: int) -> int | None:
        """Start the HTTP exporter; port 0 disables it. Returns the bound port."""
        if port == 0:
            return None
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
