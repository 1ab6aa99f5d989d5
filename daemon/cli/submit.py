"""`onlinespec submit`: produce prompt records from a JSONL file (or stdin); with --wait, print the completions.

Each non-empty line is sent as is, so malformed lines reach the daemon and its DLQ like any other bad input;
the record key is the line's `id` when it has one. With --wait, completions (matched on the request-id header)
are printed to stdout as JSON lines and DLQ reasons to stderr; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from daemon.cli.options import add_config_option, add_kafka_options, settings_from_args
from daemon.config import ConfigError
from daemon.serving.kafka_io import HEADER_REASON, HEADER_REQUEST_ID

# Records older than this before the start of a submit are not ours even if their id matches (an earlier run).
CLOCK_SLACK_MS = 5_000


def register(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="produce prompts from JSONL to the prompts topic")
    parser.add_argument("input", nargs="?", default="-", help="JSONL file, - for stdin (default)")
    add_config_option(parser)
    add_kafka_options(parser)
    parser.add_argument("--wait", action="store_true", help="wait for the completions and print them")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    from kafka import KafkaProducer

    try:
        kafka = settings_from_args(args).kafka
    except ConfigError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    lines = _read_lines(args.input)
    ids = [_id_of(line) for line in lines]
    watcher = _Watcher(kafka) if args.wait else None
    started_ms = int(time.time() * 1000)

    producer = KafkaProducer(acks="all", max_request_size=kafka.max_request_size, **kafka.client_options())
    try:
        futures = []
        for number, (line, request_id) in enumerate(zip(lines, ids), start=1):
            key = request_id.encode() if request_id else None
            futures.append(producer.send(kafka.prompts_topic, value=line.encode(), key=key))
            if number % 100 == 0 or number == len(lines):
                _progress(stderr, f"submitted {number}/{len(lines)}")
        producer.flush()
        for future in futures:
            future.get(timeout=kafka.produce_timeout_s)
    finally:
        producer.close()
    _progress(stderr, f"submitted {len(lines)} records to {kafka.prompts_topic}", final=True)
    if watcher is None:
        return 0
    try:
        return watcher.wait({i for i in ids if i}, started_ms - CLOCK_SLACK_MS, args.timeout, stdout, stderr)
    finally:
        watcher.close()


class _Watcher:
    """Reads completions and DLQ records from their current end (positions fixed before anything is sent)."""

    def __init__(self, kafka):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(enable_auto_commit=False, **kafka.client_options())
        self.dlq_topic = kafka.dlq_topic
        partitions = []
        for topic in (kafka.completions_topic, kafka.dlq_topic):
            for partition in sorted(self.consumer.partitions_for_topic(topic) or ()):
                partitions.append(TopicPartition(topic, partition))
        self.consumer.assign(partitions)
        self.consumer.seek_to_end(*partitions)
        for tp in partitions:
            self.consumer.position(tp)  # resolve now, before our prompts can be answered

    def wait(self, pending: set[str], since_ms: int, timeout: float, stdout: TextIO, stderr: TextIO) -> int:
        total, completed, rejected = len(pending), 0, 0
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers or []}
                    request_id = headers.get(HEADER_REQUEST_ID)
                    if request_id not in pending or record.timestamp < since_ms:
                        continue
                    pending.discard(request_id)
                    if tp.topic == self.dlq_topic:
                        rejected += 1
                        print(f"rejected {request_id}: {headers.get(HEADER_REASON)}", file=stderr)
                    else:
                        completed += 1
                        print(record.value.decode(), file=stdout, flush=True)
            _progress(stderr, f"completed {completed}/{total}, rejected {rejected}")
        _progress(stderr, f"completed {completed}/{total}, rejected {rejected}", final=True)
        if pending:
            print(f"timed out after {timeout:g} s; {len(pending)} without an answer", file=stderr)
            return 1
        return 0

    def close(self) -> None:
        self.consumer.close()


def _read_lines(source: str) -> list[str]:
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8")
    try:
        return [line.rstrip("\n") for line in stream if line.strip()]
    finally:
        if stream is not sys.stdin:
            stream.close()


def _id_of(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None


def _progress(stderr: TextIO, text: str, final: bool = False) -> None:
    """A line rewritten in place on a terminal; elsewhere only the final lines, to keep logs readable."""
    if stderr.isatty():
        print(f"\r{text}\033[K", end="\n" if final else "", file=stderr, flush=True)
    elif final:
        print(text, file=stderr, flush=True)
