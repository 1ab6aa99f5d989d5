"""Proposer `head`: an EAGLE-style head (pipelines.heads) drafts k tokens from the target's own features.

Per row it keeps the head's positional KV cache and the target's *feature history*: the target's feature at every
position it has verified, written by the prefill and by every round's verify pass whatever proposer drafted
(`record_features`), so the head can join a row at any time. Each head round runs pipelines.heads.drafting
.draft_chain: a catch-up over the last `window` = the engine's max k + 1 positions (which covers everything the
previous round verified), then k - 1 feature-level steps. A row the head has not followed (a newcomer, or rounds
run by another proposer) is caught up first by `sync`, one eager head forward over its whole context.

A head step costs one decoder layer plus the target's LM head (the rows of its draft vocabulary, if it has a reduced
one), about a tenth of a 1.5B target forward, against ~0.8 for the 0.5B draft LM.
Weights are swapped in place (`swap`), so captured graphs keep pointing at the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.decode_state import DecodeState
from pipelines.heads.drafting import draft_chain
from pipelines.heads.model import HeadDraft
from pipelines.kv_cache import PositionalKVCache, RowSubsetCache, catch_up_positions
from pipelines.proposers import Proposal, Variant, copy_weights
from pipelines.types import SOURCE_HEAD


@dataclass
class HeadState:
    """Per row: the head's KV cache and the target's features by position."""

    cache: PositionalKVCache
    features: torch.Tensor  # [B, S, F] in the target's dtype (F = H, or more for a fused head)

    def rows(self, batch_size: int) -> HeadState:
        return HeadState(self.cache.rows(batch_size), self.features[:batch_size])


class HeadProposer:
    name = "head"
    source = SOURCE_HEAD

    def __init__(self, draft: HeadDraft, max_seq_len: int, window: int):
        self.model = draft
        self.max_seq_len = max_seq_len
        self.window = window
        draft.refresh_drafting()  # the draft vocabulary's LM head rows exist before any round is captured

    def allocate(self, batch_size: int) -> HeadState:
        param = next(self.model.target.parameters())
        shape = (batch_size, self.max_seq_len, self.model.config.feature_size)
        return HeadState(
            self.model.head.allocate_cache(batch_size, self.max_seq_len),
            torch.zeros(shape, dtype=param.dtype, device=param.device),
        )

    @staticmethod
    def needs_catch_up(previous: Variant | None, variant: Variant) -> bool:
        """Never: its first step re-feeds the last max k + 1 positions (module docstring), whatever ran before."""
        return False

    # ------------------------------------------------------------------ captured

    def record_features(self, state: DecodeState, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the target's features [B, T, F] at positions [B, T] (clamped into the buffer)."""
        features = state.proposer_state[self.name].features
        index = positions.clamp_max(features.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[-1])
        features.scatter_(1, index, hidden.to(features.dtype))

    def propose(self, state: DecodeState, k: int, greedy_only: bool, after_suffix: bool = False) -> Proposal:
        """k tokens per row (the catch-up window covers suffix tokens a hybrid round accepted, so `after_suffix`
        changes nothing here)."""
        mine: HeadState = state.proposer_state[self.name]
        tokens, probs = draft_chain(
            self.model,
            mine.cache,
            mine.features,
            state.tokens,
            state.lengths,
            k,
            self.window,
            greedy_only,
            state.temperature,
            state.top_p,
            state.seed,
        )
        batch = state.lengths.shape[0]
        device = state.lengths.device
        return Proposal(
            tokens=tokens,
            counts=torch.full((batch,), k, dtype=torch.int64, device=device),
            probs=probs,
            sources=torch.full((batch,), SOURCE_HEAD, dtype=torch.uint8, device=device),
        )

    # ------------------------------------------------------------------ eager, between rounds

    def sync(self, state: DecodeState, rows: list[int], lengths: list[int], width: int | None = None) -> None:
        """Catch the head up on rows whose context it has not followed: one forward over positions 0..L-1 of each
        (inputs: the token at p + 1 and the target's feature at p), right-padded rows clamped to their own L - 1
        so padding rewrites a real position with the same input; `width`: the padded width, at least max(L))."""
        mine: HeadState = state.proposer_state[self.name]
        device = state.lengths.device
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        positions = catch_up_positions(lengths, max(width or 0, *lengths), device)
        tokens = state.tokens[rows_t].gather(1, positions + 1)
        hidden = mine.features.shape[-1]
        features = mine.features[rows_t].gather(1, positions[..., None].expand(-1, -1, hidden))
        self.model(tokens, features, positions, RowSubsetCache(mine.cache, rows_t))

    def swap(self, weights: HeadDraft | dict[str, torch.Tensor]) -> None:
        """Copy new head weights into the served head; refuses weights of another shape or names, or fused over
        other target layers than the engine's verify pass returns."""
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        mine, theirs = self.model.head.state_dict().get("feature_layers"), state.get("head.feature_layers")
        if mine is not None and theirs is not None and not torch.equal(mine.cpu(), theirs.cpu()):
            raise ValueError(
                f"head weights fused over target layers {theirs.tolist()} do not fit the served head, which reads "
                f"layers {mine.tolist()}"
            )
        copy_weights(self.model, state, "head")
        self.model.refresh_drafting()  # the draft vocabulary's ids may have changed: its LM head rows, in place
