"""Static per-batch-size buffers of the speculative loop, allocated once and updated in place.

In-place updates matter: a CUDA graph captured for one batch size replays against exactly these tensors.
Slot `capacity` of every output buffer is a dump column: writes for positions that emit nothing land there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.kv_cache import PositionalKVCache


@dataclass
class DecodeState:
    batch_size: int
    target_cache: PositionalKVCache
    draft_cache: PositionalKVCache | None
    # Per row. A row's caches hold `lengths` tokens; `current` (already emitted) sits at position `lengths`
    # and is not in any cache yet; `previous` is the token at position lengths - 1.
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
    # Per emitted position, indexed by generated order; [B, capacity + 1] (+ dump column).
    out_tokens: torch.Tensor  # int64
    out_kinds: torch.Tensor  # uint8, pipelines.types.KIND_*
    out_draft_tokens: torch.Tensor  # int64, NO_DRAFT_TOKEN where none
    out_step_slot: torch.Tensor  # uint8, index of the token within its verification step (0..k)
    out_topk_ids: torch.Tensor  # [B, capacity + 1, m] int32
    out_topk_logprobs: torch.Tensor  # [B, capacity + 1, m] float16

    @property
    def capacity(self) -> int:
        return self.out_tokens.shape[1] - 1

    @classmethod
    def allocate(
        cls,
        batch_size: int,
        target_cache: PositionalKVCache,
        draft_cache: PositionalKVCache | None,
        top_m: int,
        device: torch.device,
    ) -> "DecodeState":
        capacity = target_cache.max_seq_len
        rows = lambda dtype, fill=0: torch.full((batch_size,), fill, dtype=dtype, device=device)  # noqa: E731
        outs = lambda dtype, *extra: torch.zeros((batch_size, capacity + 1, *extra), dtype=dtype, device=device)  # noqa: E731
        return cls(
            batch_size=batch_size,
            target_cache=target_cache,
            draft_cache=draft_cache,
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
            out_tokens=outs(torch.int64),
            out_kinds=outs(torch.uint8),
            out_draft_tokens=outs(torch.int64),
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
        topk_ids: torch.Tensor,  # [B, T, m]
        topk_logprobs: torch.Tensor,  # [B, T, m]
    ) -> None:
        """Append a step's emitted tokens and their feedback after each row's `generated` tokens."""
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        index = torch.where(valid, self.generated[:, None] + slots, self.capacity)
        index = index.clamp_max(self.capacity)
        self.out_tokens.scatter_(1, index, tokens)
        self.out_kinds.scatter_(1, index, kinds.to(torch.uint8))
        self.out_draft_tokens.scatter_(1, index, draft_tokens)
        self.out_step_slot.scatter_(1, index, slots.expand_as(index).to(torch.uint8))
        wide = index[..., None].expand(-1, -1, topk_ids.shape[-1])
        self.out_topk_ids.scatter_(1, wide, topk_ids.to(torch.int32))
        self.out_topk_logprobs.scatter_(1, wide, topk_logprobs.to(torch.float16))
