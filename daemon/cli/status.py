"""`onlinespec status [--json]`: what an operator checks first, in one look.

    kafka     the broker answers; per partition of the prompts topic: the group's committed offset, the high
              watermark and the lag between them (the records the group has not finished yet)
    database  it answers, its schema revision and whether that is the head this code needs
    draft     the deployment's active version, the configured proposer, and the active version's live acceptance
              (every completion stamped with it: requests, AvgLen, accepted / drafted)
    learning  the deployment's last round: decision, why, when

Each part is checked on its own, so an unreachable broker does not hide the database. Nothing is created: not a
topic, not a database file, not a consumer-group member (offsets are read with OffsetFetch, without joining).
The high watermark comes from a fetch (consumer.highwater, as the daemon's lag metric does), not from
end_offsets(), which counts record batches instead of records on some brokers. Exit 0 when the broker answers
and the schema is at head, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from daemon.cli.errors import first_line
from daemon.cli.options import add_deployment_options, add_kafka_options, settings_from_args

KAFKA_TIMEOUT_MS = 5_000


def register(subparsers) -> None:
    parser = subparsers.add_parser("status", help="broker, consumer lag, schema, active draft, last round")
    add_deployment_options(parser)
    add_kafka_options(parser, topics=("prompts",), group=True)
    parser.set_defaults(func=run)


@dataclass
class PartitionLag:
    partition: int
    committed: int | None  # None: the group never committed here
    high_watermark: int
    lag: int  # records after the committed offset (after the start offset when nothing was committed)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    deployment = args.deployment or settings.learning.deployment
    report = {
        "kafka": kafka_status(settings.kafka),
        "database": database_status(settings.database.url.get_secret_value()),
    }
    report.update(draft_and_learning(settings, deployment, report["database"]))
    report["ok"] = bool(report["kafka"]["reachable"] and report["database"]["at_head"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


# ---------------------------------------------------------------------------------------------- kafka


def kafka_status(kafka) -> dict[str, Any]:
    status: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "reachable": False,
        "error": None,
        "topic": kafka.prompts_topic,
        "group_id": kafka.group_id,
        "partitions": [],
        "total_lag": None,
    }
    try:
        partitions = consumer_lag(kafka)
    except Exception as exc:  # any broker failure is a status to report, not a crash
        status["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        return status
    status["reachable"] = True
    if partitions is None:
        status["error"] = f"topic {kafka.prompts_topic} does not exist"
        return status
    status["partitions"] = [asdict(p) for p in partitions]
    status["total_lag"] = sum(p.lag for p in partitions)
    return status


def consumer_lag(kafka) -> list[PartitionLag] | None:
    """Lag of the group on every partition of the prompts topic; None when the topic does not exist."""
    from kafka import KafkaConsumer, TopicPartition

    options = {
        **kafka.client_options(),
        "request_timeout_ms": KAFKA_TIMEOUT_MS,
        "bootstrap_timeout_ms": KAFKA_TIMEOUT_MS,
    }
    consumer = KafkaConsumer(
        group_id=kafka.group_id,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=1024,
        **options,
    )
    try:
        # The cluster's topic list (all-topics metadata): asking for one topic by name may auto-create it.
        if kafka.prompts_topic not in consumer.topics():
            return None
        tps = [
            TopicPartition(kafka.prompts_topic, p) for p in sorted(consumer.partitions_for_topic(kafka.prompts_topic))
        ]
        consumer.assign(tps)
        committed = {tp: consumer.committed(tp, timeout_ms=KAFKA_TIMEOUT_MS) for tp in tps}
        starts = consumer.beginning_offsets(tps, timeout_ms=KAFKA_TIMEOUT_MS)
        for tp in tps:
            consumer.seek(tp, committed[tp] if committed[tp] is not None else starts[tp])
        highwater = _high_watermarks(consumer, tps)
        return [
            PartitionLag(
                tp.partition,
                committed[tp],
                highwater[tp],
                max(0, highwater[tp] - (committed[tp] if committed[tp] is not None else starts[tp])),
            )
            for tp in tps
        ]
    finally:
        consumer.close(autocommit=False)


def _high_watermarks(consumer, tps) -> dict:
    """Each partition's high watermark, known once a fetch response for it came back."""
    deadline = time.monotonic() + KAFKA_TIMEOUT_MS / 1000
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [tp.partition for tp in tps if consumer.highwater(tp) is None]
            raise TimeoutError(f"no fetch response for partitions {missing} in {KAFKA_TIMEOUT_MS} ms")
        consumer.poll(timeout_ms=100, max_records=1, update_offsets=False)
    return {tp: consumer.highwater(tp) for tp in tps}


# ---------------------------------------------------------------------------------------------- database


def database_status(url: str) -> dict[str, Any]:
    from storage.db import display_url
    from storage.migrate import current_revision, head_revision

    status: dict[str, Any] = {
        "url": display_url(url),
        "reachable": False,
        "revision": None,
        "head": head_revision(),
        "at_head": False,
        "error": None,
    }
    try:
        status["revision"] = current_revision(url, must_exist=True)
    except Exception as exc:  # a bad URL, a missing file, a server that is down: reported, not raised
        status["error"] = first_line(exc)
        return status
    status["reachable"] = True
    status["at_head"] = status["revision"] == status["head"]
    if not status["at_head"]:
        status["error"] = f"schema {status['revision'] or 'empty'}, this code needs {status['head']}"
    return status


def draft_and_learning(settings, deployment: str, database: dict[str, Any]) -> dict[str, Any]:
    """The active draft with its live acceptance and the last learning round (None without a usable database)."""
    draft: dict[str, Any] = {
        "deployment": deployment,
        "proposer": settings.engine.proposer,
        "active_version": None,
        "active_checkpoint_id": None,
        "live": None,
    }
    if not database["at_head"]:
        return {"draft": draft, "last_round": None}

    from daemon.learning.draft_follower import BASE_DRAFT_VERSION
    from storage.checkpoints_repo import get_active_pointer, get_checkpoint, live_counters
    from storage.db import make_engine, make_session_factory
    from storage.rounds_repo import list_rounds

    engine = make_engine(settings.database.url.get_secret_value(), must_exist=True)
    try:
        with make_session_factory(engine)() as session:
            pointer = get_active_pointer(session, deployment)
            active_id = None if pointer is None else pointer.checkpoint_id
            version = BASE_DRAFT_VERSION if active_id is None else get_checkpoint(session, active_id).version
            live = live_counters(session, version)
            rounds = list_rounds(session, deployment=deployment, limit=1)
            last_round = round_summary(session, rounds[0]) if rounds else None
    finally:
        engine.dispose()
    draft.update(
        active_version=version,
        active_checkpoint_id=active_id,
        live={
            "requests": live.requests,
            "avg_len": round(live.mean_accepted_length, 4),
            "acceptance_rate": round(live.acceptance_rate, 4),
            "drafted": live.drafted,
            "accepted": live.accepted,
        },
    )
    return {"draft": draft, "last_round": last_round}


def round_summary(session, row) -> dict[str, Any]:
    from storage.checkpoints_repo import get_checkpoint

    candidate = None if row.candidate_checkpoint_id is None else get_checkpoint(session, row.candidate_checkpoint_id)
    return {
        "id": row.id,
        "decision": row.decision or "running",
        "reason": (row.candidate_metrics or {}).get("reason"),
        "error": row.error,
        "candidate_version": None if candidate is None else candidate.version,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


# ---------------------------------------------------------------------------------------------- output


def print_report(report: dict[str, Any]) -> None:
    kafka, database, draft, last = report["kafka"], report["database"], report["draft"], report["last_round"]
    if kafka["reachable"] and kafka["error"] is None:
        lags = ", ".join(
            f"{p['partition']}: {p['lag']} (committed {p['committed']}, end {p['high_watermark']})"
            for p in kafka["partitions"]
        )
        print(
            f"kafka     {kafka['bootstrap_servers']}: lag {kafka['total_lag']} on {kafka['topic']} for group "
            f"{kafka['group_id']} [{lags}]"
        )
    else:
        print(f"kafka     {kafka['bootstrap_servers']}: {kafka['error']}")
    note = "(head)" if database["at_head"] else f"({database['error']})"
    print(f"database  {database['url']}: {database['revision'] or '-'} {note}")
    live = draft["live"]
    shown = (
        "-"
        if live is None
        else (
            f"live AvgLen {live['avg_len']:.3f} over {live['requests']} requests, "
            f"{live['accepted']}/{live['drafted']} draft tokens accepted"
        )
    )
    print(
        f"draft     deployment {draft['deployment']}: active {draft['active_version'] or '-'}, proposer "
        f"{draft['proposer']}; {shown}"
    )
    if last is None:
        print("learning  no round yet")
    else:
        why = last["error"] or last["reason"] or ""
        print(
            f"learning  round {last['id']} {last['decision']} at {(last['finished_at'] or last['started_at'])[:19]}"
            f"{': ' + why if why else ''}"
        )
