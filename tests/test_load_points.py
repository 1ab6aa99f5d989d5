"""The scheduling comparison's pure parts (bench.load_points, bench.daemon_load): arrivals, the request mix, the
latency arithmetic, the budget. The daemons themselves run in `python -m bench.daemon_load --compare-scheduling`."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import pytest

from bench.daemon_load import load_prompt_values, parse_args
from bench.load_points import Answer, Budget, burst, measure, poisson_point, remaining

MIXED = ["--prompt-file", "bench/data/text_to_sql.jsonl", "bench/data/sharegpt.jsonl"]


def test_poisson_arrivals_are_seeded_by_point_and_follow_the_rate():
    first = poisson_point("50% of static", 4.0, 2000, seed=0)
    assert first == poisson_point("50% of static", 4.0, 2000, seed=0)  # the other scheduling sees the same
    assert first.offsets != poisson_point("90% of static", 4.0, 2000, seed=0).offsets
    assert first.offsets[0] == 0.0 and list(first.offsets) == sorted(first.offsets)
    gaps = [b - a for a, b in zip(first.offsets, first.offsets[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean
    assert burst(3).offsets == (0.0, 0.0, 0.0) and burst(3).rate is None


def test_the_mixed_stream_interleaves_files_with_their_own_max_new_tokens():
    args = parse_args([*MIXED, "--max-new-tokens-per-file", "32", "128", "--compare-scheduling"])
    assert args.max_new_tokens == 128 and args.proposers == ["none"] and args.batch_sizes == [8]
    records = [json.loads(v) for v in load_prompt_values(args, 4, "b8-static-saturation", [32, 128])]
    assert [r["id"] for r in records] == [f"b8-static-saturation-{i:05d}" for i in range(4)]
    assert [r["max_new_tokens"] for r in records] == [32, 128, 32, 128]
    assert "SQL" in records[0]["prompt"] and "SQL" in records[2]["prompt"] and records[0] != records[2]
    with pytest.raises(SystemExit):
        parse_args([*MIXED, "--max-new-tokens-per-file", "32"])


@dataclass
class _Daemon:
    batch_size: int = 2

    def occupancy(self, start: float, end: float) -> float:
        return 0.5


def test_latencies_from_produce_times_answers_and_timings():
    timings = {"queue_s": 0.1, "first_token_s": 0.3, "decode_s": 0.9}  # first token 0.3 s, last 1.0 s after arrival
    answers = {
        "a": Answer(arrived=11.5, delivery_s=0.1, tokens=10, timings=timings),  # 1.5 s after its produce at 10.0
        "b": Answer(arrived=12.0, delivery_s=0.0, tokens=0, timings=None),  # dead-lettered
    }
    point = poisson_point("50% of static", 1.0, 3, seed=0)
    found = measure(point, {"a": 10.0, "b": 10.5, "c": 11.0}, answers, _Daemon(), {}, {})
    assert (found["completed"], found["dead_lettered"], found["unanswered"]) == (1, 1, 1)
    assert found["span_s"] == 2.0 and found["rps"] == 0.5 and found["tok_s"] == 5.0
    assert found["e2e_s"]["p50"] == 1.5
    # 1.5 s in all: 0.7 s first -> last token, 0.1 s delivery of the completion, so the first token came 0.7 s after
    # the produce: 0.3 s in the daemon and 0.4 s before it reached the daemon's poll thread
    assert found["ttft_s"]["p50"] == pytest.approx(0.7)
    assert found["ttft_daemon_s"]["p50"] == 0.3 and found["to_daemon_s"]["p50"] == pytest.approx(0.4)
    assert found["prefill_s"]["p50"] == pytest.approx(0.2) and found["slots_held"] == pytest.approx(0.225)
    assert found["itl_s"]["p50"] == pytest.approx(0.7 / 9, abs=1e-4)


def test_the_budget_shares_what_is_left_among_the_points_to_size():
    assert Budget(None, 15.0).point_s(4, 0.0, {"drain": 4}) == 15.0
    budget = Budget(100.0, 60.0)
    budget.note("drain", 1.0)
    # 100 s left, 10 s of sized points, 4 drains of 1 s and one stop guessed at 3 s: 83 s over 2 points
    assert budget.point_s(2, 10.0, {"drain": 4, "stop": 1}) == pytest.approx(41.5, abs=0.1)
    assert Budget(1.0, 60.0).point_s(2, 10.0, {}) == 0.0  # spent: the points shrink to --min-point-requests


def test_remaining_counts_the_points_and_steps_still_to_come():
    args = parse_args([*MIXED, "--compare-scheduling", "--batch-sizes", "8", "32"])
    plan = [(8, "static"), (8, "continuous"), (32, "static"), (32, "continuous")]
    own = [("50% of static", 1.0, None), ("90% of static", 1.8, None)]
    open_points, fixed_s, steps = remaining(args, plan, 0, own, {})
    assert (open_points, fixed_s) == (2 + 4 + 2 + 4, 0.0)
    assert steps == {"start": 3, "warmup": 3, "saturation": 3, "drain": 2 + 4 + 2 + 4, "stop": 4}
    sized = [poisson_point("50% of static", 1.0, 10, 0), poisson_point("90% of static", 1.8, 18, 0)]
    queue = [(p.name, p.rate, p) for p in sized] + [("50% of continuous", 2.0, None), ("90% of continuous", 3.6, None)]
    open_points, fixed_s, steps = remaining(args, plan, 1, queue, {8: sized})
    assert open_points == 2 + 2 + 4 and fixed_s == pytest.approx(sum(p.arrivals_s for p in sized))
