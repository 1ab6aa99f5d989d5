"""Greedy speculative decoding is lossless for every proposer: the same tokens as transformers' greedy generate of
the target on its stock attention, with drafts the target accepts most of the time (so accepted, recovered and
bonus tokens all occur and are all compared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.engine import EngineSettings, PromptTooLongError, SpeculativeEngine
from pipelines.types import (
    KIND_ACCEPTED,
    KIND_BONUS,
    KIND_RECOVERED,
    NO_DRAFT_TOKEN,
    SOURCE_DRAFT,
    SOURCE_NONE,
    SOURCE_SUFFIX,
    GenerationRequest,
)
from tests.engine_fixtures import PROMPTS

NEW_TOKENS = 24
_reference: dict[tuple[int, ...], list[int]] = {}


def requests_for(tokenizer, indices, max_new_tokens: int = NEW_TOKENS, tag: str = "r") -> list[GenerationRequest]:
    return [
        GenerationRequest(id=f"{tag}{i}", input_ids=tokenizer(PROMPTS[i]).input_ids, max_new_tokens=max_new_tokens)
        for i in indices
    ]


def reference(models, request: GenerationRequest) -> list[int]:
    key = (*request.input_ids, -request.max_new_tokens)
    if key not in _reference:
        _reference[key] = models.reference_greedy(request.input_ids, request.max_new_tokens)
    return _reference[key]


def draft_model(models, draft: str | None):
    if draft == "head":
        return models.head
    if draft == "reduced":  # the head with a reduced draft vocabulary
        return models.reduced_head
    if draft == "fused":  # a head fused over lower target layers too
        return models.fused_head
    return {"strong": models.strong_draft, "weak": models.weak_draft, None: None}[draft]


def engine_for(models, proposer: str, k: int, draft="strong", **settings) -> SpeculativeEngine:
    """`proposer` may name the model after a '+': "hybrid+head" is proposer hybrid with the test head."""
    proposer, _, model = proposer.partition("+")
    draft_model_ = draft_model(models, model or draft)
    defaults = dict(max_batch_size=8, max_seq_len=160)
    return SpeculativeEngine(
        models.target,
        draft_model_,
        models.tokenizer,
        EngineSettings(proposer=proposer, k=k, **{**defaults, **settings}),
    )


def assert_lossless(models, engine, requests) -> list:
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        expected = reference(models, request)
        assert result.token_ids == expected, f"{request.id} via {engine.last_variant}"
        eos = models.tokenizer.eos_token_id
        assert result.finish_reason == ("eos" if expected[-1] == eos else "length")
    return results


@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize(
    "proposer",
    ["none", "draft", "head", "head+reduced", "head+fused", "suffix", "hybrid", "hybrid+head", "auto", "auto+head"],
)
def test_greedy_matches_transformers_generate(engine_models, proposer, batch_size, k):
    engine = engine_for(
        engine_models, proposer, k, draft="head" if proposer == "head" else "strong", auto={"k_choices": [k]}
    )
    # Mixed prompt lengths (1 to 40 tokens) in every batch; the stream first learns the other prompts' answers, so
    # suffix drafts come from the row itself and from earlier completions.
    batch = [(i * 5 + batch_size) % len(PROMPTS) for i in range(batch_size)]
    others = [i for i in range(len(PROMPTS)) if i not in batch]
    engine.add_to_stream([reference(engine_models, r) for r in requests_for(engine_models.tokenizer, others)])
    results = []
    for attempt in range(2):  # the second pass also finds the first pass's answers in the stream
        results += assert_lossless(
            engine_models, engine, requests_for(engine_models.tokenizer, batch, tag=f"p{attempt}")
        )
    accepted = sum(r.counters.accepted for r in results)
    drafted = sum(r.counters.drafted for r in results)
    if proposer in ("draft", "hybrid"):
        assert accepted > 0.3 * drafted, f"the strong draft should be accepted often: {accepted}/{drafted}"
    if proposer in ("head", "head+fused", "hybrid+head"):  # later slots read the head's own features: judge slot 1
        first = sum(r.counters.accepted_at_position[0] for r in results)
        rounds = sum(r.counters.draft_steps for r in results)
        assert first > 0.5 * rounds, f"the test head's first proposal should be accepted often: {first}/{rounds}"
    if proposer == "suffix":
        assert accepted > 0, "the second pass repeats the first: suffix drafts must be accepted"
    if proposer == "none":
        assert drafted == 0 and all(r.counters.target_forwards == r.counters.emitted for r in results)


def test_strong_draft_exercises_accepted_recovered_and_bonus_tokens(engine_models):
    engine = engine_for(engine_models, "draft", 4)
    results = assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, range(8)))
    kinds = np.concatenate([r.feedback.kinds[1:] for r in results])
    assert (kinds == KIND_ACCEPTED).mean() > 0.4
    assert (kinds == KIND_RECOVERED).sum() > 5 and (kinds == KIND_BONUS).sum() > 5
    for result in results:
        fb = result.feedback
        accepted = fb.kinds == KIND_ACCEPTED
        assert (fb.draft_tokens[accepted] == fb.token_ids[accepted]).all()
        recovered = fb.kinds == KIND_RECOVERED
        assert (fb.draft_tokens[recovered] != fb.token_ids[recovered]).all()
        assert (fb.draft_sources[accepted | recovered] == SOURCE_DRAFT).all()
        # every round of this proposer drafts k tokens
        assert result.counters.drafted == 4 * (result.counters.target_forwards - 1)
        assert result.counters.by_proposer["draft"]["drafted"] == result.counters.drafted


def test_batches_larger_than_max_batch_size_are_split_and_kept_in_order(engine_models):
    engine = engine_for(engine_models, "draft", 2, max_batch_size=3)
    requests = requests_for(engine_models.tokenizer, range(8), max_new_tokens=10)
    results = assert_lossless(engine_models, engine, requests)
    assert [r.id for r in results] == [r.id for r in requests]


def test_draft_equal_to_target_accepts_every_draft_token(engine_models):
    engine = SpeculativeEngine(
        engine_models.target,
        engine_models.target,
        engine_models.tokenizer,
        EngineSettings(proposer="draft", k=4, max_batch_size=8, max_seq_len=96),
    )
    results = engine.generate(requests_for(engine_models.tokenizer, range(8), max_new_tokens=21))
    for result in results:
        assert KIND_RECOVERED not in result.feedback.kinds.tolist()
        counters = result.counters
        if result.finish_reason == "length":  # 1 prefill token + 4 full steps of k + 1 = 5 tokens
            assert counters.target_forwards == 5 and counters.accepted == 16
            assert counters.accepted_at_position == [4, 4, 4, 4]
    assert any(r.finish_reason == "length" for r in results)


def test_target_only_mode_without_a_draft(engine_models):
    engine = engine_for(engine_models, "none", 5, draft=None)
    [result] = assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, [0]))
    assert result.counters.drafted == 0 and result.counters.target_forwards == result.counters.emitted
    assert result.feedback.draft_version == "none"
    assert (result.feedback.draft_sources == SOURCE_NONE).all()


def test_proposers_that_need_a_draft_model_refuse_to_start_without_one(engine_models):
    for proposer in ("draft", "hybrid", "head"):
        with pytest.raises(ValueError, match="needs a (draft|head)"):
            engine_for(engine_models, proposer, 3, draft=None)
    with pytest.raises(ValueError, match="'head' needs a head model, this engine has draft"):
        engine_for(engine_models, "head", 3, draft="strong")


def test_suffix_proposer_learns_a_repeated_stream(engine_models):
    """No draft model at all: the second pass over the same prompts finds the first pass's answers."""
    engine = engine_for(engine_models, "suffix", 8, draft=None)
    first = assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, range(8), tag="a"))
    second = assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, range(8), tag="b"))

    def avg_len(results):
        return sum(r.counters.emitted for r in results) / sum(r.counters.target_forwards for r in results)

    assert avg_len(second) > 2.0 * avg_len(first), (avg_len(first), avg_len(second))
    assert avg_len(second) > 4.0
    sources = np.concatenate([r.feedback.draft_sources for r in second])
    assert (sources == SOURCE_SUFFIX).any() and not (sources == SOURCE_DRAFT).any()
    assert engine.suffix_cache.sequences == 16


def test_feedback_is_complete_and_consistent_with_counters(engine_models):
    tokenizer, target = engine_models.tokenizer, engine_models.target
    engine = SpeculativeEngine(
        target,
        engine_models.strong_draft,
        tokenizer,
        EngineSettings(proposer="draft", k=3, max_batch_size=4, max_seq_len=96, top_m=5),
        draft_version="v7",
    )
    requests = requests_for(tokenizer, range(4), max_new_tokens=16)
    for request, result in zip(requests, engine.generate(requests)):
        fb, counters = result.feedback, result.counters
        n = len(result.token_ids)
        assert fb.token_ids.tolist() == result.token_ids and fb.prompt_ids.tolist() == request.input_ids
        assert fb.kinds.shape == (n,) and fb.draft_tokens.shape == (n,) and fb.draft_sources.shape == (n,)
        assert fb.target_topk_ids.shape == (n, 5) and fb.target_topk_logprobs.shape == (n, 5)
        assert fb.draft_version == "v7"
        kinds = fb.kinds.tolist()
        assert counters.emitted == n
        assert counters.accepted == kinds.count(KIND_ACCEPTED) == sum(counters.accepted_at_position)
        assert counters.mean_accepted_length == pytest.approx(n / counters.target_forwards)
        assert kinds.count(KIND_RECOVERED) + kinds.count(KIND_BONUS) <= counters.target_forwards
        assert kinds[0] == KIND_BONUS and fb.draft_tokens[0] == NO_DRAFT_TOKEN  # the prefill's token
        # The stored top-m log-probs are the target's own at each emitted position (no extra forward needed).
        sequence = torch.tensor([request.input_ids + result.token_ids[:-1]])
        with torch.no_grad():
            logits = engine_models.reference(sequence).logits[0, len(request.input_ids) - 1 :].float()
        top = torch.log_softmax(logits, -1).topk(5, dim=-1)
        assert torch.equal(top.indices, torch.from_numpy(fb.target_topk_ids).long())
        torch.testing.assert_close(top.values, torch.from_numpy(fb.target_topk_logprobs).float(), atol=2e-2, rtol=0)
        assert top.indices[:, 0].tolist() == result.token_ids  # greedy: the emitted token is the target's top-1


def test_stop_strings_and_max_new_tokens(engine_models):
    engine = engine_for(engine_models, "draft", 3, max_batch_size=2)
    base = requests_for(engine_models.tokenizer, [0])[0]
    [full] = engine.generate([base])
    stop = full.text[3:5]
    assert stop, "the reference completion is too short to pick a stop string from"
    stopped_request = GenerationRequest(id="s", input_ids=base.input_ids, max_new_tokens=24, stop=(stop,))
    short_request = GenerationRequest(id="m", input_ids=base.input_ids, max_new_tokens=2)
    stopped, short = engine.generate([stopped_request, short_request])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert full.text.startswith(stopped.text)
    assert full.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert short.token_ids == full.token_ids[:2] and short.finish_reason == "length"


def test_prompt_longer_than_the_cache_is_refused_with_a_clear_error(engine_models):
    engine = engine_for(engine_models, "draft", 3, max_batch_size=2, max_seq_len=32)
    with pytest.raises(PromptTooLongError, match="'long'.*40 tokens"):
        engine.generate([GenerationRequest(id="long", input_ids=[5] * 40)])


def test_swap_draft_changes_version_and_keeps_output_lossless(engine_models):
    engine = engine_for(engine_models, "draft", 3, max_batch_size=2)
    request = requests_for(engine_models.tokenizer, [0])[0]
    [before] = engine.generate([request])
    draft = engine_models.strong_draft
    original = {name: t.clone() for name, t in draft.state_dict().items()}
    perturbed = {
        name: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) for name, t in original.items()
    }
    try:
        engine.swap_draft(perturbed, "v-perturbed")
        [after] = engine.generate([request])
    finally:
        engine.swap_draft(original, "base")
    assert before.feedback.draft_version == "base" and after.feedback.draft_version == "v-perturbed"
    assert after.token_ids == before.token_ids == reference(engine_models, request)
    assert after.counters.accepted < before.counters.accepted  # the noisy weights really served


def test_swap_draft_refuses_weights_of_another_shape(engine_models):
    engine = engine_for(engine_models, "draft", 3, max_batch_size=2)
    with pytest.raises(ValueError, match="do not fit"):
        engine.swap_draft({"nonsense": torch.zeros(1)}, "bad")
    assert engine.draft_version == "base"


def test_a_head_with_a_reduced_draft_vocabulary_drafts_only_its_tokens_and_stays_lossless(engine_models):
    engine = engine_for(engine_models, "head+reduced", 4)
    tokenizer = engine_models.tokenizer
    requests = [GenerationRequest(f"r{i}", tokenizer(p).input_ids, max_new_tokens=24) for i, p in enumerate(PROMPTS)]
    results = assert_lossless(engine_models, engine, requests)
    allowed = set(engine_models.reduced_head.head.draft_vocab.tolist())
    drafted = [int(t) for r in results for t in r.feedback.draft_tokens if t != NO_DRAFT_TOKEN]
    assert drafted and set(drafted) <= allowed
    assert sum(r.counters.accepted for r in results) > 0
    assert any(t not in allowed for r in results for t in r.token_ids), "the target never needed a token outside"


def watched_windows(engine) -> list:
    """The windows' observations the engine hands its controller (which still gets them)."""
    observations, observe = [], engine.controller.observe
    engine.controller.observe = lambda o: (observations.append(o), observe(o))
    return observations


@pytest.mark.parametrize("proposer", ["suffix", "hybrid"])
def test_suffix_rounds_whose_k_drafts_all_pass_are_counted_as_capped_for_the_controller(engine_models, proposer):
    """The controller must know which rounds a larger k might have extended: a row whose k suffix drafts were all
    accepted. The engine's in-graph count equals what the feedback shows (two accepted suffix tokens and a bonus);
    in a hybrid only the rows that took the suffix draft count (the strong draft's full rounds do not)."""
    from pipelines.controller import GoodputController
    from pipelines.settings import ControllerSettings

    # the hybrid's rows take the suffix draft where its promise beats the model's: keep the strong draft's promise
    # low (a prior that evidence barely moves), so that both kinds of rows occur
    weak_model_prior = {"prior_alpha": 0.1, "prior_positions": 1e6}
    engine = engine_for(
        engine_models, proposer, 2, draft=None if proposer == "suffix" else "strong", auto=weak_model_prior
    )
    if engine.controller is None:  # a fixed suffix proposer has none: one only to receive the windows
        engine.controller = GoodputController(ControllerSettings(), engine.variants)
    observations = watched_windows(engine)
    results = []
    for tag in "ab":  # the second pass finds the first pass's answers in the stream
        results += assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, range(8), tag=tag))

    hist = sum(o.suffix_hist for o in observations)
    capped = sum(o.suffix_capped for o in observations)
    assert (capped <= hist).all() and capped[:, :2].sum() == 0  # only rounds with all k = 2 drafts accepted
    full_rounds = 0
    for result in results:  # a request's last round may end on its drafts: its bonus token was cut (length, EOS)
        kinds = [*result.feedback.kinds.tolist(), KIND_BONUS]
        sources = result.feedback.draft_sources.tolist()
        full_rounds += sum(
            kinds[i - 2 : i + 1] == [KIND_ACCEPTED, KIND_ACCEPTED, KIND_BONUS]
            and sources[i - 2] == sources[i - 1] == SOURCE_SUFFIX
            for i in range(2, len(kinds))
        )
    assert capped.sum() == full_rounds > 5
    # every active row-round had its match length counted, whichever draft it took; only suffix rows have outcomes
    exposure = sum(o.suffix_exposure for o in observations)
    assert exposure.sum() == sum(o.row_rounds for o in observations)
    if proposer == "suffix":
        assert (exposure == hist.sum(axis=1)).all()
    else:
        assert (exposure >= hist.sum(axis=1)).all() and exposure.sum() > hist.sum()


def test_shadow_proposals_count_capped_rounds_at_their_own_k(engine_models):
    """auto scores shadow suffix proposals in target-only windows: a proposal of k tokens that the target then
    emitted whole is capped at k; one cut short by its match is not (a larger k would not have drafted more)."""
    engine = engine_for(engine_models, "auto", 2, draft=None, auto={"k_choices": [2], "shadow_every": 1})
    observations = watched_windows(engine)
    for tag in "ab":
        assert_lossless(engine_models, engine, requests_for(engine_models.tokenizer, range(8), tag=tag))
    shadow = [o for o in observations if o.variant.proposer == "none" and o.suffix_hist is not None]
    hist = sum(o.suffix_hist for o in shadow)
    capped = sum(o.suffix_capped for o in shadow)
    assert (capped <= hist).all() and capped[:, :2].sum() == 0 and capped.sum() > 0
    assert (hist[:, 1:2] > 0).any()  # rounds with fewer accepted than k were scored too, and none is capped
