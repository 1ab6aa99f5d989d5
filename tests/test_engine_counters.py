"""The engine's raw counters against counts derived independently from its feedback, through the public API only
(SpeculativeEngine(...).generate(requests) -> results with .counters and .feedback).

Every verification step after the prefill ends with exactly one recovered or bonus token, and its accepted tokens
come before it; a step cut short by max_new_tokens, EOS or a stop string leaves accepted tokens last. So from
the kinds of the emitted positions alone:
    steps     = #recovered + #bonus - 1 (the prefill's token) + (1 if the last kept token is accepted)
    accepted  = #accepted
and with a draft of k tokens proposing k every step, drafted = k * steps = k * (target_forwards - 1), for rows
that never ran out of KV-cache room. The draft tokens recorded at accepted and recovered positions are the
proposals that were verified there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devtools.tiny_models import make_tiny_pair
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.models import load_model, load_tokenizer
from pipelines.types import KIND_ACCEPTED, KIND_BONUS, KIND_RECOVERED, NO_DRAFT_TOKEN, GenerationRequest

PROMPTS = [
    "def add(a, b):",
    "The quick brown",
    "SELECT name FROM users WHERE",
    "To be, or not",
    "for i in range(",
    "All the world's a stage.",
    "return a +",
    "T",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target_dir, draft_dir = make_tiny_pair(tmp_path_factory.mktemp("models"))
    yield load_model(str(target_dir)), load_model(str(draft_dir)), load_tokenizer(str(target_dir))
    torch.set_num_threads(threads)


def derived_steps(kinds: np.ndarray) -> int:
    ends = int(((kinds == KIND_RECOVERED) | (kinds == KIND_BONUS)).sum())
    cut_short = len(kinds) > 0 and int(kinds[-1]) == KIND_ACCEPTED
    return ends - 1 + int(cut_short)


def requests(tokenizer, temperature: float, stop: tuple[str, ...] = ()) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            tokenizer(prompt).input_ids,
            max_new_tokens=7 + 5 * i,
            temperature=temperature,
            top_p=0.9 if temperature else 1.0,
            seed=i,
            stop=stop,
        )
        for i, prompt in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafter", ["draft", "target"])  # the target drafting for itself accepts nearly all
@pytest.mark.parametrize("k", [1, 3, 5])
def test_counters_match_what_the_feedback_shows(models, k, drafter, temperature):
    target, draft, tokenizer = models
    engine = SpeculativeEngine(
        target,
        target if drafter == "target" else draft,
        tokenizer,
        EngineSettings(proposer="draft", k=k, max_batch_size=8, max_seq_len=256, top_m=4),
    )
    results = engine.generate(requests(tokenizer, temperature))
    assert sum(r.counters.accepted for r in results) > 0 or drafter == "draft"
    for result in results:
        c, kinds = result.counters, result.feedback.kinds
        steps = derived_steps(kinds)
        assert c.target_forwards == steps + 1, result.id
        assert c.drafted == k * steps == k * (c.target_forwards - 1), result.id
        assert c.accepted == int((kinds == KIND_ACCEPTED).sum()), result.id
        assert c.emitted == len(result.token_ids) == len(kinds)
        verified = (kinds == KIND_ACCEPTED) | (kinds == KIND_RECOVERED)
        assert np.all(result.feedback.draft_tokens[verified] != NO_DRAFT_TOKEN)
        assert np.all(result.feedback.draft_tokens[kinds == KIND_BONUS] == NO_DRAFT_TOKEN)
        assert sum(c.accepted_at_position) == c.accepted and len(c.accepted_at_position) == k
        assert c.accepted <= c.drafted


def test_counters_of_rows_cut_short_by_a_stop_string(models):
    target, _, tokenizer = models
    engine = SpeculativeEngine(
        target, target, tokenizer, EngineSettings(proposer="draft", k=4, max_batch_size=8, max_seq_len=256)
    )
    results = engine.generate(requests(tokenizer, 0.0, stop=("e",)))
    assert any(r.finish_reason == "stop" for r in results)
    for result in results:
        steps = derived_steps(result.feedback.kinds)
        assert result.counters.drafted == 4 * steps == 4 * (result.counters.target_forwards - 1), result.id


def test_without_a_draft_nothing_is_drafted(models):
    target, _, tokenizer = models
    engine = SpeculativeEngine(
        target, None, tokenizer, EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256)
    )
    for result in engine.generate(requests(tokenizer, 0.0)):
        c = result.counters
        assert (c.drafted, c.accepted, c.draft_steps) == (0, 0, 0)
        assert c.target_forwards == c.emitted == len(result.token_ids)  # one token per forward, prefill included
        assert np.all(result.feedback.kinds == KIND_BONUS)
