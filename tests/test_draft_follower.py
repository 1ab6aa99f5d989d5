"""The draft follower against a real SQLite database and checkpoint store (no model): it reads the pointer at most
every interval, loads a new version's weights verified against their sha256, and never raises into the decode
thread: a damaged file, a draft trained for another target or a database outage keep the current draft serving.
"""

from __future__ import annotations

import logging

import pytest
import torch

from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftFollower, DraftWeights
from tests.rounds_fixtures import TARGET_IDENTITY, record_checkpoint

BASE = {"w": torch.zeros(4)}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def weights(tmp_path):
    return DraftWeights(tmp_path / "checkpoints", BASE)


def add(session_factory, weights, version, state, target=TARGET_IDENTITY, promote=True) -> int:
    from storage.checkpoints_repo import set_active

    with session_factory.begin() as session:
        checkpoint = record_checkpoint(session, weights.store, version, state, target_identity=target)
        if promote:
            set_active(session, checkpoint.id, "operator:test", "test")
        return checkpoint.id


def follower(database, weights, clock, interval_s=0.5) -> DraftFollower:
    return DraftFollower(
        database,
        weights,
        target_identity=TARGET_IDENTITY,
        deployment="default",
        interval_s=interval_s,
        retry_s=5.0,
        clock=clock,
    )


def test_reads_the_pointer_at_most_every_interval_and_swaps_once_per_move(database, weights):
    clock = Clock()
    f = follower(database, weights, clock)
    assert f.poll(BASE_DRAFT_VERSION) is None and f.generation == 0  # nothing promoted: base serves
    add(database, weights, "v1", {"w": torch.ones(4)})
    assert f.poll(BASE_DRAFT_VERSION) is None  # within the interval: not even read
    clock.now += 0.5
    state, version = f.poll(BASE_DRAFT_VERSION)
    assert version == "v1" and torch.equal(state["w"], torch.ones(4)) and f.generation == 1
    clock.now += 0.5
    assert f.poll("v1") is None  # same generation: one integer compared


def test_a_damaged_checkpoint_is_never_served_and_is_retried_later(database, weights, caplog):
    clock = Clock()
    f = follower(database, weights, clock)
    add(database, weights, "v1", {"w": torch.ones(4)})
    path = next(weights.checkpoint_dir.glob("*.safetensors"))
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with caplog.at_level(logging.ERROR):
        assert f.poll(BASE_DRAFT_VERSION) is None
    assert "damaged" in caplog.text and f.generation is None
    clock.now += 1.0
    assert f.poll(BASE_DRAFT_VERSION) is None  # backing off for retry_s, not hammering the disk
    assert f._next_check == pytest.approx(100.0 + 5.0)


def test_a_draft_trained_for_another_target_is_refused_for_the_base_draft(database, weights, caplog):
    clock = Clock()
    f = follower(database, weights, clock)
    add(database, weights, "foreign", {"w": torch.ones(4)}, target="another-target")
    with caplog.at_level(logging.ERROR):
        swap = f.poll("v0")
    assert swap is not None and swap[1] == BASE_DRAFT_VERSION and swap[0] is BASE
    assert "serving the base draft instead" in caplog.text


def test_a_database_outage_never_reaches_the_decode_thread(weights, caplog):
    def broken_session():
        raise ConnectionError("database is down")

    clock = Clock()
    f = follower(broken_session, weights, clock)
    with caplog.at_level(logging.ERROR):
        assert f.poll("v3") is None
        clock.now += 10
        assert f.poll("v3") is None
    assert caplog.text.count("cannot follow the active draft") == 1  # logged once per outage


class SlowWeights(DraftWeights):
    """A checkpoint store that takes `delay_s` to read and verify a version (a large draft on a slow disk)."""

    def __init__(self, *args, delay_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.loaded_on: list[str] = []

    def load(self, checkpoint):
        import threading
        import time

        self.loaded_on.append(threading.current_thread().name)
        time.sleep(self.delay_s)
        return super().load(checkpoint)


def test_a_slow_load_happens_on_the_followers_thread_and_the_decode_thread_only_takes_the_result(database, tmp_path):
    import time

    weights = SlowWeights(tmp_path / "checkpoints", BASE, delay_s=1.0)
    follower = DraftFollower(
        database,
        weights,
        target_identity=TARGET_IDENTITY,
        deployment="default",
        interval_s=0.05,
        prepare=lambda state: {k: v * 1 for k, v in state.items()},
    )
    follower.start(BASE_DRAFT_VERSION)
    try:
        add(database, weights, "v1", {"w": torch.ones(4)})
        longest, swap, deadline = 0.0, None, time.monotonic() + 20
        while swap is None and time.monotonic() < deadline:  # the decode thread's batch boundaries
            started = time.monotonic()
            swap = follower.take_ready()
            longest = max(longest, time.monotonic() - started)
            time.sleep(0.01)
    finally:
        follower.stop()
    assert swap is not None and swap[1] == "v1" and torch.equal(swap[0]["w"], torch.ones(4))
    assert weights.loaded_on == ["draft-follower"]  # read and verified off the decode thread
    assert longest < 0.05, f"a batch boundary waited {longest:.3f} s for the 1 s load"
    assert follower.take_ready() is None  # each move is handed over once
