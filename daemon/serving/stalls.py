"""Stalled partitions: the committed offset has not moved for `daemon.stall_after_s` while records wait.

Whatever holds a partition (a sink that stays unavailable, a record the daemon cannot get past, a decode that
never returns) shows up here the same way, within stall_after_s plus one lag interval: a warning with the
partition, its committed offset, how many records wait and what the sinks report, the gauge
onlinespec_partition_stalled{topic,partition} at 1 and onlinespec_partition_stalls_total counted once; when the
offset moves again, an info line and the gauge back at 0. An idle partition (nothing waiting) is never stalled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka.structs import TopicPartition

from daemon.serving.metrics import DaemonMetrics

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    committed: int | None  # the last offset committed for the partition (None: nothing committed yet)
    since: float  # when it last moved, or when records started waiting
    stalled: bool = False


class StallWatch:
    def __init__(self, after_s: float, metrics: DaemonMetrics, clock=time.monotonic):
        self.after_s = after_s
        self.metrics = metrics
        self.clock = clock
        self._partitions: dict[TopicPartition, _Progress] = {}
        self.found = 0  # stalls found since start

    def observe(self, tp: TopicPartition, committed: int | None, waiting: int, context: str = "") -> bool:
        """One look at a partition: its committed offset and how many records wait on it (queued, in flight or
        not yet fetched). Returns whether it is stalled now."""
        now = self.clock()
        state = self._partitions.get(tp)
        if state is None or state.committed != committed or waiting == 0:
            if state is not None and state.stalled:
                log.info(
                    "partition %s/%d moving again after %.0f s (committed offset %s -> %s)",
                    tp.topic,
                    tp.partition,
                    now - state.since,
                    state.committed,
                    committed,
                )
                self.metrics.stalled.labels(tp.topic, str(tp.partition)).set(0)
            self._partitions[tp] = _Progress(committed, now)
            return False
        if not state.stalled and now - state.since >= self.after_s:
            state.stalled = True
            self.found += 1
            self.metrics.stalled.labels(tp.topic, str(tp.partition)).set(1)
            self.metrics.stalls.labels(tp.topic, str(tp.partition)).inc()
            log.warning(
                "partition %s/%d stalled: committed offset %s has not moved for %.0f s while %d records wait%s",
                tp.topic,
                tp.partition,
                committed,
                now - state.since,
                waiting,
                f" ({context})" if context else "",
            )
        return state.stalled

    def forget(self, tps) -> None:
        """Partitions revoked: no longer ours to watch."""
        for tp in tps:
            state = self._partitions.pop(tp, None)
            if state is not None and state.stalled:
                self.metrics.stalled.labels(tp.topic, str(tp.partition)).set(0)
