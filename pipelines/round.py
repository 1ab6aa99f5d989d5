"""One decoding round: a fixed sequence of tensor operations on static buffers, captured as a CUDA graph.

    propose   the variant's proposer drafts up to k tokens per row (none: no tokens)
    verify    the target runs once on [current, d_1..d_k] at positions L..L+k (pipelines.verify keeps n tokens
              and adds a recovered or bonus token); with a head in the engine its features are kept, whatever
              proposer drafted (the head can then join any row)
    record    emitted tokens, their feedback (kind, draft token, who drafted it, the target's top-m log-probs) and
              raw counters go to per-row buffers; the window tallies (tokens, active rows) for the controller
    advance   lengths += n + 1; rejected cache slots are simply overwritten next round
    finish    rows that emitted EOS, reached max_new_tokens or the end of their cache stop
    shadow    (auto, in some windows without suffix drafts) the suffix proposer scores its pending proposal against
              what the target emitted and proposes again, so the controller knows what suffix would have gained

Inactive rows run along as no-ops: their writes land at their own `lengths` (the engine parks a free or prefilling
slot's lengths at the end of its cache, where no prompt lives). Nothing here reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines import sampling
from pipelines.decode_state import COUNT_ACCEPTED, COUNT_DRAFTED, COUNT_FULL, COUNT_ROUNDS, NUM_SOURCES, DecodeState
from pipelines.proposers import Variant, empty_proposal
from pipelines.proposers.suffix import drafted_whole
from pipelines.types import KIND_ACCEPTED, KIND_BONUS, KIND_RECOVERED, NO_DRAFT_TOKEN, SOURCE_NONE
from pipelines.verify import verify_greedy, verify_sampled


@dataclass
class RoundModels:
    """What a round calls: the target's decoder and LM head, and the proposers the engine has."""

    target_forward: object  # pipelines.kv_cache.decoder_forward(target, ..., the head's feature_layers)
    lm_head: torch.nn.Module  # reads the first hidden_size columns of what target_forward returns
    hidden_size: int
    eos_ids: torch.Tensor
    top_m: int
    max_k: int  # the largest k of any variant: a row stops when its cache has no room for one more such round
    park: int  # where an inactive row's rounds write: the last max_k + 1 positions of its cache
    model: object | None = None  # the model proposer: proposers.draft.DraftModelProposer or proposers.head.HeadProposer
    suffix: object | None = None  # pipelines.proposers.suffix.SuffixProposer
    hybrid: object | None = None  # pipelines.proposers.hybrid.HybridProposer
    head: object | None = None  # the model proposer again when it is a head: it keeps the target's features
    shadow_k: int = 0  # k of the suffix shadow proposals (rounds with shadow=True)


def run_round(
    models: RoundModels, state: DecodeState, variant: Variant, greedy_only: bool, shadow: bool = False
) -> None:
    k = variant.k
    lengths, active = state.lengths, state.active
    steps = torch.arange(k + 1, device=lengths.device)

    proposal, match, rows_on_suffix = propose(models, state, variant, greedy_only)
    verify_tokens = torch.cat([state.current[:, None], proposal.tokens], dim=1)  # [B, k + 1]
    positions = lengths[:, None] + steps
    hidden = models.target_forward(verify_tokens, positions, state.target_cache)
    if models.head is not None:
        models.head.record_features(state, hidden, positions)
    target_logits = models.lm_head(hidden[..., : models.hidden_size]).float()  # [B, k + 1, V]
    counts = proposal.counts
    if greedy_only:
        outcome = verify_greedy(proposal.tokens, counts, target_logits)
    else:
        target_probs = sampling.warp(target_logits, state.temperature, state.top_p)
        outcome = verify_sampled(proposal.tokens, counts, proposal.probs, target_probs, state.seed, lengths + 1)

    accepted, next_token = outcome.accepted[:, None], outcome.next_token[:, None]  # [B, 1]
    with_next = torch.cat([proposal.tokens, next_token], dim=1)
    emitted = torch.where(steps == accepted, next_token, with_next)  # [B, k + 1]
    valid = (steps <= accepted) & active[:, None]
    proposed = steps < counts[:, None]  # slots that held a draft token (the recovered slot included)
    draft_tokens = torch.where(proposed, with_next, NO_DRAFT_TOKEN)
    sources = torch.where(proposed, proposal.sources[:, None], SOURCE_NONE)
    last_kind = torch.where(accepted == counts[:, None], KIND_BONUS, KIND_RECOVERED)
    kinds = torch.where(steps < accepted, KIND_ACCEPTED, last_kind)
    topk = torch.log_softmax(target_logits, dim=-1).topk(models.top_m, dim=-1)
    state.record(emitted, valid, kinds, draft_tokens, sources, topk.indices, topk.values)
    count_drafts(state, proposal.sources, counts, outcome.accepted)
    if match is not None:
        rows = active if rows_on_suffix is None else active & rows_on_suffix
        capped = drafted_whole(outcome.accepted, counts, proposal.tokens.shape[1])
        models.suffix.record(match, outcome.accepted, rows, capped, exposed=active)

    advance = torch.where(active, outcome.accepted + 1, 0)
    state.previous.copy_(torch.where(active, verify_tokens.gather(1, accepted)[:, 0], state.previous))
    state.current.copy_(torch.where(active, outcome.next_token, state.current))
    state.lengths.add_(advance)
    state.generated.add_(advance)
    state.target_forwards.add_(active.long())
    state.tally.add_(torch.stack([advance.sum(), active.sum()]))
    if shadow:
        models.suffix.shadow(state, models.shadow_k)
    finish_rows(models, state, emitted, valid)


def propose(models: RoundModels, state: DecodeState, variant: Variant, greedy_only: bool):
    """(proposal, suffix match length per row or None, rows that took the suffix draft in a hybrid round)."""
    if variant.proposer == "none" or variant.k == 0:
        return empty_proposal(state.batch_size, state.lengths.device), None, None
    if variant.proposer in ("draft", "head"):
        return models.model.propose(state, variant.k, greedy_only), None, None
    if variant.proposer == "suffix":
        proposal, match = models.suffix.propose(state, variant.k)
        return proposal, match, None
    if variant.proposer == "hybrid":
        return models.hybrid.propose(state, variant.k, greedy_only)
    raise ValueError(f"unknown proposer {variant.proposer!r}")


def count_drafts(state: DecodeState, sources: torch.Tensor, counts: torch.Tensor, accepted: torch.Tensor) -> None:
    """Raw counters: drafted tokens and draft steps per row, rounds / drafted / accepted / full per row and source,
    and, summed over rows in the window tally, the chain positions each source had tested and passed (the window's
    per-position acceptance, for the goodput controller)."""
    drafting = state.active & (counts > 0)
    state.drafted.add_(torch.where(state.active, counts, 0))
    state.draft_steps.add_(drafting.long())
    values = torch.zeros((state.batch_size, 4), dtype=torch.int64, device=counts.device)
    values[:, COUNT_ROUNDS] = 1
    values[:, COUNT_DRAFTED] = counts
    values[:, COUNT_ACCEPTED] = accepted
    values[:, COUNT_FULL] = (accepted == counts).long()
    values = values * drafting[:, None].long()
    rows = torch.arange(state.batch_size, device=counts.device) * NUM_SOURCES + sources.long()
    state.source_counts.view(-1, 4).index_add_(0, rows, values)
    positions = torch.arange(1, state.position_tally.shape[-1] + 1, device=counts.device)
    passed = accepted[:, None] >= positions
    tested = (counts[:, None] >= positions) & (accepted[:, None] >= positions - 1)
    by_position = torch.stack((passed, tested), dim=1) & drafting[:, None, None]  # [B, 2, max_k]
    state.position_tally.index_add_(0, sources.long(), by_position.long())


def finish_rows(models: RoundModels, state: DecodeState, emitted: torch.Tensor, valid: torch.Tensor) -> None:
    eos = torch.isin(emitted, models.eos_ids) & valid
    no_room = state.lengths + models.max_k + 1 > state.target_cache.max_seq_len
    done = eos.any(dim=1) | (state.generated >= state.max_new_tokens) | no_room
    # a finished row keeps running along as a no-op until its slot is refilled: park it, so its writes stay in
    # bounds (a row stopped for lack of room would otherwise write past the end of its cache)
    state.lengths.masked_fill_(state.active & done, models.park)
    state.active.logical_and_(~done)
