"""Between the poll thread and the worker: queued records, micro-batch collection and committable offsets.

The poll thread tracks every record it queues; the worker marks a record done only after its database
transaction and its produce (completion or DLQ) are acknowledged; the poll thread commits, per partition, only
up to the first record that is not done yet.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from kafka.structs import TopicPartition

from daemon.serving.messages import InvalidMessage, PromptMessage
from pipelines.types import GenerationRequest


@dataclass
class Inbound:
    """One polled record and what validation made of it: a request to serve or a reason to dead-letter it."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    epoch: int  # assignment epoch of tp when queued; stale after a rebalance
    queued_at: float = field(default_factory=time.monotonic)
    submitted_at: float | None = None  # when the decode stage handed it to the engine
    message: PromptMessage | None = None
    request: GenerationRequest | None = None
    request_hash: str | None = None  # daemon.serving.messages.request_hash of message
    error: InvalidMessage | None = None

    @property
    def where(self) -> str:
        return f"{self.tp.topic}/{self.tp.partition}@{self.offset}"


class _PartitionOffsets:
    def __init__(self, epoch: int, committed: int | None):
        self.epoch = epoch
        self.outstanding: deque[int] = deque()  # tracked offsets in fetch order, not yet committable
        self.done: set[int] = set()
        self.commit_position = committed  # next offset to commit (Kafka semantics: last processed + 1)
        self.last_committed = committed


class OffsetTracker:
    """Contiguous done offsets per assigned partition. Thread-safe: the poll thread and the worker share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartition, _PartitionOffsets] = {}
        self._epoch = 0

    def assign(self, tps) -> None:
        with self._lock:
            self._epoch += 1
            for tp in tps:
                self._partitions[tp] = _PartitionOffsets(self._epoch, None)

    def revoke(self, tps) -> None:
        with self._lock:
            for tp in tps:
                self._partitions.pop(tp, None)

    def track(self, tp: TopicPartition, offset: int) -> int | None:
        """Note a queued record; returns its epoch, or None when tp is not assigned (drop the record)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                return None
            state.outstanding.append(offset)
            return state.epoch

    def is_current(self, tp: TopicPartition, epoch: int) -> bool:
        with self._lock:
            state = self._partitions.get(tp)
            return state is not None and state.epoch == epoch

    def done(self, tp: TopicPartition, epoch: int, offset: int) -> bool:
        """Mark a record finished; False when its partition was revoked meanwhile (the new owner redoes it)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or state.epoch != epoch:
                return False
            state.done.add(offset)
            while state.outstanding and state.outstanding[0] in state.done:
                finished = state.outstanding.popleft()
                state.done.discard(finished)
                state.commit_position = finished + 1
            return True

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose contiguous done prefix moved since the last commit: tp -> next offset to commit."""
        with self._lock:
            return {
                tp: state.commit_position
                for tp, state in self._partitions.items()
                if state.commit_position is not None and state.commit_position != state.last_committed
            }

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, offset in offsets.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.last_committed = offset

    def progress(self, tp: TopicPartition) -> tuple[int | None, int, int | None]:
        """(last committed offset, records tracked and not committable yet, the first of them) of a partition."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                return None, 0, None
            first = state.outstanding[0] if state.outstanding else None
            return state.last_committed, len(state.outstanding), first

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(state.outstanding) for state in self._partitions.values())


def collect_batch(
    inbox: queue.Queue,
    max_size: int,
    max_wait_s: float,
    first_timeout_s: float = 0.2,
    counts=None,
    max_records: int | None = None,
) -> list[Inbound]:
    """Wait up to first_timeout_s for one item, then gather more until max_size or max_wait_s after the first.

    With `counts` (item -> bool) only the items it counts fill max_size and start the max_wait_s clock: the
    worker counts what it will decode, so records on their way to the DLQ ride along and neither shrink the
    engine's batches nor cut them short; until a counted item arrives, gathering stops at a gap of max_wait_s.
    At most max_records items either way."""
    try:
        batch = [inbox.get(timeout=first_timeout_s)]
    except queue.Empty:
        return []
    counted = 0
    deadline = None
    while True:
        if counts is None or counts(batch[-1]):
            counted += 1
            deadline = deadline or time.monotonic() + max_wait_s
        if counted >= max_size or (max_records is not None and len(batch) >= max_records):
            return batch
        remaining = max_wait_s if deadline is None else deadline - time.monotonic()
        try:
            batch.append(inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait())
        except queue.Empty:
            return batch
