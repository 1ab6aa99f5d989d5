"""What a learning round records: the whole resolved configuration with its checkpoint and its round row (loaded
back into Settings it is the configuration the round ran with, secrets masked), and one log line per phase."""

from __future__ import annotations

import json
import logging

from daemon.config import Settings
from daemon.learning.draft_follower import DraftWeights
from daemon.learning.rounds import RoundRunner
from tests.rounds_fixtures import TARGET_IDENTITY, learning_settings, serve, stream


def run_a_round(engine, settings, session_factory):
    """A round that keeps its candidate's weights (learning_settings stores rejected ones too)."""
    weights = DraftWeights.of_draft(engine.draft, settings.learning.checkpoint_dir)
    runner = RoundRunner(settings, session_factory, weights, engine.draft, target_identity=TARGET_IDENTITY)
    serve(engine, session_factory, stream(engine.tokenizer, 24, seed=90))
    result = runner.run()
    assert result.decision in ("promoted", "rejected") and result.candidate_version is not None, result.reason
    return result


def stored_settings(session_factory, result) -> tuple[dict, dict]:
    from storage import checkpoints_repo, rounds_repo

    with session_factory() as session:
        checkpoint = checkpoints_repo.get_checkpoint(session, result.candidate_version)
        round_ = rounds_repo.get_round(session, result.round_id)
        return checkpoint.settings, round_.settings


def test_the_stored_config_of_a_checkpoint_loads_back_into_the_same_settings(
    weak_engine, database, tmp_path, fresh_draft, caplog
):
    engine = fresh_draft(weak_engine)
    settings = learning_settings(tmp_path, min_heldout_tokens=1)
    with caplog.at_level(logging.INFO, logger="daemon.learning.rounds"):
        result = run_a_round(engine, settings, database)

    checkpoint_settings, round_settings = stored_settings(database, result)
    assert checkpoint_settings == round_settings == settings.resolved()
    assert Settings.model_validate(checkpoint_settings) == settings  # every section, every value
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"round {result.round_id} ")]
    for phase in ("started:", "split:", "replayed base:", "trained online:", f"{result.decision} r"):
        assert any(line.startswith(f"round {result.round_id} {phase}") for line in phases), (phase, phases)


def test_secrets_never_reach_the_stored_config(weak_engine, database, tmp_path, fresh_draft):
    engine = fresh_draft(weak_engine)
    base = learning_settings(tmp_path, min_heldout_tokens=1)
    # The URL is only recorded here (the runner writes through `database`), so it may name any server.
    settings = Settings.model_validate(
        {
            **base.model_dump(),
            "database": {"url": "postgresql://u:hunter2@db/x"},
            "kafka": {"sasl_mechanism": "PLAIN", "sasl_plain_username": "svc", "sasl_plain_password": "hunter3"},
        }
    )
    result = run_a_round(engine, settings, database)

    checkpoint_settings, round_settings = stored_settings(database, result)
    assert "hunter" not in json.dumps(checkpoint_settings) + json.dumps(round_settings)
    assert checkpoint_settings["database"]["url"] == "postgresql://u:***@db/x"
    reloaded = Settings.model_validate(checkpoint_settings)
    assert reloaded.resolved() == checkpoint_settings  # everything else round-trips as it was
    assert reloaded.learning == settings.learning and reloaded.engine == settings.engine
