"""Several `onlinespec serve` processes on one broker, one consumer group and one database, and what can be read
back about them: the harness of the scale-out test (tests/test_scale_out.py) and benchmark (bench/scale_out.py),
and of every test that runs the daemon as a subprocess (DaemonProcess).

    Fleet              N daemons on one config; each names itself in its database URL (application_name), so
                       pg_locks tells which one holds the learner lock (lock_holder, LockWatch)
    DaemonLog          what a daemon's log says: requests served (with tokens and draft version), draft swaps,
                       learning rounds started, partition assignments (one line per rebalance)
    PacedProducer      prompt records at a fixed rate, on a thread of its own
    learner_figures    every learning round: which daemon ran it, whether the lock was held by anyone else meanwhile,
                       overlaps
    follow_figures     every move of the active draft: per daemon, how many batches it stored with the old version
                       after the move was committed, whether it went back, how long until it served the new one
    delivery_figures   exactly-once: completion rows, copies on the completions topic against the stored message

Batches are read from the database: a batch is the completions a daemon stored in one transaction (one
`created_at`). With continuous batching requests join and leave the engine at round boundaries, each stamped with
the draft version that served its last round, and the sink stores what finished together: so a batch is ordered
by when it was *stored*, and "the new version within one batch" means every batch stored after the engine swapped
carries it. Which daemon decoded a request is read from its log (`served <id>` lines).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from devtools.local_broker import die_with_parent

REPO = Path(__file__).resolve().parent.parent
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"  # daemon.cli.options.LOG_FORMAT's asctime, local time


# ---------------------------------------------------------------------------------------------- processes


class DaemonProcess:
    """`onlinespec serve` in a subprocess; its stderr goes to a file that tests can wait on."""

    def __init__(self, config: Path, log_path: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.config = config
        self.log_path = log_path
        self.extra_args = extra_args
        # One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine spinning
        # OpenMP threads of several processes slow each other down by orders of magnitude.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.env.pop("ONLINESPEC_DATABASE_URL", None)
        self.process: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self) -> DaemonProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve", "--config", str(self.config), *self.extra_args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        return self

    def log(self) -> str:
        """This run's log (a restarted daemon appends to the same file)."""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} before /{pattern}/:\n{text[-4000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no /{pattern}/ x{count} in the daemon log after {timeout} s:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        self.wait_for_log(r"partitions assigned", timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def with_application_name(database_url: str, name: str) -> str:
    """The URL with `application_name` set (PostgreSQL shows it in pg_stat_activity); other URLs unchanged."""
    from sqlalchemy import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return database_url
    return url.update_query_dict({"application_name": name}).render_as_string(hide_password=False)


class Fleet:
    """N daemons on one config file, labelled `daemon-0`, `daemon-1`, ...: each with its own log file, the shared
    database URL named after it, and what `extra_args(i)` and `env(i)` add (a metrics port, CUDA_VISIBLE_DEVICES)."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        database_url: str,
        count: int,
        *,
        extra_args: Callable[[int], tuple[str, ...]] = lambda i: (),
        env: Callable[[int], dict] = lambda i: {},
    ):
        self.database_url = database_url
        self.daemons: dict[str, DaemonProcess] = {}
        for i in range(count):
            label = f"daemon-{i}"
            args = ("--database-url", with_application_name(database_url, label), *extra_args(i))
            self.daemons[label] = DaemonProcess(config, Path(workdir) / f"{label}.log", args, env=env(i))

    def start(self) -> Fleet:
        for daemon in self.daemons.values():
            daemon.start()
        return self

    def wait_ready(self, partitions: int, timeout: float = 180.0) -> None:
        """Until every live daemon has partitions and together they have all `partitions` (the group settled)."""
        deadline = time.monotonic() + timeout
        while True:
            assignment = self.assignment()
            live = [label for label, daemon in self.daemons.items() if daemon.alive]
            owned = [p for label in live for p in assignment.get(label, [])]
            if all(assignment.get(label) for label in live) and len(set(owned)) == len(owned) == partitions:
                return
            for label, daemon in self.daemons.items():
                if daemon.process is not None and not daemon.alive:
                    raise AssertionError(f"{label} exited with {daemon.process.returncode}:\n{daemon.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the group did not settle over {partitions} partitions: {assignment}")
            time.sleep(0.1)

    def logs(self) -> dict[str, DaemonLog]:
        return {label: DaemonLog.read(label, daemon.log_path) for label, daemon in self.daemons.items()}

    def assignment(self) -> dict[str, list[str]]:
        """Each daemon's partitions as its log last reported them."""
        return {label: log.partitions for label, log in self.logs().items()}

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every live daemon; their exit codes (None for one that was not running)."""
        codes = {}
        for label, daemon in self.daemons.items():
            was_alive = daemon.alive
            daemon.stop()
            codes[label] = daemon.process.returncode if was_alive else None
        return codes


# ---------------------------------------------------------------------------------------------- logs


@dataclass
class Served:
    request_id: str
    tokens: int
    version: str
    at: float  # epoch seconds of the log line


@dataclass
class DaemonLog:
    label: str
    served: list[Served] = field(default_factory=list)
    swaps: list[tuple[float, str]] = field(default_factory=list)  # (epoch seconds, version) on the decode thread
    prepared: list[tuple[float, str]] = field(default_factory=list)  # (epoch seconds, version) ready to swap in
    rounds_started: dict[int, float] = field(default_factory=dict)  # round id -> epoch seconds
    assignments: list[tuple[float, list[str]]] = field(default_factory=list)  # one per rebalance
    stopped: str | None = None  # the summary line, when it stopped cleanly

    LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$", re.M)
    SERVED = re.compile(r"served (\S+) \(.*?\): (\d+) tokens, .*, draft (\S+), queue ")
    SWAPPED = re.compile(r"draft swapped to version (\S+) ")
    PREPARED = re.compile(r"draft (\S+) prepared in the background")
    ROUND = re.compile(r"round (\d+) started: ")
    ASSIGNED = re.compile(r"partitions assigned: (.*)$")

    @classmethod
    def read(cls, label: str, path: Path) -> DaemonLog:
        text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
        return cls.parse(label, text)

    @classmethod
    def parse(cls, label: str, text: str) -> DaemonLog:
        log = cls(label)
        for stamp, message in cls.LINE.findall(text):
            at = datetime.strptime(stamp, LOG_TIME_FORMAT).timestamp()
            if match := cls.SERVED.match(message):
                log.served.append(Served(match[1], int(match[2]), match[3], at))
            elif match := cls.SWAPPED.match(message):
                log.swaps.append((at, match[1]))
            elif match := cls.PREPARED.match(message):
                log.prepared.append((at, match[1]))
            elif match := cls.ROUND.match(message):
                log.rounds_started[int(match[1])] = at
            elif match := cls.ASSIGNED.match(message):
                log.assignments.append((at, [] if match[1] == "none" else match[1].split(", ")))
            elif message.startswith("onlinespec stopped"):
                log.stopped = message
        return log

    @property
    def partitions(self) -> list[str]:
        return self.assignments[-1][1] if self.assignments else []

    @property
    def rebalances(self) -> int:
        return len(self.assignments)

    def partitions_at(self, moment: float) -> list[str]:
        """Its partitions as of `moment` (epoch seconds), by its log."""
        held = [assigned for at, assigned in self.assignments if at <= moment]
        return held[-1] if held else []


# ---------------------------------------------------------------------------------------------- database


def rows(database_url: str, sql: str, **params) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params).all()]
    finally:
        engine.dispose()


def completion_rows(database_url: str) -> dict[str, int]:
    """request id -> number of completion rows."""
    return dict(
        rows(
            database_url,
            "SELECT r.request_id, COUNT(c.request_id) FROM requests r "
            "LEFT JOIN completions c ON c.request_id = r.request_id GROUP BY r.request_id",
        )
    )


LOCK_HOLDER_SQL = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = CAST(:classid AS oid) AND l.objid = CAST(:objid AS oid)
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_key_parts(deployment: str) -> dict[str, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits), objsubid 1."""
    from daemon.learning.learner_lock import advisory_key

    key = advisory_key(deployment) & 0xFFFF_FFFF_FFFF_FFFF
    return {"classid": key >> 32, "objid": key & 0xFFFF_FFFF}


class LockWatch:
    """Samples which daemon holds the learner lock of `deployment` (its application_name; None: nobody) every
    `interval_s` on a thread of its own: `samples` is a list of (epoch seconds, holder)."""

    def __init__(self, database_url: str, deployment: str = "default", interval_s: float = 0.05):
        from sqlalchemy import create_engine

        self.engine = create_engine(with_application_name(database_url, "lock-watch"), pool_size=1)
        self.params = lock_key_parts(deployment)
        self.interval_s = interval_s
        self.samples: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-watch", daemon=True)

    def holder(self) -> str | None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return conn.execute(text(LOCK_HOLDER_SQL), self.params).scalar()

    def start(self) -> LockWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append((time.time(), self.holder()))
            except Exception:  # a sample missed is a sample missed; the next one tries again
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.engine.dispose()


INTERRUPTED = "interrupted"  # how RoundRunner.recover() closes a round whose process died


def round_rows(database_url: str) -> list[dict]:
    """Every learning round, oldest first; `reason` is why it decided as it did (from its candidate_metrics)."""
    keys = ("id", "started_at", "finished_at", "decision", "error", "window_rows", "candidate_metrics")
    sql = "SELECT " + ", ".join(keys) + " FROM learning_rounds ORDER BY id"
    found = []
    for row in rows(database_url, sql):
        entry = dict(zip(keys, row))
        metrics = entry.pop("candidate_metrics")
        metrics = json.loads(metrics) if isinstance(metrics, str) else metrics or {}
        found.append({**entry, "reason": metrics.get("reason")})
    return found


def learner_figures(database_url: str, logs: dict[str, DaemonLog], samples: list[tuple[float, str | None]]) -> dict:
    """Every learning round: the daemon whose log started it, and the lock samples taken while it ran (each must
    name that daemon); rounds overlapping in time; rounds no daemon or several daemons claim; feedback rows that
    no consumed window holds although they lie inside one."""
    claims = defaultdict(list)
    for label, log in logs.items():
        for round_id in log.rounds_started:
            claims[round_id].append(label)
    rounds, overlaps, previous_end = [], 0, None
    for row in round_rows(database_url):
        start = row["started_at"].timestamp()
        end = row["finished_at"].timestamp() if row["finished_at"] else time.time()
        by = claims.get(row["id"], [])
        if (row["error"] or "").startswith(INTERRUPTED):  # closed by the next learner: it ended with its process
            end = max((at for at, holder in samples if holder in by and start <= at <= end), default=start)
        during = [holder for at, holder in samples if start <= at <= end]
        overlaps += previous_end is not None and start < previous_end
        previous_end = max(end, previous_end or end)
        rounds.append(
            {
                "id": row["id"],
                "daemon": by[0] if len(by) == 1 else by,
                "decision": row["decision"],
                "seconds": round(end - start, 2),
                "lock_samples": len(during),
                "lock_samples_of_others": sum(1 for h in during if h is not None and h not in by),
                "reason": row["error"] or row["reason"],
            }
        )
    holders = [holder for _, holder in samples if holder is not None]
    (passed_over,) = rows(
        database_url,
        "SELECT COALESCE(SUM((SELECT COUNT(*) FROM feedback f WHERE f.id BETWEEN r.window_first_id AND "
        "r.window_last_id) - r.window_rows), 0) FROM learning_rounds r WHERE r.decision IN ('promoted', 'rejected')",
    )[0]
    return {
        "rounds": rounds,
        "overlapping_rounds": overlaps,
        # feedback rows inside a consumed window that the window did not count: committed after it was measured,
        # so no round learns from them
        "feedback_rows_passed_over": int(passed_over),
        "rounds_not_claimed_by_one_daemon": sum(1 for r in rounds if not isinstance(r["daemon"], str)),
        "rounds_with_lock_held_by_another": sum(1 for r in rounds if r["lock_samples_of_others"]),
        "lock_samples": len(samples),
        "lock_samples_held": {label: holders.count(label) for label in sorted(set(holders))},
        "rounds_by_daemon": {label: sum(1 for r in rounds if r["daemon"] == label) for label in sorted(logs)},
    }


@dataclass
class Batch:
    daemon: str | None
    version: str
    stored: float  # epoch seconds: the transaction that stored its completions (created_at)
    requests: int


def batches(database_url: str, logs: dict[str, DaemonLog]) -> list[Batch]:
    """Every decoded batch (one store transaction: one completions.created_at), with the daemon that served it."""
    served_by = {s.request_id: label for label, log in logs.items() for s in log.served}
    grouped: dict[tuple, list] = defaultdict(list)
    for request_id, version, stored in rows(
        database_url, "SELECT request_id, draft_version, created_at FROM completions"
    ):
        grouped[(served_by.get(request_id), stored.timestamp(), version)].append(request_id)
    found = [Batch(daemon, version, stored, len(ids)) for (daemon, stored, version), ids in grouped.items()]
    return sorted(found, key=lambda b: b.stored)


def draft_moves(database_url: str) -> list[tuple[float, str, str]]:
    """(epoch seconds, promote | rollback, version now active) of every move of the active-draft pointer."""
    return [
        (at.timestamp(), kind, version)
        for at, kind, version in rows(
            database_url,
            "SELECT e.at, e.kind, COALESCE(c.version, 'base') FROM draft_events e "
            "LEFT JOIN draft_checkpoints c ON c.id = e.checkpoint_id "
            "WHERE e.kind IN ('promote', 'rollback') ORDER BY e.id",
        )
    ]


def follow_figures(database_url: str, logs: dict[str, DaemonLog]) -> list[dict]:
    """For every move of the active draft (to version v, committed at time t, until the next move), per daemon:

        follow_s            from t until its follower had v's weights ready (`draft v prepared` in its log): the
                            pointer poll (learning.follow_interval_ms, at least 50 ms) plus reading the weights
        stale_after_ready   batches it stored with another version after that: the new version is served "within
                            one batch" when this is at most 1 (what finished in the step before the swap)
        went_back           batches it stored after its first batch of v with another version (must be 0)
        stale_batches       batches it stored after t with another version, before its first batch of v (those
                            stored while its follower had not polled yet included)
        swap_s              from t to its decode thread's `draft swapped to version v` line
        first_batch_s       from t to the storing of its first batch of v
    Times are of one clock (one machine); t is the event's timestamp, taken just before its transaction commits.
    A daemon with no batch in that time (stopped, killed, idle) shows batches 0."""
    moves = draft_moves(database_url)
    found = batches(database_url, logs)
    figures = []
    for i, (at, kind, version) in enumerate(moves):
        until = moves[i + 1][0] if i + 1 < len(moves) else float("inf")
        per_daemon = {}
        for label, log in logs.items():
            mine = [b for b in found if b.daemon == label and at < b.stored < until]
            first = next((n for n, b in enumerate(mine) if b.version == version), None)
            ready = _first_after(log.prepared, version, at)
            swap = _first_after(log.swaps, version, at)
            per_daemon[label] = {
                "batches": len(mine),
                "follow_s": _since(ready, at),
                "stale_after_ready": sum(
                    1 for b in mine if ready is not None and b.stored > ready and b.version != version
                ),
                "went_back": 0 if first is None else sum(1 for b in mine[first:] if b.version != version),
                "stale_batches": len(mine) if first is None else first,
                "swap_s": _since(swap, at),
                "first_batch_s": None if first is None else round(mine[first].stored - at, 3),
            }
        figures.append({"at": at, "kind": kind, "version": version, "daemons": per_daemon})
    return figures


def _first_after(lines: list[tuple[float, str]], version: str, at: float) -> float | None:
    """The time of the first (time, version) log line of `version` at or after `at` (log stamps are whole ms)."""
    return next((t for t, v in lines if v == version and at <= t + 0.001), None)


def _since(moment: float | None, at: float) -> float | None:
    return None if moment is None else round(max(0.0, moment - at), 3)


def learner_mid_round(fleet: Fleet, watch: LockWatch) -> tuple[str, int] | None:
    """(daemon, round id) when a daemon holds the learner lock and its log shows it started a round that is not
    finished yet: the moment to kill the learner mid-round. None otherwise (cheap then: one query)."""
    holder = watch.holder()
    if holder not in fleet.daemons:
        return None
    started = DaemonLog.read(holder, fleet.daemons[holder].log_path).rounds_started
    open_rounds = [r["id"] for r in round_rows(fleet.database_url) if r["finished_at"] is None and r["id"] in started]
    return (holder, open_rounds[-1]) if open_rounds else None


def takeover_figures(
    database_url: str,
    logs: dict[str, DaemonLog],
    samples: list[tuple[float, str | None]],
    victim: str,
    killed_at: float,
    partitions: int,
) -> dict:
    """After the learner `victim` was killed at `killed_at` (epoch seconds), in seconds from the kill:

        lock_released_s     the first lock sample not naming the victim (samples are 50 ms apart)
        partitions_moved_s  the survivors' log line by which they owned every partition of the topic together
        next_round_s        a survivor's next round finished (promoted or rejected); next_round and next_round_by
    None where it did not happen."""
    released = next((at for at, holder in samples if at >= killed_at and holder != victim), None)
    survivors = [label for label in logs if label != victim]
    owned = {label: logs[label].partitions_at(killed_at) for label in survivors}
    moved = None
    changes = [(at, label, held) for label in survivors for at, held in logs[label].assignments if at > killed_at]
    for at, survivor, assigned in sorted(changes):
        owned[survivor] = assigned
        if len({p for held in owned.values() for p in held}) == partitions:
            moved = at
            break
    figures = {"lock_released_s": _since(released, killed_at), "partitions_moved_s": _since(moved, killed_at)}
    for row in round_rows(database_url):
        by = [label for label in survivors if row["id"] in logs[label].rounds_started]
        if by and row["decision"] in ("promoted", "rejected") and row["started_at"].timestamp() > killed_at:
            figures.update(
                next_round=row["id"],
                next_round_by=by[0],
                next_round_s=_since(row["finished_at"].timestamp(), killed_at),
            )
            break
    return figures


def takeover_done(figures: dict) -> dict | None:
    """takeover_figures once every step happened, else None."""
    steps = ("lock_released_s", "partitions_moved_s", "next_round_s")
    return figures if all(figures.get(step) is not None for step in steps) else None


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll_s: float = 0.1):
    """condition()'s first truthy value, checked every poll_s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- kafka


def header(record, name: str) -> str | None:
    for key, value in record.headers or []:
        if key == name:
            return value.decode()
    return None


def delivery_figures(database_url: str, ids: list[str], records) -> dict:
    """Exactly-once figures for `ids`: completion rows and feedback rows in the database, copies on the topic and
    whether each is byte for byte the stored message."""
    stored = dict(rows(database_url, "SELECT request_id, message_json FROM completions"))
    feedback = dict(rows(database_url, "SELECT request_id, COUNT(*) FROM feedback GROUP BY request_id"))
    counts = completion_rows(database_url)
    copies: dict[str, list[bytes]] = defaultdict(list)
    for record in records:
        copies[header(record, "request-id")].append(record.value)
    wanted = set(ids)
    return {
        "ids": len(ids),
        "completion_rows": sum(counts.get(i, 0) for i in ids),
        "duplicates_in_db": sum(max(0, counts.get(i, 0) - 1) + max(0, feedback.get(i, 0) - 1) for i in ids),
        "lost": sum(1 for i in ids if counts.get(i, 0) == 0 or not copies.get(i)),
        "copies_on_topic": sum(len(copies[i]) for i in ids),
        "resent_copies": sum(1 for r in records if header(r, "request-id") in wanted and header(r, "resent")),
        "copies_not_as_stored": sum(
            1 for i in ids for value in copies.get(i, []) if value != stored.get(i, "").encode()
        ),
        "unexpected_ids_on_topic": len(set(copies) - wanted),
    }


class PacedProducer:
    """Sends (key, value) records on a thread of its own, the i-th at start + at[i] seconds (default: i / rate, a
    fixed rate), so a slow moment is caught up rather than lost, until the records run out or stop() is called.
    `sent` holds the request ids produced, in order, and `sent_at` when each was handed to the client
    (time.monotonic()). With wait_acks (the default) each record is acknowledged before the next is sent (`sent`
    holds acknowledged records only); without, sends never wait for acks (arrivals in bursts stay bursts) and the
    thread waits for every ack once the records ran out."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        records: Iterable[tuple[bytes, bytes]],
        rate: float | None = None,
        *,
        at: Sequence[float] | None = None,
        wait_acks: bool = True,
        linger_ms: int = 5,
    ):
        if (rate is None) == (at is None):
            raise ValueError("give a rate or the arrival offsets (at), not both")
        self.bootstrap = bootstrap
        self.topic = topic
        self.records = iter(records)
        self.offsets = at
        self.rate = rate
        self.wait_acks = wait_acks
        self.linger_ms = linger_ms
        self.sent: list[str] = []
        self.sent_at: list[float] = []
        self.started: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def _offset(self, i: int) -> float:
        return self.offsets[i] if self.offsets is not None else i / self.rate

    def _run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=self.linger_ms)
        try:
            self.started = time.monotonic()
            pending = []
            for i, (key, value) in enumerate(self.records):
                if self._stop.wait(max(0.0, self.started + self._offset(i) - time.monotonic())):
                    break
                sent_at = time.monotonic()
                future = producer.send(self.topic, key=key, value=value)
                if self.wait_acks:
                    future.get(timeout=30)
                else:
                    pending.append(future)
                self.sent.append(json.loads(value)["id"])
                self.sent_at.append(sent_at)
            for future in pending:
                future.get(timeout=30)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            producer.close()

    def stop(self) -> list[str]:
        """Stop producing; the ids sent."""
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise RuntimeError(f"the producer failed after {len(self.sent)} records") from self.error
        return self.sent
