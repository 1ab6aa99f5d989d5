"""Exact replay of heads: the engine's rounds simulated with draft_chain equal a plain re-computation of every
drafting step without any cache, whatever the batch, the window and the cut of each chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.learners.distill import batch_for
from pipelines.replay import greedy_chain, is_greedy, replay, served_by
from pipelines.types import KIND_ACCEPTED, KIND_BONUS, KIND_RECOVERED, NO_DRAFT_TOKEN, SOURCE_HEAD, GenerationRequest
from tests.head_fixtures import fitted_head, half_of_the_tokens, target_only, with_draft_vocab
from tests.test_replay import MAX_NEW, PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def feedback(head_target):
    target, tokenizer = head_target
    return target_only(target, tokenizer, PROMPTS, MAX_NEW)


@pytest.fixture(scope="module")
def head(head_target, feedback):
    return fitted_head(head_target[0], feedback)


@pytest.fixture(scope="module")
def fused(head_target, feedback):
    """A head fused over the tiny target's layers 1 and 2 beside its last (EAGLE-3 fusion), trained like `head`."""
    return fitted_head(head_target[0], feedback, feature_layers=(1, 2))


@pytest.fixture(scope="module")
def reduced(head, feedback):
    """The same head with a reduced draft vocabulary (half the tokens of the feedback)."""
    return with_draft_vocab(head, half_of_the_tokens([[*f.prompt_ids, *f.token_ids] for f in feedback]))


@torch.no_grad()
def naive_chain(draft, example, k: int) -> tuple[int, list[int]]:
    """(forwards, accepted per slot) by recomputing each drafting step from scratch: the true inputs at positions
    0 .. L-1 and the chain's own (d_j, g_j) after them, plain causal attention, no cache, one request alone."""
    sequence = torch.from_numpy(np.concatenate([example.prompt_ids, example.token_ids]).astype(np.int64))[None]
    features = draft.target_features(sequence[:, :-1])
    if draft.config.feature_layers:  # fused per position once, so the chain's own H-wide outputs can follow them
        features = draft.head.fused(features)
    prompt, last = len(example.prompt_ids), sequence.shape[1] - 1
    length, forwards, per_slot = prompt, 1, [0] * k
    while length < last:
        tokens, inputs = sequence[:, 1 : length + 1], features[:, :length]
        proposals = []
        for _ in range(k):
            outputs = draft(tokens, inputs, torch.arange(tokens.shape[1])[None])
            guess = draft.only_draft_vocab(draft.logits(outputs[:, -1])).argmax(-1)  # [1]
            proposals.append(int(guess))
            tokens = torch.cat([tokens, guess[:, None]], dim=1)
            inputs = torch.cat([inputs, outputs[:, -1:]], dim=1)
        accepted = 0
        while accepted < min(k, last - length) and proposals[accepted] == int(sequence[0, length + 1 + accepted]):
            per_slot[accepted] += 1
            accepted += 1
        forwards += 1
        length += accepted + 1
    return forwards, per_slot


@pytest.mark.parametrize("which", ["head", "reduced", "fused"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_head_replay_equals_drafting_recomputed_without_a_cache(request, feedback, k, which):
    """`reduced`: a head with a reduced draft vocabulary, recomputed here as the whole vocabulary's logits with the
    other tokens masked, drafted by the engine's function from its own rows of the LM head."""
    head = request.getfixturevalue(which)
    if which == "reduced":  # some of the target's tokens are ones this head cannot propose
        allowed = set(head.head.draft_vocab.tolist())
        assert any(int(token) not in allowed for f in feedback for token in f.token_ids)
    expected = [naive_chain(head, example, k) for example in feedback]
    for batch_size in (1, 4):  # alone, and in lockstep with rows of other lengths that finish earlier
        metrics = replay(head, feedback, k=k, batch_size=batch_size)
        assert metrics.forwards == sum(f for f, _ in expected)
        assert metrics.accepted_at_position == [sum(slots[j] for _, slots in expected) for j in range(k)]
        assert metrics.tokens == sum(len(f.token_ids) for f in feedback) and metrics.greedy_requests == len(feedback)
    assert metrics.accepted > 0 and metrics.forwards > len(feedback) + 1  # some rounds accept, some reject
    if k > 1:
        assert metrics.accepted_at_position[1] > 0  # step 2, from the head's own feature, is tested too


@pytest.mark.parametrize("which", ["head", "reduced"])
def test_one_draft_token_replays_like_the_teacher_forced_chain(request, feedback, which):
    """With k = 1 only step 1 drafts, and step 1 is teacher-forced: the draft LM formula holds (argmax_match and
    the chain over the draft vocabulary when the head has a reduced one)."""
    head = request.getfixturevalue(which)
    metrics = replay(head, feedback, k=1)
    scored = [greedy_chain(match, 1) for match in teacher_forced_matches(head, feedback)]
    assert metrics.forwards == sum(forwards for forwards, _ in scored)
    assert metrics.argmax_match == pytest.approx(
        sum(m[1:].sum() for m in teacher_forced_matches(head, feedback)) / sum(len(f.token_ids) - 1 for f in feedback)
    )


def teacher_forced_matches(head, feedback) -> list[np.ndarray]:
    batch = batch_for(head, feedback, "cpu")
    from pipelines.learners.distill import draft_logits

    with torch.no_grad():
        argmax = head.only_draft_vocab(draft_logits(head, batch)).argmax(-1).numpy()
    rows, index, tokens = batch.rows.numpy(), batch.index.numpy(), batch.tokens.numpy()
    matches = []
    for row, example in enumerate(feedback):
        match = np.zeros(len(example.token_ids), dtype=bool)
        mine = rows == row
        match[index[mine]] = argmax[mine] == tokens[mine]
        matches.append(match)
    return matches


def test_the_catch_up_window_changes_no_result(head, feedback):
    narrow, wide = replay(head, feedback, k=3), replay(head, feedback, k=3, window=9)
    assert (narrow.forwards, narrow.accepted_at_position) == (wide.forwards, wide.accepted_at_position)
    with pytest.raises(ValueError, match="window"):
        replay(head, feedback, k=3, window=3)


def test_sampled_requests_only_count_towards_acceptance(head, head_target, feedback):
    target, tokenizer = head_target
    sampled = target_only(target, tokenizer, PROMPTS, MAX_NEW, temperature=1.0)
    samples = [f for f in sampled if not is_greedy(f)]
    assert samples
    greedy = replay(head, feedback, k=3)
    mixed = replay(head, feedback + samples, k=3)
    assert (mixed.forwards, mixed.greedy_requests) == (greedy.forwards, greedy.greedy_requests)
    assert mixed.requests == len(feedback) + len(samples)
    assert mixed.acceptance_positions == sum(len(f.token_ids) - 1 for f in feedback + samples)
    assert 0 < greedy.acceptance <= greedy.acceptance_upper <= 1


def test_served_by_labels_the_heads_own_chain(head, feedback):
    k = 3
    relabeled = served_by(head, feedback, k=k, version="h1")
    metrics = replay(head, feedback, k=k)
    rounds = 0
    for example in relabeled:
        kinds = example.kinds
        proposed = example.draft_tokens != NO_DRAFT_TOKEN
        assert kinds[0] == KIND_BONUS and proposed.tolist() == (kinds != KIND_BONUS).tolist()
        assert (example.draft_sources == np.where(proposed, SOURCE_HEAD, 0)).all()
        accepted = kinds == KIND_ACCEPTED
        assert (example.draft_tokens[accepted] == example.token_ids[accepted]).all()
        recovered = kinds == KIND_RECOVERED
        assert (example.draft_tokens[recovered] != example.token_ids[recovered]).all()
        # a round ends in a recovered or bonus token, or at the end of the request
        rounds += int((kinds[1:] != KIND_ACCEPTED).sum()) + int(len(kinds) > 1 and kinds[-1] == KIND_ACCEPTED)
    assert metrics.forwards == len(feedback) + rounds
    assert sum(int((e.kinds == KIND_ACCEPTED).sum()) for e in relabeled) == metrics.accepted
    # OSD on a head: its kinds count where it drafted (every position of a request it drafted for)
    batch = batch_for(head, relabeled, "cpu")
    drafted = [bool((e.draft_tokens != NO_DRAFT_TOKEN).any()) for e in relabeled]
    assert batch.proposed.tolist() == [drafted[row] for row in batch.rows.tolist()] and any(drafted)


def head_engine(target, head, tokenizer, k: int):
    from pipelines.engine import EngineSettings, SpeculativeEngine

    settings = EngineSettings(proposer="head", k=k, max_batch_size=4, max_seq_len=160, top_m=16)
    return SpeculativeEngine(target, head, tokenizer, settings)


@pytest.mark.parametrize("which", ["head", "reduced", "fused"])
@pytest.mark.parametrize("k", [2, 4])
def test_head_replay_equals_the_engines_live_accounting(request, head_target, feedback, k, which):
    """Issue 12: replay of a head equals its live acceptance on the same requests, in float32: request by request,
    in batches, and predicted from target-only feedback (also with a reduced draft vocabulary)."""
    head = request.getfixturevalue(which)
    target, tokenizer = head_target
    engine = head_engine(target, head, tokenizer, k)
    requests = [
        GenerationRequest(f"r{i}", tokenizer(p).input_ids, max_new_tokens=n)
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))
    ]
    live = engine.generate(requests)
    window = engine.max_k + 1
    for result in live:
        metrics = replay(head, [result.feedback], k=k, window=window)
        counters = result.counters
        assert (metrics.tokens, metrics.forwards) == (counters.emitted, counters.target_forwards), result.id
        assert metrics.accepted_at_position == counters.accepted_at_position, result.id
    assert sum(r.counters.accepted for r in live) > 0
    predicted = replay(head, feedback, k=k, window=window, batch_size=3)  # target-only feedback, mixed lengths
    assert predicted.forwards == sum(r.counters.target_forwards for r in live)
    relabeled = served_by(head, feedback, k=k, version="h", window=window)
    for mine, theirs in zip(relabeled, (r.feedback for r in live)):
        assert mine.kinds.tolist() == theirs.kinds.tolist()
        assert mine.draft_tokens.tolist() == theirs.draft_tokens.tolist()
        assert mine.draft_sources.tolist() == theirs.draft_sources.tolist()
