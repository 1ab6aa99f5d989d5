"""Lossless verification of k draft tokens against one target forward pass.

Terms (see also pipelines/types.py): of the k *draft tokens* d_1..d_k, the first n that pass the test are
*accepted*; at position n + 1 the target emits a *recovered token* (n < k) or a *bonus token* (n = k). So a
step emits n + 1 tokens for one target forward; *mean accepted length* counts the bonus token.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_j with probability min(1, p_j(d_j) /
q_j(d_j)); at the first rejection draw from norm(max(0, p_j - q_j)); after k acceptances draw from p_{k+1}.
The emitted sequence then has exactly the target's (warped) distribution. With one-hot p and q (greedy) the
same rule reduces to "accept while the draft matches the target's argmax, then emit the target's argmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines import sampling


@dataclass
class StepOutcome:
    accepted: torch.Tensor  # [B] int64, n: accepted draft tokens (0..k)
    accept_mask: torch.Tensor  # [B, k] bool, prefix mask of accepted positions
    next_token: torch.Tensor  # [B] int64, the recovered (n < k) or bonus (n = k) token


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> StepOutcome:
    """draft_tokens: [B, k]; target_logits: [B, k + 1, V]."""
    target_choice = target_logits.argmax(dim=-1)  # [B, k + 1]
    k = draft_tokens.shape[1]
    accept_mask = (draft_tokens == target_choice[:, :k]).long().cumprod(dim=1).bool()
    accepted = accept_mask.sum(dim=1)
    next_token = target_choice.gather(1, accepted[:, None]).squeeze(1)
    return StepOutcome(accepted, accept_mask, next_token)


def verify_sampled(
    draft_tokens: torch.Tensor,  # [B, k]
    draft_probs: torch.Tensor,  # [B, k, V], the warped q each draft token was drawn from
    target_probs: torch.Tensor,  # [B, k + 1, V], warped p
    seed: torch.Tensor,  # [B]
    first_position: torch.Tensor,  # [B], absolute position of the token d_1 stands for
) -> StepOutcome:
    batch, k = draft_tokens.shape
    steps = torch.arange(k + 1, device=draft_tokens.device)
    positions = first_position[:, None] + steps  # [B, k + 1]
    p_of_draft = target_probs[:, :k].gather(2, draft_tokens[..., None]).squeeze(2)
    q_of_draft = draft_probs.gather(2, draft_tokens[..., None]).squeeze(2)
    u = sampling.uniform(seed, positions[:, :k], sampling.STREAM_ACCEPT)
    accept_mask = (u * q_of_draft < p_of_draft).long().cumprod(dim=1).bool()
    accepted = accept_mask.sum(dim=1)

    # Residual at the first rejected position; at position k + 1 (all accepted) q is zero, so it is p itself.
    index = accepted[:, None, None].expand(batch, 1, target_probs.shape[-1])
    p_next = target_probs.gather(1, index).squeeze(1)
    q_padded = torch.cat([draft_probs, target_probs.new_zeros((batch, 1, target_probs.shape[-1]))], dim=1)
    q_next = q_padded.gather(1, index).squeeze(1)
    residual = (p_next - q_next).clamp_min(0.0)
    # p == q leaves no residual mass; then p itself is the right distribution (rejection had probability 0).
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    next_position = positions.gather(1, accepted[:, None])
    next_token = sampling.sample(residual[:, None], seed, next_position, sampling.STREAM_RESIDUAL).squeeze(1)
    return StepOutcome(accepted, accept_mask, next_token)
