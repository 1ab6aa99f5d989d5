"""Proposer `hybrid`: per row and round, the suffix draft when its match promises more accepted tokens than the
model draft (the draft LM or the head, whichever the engine has), else the model's (as Arctic Inference combines
suffix decoding with a draft model).

Both propose every round (the model's cost is paid either way, so hybrid pays only with a cheap model draft: a
head, or a small LM on a slow target). The promise of a suffix draft is the accepted tokens the controller expects
at its match length with k drafts (SuffixProposer.expected_accepted: from the rounds seen so far, projected past
the k of earlier rounds where whole drafts passed); the model's is r_1 + r_1 r_2 + ... + r_1 ... r_k for its
measured pass rates r_j at each chain position (`model_expected_accepted`). The engine writes both from the goodput
controller before each window of rounds of k drafts.
The model sees every emitted token: `after_suffix` makes it catch up on suffix tokens accepted in the previous round.
"""

from __future__ import annotations

import torch

from pipelines.decode_state import DecodeState
from pipelines.proposers import Proposal
from pipelines.proposers.suffix import SuffixProposer


class HybridProposer:
    name = "hybrid"

    def __init__(self, suffix: SuffixProposer, model):  # DraftModelProposer or HeadProposer
        self.suffix = suffix
        self.model = model
        device = suffix.hist.device
        self.model_expected_accepted = torch.zeros((), dtype=torch.float32, device=device)

    def propose(self, state: DecodeState, k: int, greedy_only: bool) -> tuple[Proposal, torch.Tensor, torch.Tensor]:
        """The combined proposal, each row's suffix match length, and which rows took the suffix draft."""
        by_suffix, match = self.suffix.propose(state, k)
        by_model = self.model.propose(state, k, greedy_only, after_suffix=True)
        promise = self.suffix.expected_accepted[match].minimum(by_suffix.counts.float())
        use_suffix = (by_suffix.counts > 0) & (promise > self.model_expected_accepted)
        pick = lambda a, b: torch.where(use_suffix.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        probs = None
        if by_model.probs is not None:
            one_hot = torch.nn.functional.one_hot(by_suffix.tokens, by_model.probs.shape[-1]).to(by_model.probs.dtype)
            probs = pick(one_hot, by_model.probs)
        proposal = Proposal(
            pick(by_suffix.tokens, by_model.tokens),
            pick(by_suffix.counts, by_model.counts),
            probs,
            pick(by_suffix.sources, by_model.sources),
        )
        return proposal, match, use_suffix
