"""The live guard on tiny real models and a real SQLite database: a promoted version that does worse in service
than the one it replaced is rolled back automatically (and the worker's draft follows); one that does as well is
kept; each promotion is judged once.
"""

from __future__ import annotations

import json

import pytest
import torch

from daemon.cli import main as cli
from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftWeights
from daemon.learning.live_guard import LiveGuard
from tests.rounds_fixtures import (
    draft_round_avg_len,
    follow,
    follower_for,
    learning_settings,
    record_checkpoint,
    serve,
    session_factory_for,
    stream,
)


@pytest.fixture
def setup(strong_engine, sqlite_url, tmp_path, fresh_draft):
    engine = fresh_draft(strong_engine)
    db_engine, session_factory = session_factory_for(sqlite_url)
    settings = learning_settings(tmp_path, sqlite_url, guard={"min_requests": 6, "margin": 0.05})
    weights = DraftWeights.of_draft(engine.draft, settings.learning.checkpoint_dir)
    follower = follower_for(engine, settings, session_factory, weights)
    guard = LiveGuard(settings.learning.live_guard, session_factory, deployment="default")
    yield engine, session_factory, weights, follower, guard, sqlite_url
    db_engine.dispose()


def add_version(session_factory, weights: DraftWeights, version: str, state: dict, **fields) -> int:
    with session_factory.begin() as session:
        return record_checkpoint(session, weights.store, version, state, **fields).id


def scrambled(engine, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=generator) for n, t in engine.draft.state_dict().items()}


def test_a_version_that_degrades_live_acceptance_is_rolled_back_automatically(setup, capsys):
    from storage import checkpoints_repo

    engine, session_factory, weights, follower, guard, url = setup
    base_live = draft_round_avg_len(serve(engine, session_factory, stream(engine.tokenizer, 8, seed=60)))
    bad_id = add_version(session_factory, weights, "bad-1", scrambled(engine))

    assert cli(["checkpoints", "promote", "bad-1", "--database-url", url, "--reason", "try it", "--json"]) == 0
    promoted = json.loads(capsys.readouterr().out)
    assert (promoted["kind"], promoted["version"], promoted["from_version"]) == ("promote", "bad-1", "base")
    assert promoted["actor"].startswith("operator:")
    assert follow(follower, engine) == "bad-1"

    served = serve(engine, session_factory, stream(engine.tokenizer, 3, seed=61))
    assert guard.check().action == "watching"  # 3 of 6 requests
    served += serve(engine, session_factory, stream(engine.tokenizer, 3, seed=62))
    bad_live = draft_round_avg_len(served)
    assert bad_live < base_live * 0.95
    verdict = guard.check()
    assert verdict.action == "rolled_back", verdict

    with session_factory() as session:
        event = checkpoints_repo.list_events(session)[0]
        assert (event.kind, event.actor, event.checkpoint_id, event.from_checkpoint_id) == (
            "rollback",
            "live-guard",
            None,
            bad_id,
        )
        assert f"{bad_live:.3f}" in event.reason and f"{base_live:.3f}" in event.reason
        assert event.metrics["live"]["requests"] == 6 and event.metrics["reference_version"] == BASE_DRAFT_VERSION
        bad = checkpoints_repo.get_checkpoint(session, bad_id)
        assert bad.status == "retired" and bad.live_metrics["guard"]["verdict"] == "rolled_back"
        assert bad.live_metrics["requests"] == 6
    assert follow(follower, engine) == BASE_DRAFT_VERSION  # the next batch decodes with the base draft again
    assert all(torch.equal(t, weights.base_state[n]) for n, t in engine.draft.state_dict().items())
    assert guard.check().action == "idle"  # nothing promoted to watch any more


def test_a_version_that_does_as_well_is_kept_and_judged_once(setup):
    from storage import checkpoints_repo

    engine, session_factory, weights, follower, guard, _ = setup
    serve(engine, session_factory, stream(engine.tokenizer, 6, seed=70))
    same = {n: t.clone() for n, t in weights.base_state.items()}
    good_id = add_version(session_factory, weights, "same-as-base", same)
    with session_factory.begin() as session:
        checkpoints_repo.set_active(session, good_id, "scheduler", "round 1")
    assert follow(follower, engine) == "same-as-base"
    serve(engine, session_factory, stream(engine.tokenizer, 6, seed=71))
    assert guard.check().action == "kept"
    assert guard.check().action == "idle"
    with session_factory() as session:
        good = checkpoints_repo.get_checkpoint(session, good_id)
        assert good.status == "active" and good.live_metrics["guard"]["verdict"] == "kept"
        assert good.live_metrics["guard"]["reference_source"].startswith("live over 6 requests")


def test_without_a_served_predecessor_the_promoting_rounds_heldout_number_is_the_reference(setup):
    from storage import checkpoints_repo

    engine, session_factory, weights, follower, guard, _ = setup
    bad_id = add_version(session_factory, weights, "bad-2", scrambled(engine, seed=1))
    with session_factory.begin() as session:  # as a round promotes: with both held-out numbers as evidence
        checkpoints_repo.set_active(
            session, bad_id, "scheduler", "round 3", metrics={"candidate": {"avg_len": 3.9}, "active": {"avg_len": 3.5}}
        )
    follow(follower, engine)
    serve(engine, session_factory, stream(engine.tokenizer, 6, seed=80))
    verdict = guard.check()
    assert verdict.action == "rolled_back" and "3.500 for base (held-out in the promoting round)" in verdict.reason


def test_a_chain_base_v1_v2_rolls_a_worse_v2_back_to_v1_and_serves_v1s_weights(setup):
    """The predecessor, not the base draft: and what is served afterwards is v1's weights, by value and sha256."""
    from storage import checkpoints_repo
    from storage.artifacts import CheckpointStore

    engine, session_factory, weights, follower, guard, _ = setup
    generator = torch.Generator().manual_seed(5)
    v1_state = {n: t + 1e-4 * torch.randn(t.shape, generator=generator) for n, t in weights.base_state.items()}
    v1_id = add_version(session_factory, weights, "v1", v1_state)
    v2_id = add_version(session_factory, weights, "v2", scrambled(engine, seed=2), parent_id=v1_id)
    with session_factory.begin() as session:
        checkpoints_repo.set_active(session, v1_id, "scheduler", "round 1")
    assert follow(follower, engine) == "v1"
    v1_live = draft_round_avg_len(serve(engine, session_factory, stream(engine.tokenizer, 6, seed=90)))
    assert guard.check().action == "kept"  # v1 does as well as base: it stays, and has a live record now

    with session_factory.begin() as session:
        checkpoints_repo.set_active(session, v2_id, "scheduler", "round 2")
    assert follow(follower, engine) == "v2"
    v2_live = draft_round_avg_len(serve(engine, session_factory, stream(engine.tokenizer, 6, seed=91)))
    assert v2_live < v1_live * 0.95
    verdict = guard.check()
    assert verdict.action == "rolled_back" and f"{v1_live:.3f} for v1 (live over 6 requests)" in verdict.reason

    with session_factory() as session:
        event = checkpoints_repo.list_events(session)[0]
        assert (event.kind, event.checkpoint_id, event.from_checkpoint_id) == ("rollback", v1_id, v2_id)
        v1_row = checkpoints_repo.get_checkpoint(session, v1_id)
    assert follow(follower, engine) == "v1"
    served = {n: t.detach().clone() for n, t in engine.draft.state_dict().items()}
    assert all(torch.equal(served[n], v1_state[n]) for n in v1_state)
    assert not all(torch.equal(served[n], weights.base_state[n]) for n in served)  # not the base draft's
    assert CheckpointStore(weights.checkpoint_dir.parent / "rehash").put(served).sha256 == v1_row.sha256
