"""Learners on a homogeneous synthetic stream: held-out KL down, held-out AvgLen up, guards, state and merges.

The stream: a tiny Qwen2 target that knows a small domain (briefly trained on templated Python one-liners, so
its greedy answers follow the domain instead of the chaos of a random network) answers prompts from the same
template family; the draft is the random-init tiny draft of devtools/tiny_models.py. Every round is served by the
speculative engine with the current draft, the learner trains on the round's feedback, the candidate is
promoted, and held-out requests (never trained on) are replayed with pipelines.replay.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from devtools.tiny_models import build_tokenizer, make_model_dir, tiny_config
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.learners import (
    LEARNER_NAMES,
    EnsembleLearner,
    LearnerSettings,
    NonFiniteError,
    OptimisticLearner,
    make_learner,
)
from pipelines.learners.base import trainable_parameters
from pipelines.learners.distill import collate, draft_logits, forward_kl, mean_kl
from pipelines.learners.optimistic import OptimisticGD
from pipelines.models import load_model
from pipelines.replay import replay
from pipelines.types import GenerationRequest

K = 3
ROUNDS = 3
PER_ROUND = 24
NEW_TOKENS = 32
FUNCTIONS = ["add", "sub", "mul", "div", "total", "count", "scale", "merge", "pick", "shift", "clip", "mix"]
VARIABLES = ["a", "b", "x", "y", "i", "n"]
OPERATORS = ["+", "-", "*"]
# AdamW learning rate for the tiny random-init draft (hidden 32), far above a pretrained 0.5B draft's (5e-6).
TINY_LR = 1e-2


def one_liner(rng: random.Random) -> str:
    a, b = rng.sample(VARIABLES, 2)
    return f"def {rng.choice(FUNCTIONS)}({a}, {b}):\n    return {a} {rng.choice(OPERATORS)} {b}\n\n"


def domain_prompt(rng: random.Random) -> str:
    return one_liner(rng) + one_liner(rng) + "def "


# one_thread (tests/rounds_fixtures.py): one torch thread on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """(target, draft, tokenizer): a target trained for 60 steps on the domain, the random tiny draft."""
    root = tmp_path_factory.mktemp("domain")
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    corpus = torch.tensor(tokenizer("".join(one_liner(rng) for _ in range(150))).input_ids)
    torch.manual_seed(1)
    target = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), 4, 64, tokenizer.eos_token_id))
    optimizer = torch.optim.AdamW(target.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(corpus) - 49, (8,))
        windows = torch.stack([corpus[s : s + 48] for s in starts])
        loss = target(input_ids=windows, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    draft_dir = make_model_dir(root / "draft", tokenizer, layers=2, hidden=32, seed=2)
    return load_model(str(root / "target")), load_model(str(draft_dir)), tokenizer


def domain_requests(tokenizer, seed: int, count: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    prompts = [tokenizer(domain_prompt(rng)).input_ids for _ in range(count)]
    return [GenerationRequest(f"{seed}-{i}", ids, max_new_tokens=NEW_TOKENS) for i, ids in enumerate(prompts)]


def new_engine(target, draft, tokenizer) -> SpeculativeEngine:
    settings = EngineSettings(proposer="draft", k=K, max_batch_size=8, max_seq_len=160)
    return SpeculativeEngine(target, draft, tokenizer, settings, draft_version="v0")


@pytest.fixture(scope="module")
def held_out(domain):
    target, draft, tokenizer = domain
    engine = new_engine(target, copy.deepcopy(draft), tokenizer)
    return [r.feedback for r in engine.generate(domain_requests(tokenizer, 999, 32))]


@pytest.fixture(scope="module")
def static_rounds(domain):
    """Feedback of the training rounds served by the initial draft (for tests that need no live loop)."""
    target, draft, tokenizer = domain
    engine = new_engine(target, copy.deepcopy(draft), tokenizer)
    rounds = [domain_requests(tokenizer, seed, PER_ROUND) for seed in range(ROUNDS)]
    return [[r.feedback for r in engine.generate(requests)] for requests in rounds]


def serve_and_learn(domain, held_out, settings: LearnerSettings) -> dict:
    """The round loop without a gate: serve with the active draft, fit, promote the candidate, replay held-out."""
    target, draft, tokenizer = domain
    learner = make_learner(settings)
    training = copy.deepcopy(draft)  # the caller's training copy: active weights in, candidate out
    engine = new_engine(target, copy.deepcopy(draft), tokenizer)
    history = {"avg_len": [replay(training, held_out, k=K).avg_len], "kl": [mean_kl(training, held_out)[0]]}
    version = "v0"
    for round_index in range(ROUNDS):
        feedback = [r.feedback for r in engine.generate(domain_requests(tokenizer, round_index, PER_ROUND))]
        assert all(f.draft_version == version for f in feedback)
        report = learner.fit(training, feedback, base_version=version)
        assert report.details["rebased"] == (round_index == 0)  # promoted candidates continue
        version = f"v{round_index + 1}"
        engine.swap_draft(training, version)
        history["avg_len"].append(replay(training, held_out, k=K).avg_len)
        history["kl"].append(mean_kl(training, held_out)[0])
    history["learner"] = learner
    return history


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_each_learner_lowers_held_out_kl_and_raises_avg_len_by_25_percent(domain, held_out, name):
    settings = LearnerSettings(name=name, lr=TINY_LR, trainable="all")
    history = serve_and_learn(domain, held_out, settings)
    before, after = history["avg_len"][0], history["avg_len"][-1]
    rounded = {key: [round(x, 3) for x in history[key]] for key in ("avg_len", "kl")}
    print(f"{name}: held-out AvgLen {rounded['avg_len']}, KL {rounded['kl']}")
    assert history["kl"][-1] < 0.7 * history["kl"][0]
    # The bar: after 3 rounds the held-out AvgLen is at least 25% above the initial draft's.
    assert after >= 1.25 * before, f"{name}: {before:.3f} -> {after:.3f}"


def test_parameter_efficient_training_only_touches_the_last_layers(domain, static_rounds, held_out):
    _, draft, _ = domain
    training = copy.deepcopy(draft)
    settings = LearnerSettings(name="online", lr=TINY_LR, trainable="last_layers", num_last_layers=1)
    report = make_learner(settings).fit(training, static_rounds[0], base_version="v0")
    changed = {n for n, p in training.named_parameters() if not torch.equal(p, dict(draft.named_parameters())[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert report.loss_after < report.loss_before
    assert not any(p.requires_grad or p.grad is not None for p in training.parameters()) and not training.training

    layers = make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="layers"))
    training = copy.deepcopy(draft)
    layers.fit(training, static_rounds[0], base_version="v0")
    changed = {n for n, p in training.named_parameters() if not torch.equal(p, dict(draft.named_parameters())[n])}
    assert changed and all(n.startswith("model.layers.") for n in changed)  # embeddings, norm, lm_head frozen


def test_a_bfloat16_draft_trains_through_float32_masters(domain, static_rounds):
    """The module computes in bfloat16; the optimizer steps float32 masters, so small steps are not rounded away."""
    _, draft, _ = domain
    training = copy.deepcopy(draft).to(torch.bfloat16)
    learner = make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="all"))
    report = learner.fit(training, static_rounds[0], base_version="v0")
    assert all(p.dtype == torch.bfloat16 for p in training.parameters())
    assert all(w.dtype == torch.float32 for w in learner.members[0].weights)
    for p, w in zip(training.parameters(), learner.members[0].weights):
        assert torch.equal(p, w.to(torch.bfloat16))
    assert report.loss_after < 0.8 * report.loss_before
    assert not learner.fit(training, static_rounds[1], base_version="v1").details["rebased"]


def test_a_huge_learning_rate_raises_non_finite_error_and_resets_the_learner(domain, static_rounds):
    _, draft, _ = domain
    settings = LearnerSettings(name="online", lr=1e3, optimizer="sgd", momentum=0.0, max_grad_norm=None)
    learner = make_learner(settings)
    training = copy.deepcopy(draft)
    with pytest.raises(NonFiniteError):
        learner.fit(training, static_rounds[0], base_version="v0")
    assert learner.members == [] and learner.state_summary()["rounds_since_rebase"] == 0
    assert not any(p.requires_grad or p.grad is not None for p in training.parameters())
    # the caller keeps the active draft; the next round re-bases on it and trains normally
    good = make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="all"))
    report = good.fit(copy.deepcopy(draft), static_rounds[0], base_version="v0")
    assert report.loss_after < report.loss_before


def test_a_large_but_finite_learning_rate_gives_a_worse_candidate(domain, static_rounds, held_out):
    """Clipped but far too large: no NaN, yet the candidate replays worse than a sane one (the gate's job)."""
    _, draft, _ = domain
    sane, wild = copy.deepcopy(draft), copy.deepcopy(draft)
    for model, lr in ((sane, TINY_LR), (wild, 3.0)):
        learner = make_learner(LearnerSettings(name="online", lr=lr, trainable="all"))
        learner.fit(model, static_rounds[0], base_version="v0")
    assert all(torch.isfinite(p).all() for p in wild.parameters())
    assert replay(wild, held_out, k=K).avg_len < replay(sane, held_out, k=K).avg_len
    assert mean_kl(wild, held_out)[0] > mean_kl(sane, held_out)[0]


def test_ensemble_weights_follow_losses_and_the_candidate_is_the_weighted_merge(domain, static_rounds):
    _, draft, _ = domain
    settings = LearnerSettings(name="ensemble", lr=TINY_LR, trainable="all", ensemble_size=3, ensemble_lr_ratio=4.0)
    learner = make_learner(settings)
    assert isinstance(learner, EnsembleLearner)
    training = copy.deepcopy(draft)
    for round_index, feedback in enumerate(static_rounds):
        report = learner.fit(training, feedback, base_version=f"v{round_index}")
    weights = report.details["weights"]
    assert sum(weights) == pytest.approx(1.0)
    assert [m.lr for m in learner.members] == pytest.approx([2.5e-3, 1e-2, 4e-2])
    cumulative = report.details["cumulative_losses"]
    assert weights.index(max(weights)) == cumulative.index(min(cumulative))
    assert sorted(weights) == [w for _, w in sorted(zip(cumulative, weights), reverse=True)]  # lower loss, more weight
    assert learner.weights() == pytest.approx(
        torch.softmax(-settings.hedge_eta * torch.tensor(cumulative, dtype=torch.float64), 0).tolist()
    )
    params = dict(training.named_parameters())
    for name in learner.names:
        merged = sum(w * learner.member_weights(i)[name] for i, w in enumerate(weights))
        torch.testing.assert_close(params[name], merged, rtol=0, atol=1e-6)
    summary = learner.state_summary()
    assert summary["weights"] == pytest.approx(weights) and len(summary["cumulative_losses"]) == 3
    json.dumps([report.to_dict(), summary], allow_nan=False)  # recorded with the round


def test_hedge_losses_are_measured_before_training_on_the_round(domain, static_rounds):
    _, draft, _ = domain
    learner = make_learner(LearnerSettings(name="ensemble", lr=TINY_LR, trainable="all"))
    training = copy.deepcopy(draft)
    report = learner.fit(training, static_rounds[0], base_version="v0")
    before = mean_kl(draft, static_rounds[0])[0]  # every member starts as the given draft
    assert report.details["member_losses_before"] == pytest.approx([before] * 3, rel=1e-5)
    assert report.details["weights"] == pytest.approx([1 / 3] * 3)


def test_optimistic_step_is_x_minus_lr_times_two_g_minus_previous_g():
    x = torch.tensor([1.0], requires_grad=False)
    optimizer = OptimisticGD([x], lr=0.1, precondition="sgd")
    gradients = [torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.5])]
    expected = 1.0 - 0.1 * 2.0  # the first step has no previous gradient: a plain step
    previous = gradients[0]
    x.grad = gradients[0]
    optimizer.step()
    assert float(x) == pytest.approx(expected)
    for g in gradients[1:]:
        x.grad = g
        optimizer.step()
        expected -= 0.1 * float(2 * g - previous)
        previous = g
        assert float(x) == pytest.approx(expected)


def test_optimistic_learner_carries_the_previous_gradient_across_rounds(domain, static_rounds):
    """End to end on the tiny draft: one step per round, so round 2's update is -lr (2 g_1 - g_0) exactly."""
    _, draft, _ = domain
    lr = 0.05
    settings = LearnerSettings(
        name="optimistic",
        optimizer="sgd",
        lr=lr,
        epochs=1,
        batch_size=PER_ROUND,
        max_grad_norm=None,
        trainable="last_layers",
        num_last_layers=1,
    )
    learner = make_learner(settings)
    assert isinstance(learner, OptimisticLearner)
    training = copy.deepcopy(draft)

    def gradient(model, feedback) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(model)
        params = trainable_parameters(model, settings)
        for p in params.values():
            p.requires_grad_(True)
        batch = collate(feedback, "cpu")
        forward_kl(draft_logits(model, batch), batch).mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    theta0 = {n: p.clone() for n, p in trainable_parameters(training, settings).items()}
    g0 = gradient(training, static_rounds[0])
    learner.fit(training, static_rounds[0], base_version="v0")
    theta1 = {n: p.clone() for n, p in trainable_parameters(training, settings).items()}
    for n in theta0:
        torch.testing.assert_close(theta1[n], theta0[n] - lr * g0[n], rtol=1e-4, atol=1e-6)
    assert learner.state_summary()["has_previous_direction"]

    g1 = gradient(training, static_rounds[1])
    report = learner.fit(training, static_rounds[1], base_version="v1")
    assert not report.details["rebased"] and report.steps == 1
    theta2 = dict(trainable_parameters(training, settings))
    for n in theta0:
        torch.testing.assert_close(theta2[n], theta1[n] - lr * (2 * g1[n] - g0[n]), rtol=1e-4, atol=1e-6)


def test_momentum_variant_keeps_its_buffer_across_promoted_rounds(domain, static_rounds):
    _, draft, _ = domain
    settings = LearnerSettings(name="optimistic", optimistic_variant="momentum", lr=0.05, trainable="all")
    learner = make_learner(settings)
    training = copy.deepcopy(draft)
    learner.fit(training, static_rounds[0], base_version="v0")
    buffers = [s["momentum_buffer"].clone() for s in learner.members[0].optimizer.state.values()]
    report = learner.fit(training, static_rounds[1], base_version="v1")
    assert not report.details["rebased"]
    assert learner.state_summary()["has_momentum_buffer"] and isinstance(learner.members[0].optimizer, torch.optim.SGD)
    after = [s["momentum_buffer"] for s in learner.members[0].optimizer.state.values()]
    assert len(after) == len(buffers) and not all(torch.equal(a, b) for a, b in zip(after, buffers))


@pytest.mark.parametrize("name", ["online", "ensemble"])
def test_a_different_base_resets_the_state(domain, static_rounds, name):
    _, draft, _ = domain
    learner = make_learner(LearnerSettings(name=name, lr=TINY_LR, trainable="all"))
    training = copy.deepcopy(draft)
    first = learner.fit(training, static_rounds[0], base_version="v0")
    assert first.details["rebased"]
    # the candidate was promoted (as v1): the state continues
    second = learner.fit(training, static_rounds[1], base_version="v1")
    assert not second.details["rebased"]
    assert learner.state_summary()["rounds_since_rebase"] == 2
    steps = learner.members[0].steps
    # an operator rolled back to v0 (or the last candidate was rejected): the learner re-bases on v0's weights
    rolled_back = copy.deepcopy(draft)
    third = learner.fit(rolled_back, static_rounds[2], base_version="v0")
    assert third.details["rebased"] and "not the last candidate" in third.details["rebase_reason"]
    assert learner.synced_version == "v0" and learner.state_summary()["rounds_since_rebase"] == 1
    assert learner.members[0].steps < steps  # fresh optimizer state
    if name == "ensemble":
        assert third.details["member_losses_before"] == pytest.approx([third.loss_before] * 3, rel=1e-5)
        assert third.details["cumulative_losses"] == third.details["member_losses_before"]


@pytest.mark.parametrize("after_rejection", ["rebase", "continue"])
def test_after_a_rejected_candidate(domain, static_rounds, after_rejection):
    """The gate kept v0 active, so the next fit gets v0 again: re-base on it, or keep training the shadow."""
    _, draft, _ = domain
    learner = make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="all", after_rejection=after_rejection))
    rejected = copy.deepcopy(draft)
    learner.fit(rejected, static_rounds[0], base_version="v0")
    active = copy.deepcopy(draft)
    report = learner.fit(active, static_rounds[1], base_version="v0")
    if after_rejection == "rebase":
        assert report.details["rebased"] and "was not taken" in report.details["rebase_reason"]
        assert report.loss_before == pytest.approx(mean_kl(draft, static_rounds[1])[0], rel=1e-5)
    else:
        assert not report.details["rebased"] and learner.members[0].steps == 12
        assert report.loss_before == pytest.approx(mean_kl(rejected, static_rounds[1])[0], rel=1e-5)


def test_a_re_rounded_candidate_continues_under_its_noted_version(domain, static_rounds):
    """Storage may save the candidate in lower precision; the version id still identifies it."""
    _, draft, _ = domain
    learner = make_learner(LearnerSettings(name="online", lr=TINY_LR, trainable="all"))
    training = copy.deepcopy(draft)
    learner.fit(training, static_rounds[0], base_version="v0")
    learner.note_candidate_version("v7")
    reloaded = copy.deepcopy(training).to(torch.bfloat16).to(torch.float32)  # what a bfloat16 checkpoint gives back
    report = learner.fit(reloaded, static_rounds[1], base_version="v7")
    assert not report.details["rebased"]
    other = copy.deepcopy(training).to(torch.bfloat16).to(torch.float32)
    learner.note_candidate_version("v8")
    assert learner.fit(other, static_rounds[2], base_version="v9").details["rebased"]


def test_osd_trains_on_rejected_positions_and_falls_back_for_target_only_feedback(domain, static_rounds):
    target, draft, tokenizer = domain
    learner = make_learner(LearnerSettings(name="osd", lr=TINY_LR, trainable="all"))
    report = learner.fit(copy.deepcopy(draft), static_rounds[0], base_version="v0")
    rejected = sum(int((f.kinds == 1).sum()) for f in static_rounds[0])
    assert report.tokens == rejected and report.loss_after < report.loss_before

    engine = SpeculativeEngine(
        target, None, tokenizer, EngineSettings(proposer="none", max_batch_size=8, max_seq_len=160)
    )
    target_only = [r.feedback for r in engine.generate(domain_requests(tokenizer, 5, 8))]
    fallback = make_learner(LearnerSettings(name="osd", lr=TINY_LR, trainable="all"))
    report = fallback.fit(copy.deepcopy(draft), target_only, base_version="v0")
    batch = collate(target_only, "cpu")
    with torch.no_grad():
        mismatched = int((draft_logits(draft, batch).argmax(-1) != batch.tokens).sum())
    assert 0 < report.tokens == mismatched  # where the draft being trained would be rejected
    assert report.steps > 0 and report.loss_after < report.loss_before


def test_settings_reject_unknown_keys_and_names():
    with pytest.raises(ValueError):
        LearnerSettings(name="online", learning_rate=1e-3)
    with pytest.raises(ValueError):
        LearnerSettings(name="sgd")
    assert set(LEARNER_NAMES) == {"osd", "online", "optimistic", "ensemble"}
    assert LearnerSettings().trainable == "layers" and LearnerSettings().max_grad_norm == 1.0


def test_target_temperature_sharpens_the_kl_toward_the_targets_argmax(domain, static_rounds):
    """tau = 1: KL to the renormalised stored top-m; tau -> 0: cross-entropy of the target's top-1; and a learner
    with target_temperature measures (and so trains on) that same loss."""
    _, draft, _ = domain
    batch = collate(static_rounds[0], "cpu")
    with torch.no_grad():
        logits = draft_logits(draft, batch)
    log_q = torch.log_softmax(logits, dim=-1)
    p = torch.softmax(batch.topk_logprobs, dim=-1)
    expected = (p * (p.log() - log_q.gather(1, batch.topk_ids))).sum(-1)
    torch.testing.assert_close(forward_kl(logits, batch), expected, rtol=1e-4, atol=1e-5)

    top2 = batch.topk_logprobs.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.1  # a clear favourite: at tau 0.01 the runner-up weighs < e^-10
    assert clear.sum() > 10
    favourite = batch.topk_ids.gather(1, batch.topk_logprobs.argmax(-1, keepdim=True))
    cross_entropy = -log_q.gather(1, favourite).squeeze(1)
    torch.testing.assert_close(forward_kl(logits, batch, 0.01)[clear], cross_entropy[clear], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(forward_kl(logits, batch, 0.01)[clear], expected[clear], rtol=1e-2)

    learner = make_learner(LearnerSettings(name="online", lr=1e-3, epochs=1, target_temperature=0.25))
    report = learner.fit(copy.deepcopy(draft), static_rounds[0], base_version="v0")
    assert report.loss_before == pytest.approx(mean_kl(draft, static_rounds[0], temperature=0.25)[0], rel=1e-5)
    assert report.loss_before != pytest.approx(mean_kl(draft, static_rounds[0])[0], rel=1e-3)


def test_osd_trains_on_the_draft_models_rejections_and_not_on_positions_suffix_drafted():
    import numpy as np

    from pipelines.learners.distill import model_verified
    from pipelines.types import (
        KIND_ACCEPTED,
        KIND_BONUS,
        KIND_RECOVERED,
        SOURCE_DRAFT,
        SOURCE_NONE,
        SOURCE_SUFFIX,
        RequestFeedback,
    )

    def feedback(kinds, sources, drafts):
        n = len(kinds)
        return RequestFeedback(
            np.array([1, 2], np.int32),
            np.arange(n, dtype=np.int32),
            np.array(kinds, np.uint8),
            np.array(drafts, np.int32),
            np.zeros((n, 2), np.int32),
            np.zeros((n, 2), np.float16),
            "v0",
            None if sources is None else np.array(sources, np.uint8),
        )

    kinds = [KIND_BONUS, KIND_ACCEPTED, KIND_RECOVERED, KIND_ACCEPTED, KIND_RECOVERED, KIND_BONUS]
    mixed = feedback(
        kinds,
        [SOURCE_NONE, SOURCE_DRAFT, SOURCE_DRAFT, SOURCE_SUFFIX, SOURCE_SUFFIX, SOURCE_NONE],
        [-1, 1, 9, 3, 9, -1],
    )
    assert model_verified(mixed).tolist() == [True, True, True, False, False, True]
    legacy = feedback(kinds, None, [-1, 1, 9, 3, 9, -1])
    assert model_verified(legacy).all()
    suffix_only = feedback(
        kinds,
        [SOURCE_NONE, SOURCE_SUFFIX, SOURCE_SUFFIX, SOURCE_SUFFIX, SOURCE_SUFFIX, SOURCE_NONE],
        [-1, 1, 9, 3, 9, -1],
    )
    assert not model_verified(suffix_only).any()
