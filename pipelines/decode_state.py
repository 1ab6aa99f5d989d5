"""Static buffers of the speculative loop: one row per slot, allocated once and updated in place.

In-place updates matter: a CUDA graph captured for a batch bucket replays against exactly these tensors. The
engine allocates one state for all its slots and runs a bucket of B slots on `rows(B)`, views of the first B rows
of every buffer, so a request keeps its row (and its KV cache) while other slots join and leave around it.
Slot `capacity` of every output buffer is a dump column: writes for positions that emit nothing land there.
Proposers keep their own per-row buffers (a draft model's KV cache rows, the suffix proposer's shadow counters, a
head's KV cache and the target's features) in `proposer_state`, keyed by proposer name; each has `rows(B)` too.

`tally` and `position_tally` count, over every round since they were last read, emitted tokens, active row-rounds
and, per source, the chain positions tested and passed (the controller's evidence for a window of rounds) without a
host read per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.kv_cache import PositionalKVCache
from pipelines.types import SOURCE_NAMES

NUM_SOURCES = len(SOURCE_NAMES)
# Columns of DecodeState.source_counts: rounds a source drafted in, tokens drafted, tokens accepted, and rounds in
# which every drafted token was accepted (a chain's acceptance test ends at its first rejection).
COUNT_ROUNDS, COUNT_DRAFTED, COUNT_ACCEPTED, COUNT_FULL = 0, 1, 2, 3
TALLY_TOKENS, TALLY_ROW_ROUNDS = 0, 1
# Rows of DecodeState.position_tally per source: draft positions 1..max_k that passed, and that were tested (a chain
# is tested up to its first rejection, so position j is tested in rounds that drafted j tokens and passed j - 1).
POSITION_PASSED, POSITION_TESTED = 0, 1


@dataclass
class DecodeState:
    batch_size: int
    target_cache: PositionalKVCache
    # Per row. A row's target cache holds `lengths` tokens; `current` (already emitted) sits at position `lengths`
    # and is not in the target cache yet; `previous` is the token at position lengths - 1.
    lengths: torch.Tensor  # [B] int64
    current: torch.Tensor  # [B] int64
    previous: torch.Tensor  # [B] int64
    active: torch.Tensor  # [B] bool
    generated: torch.Tensor  # [B] int64, tokens emitted so far
    max_new_tokens: torch.Tensor  # [B] int64
    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_p: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    target_forwards: torch.Tensor  # [B] int64
    draft_steps: torch.Tensor  # [B] int64, rounds in which the row drafted at least one token
    drafted: torch.Tensor  # [B] int64, draft tokens proposed (counted where they are proposed)
    source_counts: torch.Tensor  # [B, NUM_SOURCES, 4] int64: COUNT_* per SOURCE_*
    # The whole sequence by position: prompt, then every emitted token (`current` included); [B, capacity + 1].
    tokens: torch.Tensor  # int64
    # Per emitted position, indexed by generated order; [B, capacity + 1] (+ dump column).
    out_tokens: torch.Tensor  # int64
    out_kinds: torch.Tensor  # uint8, pipelines.types.KIND_*
    out_draft_tokens: torch.Tensor  # int64, NO_DRAFT_TOKEN where none
    out_sources: torch.Tensor  # uint8, pipelines.types.SOURCE_* of the draft token at that position
    out_step_slot: torch.Tensor  # uint8, index of the token within its verification step (0..k)
    out_topk_ids: torch.Tensor  # [B, capacity + 1, m] int32
    out_topk_logprobs: torch.Tensor  # [B, capacity + 1, m] float16
    tally: torch.Tensor  # [2] int64: TALLY_TOKENS, TALLY_ROW_ROUNDS (shared by every bucket's view)
    position_tally: torch.Tensor  # [NUM_SOURCES, 2, max_k] int64: POSITION_* per SOURCE_* and position (shared)
    proposer_state: dict[str, Any] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.out_tokens.shape[1] - 1

    @classmethod
    def allocate(
        cls, batch_size: int, target_cache: PositionalKVCache, top_m: int, device: torch.device, *, max_k: int
    ):
        capacity = target_cache.max_seq_len
        rows = lambda dtype, fill=0: torch.full((batch_size,), fill, dtype=dtype, device=device)  # noqa: E731
        outs = lambda dtype, *extra: torch.zeros((batch_size, capacity + 1, *extra), dtype=dtype, device=device)  # noqa: E731
        return cls(
            batch_size=batch_size,
            target_cache=target_cache,
            lengths=rows(torch.int64, 1),
            current=rows(torch.int64),
            previous=rows(torch.int64),
            active=rows(torch.bool, False),
            generated=rows(torch.int64),
            max_new_tokens=rows(torch.int64),
            temperature=rows(torch.float32),
            top_p=rows(torch.float32, 1.0),
            seed=rows(torch.int64),
            target_forwards=rows(torch.int64),
            draft_steps=rows(torch.int64),
            drafted=rows(torch.int64),
            source_counts=torch.zeros((batch_size, NUM_SOURCES, 4), dtype=torch.int64, device=device),
            tokens=outs(torch.int64),
            out_tokens=outs(torch.int64),
            out_kinds=outs(torch.uint8),
            out_draft_tokens=outs(torch.int64),
            out_sources=outs(torch.uint8),
            out_step_slot=outs(torch.uint8),
            out_topk_ids=outs(torch.int32, top_m),
            out_topk_logprobs=outs(torch.float16, top_m),
            tally=torch.zeros(2, dtype=torch.int64, device=device),
            position_tally=torch.zeros((NUM_SOURCES, 2, max_k), dtype=torch.int64, device=device),
        )

    def rows(self, batch_size: int) -> DecodeState:
        """Views of the first `batch_size` rows of every buffer (the target cache and proposer state included)."""
        view = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "batch_size":
                view[name] = batch_size
            elif name in ("tally", "position_tally"):
                view[name] = value
            elif name == "target_cache":
                view[name] = value.rows(batch_size)
            elif name == "proposer_state":
                view[name] = {key: state.rows(batch_size) for key, state in value.items()}
            else:
                view[name] = value[:batch_size]
        return DecodeState(**view)

    def reset_tallies(self) -> None:
        """Zero the window counters (shared by every bucket's view)."""
        self.tally.zero_()
        self.position_tally.zero_()

    def record(
        self,
        tokens: torch.Tensor,  # [B, T] emitted candidates for T slots of this step
        valid: torch.Tensor,  # [B, T] bool, which slots really emit
        kinds: torch.Tensor,  # [B, T]
        draft_tokens: torch.Tensor,  # [B, T]
        sources: torch.Tensor,  # [B, T] SOURCE_* of the draft token at each slot
        topk_ids: torch.Tensor,  # [B, T, m]
        topk_logprobs: torch.Tensor,  # [B, T, m]
    ) -> None:
        """Append a step's emitted tokens and their feedback after each row's `generated` tokens, and write the
        tokens into `tokens` at their positions (lengths + 1 + slot: the slot after `current`)."""
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        index = torch.where(valid, self.generated[:, None] + slots, self.capacity).clamp_max(self.capacity)
        self.out_tokens.scatter_(1, index, tokens)
        self.out_kinds.scatter_(1, index, kinds.to(torch.uint8))
        self.out_draft_tokens.scatter_(1, index, draft_tokens)
        self.out_sources.scatter_(1, index, sources.to(torch.uint8))
        self.out_step_slot.scatter_(1, index, slots.expand_as(index).to(torch.uint8))
        wide = index[..., None].expand(-1, -1, topk_ids.shape[-1])
        self.out_topk_ids.scatter_(1, wide, topk_ids.to(torch.int32))
        self.out_topk_logprobs.scatter_(1, wide, topk_logprobs.to(torch.float16))
        positions = torch.where(valid, self.lengths[:, None] + 1 + slots, self.capacity).clamp_max(self.capacity)
        self.tokens.scatter_(1, positions, tokens)
