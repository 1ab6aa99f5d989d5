"""The engine's slots on the host side: who holds which row, how far its prompt is prefilled, its timings.

Pure bookkeeping (no tensors), so the scheduling rules are testable alone:
    admit        queued requests take the lowest free slots (static batching: only when every slot is free)
    prefill_plan which prompt chunks the next step prefills, oldest newcomer first, within a token budget
    bucket       the smallest batch bucket that holds every decoding slot
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipelines.types import GenerationRequest


@dataclass
class Slot:
    request: GenerationRequest
    tag: Any  # what the caller submitted with the request, handed back with its result
    submitted_at: float
    order: int = 0  # admission order: the oldest newcomer is prefilled first
    admitted_at: float = field(default_factory=time.perf_counter)
    prefilled: int = 0  # prompt tokens in the target's cache so far
    decoding: bool = False  # the prompt is prefilled and the first token emitted
    first_token_at: float | None = None
    first_round: int = 0  # index of the first decoding round this request took part in

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


@dataclass(frozen=True)
class PrefillChunk:
    slot: int
    start: int
    end: int
    last: bool  # the chunk ends the prompt: the row's first token comes from it


@dataclass
class Queued:
    request: GenerationRequest
    tag: Any
    submitted_at: float = field(default_factory=time.perf_counter)


class SlotTable:
    def __init__(self, size: int, buckets: list[int], static: bool):
        self.slots: list[Slot | None] = [None] * size
        self.buckets = buckets
        self.static = static
        self.queue: deque[Queued] = deque()
        self._admitted = 0

    # ------------------------------------------------------------------ state

    @property
    def occupied(self) -> list[int]:
        return [i for i, slot in enumerate(self.slots) if slot is not None]

    @property
    def decoding(self) -> list[int]:
        return [i for i, slot in enumerate(self.slots) if slot is not None and slot.decoding]

    @property
    def prefilling(self) -> list[int]:
        waiting = [i for i, slot in enumerate(self.slots) if slot is not None and not slot.decoding]
        return sorted(waiting, key=lambda i: self.slots[i].order)

    @property
    def busy(self) -> bool:
        """Work remains: queued requests or occupied slots."""
        return bool(self.queue) or any(slot is not None for slot in self.slots)

    def bucket(self, rows: list[int]) -> int:
        """The smallest bucket holding every slot in `rows`."""
        needed = max(rows) + 1
        return min(b for b in self.buckets if b >= needed)

    # ------------------------------------------------------------------ changes

    def admit(self) -> list[int]:
        """Move queued requests into the lowest free slots; returns the slots filled. Static batching admits a new
        batch only into an empty table."""
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        if self.static and len(free) < len(self.slots):
            return []
        filled = []
        while self.queue and free:
            queued = self.queue.popleft()
            index = free.pop(0)
            self._admitted += 1
            self.slots[index] = Slot(queued.request, queued.tag, queued.submitted_at, self._admitted)
            filled.append(index)
        return filled

    def prefill_plan(self, budget: int) -> list[PrefillChunk]:
        """Chunks to prefill this step: oldest newcomers first, at most `budget` prompt tokens in all (0: no limit),
        and at least one chunk whenever a prompt waits (a budget smaller than a prompt still makes progress)."""
        plan, left = [], budget if budget > 0 else None
        for index in self.prefilling:
            slot = self.slots[index]
            remaining = slot.prompt_tokens - slot.prefilled
            take = remaining if left is None else min(remaining, left)
            if take <= 0:
                break
            plan.append(PrefillChunk(index, slot.prefilled, slot.prefilled + take, take == remaining))
            if left is not None:
                left -= take
        return plan

    def release(self, index: int) -> Slot:
        slot, self.slots[index] = self.slots[index], None
        return slot
