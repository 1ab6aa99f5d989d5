"""One drafting round of a head: catch up on the verified features, then k feature-level autoregressive steps.

The same function runs inside the engine's captured round (pipelines.proposers.head) and in the exact held-out
replay of heads (pipelines.heads.replay), so replay reproduces live drafting operation for operation.

Per row, before the round: `tokens[b, p]` holds the token at position p for p <= L (L = lengths[b], the position of
`current`, the last emitted token), `features[b, p]` the target's feature at position p for p < L (every position the
target has verified; slots >= L may hold stale values), and the head's positional KV cache holds correct entries for
positions < L - window (earlier rounds' catch-ups; positions after that may hold anything). The round:

    catch-up   positions L - window .. L - 1 (clamped at 0): inputs (embed(tokens[p + 1]), features[p]); writes
               correct cache entries for the whole window (a round advances L by at most k + 1 <= window, so the
               window always covers what the previous round verified) and gives g at L - 1 -> d_1
    step j     (j = 2..k) input (embed(d_{j-1}), g of the previous step) at position L + j - 2 -> d_j

A query at position q sees cache slots <= q only, and every slot <= L - 1 was just written from true features, so
stale entries past L (earlier rounds' draft steps) are never read before they are overwritten. Nothing here reads a
value back to the host.
"""

from __future__ import annotations

import torch

from pipelines import sampling
from pipelines.kv_cache import PositionalKVCache


def draft_chain(
    draft,  # pipelines.heads.model.HeadDraft
    cache: PositionalKVCache,
    features: torch.Tensor,  # [B, S, F] the target's features by position (F: the head's config.feature_size)
    tokens: torch.Tensor,  # [B, S + 1] int64 tokens by position
    lengths: torch.Tensor,  # [B] int64, L
    k: int,
    window: int,
    greedy_only: bool,
    temperature: torch.Tensor | None = None,  # [B] (sampling)
    top_p: torch.Tensor | None = None,  # [B]
    seed: torch.Tensor | None = None,  # [B]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft k tokens per row: ([B, k] int64 tokens, [B, k, V] warped q they were drawn from, or None if greedy).
    Greedy rows propose the argmax; sampled rows draw from the warped q with sampling.STREAM_DRAFT at the proposed
    token's position, exactly as the draft-model proposer does."""
    assert k >= 1 and window >= k + 1, (k, window)
    offsets = torch.arange(window, 0, -1, device=lengths.device)  # window .. 1
    positions = (lengths[:, None] - offsets).clamp_min(0)  # [B, window], ending at L - 1
    hidden_size = features.shape[-1]
    step_features = features.gather(1, positions[..., None].expand(-1, -1, hidden_size))
    step_tokens = tokens.gather(1, positions + 1)
    outputs = draft(step_tokens, step_features, positions, cache)[:, -1:]  # [B, 1, H]: g at L - 1
    proposals, probs = [], []
    for step in range(k):
        logits = draft.draft_logits(outputs)  # [B, 1, V'] over the head's draft vocabulary (V' = V without one)
        position = (lengths + 1 + step)[:, None]  # where the proposed token will sit
        if greedy_only:
            token = draft.draft_token_ids(logits[:, -1].argmax(dim=-1))
        else:
            q = draft.full_vocab(sampling.warp(logits, temperature, top_p))  # [B, 1, V], zero outside the draft's
            token = sampling.sample(q, seed, position, sampling.STREAM_DRAFT)[:, 0]
            probs.append(q[:, 0])
        proposals.append(token)
        if step + 1 < k:
            outputs = draft(token[:, None], outputs, position - 1, cache)
    return torch.stack(proposals, dim=1), (torch.stack(probs, dim=1) if probs else None)
