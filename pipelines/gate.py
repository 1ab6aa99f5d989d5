"""The promotion gate of online learning, as pure functions: which rows of a feedback window are held out, and
whether a candidate's held-out AvgLen earns it promotion over the active draft. The daemon's rounds
(daemon.learning.rounds) and the learning benchmark (bench.learning) decide with these, so they cannot drift.

    split = heldout_split(window, heldout_rows, min_tokens)     train on window[:split], replay on window[split:]
    decision = decide(candidate_avg_len, active_avg_len, tokens, margin=0.02, min_tokens=2000)
"""

from __future__ import annotations

from dataclasses import dataclass


def heldout_split(window: list, heldout_rows: int, min_tokens: int) -> int:
    """Index of the first held-out row of a window (oldest first): the newest `heldout_rows` rows, growing until
    they hold `min_tokens` emitted tokens (short answers such as SQL need more rows for the same evidence), but
    growing only up to half the window, so training keeps the other half. 0 = nothing left to train on."""
    split = max(0, len(window) - heldout_rows)
    tokens = sum(len(f.token_ids) for f in window[split:])
    while tokens < min_tokens and split > 0 and len(window) - split < len(window) // 2:
        split -= 1
        tokens += len(window[split].token_ids)
    return split


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    why_not: str | None  # None when promoted


def decide(
    candidate_avg_len: float, active_avg_len: float, heldout_tokens: int, *, margin: float, min_tokens: int
) -> GateDecision:
    """Promote when the candidate's held-out AvgLen >= the active's * (1 + margin), measured on at least
    `min_tokens` greedy held-out tokens. An active AvgLen of 0 or NaN (no greedy held-out request) proves nothing."""
    if heldout_tokens < min_tokens:
        return GateDecision(False, f"fewer held-out tokens than min_heldout_tokens {min_tokens}")
    if not active_avg_len > 0:  # also NaN
        return GateDecision(False, "no greedy held-out request to measure AvgLen on")
    if candidate_avg_len >= active_avg_len * (1 + margin):
        return GateDecision(True, None)
    return GateDecision(False, "below the margin")
