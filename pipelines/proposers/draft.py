"""Proposer `draft`: a small LM with the target's tokenizer drafts k tokens, one forward per token.

It keeps its own positional KV cache (pipelines.kv_cache), filled by `sync` (one eager forward over a row's context:
a newcomer, or a row other proposers drafted for). The first step of a round re-feeds the last `window` tokens of
the row ending at `current`: with window 2 (this proposer alone) that is `previous`, which catches the cache up
after a fully accepted round (its last draft token was never fed); in a hybrid round the row may have accepted up to
k suffix tokens since the draft last ran, so the window covers k + 2 tokens. That covers the previous round only if
it drafted no more: the engine catches rows up with `sync` before a draft round, or a hybrid round of smaller k,
that follows a hybrid round. Re-feeding a position the cache already holds writes the same keys and values again.

Weights are swapped in place (`swap`), so captured graphs keep pointing at the same parameters.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from pipelines import sampling
from pipelines.decode_state import DecodeState
from pipelines.kv_cache import PositionalKVCache, RowSubsetCache, catch_up_positions, decoder_forward
from pipelines.proposers import Proposal, Variant, copy_weights
from pipelines.types import SOURCE_DRAFT


class DraftModelProposer:
    name = "draft"
    source = SOURCE_DRAFT

    def __init__(self, model: PreTrainedModel, max_seq_len: int, compile: bool = False):
        self.model = model
        self.max_seq_len = max_seq_len
        self.forward = decoder_forward(model, compile)
        self._sync_forward = decoder_forward(model)  # eager: context widths vary
        self.lm_head = model.get_output_embeddings()

    def allocate(self, batch_size: int) -> PositionalKVCache:
        return PositionalKVCache.allocate(self.model, batch_size, self.max_seq_len)

    def sync(self, state: DecodeState, rows: list[int], lengths: list[int], width: int | None = None) -> None:
        """Run the draft over positions 0..L-1 of each row into its cache (right-padded rows clamped to their own
        L - 1: padding rewrites a real position with the same input; `width`: the padded width, at least max(L))."""
        device = state.lengths.device
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        positions = catch_up_positions(lengths, max(width or 0, *lengths), device)
        tokens = state.tokens[rows_t].gather(1, positions)
        self._sync_forward(tokens, positions, RowSubsetCache(state.proposer_state[self.name], rows_t))

    @staticmethod
    def needs_catch_up(previous: Variant | None, variant: Variant) -> bool:
        """Whether rows this proposer followed are behind before a round of `variant` after one of `previous`: the
        first step re-feeds only k + 2 tokens after a hybrid round (module docstring), so a draft round, or a hybrid
        round of smaller k, after a hybrid round catches up first."""
        return (
            previous is not None
            and previous.proposer == "hybrid"
            and (variant.proposer == "draft" or variant.k < previous.k)
        )

    def propose(self, state: DecodeState, k: int, greedy_only: bool, after_suffix: bool = False) -> Proposal:
        """k tokens per row; `after_suffix` (hybrid rounds) widens the re-fed window to k + 2 tokens."""
        cache = state.proposer_state[self.name]
        window = k + 2 if after_suffix else 2
        lengths = state.lengths
        offsets = torch.arange(window - 1, -1, -1, device=lengths.device)
        positions = (lengths[:, None] - offsets).clamp_min(0)  # [B, window], ending at `current`
        tokens = state.tokens.gather(1, positions)
        proposals, probs = [], []
        for step in range(k):
            hidden = self.forward(tokens, positions, cache)[:, -1:]
            logits = self.lm_head(hidden).float()  # [B, 1, V]
            position = (lengths + 1 + step)[:, None]  # where the proposed token will sit
            if greedy_only:
                token = logits[:, -1].argmax(dim=-1)
            else:
                q = sampling.warp(logits, state.temperature, state.top_p)
                token = sampling.sample(q, state.seed, position, sampling.STREAM_DRAFT)[:, 0]
                probs.append(q[:, 0])
            proposals.append(token)
            tokens, positions = token[:, None], position
        batch = lengths.shape[0]
        return Proposal(
            tokens=torch.stack(proposals, dim=1),
            counts=torch.full((batch,), k, dtype=torch.int64, device=lengths.device),
            probs=torch.stack(probs, dim=1) if probs else None,
            sources=torch.full((batch,), SOURCE_DRAFT, dtype=torch.uint8, device=lengths.device),
        )

    def swap(self, weights: PreTrainedModel | dict[str, torch.Tensor]) -> None:
        """Copy new weights into the served parameters; refuses weights of another shape or names."""
        copy_weights(self.model, weights, "draft")
