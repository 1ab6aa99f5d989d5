"""Feedback write benchmark: the worker's two transactions per batch, on SQLite or PostgreSQL.

    python -m bench.feedback_writes --database-url sqlite:////tmp/bench.db --requests 10000 --tokens 128 --topk 16
    createdb -h 127.0.0.1 -U postgres bench && \
    python -m bench.feedback_writes --database-url postgresql://postgres@127.0.0.1/bench --requests 10000 ...

Per batch, as the daemon does it: (1) record_requests_received + find_completions, commit; (2) store_results
(completion + packed feedback + status for every request), commit. Synthetic results are built before the clock
starts, so the numbers are storage only: packing, SQL, commit (fsync). Then the learner's read path: every
feedback row back through feedback_since in pages of 1000, unpacked to numpy.

Reports requests/s (each = 3 rows: request, completion, feedback), emitted tokens/s, payload bytes per token
(packed arrays) and on-disk bytes per token (growth of the database, indexes and TOAST included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from pipelines.types import (
    KIND_ACCEPTED,
    KIND_BONUS,
    KIND_RECOVERED,
    NO_DRAFT_TOKEN,
    GenerationResult,
    RequestCounters,
    RequestFeedback,
)
from storage.db import make_engine, make_session_factory, masked, resolve_database_url
from storage.feedback_repo import feedback_since, recent_feedback
from storage.migrate import upgrade_to_head
from storage.packing import FEEDBACK_DTYPES
from storage.requests_repo import (
    CompletedRequest,
    ReceivedRequest,
    find_completions,
    record_requests_received,
    store_results,
)

VOCAB = 151_936  # Qwen2 vocabulary: ids need all 32 bits' worth of range in the packed int32s
ACCEPT_PROBABILITY = 0.7
K = 5


def synthetic_result(request_id: str, prompt_tokens: int, tokens: int, topk: int, rng) -> GenerationResult:
    """Shaped like the engine's output: steps of up to K accepted tokens, then a recovered or bonus token."""
    kinds = np.empty(tokens, dtype=np.uint8)
    i = forwards = accepted = drafted = 0
    while i < tokens:
        run = min(int(rng.geometric(1 - ACCEPT_PROBABILITY)) - 1, K, tokens - i)
        kinds[i : i + run] = KIND_ACCEPTED
        i += run
        accepted += run
        forwards += 1
        drafted += K
        if i < tokens:
            kinds[i] = KIND_BONUS if run == K else KIND_RECOVERED
            i += 1
    token_ids = rng.integers(0, VOCAB, tokens, dtype=np.int32)
    draft_tokens = np.where(kinds == KIND_BONUS, NO_DRAFT_TOKEN, token_ids).astype(np.int32)
    logprobs = np.sort(-rng.exponential(2.0, (tokens, topk)), axis=1)[:, ::-1].astype(np.float16)
    feedback = RequestFeedback(
        prompt_ids=rng.integers(0, VOCAB, prompt_tokens, dtype=np.int32),
        token_ids=token_ids,
        kinds=kinds,
        draft_tokens=draft_tokens,
        target_topk_ids=rng.integers(0, VOCAB, (tokens, topk), dtype=np.int32),
        target_topk_logprobs=logprobs,
        draft_version="bench-v1",
    )
    counters = RequestCounters(
        draft_steps=forwards,
        drafted=drafted,
        accepted=accepted,
        target_forwards=forwards,
        emitted=tokens,
        accepted_at_position=[0] * K,
    )
    return GenerationResult(
        id=request_id,
        token_ids=token_ids.tolist(),
        text="x" * (4 * tokens),
        finish_reason="length",
        counters=counters,
        feedback=feedback,
        seconds=1.0,
    )


def database_bytes(engine) -> dict[str, int]:
    """Size of the whole database and of the feedback table with its indexes (and TOAST on PostgreSQL)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # count pages, not WAL frames
            feedback = connection.exec_driver_sql(
                "SELECT sum(d.pgsize) FROM dbstat d JOIN sqlite_schema s ON s.name = d.name "
                "WHERE s.tbl_name = 'feedback'"
            ).scalar()
            return {"database": Path(engine.url.database).stat().st_size, "feedback": feedback or 0}
        return {
            "database": connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar(),
            "feedback": connection.exec_driver_sql("SELECT pg_total_relation_size('feedback')").scalar(),
        }


def make_items(run: str, offsets: range, prompt_tokens: int, tokens: int, topk: int, rng):
    """(Kafka offset, CompletedRequest) pairs with the output message already serialized, as the worker has them."""
    items = []
    for offset in offsets:
        result = synthetic_result(f"{run}-{offset}", prompt_tokens, tokens, topk, rng)
        items.append((offset, CompletedRequest(result, json.dumps({"id": result.id, "text": result.text}))))
    return items


def write_batches(session_factory, batches, topic) -> None:
    for batch in batches:
        received = [
            ReceivedRequest(item.result.id, topic, 0, offset, {"max_new_tokens": 128}, 64) for offset, item in batch
        ]
        with session_factory.begin() as session:
            admitted = record_requests_received(session, received)
            find_completions(session, [rid for rid, (_, new) in admitted.requests.items() if not new])
        with session_factory.begin() as session:
            store_results(session, [item for _, item in batch], target_identity="bench-target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: $ONLINESPEC_DATABASE_URL or sqlite:///var/onlinespec.db")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=128, help="emitted tokens per request")
    parser.add_argument("--topk", type=int, default=16, help="target log-probs kept per position")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per transaction (daemon default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()

    url = resolve_database_url(args.database_url)
    upgrade_to_head(url)
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    rng = np.random.default_rng(args.seed)
    run = uuid.uuid4().hex[:8]
    topic = f"bench-{run}"
    items = make_items(run, range(args.requests), args.prompt_tokens, args.tokens, args.topk, rng)
    batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    warmup = [make_items(run, range(args.requests, args.requests + 2), 8, 8, args.topk, rng)]  # off the clock
    write_batches(session_factory, warmup, topic)
    with session_factory() as session:
        first_id = recent_feedback(session, 1)[0].id  # the last warm-up row: reading starts after it
    payload = sum(getattr(item.result.feedback, name).nbytes for _, item in items for name in FEEDBACK_DTYPES)
    before = database_bytes(engine)

    started = time.perf_counter()
    write_batches(session_factory, batches, topic)
    write_seconds = time.perf_counter() - started

    after = database_bytes(engine)
    started = time.perf_counter()
    read_rows, after_id = 0, first_id
    with session_factory() as session:
        while page := feedback_since(session, after_id, 1000):
            read_rows += len(page)
            after_id = page[-1].id
    read_seconds = time.perf_counter() - started
    engine.dispose()

    tokens = args.requests * args.tokens
    report = {
        "database": masked(url).split("://")[0],
        "requests": args.requests,
        "tokens_per_request": args.tokens,
        "topk": args.topk,
        "prompt_tokens": args.prompt_tokens,
        "batch_size": args.batch_size,
        "write_seconds": round(write_seconds, 2),
        "requests_per_s": round(args.requests / write_seconds, 1),
        "rows_per_s": round(3 * args.requests / write_seconds, 1),
        "tokens_per_s": round(tokens / write_seconds),
        "ms_per_batch": round(1000 * write_seconds / len(batches), 2),
        "payload_bytes_per_token": round(payload / tokens, 1),
        "disk_bytes_per_token": round((after["database"] - before["database"]) / tokens, 1),
        "feedback_table_bytes_per_token": round((after["feedback"] - before["feedback"]) / tokens, 1),
        "read_rows": read_rows,
        "read_rows_per_s": round(read_rows / read_seconds, 1),
        "read_tokens_per_s": round(read_rows * args.tokens / read_seconds),
    }
    for key, value in report.items():
        print(f"{key:32s} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
