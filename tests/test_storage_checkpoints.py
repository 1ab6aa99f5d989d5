"""Draft versions: immutable rows, one active pointer per deployment, every move logged, rollback by the log."""

from __future__ import annotations

import json

import pytest

from storage import checkpoints_repo as checkpoints
from storage.errors import (
    CheckpointImmutableError,
    CheckpointNotFoundError,
    RollbackError,
    StorageError,
    TargetMismatchError,
)
from storage.models import CheckpointStatus, EventKind
from storage.requests_repo import CompletedRequest, record_request_received, store_results
from tests.storage_fixtures import make_result

TARGET = "target-0123456789abcdef"


def add(session, version, parent_id=None, deployment="default", target=TARGET):
    return checkpoints.add_checkpoint(
        session,
        version=version,
        sha256=f"{len(version):064x}",
        size_bytes=1234,
        path=f"/store/{version}",
        learner="osd",
        learner_settings={"lr": 1e-4, "steps": 10},
        target_identity=target,
        parent_id=parent_id,
        window_first_id=1,
        window_last_id=99,
        window_rows=99,
        heldout_metrics={"avg_len": 2.5},
        deployment=deployment,
        reason="round 1",
    )


def active_version(session, deployment="default"):
    active = checkpoints.get_active_checkpoint(session, deployment)
    return None if active is None else active.version


def test_new_checkpoint_is_a_candidate_and_base_is_active(db_session_factory):
    with db_session_factory.begin() as session:
        v1 = add(session, "v1")
        assert v1.id is not None and v1.status == CheckpointStatus.CANDIDATE
        assert checkpoints.get_active_checkpoint(session) is None  # nothing promoted: the base draft serves
        assert checkpoints.get_active_pointer(session) is None
        assert checkpoints.get_checkpoint(session, "v1").id == checkpoints.get_checkpoint(session, v1.id).id
        with pytest.raises(CheckpointNotFoundError):
            checkpoints.get_checkpoint(session, "v404")


def test_promote_moves_pointer_retires_previous_and_logs(db_session_factory):
    with db_session_factory.begin() as session:
        v1, v2 = add(session, "v1"), add(session, "v2")
        checkpoints.set_active(session, v1.id, actor="scheduler", reason="avg_len 2.5 > 2.1")
        event = checkpoints.set_active(
            session, v2.id, actor="scheduler", reason="avg_len 2.9 > 2.5", metrics={"candidate": 2.9, "active": 2.5}
        )
        assert (event.kind, event.checkpoint_id, event.from_checkpoint_id) == ("promote", v2.id, v1.id)
    with db_session_factory() as session:
        assert active_version(session) == "v2"
        assert checkpoints.get_active_pointer(session).generation == 2
        assert checkpoints.get_checkpoint(session, "v1").status == CheckpointStatus.RETIRED
        assert checkpoints.get_checkpoint(session, "v1").reason == "replaced by v2"
        events = checkpoints.list_events(session)
        assert [(e.kind, e.actor) for e in events] == [("promote", "scheduler")] * 2
        assert events[0].metrics == {"candidate": 2.9, "active": 2.5} and events[1].from_checkpoint_id is None


def test_rollback_follows_promotions_not_earlier_rollbacks(db_session_factory):
    with db_session_factory.begin() as session:
        v1, v2, v3 = add(session, "v1"), add(session, "v2"), add(session, "v3")
        for v in (v1, v2, v3):
            checkpoints.set_active(session, v.id, actor="scheduler", reason="better")
        checkpoints.rollback(session, actor="live-guard", reason="live avg_len fell")
        assert active_version(session) == "v2"
        assert checkpoints.get_checkpoint(session, "v3").status == CheckpointStatus.RETIRED
        checkpoints.rollback(session, actor="operator:alice", reason="still worse")
        assert active_version(session) == "v1"  # not back to v3
        checkpoints.rollback(session, actor="operator:alice", reason="back to base")
        assert active_version(session) is None
        with pytest.raises(RollbackError, match="never promoted"):
            checkpoints.rollback(session, actor="operator:alice", reason="nothing left")
        checkpoints.rollback(session, v3.id, actor="operator:alice", reason="v3 was fine after all")
        assert active_version(session) == "v3"
        assert checkpoints.get_checkpoint(session, "v3").status == CheckpointStatus.ACTIVE
        checkpoints.rollback(session, to_base=True, actor="operator:alice", reason="incident")
        assert active_version(session) is None
        kinds = [e.kind for e in reversed(checkpoints.list_events(session))]
        assert kinds == ["promote"] * 3 + ["rollback"] * 5


def test_reject_and_refusals(db_session_factory):
    with db_session_factory.begin() as session:
        v1, v2, _ = add(session, "v1"), add(session, "v2"), add(session, "v3")
        checkpoints.set_active(session, v1.id, actor="scheduler", reason="first")
        event = checkpoints.reject(
            session, v2.id, actor="scheduler", reason="avg_len 1.9 < 2.5", metrics={"candidate": 1.9}
        )
        assert event.kind == EventKind.REJECT and checkpoints.get_checkpoint(session, "v2").status == "rejected"
        with pytest.raises(StorageError, match="is active"):
            checkpoints.reject(session, v1.id, actor="operator:bob", reason="no")
        with pytest.raises(StorageError, match="already active"):
            checkpoints.set_active(session, v1.id, actor="operator:bob", reason="again")
        with pytest.raises(ValueError, match="promote or rollback"):
            checkpoints.set_active(session, v2.id, actor="operator:bob", reason="x", kind="retire")
        assert [c.version for c in checkpoints.list_checkpoints(session)] == ["v3", "v2", "v1"]
        assert [c.version for c in checkpoints.list_checkpoints(session, status="rejected")] == ["v2"]


def test_deployments_have_separate_pointers(db_session_factory):
    with db_session_factory.begin() as session:
        a, b = add(session, "a1", deployment="a"), add(session, "b1", deployment="b")
        checkpoints.set_active(session, a.id, actor="scheduler", reason="x", deployment="a")
        assert active_version(session, "a") == "a1" and active_version(session, "b") is None
        with pytest.raises(StorageError, match="belongs to deployment 'b'"):
            checkpoints.set_active(session, b.id, actor="scheduler", reason="x", deployment="a")


def test_checkpoint_provenance_is_immutable(db_session_factory):
    with db_session_factory.begin() as session:
        v1 = add(session, "v1")
        checkpoints.update_live_metrics(session, v1.id, {"avg_len": 2.7, "requests": 40})  # allowed
    with pytest.raises(CheckpointImmutableError, match=r"refused change to \['sha256'\]"):
        with db_session_factory.begin() as session:
            checkpoints.get_checkpoint(session, "v1").sha256 = "0" * 64
    with db_session_factory() as session:
        row = checkpoints.get_checkpoint(session, "v1")
        assert row.sha256 == f"{2:064x}" and row.live_metrics == {"avg_len": 2.7, "requests": 40}
        assert row.learner_settings == {"lr": 1e-4, "steps": 10} and row.window_last_id == 99


def test_a_draft_for_another_target_is_not_served(db_session_factory):
    with db_session_factory.begin() as session:
        v1 = add(session, "v1", target="other-target")
        checkpoints.set_active(session, v1.id, actor="scheduler", reason="x")
    with db_session_factory() as session:
        assert checkpoints.get_active_checkpoint(session, expected_target="other-target").version == "v1"
        with pytest.raises(TargetMismatchError, match="trained against target other-target"):
            checkpoints.get_active_checkpoint(session, expected_target=TARGET)


def test_live_counters_sum_completions_of_one_version(db_session_factory):
    results = [make_result(f"r{i}", seed=i, version="v1" if i < 3 else "v2") for i in range(5)]
    with db_session_factory.begin() as session:
        for i, result in enumerate(results):
            record_request_received(session, result.id, "prompts", 0, i, {}, 5)
        store_results(session, [CompletedRequest(r, json.dumps({"id": r.id})) for r in results], target_identity=TARGET)
    with db_session_factory() as session:
        live = checkpoints.live_counters(session, "v1")
        mine = [r.counters for r in results[:3]]
        assert live.requests == 3
        assert live.emitted == sum(c.emitted for c in mine)
        assert live.target_forwards == sum(c.target_forwards for c in mine)
        assert live.mean_accepted_length == pytest.approx(live.emitted / live.target_forwards)
        assert checkpoints.live_counters(session, "never-served").mean_accepted_length == 0.0


def test_current_activation_is_the_event_that_set_the_pointer(db_session_factory):
    with db_session_factory.begin() as session:
        assert checkpoints.current_activation(session) is None
        v1, v2 = add(session, "v1"), add(session, "v2")
        checkpoints.set_active(session, v1.id, "scheduler", "round 1")
        promoted = checkpoints.set_active(session, v2.id, "scheduler", "round 2")
        v3 = add(session, "v3")
        checkpoints.reject(session, v3.id, actor="scheduler", reason="lost the replay")  # not a pointer move
        assert checkpoints.current_activation(session).id == promoted.id
        assert checkpoints.current_activation(session).from_checkpoint_id == v1.id
        back = checkpoints.rollback(session, actor="operator:alice", reason="bad")
        assert checkpoints.current_activation(session).id == back.id
        assert checkpoints.current_activation(session, "other") is None


def test_live_counters_judge_the_draft_models_own_rounds_when_several_proposers_drafted(db_session_factory):
    """Rows with by_proposer count only the draft model's rounds; rows without (written before) count wholly."""
    mixed = make_result("mixed", seed=1, version="v3")
    mixed.counters.by_proposer = {
        "draft": {"rounds": 4, "drafted": 16, "accepted": 10},
        "suffix": {"rounds": 3, "drafted": 12, "accepted": 12},
    }
    suffix_only = make_result("suffix-only", seed=2, version="v3")
    suffix_only.counters.by_proposer = {"suffix": {"rounds": 5, "drafted": 20, "accepted": 7}}
    legacy = make_result("legacy", seed=3, version="v3")  # by_proposer stays empty: stored as NULL
    results = [mixed, suffix_only, legacy]
    with db_session_factory.begin() as session:
        for i, result in enumerate(results):
            record_request_received(session, result.id, "prompts", 0, 100 + i, {}, 5)
        store_results(session, [CompletedRequest(r, json.dumps({"id": r.id})) for r in results], target_identity=TARGET)
    with db_session_factory() as session:
        live = checkpoints.live_counters(session, "v3")
    assert live.requests == 3 and live.model_requests == 2  # the suffix-only request never ran the draft model
    assert live.model_rounds == 4 + legacy.counters.draft_steps
    assert live.model_accepted == 10 + legacy.counters.accepted
    assert live.draft_avg_len == pytest.approx(1 + live.model_accepted / live.model_rounds)
