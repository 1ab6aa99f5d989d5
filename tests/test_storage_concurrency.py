"""Two processes receiving and completing the same request ids at the same moment: one row each, the same
stored message for both, and neither process raises (SQLite file and PostgreSQL)."""

from __future__ import annotations

import json
import multiprocessing
import time

from sqlalchemy import func, select

ROUNDS = 12
TARGET = "target-0123456789abcdef"


def race(url: str, worker: int, barrier, results) -> None:
    """Child process: for each id, wait for the other process, then receive and complete it."""
    from storage.db import make_engine, make_session_factory
    from storage.requests_repo import CompletedRequest, record_request_received, store_results
    from tests.storage_fixtures import make_result

    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    outcomes = []
    for i in range(ROUNDS):
        request_id = f"race-{i}"
        barrier.wait(timeout=60)
        with session_factory.begin() as session:
            _, is_new = record_request_received(session, request_id, "prompts", 0, i, {}, prompt_tokens=5)
            if i % 2 == worker:
                time.sleep(0.02)  # hold the transaction open so the other process must wait on our row
        barrier.wait(timeout=60)
        message = json.dumps({"id": request_id, "decoded_by": worker})
        with session_factory.begin() as session:
            produced = store_results(
                session, [CompletedRequest(make_result(request_id), message)], target_identity=TARGET
            )
        outcomes.append((request_id, is_new, produced[request_id]))
    engine.dispose()
    results.put((worker, outcomes))


def test_two_processes_same_request_ids(db_url, db_session_factory):
    from storage.models import Completion, Feedback, Request

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=race, args=(db_url, worker, barrier, results)) for worker in (0, 1)]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    for i in range(ROUNDS):
        a, b = outcomes[0][i], outcomes[1][i]
        assert a[1] != b[1], f"race-{i}: exactly one process must see the id as new"
        assert a[2] == b[2], f"race-{i}: both processes must produce the one stored message"
    with db_session_factory() as session:
        for model in (Request, Completion, Feedback):
            assert session.scalar(select(func.count()).select_from(model)) == ROUNDS
