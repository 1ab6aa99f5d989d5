"""Held-out replay reproduces the engine's own greedy accounting exactly, from one teacher-forced draft pass."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from devtools.tiny_models import make_tiny_pair
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.models import load_model, load_tokenizer
from pipelines.replay import greedy_chain, is_greedy, replay, served_by
from pipelines.types import KIND_BONUS, NO_DRAFT_TOKEN, GenerationRequest, RequestFeedback

PROMPTS = [
    "def add(a, b):",
    "The quick brown",
    "SELECT name FROM users WHERE id = 1;\nSELECT",
    "T",
    "for i in range(10):\n    print(",
    "To be, or not to be, that is the question. All the world's",
    "return a +",
    "The quick brown fox jumps over the lazy dog. To be",
    "def",
    "print(i * i)",
]
MAX_NEW = [7, 30, 19, 24, 1, 40, 12, 33, 2, 27]  # short limits cut chains mid-step


# one_thread (tests/rounds_fixtures.py): one torch thread on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, draft_dir = make_tiny_pair(tmp_path_factory.mktemp("models"))
    return load_model(str(target_dir)), load_model(str(draft_dir)), load_tokenizer(str(target_dir))


def perturbed(model, scale: float, seed: int = 0):
    """A copy of `model` with Gaussian noise on every weight: a draft that agrees with it part of the time."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return copy_


def requests(tokenizer, temperature: float = 0.0) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            id=f"r{i}", input_ids=tokenizer(p).input_ids, max_new_tokens=n, temperature=temperature, seed=i
        )
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))
    ]


def decode(target, draft, tokenizer, k: int, reqs, top_m: int = 16):
    settings = EngineSettings(
        proposer="draft" if draft is not None else "none", k=k, max_batch_size=4, max_seq_len=128, top_m=top_m
    )
    return SpeculativeEngine(target, draft, tokenizer, settings).generate(reqs)


def assert_replay_matches_engine(results, draft, k: int) -> None:
    for result in results:  # request by request
        metrics = replay(draft, [result.feedback], k=k)
        counters = result.counters
        assert (metrics.tokens, metrics.forwards) == (counters.emitted, counters.target_forwards), result.id
        assert metrics.accepted_at_position == counters.accepted_at_position, result.id
    metrics = replay(draft, [r.feedback for r in results], k=k, batch_size=3)  # batched, mixed lengths
    assert metrics.tokens == sum(r.counters.emitted for r in results)
    assert metrics.forwards == sum(r.counters.target_forwards for r in results)
    assert metrics.avg_len == pytest.approx(metrics.tokens / metrics.forwards)
    assert metrics.greedy_requests == metrics.requests == len(results)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("noise", [0.02, 0.05])
def test_replay_equals_engine_accounting_for_partly_agreeing_drafts(pair, k, noise):
    target, _, tokenizer = pair
    draft = perturbed(target, noise)
    results = decode(target, draft, tokenizer, k, requests(tokenizer))
    assert any(r.counters.accepted for r in results) and any(r.counters.accepted < r.counters.drafted for r in results)
    assert_replay_matches_engine(results, draft, k)


def test_replay_equals_engine_with_the_tiny_random_draft(pair):
    target, draft, tokenizer = pair
    results = decode(target, draft, tokenizer, 3, requests(tokenizer))
    assert_replay_matches_engine(results, draft, 3)


def test_replay_equals_engine_when_eos_cuts_chains(pair):
    target, _, tokenizer = pair
    draft = perturbed(target, 0.02)
    baseline = decode(target, draft, tokenizer, 3, requests(tokenizer))
    # Declare a token that the target emits mid-answer an end-of-sequence token: several chains now stop there.
    counts = np.bincount(np.concatenate([r.feedback.token_ids[1:-1] for r in baseline]), minlength=len(tokenizer))
    stopper = int(counts.argmax())
    eos_target = copy.deepcopy(target)
    eos_target.generation_config.eos_token_id = [tokenizer.eos_token_id, stopper]
    for k in (2, 4):
        results = decode(eos_target, draft, tokenizer, k, requests(tokenizer))
        assert sum(r.finish_reason == "eos" for r in results) >= 2
        assert_replay_matches_engine(results, draft, k)


def test_draft_equal_to_target_replays_to_full_chains(pair):
    target, _, tokenizer = pair
    k = 4
    results = decode(target, target, tokenizer, k, requests(tokenizer))
    metrics = replay(target, [r.feedback for r in results], k=k)
    assert metrics.forwards == sum(r.counters.target_forwards for r in results)
    # every step accepts all k drafts: n tokens take 1 + ceil((n - 1) / (k + 1)) forwards
    assert metrics.forwards == sum(1 + -(-(len(r.token_ids) - 1) // (k + 1)) for r in results)
    assert metrics.argmax_match == 1.0
    # top-16 of a 300-token vocabulary leaves a few percent of the target's mass unseen: the bounds bracket 1
    assert 0.9 < metrics.acceptance <= metrics.acceptance_upper <= 1.0 and metrics.acceptance_upper > 0.99
    assert metrics.avg_len == pytest.approx(sum(r.counters.emitted for r in results) / metrics.forwards)


def test_target_only_feedback_predicts_the_speculative_engine(pair):
    """Feedback decoded without any draft carries everything replay needs: its chain for a draft D with k
    equals what the engine reports when it actually decodes with D and k."""
    target, _, tokenizer = pair
    draft = perturbed(target, 0.03, seed=1)
    target_only = decode(target, None, tokenizer, 0, requests(tokenizer))
    for k in (1, 3, 6):
        speculative = decode(target, draft, tokenizer, k, requests(tokenizer))
        metrics = replay(draft, [r.feedback for r in target_only], k=k)
        assert metrics.tokens == sum(r.counters.emitted for r in speculative)
        assert metrics.forwards == sum(r.counters.target_forwards for r in speculative)


def test_served_by_reproduces_the_feedback_the_engine_records(pair):
    target, _, tokenizer = pair
    draft = perturbed(target, 0.03, seed=2)
    target_only = decode(target, None, tokenizer, 0, requests(tokenizer))
    for k in (2, 5):
        speculative = decode(target, draft, tokenizer, k, requests(tokenizer))
        relabeled = served_by(draft, [r.feedback for r in target_only], k=k, version="d")
        for mine, engine in zip(relabeled, (r.feedback for r in speculative)):
            assert mine.kinds.tolist() == engine.kinds.tolist()
            assert mine.draft_tokens.tolist() == engine.draft_tokens.tolist()
            assert mine.token_ids.tolist() == engine.token_ids.tolist() and mine.draft_version == "d"


def test_sampled_requests_only_count_towards_acceptance(pair):
    target, _, tokenizer = pair
    draft = perturbed(target, 0.05)
    greedy = decode(target, draft, tokenizer, 3, requests(tokenizer))
    sampled = decode(target, draft, tokenizer, 3, requests(tokenizer, temperature=1.0))
    assert not all(is_greedy(r.feedback) for r in sampled)
    greedy_only = replay(draft, [r.feedback for r in greedy], k=3)
    mixed = replay(draft, [r.feedback for r in greedy + sampled], k=3)
    samples = [r for r in sampled if not is_greedy(r.feedback)]
    assert mixed.greedy_requests == greedy_only.greedy_requests + len(sampled) - len(samples)
    assert mixed.requests == len(greedy) + len(sampled)
    assert mixed.acceptance_positions == sum(len(r.token_ids) - 1 for r in greedy + sampled)
    assert 0.0 <= mixed.acceptance <= mixed.acceptance_upper <= 1.0
    only_samples = replay(draft, [r.feedback for r in samples], k=3)
    assert only_samples.greedy_requests == 0 and np.isnan(only_samples.avg_len) and only_samples.forwards == 0
    assert only_samples.acceptance_positions > 0 and 0 < only_samples.acceptance < 1


def test_acceptance_is_exact_with_the_full_vocabulary(pair):
    """With top-m = the whole vocabulary the lower and upper bounds meet at sum_x min(p, q)."""
    target, _, tokenizer = pair
    draft = perturbed(target, 0.05)
    reqs = requests(tokenizer)[:3]
    results = decode(target, draft, tokenizer, 2, reqs, top_m=len(tokenizer))
    metrics = replay(draft, [r.feedback for r in results], k=2)
    assert metrics.acceptance_upper - metrics.acceptance < 1e-2  # float16 log-probs, nothing else
    expected = []
    for request, result in zip(reqs, results):
        sequence = torch.tensor([request.input_ids + result.token_ids[:-1]])
        with torch.no_grad():
            p = torch.softmax(target(sequence).logits[0, len(request.input_ids) :], -1)  # positions i >= 1
            q = torch.softmax(draft(sequence).logits[0, len(request.input_ids) :], -1)
        expected.append(torch.minimum(p, q).sum(-1))
    assert metrics.acceptance == pytest.approx(float(torch.cat(expected).mean()), abs=5e-3)
    assert metrics.expected_avg_len == pytest.approx((1 - metrics.acceptance**3) / (1 - metrics.acceptance))


def test_greedy_chain_by_hand():
    # tokens 0..9; the draft matches at 1, 2, 3, 5, 6, 9
    matches = np.array([0, 1, 1, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
    # k = 2: prefill [0]; [1 2 | 3 bonus]; [4 recovered]; [5 6 | 7 bonus]; [8 recovered]; [9 accepted, chain ends]
    assert greedy_chain(matches, 2) == (6, [3, 2])
    # k = 3: prefill; [1 2 3 | 4]; [5 6 | 7]; [8]; [9]
    assert greedy_chain(matches, 3) == (5, [3, 2, 1])
    assert greedy_chain(matches, 0) == (10, [])
    assert greedy_chain(np.array([True]), 4) == (1, [0, 0, 0, 0])


def feedback_with(token_ids, topk_ids, topk_logprobs) -> RequestFeedback:
    n = len(token_ids)
    return RequestFeedback(
        prompt_ids=np.array([1, 2], dtype=np.int32),
        token_ids=np.array(token_ids, dtype=np.int32),
        kinds=np.full(n, KIND_BONUS, dtype=np.uint8),
        draft_tokens=np.full(n, NO_DRAFT_TOKEN, dtype=np.int32),
        target_topk_ids=np.array(topk_ids, dtype=np.int32),
        target_topk_logprobs=np.array(topk_logprobs, dtype=np.float16),
        draft_version="v0",
    )


def test_a_tied_top_1_stored_second_still_counts_as_greedy():
    """bf16 logits tie; argmax and the top-m sort may order a tie differently, and such requests stay greedy."""
    ids = [[5, 7, 9], [3, 4, 6]]
    assert is_greedy(feedback_with([5, 3], ids, [[-0.5, -1.5, -3.0], [-0.7, -0.9, -2.0]]))
    assert is_greedy(feedback_with([7, 3], ids, [[-0.69, -0.69, -3.0], [-0.7, -0.9, -2.0]]))  # tie, stored second
    assert not is_greedy(feedback_with([7, 3], ids, [[-0.6, -0.8, -3.0], [-0.7, -0.9, -2.0]]))  # second, lower
    assert not is_greedy(feedback_with([5, 8], ids, [[-0.5, -1.5, -3.0], [-0.7, -0.9, -2.0]]))  # outside the top-m
