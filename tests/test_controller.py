"""The goodput controller of proposer auto: target-only unless a proposer promises more tokens per second."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines.controller import BatchObservation, GoodputController
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.proposers import TARGET_ONLY, Variant
from pipelines.settings import ControllerSettings
from pipelines.types import GenerationRequest

SUFFIX, DRAFT, HYBRID = Variant("suffix", 4), Variant("draft", 4), Variant("hybrid", 4)
MAX_MATCH, MAX_K = 16, 4


def suffix_hist(accepted_per_round: int, rounds: int = 200) -> np.ndarray:
    hist = np.zeros((MAX_MATCH + 1, MAX_K + 1), dtype=np.int64)
    hist[8, accepted_per_round] = rounds
    return hist


def chain(k: int, rounds_by_accepted: dict[int, int]) -> np.ndarray:
    """Model evidence [passed, tested] x positions 1..k of rounds of k drafts, from rounds by accepted tokens: a round
    that accepted a passed positions 1..a and tested 1..min(a + 1, k)."""
    positions = np.zeros((2, k), dtype=np.int64)
    for accepted, rounds in rounds_by_accepted.items():
        positions[0, :accepted] += rounds
        positions[1, : min(accepted + 1, k)] += rounds
    return positions


def controller(**settings) -> GoodputController:
    return GoodputController(ControllerSettings(explore_every=0, **settings), [TARGET_ONLY, SUFFIX, DRAFT, HYBRID])


def price(ctl: GoodputController, bucket: int, **seconds: float) -> None:
    for variant in (TARGET_ONLY, SUFFIX, DRAFT, HYBRID):
        ctl.set_cost(bucket, variant, seconds[variant.proposer])


def test_target_only_when_every_proposer_is_made_expensive():
    ctl = controller()
    ctl.observe(
        BatchObservation(1, SUFFIX, 10, 0.01, suffix_hist=suffix_hist(accepted_per_round=3))
    )  # 4 tokens per round
    ctl.observe(BatchObservation(1, DRAFT, 10, 0.01, "v1", model_positions=chain(4, {4: 50, 2: 50})))
    price(ctl, 1, none=0.004, suffix=0.05, draft=0.05, hybrid=0.06)  # 12x target-only: 4 tokens do not pay
    assert ctl.choose(1, draft_version="v1") == TARGET_ONLY


def test_a_proposer_when_it_is_cheap_and_accepted():
    ctl = controller()
    ctl.observe(BatchObservation(1, SUFFIX, 10, 0.01, suffix_hist=suffix_hist(accepted_per_round=3)))
    price(ctl, 1, none=0.004, suffix=0.0045, draft=0.02, hybrid=0.021)
    assert ctl.choose(1) == SUFFIX
    assert ctl.expected_tokens(SUFFIX) == pytest.approx(4.0)
    # The draft model wins once it is cheap and accepted more often than suffix drafts.
    ctl.observe(BatchObservation(1, DRAFT, 10, 0.01, "v1", model_positions=chain(4, {4: 950, 2: 50})))
    price(ctl, 1, none=0.004, suffix=0.0045, draft=0.0045, hybrid=0.02)
    assert ctl.choose(1, draft_version="v1") == DRAFT


def test_no_evidence_and_equal_cost_keeps_target_only():
    ctl = controller()
    price(ctl, 1, none=0.004, suffix=0.004, draft=0.05, hybrid=0.05)
    assert ctl.choose(1) == TARGET_ONLY  # suffix promises nothing yet: target-only, with the margin


def test_the_margin_keeps_target_only_for_a_marginal_gain():
    ctl = controller(margin=0.1)
    ctl.observe(
        BatchObservation(1, SUFFIX, 10, 0.01, suffix_hist=suffix_hist(accepted_per_round=1))
    )  # 2 tokens per round
    price(ctl, 1, none=0.004, suffix=0.0075, draft=1.0, hybrid=1.0)  # 2 / 0.0075 = 267 vs 250 tokens/s: +7%
    assert ctl.choose(1) == TARGET_ONLY


def test_costs_follow_live_measurements_and_missing_ones_are_estimated():
    ctl = GoodputController(ControllerSettings(explore_every=0), [TARGET_ONLY, SUFFIX], model_cost_ratio=0.0)
    assert ctl.choose(1) == TARGET_ONLY  # nothing measured yet: target-only measures the bucket first
    ctl.observe(BatchObservation(1, TARGET_ONLY, 100, 0.4))
    assert ctl.cost(1, TARGET_ONLY) == pytest.approx(0.004)
    assert ctl.cost(1, SUFFIX) == pytest.approx(0.004 * 1.4)  # estimate: 10% per verified draft slot
    ctl.observe(BatchObservation(1, SUFFIX, 100, 0.9, suffix_hist=suffix_hist(accepted_per_round=4)))
    assert ctl.cost(1, SUFFIX) == pytest.approx(0.009)


def test_model_acceptance_is_per_draft_version_and_position_and_starts_from_the_prior():
    ctl = controller(prior_alpha=0.5, prior_positions=10)
    assert ctl.model_rates("new", 3) == pytest.approx([0.5, 0.5, 0.5])
    assert ctl.model_expected_accepted("new", 3) == pytest.approx(0.5 + 0.25 + 0.125)
    # 100 rounds of k = 2: 30 rejected at position 1, 20 at position 2, 50 passed both
    ctl.observe(
        BatchObservation(1, Variant("draft", 2), 100, 1.0, "v1", model_positions=chain(2, {0: 30, 1: 20, 2: 50}))
    )
    first = (70 + 10 * 0.5) / (100 + 10)
    second = (50 + 10 * first) / (70 + 10)  # starts from position 1's rate
    assert ctl.model_rates("v1", 4) == pytest.approx([first, second, second, second])  # untested: the one before
    assert ctl.model_expected_accepted("v1", 3) == pytest.approx(first + first * second + first * second**2)
    assert ctl.model_rates("v2", 2) == pytest.approx([0.5, 0.5])


def test_a_chain_whose_acceptance_falls_with_position_runs_at_the_k_that_pays():
    """A head that passes position 1 in 90% of rounds and later ones in 30%: one pooled rate over 4-draft rounds
    (0.57) would promise k = 8 the most tokens per second (2.29 tokens per 5.75 ms against 1.89 per 5 ms); per
    position, k = 2 pays most (2.17 per 5 ms against 2.29 per 5.75 ms)."""
    head2, head8 = Variant("head", 2), Variant("head", 8)
    ctl = GoodputController(ControllerSettings(explore_every=0, prior_positions=1), [TARGET_ONLY, head2, head8])
    rounds = 10_000
    positions = np.zeros((2, 8), dtype=np.int64)  # 4-draft rounds: 0.9 at position 1, then 0.3 per position
    survivors = rounds
    for j, rate in enumerate([0.9, 0.3, 0.3, 0.3]):
        positions[1, j] = survivors
        survivors = round(survivors * rate)
        positions[0, j] = survivors
    ctl.observe(BatchObservation(1, Variant("head", 4), 100, 1.0, "v1", model_positions=positions))
    for variant, seconds in ((TARGET_ONLY, 0.004), (head2, 0.005), (head8, 0.00575)):
        ctl.set_cost(1, variant, seconds)
    assert ctl.expected_tokens(head2, "v1") == pytest.approx(1 + 0.9 + 0.27, abs=1e-3)
    assert ctl.expected_tokens(head8, "v1") == pytest.approx(1 + 0.9 * sum(0.3**j for j in range(8)), abs=1e-3)
    assert ctl.choose(1, draft_version="v1") == head2


def test_exploration_tries_a_stale_draft_version_that_could_win():
    ctl = GoodputController(
        ControllerSettings(explore_every=4, prior_alpha=0.2, prior_positions=2), [TARGET_ONLY, DRAFT]
    )
    price_none, price_draft = 0.004, 0.006
    ctl.set_cost(1, TARGET_ONLY, price_none)
    ctl.set_cost(1, DRAFT, price_draft)
    ctl.observe(BatchObservation(1, DRAFT, 10, 0.06, "v1", model_positions=chain(4, {1: 50, 0: 450})))
    picks = [ctl.choose(1, draft_version="v1") for _ in range(8)]
    assert picks.count(TARGET_ONLY) == 8  # v1 is measured and poor: never explored
    picks = [ctl.choose(1, draft_version="v2") for _ in range(8)]  # a new version: optimistic, tried every 4th
    assert DRAFT in picks and picks.count(TARGET_ONLY) >= 6


def auto_engine(engine_models, **auto) -> SpeculativeEngine:
    """Proposer auto over the strong draft at k = 3, batches of up to 4, no exploration."""
    settings = EngineSettings(
        proposer="auto", max_batch_size=4, max_seq_len=96, auto={"k_choices": [3], "explore_every": 0, **auto}
    )
    return SpeculativeEngine(engine_models.target, engine_models.strong_draft, engine_models.tokenizer, settings)


def test_the_engine_decodes_target_only_when_speculation_is_made_expensive(engine_models):
    engine = auto_engine(engine_models, shadow_every=1)
    for variant in engine.variants:
        engine.controller.set_cost(4, variant, 1.0 if variant != TARGET_ONLY else 0.001)
    tokenizer = engine_models.tokenizer
    requests = [
        GenerationRequest(id=str(i), input_ids=tokenizer("The quick brown").input_ids, max_new_tokens=12)
        for i in range(4)
    ]
    for _ in range(3):
        results = engine.generate(requests)
        assert engine.last_variant == TARGET_ONLY
        assert all(r.counters.drafted == 0 for r in results)
    # ...and speculates once speculation is cheap again: suffix has seen this stream three times (shadow rounds).
    for variant in engine.variants:
        engine.controller.set_cost(4, variant, 0.001)
    engine.generate(requests)
    assert engine.last_variant.proposer in ("suffix", "draft", "hybrid")
    assert engine.controller.expected_tokens(Variant("suffix", 3)) > 2.0  # learned from shadow proposals


def test_a_variant_whose_batches_gain_less_than_its_rows_is_corrected_by_what_batches_really_got():
    """At batch 8 a batch runs until its slowest row finishes: suffix rounds that average 2 tokens per row can leave
    the batch with barely more than target-only's tokens per row and round."""
    ctl = controller()
    ctl.observe(BatchObservation(8, SUFFIX, 10, 0.01, suffix_hist=suffix_hist(accepted_per_round=1)))  # 2 per round
    price(ctl, 8, none=0.004, suffix=0.005, draft=1.0, hybrid=1.0)
    assert ctl.choose(8) == SUFFIX  # 2 / 0.005 = 400 vs 250 tokens/s per row expected
    for _ in range(8):  # batches of 8 rows, 120 rounds each (the slowest row), 1100 tokens: 1.15 per row and round
        ctl.observe(
            BatchObservation(
                8, SUFFIX, 120, 0.6, rows=8, tokens=1100, suffix_hist=suffix_hist(accepted_per_round=1, rounds=0)
            )
        )
    assert ctl.correction(8, SUFFIX) < 0.7
    assert ctl.choose(8) == TARGET_ONLY
    assert ctl.correction(1, SUFFIX) == 1.0  # batch size 1 is judged on its own


def test_a_draft_variant_with_only_an_estimated_cost_is_tried_once_and_kept_when_it_pays():
    """On CPU nothing is timed at warm-up: costs are estimates until a variant ran. A draft that could win on an
    optimistic estimate is tried from the second batch, and chosen from then on if what it measured pays."""
    ctl = GoodputController(ControllerSettings(explore_every=64), [TARGET_ONLY, DRAFT], model_cost_ratio=0.1)
    assert ctl.choose(1, draft_version="v1") == TARGET_ONLY
    ctl.observe(BatchObservation(1, TARGET_ONLY, 100, 1.0))  # 10 ms per round
    assert ctl.choose(1, draft_version="v1") == DRAFT  # explored: estimated 18 ms, optimistic acceptance
    ctl.observe(BatchObservation(1, DRAFT, 30, 0.54, "v1", model_positions=chain(4, {4: 20, 2: 10})))
    assert ctl.cost(1, DRAFT) == pytest.approx(0.018)
    assert [ctl.choose(1, draft_version="v1") for _ in range(3)] == [DRAFT] * 3  # ~4.3 tokens per 18 ms round


def test_suffix_acceptance_without_capped_rounds_is_the_plain_mean_of_min_a_k():
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, size=(MAX_MATCH + 1, MAX_K + 1))
    ctl = controller()
    ctl.observe(BatchObservation(1, SUFFIX, 10, 0.01, suffix_hist=hist))
    for k in range(1, MAX_K + 1):
        plain = (hist @ np.minimum(np.arange(MAX_K + 1), k)).sum() / hist.sum()
        assert ctl.expected_tokens(Variant("suffix", k)) == pytest.approx(1 + plain)


def test_rounds_whose_k_drafts_all_passed_do_not_cap_what_a_larger_k_is_expected_to_gain():
    """Measured on an H100 (Shakespeare, batch 8): auto kept suffix:4 at 1.44x target-only where suffix:8 ran at
    1.77x, because suffix:4's full rounds had counted as rounds that stopped at 4."""
    short, long = Variant("suffix", 2), Variant("suffix", 8)
    hist = np.zeros((MAX_MATCH + 1, 9), dtype=np.int64)
    hist[8, 2] = 100  # suffix:2 rounds, each accepting both drafts: censored at 2
    ctl = GoodputController(ControllerSettings(explore_every=0), [TARGET_ONLY, short, long])
    for variant, ms in ((TARGET_ONLY, 4.66), (short, 5.53), (long, 5.90)):
        ctl.set_cost(8, variant, ms / 1e3)
    ctl.observe(BatchObservation(8, short, 10, None, suffix_hist=hist, suffix_capped=hist.copy()))
    assert ctl.expected_tokens(short) == pytest.approx(3.0)
    assert ctl.expected_tokens(long) == pytest.approx(9.0)  # nothing stopped yet: the pass rate carries on
    assert ctl.choose(8) == long  # (the plain mean said 3 tokens for both, and suffix:2 is cheaper)

    stopped = np.zeros_like(hist)
    stopped[8, 4] = 100  # suffix:8 rounds that accepted 4 and were rejected at the 5th: 5 tokens each
    window = BatchObservation(8, long, 10, None, suffix_hist=stopped, suffix_capped=np.zeros_like(hist))
    ctl.observe(replace(window, row_rounds=100, tokens=500))
    assert ctl.correction(8, long) == pytest.approx(1.0)  # what the window taught is not also held against it
    # position 3 and 4 passed in every round that tested them, position 5 in none: 4 accepted, plus the bonus
    assert ctl.expected_tokens(long) == pytest.approx(5.0)
    assert ctl.expected_tokens(short) == pytest.approx(3.0)
    # (the plain mean of min(a, 8) over both kinds of rounds would say 1 + 3 for suffix:8)
    assert ctl.choose(8) == long


def test_a_round_tallies_each_sources_chain_positions_tested_and_passed():
    from types import SimpleNamespace

    from pipelines.decode_state import NUM_SOURCES, POSITION_PASSED, POSITION_TESTED
    from pipelines.round import count_drafts
    from pipelines.types import SOURCE_HEAD, SOURCE_SUFFIX

    rows = 4
    state = SimpleNamespace(
        batch_size=rows,
        active=torch.tensor([True, True, False, True]),
        drafted=torch.zeros(rows, dtype=torch.int64),
        draft_steps=torch.zeros(rows, dtype=torch.int64),
        source_counts=torch.zeros((rows, NUM_SOURCES, 4), dtype=torch.int64),
        position_tally=torch.zeros((NUM_SOURCES, 2, 5), dtype=torch.int64),
    )
    sources = torch.tensor([SOURCE_HEAD, SOURCE_SUFFIX, SOURCE_HEAD, SOURCE_HEAD], dtype=torch.uint8)
    counts = torch.tensor([4, 3, 4, 0])  # row 2 is inactive, row 3 drafted nothing: neither counts
    accepted = torch.tensor([2, 3, 4, 0])
    count_drafts(state, sources, counts, accepted)
    head, suffix = state.position_tally[SOURCE_HEAD], state.position_tally[SOURCE_SUFFIX]
    assert head[POSITION_PASSED].tolist() == [1, 1, 0, 0, 0]
    assert head[POSITION_TESTED].tolist() == [1, 1, 1, 0, 0]  # rejected at position 3
    assert suffix[POSITION_PASSED].tolist() == [1, 1, 1, 0, 0]
    assert suffix[POSITION_TESTED].tolist() == [1, 1, 1, 0, 0]  # all 3 passed: position 4 was never tested


def test_the_engine_hands_the_controller_what_its_draft_rounds_tested_and_passed(engine_models):
    engine = auto_engine(engine_models, decay=1.0)
    for variant in engine.variants:  # the draft LM alone is cheap: auto runs draft:3 from the start
        engine.controller.set_cost(4, variant, 0.001 if variant.proposer == "draft" else 1.0)
    engine.controller.set_cost(4, TARGET_ONLY, 0.01)
    tokenizer = engine_models.tokenizer
    requests = [
        GenerationRequest(id=str(i), input_ids=tokenizer(text).input_ids, max_new_tokens=20)
        for i, text in enumerate(["The quick brown", "Once upon a time", "def main(", "SELECT name FROM"])
    ]
    results = engine.generate(requests)
    assert engine.last_variant == Variant("draft", 3)
    rounds = sum(r.counters.by_proposer["draft"]["rounds"] for r in results)
    accepted = sum(r.counters.by_proposer["draft"]["accepted"] for r in results)
    evidence = engine.controller._model[engine.draft_version]
    assert rounds > 0 and 0 < accepted < 3 * rounds
    assert evidence.tested[0] == rounds  # every drafting round tests position 1
    assert evidence.passed.sum() == accepted
    assert np.all(np.diff(evidence.tested) <= 0) and np.all(evidence.passed <= evidence.tested)
    assert engine.controller.correction(4, Variant("draft", 3)) != 1.0  # the window's tokens reached it too


def test_match_lengths_are_weighed_by_the_rows_that_had_them_not_by_the_suffix_drafts_taken():
    """A hybrid gives rows with short matches the model's draft: their suffix outcome is unknown, but they are
    rows of the stream. 100 row-rounds took the suffix draft at match length 8 (3 accepted each), 300 took the
    model's at match length 0: suffix alone would gain 3 tokens on a quarter of the rows, the hybrid 3 there and
    the model's expectation on the rest."""
    ctl = controller(prior_alpha=0.4, prior_positions=1e9)  # the model's rates stay 0.4
    hist = suffix_hist(accepted_per_round=3, rounds=100)
    exposure = np.zeros(MAX_MATCH + 1, dtype=np.int64)
    exposure[8], exposure[0] = 100, 300
    ctl.observe(BatchObservation(1, HYBRID, 10, 0.01, suffix_hist=hist, suffix_exposure=exposure))
    model = 0.4 + 0.4**2 + 0.4**3 + 0.4**4
    assert ctl.expected_tokens(SUFFIX) == pytest.approx(1 + 3 * 100 / 400)
    assert ctl.expected_tokens(HYBRID) == pytest.approx(1 + (3 * 100 + model * 300) / 400)
    # a suffix window sees every row's outcome: without an exposure its rows are the exposure
    ctl = controller()
    ctl.observe(BatchObservation(1, SUFFIX, 10, 0.01, suffix_hist=hist))
    assert ctl.expected_tokens(SUFFIX) == pytest.approx(4.0)
