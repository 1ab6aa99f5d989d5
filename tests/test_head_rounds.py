"""Learning rounds on a head (issue 12, must-show 1): a daemon that serves without a trained draft (target-only)
trains a FRESH head from its traffic; on a homogeneous stream five rounds of RoundRunner (train, exact replay,
gate, record) raise the head's held-out AvgLen by at least half. Tiny real models, a real SQLite database, the real
learners and the real checkpoint store; deterministic (seeded learner, head and stream)."""

from __future__ import annotations

import pytest
import torch

from daemon.learning.draft_follower import DraftWeights
from daemon.learning.rounds import RoundRunner
from pipelines.heads.model import DraftHead, HeadDraft
from pipelines.replay import replay
from tests.rounds_fixtures import TARGET_IDENTITY, K, follow, learning_settings, serve, stream
from tests.test_head_checkpoints import HeadServer, follower_of

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 5
REPLAY_K = 4  # the held-out measurement; the rounds gate at the engine's k (K)


@pytest.fixture
def target_only_engine(head_target):
    from pipelines.engine import EngineSettings, SpeculativeEngine

    target, tokenizer = head_target
    settings = EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256, top_m=8)
    return SpeculativeEngine(target, None, tokenizer, settings)


def fresh_head(target) -> HeadDraft:
    # init "random": the tiny random target's last layer is no warm start for it (see tests/head_fixtures.py)
    return HeadDraft(DraftHead.for_target(target, init="random", seed=0), target)


def test_rounds_raise_a_fresh_heads_heldout_avglen_by_half_within_five_rounds(
    head_target, target_only_engine, database, tmp_path
):
    from storage import checkpoints_repo, rounds_repo

    target, tokenizer = head_target
    server = HeadServer(fresh_head(target))  # what the engine serves once a head version wins
    initial = server.draft.copy_for_training()
    settings = learning_settings(tmp_path)
    weights = DraftWeights.of_draft(server.draft, settings.learning.checkpoint_dir)
    runner = RoundRunner(
        settings, database, weights, server.draft, target_identity=TARGET_IDENTITY, window=settings.engine.k + 1
    )
    follower = follower_of(database, weights, server)

    results = []
    for round_index in range(ROUNDS):
        serve(target_only_engine, database, stream(tokenizer, 24, seed=round_index))
        results.append(runner.run())
        assert results[-1].decision in ("promoted", "rejected"), results[-1].reason
        follow(follower, server)

    heldout = [r.feedback for r in target_only_engine.generate(stream(tokenizer, 16, seed=100))]
    before = replay(initial, heldout, k=REPLAY_K).avg_len
    after = replay(server.draft, heldout, k=REPLAY_K).avg_len
    decisions = [r.decision for r in results]
    print(f"held-out AvgLen at k={REPLAY_K}: fresh {before:.3f} -> {after:.3f}; rounds {decisions}")
    assert after >= 1.5 * before, (before, after, decisions)

    with database() as session:
        active = checkpoints_repo.get_active_checkpoint(session)
        assert server.draft_version == active.version and active.kind == "head"
        lineage, node = [], active
        while node is not None:
            assert node.kind == "head" and node.target_identity == TARGET_IDENTITY
            lineage.append(node.version)
            node = None if node.parent_id is None else checkpoints_repo.get_checkpoint(session, node.parent_id)
        assert len(lineage) == decisions.count("promoted")
        for round_ in rounds_repo.list_rounds(session):
            assert round_.candidate_metrics["avg_len"] > 0 and round_.active_metrics["avg_len"] > 0
        served_weights = weights.load(active)
    assert all(torch.equal(t, served_weights[n]) for n, t in server.draft.state_dict().items())
    assert K == settings.engine.k
