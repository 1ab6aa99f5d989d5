"""Seconds the engine spends per phase (prefill, rounds, proposer catch-up), without a host sync per round.

On CUDA each timed span is a pair of events recorded on the stream; `totals()` adds up the spans whose end event
has completed (event.query(), which never waits) and keeps the rest for later. On CPU the work is synchronous and
the host clock times it. The daemon exports the totals (onlinespec_engine_seconds_total{phase}), so the prefill
share of engine time can be read while it serves.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseClock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin

    def stop(self, phase: str, begun) -> None:
        if not self.cuda:
            self._totals[phase] += time.perf_counter() - begun
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((phase, begun, end))

    def add(self, phase: str, begin, end) -> None:
        """A span already bracketed by two recorded CUDA events."""
        self._pending.append((phase, begin, end))

    def add_seconds(self, phase: str, seconds: float) -> None:
        """A span the caller timed on the host (synchronous work)."""
        self._totals[phase] += seconds

    def totals(self) -> dict[str, float]:
        """Seconds per phase of every span finished so far."""
        waiting = []
        for phase, begin, end in self._pending:
            if end.query():
                self._totals[phase] += begin.elapsed_time(end) / 1e3
            else:
                waiting.append((phase, begin, end))
        self._pending = waiting
        return dict(self._totals)
