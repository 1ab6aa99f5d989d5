"""The goodput controller on a simulated stream: what `auto` chooses, and the tokens/s it gets against each fixed
variant, without a GPU.

    python -m bench.controller_sim [--scenario shakespeare humaneval] [--windows 400] [--seeds 0 1 2] [--out FILE]

The controller (pipelines/controller.py) is the real one; the engine around it is a model. Each round of a row
draws a match length m of the suffix proposer, and draft outcomes from per-position pass rates: the suffix draft's
at that m, the head's by chain position. Rounds report to the controller what the engine's tallies would hold
(suffix outcomes of the rows that took a suffix draft, every row's match length, the head's positions tested and
passed, tokens; in target-only and head windows, shadow-scored suffix proposals of max k as the engine scores
them, every `shadow_every`-th window), per window of `window_rounds` rounds; a round costs what the H100 profiled
for its variant with the real pair (bench.proposers, 2026-12-06, batch 1). A hybrid picks per row as the engine
does: the suffix draft when its promise (the controller's expected accepted tokens at m and k) beats the head's.

The scenarios' parameters are set so that suffix:8 and head:3 reach about the AvgLen they served on the H100
(shakespeare: 3.19 and 1.99; humaneval: 1.69 and 2.15); rows are independent from round to round, which real
streams are not (a repeated passage keeps long matches for many rounds). So this shows how the estimates and the
choice behave, not the speed on a real stream. `--no-exposure` hands the controller the suffix outcomes alone (the
engine before commit 874c08b), to compare.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.controller import BatchObservation, GoodputController
from pipelines.decode_state import POSITION_PASSED, POSITION_TESTED
from pipelines.proposers import TARGET_ONLY, Variant
from pipelines.settings import ControllerSettings

# seconds per round at batch 1, H100, Qwen2.5-Coder-1.5B target with a fused head (proposers_b1b8_km.json)
H100_COSTS_MS = {"none": {0: 4.28}, "suffix": {2: 5.128, 3: 5.155, 4: 5.178, 8: 5.284}}
H100_COSTS_MS["head"] = {2: 5.619, 3: 5.938, 4: 6.208, 8: 7.292}
H100_COSTS_MS["hybrid"] = {2: 5.624, 3: 5.958, 4: 6.235, 8: 7.306}
MAX_MATCH, MAX_K, VERSION = 16, 8, "v1"


@dataclass(frozen=True)
class Scenario:
    match_probs: dict[int, float]  # match length -> probability of a row-round having it (0: no suffix draft)
    suffix_pass: dict[int, float]  # match length -> per-position pass rate of its suffix draft
    head_pass: tuple[float, ...]  # per chain position; later positions keep the last rate

    def draw_match(self, rng: np.random.Generator) -> int:
        return int(rng.choice(list(self.match_probs), p=list(self.match_probs.values())))


SCENARIOS = {
    "shakespeare": Scenario({0: 0.25, 2: 0.25, 12: 0.5}, {2: 0.5, 12: 0.85}, (0.55, 0.5, 0.45)),
    "humaneval": Scenario({0: 0.45, 2: 0.35, 12: 0.2}, {2: 0.4, 12: 0.7}, (0.65, 0.6, 0.55, 0.5, 0.45)),
}


def chain(rng: np.random.Generator, rates, k: int) -> int:
    """Accepted tokens of a chain of k drafts with per-position pass rates (the last one repeats)."""
    for j in range(k):
        if rng.random() >= rates[min(j, len(rates) - 1)]:
            return j
    return k


class SimulatedEngine:
    def __init__(self, scenario: Scenario, settings: ControllerSettings, seed: int, exposure: bool):
        self.scenario, self.settings, self.exposure = scenario, settings, exposure
        self.rng = np.random.default_rng(seed)
        self.variants = [TARGET_ONLY] + [
            Variant(p, k) for p in ("suffix", "head", "hybrid") for k in settings.k_choices if k <= MAX_K
        ]
        self.controller = GoodputController(settings, self.variants)
        for variant in self.variants:
            self.controller.set_cost(1, variant, H100_COSTS_MS[variant.proposer][variant.k] / 1e3)
        self.windows = 0

    def run_window(self, variant: Variant) -> tuple[int, float]:
        """One window of rounds of `variant`: (tokens, seconds), reported to the controller."""
        s, rng = self.settings, self.rng
        hist = np.zeros((MAX_MATCH + 1, MAX_K + 1), dtype=np.int64)
        capped, exposure = np.zeros_like(hist), np.zeros(MAX_MATCH + 1, dtype=np.int64)
        positions = np.zeros((2, MAX_K), dtype=np.int64)
        self.windows += 1
        shadow = variant.proposer not in ("suffix", "hybrid") and (
            self.windows % s.shadow_every == 0 or self.controller.suffix_rounds() < s.shadow_until
        )
        suffix_promise = self.controller.suffix_expected_accepted(MAX_MATCH, max(variant.k, 1))
        model_promise = self.controller.model_expected_accepted(VERSION, max(variant.k, 1))
        tokens = 0
        for _ in range(s.window_rounds):
            m = self.scenario.draw_match(rng)
            drafts = variant.k if m > 0 else 0  # a match always offers k tokens here
            take_suffix = variant.proposer == "suffix" or (
                variant.proposer == "hybrid" and drafts > 0 and min(suffix_promise[m], drafts) > model_promise
            )
            if shadow:  # what a suffix draft of MAX_K would have gained, scored against the target's tokens
                a = chain(rng, [self.scenario.suffix_pass.get(m, 0.0)], MAX_K if m > 0 else 0)
                hist[m, a] += 1
                capped[m, a] += int(m > 0 and a == MAX_K)
                exposure[m] += 1
            if variant.proposer == "none":
                accepted = 0
            elif take_suffix:
                accepted = chain(rng, [self.scenario.suffix_pass.get(m, 0.0)], drafts)
                hist[m, accepted] += 1
                capped[m, accepted] += int(drafts > 0 and accepted == drafts)
            else:
                accepted = chain(rng, self.scenario.head_pass, variant.k)
                positions[POSITION_PASSED, :accepted] += 1
                positions[POSITION_TESTED, : min(accepted + 1, variant.k)] += 1
            if variant.proposer in ("suffix", "hybrid"):
                exposure[m] += 1
            tokens += accepted + 1
        rounds = s.window_rounds
        seconds = rounds * H100_COSTS_MS[variant.proposer][variant.k] / 1e3
        has_suffix = variant.proposer in ("suffix", "hybrid") or shadow
        self.controller.observe(
            BatchObservation(
                1,
                variant,
                rounds,
                None if shadow else seconds,
                VERSION,
                model_positions=positions,
                suffix_hist=hist if has_suffix else None,
                suffix_capped=capped if has_suffix else None,
                suffix_exposure=(exposure if self.exposure else None) if has_suffix else None,
                tokens=tokens,
                row_rounds=rounds,
            )
        )
        return tokens, seconds


def run(
    scenario: Scenario,
    windows: int,
    seed: int,
    exposure: bool,
    fixed: Variant | None = None,
    before: list | None = None,
    settings: ControllerSettings | None = None,
) -> dict:
    """tokens/s and choices on `scenario`, after `windows` windows of each scenario in `before` on the same
    controller (as bench.proposers runs its domains one after another on one engine)."""
    engine = SimulatedEngine(scenario, settings or ControllerSettings(), seed, exposure)
    for earlier in before or []:
        engine.scenario = earlier
        for _ in range(windows):
            engine.run_window(fixed or engine.controller.choose(1, draft_version=VERSION))
    engine.scenario = scenario
    tokens = seconds = 0.0
    choices: dict[str, int] = {}
    for _ in range(windows):
        variant = fixed or engine.controller.choose(1, draft_version=VERSION)
        choices[str(variant)] = choices.get(str(variant), 0) + 1
        t, sec = engine.run_window(variant)
        tokens, seconds = tokens + t, seconds + sec
    return {"tok_s": tokens / seconds, "choices": choices}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--before",
        nargs="*",
        choices=sorted(SCENARIOS),
        default=[],
        help="scenarios auto's controller runs first (--windows each), as a bench run's earlier domains",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--decay", type=float, help="engine.auto.decay (default: the setting's default)")
    args = parser.parse_args(argv)
    settings = ControllerSettings(**({} if args.decay is None else {"decay": args.decay}))
    results = {}
    for name in args.scenario:
        scenario = SCENARIOS[name]
        fixed = [TARGET_ONLY, Variant("suffix", 8), Variant("head", 3), Variant("hybrid", 8), Variant("hybrid", 3)]
        rows = {}
        for variant in fixed:
            rows[str(variant)] = [
                run(scenario, args.windows, seed, True, variant, settings=settings)["tok_s"] for seed in args.seeds
            ]
        before = [SCENARIOS[b] for b in args.before if b != name]
        for label, exposure in (("auto", True), ("auto, outcomes only", False)):
            runs = [
                run(scenario, args.windows, seed, exposure, before=before, settings=settings) for seed in args.seeds
            ]
            rows[label] = [r["tok_s"] for r in runs]
            rows[label + " choices"] = [r["choices"] for r in runs]
        results[name] = rows
        base = float(np.mean(rows["none:0"]))
        print(f"{name}: tokens/s per seed (x target-only of the mean)")
        for label, values in rows.items():
            if label.endswith("choices"):
                top = sorted(values[0].items(), key=lambda item: -item[1])[:4]
                print(f"  {label:22s} seed {args.seeds[0]}: {', '.join(f'{v} {n}' for v, n in top)}")
            else:
                print(f"  {label:22s} {' '.join(f'{v:6.0f}' for v in values)}  ({np.mean(values) / base:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
