"""The engine's captured rounds: one CUDA graph per (batch bucket, variant, greedy or sampled, shadow), and what a
round costs.

Every graph is captured on the engine's static per-bucket views (pipelines.decode_state) with every row inactive
and parked, so warming up and capturing change nothing that matters; all graphs share one memory pool (they never
run concurrently and keep no tensor alive between replays). A round's cost for the goodput controller is the
median of timed graph replays (eager rounds where graphs are off).
"""

from __future__ import annotations

import statistics
import time

import torch

from pipelines.decode_state import DecodeState
from pipelines.proposers import Variant
from pipelines.round import RoundModels, run_round

GraphKey = tuple[int, Variant, bool, bool]  # (bucket, variant, greedy_only, shadow)


class RoundGraphs:
    def __init__(self, models: RoundModels, views: dict[int, DecodeState], use_graphs: bool, profile_rounds: int):
        self.models = models
        self.views = views
        self.use_graphs = use_graphs
        self.profile_rounds = profile_rounds
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def captured(self, key: GraphKey) -> bool:
        return key in self._graphs

    def get(self, bucket: int, variant: Variant, greedy_only: bool, shadow: bool = False) -> torch.cuda.CUDAGraph:
        """The round's graph, captured now if it was not (only while no request is in flight: capture runs it)."""
        key = (bucket, variant, greedy_only, shadow)
        if key not in self._graphs:
            self._graphs[key] = self._capture(self.views[bucket], variant, greedy_only, shadow)
        return self._graphs[key]

    def _capture(self, state: DecodeState, variant: Variant, greedy_only: bool, shadow: bool):
        state.active.zero_()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = capture_graph(lambda: run_round(self.models, state, variant, greedy_only, shadow), self._pool)
        state.reset_tallies()
        return graph

    def seconds_per_round(self, bucket: int, variant: Variant) -> float:
        """Median seconds of a greedy round of `variant` at `bucket` (CUDA; rows inactive: the work is the same)."""
        state = self.views[bucket]
        state.active.zero_()
        with torch.inference_mode():
            if not self.use_graphs:  # CUDA without graphs: eager rounds, the first one untimed
                run_round(self.models, state, variant, True)
                torch.cuda.synchronize()
                started = time.perf_counter()
                run_round(self.models, state, variant, True)
                torch.cuda.synchronize()
                return time.perf_counter() - started
            graph = self.get(bucket, variant, True)
            graph.replay()
            times = []
            for _ in range(self.profile_rounds):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            return statistics.median(times)


def capture_graph(run, pool) -> torch.cuda.CUDAGraph:
    """`run()` captured as a CUDA graph in memory pool `pool`: run twice on a side stream first (allocator and
    kernel set-up stay outside the capture), then captured; returns once the GPU is done."""
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run()
    torch.cuda.synchronize()
    return graph
