"""Lossless verification of up to k draft tokens per row against one target forward pass.

Terms (see also pipelines/types.py): a row drafts c tokens d_1..d_c (0 <= c <= k; slots c+1..k are padding and
never accepted). The first n that pass the test are *accepted*; at position n + 1 the target emits a *recovered
token* (n < c) or a *bonus token* (n = c: every drafted token was accepted, including c = 0). So a step emits
n + 1 tokens for one target forward; *mean accepted length* (AvgLen) counts the bonus token.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_j with probability min(1, p_j(d_j) /
q_j(d_j)); at the first rejection draw from norm(max(0, p_j - q_j)); after all c acceptances draw from p_{c+1}.
The emitted sequence then has exactly the target's (warped) distribution. A deterministic proposer (suffix
matching) has a one-hot q: d_j is accepted with probability p_j(d_j), and the residual is p_j without d_j. With
one-hot p as well (greedy) the rule reduces to "accept while the draft matches the target's argmax, then emit the
target's argmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines import sampling


@dataclass
class StepOutcome:
    accepted: torch.Tensor  # [B] int64, n: accepted draft tokens (0..counts)
    accept_mask: torch.Tensor  # [B, k] bool, prefix mask of accepted positions
    next_token: torch.Tensor  # [B] int64, the recovered (n < c) or bonus (n = c) token


def drafted_slots(counts: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] bool: which draft slots hold a proposal (slot j < counts[b])."""
    return torch.arange(k, device=counts.device) < counts[:, None]


def verify_greedy(draft_tokens: torch.Tensor, counts: torch.Tensor, target_logits: torch.Tensor) -> StepOutcome:
    """draft_tokens: [B, k]; counts: [B] proposals per row; target_logits: [B, k + 1, V]."""
    target_choice = target_logits.argmax(dim=-1)  # [B, k + 1]
    k = draft_tokens.shape[1]
    matches = (draft_tokens == target_choice[:, :k]) & drafted_slots(counts, k)
    accept_mask = matches.long().cumprod(dim=1).bool()
    accepted = accept_mask.sum(dim=1)
    next_token = target_choice.gather(1, accepted[:, None]).squeeze(1)
    return StepOutcome(accepted, accept_mask, next_token)


def verify_sampled(
    draft_tokens: torch.Tensor,  # [B, k]
    counts: torch.Tensor,  # [B]
    draft_probs: torch.Tensor | None,  # [B, k, V] the warped q each draft token was drawn from; None = one-hot q
    target_probs: torch.Tensor,  # [B, k + 1, V], warped p
    seed: torch.Tensor,  # [B]
    first_position: torch.Tensor,  # [B], absolute position of the token d_1 stands for
) -> StepOutcome:
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    drafted = drafted_slots(counts, k)
    positions = first_position[:, None] + torch.arange(k + 1, device=draft_tokens.device)  # [B, k + 1]
    p_of_draft = target_probs[:, :k].gather(2, draft_tokens[..., None]).squeeze(2)
    if draft_probs is None:
        q_of_draft = torch.ones_like(p_of_draft)
    else:
        q_of_draft = draft_probs.gather(2, draft_tokens[..., None]).squeeze(2)
    u = sampling.uniform(seed, positions[:, :k], sampling.STREAM_ACCEPT)
    accept_mask = ((u * q_of_draft < p_of_draft) & drafted).long().cumprod(dim=1).bool()
    accepted = accept_mask.sum(dim=1)

    # Residual at the first rejected slot; at a slot without a proposal (n = c) q is zero there, so it is p itself.
    p_next = target_probs.gather(1, accepted[:, None, None].expand(batch, 1, vocab)).squeeze(1)  # [B, V]
    rejected = accepted < counts
    if draft_probs is None:
        d_next = draft_tokens.gather(1, accepted.clamp_max(k - 1)[:, None]) if k else accepted[:, None]
        without_draft = p_next.scatter(1, d_next, 0.0)
        residual = torch.where(rejected[:, None], without_draft, p_next)
    else:
        q_padded = torch.cat([draft_probs, draft_probs.new_zeros((batch, 1, vocab))], dim=1)
        q_next = q_padded.gather(1, accepted[:, None, None].expand(batch, 1, vocab)).squeeze(1)
        residual = torch.where(rejected[:, None], (p_next - q_next).clamp_min(0.0), p_next)
    # p == q leaves no residual mass; then p itself is the right distribution (rejection had probability 0).
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    next_position = positions.gather(1, accepted[:, None])
    next_token = sampling.sample(residual[:, None], seed, next_position, sampling.STREAM_RESIDUAL).squeeze(1)
    return StepOutcome(accepted, accept_mask, next_token)
