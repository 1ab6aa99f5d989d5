"""Helpers for learning-round tests: tiny engines, a homogeneous synthetic stream really decoded by the engine and
stored through the storage API (as the worker stores it), settings with a `learning:` section.

Import the fixtures you need into the test module (`from tests.rounds_fixtures import weak_engine, ...`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from daemon.config import Settings
from daemon.learning.draft_follower import DraftFollower, DraftWeights

TARGET_IDENTITY = "tiny-target"
K = 3
# A stream of one kind of request: the same query template with a varying number, decoded greedily.
TEMPLATE = "SELECT name FROM users WHERE id = {n};"
# Trains the tiny 2-layer draft quickly on CPU: rounds take a fraction of a second.
FAST_LEARNER = {"name": "online", "lr": 1e-2, "trainable": "all", "epochs": 4, "batch_size": 4}


def make_engine(target_dir: Path, draft_dir: Path):
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import load_model, load_tokenizer

    settings = EngineSettings(proposer="draft", k=K, max_batch_size=8, max_seq_len=256, top_m=8)
    return SpeculativeEngine(
        load_model(str(target_dir)), load_model(str(draft_dir)), load_tokenizer(str(target_dir)), settings
    )


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: spinning OpenMP threads slow tiny models down
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weak_engine(tiny_models, one_thread):
    """The tiny pair as it is: a random 2-layer draft that almost never agrees with the 4-layer target."""
    return make_engine(*tiny_models)


@pytest.fixture(scope="module")
def strong_engine(tiny_models, one_thread):
    """The target drafting for itself: greedy AvgLen is k + 1. A bad version is then clearly worse."""
    return make_engine(tiny_models[0], tiny_models[0])


@pytest.fixture
def fresh_draft(request):
    """Restores an engine's draft weights and version after a test that swapped it."""
    saved = []

    def remember(engine):
        saved.append((engine, {n: t.clone() for n, t in engine.draft.state_dict().items()}, engine.draft_version))
        return engine

    yield remember
    for engine, weights, version in saved:
        engine.swap_draft(weights, version)


@pytest.fixture
def database(sqlite_url):
    """A session factory on a fresh SQLite database at the schema head."""
    engine, session_factory = session_factory_for(sqlite_url)
    yield session_factory
    engine.dispose()


def learning_settings(tmp_path: Path, database_url: str = "sqlite:///unused.db", *, guard=None, **learning) -> Settings:
    values = {
        "enabled": True,
        "learner": FAST_LEARNER,
        "window_max_rows": 64,
        "heldout_rows": 8,
        "min_heldout_tokens": 50,
        "min_new_tokens": 200,
        "promote_margin": 0.02,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "follow_interval_ms": 0,
        "store_rejected": True,  # the tests look at rejected candidates' weights too
        "live_guard": {"min_requests": 6, "margin": 0.05, **(guard or {})},
        **learning,
    }
    return Settings.model_validate(
        {
            "database": {"url": database_url},
            "engine": {"k": K, "max_seq_len": 256, "top_m": 8},
            "limits": {"max_new_tokens": 64, "default_max_new_tokens": 32},
            "learning": values,
        }
    )


def stream(tokenizer, count: int, seed: int, max_new_tokens: int = 32, variety: int = 10):
    """`count` greedy requests of the template with one of `variety` numbers: a homogeneous stream, as from one
    templated application, where the same continuations recur."""
    from pipelines.types import GenerationRequest

    rng = random.Random(seed)
    return [
        GenerationRequest(
            id=f"s{seed}-{i}",
            input_ids=tokenizer.encode(TEMPLATE.format(n=rng.randrange(variety))),
            max_new_tokens=max_new_tokens,
        )
        for i in range(count)
    ]


def serve(engine, session_factory, requests, target_identity: str = TARGET_IDENTITY):
    """Decode with the engine as it is now and store completions + feedback like the worker does."""
    from storage.requests_repo import CompletedRequest, ReceivedRequest, record_requests_received, store_results

    results = engine.generate(requests)
    with session_factory.begin() as session:
        record_requests_received(
            session, [ReceivedRequest(r.id, None, None, None, {}, len(r.input_ids)) for r in requests]
        )
        completed = [
            CompletedRequest(r, json.dumps({"id": r.id, "draft_version": r.feedback.draft_version})) for r in results
        ]
        store_results(session, completed, target_identity=target_identity)
    return results


def live_avg_len(results) -> float:
    return sum(r.counters.emitted for r in results) / sum(r.counters.target_forwards for r in results)


def draft_round_avg_len(results) -> float:
    """What the live guard judges: tokens per round in which the draft model drafted (accepted + 1)."""
    rounds = sum(r.counters.draft_steps for r in results)
    return 1.0 + sum(r.counters.accepted for r in results) / rounds


def follower_for(engine, settings: Settings, session_factory, weights: DraftWeights | None = None) -> DraftFollower:
    weights = weights or DraftWeights.of_draft(engine.draft, settings.learning.checkpoint_dir)
    return DraftFollower(
        session_factory,
        weights,
        target_identity=TARGET_IDENTITY,
        deployment=settings.learning.deployment,
        interval_s=0.0,
    )


def follow(follower: DraftFollower, engine) -> str:
    """What the decode thread does at a batch boundary; returns the version now served."""
    swap = follower.poll(engine.draft_version)
    if swap is not None:
        engine.swap_draft(*swap)
    return engine.draft_version


def session_factory_for(url: str):
    from storage.db import make_engine, make_session_factory

    engine = make_engine(url)
    return engine, make_session_factory(engine)


def record_checkpoint(
    session,
    store,
    version: str,
    state: dict,
    *,
    target_identity: str = TARGET_IDENTITY,
    learner: str = "manual",
    learner_settings: dict | None = None,
    **fields,
):
    """Write `state` to the checkpoint store and record it as a candidate version; returns the row."""
    from storage.checkpoints_repo import add_checkpoint

    stored = store.put(state)
    return add_checkpoint(
        session,
        version=version,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        path=str(stored.path),
        learner=learner,
        learner_settings=learner_settings or {},
        target_identity=target_identity,
        **fields,
    )
