"""Sampled speculative decoding has exactly the target's (temperature + top-p warped) distribution.

Chi-square goodness-of-fit tests with a fixed set of seeds (so the tests are deterministic) and a strict
significance level; a verifier that skipped the residual correction or the acceptance test fails them by a
wide margin (see test_a_biased_verifier_is_detected).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pipelines import sampling
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.models import load_model, load_tokenizer
from pipelines.types import GenerationRequest
from pipelines.verify import verify_sampled
from tests.tiny_models import make_tiny_pair

ALPHA = 1e-3


def chi_square_pvalue(observed_tokens: np.ndarray, expected_probs: np.ndarray) -> float:
    """Goodness of fit; bins with small expected counts are merged so the chi-square approximation holds."""
    counts = np.bincount(observed_tokens, minlength=len(expected_probs)).astype(float)
    expected_probs = np.asarray(expected_probs, dtype=np.float64)
    expected = expected_probs / expected_probs.sum() * len(observed_tokens)
    assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    order = np.argsort(expected)[::-1]
    big = [i for i in order if expected[i] >= 5]
    small = [i for i in order if 0 < expected[i] < 5]
    obs = [counts[i] for i in big] + ([counts[small].sum()] if small else [])
    exp = [expected[i] for i in big] + ([expected[small].sum()] if small else [])
    exp = np.asarray(exp) * (sum(obs) / sum(exp))  # float rounding only
    return float(stats.chisquare(obs, exp).pvalue)


def synthetic_step(batch: int, k: int, vocab: int, seed: int):
    """Context-free p and q per position, so every emitted token must be an independent draw from p."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=generator) * 1.5, -1)
    seeds = torch.arange(batch, dtype=torch.int64) + 1000 * seed
    first_position = torch.full((batch,), 7, dtype=torch.int64)
    positions = first_position[:, None] + torch.arange(k)
    q_batch = q.expand(batch, k, vocab)
    draft_tokens = sampling.sample(q_batch, seeds, positions, sampling.STREAM_DRAFT)
    return p, q, seeds, first_position, draft_tokens


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_emits_target_distribution_at_every_slot(k):
    batch, vocab = 40_000, 6
    p, q, seeds, first_position, draft_tokens = synthetic_step(batch, k, vocab, seed=k)
    outcome = verify_sampled(draft_tokens, q.expand(batch, k, vocab), p.expand(batch, k + 1, vocab), seeds, first_position)
    emitted = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1)
    emitted.scatter_(1, outcome.accepted[:, None], outcome.next_token[:, None])
    for slot in range(k + 1):
        rows = outcome.accepted >= slot  # rows that emit a token at this slot
        tokens = emitted[rows, slot].numpy()
        assert len(tokens) > 1000
        assert chi_square_pvalue(tokens, p[slot].numpy()) > ALPHA, f"slot {slot}"
    # Acceptance rate of the first draft token is sum_x min(p, q) (the paper's alpha).
    alpha = torch.minimum(p[0], q[0]).sum().item()
    rate = outcome.accept_mask[:, 0].float().mean().item()
    assert rate == pytest.approx(alpha, abs=4 * (alpha * (1 - alpha) / batch) ** 0.5)


def test_a_biased_verifier_is_detected():
    """The test above has teeth: emitting draft tokens without the acceptance test fails it."""
    batch, vocab, k = 40_000, 6, 1
    p, _, _, _, draft_tokens = synthetic_step(batch, k, vocab, seed=1)
    assert chi_square_pvalue(draft_tokens[:, 0].numpy(), p[0].numpy()) < ALPHA


def test_warp_applies_temperature_and_top_p():
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0, -3.0]]])
    probs = sampling.warp(logits, torch.tensor([0.5]), torch.tensor([0.9]))[0, 0]
    tempered = torch.softmax(logits[0, 0] / 0.5, -1)
    assert tempered[0] < 0.9 <= tempered[0] + tempered[1]  # so top-p 0.9 keeps exactly two tokens
    expected = torch.zeros(5)
    expected[:2] = tempered[:2] / tempered[:2].sum()
    torch.testing.assert_close(probs, expected)
    greedy = sampling.warp(logits, torch.tensor([0.0]), torch.tensor([0.5]))[0, 0]
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_uniforms_are_uniform_and_independent_across_streams():
    seeds = torch.arange(50_000, dtype=torch.int64)
    positions = torch.full((50_000, 1), 3, dtype=torch.int64)
    a = sampling.uniform(seeds, positions, sampling.STREAM_ACCEPT)[:, 0].numpy()
    b = sampling.uniform(seeds, positions, sampling.STREAM_DRAFT)[:, 0].numpy()
    assert 0 < a.min() and a.max() < 1
    assert stats.kstest(a, "uniform").pvalue > ALPHA
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, draft_dir = make_tiny_pair(tmp_path_factory.mktemp("models"))
    return load_model(str(target_dir)), load_model(str(draft_dir)), load_tokenizer(str(target_dir))


def exact_second_token_distribution(target, prompt: list[int], temperature: float, top_p: float) -> np.ndarray:
    """P(x2) = sum_x1 P(x1) P(x2 | x1) under the target's warped distribution."""
    t, tp = torch.tensor([temperature]), torch.tensor([top_p])
    with torch.no_grad():
        first = sampling.warp(target(torch.tensor([prompt])).logits[:, -1:], t, tp)[0, 0]
        candidates = torch.nonzero(first).flatten()
        contexts = torch.tensor(prompt).expand(len(candidates), -1)
        contexts = torch.cat([contexts, candidates[:, None]], dim=1)
        logits = target(contexts).logits[:, -1:]
        second = sampling.warp(logits, t.expand(len(candidates)), tp.expand(len(candidates)))[:, 0]
    return (first[candidates, None] * second).sum(0).double().numpy()


@pytest.mark.parametrize("with_draft", [True, False])
def test_engine_sampling_follows_the_target_distribution(pair, with_draft):
    target, draft, tokenizer = pair
    draft = draft if with_draft else None
    prompt = tokenizer("The quick brown").input_ids
    temperature, top_p = 1.3, 0.95  # a flat distribution so the random draft is often rejected
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=16, max_seq_len=48))
    requests = [
        GenerationRequest(id=str(s), input_ids=prompt, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=s)
        for s in range(4000)
    ]
    results = engine.generate(requests)
    second = np.array([r.token_ids[1] for r in results if len(r.token_ids) > 1])
    kinds = np.array([r.feedback.kinds[1] for r in results if len(r.token_ids) > 1])
    if with_draft:
        assert (kinds == 0).mean() > 0.05 and (kinds == 1).mean() > 0.05, "need both accepted and recovered tokens"
    expected = exact_second_token_distribution(target, prompt, temperature, top_p)
    assert chi_square_pvalue(second, expected) > ALPHA


def test_sampling_is_reproducible_whatever_the_batch(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=8, max_seq_len=64))
    make = lambda i, text: GenerationRequest(  # noqa: E731
        id=str(i), input_ids=tokenizer(text).input_ids, max_new_tokens=20, temperature=0.9, seed=42 + i
    )
    alone = engine.generate([make(0, "def add(a, b):")])[0]
    crowded = engine.generate([make(5, "SELECT name"), make(0, "def add(a, b):"), make(6, "To be")])[1]
    assert alone.token_ids == crowded.token_ids
