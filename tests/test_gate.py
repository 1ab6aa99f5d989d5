"""The promotion gate as pure functions (pipelines.gate): the daemon's rounds and bench.learning decide with it."""

from __future__ import annotations

import math

import pytest

from pipelines.gate import decide, heldout_split


@pytest.mark.parametrize(
    ("candidate", "active", "tokens", "promote", "why_not"),
    [
        (2.04, 2.0, 500, True, None),  # exactly the margin
        (2.039, 2.0, 500, False, "below the margin"),
        (3.0, 2.0, 499, False, "fewer held-out tokens than min_heldout_tokens 500"),
        (3.0, 0.0, 500, False, "no greedy held-out request to measure AvgLen on"),
        (3.0, math.nan, 500, False, "no greedy held-out request to measure AvgLen on"),
        (0.0, 0.0, 500, False, "no greedy held-out request to measure AvgLen on"),  # 0 >= 0 * 1.02 is no win
    ],
)
def test_decide(candidate, active, tokens, promote, why_not):
    decision = decide(candidate, active, tokens, margin=0.02, min_tokens=500)
    assert (decision.promote, decision.why_not) == (promote, why_not)


def test_the_learning_bench_uses_the_daemons_gate():
    import bench.learning as bench

    assert bench.decide is decide and bench.heldout_split is heldout_split
    from pipelines.learners import LEARNERS

    parser_choices = bench.parse_args(["--tiny", "--out", "/tmp/unused"]).learners
    assert tuple(parser_choices) == tuple(LEARNERS)
