"""Exact greedy-chain replay of a head on recorded feedback: the engine's rounds, simulated with the engine's own
drafting function.

A draft LM's chain can be read off one teacher-forced pass (pipelines.replay), because every proposal it makes
while a round keeps accepting comes from a prefix of emitted tokens. A head's step j >= 2 reads its own output g
in place of the target's feature, which no teacher-forced pass computes, so the rounds are simulated as the engine
runs them, several requests in lockstep:

    features   one teacher-forced target pass over prompt + emitted tokens (FeatureBank): f_p for every position
    prefill    the target's prefill emits t_0 (forwards = 1); the head's cache gets positions p = 0 .. P - 1, inputs
               (embed(t_{p+1}), f_p): right-padded rows clamp their positions to their own P - 1, so pad columns
               rewrite a real position with the same input
    round      L = position of the last emitted token (P at first): draft_chain(draft, cache, features, tokens, L,
               k, window, greedy_only=True); accept while a proposal equals the emitted token (cut at n, as
               pipelines.replay.greedy_chain does); forwards += 1; L += accepted + 1
    a row      is done once L reaches its last emitted token; it idles (its rounds are computed and ignored)

`window` is the engine's catch-up window (its max k + 1). The catch-up rewrites the window's cache entries from
true features, so the window changes no value, only which floating-point path computes it; the replay uses the
engine's to reproduce it bit for bit where the engine's batch does. Reads back to the host once per round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipelines.heads.drafting import draft_chain
from pipelines.heads.feedback import FeatureBank
from pipelines.learners import distill
from pipelines.replay import Chain
from pipelines.types import KIND_ACCEPTED, KIND_BONUS, KIND_RECOVERED, NO_DRAFT_TOKEN, RequestFeedback


def head_chains(
    draft,  # pipelines.heads.model.HeadDraft
    examples: Sequence[RequestFeedback],  # greedy requests with emitted tokens
    *,
    k: int,
    window: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    features: FeatureBank | None = None,
) -> list[Chain]:
    """The engine's chain for every request, in order (module docstring)."""
    window = k + 1 if window is None else window
    if k < 1 or window < k + 1:
        raise ValueError(f"a head replays with k >= 1 and window >= k + 1, got k {k}, window {window}")
    device = device if device is not None else next(draft.parameters()).device
    features = features if features is not None else FeatureBank(draft.target, draft.config.feature_layers)
    chains: list[Chain] = []
    was_training = draft.training
    draft.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chains.extend(_lockstep(draft, examples[start : start + batch_size], k, window, device, features))
    finally:
        draft.train(was_training)
    return chains


@torch.no_grad()
def _lockstep(draft, group: Sequence[RequestFeedback], k: int, window: int, device, bank: FeatureBank) -> list[Chain]:
    prompt = np.array([len(e.prompt_ids) for e in group])
    emitted = np.array([len(e.token_ids) for e in group])
    last = prompt + emitted - 1  # position of each row's last emitted token
    width = int(last.max()) + 1
    tokens = torch.zeros(len(group), width, dtype=torch.int64)
    for row, example in enumerate(group):
        tokens[row, : last[row] + 1] = torch.from_numpy(np.concatenate([example.prompt_ids, example.token_ids]))
    tokens = tokens.to(device)
    features = bank.padded(group, distill.collate(group, device).input_ids, draft.config.feature_layers)  # [B, w-1, F]
    cache = draft.head.allocate_cache(len(group), width + k)
    _prefill(draft, cache, features, tokens, torch.as_tensor(prompt, device=device))

    lengths = torch.as_tensor(prompt, device=device)  # L: t_0 sits at position P
    ends = torch.as_tensor(last, device=device)
    slots = torch.arange(k, device=device)
    chains = [_ChainBuilder(n, k) for n in emitted]
    while True:
        active = lengths < ends
        if not bool(active.any()):
            break
        proposals, _ = draft_chain(draft, cache, features, tokens, lengths, k, window, greedy_only=True)
        truth = tokens.gather(1, (lengths[:, None] + 1 + slots).clamp_max(width - 1))
        left = (ends - lengths)[:, None]  # tokens still to emit
        accepted = ((proposals == truth) & (slots < left)).long().cumprod(dim=1).sum(dim=1)
        on_host = (t.cpu().numpy() for t in (active, lengths, proposals, accepted))  # the round's one read-back
        for row, (busy, length, proposed, taken) in enumerate(zip(*on_host)):
            if busy:
                chains[row].add_round(int(length + 1 - prompt[row]), proposed.tolist(), int(taken))
        lengths = torch.minimum(lengths + accepted + 1, ends)  # a round that takes the last tokens ends the row
    return [chain.done() for chain in chains]


def _prefill(draft, cache, features: torch.Tensor, tokens: torch.Tensor, prompt: torch.Tensor) -> None:
    """The head's prefill of new rows: positions 0 .. P - 1 into the cache (pad columns repeat P - 1)."""
    columns = torch.arange(int(prompt.max()), device=prompt.device)
    positions = torch.minimum(columns[None, :], prompt[:, None] - 1)  # [B, P_max]
    step_features = features.gather(1, positions[..., None].expand(-1, -1, features.shape[-1]))
    draft(tokens.gather(1, positions + 1), step_features, positions, cache)


class _ChainBuilder:
    """Counts and labels of one request's rounds, as the engine's feedback records them."""

    def __init__(self, emitted: int, k: int):
        self.k = k
        self.forwards = 1  # the prefill emits t_0
        self.per_slot = [0] * k
        self.kinds = np.full(emitted, KIND_BONUS, dtype=np.uint8)
        self.draft_tokens = np.full(emitted, NO_DRAFT_TOKEN, dtype=np.int32)

    def add_round(self, first: int, proposals: list[int], accepted: int) -> None:
        """A round that emits tokens first .. first + accepted (the last one recovered, or a bonus)."""
        self.forwards += 1
        for slot in range(accepted):
            self.per_slot[slot] += 1
        self.kinds[first : first + accepted] = KIND_ACCEPTED
        self.draft_tokens[first : first + accepted] = proposals[:accepted]
        end = first + accepted
        if end < len(self.kinds) and accepted < self.k:
            self.kinds[end] = KIND_RECOVERED
            self.draft_tokens[end] = proposals[accepted]

    def done(self) -> Chain:
        return Chain(self.forwards, self.per_slot, self.kinds, self.draft_tokens)
