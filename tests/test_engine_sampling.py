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
from pipelines.types import KIND_ACCEPTED, KIND_RECOVERED, GenerationRequest
from pipelines.verify import verify_sampled

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


def emitted_tokens(draft_tokens, outcome) -> torch.Tensor:
    """[B, k + 1]: accepted draft tokens, then the recovered or bonus token at slot n (later slots: junk)."""
    emitted = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1)
    return emitted.scatter(1, outcome.accepted[:, None], outcome.next_token[:, None])


def assert_every_slot_follows_p(p, draft_tokens, outcome, k):
    emitted = emitted_tokens(draft_tokens, outcome)
    for slot in range(k + 1):
        rows = outcome.accepted >= slot  # rows that emit a token at this slot
        tokens = emitted[rows, slot].numpy()
        assert len(tokens) > 1000
        assert chi_square_pvalue(tokens, p[slot].numpy()) > ALPHA, f"slot {slot}"


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_emits_target_distribution_at_every_slot(k):
    batch, vocab = 40_000, 6
    p, q, seeds, first_position, draft_tokens = synthetic_step(batch, k, vocab, seed=k)
    counts = torch.full((batch,), k)
    outcome = verify_sampled(
        draft_tokens, counts, q.expand(batch, k, vocab), p.expand(batch, k + 1, vocab), seeds, first_position
    )
    assert_every_slot_follows_p(p, draft_tokens, outcome, k)
    # Acceptance rate of the first draft token is sum_x min(p, q) (the paper's alpha).
    alpha = torch.minimum(p[0], q[0]).sum().item()
    rate = outcome.accept_mask[:, 0].float().mean().item()
    assert rate == pytest.approx(alpha, abs=4 * (alpha * (1 - alpha) / batch) ** 0.5)


def test_a_deterministic_proposer_with_fewer_drafts_per_row_is_lossless():
    """One-hot q (suffix drafts) and per-row counts 0..k: every slot still has exactly p's distribution."""
    batch, vocab, k = 40_000, 6, 3
    p, _, seeds, first_position, _ = synthetic_step(batch, k, vocab, seed=7)
    draft_tokens = torch.stack([torch.full((batch,), int(p[j].argmax())) for j in range(k)], dim=1)  # likely tokens
    counts = torch.arange(batch) % (k + 1)
    outcome = verify_sampled(draft_tokens, counts, None, p.expand(batch, k + 1, vocab), seeds, first_position)
    assert (outcome.accepted <= counts).all()
    assert_every_slot_follows_p(p, draft_tokens, outcome, k)
    # A one-hot q accepts d with probability p(d).
    first = counts > 0
    rate = outcome.accept_mask[first, 0].float().mean().item()
    expected = p[0, int(p[0].argmax())].item()
    assert rate == pytest.approx(expected, abs=4 * (expected * (1 - expected) / int(first.sum())) ** 0.5)


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


PROMPT = "The quick brown"
TEMPERATURE, TOP_P = 0.9, 0.95


def conditional_distribution(models, prefix: list[int]) -> np.ndarray:
    """The target's warped next-token distribution after the prompt and `prefix` (one forward, stock attention)."""
    with torch.no_grad():
        logits = models.reference(torch.tensor([models.tokenizer(PROMPT).input_ids + prefix])).logits[:, -1:]
    return sampling.warp(logits, torch.tensor([TEMPERATURE]), torch.tensor([TOP_P]))[0, 0].double().numpy()


@pytest.mark.parametrize(
    "proposer, draft, min_accepted",
    [
        ("none", None, 0),
        ("draft", "strong", 100),
        ("draft", "weak", 20),
        ("head", "head", 100),
        ("head", "reduced", 50),  # a reduced draft vocabulary: q is zero outside it
        ("head", "fused", 100),  # fused over lower target layers too
        ("suffix", None, 100),
        ("hybrid", "strong", 100),
        ("hybrid", "head", 100),
    ],
)
def test_engine_sampling_follows_the_target_distribution_at_every_slot(engine_models, proposer, draft, min_accepted):
    """Samples share their first tokens often enough to test the distribution of token s given the most common
    prefix of s tokens, for s = 1..4: slots whose tokens are accepted drafts, recovered or bonus tokens. Requests
    ask for 5 to 8 tokens, so rows finish at different rounds and queued requests join the running batch in their
    slots (continuous batching); only the first 5 tokens are tested."""
    draft_model = draft_model_for(engine_models, draft)
    engine = SpeculativeEngine(
        engine_models.target,
        draft_model,
        engine_models.tokenizer,
        EngineSettings(proposer=proposer, k=3, max_batch_size=64, max_seq_len=32),
    )
    prompt = engine_models.tokenizer(PROMPT).input_ids
    greedy = engine_models.reference_greedy(prompt, 8)
    engine.add_to_stream([greedy], [prompt])  # suffix drafts propose the greedy path, often but not always right
    requests = [
        GenerationRequest(
            id=str(s), input_ids=prompt, max_new_tokens=5 + s % 4, temperature=TEMPERATURE, top_p=TOP_P, seed=s
        )
        for s in range(6000)
    ]
    results = [r for r in engine.generate(requests) if len(r.token_ids) >= 5]
    tokens = np.array([r.token_ids[:5] for r in results])
    kinds = np.array([r.feedback.kinds[:5] for r in results])
    if proposer != "none":
        for slot in (1, 2):
            assert (kinds[:, slot] == KIND_ACCEPTED).sum() > min_accepted, f"slot {slot}: too few accepted drafts"
            assert (kinds[:, slot] == KIND_RECOVERED).sum() > 50, f"slot {slot}: too few recovered tokens"
    for slot in range(1, 5):
        prefixes, counts = np.unique(tokens[:, :slot], axis=0, return_counts=True)
        prefix = prefixes[counts.argmax()]
        rows = (tokens[:, :slot] == prefix).all(axis=1)
        assert rows.sum() > 300, f"slot {slot}: the most common prefix has {rows.sum()} samples"
        expected = conditional_distribution(engine_models, prefix.tolist())
        assert chi_square_pvalue(tokens[rows, slot], expected) > ALPHA, f"slot {slot} given {prefix.tolist()}"


def draft_model_for(models, draft: str | None):
    if draft == "head":
        return models.head
    if draft == "reduced":
        return models.reduced_head
    if draft == "fused":
        return models.fused_head
    return {"strong": models.strong_draft, "weak": models.weak_draft, None: None}[draft]


def test_sampling_is_reproducible_whatever_the_batch(engine_models):
    """For a given proposer and draft version: another proposer drafts other tokens, so its accept/reject draws differ
    (the distribution is the target's either way)."""
    tokenizer = engine_models.tokenizer
    engine = SpeculativeEngine(
        engine_models.target,
        engine_models.strong_draft,
        tokenizer,
        EngineSettings(proposer="draft", k=3, max_batch_size=8, max_seq_len=64),
    )
    make = lambda i, text: GenerationRequest(  # noqa: E731
        id=str(i), input_ids=tokenizer(text).input_ids, max_new_tokens=20, temperature=0.9, seed=42 + i
    )
    alone = engine.generate([make(0, "def add(a, b):")])[0]
    crowded = engine.generate([make(5, "SELECT name"), make(0, "def add(a, b):"), make(6, "To be")])[1]
    assert alone.token_ids == crowded.token_ids
