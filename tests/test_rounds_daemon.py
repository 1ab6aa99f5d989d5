"""`onlinespec serve` as a subprocess on the real broker with learning wired in: an operator's promote and
rollback reach the running daemon within one batch (completions carry the version), and a daemon with learning
enabled runs rounds on its own feedback and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from pipelines.types import GenerationRequest
from tests.daemon_fixtures import (
    REPO,
    DaemonProcess,
    TopicReader,
    daemon_settings,
    header,
    produce,
    prompt_records,
    write_config,
)
from tests.rounds_fixtures import FAST_LEARNER

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def onlinespec(*argv: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", *argv, "--json"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start(
    tmp_path, daemon_processes, kafka_names, database_url, tiny_models, draft_dir=None, **learning
) -> DaemonProcess:
    target_dir, tiny_draft_dir = tiny_models
    settings = daemon_settings(
        kafka_names,
        database_url,
        target_dir,
        draft_dir or tiny_draft_dir,
        learning={"checkpoint_dir": str(tmp_path / "checkpoints"), "follow_interval_ms": 0, **learning},
    )
    daemon = DaemonProcess(write_config(tmp_path / "config.yaml", settings), tmp_path / "daemon.log")
    daemon_processes.append(daemon)
    daemon.start().wait_ready()
    return daemon


def versions_of(reader: TopicReader, ids: list[str]) -> dict[str, str]:
    records = reader.read_until(lambda rs: set(ids) <= {header(r, "request-id") for r in rs}, timeout=60)
    return {
        header(r, "request-id"): json.loads(r.value)["draft_version"] for r in records if header(r, "request-id") in ids
    }


def served_acceptance(reader: TopicReader, request_id: str) -> dict:
    records = reader.read_until(lambda rs: request_id in {header(r, "request-id") for r in rs}, timeout=60)
    return next(json.loads(r.value)["acceptance"] for r in records if header(r, "request-id") == request_id)


def reference_acceptance(target_dir, draft_state: dict, request_id: str) -> dict:
    """What a draft with these weights accepts on this request, decoded here alone as the daemon decodes it: the
    served weights show in the acceptance counters (the text is the target's either way)."""
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(target_dir))
    engine = SpeculativeEngine(
        load_model(str(target_dir)),
        load_model(str(target_dir)),
        tokenizer,
        EngineSettings(proposer="draft", k=3, max_batch_size=4, max_seq_len=256, top_m=4),
    )
    engine.swap_draft(draft_state, "reference")
    ((_, value),) = prompt_records([request_id])
    message = json.loads(value)
    request = GenerationRequest(request_id, tokenizer(message["prompt"]).input_ids, message["max_new_tokens"])
    (result,) = engine.generate([request])
    c = result.counters
    return {
        "drafted": c.drafted,
        "accepted": c.accepted,
        "target_forwards": c.target_forwards,
        "mean_accepted_length": round(c.mean_accepted_length, 4),
        "by_proposer": c.by_proposer,
    }


def test_promote_and_rollback_reach_a_running_daemon_within_one_batch(
    tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models
):
    from pipelines.models import load_model, model_identity
    from storage.artifacts import CheckpointStore
    from storage.checkpoints_repo import add_checkpoint
    from storage.db import make_engine, make_session_factory

    # The target drafts for itself (every draft token accepted), X is a perturbed copy: the weights served show
    # in the acceptance counters. The tiny random draft would accept nothing with either.
    target_dir, _ = tiny_models
    generator = torch.Generator().manual_seed(3)
    draft = load_model(str(target_dir))
    state = {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in draft.state_dict().items()}
    stored = CheckpointStore(tmp_path / "checkpoints").put(state)
    engine = make_engine(sqlite_url)
    with make_session_factory(engine).begin() as session:
        add_checkpoint(
            session,
            version="X",
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            path=str(stored.path),
            learner="manual",
            learner_settings={},
            target_identity=model_identity(load_model(str(target_dir))),
        )
    engine.dispose()

    daemon = start(tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models, draft_dir=target_dir)
    config = str(daemon.config)
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["before-0", "before-1"]))
    assert set(versions_of(reader, ["before-0", "before-1"]).values()) == {"base"}

    promoted = onlinespec("checkpoints", "promote", "X", "--config", config, "--reason", "try X")
    assert (promoted["from_version"], promoted["version"]) == ("base", "X")
    ids = [f"x-{i}" for i in range(3)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids))
    assert set(versions_of(reader, ids).values()) == {"X"}
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["probe-x"]))  # alone: a batch of one
    served_x = served_acceptance(reader, "probe-x")

    rolled = onlinespec("checkpoints", "rollback", "--config", config, "--reason", "X is worse")
    assert (rolled["from_version"], rolled["version"], rolled["actor"][:9]) == ("X", "base", "operator:")
    ids = [f"after-{i}" for i in range(3)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids))
    assert set(versions_of(reader, ids).values()) == {"base"}
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["probe-base"]))
    served_base = served_acceptance(reader, "probe-base")
    reader.close()

    # The weights, not the labels: each probe accepted exactly what its draft's weights accept, and they differ.
    base_state = load_model(str(target_dir)).state_dict()
    assert served_x == reference_acceptance(target_dir, state, "probe-x")
    assert served_base == reference_acceptance(target_dir, base_state, "probe-base")
    assert served_base != served_x, "X must accept differently from the base draft on the same prompt"

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    log = daemon.log()
    assert f"base -> X (sha256 {stored.sha256}" in log and "X -> base (the base draft" in log
    shown = onlinespec("checkpoints", "show", "X", "--config", config)
    assert shown["status"] == "retired" and shown["live_counters"]["requests"] == 4


def test_a_learning_daemon_runs_rounds_on_its_feedback_and_stops_cleanly(
    tmp_path, daemon_processes, kafka_names, sqlite_url, tiny_models
):
    daemon = start(
        tmp_path,
        daemon_processes,
        kafka_names,
        sqlite_url,
        tiny_models,
        enabled=True,
        learner=FAST_LEARNER,
        heldout_rows=4,
        window_max_rows=64,
        min_new_tokens=150,
        min_heldout_tokens=20,
        check_interval_s=0.5,
        live_guard={"check_interval_s": 1.0},
    )
    ids = [f"l-{i:02d}" for i in range(16)]
    produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(ids, max_new_tokens=16))
    reader = TopicReader(kafka_names.bootstrap, kafka_names.completions)
    reader.read_until(lambda rs: len(rs) >= len(ids), timeout=90)
    reader.close()
    daemon.wait_for_log(r"round 1 (promoted|rejected) r1-", timeout=60)

    rounds = onlinespec("rounds", "list", "--config", str(daemon.config))["rounds"]
    assert rounds[-1]["decision"] in ("promoted", "rejected") and rounds[-1]["window"]["rows"] >= 5
    assert rounds[-1]["heldout_tokens"] > 0 and rounds[-1]["candidate_metrics"]["timings"]["fit_s"] > 0
    assert "decode_tps_between" in rounds[-1]["candidate_metrics"]["serving"]

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    log = daemon.log()
    assert "learning scheduler started (learning-round, learning-trigger, live-guard)" in log
    assert "Etc/UTC" not in log  # no local time zone lookup: the scheduler runs on UTC
    assert "onlinespec stopped (SIGTERM, drained)" in log
