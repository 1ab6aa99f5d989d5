"""The four learners on a head (pipelines.heads.model.HeadDraft): the same fit as for a draft LM, on the head's own
parameters only, with the target's features computed once per request per fit; OSD trains where the head's own
proposals were rejected."""

from __future__ import annotations

import pytest
import torch

from pipelines.heads.model import DraftHead, HeadDraft
from pipelines.learners import LEARNER_NAMES, LearnerSettings, make_learner
from pipelines.learners.distill import mean_kl
from pipelines.replay import replay, served_by
from pipelines.types import KIND_RECOVERED
from tests.rounds_fixtures import stream

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
TINY_LR = 1e-2


@pytest.fixture(scope="module")
def rounds(head_target):
    """Two rounds of training feedback and a held-out set, decoded target-only from the homogeneous stream."""
    from pipelines.engine import EngineSettings, SpeculativeEngine

    target, tokenizer = head_target
    settings = EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256, top_m=8)
    engine = SpeculativeEngine(target, None, tokenizer, settings)
    decode = lambda count, seed: [r.feedback for r in engine.generate(stream(tokenizer, count, seed=seed))]  # noqa: E731
    return [decode(16, 0), decode(16, 1)], decode(12, 100)


def fresh_head(target, layers: int = 1) -> HeadDraft:
    return HeadDraft(DraftHead.for_target(target, num_layers=layers, init="random", seed=0), target)


def target_checksum(target) -> float:
    return float(sum(p.double().sum() for p in target.parameters()))


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_each_learner_fits_a_head_and_raises_its_heldout_avglen(head_target, rounds, name):
    target = head_target[0]
    (first, second), heldout = rounds
    draft = fresh_head(target)
    before = replay(draft, heldout, k=K).avg_len
    untouched = target_checksum(target)
    learner = make_learner(LearnerSettings(name=name, lr=TINY_LR, trainable="all", epochs=4, batch_size=4))
    report = learner.fit(draft, first, base_version="v0")
    assert report.loss_after < report.loss_before and report.details["rebased"]
    learner.note_candidate_version("v1")
    assert not learner.fit(draft, second, base_version="v1").details["rebased"]  # the promoted candidate continues
    after = replay(draft, heldout, k=K).avg_len
    print(f"{name}: held-out AvgLen {before:.3f} -> {after:.3f}")
    assert after >= 1.25 * before
    assert target_checksum(target) == untouched and not any(p.requires_grad for p in target.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in draft.parameters()) and not draft.training
    assert set(learner.names) == {n for n, _ in draft.named_parameters()}  # fc + layers: the head's own


def test_last_layers_trains_only_the_heads_last_layers(head_target, rounds):
    target = head_target[0]
    draft = fresh_head(target, layers=2)
    start = {n: t.clone() for n, t in draft.state_dict().items()}
    settings = LearnerSettings(name="online", lr=TINY_LR, trainable="last_layers", num_last_layers=1)
    report = make_learner(settings).fit(draft, rounds[0][0], base_version="v0")
    changed = {n for n, t in draft.state_dict().items() if not torch.equal(t, start[n])}
    assert changed and all(n.startswith("head.layers.1.") for n in changed)
    assert report.loss_after < report.loss_before


def test_the_targets_features_are_computed_once_per_request_per_fit(head_target, rounds):
    target = head_target[0]
    examples = rounds[0][0]
    rows_through_target = []
    hook = target.get_decoder().register_forward_hook(
        lambda m, args, kwargs, out: rows_through_target.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        settings = LearnerSettings(name="ensemble", lr=TINY_LR, trainable="all", epochs=2, batch_size=4)
        make_learner(settings).fit(fresh_head(target), examples, base_version="v0")
    finally:
        hook.remove()
    # 3 members x 2 epochs of steps, a loss per member, loss before and after: all from one pass per request
    assert sum(rows_through_target) == len(examples)


def test_osd_on_a_head_trains_where_its_own_proposals_were_rejected(head_target, rounds):
    target = head_target[0]
    (first, _), heldout = rounds
    draft = fresh_head(target)
    make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="all")).fit(draft, first, base_version="v0")
    as_served = served_by(draft, heldout, k=K, version="h1")  # the feedback had the head served it
    rejected = sum(int((e.kinds == KIND_RECOVERED).sum()) for e in as_served)
    assert 0 < rejected < sum(len(e.token_ids) for e in as_served)
    osd = make_learner(LearnerSettings(name="osd", lr=TINY_LR, trainable="all"))
    report = osd.fit(draft, as_served, base_version="h1")
    assert report.tokens == rejected  # every position a head prediction exists for: c >= 1 holds here
    assert report.loss_after < report.loss_before
    assert mean_kl(draft, as_served, positions="rejected")[1] <= rejected


@pytest.mark.parametrize(
    "weight, micro_batch_tokens, draft_vocab",
    [(0.0, 10**6, False), (0.5, 10**6, False), (0.5, 10**6, True), (0.5, 1, False)],
    ids=["kl-only", "chain", "chain-draft-vocab", "chain-micro-batched"],
)
def test_head_chain_weight_adds_the_bootstrap_loss_over_the_answers(
    head_target, rounds, weight, micro_batch_tokens, draft_vocab
):
    """One plain SGD step of a learner with head_chain_weight w moves the head by -lr x (the summed step-1 KL / n
    + w x the gradient of the bootstrap's two-step loss over the answers, each micro-batch's mean weighted by its
    share of the answer positions): the term is there, on the answers only, weighted as documented, over the draft
    vocabulary when the head has one; w = 0 is the step-1 KL alone."""
    from pipelines.heads.losses import HeadLossSettings, head_loss
    from pipelines.learners import distill
    from tests.head_fixtures import half_of_the_tokens, with_draft_vocab

    target = head_target[0]
    examples = distill.usable(rounds[0][0])[:6]
    chain_loss = HeadLossSettings(unroll=2, regression_weight=0.1, draft_vocab_only=True)  # what draft init trains
    lr = 0.05
    settings = LearnerSettings(
        name="online",
        lr=lr,
        optimizer="sgd",
        momentum=0.0,
        max_grad_norm=None,
        epochs=1,
        batch_size=len(examples),
        micro_batch_tokens=micro_batch_tokens,
        trainable="all",
        head_chain_weight=weight,
    )
    vocab = half_of_the_tokens([list(e.prompt_ids) + list(e.token_ids) for e in examples]) if draft_vocab else None
    fresh = lambda: fresh_head(target) if vocab is None else with_draft_vocab(fresh_head(target), vocab)  # noqa: E731
    draft, reference = fresh(), fresh().requires_grad_(True)

    batch = distill.batch_for(reference, examples, "cpu")
    n = batch.positions
    distill.forward_kl(distill.draft_logits(reference, batch), batch).sum().backward()
    step = {name: p.grad / n for name, p in reference.named_parameters()}
    answers = [len(e.token_ids) for e in examples]  # every prompt here is longer than one token
    chain_contribution = 0.0
    for group in distill.micro_batches(examples, micro_batch_tokens) if weight else []:
        reference.zero_grad(set_to_none=True)
        tokens = distill.batch_for(reference, group, "cpu").input_ids
        lengths = [len(e.prompt_ids) + len(e.token_ids) - 1 for e in group]
        starts = [len(e.prompt_ids) - 1 for e in group]
        share = sum(len(e.token_ids) for e in group) / sum(answers)
        head_loss(reference, tokens, lengths, chain_loss, backward=True, starts=starts)
        for name, p in reference.named_parameters():
            step[name] = step[name] + weight * share * p.grad
            chain_contribution = max(chain_contribution, lr * weight * share * float(p.grad.abs().max()))
    expected = {name: p.detach() - lr * step[name] for name, p in reference.named_parameters()}

    report = make_learner(settings).fit(draft, examples, base_version="v0")
    for name, p in draft.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6)
    if weight:  # the term moved the weights measurably, and its loss is recorded
        assert chain_contribution > 1e-4 and report.details["chain_loss_first"] > 0
    else:
        assert report.details["chain_loss_first"] is None
