"""`onlinespec submit`: produce prompt records from a JSONL file (or stdin); with --wait, print the answers.

Each non-empty line is sent as it is, so malformed lines reach the daemon and its DLQ like any other bad input;
the record key is the line's `id` when it has one. Topics that do not exist yet are created first (--partitions
each, the broker's default replication), so the daemon and --wait see them from their first record; where the
broker refuses, submit says so and goes on. A line the producer refuses (larger than kafka.max_request_size,
say) is reported with its line number and the other lines are still sent.

With --wait, completions (matched on the request-id header) are printed to stdout as JSON lines and rejections
(the DLQ's reason header) to stderr, until every sent line with an id has its answer or --timeout passes; a DLQ
or completions topic that appears only while waiting is read from its start. Last comes one summary line. Exit
0 when every line was sent (and, with --wait, answered), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from daemon.cli.errors import CommandError, first_line
from daemon.cli.options import add_config_option, add_kafka_options, settings_from_args
from daemon.cli.progress import Progress
from daemon.serving.kafka_io import HEADER_REASON, HEADER_REQUEST_ID

# Records older than this before the start of a submit are not ours even if their id matches (an earlier run).
CLOCK_SLACK_MS = 5_000
MAX_BOOTSTRAP_MS = 10_000  # how long to wait for a first broker: kafka.request_timeout_ms, at most this
TOPIC_CHECK_S = 1.0  # how often --wait looks for topics or partitions that appeared


def register(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="produce prompts from JSONL to the prompts topic")
    parser.add_argument("input", nargs="?", default="-", help="JSONL file, - for stdin (default)")
    add_config_option(parser)
    add_kafka_options(parser)
    parser.add_argument("--partitions", type=int, default=1, help="partitions of a topic submit creates (default 1)")
    parser.add_argument("--wait", action="store_true", help="wait for the completions and print them")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")
    parser.set_defaults(func=run)


@dataclass
class Tally:
    """What happened to every line: the summary line."""

    lines: int = 0
    sent: int = 0
    without_id: int = 0  # sent, but nothing can match an answer to them
    not_sent: list[str] = field(default_factory=list)  # "line N: why"
    completed: int = 0
    rejected: int = 0
    unanswered: int = 0

    def summary(self, waited: bool) -> str:
        parts = [f"{self.sent}/{self.lines} lines sent"]
        if self.not_sent:
            parts.append(
                f"{len(self.not_sent)} not sent ({'; '.join(self.not_sent[:3])}"
                f"{'; ...' if len(self.not_sent) > 3 else ''})"
            )
        if waited:
            parts.append(f"{self.completed} completed, {self.rejected} rejected, {self.unanswered} unanswered")
        if self.without_id:
            parts.append(f"{self.without_id} without an id (not tracked)")
        return ", ".join(parts)

    @property
    def ok(self) -> bool:
        return not self.not_sent and not self.unanswered


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    kafka = settings_from_args(args).kafka
    lines = read_lines(args.input)
    progress = Progress("submit: ", stderr)
    tally = Tally(lines=len(lines))
    topics = [kafka.prompts_topic] + ([kafka.completions_topic, kafka.dlq_topic] if args.wait else [])
    ensure_topics(kafka, topics, args.partitions, progress)
    watcher = Watcher(kafka) if args.wait else None  # positions fixed before anything is sent
    started_ms = int(time.time() * 1000)
    try:
        sent_ids = produce(kafka, lines, tally, progress)
        if watcher is not None:
            watcher.wait(sent_ids, started_ms - CLOCK_SLACK_MS, args.timeout, tally, progress, stdout)
    finally:
        if watcher is not None:
            watcher.close()
    progress.say(tally.summary(args.wait))
    return 0 if tally.ok else 1


def read_lines(source: str) -> list[str]:
    try:
        stream = sys.stdin if source == "-" else open(source, encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return [line.rstrip("\n") for line in stream if line.strip()]
    except UnicodeDecodeError as exc:
        raise CommandError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    finally:
        if stream is not sys.stdin:
            stream.close()


def bootstrap_ms(kafka) -> int:
    return min(kafka.request_timeout_ms, MAX_BOOTSTRAP_MS)


def client_options(kafka) -> dict:
    return {**kafka.client_options(), "bootstrap_timeout_ms": bootstrap_ms(kafka)}


def unreachable(kafka, exc: Exception) -> CommandError:
    from kafka.errors import KafkaTimeoutError

    if isinstance(exc, KafkaTimeoutError):  # kafka-python 3 raises it when no bootstrap server answers
        return CommandError(
            f"no Kafka broker answered at {kafka.bootstrap_servers} in {bootstrap_ms(kafka) / 1000:g} s"
        )
    return CommandError(f"Kafka at {kafka.bootstrap_servers}: {first_line(exc)}")


def ensure_topics(kafka, names: list[str], partitions: int, progress: Progress) -> None:
    """Create the topics that do not exist; a broker that refuses is reported, not fatal."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**client_options(kafka))
    except KafkaError as exc:
        raise unreachable(kafka, exc) from None
    try:
        existing = set(admin.list_topics())
        for name in dict.fromkeys(names):
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, -1)])  # -1: the broker's default replication
                progress.say(f"created topic {name} ({partitions} partition{'s' if partitions > 1 else ''})")
            except TopicAlreadyExistsError:
                pass  # created meanwhile (by a daemon's producer, say)
            except KafkaError as exc:
                progress.say(f"could not create topic {name}: {first_line(exc)}")
    finally:
        admin.close()


def produce(kafka, lines: list[str], tally: Tally, progress: Progress) -> set[str]:
    """Send every line; returns the ids of the lines the broker acknowledged."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError, MessageSizeTooLargeError

    try:
        producer = KafkaProducer(
            acks="all",
            max_request_size=kafka.max_request_size,
            max_block_ms=bootstrap_ms(kafka),
            **client_options(kafka),
        )
    except KafkaError as exc:
        raise unreachable(kafka, exc) from None
    in_flight = []  # (line number, id, future)
    try:
        for number, line in enumerate(lines, start=1):
            request_id = id_of(line)
            try:
                future = producer.send(kafka.prompts_topic, value=line.encode(), key=request_id and request_id.encode())
            except MessageSizeTooLargeError:
                tally.not_sent.append(
                    f"line {number}: {len(line.encode())} bytes, over kafka.max_request_size {kafka.max_request_size}"
                )
                continue
            except KafkaError as exc:  # refused before sending: no metadata for the topic, ...
                tally.not_sent.append(f"line {number}: {first_line(exc)}")
                continue
            in_flight.append((number, request_id, future))
            progress.update(f"sending {number}/{len(lines)}")
        producer.flush()
        acked = set()
        for number, request_id, future in in_flight:
            try:
                future.get(timeout=kafka.produce_timeout_s)
            except KafkaError as exc:
                tally.not_sent.append(f"line {number}: {first_line(exc)}")
                continue
            tally.sent += 1
            if request_id is None:
                tally.without_id += 1
            else:
                acked.add(request_id)
    finally:
        producer.close()
    progress.say(f"sent {tally.sent}/{tally.lines} lines to {kafka.prompts_topic}")
    return acked


class Watcher:
    """Reads completions and DLQ records from where they end now; partitions that appear later from their start."""

    def __init__(self, kafka):
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        try:
            self.consumer = KafkaConsumer(enable_auto_commit=False, **client_options(kafka))
        except KafkaError as exc:
            raise unreachable(kafka, exc) from None
        self.topics = (kafka.completions_topic, kafka.dlq_topic)
        self.dlq_topic = kafka.dlq_topic
        self.assigned: set = set()
        self._watch_new_partitions(from_start=False)
        self._next_check = time.monotonic() + TOPIC_CHECK_S

    def _watch_new_partitions(self, from_start: bool) -> None:
        from kafka import TopicPartition

        found = {TopicPartition(topic, p) for topic in self.topics for p in self.consumer.partitions_for_topic(topic)}
        new = found - self.assigned
        if not new:
            return
        self.assigned |= new
        self.consumer.assign(sorted(self.assigned))
        if from_start:  # it did not exist when we started: all it holds came after
            self.consumer.seek_to_beginning(*new)
        else:
            self.consumer.seek_to_end(*new)
        for tp in new:
            self.consumer.position(tp)  # resolve now, before our prompts can be answered

    def wait(
        self, pending: set[str], since_ms: int, timeout: float, tally: Tally, progress: Progress, stdout: TextIO
    ) -> None:
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            if time.monotonic() >= self._next_check:
                self._watch_new_partitions(from_start=True)
                self._next_check = time.monotonic() + TOPIC_CHECK_S
            records = self.consumer.poll(timeout_ms=200) if self.assigned else {}
            if not self.assigned:
                time.sleep(0.2)  # nothing to read until a topic appears; poll() refuses an empty assignment
            for tp, batch in records.items():
                for record in batch:
                    self._answer(tp.topic, record, pending, since_ms, tally, progress, stdout)
            progress.update(f"completed {tally.completed}, rejected {tally.rejected}, waiting for {len(pending)}")
        tally.unanswered = len(pending)
        if pending:
            progress.say(
                f"timed out after {timeout:g} s; no answer for {', '.join(sorted(pending)[:5])}"
                f"{' ...' if len(pending) > 5 else ''}"
            )

    def _answer(self, topic, record, pending, since_ms, tally, progress, stdout) -> None:
        headers = {k: v.decode(errors="replace") for k, v in record.headers or []}
        request_id = headers.get(HEADER_REQUEST_ID)
        if request_id not in pending or record.timestamp < since_ms:
            return
        pending.discard(request_id)
        if topic == self.dlq_topic:
            tally.rejected += 1
            progress.say(f"rejected {request_id}: {headers.get(HEADER_REASON)}")
        else:
            tally.completed += 1
            progress.clear()
            print(record.value.decode(), file=stdout, flush=True)

    def close(self) -> None:
        self.consumer.close()


def id_of(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
