"""The goodput controller behind `engine.proposer: auto`: for each *window* of rounds (a batch with static batching,
`auto.window_rounds` rounds with continuous batching) the variant (proposer and k, target-only included) with the
highest expected tokens per second.

    goodput(v) = expected tokens per row and round of v * correction / seconds per round of v at this batch bucket

Costs: on CUDA every (bucket, variant) is timed at warm-up (graph replays); then each follows the live seconds per
round of the windows that ran it. A cost not measured yet (on CPU nothing is timed at warm-up: an eager round of a
real model can take seconds) is estimated from target-only's at the same bucket, which the first window of a
bucket measures: verifying k more tokens adds 10% per token and each model step (draft LM or head) costs its share
of the target's parameters. One window of the variant then replaces the estimate. Expected tokens per round:

    none:0       1
    suffix:k     1 + E[min(a, k)] over hist[m, a], the accepted suffix tokens seen per round at match length m, from
                 real suffix rounds and from shadow proposals scored in every `shadow_every`-th window
                 without suffix drafts; a round whose k drafts all passed is censored at k (a larger k
                 might have gained more), so the estimate is a product of per-position pass rates
                 (Kaplan-Meier), not a plain mean: measured on an H100, auto kept suffix:4 on a Shakespeare
                 stream at batch 8 (1.44x target-only) where suffix:8 ran at 1.77x, because suffix:4's full
                 rounds had counted as rounds that stopped at 4. E over m weighs each match length by the
                 row-rounds that had it (exposure), counting the rows a hybrid gave the model, whose suffix
                 outcome is unknown: the outcomes alone over-represent long matches
    draft:k,     1 + r_1 + r_1 r_2 + ... + r_1 ... r_k, with r_j the model's pass rate at chain position j (passed /
    head:k       tested at j, per draft version; a chain is tested up to its first rejection). Each rate starts from
                 the one before it (r_1 from a prior), worth `prior_positions` tested positions, so a position no
                 round tested keeps its predecessor's rate. Per position because a head's acceptance falls along
                 the chain (measured on an H100: 0.64 at position 1, 0.47-0.52 at 4-5): one pooled rate makes small
                 k look worse and large k better than they are.
    hybrid:k     1 + E_m[max(suffix's expected accepted at m (as for suffix:k), the model's expected accepted)],
                 m weighted by exposure as for suffix:k (weighted by outcomes alone, a hybrid looks better than it
                 runs; on an H100 auto kept hybrid:8 on a Shakespeare stream expecting 3.8 tokens per round,
                 correction included, and got 3.4, where suffix:8 alone got 3.2 at 28% less cost per round)

correction: realized over expected tokens per active row and round of the recent windows of v at this bucket (with
static batching a batch runs until its slowest row finishes, so a variant whose gain varies from row to row gains
less per batch than per row; measured on an H200, suffix drafts at batch 8 lost to target-only on two streams where
they won at batch 1).

A speculative variant must beat target-only by `margin`, so with no evidence, or with proposers that cost more
than they return, the engine decodes target-only: speculation is never knowingly slower than no speculation.
Evidence decays by `decay` per window (the stream drifts). A model variant that could win on an optimistic
estimate runs once to measure it: from the second window of a bucket if it never ran there (its cost may only be
estimated: on CPU nothing is timed at warm-up), and every `explore_every` windows when its evidence is old (a
newly promoted draft version, say).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipelines.decode_state import POSITION_PASSED, POSITION_TESTED
from pipelines.proposers import TARGET_ONLY, Variant
from pipelines.settings import ControllerSettings

SUFFIX_PRIOR_ROUNDS = 4.0


@dataclass
class _Cost:
    seconds: float
    samples: int = 0  # live batches measured (0 = the warm-up profile only)


@dataclass
class _ModelEvidence:
    """Acceptance of one draft version by chain position: passed / tested (a rejection ends the test)."""

    passed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tested: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, positions: np.ndarray) -> None:
        width = max(len(self.passed), positions.shape[1])
        self.passed = np.pad(self.passed, (0, width - len(self.passed)))
        self.tested = np.pad(self.tested, (0, width - len(self.tested)))
        self.passed[: positions.shape[1]] += positions[POSITION_PASSED]
        self.tested[: positions.shape[1]] += positions[POSITION_TESTED]


@dataclass
class BatchObservation:
    """What one window of rounds (a batch, with static batching) showed, handed back by the engine."""

    bucket: int
    variant: Variant
    rounds: int
    seconds: float | None
    draft_version: str | None = None
    # [2, max_k]: chain positions 1..max_k of the model proposer (draft LM or head) that passed and were tested
    # (pipelines.decode_state.POSITION_*), summed over the window's row-rounds
    model_positions: np.ndarray | None = None
    suffix_hist: np.ndarray | None = None  # [J + 1, K + 1] rounds by (match length, accepted suffix tokens)
    suffix_capped: np.ndarray | None = None  # of those, rounds whose k drafts all passed (censored at k)
    # [J + 1] row-rounds by match length, outcome or not (a hybrid's rows on the model); None: suffix_hist's rows
    suffix_exposure: np.ndarray | None = None
    rows: int = 0  # requests in the batch (static batching)
    tokens: int = 0  # tokens emitted in these rounds (after the prefill)
    row_rounds: int = 0  # active rows summed over the rounds (continuous batching; 0: rows * rounds)


@dataclass
class _Choice:
    variant: Variant
    goodput: dict[Variant, float] = field(default_factory=dict)
    explored: bool = False


class GoodputController:
    def __init__(self, settings: ControllerSettings, variants: list[Variant], *, model_cost_ratio: float = 0.0):
        if TARGET_ONLY not in variants:
            variants = [TARGET_ONLY, *variants]
        self.settings = settings
        self.variants = sorted(set(variants))
        self.model_cost_ratio = model_cost_ratio  # one model step / a target forward, by parameters (the estimate)
        self._lock = threading.Lock()
        self._costs: dict[tuple[int, Variant], _Cost] = {}
        self._corrections: dict[tuple[int, Variant], float] = {}  # realized / expected tokens per round
        self._suffix_hist: np.ndarray | None = None
        self._suffix_capped: np.ndarray | None = None
        self._suffix_exposure: np.ndarray | None = None  # row-rounds by match length (the weights of E over m)
        self._model: dict[str, _ModelEvidence] = {}
        self._batches: Counter[int] = Counter()
        self._last_run: dict[tuple[int, Variant], int] = {}
        self.choices: Counter[Variant] = Counter()  # batches per variant, since start
        self.last: _Choice | None = None

    # ------------------------------------------------------------------ evidence

    def set_cost(self, bucket: int, variant: Variant, seconds: float) -> None:
        with self._lock:
            self._costs[(bucket, variant)] = _Cost(seconds)

    def forget_evidence(self) -> None:
        """Drop acceptance evidence and choice counts; measured costs stay."""
        with self._lock:
            self._suffix_hist = self._suffix_capped = self._suffix_exposure = None
            self._model.clear()
            self._corrections.clear()
            self._batches.clear()
            self._last_run.clear()
            self.choices.clear()
            self.last = None

    def cost(self, bucket: int, variant: Variant) -> float | None:
        """Seconds per round: measured, else estimated from target-only at this bucket, else None."""
        entry = self._costs.get((bucket, variant))
        if entry is not None:
            return entry.seconds
        baseline = self._costs.get((bucket, TARGET_ONLY))
        if baseline is None:
            return None
        steps = variant.k if variant.uses_model else 0
        return baseline.seconds * (1 + 0.1 * variant.k + self.model_cost_ratio * steps)

    def observe(self, obs: BatchObservation) -> None:
        with self._lock:
            self._decay()
            self._add_acceptance(obs)
            # after the window's own acceptance is in: the correction measures only what the per-row estimate
            # misses (a batch's idle rows), not what the window taught it (a larger k's first window, say)
            self._correct(obs)
            if obs.rounds > 0 and obs.seconds:  # None: a batch that also ran shadow proposals (not a clean cost)
                per_round = obs.seconds / obs.rounds
                entry = self._costs.get((obs.bucket, obs.variant))
                if entry is None:
                    self._costs[(obs.bucket, obs.variant)] = _Cost(per_round, 1)
                else:  # the live figure takes over from the profile quickly, then moves slowly
                    weight = max(0.2, 1.0 / (entry.samples + 2))
                    entry.seconds += weight * (per_round - entry.seconds)
                    entry.samples += 1

    def _add_acceptance(self, obs: BatchObservation) -> None:
        if obs.suffix_hist is not None:
            hist = obs.suffix_hist.astype(np.float64)
            capped = np.zeros_like(hist) if obs.suffix_capped is None else obs.suffix_capped.astype(np.float64)
            exposure = hist.sum(axis=1) if obs.suffix_exposure is None else obs.suffix_exposure.astype(np.float64)
            if exposure.sum() > 0:
                if self._suffix_hist is None:
                    self._suffix_hist, self._suffix_capped, self._suffix_exposure = hist, capped, exposure
                else:
                    self._suffix_hist += hist
                    self._suffix_capped += capped
                    self._suffix_exposure += exposure
        if obs.draft_version is not None and obs.model_positions is not None and obs.model_positions.any():
            positions = np.asarray(obs.model_positions, dtype=np.float64)
            self._model.setdefault(obs.draft_version, _ModelEvidence()).add(positions)

    def _correct(self, obs: BatchObservation) -> None:
        """Tokens per row and round the batch really got against what was expected of its variant. A batch decodes
        until its slowest row finishes, so rows that finish early idle: with suffix drafts, whose gain differs a lot
        from row to row, a batch of 8 can take nearly as many rounds as target-only. The ratio (an average over
        recent batches) scales the variant's expected tokens at this bucket."""
        row_rounds = obs.row_rounds or obs.rows * obs.rounds
        if not (row_rounds and obs.tokens):
            return
        expected = self.expected_tokens(obs.variant, obs.draft_version)
        ratio = min(2.0, max(0.1, obs.tokens / row_rounds / expected))
        key = (obs.bucket, obs.variant)
        self._corrections[key] = self._corrections.get(key, 1.0) * 0.7 + 0.3 * ratio

    def correction(self, bucket: int, variant: Variant) -> float:
        return self._corrections.get((bucket, variant), 1.0)

    def _decay(self) -> None:
        factor = self.settings.decay
        if self._suffix_hist is not None:
            self._suffix_hist *= factor
            self._suffix_capped *= factor
            self._suffix_exposure *= factor
        for evidence in self._model.values():
            evidence.passed *= factor
            evidence.tested *= factor

    def model_rates(self, version: str | None, k: int, optimistic: bool = False) -> np.ndarray:
        """Pass rates of chain positions 1..k for a draft version: (passed + w r_prev) / (tested + w) with
        w = prior_positions and r_prev the rate of the position before (prior_alpha before position 1); optimistic
        adds 1 / sqrt(tested + w + 1) to each (an upper estimate, to decide what to explore). The prior's weight does
        not decay: a position that recent windows no longer test (positions 4-8 while auto runs k <= 3) drifts from
        its old rate back towards the rate of the position before it, so a larger k is tried again (unlike suffix
        rates, which keep their old value)."""
        s = self.settings
        evidence = self._model.get(version or "", _ModelEvidence())
        rates, previous = np.zeros(k), s.prior_alpha
        for j in range(k):
            passed = evidence.passed[j] if j < len(evidence.passed) else 0.0
            tested = evidence.tested[j] if j < len(evidence.tested) else 0.0
            weight = tested + s.prior_positions
            rate = (passed + s.prior_positions * previous) / weight if weight else previous
            rates[j] = min(rate + (1.0 / math.sqrt(weight + 1.0) if optimistic else 0.0), 0.999)
            previous = rate
        return rates

    def model_expected_accepted(self, version: str | None, k: int, optimistic: bool = False) -> float:
        """Expected accepted tokens of a model chain of k drafts: r_1 + r_1 r_2 + ... + r_1 ... r_k."""
        return float(np.cumprod(self.model_rates(version, k, optimistic)).sum())

    def suffix_rounds(self) -> float:
        """Row-rounds of suffix evidence (decayed), real and shadow."""
        return 0.0 if self._suffix_hist is None else float(self._suffix_hist.sum())

    def suffix_expected_accepted(self, max_match: int, max_k: int) -> np.ndarray:
        """Expected accepted suffix tokens per round with up to max_k drafts, by match length m (`_suffix_by_match`:
        it may project beyond what rounds of a smaller k tested), blended with a prior of half of min(m, max_k) worth
        SUFFIX_PRIOR_ROUNDS rounds (so a hybrid tries suffix drafts before it has seen any)."""
        prior = 0.5 * np.minimum(np.arange(max_match + 1), max_k)
        counts = np.zeros(max_match + 1)
        accepted = np.zeros(max_match + 1)
        by_match = self._suffix_by_match(max_k)
        if by_match is not None:
            expected, rounds = by_match
            counts = rounds[: max_match + 1]
            accepted = (expected * rounds)[: max_match + 1]
        mean = (accepted + SUFFIX_PRIOR_ROUNDS * prior) / (counts + SUFFIX_PRIOR_ROUNDS)
        return mean.astype(np.float32)

    # ------------------------------------------------------------------ expected tokens

    def expected_tokens(self, variant: Variant, draft_version: str | None = None, optimistic: bool = False) -> float:
        if variant.proposer == "none" or variant.k == 0:
            return 1.0
        if variant.proposer == "suffix":
            return 1.0 + self._suffix_accepted(variant.k)
        model = self.model_expected_accepted(draft_version, variant.k, optimistic)
        if variant.proposer in ("draft", "head"):
            return 1.0 + model
        if variant.proposer == "hybrid":
            return 1.0 + self._hybrid_accepted(variant.k, model)
        raise ValueError(f"unknown proposer {variant.proposer!r}")

    def _suffix_accepted(self, k: int) -> float:
        """E over the match lengths rows have (exposure) of the expected accepted tokens at each; a length whose
        suffix drafts were never verified counts as nothing gained."""
        by_match = self._suffix_by_match(k)
        if by_match is None:
            return 0.0
        expected, _ = by_match
        weights = self._suffix_exposure
        return float((expected * weights).sum() / weights.sum())

    def _hybrid_accepted(self, k: int, model: float) -> float:
        """Per match length the better of the suffix's and the model's expectation, weighted as above: the rows a
        hybrid gave the model count at the model's expectation."""
        by_match = self._suffix_by_match(k)
        if by_match is None:
            return model
        expected, _ = by_match
        weights = self._suffix_exposure
        return float((weights * np.maximum(expected, model)).sum() / weights.sum())

    def _suffix_by_match(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(expected accepted suffix tokens with up to k drafts, rounds seen), by match length; None without
        evidence. E[min(a, k)] is the sum over j <= k of P(a >= j), each a product of per-position pass rates:
        position j passed in the rounds with a >= j and failed in the uncapped rounds that stopped at j - 1 (a
        rejection, or the match ran out); a capped round (its k drafts all passed) tested nothing beyond k. A
        position no round tested keeps the rate of the one before, so what small k showed neither hides nor
        rules out a larger k's gain; a window of the larger k then measures it. Decay shrinks every count alike,
        so a rate measured long ago keeps its value until newer rounds test that position again. Without capped
        rounds this is the plain mean of min(a, k)."""
        hist = self._suffix_hist
        if hist is None or hist.sum() <= 0:
            return None
        stopped = hist - self._suffix_capped
        at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [J + 1, K + 1]: rounds with a >= each column
        survival, rate, expected = np.ones(len(hist)), np.zeros(len(hist)), np.zeros(len(hist))
        for j in range(1, min(k, hist.shape[1] - 1) + 1):
            tested = at_least[:, j] + stopped[:, j - 1]
            rate = np.where(tested > 0, at_least[:, j] / np.maximum(tested, 1e-12), rate)
            survival = survival * rate
            expected += survival
        return expected, hist.sum(axis=1)

    # ------------------------------------------------------------------ the choice

    def choose(self, bucket: int, allowed: list[Variant] | None = None, draft_version: str | None = None) -> Variant:
        """The variant to run this batch at `bucket` (the batch size it pads to)."""
        with self._lock:
            candidates = [v for v in (allowed or self.variants) if self.cost(bucket, v) is not None]
            if not candidates:  # the first batch of a bucket measures target-only
                self.choices[TARGET_ONLY] += 1
                self.last = _Choice(TARGET_ONLY)
                return TARGET_ONLY
            goodput = {
                v: self.expected_tokens(v, draft_version) * self.correction(bucket, v) / self.cost(bucket, v)
                for v in candidates
            }
            baseline = goodput.get(TARGET_ONLY, 0.0)
            best = max(goodput, key=goodput.get)
            if best != TARGET_ONLY and goodput[best] < baseline * (1 + self.settings.margin):
                best = TARGET_ONLY
            explored = False
            self._batches[bucket] += 1
            explore = self._exploration(bucket, candidates, goodput[best], draft_version)
            if explore is not None:
                best, explored = explore, True
            self._last_run[(bucket, best)] = self._batches[bucket]
            self.choices[best] += 1
            self.last = _Choice(best, goodput, explored)
            return best

    def _exploration(
        self, bucket: int, candidates: list[Variant], best_goodput: float, draft_version: str | None
    ) -> Variant | None:
        every = self.settings.explore_every
        if not every:
            return None
        batches = self._batches[bucket]
        model_variants = [v for v in candidates if v.uses_model]
        if batches % every == 0:
            stale = [v for v in model_variants if batches - self._last_run.get((bucket, v), 0) >= every]
        else:  # a draft-model variant never run at this bucket is tried as soon as it could win
            stale = [v for v in model_variants if (bucket, v) not in self._last_run and batches >= 2]
        if not stale:
            return None
        hopeful = {
            v: self.expected_tokens(v, draft_version, optimistic=True)
            * self.correction(bucket, v)
            / self.cost(bucket, v)
            for v in stale
        }
        variant = max(hopeful, key=hopeful.get)
        return variant if hopeful[variant] >= best_goodput else None

    def snapshot(self) -> dict:
        """Counters and the last decision, for metrics and logs."""
        with self._lock:
            last = self.last
            return {
                "choices": {str(v): n for v, n in sorted(self.choices.items())},
                "last": None
                if last is None
                else {
                    "variant": str(last.variant),
                    "explored": last.explored,
                    "goodput": {str(v): g for v, g in sorted(last.goodput.items())},
                },
                "costs_ms": {f"{b}/{v}": round(c.seconds * 1e3, 3) for (b, v), c in sorted(self._costs.items())},
            }
