"""Scale-out benchmark: N daemons (one per GPU) in one consumer group, on one PostgreSQL database, one learner.

Starts one Tansu broker with a prompts topic of 2N partitions (--partitions), a fresh database on the PostgreSQL
server of --database-url (`scaleout_<uuid>`, dropped afterwards unless --keep-database), N `onlinespec serve`
processes `daemon-i` (CUDA_VISIBLE_DEVICES=i, as deploy/onlinespec@.service sets it; none with --device cpu),
learning enabled on every one of them, and a producer at a fixed offered load (--rate prompts/s for --duration s)
from prompt files (bench/data/*.jsonl). Each daemon names itself in its database URL (application_name), so
pg_locks, sampled every 50 ms, tells which one holds the learner lock. It reports:

    throughput      completion tokens/s per daemon and in total, from the first prompt produced to the last
                    completion read (per daemon: the tokens its log says it served)
    learner         rounds per daemon, lock samples per holder, rounds overlapping in time, rounds during which
                    another daemon held the lock, feedback rows a consumed window passed over
    promotions      every move of the active draft and, per daemon, how long until its follower had the new
                    version ready (follow_s), swapped it in (swap_s) and stored its first batch of it (first_batch_s),
                    and how many batches it stored with the old one after the move and after it was ready
                    (devtools.fleet.follow_figures)
    rebalances      per daemon, its log's `partitions assigned` lines (one per consumer-group rebalance)
    exactly once    completion rows per id, ids lost, duplicates, copies on the topic not byte for byte as stored

With --failover the daemon holding the learner lock is SIGKILLed mid-round (the first round in progress after
--failover-after seconds of load) and the takeover is timed: lock released, its partitions owned by the survivors,
a survivor's next round finished.

    python -m bench.scale_out --tiny --device cpu --daemons 2 --rate 6 --duration 40 --max-new-tokens 32 \
        --prompt-file bench/data/text_to_sql.jsonl --round-tokens 1000 --failover --out /tmp/scale-cpu.json
    python -m bench.scale_out --target T --draft D --daemons 2 --rate 16 --duration 300 --failover \\
        --round-tokens 8000 --out scale-2.json     # 2 GPUs
    python -m bench.scale_out --target T --draft D --daemons 1 --rate 8 --duration 300 --round-tokens 8000 \\
        --out scale-1.json                         # one daemon at the same per-daemon load

Prints a short table and one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench.daemon_load import REPO, daemon_config, learning_config, load_prompt_values, machine, scrape_stages
from devtools.fleet import (
    Fleet,
    LockWatch,
    PacedProducer,
    delivery_figures,
    follow_figures,
    header,
    learner_figures,
    learner_mid_round,
    takeover_done,
    takeover_figures,
)

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# --tiny: a learner that moves the tiny random draft within a round of a few seconds, so promotions happen
FAILOVER_WAIT_S = 120  # after the load was served, for a failover (a round to kill, the takeover) to happen
TINY_LEARNER = {"lr": 1e-2, "trainable": "all", "epochs": 4, "batch_size": 4}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemons", type=int, default=2, help="daemons, one per GPU (default 2)")
    parser.add_argument("--partitions", type=int, help="prompts topic partitions (default 2 per daemon)")
    parser.add_argument("--tiny", action="store_true", help="tiny random target and draft (devtools/tiny_models.py)")
    parser.add_argument("--target", help="target model (required without --tiny)")
    parser.add_argument("--draft", help="draft model (required without --tiny: learning trains it)")
    parser.add_argument("--device", default="cuda", help="cuda (each daemon sees its own GPU as cuda:0) or cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--database-url", default=DEFAULT_SERVER, help="a PostgreSQL server (any database on it)")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the run's database")
    parser.add_argument("--rate", type=float, default=8.0, help="offered load, prompts per second (all daemons)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of offered load")
    parser.add_argument("--prompt-file", nargs="+", default=[str(REPO / "bench/data/humaneval.jsonl")])
    parser.add_argument("--chat", action="store_true", help="send prompts as chat `messages`")
    parser.add_argument("--prompt-chars", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--proposer", default="draft", help="engine.proposer (default draft: what learning trains)")
    parser.add_argument("--learner", default="online")
    parser.add_argument("--round-tokens", type=int, default=2000, help="new feedback tokens that start a round")
    parser.add_argument(
        "--promote-margin", type=float, help="learning.promote_margin (default 0.02; --tiny: 0, so promotions happen)"
    )
    parser.add_argument("--failover", action="store_true", help="SIGKILL the lock holder mid-round")
    parser.add_argument("--failover-after", type=float, help="seconds of load before the kill (default duration/2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per daemon (OMP_NUM_THREADS)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the daemons to start")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args(argv)
    if not args.tiny and not (args.target and args.draft):
        parser.error("give --target and --draft, or --tiny")
    if args.failover and args.daemons < 2:
        parser.error("--failover needs a survivor: --daemons 2 or more")
    args.partitions = args.partitions or 2 * args.daemons
    if args.promote_margin is None:
        args.promote_margin = 0.0 if args.tiny else 0.02
    return args


class Database:
    """A fresh database on the server of `server_url`, migrated to head; drop() removes it with its connections."""

    def __init__(self, server_url: str):
        from sqlalchemy import create_engine, make_url, text

        from storage.migrate import upgrade_to_head

        self.name = f"scaleout_{uuid.uuid4().hex[:12]}"
        server = make_url(server_url)
        self.admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        upgrade_to_head(self.url)

    def drop(self) -> None:
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class Failover:
    """Kills the learner mid-round once `after_s` seconds of load passed, then watches the takeover."""

    def __init__(self, fleet: Fleet, watch: LockWatch, partitions: int, after_s: float):
        self.fleet, self.watch, self.partitions, self.after_s = fleet, watch, partitions, after_s
        self.victim: str | None = None
        self.round: int | None = None
        self.killed_at: float | None = None  # epoch seconds
        self.at_s: float | None = None  # seconds of load
        self._done = False  # the takeover finished (it stays finished: no need to read the logs again)

    def step(self, elapsed: float) -> None:
        """From the main loop: the kill, as soon as a round is in progress after after_s."""
        if self.victim is None and elapsed >= self.after_s:
            found = learner_mid_round(self.fleet, self.watch)
            if found:
                self.victim, self.round = found
                self.killed_at, self.at_s = time.time(), elapsed
                self.fleet.daemons[self.victim].kill()

    def figures(self) -> dict:
        if self.victim is None:
            return {"victim": None}
        takeover = takeover_figures(
            self.fleet.database_url, self.fleet.logs(), self.watch.samples, self.victim, self.killed_at, self.partitions
        )
        return {"victim": self.victim, "interrupted_round": self.round, "at_s": round(self.at_s, 1), **takeover}

    @property
    def done(self) -> bool:
        if not self._done:
            self._done = self.victim is not None and takeover_done(self.figures()) is not None
        return self._done


def run(args, workdir: Path, database: Database) -> dict:
    from kafka import KafkaConsumer, TopicPartition

    from devtools.local_broker import TansuBroker, free_port, fresh_names

    if args.tiny:
        from devtools.tiny_models import make_tiny_pair

        target, draft = (str(path) for path in make_tiny_pair(workdir / "models"))
    else:
        target, draft = args.target, args.draft
    broker = TansuBroker(workdir)
    broker.start()
    fleet = watch = producer = None
    try:
        names = fresh_names(broker)
        broker.create_topics(names.prompts, partitions=args.partitions)
        broker.create_topics(names.completions, names.dlq)
        config = daemon_config(args, names, database.url, target, draft, args.proposer, 0)
        config["learning"] = {
            **learning_config(args, workdir),
            "promote_margin": args.promote_margin,
            "follow_interval_ms": 0,  # follow the pointer as fast as the follower goes (every 50 ms)
        }
        if args.tiny:
            config["learning"].update(
                learner={"name": args.learner, **TINY_LEARNER}, heldout_rows=8, min_heldout_tokens=100
            )
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        ports = [free_port() for _ in range(args.daemons)]
        fleet = Fleet(
            config_path,
            workdir,
            database.url,
            args.daemons,
            extra_args=lambda i: ("--metrics-port", str(ports[i])),
            env=lambda i: {
                "OMP_NUM_THREADS": str(args.threads),
                **({} if args.device == "cpu" else {"CUDA_VISIBLE_DEVICES": str(i)}),
            },
        )
        started = time.monotonic()
        fleet.start().wait_ready(args.partitions, timeout=args.ready_timeout)
        ready_s = time.monotonic() - started
        print(f"{args.daemons} daemons ready in {ready_s:.1f} s", file=sys.stderr)

        watch = LockWatch(database.url).start()
        reader = KafkaConsumer(bootstrap_servers=names.bootstrap, enable_auto_commit=False)
        reader.assign([TopicPartition(names.completions, 0), TopicPartition(names.dlq, 0)])
        reader.seek_to_beginning()
        values = load_prompt_values(args, int(args.rate * args.duration))
        records = [(json.loads(v)["id"].encode(), v) for v in values]
        failover = Failover(fleet, watch, args.partitions, args.failover_after or args.duration / 2)
        completions, dead = [], []
        producer = PacedProducer(names.bootstrap, names.prompts, records, args.rate).start()
        load_started, load_started_at = time.monotonic(), time.time()
        last_arrival = load_started
        deadline = load_started + args.duration + 600
        all_answered = None  # when every prompt sent was answered: the failover gets FAILOVER_WAIT_S more at most
        answered = set()
        while time.monotonic() < deadline:
            for tp, batch in reader.poll(timeout_ms=200).items():
                (dead if tp.topic == names.dlq else completions).extend(batch)
                answered.update(header(r, "request-id") for r in batch)
                last_arrival = time.monotonic()
            failover_done = args.failover and failover.done  # read once a pass: it reads every log and the DB
            if args.failover and not failover_done:
                failover.step(time.monotonic() - load_started)
            if all_answered is None and len(producer.sent) == len(records) and answered.issuperset(producer.sent):
                all_answered = time.monotonic()
            if all_answered is not None and (
                not args.failover or failover_done or time.monotonic() > all_answered + FAILOVER_WAIT_S
            ):
                break
        span = last_arrival - load_started
        stages = {}
        for (label, daemon), port in zip(fleet.daemons.items(), ports):
            if daemon.alive:
                stages[label] = scrape_stages(port)
        sent = producer.stop()
        producer = None
        reader.close()
        exit_codes = fleet.stop()
        watch.stop()
        timing = {"ready_s": ready_s, "span": span, "load_started_at": load_started_at}
        return report(args, fleet, watch, database.url, sent, completions, dead, timing, stages, exit_codes) | {
            "failover": failover.figures() if args.failover else None
        }
    finally:
        if producer is not None:
            producer.stop()
        if fleet is not None:
            fleet.stop()
        if watch is not None:
            watch.stop()
        broker.stop()


def report(args, fleet, watch, database_url, sent, completions, dead, timing, stages, exit_codes) -> dict:
    """tok_s of a daemon is over the whole run (first prompt produced to last completion read), like the total;
    served_s says until when it served (a killed daemon stops early)."""
    span = timing["span"]
    logs = fleet.logs()
    learner = learner_figures(database_url, logs, watch.samples)
    ids = set(sent)
    tokens = {label: sum(s.tokens for s in log.served if s.request_id in ids) for label, log in logs.items()}
    per_daemon = {
        label: {
            "tokens": tokens[label],
            "tok_s": round(tokens[label] / span, 1),
            "served_s": round(log.served[-1].at - timing["load_started_at"], 1) if log.served else None,
            "requests": len(log.served),
            "rounds": learner["rounds_by_daemon"].get(label, 0),
            "lock_samples_held": learner["lock_samples_held"].get(label, 0),
            "rebalances": log.rebalances,
            "exit_code": exit_codes[label],
            **({"stages": stages[label]} if label in stages else {}),
        }
        for label, log in logs.items()
    }
    topic_tokens = sum(json.loads(r.value)["usage"]["completion_tokens"] for r in completions)
    return {
        "ready_s": round(timing["ready_s"], 1),
        "offered_prompts_s": args.rate,
        "sent": len(sent),
        "dead_lettered": len(dead),
        "seconds": round(span, 2),
        "total_tok_s": round(sum(tokens.values()) / span, 1),
        "completion_topic_tok_s": round(topic_tokens / span, 1),
        "daemons": per_daemon,
        "learner": learner,
        "promotions": follow_figures(database_url, logs),
        "exactly_once": delivery_figures(database_url, sent, completions),
    }


def table(result: dict) -> str:
    lines = [
        f"{'daemon':<10} {'tokens':>8} {'tok/s':>8} {'requests':>9} {'served_s':>9} {'rounds':>7} {'rebalances':>11}"
    ]
    for label, d in result["daemons"].items():
        lines.append(
            f"{label:<10} {d['tokens']:>8} {d['tok_s']:>8} {d['requests']:>9} {d['served_s']!s:>9} {d['rounds']:>7} "
            f"{d['rebalances']:>11}"
        )
    total = sum(d["tokens"] for d in result["daemons"].values())
    lines.append(
        f"{'total':<10} {total:>8} {result['total_tok_s']:>8}   ({result['seconds']} s, offered "
        f"{result['offered_prompts_s']} prompts/s)"
    )
    learner = result["learner"]
    lines.append(
        f"learner: lock samples held {learner['lock_samples_held']}, overlapping rounds "
        f"{learner['overlapping_rounds']}, rounds with the lock held by another "
        f"{learner['rounds_with_lock_held_by_another']}, feedback rows passed over "
        f"{learner['feedback_rows_passed_over']}"
    )
    for move in result["promotions"]:
        seen = "; ".join(
            f"{label} ready {d['follow_s']} s, swapped {d['swap_s']} s, first batch {d['first_batch_s']} s, "
            f"old batches {d['stale_batches']} ({d['stale_after_ready']} after ready)"
            for label, d in move["daemons"].items()
            if d["batches"] or d["swap_s"] is not None
        )
        lines.append(f"{move['kind']} {move['version']}: {seen or 'no daemon served after it'}")
    if result.get("failover"):
        f = result["failover"]
        lines.append(
            f"failover: SIGKILL {f.get('victim')} in round {f.get('interrupted_round')} at +{f.get('at_s')} s; lock "
            f"released in {f.get('lock_released_s')} s, partitions moved in {f.get('partitions_moved_s')} s, "
            f"{f.get('next_round_by')} finished round {f.get('next_round')} {f.get('next_round_s')} s after the kill"
        )
    e = result["exactly_once"]
    lines.append(
        f"exactly once: {e['ids']} ids, {e['completion_rows']} completion rows, {e['lost']} lost, "
        f"{e['duplicates_in_db']} duplicates, {e['copies_not_as_stored']} copies not as stored, "
        f"{e['resent_copies']} resent copies"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    database = Database(args.database_url)
    try:
        with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
            result = run(args, Path(tmp), database)
    finally:
        if not args.keep_database:
            database.drop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python -m bench.scale_out " + " ".join(sys.argv[1:] if argv is None else argv),
        "setup": {
            "daemons": args.daemons,
            "partitions": args.partitions,
            "models": "tiny random Qwen2 pair" if args.tiny else {"target": args.target, "draft": args.draft},
            "device": args.device,
            "prompt_files": [Path(f).name for f in args.prompt_file],
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "k": args.k,
            "proposer": args.proposer,
            "learner": args.learner,
            "round_tokens": args.round_tokens,
            "threads": args.threads,
            "database": database.name + (" (kept)" if args.keep_database else " (dropped)"),
        },
        **result,
    }
    print(table(result))
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if not args.out else f"written to {args.out}")
    exit_clean = all(d["exit_code"] in (0, None) for d in result["daemons"].values())
    return 0 if exit_clean and result["exactly_once"]["lost"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
