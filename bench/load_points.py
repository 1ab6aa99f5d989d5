"""Static vs continuous batching through the daemon at offered loads (issue 14): `python -m bench.daemon_load
--compare-scheduling`, whose docstring has the commands. This module is its machinery.

Per batch size, one daemon with `engine.scheduling: static`, then one with `continuous` (each its own topics and
fresh SQLite database, on one Tansu broker), each serving its load points back to back with fresh request ids:

    warm-up            one batch of prompts, not measured
    saturation         --saturation-batches x batch size prompts produced at once: requests/s and completion
                       tokens/s from the first produce to the last completion consumed (the saturation rate)
    x% of static       Poisson arrivals at x% of the static daemon's saturation rate: the same arrival times and
                       prompts for both schedulings (the apples-to-apples points)
    x% of continuous   Poisson arrivals at x% of the continuous daemon's own saturation rate (continuous only: for
                       the static daemon its own rate is static's)

Every point replays the same stream from its start (the prompt files interleaved, each file's max_new_tokens), so
the two schedulings always see the same prompts; arrival gaps come from a generator seeded by --seed and the point's
name, so a point at the same rate has the same arrival times in both daemons.

Measured per request, in this process's clock unless said otherwise:
    e2e        produce (the client's send call) to the completion's arrival at the consumer
    ttft       produce to the first token, estimated as e2e minus what is known to come after the first token: the
               daemon's first token -> last token (timings: queue_s + decode_s - first_token_s) and the completion
               record's CreateTime (stamped by the daemon's producer) -> its arrival here (wall clock). What remains
               unattributed, the daemon's sink time (hand-over, DB store) before it produces the completion, is
               counted as if it came before the first token: an upper bound, too high by the store time
               (`store_s_mean`, from onlinespec_store_seconds, is reported with each point)
    ttft_daemon  timings.first_token_s: the record's arrival in the daemon's poll thread to its first token
    itl        the daemon's first token -> last token / (completion tokens - 1): mean inter-token latency
    to_daemon  ttft - ttft_daemon: produce -> the daemon's poll thread (Kafka delivery, and the wait of records in
               Kafka while the daemon's queue is full), plus the sink time above
Per point: offered and achieved requests/s, completion tokens/s (first produce -> last completion; for a burst also
`steady_rps`, without its first and last batch size of completions), p50/p99 of the latencies, slot occupancy (the
daemon's onlinespec_slot_occupancy gauge, decoding slots / slots after each engine step, sampled every
OCCUPANCY_EVERY_S while the point runs, averaged) and `slots_held` (the requests' decode_s, slot to last token,
prefill included, summed / (batch size x span)) and `prefill_share`, prefill's share of the engine's time over the
point (onlinespec_engine_seconds_total{phase}: prefill, rounds, catch_up; GPU time on CUDA); `prefill_s` (timings
first_token_s - queue_s: slot to first token) per request.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from bench.daemon_load import (
    build_tiny_target,
    daemon_config,
    labelled_samples,
    load_prompt_values,
    metric_families,
    metric_samples,
    scrape_stages,
    unlabelled_samples,
)
from devtools.fleet import DaemonLog, DaemonProcess, PacedProducer, header

SCHEDULINGS = ("static", "continuous")
OCCUPANCY_EVERY_S = 0.25
SATURATION_TIMEOUT_S = 900.0
DRAIN_TIMEOUT_S = 120.0  # after a Poisson point's last arrival, for its last completions
READY_TIMEOUT_S = 900.0
# What the budget assumes of a step before it has timed one (seconds); measured values replace them.
GUESSES = {"start": 30.0, "warmup": 2.0, "saturation": 10.0, "drain": 2.0, "stop": 3.0}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("static vs continuous scheduling (--compare-scheduling, bench/load_points.py)")
    group.add_argument(
        "--compare-scheduling",
        action="store_true",
        help="per batch size, a static and a continuous daemon at saturation and at Poisson offered loads",
    )
    group.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="engine.max_batch_size of each pair of daemons (default --batch-size)",
    )
    group.add_argument(
        "--load-fractions",
        type=float,
        nargs="+",
        default=[0.5, 0.9],
        help="Poisson points at these fractions of a saturation rate (default 0.5 0.9)",
    )
    group.add_argument(
        "--saturation-batches",
        type=int,
        default=8,
        help="the saturation point produces this many batches' worth of prompts at once (default 8)",
    )
    group.add_argument(
        "--point-s",
        type=float,
        default=15.0,
        help="seconds of Poisson arrivals per load point (at most, with --budget-s)",
    )
    group.add_argument(
        "--min-point-requests", type=int, default=16, help="requests per Poisson point at least (default 16)"
    )
    group.add_argument(
        "--budget-s",
        type=float,
        help="wall-clock seconds for the whole comparison, daemon starts included: Poisson points are shortened "
        "(down to --min-point-requests) so that it ends in time",
    )
    group.add_argument(
        "--start-together",
        action="store_true",
        help="start every daemon before the first load point (start-ups overlap; each idles until its turn)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times (default 0)")


# ---------------------------------------------------------------------------------------------- load points


@dataclass(frozen=True)
class Point:
    """One load point: request i of the stream is produced `offsets[i]` seconds after the first."""

    name: str  # "saturation", "50% of static", ...
    rate: float | None  # offered requests/s; None: every prompt at once
    offsets: tuple[float, ...]

    @property
    def arrivals_s(self) -> float:
        return self.offsets[-1]


def burst(count: int, name: str = "saturation") -> Point:
    """Every prompt at once: the saturation point (or the unmeasured warm-up)."""
    return Point(name, None, (0.0,) * count)


def poisson_point(name: str, rate: float, count: int, seed: int) -> Point:
    """Poisson arrivals at `rate`: exponential gaps from a generator seeded by (seed, name), first arrival at 0."""
    rng = random.Random(f"{seed}:{name}")
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate)
    return Point(name, rate, tuple(offsets))


def point_name(fraction: float, reference: str) -> str:
    return f"{fraction:.0%} of {reference}"


@dataclass
class Answer:
    """A completion (or dead letter) as the consumer got it."""

    arrived: float  # time.monotonic()
    delivery_s: float  # its record's CreateTime (the daemon's send call) -> arrival here, wall clock
    tokens: int = 0
    timings: dict | None = None  # the completion's; None for a dead letter


# ---------------------------------------------------------------------------------------------- one daemon


class ServingDaemon:
    """`onlinespec serve` with one scheduling and batch size, on topics and a database of its own, serving load
    points one after another; its slot-occupancy gauge is sampled on a thread while it runs."""

    def __init__(self, args, broker, workdir: Path, target: str, batch_size: int, scheduling: str):
        from devtools.local_broker import free_port, fresh_names
        from storage.migrate import upgrade_to_head

        self.args = args
        self.batch_size = batch_size
        self.scheduling = scheduling
        self.label = f"b{batch_size}-{scheduling}"
        workdir.mkdir(parents=True)
        self.names = fresh_names(broker)
        broker.create_topics(self.names.prompts, self.names.completions, self.names.dlq)
        database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
        upgrade_to_head(database_url)
        self.port = free_port()
        proposer = args.proposers[0]
        draft = None if proposer == "none" else args.draft  # target-only needs no draft loaded
        config = daemon_config(args, self.names, database_url, target, draft, proposer, self.port)
        config["engine"].update(max_batch_size=batch_size, scheduling=scheduling)
        config["batching"]["queue_size"] = max(64, 4 * batch_size)
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        self.process = DaemonProcess(config_path, workdir / "daemon.log", env=env)
        self.samples: list[tuple[float, float]] = []  # (time.monotonic(), slot occupancy)
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name=f"occupancy-{self.label}", daemon=True)
        self.reader = None
        self.answers: dict[str, Answer] = {}
        self.started_at: float | None = None  # epoch seconds

    def start(self) -> ServingDaemon:
        self.started_at = time.time()
        self.process.start()
        return self

    def wait_ready(self) -> float:
        """Seconds from start() until the daemon had its partition (by its log, so also right for a daemon that was
        ready long before this was called)."""
        from kafka import KafkaConsumer, TopicPartition

        self.process.wait_ready(READY_TIMEOUT_S)
        ready_s = DaemonLog.parse(self.label, self.process.log()).assignments[0][0] - self.started_at
        # a short fetch wait: Tansu holds a fetch that found nothing even when a record arrives meanwhile (with
        # kafka-python's default 500 ms, records reached a consumer 0-250 ms late, 125 ms on average)
        self.reader = KafkaConsumer(
            bootstrap_servers=self.names.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        self.reader.assign([TopicPartition(self.names.completions, 0), TopicPartition(self.names.dlq, 0)])
        self.reader.seek_to_beginning()
        self._sampler.start()
        return ready_s

    def _sample(self) -> None:
        while not self._sampling.wait(OCCUPANCY_EVERY_S):
            try:
                value = metric_samples(self.port).get("onlinespec_slot_occupancy")
            except OSError:  # a scrape missed is a sample missed
                continue
            if value is not None:
                self.samples.append((time.monotonic(), value))

    def run(self, point: Point) -> dict:
        """Produce the point's requests on schedule, read every answer (or give up at the deadline), measure."""
        prefix = f"{self.label}-{point.name.replace('% of ', 'pct-')}"
        values = load_prompt_values(
            self.args, count=len(point.offsets), prefix=prefix, max_new_tokens=self.args.max_new_tokens_per_file
        )
        ids_in_order = [json.loads(v)["id"] for v in values]
        records = [(i.encode(), v) for i, v in zip(ids_in_order, values)]
        ids = set(ids_in_order)
        before = self._snapshot()
        producer = PacedProducer(
            self.names.bootstrap, self.names.prompts, records, at=point.offsets, wait_acks=False, linger_ms=0
        ).start()
        timeout = SATURATION_TIMEOUT_S if point.rate is None else point.arrivals_s + DRAIN_TIMEOUT_S
        deadline = time.monotonic() + timeout
        waiting = set(ids)
        while waiting and time.monotonic() < deadline:
            self._read(waiting)
        if waiting:  # still in the daemon: the next point will share it with them
            progress(f"{self.label} {point.name}: {len(waiting)} requests unanswered after {timeout:.0f} s")
        producer.stop()
        after = self._snapshot()
        produced = dict(zip(producer.sent, producer.sent_at))
        late = max((at - producer.started - offset for at, offset in zip(producer.sent_at, point.offsets)), default=0)
        answers = {i: self.answers[i] for i in ids if i in self.answers}
        return measure(point, produced, answers, self, before, after) | {"producer_late_s_max": round(late, 3)}

    def _snapshot(self) -> dict[str, float]:
        """One scrape: the unlabelled samples and, as `phase:NAME` entries beside them, the engine's seconds per
        phase so far."""
        families = metric_families(self.port)
        phases = labelled_samples(families, "onlinespec_engine_seconds_total", "phase")
        return unlabelled_samples(families) | {f"phase:{name}": seconds for name, seconds in phases.items()}

    def _read(self, waiting: set[str]) -> None:
        for tp, batch in self.reader.poll(timeout_ms=50).items():
            arrived, wall = time.monotonic(), time.time()
            for record in batch:
                request_id = header(record, "request-id")
                answer = Answer(arrived, max(0.0, wall - record.timestamp / 1000))
                if tp.topic == self.names.completions:
                    payload = json.loads(record.value)
                    answer.tokens, answer.timings = payload["usage"]["completion_tokens"], payload["timings"]
                self.answers[request_id] = answer
                waiting.discard(request_id)

    def occupancy(self, start: float, end: float) -> float | None:
        values = [value for at, value in self.samples if start <= at <= end]
        return round(statistics.fmean(values), 3) if values else None

    def stop(self) -> dict:
        """SIGTERM; the daemon's stage figures and its summary line."""
        self._sampling.set()
        if self._sampler.is_alive():
            self._sampler.join(5)
        stages = scrape_stages(self.port) if self.process.alive else None
        if self.reader is not None:
            self.reader.close()
        self.process.stop()
        text = self.process.log()
        lines = text.splitlines()
        return {
            "exit_code": self.process.process.returncode if self.process.process else None,
            "stages": stages,
            "summary": DaemonLog.parse(self.label, text).stopped,
            "log_warnings": [line for line in lines if line.split(" ")[2:3] in (["WARNING"], ["ERROR"])][:20],
        }


def measure(point: Point, produced: dict[str, float], answers: dict[str, Answer], daemon, before, after) -> dict:
    """A point's figures (module docstring) from the produce times, the answers and the metrics around it."""
    completed = {i: a for i, a in answers.items() if a.timings is not None and i in produced}
    first = min(produced.values(), default=0.0)
    last = max((a.arrived for a in answers.values()), default=first)
    span = max(last - first, 1e-9)
    e2e, ttft, ttft_daemon, itl, queue, prefill, held = [], [], [], [], [], [], 0.0
    for request_id, answer in completed.items():
        t = answer.timings
        total = answer.arrived - produced[request_id]
        first_to_last = t["queue_s"] + t["decode_s"] - t["first_token_s"]
        e2e.append(total)
        ttft.append(max(t["first_token_s"], total - first_to_last - answer.delivery_s))
        if answer.tokens > 1:
            itl.append(first_to_last / (answer.tokens - 1))
        ttft_daemon.append(t["first_token_s"])
        queue.append(t["queue_s"])
        prefill.append(t["first_token_s"] - t["queue_s"])
        held += t["decode_s"]
    tokens = sum(a.tokens for a in completed.values())
    # A burst's rate between its first and last batch size of completions: without the ramp (first prefill, Kafka
    # delivery) and the tail (slots emptying while the last long requests finish), which first produce -> last
    # completion (rps, the saturation rate) includes.
    ends = sorted(a.arrived for a in completed.values())
    edge = daemon.batch_size
    steady = (len(ends) - 2 * edge + 1) / (ends[-edge] - ends[edge - 1]) if len(ends) > 2 * edge else None
    transactions = after.get("onlinespec_store_seconds_count", 0) - before.get("onlinespec_store_seconds_count", 0)
    store = after.get("onlinespec_store_seconds_sum", 0) - before.get("onlinespec_store_seconds_sum", 0)
    return {
        "point": point.name,
        "offered_rps": round(point.rate, 3) if point.rate else None,
        "requests": len(point.offsets),
        "completed": len(completed),
        "dead_lettered": sum(1 for a in answers.values() if a.timings is None),
        "unanswered": len(point.offsets) - len(answers),
        "arrivals_s": round(point.arrivals_s, 2),
        "span_s": round(span, 3),
        "rps": round(len(completed) / span, 3),
        "steady_rps": round(steady, 3) if steady and point.rate is None else None,
        "tok_s": round(tokens / span, 1),
        "completion_tokens": tokens,
        "e2e_s": percentiles(e2e),
        "ttft_s": percentiles(ttft),
        "ttft_daemon_s": percentiles(ttft_daemon),
        "to_daemon_s": percentiles([a - b for a, b in zip(ttft, ttft_daemon)]),
        "itl_s": percentiles(itl),
        "queue_s": percentiles(queue),
        "prefill_s": percentiles(prefill),
        "occupancy": daemon.occupancy(first, last),
        "slots_held": round(held / (daemon.batch_size * span), 3),
        "store_s_mean": round(store / transactions, 4) if transactions else None,
        "prefill_share": prefill_share(before, after),
    }


def prefill_share(before: dict, after: dict) -> float | None:
    """Prefill's share of the engine's time over the point (onlinespec_engine_seconds_total: GPU time on CUDA)."""
    grown = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("phase:")}
    total = sum(grown.values())
    return round(grown.get("phase:prefill", 0.0) / total, 3) if total > 0 else None


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "max": round(max(values), 4)}


# ---------------------------------------------------------------------------------------------- the comparison


@dataclass
class Budget:
    """Seconds of Poisson arrivals per load point, so that the whole comparison ends within total_s (None: always
    max_point_s): what is left of it, less what the steps still to come are expected to take (their means so far,
    GUESSES before any), shared out evenly among the points whose length is not fixed yet."""

    total_s: float | None
    max_point_s: float
    started: float = field(default_factory=time.monotonic)
    timed: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in GUESSES})

    def note(self, kind: str, seconds: float) -> None:
        self.timed[kind].append(seconds)

    def typical(self, kind: str) -> float:
        return statistics.fmean(self.timed[kind]) if self.timed[kind] else GUESSES[kind]

    def point_s(self, open_points: int, fixed_s: float, later: dict[str, int]) -> float:
        """`open_points`: Poisson points still to size (this one included); `fixed_s`: arrival seconds of the sized
        points still to run; `later`: how many of each GUESSES step are still to come."""
        if self.total_s is None:
            return self.max_point_s
        left = self.total_s - (time.monotonic() - self.started)
        spare = left - fixed_s - sum(count * self.typical(kind) for kind, count in later.items())
        return min(self.max_point_s, max(0.0, spare / max(open_points, 1)))


def run(args, head: dict, command: str) -> int:
    """--compare-scheduling: the comparison on a broker of its own; the JSON (with `head` first) to --out, or to
    stdout without it; the table last."""
    from devtools.local_broker import TansuBroker

    with tempfile.TemporaryDirectory(prefix="daemon-load-") as tmp:
        workdir = Path(tmp)
        target = args.target or str(build_tiny_target(workdir, args.layers, args.hidden))
        broker = TansuBroker(workdir)
        broker.start()
        try:
            result = head | compare(args, broker, workdir, target) | {"command": command}
        finally:
            broker.stop()
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(table(result))
    return 0


def compare(args, broker, workdir: Path, target: str) -> dict:
    """Every batch size: the static daemon, then the continuous one (it needs static's saturation rate)."""
    budget = Budget(args.budget_s, args.point_s)
    plan = [(b, s) for b in args.batch_sizes for s in SCHEDULINGS]
    daemons = [ServingDaemon(args, broker, workdir / f"b{b}-{s}", target, b, s) for b, s in plan]
    if args.start_together:
        for daemon in daemons:
            daemon.start()
    static_points: dict[int, list[Point]] = {}  # per batch size: the static daemon's Poisson points, replayed
    runs = []
    try:
        for index, daemon in enumerate(daemons):
            if not args.start_together:
                daemon.start()
            ready_s = daemon.wait_ready()
            if not args.start_together:
                budget.note("start", ready_s)
            progress(f"{daemon.label}: ready in {ready_s:.1f} s")
            warmup = daemon.run(burst(daemon.batch_size, "warm-up"))
            budget.note("warmup", warmup["span_s"])
            saturation = daemon.run(burst(args.saturation_batches * daemon.batch_size))
            budget.note("saturation", saturation["span_s"])
            progress(line(daemon.label, saturation))
            # (name, rate, the Point when it is sized already): static's points first, then the daemon's own
            queue = [(p.name, p.rate, p) for p in static_points.get(daemon.batch_size, [])]
            queue += [(point_name(f, daemon.scheduling), f * saturation["rps"], None) for f in args.load_fractions]
            points, sized = [saturation], []
            for position, (name, rate, point) in enumerate(queue):
                if point is None:
                    seconds = budget.point_s(*remaining(args, plan, index, queue[position:], static_points))
                    point = poisson_point(name, rate, max(args.min_point_requests, round(rate * seconds)), args.seed)
                result = daemon.run(point)
                budget.note("drain", max(0.0, result["span_s"] - point.arrivals_s))
                progress(line(daemon.label, result))
                points.append(result)
                sized.append(point)
            if daemon.scheduling == "static":
                static_points[daemon.batch_size] = sized
            stopping = time.monotonic()
            stopped = daemon.stop()
            budget.note("stop", time.monotonic() - stopping)
            runs.append(
                {
                    "batch_size": daemon.batch_size,
                    "scheduling": daemon.scheduling,
                    "ready_s": round(ready_s, 1),
                    "warmup": warmup,
                    "points": points,
                    **stopped,
                }
            )
    finally:
        for daemon in daemons:
            daemon.process.stop()
    return {"runs": runs, "comparison": comparison(runs), "elapsed_s": round(time.monotonic() - budget.started, 1)}


def remaining(args, plan, index: int, queue_left, static_points) -> tuple[int, float, dict[str, int]]:
    """Budget.point_s's arguments before sizing the first point of queue_left, in daemon `index` of plan."""
    fractions = len(args.load_fractions)
    open_points = sum(1 for _, _, point in queue_left if point is None)
    fixed_s = sum(point.arrivals_s for _, _, point in queue_left if point is not None)
    later = plan[index + 1 :]
    poisson_left = len(queue_left)
    for batch_size, scheduling in later:
        open_points += fractions  # its own rates
        poisson_left += fractions
        if scheduling == "continuous":  # and static's: sized already if that static daemon ran
            poisson_left += fractions
            if batch_size in static_points:
                fixed_s += sum(p.arrivals_s for p in static_points[batch_size])
            else:
                open_points += fractions
    steps = {
        "start": 0 if args.start_together else len(later),
        "warmup": len(later),
        "saturation": len(later),
        "drain": poisson_left,
        "stop": 1 + len(later),
    }
    return open_points, fixed_s, steps


def comparison(runs: list[dict]) -> list[dict]:
    """Per batch size: continuous / static at saturation (throughput) and at each shared point (latency)."""
    found = []
    for batch_size in sorted({r["batch_size"] for r in runs}):
        pair = {r["scheduling"]: {p["point"]: p for p in r["points"]} for r in runs if r["batch_size"] == batch_size}
        if set(pair) != set(SCHEDULINGS):
            continue
        static, continuous = pair["static"], pair["continuous"]
        entry = {"batch_size": batch_size, "saturation": {}, "points": {}}
        for key in ("rps", "tok_s"):
            entry["saturation"][f"{key}_ratio"] = ratio(continuous["saturation"][key], static["saturation"][key])
        for name in static:
            if name == "saturation" or name not in continuous:
                continue
            entry["points"][name] = {
                f"{metric}_{q}_ratio": ratio(_get(continuous[name], metric, q), _get(static[name], metric, q))
                for metric in ("e2e_s", "ttft_s")
                for q in ("p50", "p99")
            }
        found.append(entry)
    return found


def _get(point: dict, metric: str, q: str) -> float | None:
    return (point.get(metric) or {}).get(q)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---------------------------------------------------------------------------------------------- output


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def line(label: str, p: dict) -> str:
    offered = f"offered {p['offered_rps']} req/s, " if p["offered_rps"] else ""
    e2e, ttft = p["e2e_s"] or {}, p["ttft_s"] or {}
    return (
        f"{label} {p['point']}: {offered}{p['completed']}/{p['requests']} in {p['span_s']} s, {p['rps']} req/s, "
        f"{p['tok_s']} tok/s, ttft p50/p99 {ttft.get('p50')}/{ttft.get('p99')} s, e2e p50/p99 {e2e.get('p50')}/"
        f"{e2e.get('p99')} s, occupancy {p['occupancy']}"
    )


def table(result: dict) -> str:
    """One line per load point (latencies p50 / p99 in seconds; `ttft in daemon` from the daemon's poll thread),
    then per batch size the ratios continuous / static."""

    def pair(figures: dict | None) -> str:
        return f"{figures['p50']:.3f} / {figures['p99']:.3f}" if figures else "-"

    lines = [
        f"{'batch':>5} {'scheduling':<10} {'point':<17} {'offered':>7} {'n':>4} {'req/s':>6} {'tok/s':>7} "
        f"{'ttft':>15} {'ttft in daemon':>15} {'e2e':>15} {'occup.':>6} {'prefill':>7}"
    ]
    for run in result["runs"]:
        for p in run["points"]:
            offered = f"{p['offered_rps']:.2f}" if p["offered_rps"] else "burst"
            notes = [f"{p[key]} {key.replace('_', '-')}" for key in ("unanswered", "dead_lettered") if p[key]]
            occupancy = "-" if p["occupancy"] is None else f"{p['occupancy']:.2f}"
            share = "-" if p.get("prefill_share") is None else f"{p['prefill_share']:.2f}"
            lines.append(
                f"{run['batch_size']:>5} {run['scheduling']:<10} {p['point']:<17} {offered:>7} {p['requests']:>4} "
                f"{p['rps']:>6.2f} {p['tok_s']:>7.1f} {pair(p['ttft_s']):>15} {pair(p['ttft_daemon_s']):>15} "
                f"{pair(p['e2e_s']):>15} {occupancy:>6} {share:>7}" + (f"  ({', '.join(notes)})" if notes else "")
            )
    for entry in result["comparison"]:
        sat = entry["saturation"]
        parts = [f"batch {entry['batch_size']}, continuous / static: saturation {sat['rps_ratio']}x req/s"]
        parts += [
            f"at {name} p99 e2e {r['e2e_s_p99_ratio']}x, p99 ttft {r['ttft_s_p99_ratio']}x"
            for name, r in entry["points"].items()
        ]
        lines.append("; ".join(parts))
    return "\n".join(lines)
