"""Scale-out on one machine: two `onlinespec serve` processes (tiny real models, CPU) in one consumer group on a
prompts topic of 4 partitions, one PostgreSQL database, learning enabled on both, a producer at a fixed rate.

    (a) one learner at a time: every learning round was started by exactly one daemon, the learner lock (pg_locks,
        sampled every 50 ms) was never held by another daemon while it ran, and no two rounds overlap in time
    (b) a promotion reaches both daemons within one batch: once a daemon's follower has the new version's weights
        ready (it reads the pointer every 50 ms), the daemon stores at most one more batch with the old version (what
        finished in the engine step before the swap), and none of its later batches goes back
        (devtools.fleet.follow_figures; a batch is one store transaction of completions, ordered by when it was
        stored: with continuous batching a request carries the version of its last round)
    (c) learner failover: the daemon holding the lock is SIGKILLed mid-round; PostgreSQL releases the lock with its
        connection, the survivor closes the interrupted round as failed, runs the next round itself and takes the
        dead daemon's partitions
    (d) every id answered exactly once: one completion row each, every id on the completions topic, every copy
        byte for byte the stored message

Waits are on conditions with deadlines; nothing sleeps for a fixed time. Which daemon holds the lock is read from
pg_locks: each daemon names itself in its database URL (application_name).
"""

from __future__ import annotations

import time

import pytest

from devtools.fleet import (
    Fleet,
    LockWatch,
    PacedProducer,
    delivery_figures,
    follow_figures,
    learner_figures,
    learner_mid_round,
    takeover_done,
    takeover_figures,
    wait_until,
)
from tests.daemon_fixtures import TopicReader, daemon_settings, prompt_records, write_config
from tests.fault_fixtures import answered, assert_exactly_once
from tests.kafka_fixtures import fresh_names
from tests.rounds_fixtures import FAST_LEARNER

pytestmark = [pytest.mark.scale, pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

PARTITIONS = 4
RATE = 8.0  # prompts per second, 16 tokens each: a round's worth of new feedback every few seconds
LEARNING = {
    "enabled": True,
    # More epochs than the unit tests' learner: a round lasts long enough for the test to kill its daemon mid-round.
    "learner": {**FAST_LEARNER, "epochs": 12},
    "interval_s": 3600,
    "check_interval_s": 0.5,
    "min_new_tokens": 400,
    "window_max_rows": 64,
    "heldout_rows": 4,
    "min_heldout_tokens": 20,
    "promote_margin": 0.0,
    "follow_interval_ms": 0,
    "live_guard": {"enabled": False},  # only rounds move the pointer here
}


def promotion_seen_by_all(database_url: str, fleet: Fleet) -> dict | None:
    """The first promotion after which every daemon has begun at least two batches."""
    for move in follow_figures(database_url, fleet.logs()):
        if move["kind"] == "promote" and all(d["batches"] >= 2 for d in move["daemons"].values()):
            return move
    return None


def test_two_daemons_one_group_one_database_one_learner(
    tmp_path, daemon_processes, kafka_broker, postgres_url, tiny_models
):
    started = time.monotonic()
    names = fresh_names(kafka_broker)
    kafka_broker.create_topics(names.prompts, partitions=PARTITIONS)
    kafka_broker.create_topics(names.completions, names.dlq)
    learning = {**LEARNING, "checkpoint_dir": str(tmp_path / "checkpoints")}  # shared by both, as a shared volume
    settings = daemon_settings(names, postgres_url, *tiny_models, learning=learning)
    fleet = Fleet(write_config(tmp_path / "config.yaml", settings), tmp_path, postgres_url, 2)
    daemon_processes.extend(fleet.daemons.values())
    fleet.start().wait_ready(PARTITIONS)
    ready_s = time.monotonic() - started

    watch = LockWatch(postgres_url).start()
    reader = TopicReader(names.bootstrap, names.completions)
    ids = [f"s{i:04d}" for i in range(2000)]
    producer = PacedProducer(names.bootstrap, names.prompts, prompt_records(ids, max_new_tokens=16), RATE).start()
    try:
        # (b) a promotion while both daemons serve
        first_promotion = wait_until(
            lambda: promotion_seen_by_all(postgres_url, fleet), 120, "a promotion followed by both daemons", 0.5
        )

        # (c) SIGKILL the learner mid-round
        victim, interrupted = wait_until(lambda: learner_mid_round(fleet, watch), 60, "a round in progress", 0.02)
        killed_at = time.time()
        fleet.daemons[victim].kill()
        (survivor,) = set(fleet.daemons) - {victim}
        takeover = wait_until(
            lambda: takeover_done(
                takeover_figures(postgres_url, fleet.logs(), watch.samples, victim, killed_at, PARTITIONS)
            ),
            90,
            "the lock released, the partitions moved and the survivor's next round",
            0.25,
        )
    finally:
        sent = producer.stop()

    # (d) everything sent is answered; the survivor stops cleanly
    reader.read_until(lambda records: answered(records) >= set(sent), timeout=120)
    reader.read_for(0.5)
    reader.close()
    exit_codes = fleet.stop()
    watch.stop()

    logs = fleet.logs()
    learner = learner_figures(postgres_url, logs, watch.samples)
    follow = follow_figures(postgres_url, logs)
    delivery = delivery_figures(postgres_url, sent, reader.records)
    rounds = {r["id"]: r for r in learner["rounds"]}
    figures = {
        "seconds": round(time.monotonic() - started, 1),
        "ready_s": round(ready_s, 1),
        "ids": len(sent),
        "rounds": len(rounds),
        "rounds_by_daemon": learner["rounds_by_daemon"],
        "promotions": sum(1 for m in follow if m["kind"] == "promote"),
        "follow": [{m["version"]: m["daemons"]} for m in follow],
        "lock_samples_held": learner["lock_samples_held"],
        "feedback_rows_passed_over": learner["feedback_rows_passed_over"],
        "victim": victim,
        "interrupted_round": interrupted,
        **takeover,
        "rebalances": {label: log.rebalances for label, log in logs.items()},
        **delivery,
    }
    print("scale-out figures:", figures)

    # (a) one learner at a time
    assert learner["overlapping_rounds"] == 0, learner
    assert learner["rounds_not_claimed_by_one_daemon"] == 0, learner
    assert learner["rounds_with_lock_held_by_another"] == 0, learner
    assert sum(r["lock_samples"] for r in learner["rounds"]) > 0, "the lock was never seen held during a round"
    assert learner["feedback_rows_passed_over"] == 0, learner

    # (b) once its follower has a new version ready, a daemon begins at most one more batch with the old one, and
    # none of its batches goes back; both daemons served the first promotion
    for move in follow:
        for label, seen in move["daemons"].items():
            assert seen["stale_after_ready"] <= 1 and seen["went_back"] == 0, (move["version"], label, seen)
    first = next(m for m in follow if m["version"] == first_promotion["version"])
    assert all(d["follow_s"] is not None and d["first_batch_s"] is not None for d in first["daemons"].values()), first

    # (c) failover
    assert rounds[interrupted]["daemon"] == victim and rounds[interrupted]["decision"] == "failed", rounds
    assert "interrupted" in rounds[interrupted]["reason"], rounds[interrupted]
    assert takeover["next_round_by"] == survivor and rounds[takeover["next_round"]]["daemon"] == survivor
    assert any(holder == survivor for at, holder in watch.samples if at > killed_at), "the survivor never held the lock"
    assert all(r["daemon"] == survivor for r in learner["rounds"] if r["id"] > interrupted), learner
    assert sorted(logs[survivor].partitions) == sorted(f"{names.prompts}/{p}" for p in range(PARTITIONS))
    assert exit_codes == {victim: None, survivor: 0}, exit_codes

    # (d) exactly once
    assert_exactly_once(delivery)
