"""`onlinespec checkpoints list | show | promote | rollback` and `onlinespec rounds list`, in-process against a real
SQLite database: JSON output, refusals, and a rollback that restores exactly the recorded weights (same sha256).
"""

from __future__ import annotations

import json

import torch

from daemon.cli import main as cli
from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftWeights
from storage.artifacts import CheckpointStore
from tests.rounds_fixtures import (
    TARGET_IDENTITY,
    follow,
    follower_for,
    learning_settings,
    record_checkpoint,
    serve,
    stream,
)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, url, *argv):
    code, out, err = run(capsys, *argv, "--database-url", url, "--json")
    assert code == 0, err
    return json.loads(out)


def add_version(session_factory, store: CheckpointStore, version: str, state: dict, parent_id=None, **fields) -> int:
    with session_factory.begin() as session:
        return record_checkpoint(
            session,
            store,
            version,
            state,
            learner="online",
            learner_settings={"lr": 0.01},
            parent_id=parent_id,
            window_first_id=1,
            window_last_id=40,
            window_rows=40,
            **fields,
        ).id


def perturbed(state: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in state.items()}


def test_a_rollback_restores_exactly_the_recorded_weights(
    strong_engine, sqlite_url, database, tmp_path, fresh_draft, capsys
):
    url, session_factory = sqlite_url, database
    engine = fresh_draft(strong_engine)
    settings = learning_settings(tmp_path, url)
    weights = DraftWeights.of_draft(engine.draft, settings.learning.checkpoint_dir)
    follower = follower_for(engine, settings, session_factory, weights)
    a_id = add_version(session_factory, weights.store, "A", perturbed(weights.base_state, 1))
    add_version(session_factory, weights.store, "B", perturbed(weights.base_state, 2), parent_id=a_id)

    run_json(capsys, url, "checkpoints", "promote", "A")
    assert follow(follower, engine) == "A"
    run_json(capsys, url, "checkpoints", "promote", "B")
    assert follow(follower, engine) == "B"
    event = run_json(capsys, url, "checkpoints", "rollback", "--reason", "B regressed")
    assert (event["kind"], event["from_version"], event["version"], event["reason"]) == (
        "rollback",
        "B",
        "A",
        "B regressed",
    )
    assert follow(follower, engine) == "A"

    # The weights now in the engine hash to A's recorded sha256: the same bytes, not merely close ones.
    served = {n: t.detach().clone() for n, t in engine.draft.state_dict().items()}
    restored = CheckpointStore(tmp_path / "rehash").put(served)
    shown = run_json(capsys, url, "checkpoints", "show", "A", "--verify")
    assert restored.sha256 == shown["sha256"] and shown["verified"] is True
    assert shown["status"] == "active" and shown["active"] is True
    assert [e["kind"] for e in shown["events"]] == ["rollback", "promote", "promote"]

    results = serve(engine, session_factory, stream(engine.tokenizer, 2, seed=5))
    assert {r.feedback.draft_version for r in results} == {"A"}

    event = run_json(capsys, url, "checkpoints", "rollback", "--to", "base")
    assert (event["from_version"], event["version"]) == ("A", BASE_DRAFT_VERSION)
    assert follow(follower, engine) == BASE_DRAFT_VERSION
    assert all(torch.equal(t, weights.base_state[n]) for n, t in engine.draft.state_dict().items())


def test_list_show_and_rounds_list_as_json_and_tables(sqlite_url, database, tmp_path, capsys):
    from storage import checkpoints_repo, rounds_repo

    url, session_factory = sqlite_url, database
    store = CheckpointStore(tmp_path / "store")
    state = {"w": torch.ones(3)}
    v1 = add_version(session_factory, store, "r1-aaaa", state, heldout_metrics={"avg_len": 2.5, "tokens": 300})
    v2 = add_version(
        session_factory, store, "r2-bbbb", {"w": torch.zeros(3)}, parent_id=v1, heldout_metrics={"avg_len": 2.1}
    )
    with session_factory.begin() as session:
        checkpoints_repo.set_active(session, v1, "scheduler", "round 1: held-out AvgLen 2.500 vs 2.000")
        checkpoints_repo.reject(session, v2, actor="scheduler", reason="round 2: below the margin")
        for decision, candidate in (("promoted", v1), ("rejected", v2)):
            round_ = rounds_repo.start_round(session, learner="online", settings={}, target_identity=TARGET_IDENTITY)
            rounds_repo.finish_round(
                session,
                round_.id,
                decision=decision,
                candidate_checkpoint_id=candidate,
                candidate_metrics={"avg_len": 2.5},
                active_metrics={"avg_len": 2.0, "tokens": 300},
            )

    listed = run_json(capsys, url, "checkpoints", "list")
    assert listed["active_version"] == "r1-aaaa" and listed["deployment"] == "default"
    assert [(c["version"], c["status"], c["active"]) for c in listed["checkpoints"]] == [
        ("r2-bbbb", "rejected", False),
        ("r1-aaaa", "active", True),
    ]
    assert run_json(capsys, url, "checkpoints", "list", "--status", "rejected")["checkpoints"][0]["id"] == v2

    shown = run_json(capsys, url, "checkpoints", "show", str(v2))
    assert shown["lineage"] == ["r1-aaaa", "base"] and shown["learner_settings"] == {"lr": 0.01}
    assert shown["window"] == {"first_id": 1, "last_id": 40, "rows": 40}
    assert shown["events"][0]["kind"] == "reject" and shown["live_counters"]["requests"] == 0

    rounds = run_json(capsys, url, "rounds", "list")["rounds"]
    assert [(r["decision"], r["candidate_version"], r["candidate_avg_len"], r["heldout_tokens"]) for r in rounds] == [
        ("rejected", "r2-bbbb", 2.5, 300),
        ("promoted", "r1-aaaa", 2.5, 300),
    ]

    code, out, _ = run(capsys, "checkpoints", "list", "--database-url", url)
    assert code == 0 and "active r1-aaaa" in out and "* " in out
    code, out, _ = run(capsys, "rounds", "list", "--database-url", url)
    assert code == 0 and "r2-bbbb" in out and "rejected" in out
    code, out, _ = run(capsys, "checkpoints", "show", "r1-aaaa", "--database-url", url)
    assert code == 0 and "lineage   r1-aaaa <- base" in out


def test_refusals_are_errors_with_a_reason(sqlite_url, database, tmp_path, capsys):
    from storage import checkpoints_repo

    url, session_factory = sqlite_url, database
    store = CheckpointStore(tmp_path / "store")
    rejected = add_version(session_factory, store, "lost", {"w": torch.ones(2)})
    damaged = add_version(session_factory, store, "damaged", {"w": torch.zeros(2)})
    with session_factory.begin() as session:
        checkpoints_repo.reject(session, rejected, actor="scheduler", reason="below the margin")
        path = checkpoints_repo.get_checkpoint(session, damaged).path

    code, _, err = run(capsys, "checkpoints", "rollback", "--database-url", url)
    assert code == 1 and "never promoted" in err
    code, _, err = run(capsys, "checkpoints", "promote", "lost", "--database-url", url)
    assert code == 1 and "pass --force" in err
    code, _, err = run(capsys, "checkpoints", "promote", "nope", "--database-url", url)
    assert code == 1 and "no draft checkpoint 'nope'" in err

    import os

    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:  # flip a byte of the stored weights
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    code, _, err = run(capsys, "checkpoints", "promote", "damaged", "--database-url", url)
    assert code == 1 and "damaged" in err
    code, out, _ = run(capsys, "checkpoints", "promote", "lost", "--force", "--database-url", url, "--json")
    assert code == 0 and json.loads(out)["version"] == "lost"
    code, _, err = run(capsys, "checkpoints", "promote", "lost", "--force", "--database-url", url)
    assert code == 1 and "already active" in err


def test_list_and_show_report_the_same_live_avglen_for_a_served_version(sqlite_url, database, tmp_path, capsys):
    """`checkpoints list` once said live AvgLen 0.000 where `show` said 4.000 over 1 request: both read the
    completions stamped with the version, and agree with a count made here from the stored results."""
    from storage.requests_repo import CompletedRequest, record_request_received, store_results
    from tests.storage_fixtures import make_result

    url, session_factory = sqlite_url, database
    store = CheckpointStore(tmp_path / "store")
    add_version(session_factory, store, "r1-aaaa", {"w": torch.ones(3)})
    add_version(session_factory, store, "r2-bbbb", {"w": torch.zeros(3)})
    results = [make_result(f"q{i}", seed=i, version="r1-aaaa" if i < 2 else "r2-bbbb") for i in range(3)]
    with session_factory.begin() as session:
        for offset, result in enumerate(results):
            record_request_received(session, result.id, "prompts", 0, offset, {}, 5)
        completed = [CompletedRequest(r, json.dumps({"id": r.id})) for r in results]
        store_results(session, completed, target_identity=TARGET_IDENTITY)

    listed = {c["version"]: c["live_counters"] for c in run_json(capsys, url, "checkpoints", "list")["checkpoints"]}
    for version, mine in (("r1-aaaa", results[:2]), ("r2-bbbb", results[2:])):
        expected = sum(r.counters.emitted for r in mine) / sum(r.counters.target_forwards for r in mine)
        shown = run_json(capsys, url, "checkpoints", "show", version)["live_counters"]
        assert listed[version] == shown
        assert shown["requests"] == len(mine) and shown["avg_len"] == expected > 1.0

        code, out, _ = run(capsys, "checkpoints", "show", version, "--database-url", url)
        assert code == 0 and f"live AvgLen {expected:.3f} over {len(mine)} requests" in out
        code, out, _ = run(capsys, "checkpoints", "list", "--database-url", url)
        (line,) = [line for line in out.splitlines() if f" {version} " in line]
        assert code == 0 and f"{expected:.3f} ({len(mine)})" in line
