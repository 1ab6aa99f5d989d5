"""Head checkpoints: stored like any draft version (immutable safetensors, sha256, kind `head`, lineage), their
HeadConfig recoverable from the file, rollback restoring the exact weights, and a head that does not fit the served
one (another target, another shape, another kind of draft) refused before anything is swapped."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import pytest
import torch

from daemon.cli import main as cli
from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftFollower, DraftWeights, cast_like
from pipelines.drafts import DraftMismatchError, head_config_of
from pipelines.heads.model import DraftHead, HeadDraft
from tests.head_fixtures import scrambled_head, with_draft_vocab
from tests.rounds_fixtures import TARGET_IDENTITY, follow, record_checkpoint


class HeadServer:
    """The engine's side of a swap, as the head proposer does it: the new state dict copied into the served head."""

    def __init__(self, draft: HeadDraft):
        self.draft = draft
        self.draft_version = BASE_DRAFT_VERSION

    def swap_draft(self, weights: dict, version: str) -> None:
        with torch.no_grad():
            self.draft.load_state_dict(weights, strict=True)
        self.draft_version = version


@pytest.fixture
def served(head_target, tmp_path):
    """(server, weights): a fresh head serving as the base version, and where its versions' weights come from."""
    draft = HeadDraft(DraftHead.for_target(head_target[0]), head_target[0])
    return HeadServer(draft), DraftWeights.of_draft(draft, tmp_path / "checkpoints")


def store_version(database, weights: DraftWeights, version: str, draft, *, promote: bool, parent_id=None) -> int:
    """What a learning round records for a head candidate: its file (weights.put) and a row of kind head."""
    from storage.checkpoints_repo import add_checkpoint, set_active

    stored = weights.put(draft)
    with database.begin() as session:
        row = add_checkpoint(
            session,
            version=version,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            path=str(stored.path),
            learner="online",
            learner_settings={},
            target_identity=TARGET_IDENTITY,
            parent_id=parent_id,
            kind=weights.kind,
        )
        if promote:
            set_active(session, row.id, "scheduler", f"promote {version}")
        return row.id


def follower_of(database, weights: DraftWeights, server: HeadServer) -> DraftFollower:
    return DraftFollower(
        database,
        weights,
        target_identity=TARGET_IDENTITY,
        deployment="default",
        interval_s=0.0,
        prepare=cast_like(server.draft),
    )


def as_json(config) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=str)


def test_a_head_checkpoint_round_trips_with_its_config(served, head_target, database):
    from storage.checkpoints_repo import get_checkpoint

    server, weights = served
    trained = scrambled_head(head_target[0], seed=5)
    trained.head.config = server.draft.config  # same shape, other weights
    checkpoint_id = store_version(database, weights, "h1", trained, promote=False)
    with database() as session:
        row = get_checkpoint(session, checkpoint_id)
        assert row.kind == "head" and row.target_identity == TARGET_IDENTITY
        assert weights.store.verify(row.sha256) == row.size_bytes
        state, metadata = weights.store.get_with_metadata(row.sha256)
        loaded = weights.load(row)
    assert set(state) == set(trained.state_dict()) and all(name.startswith("head.") for name in state)
    assert all(torch.equal(loaded[n], t) for n, t in trained.state_dict().items())
    stored_config = head_config_of(metadata)
    assert json.loads(metadata["draft"])["kind"] == "head" and as_json(stored_config) == as_json(
        trained.config
    )  # JSON: int keys -> str
    # the file alone rebuilds the head for its target (the head's own keys, without the "head." prefix)
    rebuilt = DraftHead.from_state(
        head_target[0], stored_config, {n.removeprefix("head."): t for n, t in state.items()}
    )
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), trained.head.state_dict().values()))
    assert weights.put(trained).sha256 == row.sha256  # the same weights are the same file


def test_rollback_restores_the_exact_weights_of_each_head_version(served, head_target, database):
    from storage.checkpoints_repo import rollback

    server, weights = served
    base = {n: t.clone() for n, t in server.draft.state_dict().items()}
    follower = follower_of(database, weights, server)
    versions = {}
    parent = None
    for seed, version in ((1, "h1"), (2, "h2")):
        candidate = server.draft.copy_for_training()
        candidate.load_state_dict(scrambled_head(head_target[0], seed=seed).state_dict())
        versions[version] = {n: t.clone() for n, t in candidate.state_dict().items()}
        parent = store_version(database, weights, version, candidate, promote=True, parent_id=parent)
        assert follow(follower, server) == version
        assert all(torch.equal(t, versions[version][n]) for n, t in server.draft.state_dict().items())

    for expected in ("h1", BASE_DRAFT_VERSION):
        with database.begin() as session:
            rollback(session, actor="operator:test", reason="test", to_base=expected == BASE_DRAFT_VERSION)
        assert follow(follower, server) == expected
        truth = base if expected == BASE_DRAFT_VERSION else versions[expected]
        assert all(torch.equal(t, truth[n]) for n, t in server.draft.state_dict().items())


def test_a_head_for_another_target_is_refused_and_the_served_head_keeps_serving(served, tiny_models, database, caplog):
    from pipelines.models import load_model

    server, weights = served
    other_target = load_model(str(tiny_models[1]))  # the 2-layer, 32-wide draft model as a target
    alien = HeadDraft(DraftHead.for_target(other_target), other_target)
    checkpoint_id = store_version(database, weights, "alien", alien, promote=True)
    before = {n: t.clone() for n, t in server.draft.state_dict().items()}
    with database() as session:
        from storage.checkpoints_repo import get_checkpoint

        with pytest.raises(DraftMismatchError, match="head does not fit the target: hidden_size is 32"):
            weights.load(get_checkpoint(session, checkpoint_id))
    with caplog.at_level(logging.ERROR):
        assert follow(follower_of(database, weights, server), server) == BASE_DRAFT_VERSION
    assert "DraftMismatchError" in caplog.text and "alien" in caplog.text
    assert all(torch.equal(t, before[n]) for n, t in server.draft.state_dict().items())


def test_a_head_fused_over_other_layers_is_refused_and_one_over_the_same_layers_is_followed(
    head_target, database, tmp_path, caplog
):
    """Same tensor names and shapes, other target layers: refused before anything is swapped (the served engine's
    verify pass returns the served head's layers only); the served fused head keeps serving and follows a
    version fused over its own layers."""
    from storage.checkpoints_repo import get_checkpoint

    target = head_target[0]
    fused = lambda layers, seed=0: HeadDraft(  # noqa: E731
        DraftHead.for_target(target, init="random", seed=seed, feature_layers=layers), target
    )
    server = HeadServer(fused((1, 3)))
    weights = DraftWeights.of_draft(server.draft, tmp_path / "checkpoints")
    before = {n: t.clone() for n, t in server.draft.state_dict().items()}
    other_id = store_version(database, weights, "other-layers", fused((1, 2), seed=1), promote=True)
    with database() as session:
        with pytest.raises(DraftMismatchError, match=r"fused over target layers \[1, 2\] .* reads \[1, 3\]"):
            weights.load(get_checkpoint(session, other_id))
    with caplog.at_level(logging.ERROR):
        assert follow(follower_of(database, weights, server), server) == BASE_DRAFT_VERSION
    assert "other-layers" in caplog.text
    assert all(torch.equal(t, before[n]) for n, t in server.draft.state_dict().items())

    same = fused((1, 3), seed=2)
    store_version(database, weights, "same-layers", same, promote=True, parent_id=other_id)
    assert follow(follower_of(database, weights, server), server) == "same-layers"
    assert all(torch.equal(t, same.state_dict()[n]) for n, t in server.draft.state_dict().items())


def test_a_head_of_another_depth_or_a_draft_model_checkpoint_is_refused(served, head_target, database):
    from storage.checkpoints_repo import get_checkpoint

    server, weights = served
    deeper = HeadDraft(DraftHead.for_target(head_target[0], num_layers=2), head_target[0])
    deeper_id = store_version(database, weights, "deeper", deeper, promote=False)
    with database.begin() as session:
        lm_id = record_checkpoint(session, weights.store, "lm", dict(server.draft.state_dict())).id
    with database() as session:
        with pytest.raises(DraftMismatchError, match="a head of 2 layers, the served one has 1"):
            weights.load(get_checkpoint(session, deeper_id))
        with pytest.raises(DraftMismatchError, match="checkpoint lm is a draft, the served draft is a head"):
            weights.load(get_checkpoint(session, lm_id))


def test_a_draft_model_daemon_refuses_a_head_checkpoint(head_target, database, tmp_path):
    from storage.checkpoints_repo import get_checkpoint

    head = HeadDraft(DraftHead.for_target(head_target[0]), head_target[0])
    head_weights = DraftWeights.of_draft(head, tmp_path / "checkpoints")
    lm_weights = DraftWeights.of_draft(head_target[0], tmp_path / "checkpoints")  # the target as a draft model
    checkpoint_id = store_version(database, head_weights, "h1", head, promote=False)
    with database() as session:
        with pytest.raises(DraftMismatchError, match="is a head, the served draft is a draft"):
            lm_weights.load(get_checkpoint(session, checkpoint_id))


class HeadRoundsEngine:
    """Target-only decoding whose results say a head drafted `rounds` rounds accepting `accepted` tokens per
    request (what the head proposer will report), stamped with the served version: live counters by proposer."""

    def __init__(self, head_target, server: HeadServer):
        from pipelines.engine import EngineSettings, SpeculativeEngine

        target, self.tokenizer = head_target
        settings = EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256, top_m=8)
        self.engine = SpeculativeEngine(target, None, self.tokenizer, settings)
        self.server = server
        self.head_accepted = 0

    def generate(self, requests):
        results = self.engine.generate(requests)
        for result in results:
            result.counters.by_proposer = {"head": {"rounds": 10, "drafted": 30, "accepted": self.head_accepted}}
            result.feedback.draft_version = self.server.draft_version
        return results


def test_the_live_guard_judges_a_head_version_by_its_own_rounds(
    served, head_target, database, sqlite_url, tmp_path, capsys
):
    from daemon.learning.live_guard import LiveGuard
    from tests.rounds_fixtures import learning_settings, serve, stream

    server, weights = served
    follower = follower_of(database, weights, server)
    engine = HeadRoundsEngine(head_target, server)
    guard = LiveGuard(learning_settings(tmp_path).learning.live_guard, database, deployment="default")
    engine.head_accepted = 20  # base: 1 + 20 / 10 = 3 tokens per head round
    serve(engine, database, stream(engine.tokenizer, 6, seed=1))
    worse = server.draft.copy_for_training()
    worse.load_state_dict(scrambled_head(head_target[0], seed=9).state_dict())
    store_version(database, weights, "h1", worse, promote=True)
    assert follow(follower, server) == "h1"
    engine.head_accepted = 5  # 1.5 per head round: far below 3
    serve(engine, database, stream(engine.tokenizer, 6, seed=2))
    assert cli(["checkpoints", "show", "h1", "--database-url", sqlite_url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "head" and shown["live_counters"]["requests"] == 6
    verdict = guard.check()
    assert verdict.action == "rolled_back" and "live AvgLen 1.500 over 6 requests vs 3.000" in verdict.reason
    assert follow(follower, server) == BASE_DRAFT_VERSION
    assert all(torch.equal(t, weights.base_state[n]) for n, t in server.draft.state_dict().items())


def test_a_draft_vocabulary_survives_the_head_folder_and_a_swap_refreshes_its_lm_head_rows_in_place(
    head_target, tmp_path
):
    from pipelines.heads.model import HEAD_CONFIG_FILE, head_config_from_document, read_head_config
    from pipelines.proposers.head import HeadProposer

    target = head_target[0]
    head = with_draft_vocab(scrambled_head(target, seed=2), [5, 1, 9, 3, 3])
    assert head.head.draft_vocab.tolist() == [1, 3, 5, 9]  # sorted, no repeats
    head.head.save(tmp_path / "h")
    assert read_head_config(tmp_path / "h")[0].draft_vocab_size == 4
    loaded = DraftHead.load(tmp_path / "h", target)
    assert set(loaded.state_dict()) == set(head.head.state_dict())
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in head.head.state_dict().items())
    document = json.loads((tmp_path / "h" / HEAD_CONFIG_FILE).read_text())
    del document["draft_vocab_size"]  # a head stored before draft vocabularies proposes from the whole vocabulary
    assert head_config_from_document(document).draft_vocab_size == 0

    served = HeadProposer(with_draft_vocab(scrambled_head(target, seed=3), [2, 4, 6, 8]), max_seq_len=64, window=4)
    rows = served.model._draft_lm_head[0]
    served.swap(head)
    assert served.model._draft_lm_head[0] is rows  # the same memory: captured rounds keep reading it
    assert torch.equal(rows, target.get_output_embeddings().weight[[1, 3, 5, 9]])
    with pytest.raises(ValueError, match="wrong shape"):  # another size of draft vocabulary
        served.swap(with_draft_vocab(head, [1, 2]))


def test_loading_other_draft_vocabulary_ids_moves_the_lm_head_rows_along_and_bad_ids_are_refused(head_target):
    """A learning round reloads one training copy with load_state_dict: the rows it drafts with must follow the
    ids it loads. A stored vocabulary with a repeated or out-of-range id would break q or fault on the GPU."""
    target = head_target[0]
    draft = scrambled_head(target, seed=4).restricted_to([3, 5, 7])
    outputs = torch.randn(2, 1, draft.config.hidden_size)
    draft.draft_logits(outputs)  # the rows exist now
    other = draft.restricted_to([2, 4, 6])
    draft.load_state_dict(other.state_dict())
    assert torch.allclose(draft.draft_logits(outputs), draft.logits(outputs)[..., [2, 4, 6]])
    assert draft.draft_token_ids(torch.tensor([0, 2])).tolist() == [2, 6]
    state = {n.removeprefix("head."): t for n, t in draft.state_dict().items()}
    for bad in ([2, 2, 6], [2, 4, 10**7]):
        with pytest.raises(ValueError, match="strictly increasing"):
            DraftHead.from_state(target, draft.config, {**state, "draft_vocab": torch.tensor(bad)})
