"""Proposer `draft`: a small LM with the target's tokenizer drafts k tokens, one forward per token.

It keeps its own positional KV cache (pipelines.kv_cache), filled by `prefill` at the start of a batch. The first
step of a round re-feeds the last `window` tokens of the row ending at `current`: with window 2 (this proposer
alone) that is `previous`, which catches the cache up after a fully accepted round (its last draft token was never
fed); in a hybrid round the row may have accepted up to k suffix tokens since the draft last ran, so the window
covers k + 2 tokens. Re-feeding a position the cache already holds writes the same keys and values again.

Weights are swapped in place (`swap`), so captured graphs keep pointing at the same parameters.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from pipelines import sampling
from pipelines.decode_state import DecodeState
from pipelines.kv_cache import PositionalKVCache, decoder_forward
from pipelines.proposers import Proposal
from pipelines.types import SOURCE_DRAFT


class DraftModelProposer:
    name = "draft"
    source = SOURCE_DRAFT

    def __init__(self, model: PreTrainedModel, max_batch_size: int, max_seq_len: int, compile: bool = False):
        self.model = model
        self.cache = PositionalKVCache.allocate(model, max_batch_size, max_seq_len)
        self.forward = decoder_forward(model, compile)
        self._prefill_forward = decoder_forward(model)  # eager: prompt widths vary (see the engine's prefill)
        self.lm_head = model.get_output_embeddings()

    def allocate(self, batch_size: int) -> PositionalKVCache:
        return self.cache.rows(batch_size)

    def prefill(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Run the draft over the (right-padded) prompts into its cache; padding lands in slots that are
        overwritten before any query can see them."""
        cache = state.proposer_state[self.name]
        self._prefill_forward(tokens, positions, cache)

    def propose(self, state: DecodeState, k: int, greedy_only: bool, window: int = 2) -> Proposal:
        cache = state.proposer_state[self.name]
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
        state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        own = self.model.state_dict()
        missing = set(own) - set(state_dict)
        unexpected = set(state_dict) - set(own)
        misshapen = sorted(n for n in set(own) & set(state_dict) if own[n].shape != state_dict[n].shape)
        if missing or unexpected or misshapen:
            raise ValueError(
                f"draft weights do not fit the draft model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}, wrong shape {misshapen[:3]}"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])
