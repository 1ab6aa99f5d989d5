"""Static per-batch-size buffers of the speculative loop, allocated once and updated in place.

In-place updates matter: a CUDA graph captured for one batch size replays against exactly these tensors.
Slot `capacity` of every output buffer is a dump column: writes for positions that emit nothing land there.
Proposers keep their own per-batch-size buffers (a draft model's KV cache rows, the suffix proposer's shadow
counters) in `proposer_state`, keyed by proposer name.
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
    proposer_state: dict[str, Any] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.out_tokens.shape[1] - 1

    @classmethod
    def allocate(cls, batch_size: int, target_cache: PositionalKVCache, top_m: int, device: torch.device):
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
        )

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
