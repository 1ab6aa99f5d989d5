"""Held-out replay: what a draft would have achieved on recorded requests, from one teacher-forced pass.

Input: feedback of requests the draft was not trained on (prompt, emitted tokens t_0..t_{n-1}, the target's
stored top-m log-probs). Decoding is lossless, so the emitted tokens are the same whichever draft served them;
only the number of target forwards depends on the draft.

Greedy chain (exact). One draft forward over prompt + t_0..t_{n-2} gives, at sequence index P - 1 + i, the
draft's argmax g_i given the true prefix t_<i. While a speculative step keeps accepting, every draft proposal is
made from a prefix of emitted tokens, so the draft's real proposals are exactly these teacher-forced g_i; the
first mismatch ends the step and the draft never sees anything else. Hence, with k draft tokens per step:

    the prefill forward emits t_0                                           (forwards = 1, i = 1)
    while i < n:  a = max{a <= k : g_j = t_j for i <= j < min(i + a, n)}   accepted draft tokens
                  forwards += 1;  i += a + 1                                (a accepted + 1 recovered/bonus)
    AvgLen = sum n / sum forwards  (over greedy requests; the bonus token counts, as in RequestCounters)

This is the engine's own accounting, including the chain cut by max_new_tokens, EOS or a stop string (the last
step covers whatever is left) and k = 0 (one token per forward). A request counts as greedy iff every emitted
token is a target top-1 by its stored log-prob (ties included, see is_greedy): that is exactly when its tokens
are the greedy continuation, whatever the request's temperature said. Other (sampled) requests contribute only
to `acceptance`. Feedback decoded without a draft (target-only) replays like any other: only the tokens matter.
The argmaxes come from a full forward rather than the engine's incremental KV-cached one; in float32 they agree
(the tests check equality with the engine), in bfloat16 a near-tie can occasionally flip.

Sampling acceptance (estimate). At every emitted position i >= 1 (position 0 is the prefill's token, never
drafted), with the target's stored top-m probabilities p(x) = exp(l_x) at temperature 1 (NOT renormalised) and
the draft's full-vocabulary softmax q at temperature 1:

    alpha_i = sum_{x in top-m} min(p(x), q(x))      a lower bound of 1 - TV(p, q) = sum_x min(p(x), q(x))
    alpha_i + (1 - sum_{x in top-m} p(x))           an upper bound (the unseen tail contributes at most its mass)

`acceptance` / `acceptance_upper` are their means over positions (greedy and sampled requests alike); with
m = 16 the two are usually within a few percent. Renormalising p over the top-m would give a number that is
neither bound, so the bounds are reported instead. `expected_avg_len` turns the mean into the expected tokens
per target forward of sampled chain decoding, (1 - alpha^(k+1)) / (1 - alpha).

`served_by` rewrites greedy feedback as if another draft had served it (the kinds and draft tokens of that
draft's chain), from the same single pass.

Heads (pipelines.heads.model.HeadDraft) go through the same entry points. Their acceptance estimate and
argmax_match come from the same teacher-forced pass, over the head's draft vocabulary when it has a reduced one (a
head's step 1 reads the target's true features, so it is teacher-forced too), but their chains cannot: steps >= 2
read the head's own outputs, so pipelines.heads.replay simulates the engine's rounds with the engine's drafting
function.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipelines.heads.model import HeadDraft
from pipelines.learners import distill
from pipelines.types import (
    KIND_ACCEPTED,
    KIND_BONUS,
    KIND_RECOVERED,
    NO_DRAFT_TOKEN,
    SOURCE_HEAD,
    SOURCE_NONE,
    RequestFeedback,
)


@dataclass
class ReplayMetrics:
    k: int
    avg_len: float  # exact greedy-chain tokens per target forward (bonus included); nan without greedy requests
    tokens: int  # emitted tokens of the greedy requests (the AvgLen numerator)
    forwards: int  # target forwards of the greedy chains, prefill included (the AvgLen denominator)
    requests: int  # requests scored (with at least one emitted token)
    greedy_requests: int
    accepted_at_position: list[int] = field(default_factory=list)  # [k] accepted draft tokens per draft slot
    argmax_match: float = float("nan")  # fraction of greedy positions i >= 1 where the draft's argmax is t_i
    acceptance: float = float("nan")  # mean lower bound of sum_x min(p, q) over positions i >= 1 of all requests
    acceptance_upper: float = float("nan")  # mean upper bound (tail mass added)
    acceptance_positions: int = 0  # positions those means are over
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(self.accepted_at_position)

    @property
    def expected_avg_len(self) -> float:
        """Expected tokens per target forward of sampled decoding with per-token acceptance `acceptance`."""
        alpha = self.acceptance
        if not np.isfinite(alpha):
            return float("nan")
        return float(self.k + 1) if alpha >= 1 else (1 - alpha ** (self.k + 1)) / (1 - alpha)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["expected_avg_len"] = self.expected_avg_len
        return out


def greedy_chain(matches: np.ndarray, k: int) -> tuple[int, list[int]]:
    """Target forwards of the greedy chain over n emitted tokens, and accepted tokens per draft slot.

    matches: [n] bool, matches[i] = (the draft's teacher-forced argmax at position i == emitted token i)."""
    n = len(matches)
    forwards, i = 1, 1  # the prefill forward emits token 0
    per_slot = [0] * k
    while i < n:
        accepted = 0
        while accepted < k and i + accepted < n and matches[i + accepted]:
            per_slot[accepted] += 1
            accepted += 1
        forwards += 1
        i += accepted + 1
    return forwards, per_slot


def is_greedy(example: RequestFeedback) -> bool:
    """Every emitted token is a target top-1: the tokens are the greedy continuation of the prompt.

    A tie counts: the emitted token's stored log-prob equal to the largest one is enough, it need not be stored
    first. bfloat16 logits tie often (at a logit of 16 their spacing is 0.125), and the engine's argmax and the
    top-m sort may break a tie differently. In the H200 learning benchmark (bf16, all requests greedy) comparing
    ids only dropped up to all of a round's held-out requests from replay: for greedy decoding the emitted token
    is the argmax of the very logits the top-m is taken from, so only ties can do that."""
    ids, logprobs = example.target_topk_ids, example.target_topk_logprobs
    emitted = ids == np.asarray(example.token_ids)[:, None]  # [n, m]
    if not emitted.any(axis=1).all():
        return False  # an emitted token outside the top-m is no top-1
    emitted_logprob = np.where(emitted, logprobs, -np.inf).max(axis=1)
    return bool((emitted_logprob >= logprobs.max(axis=1)).all())


@dataclass
class _Scored:
    """One request after the teacher-forced pass; arrays over its n emitted positions."""

    example: RequestFeedback
    argmax: np.ndarray  # [n] the draft's argmax given the true prefix (-1 where it predicts nothing: a head at c = 0)
    alpha_low: np.ndarray  # [n] sum over the top-m of min(p, q)
    alpha_high: np.ndarray  # [n] alpha_low + the target's mass outside the top-m


@dataclass
class Chain:
    """One greedy request replayed as the engine would have served it with k draft tokens per round."""

    forwards: int  # target forwards, prefill included
    per_slot: list[int]  # [k] accepted draft tokens per draft slot
    kinds: np.ndarray  # [n] KIND_* of every emitted position
    draft_tokens: np.ndarray  # [n] int32, the proposal verified there, NO_DRAFT_TOKEN at bonus positions


def chain_from_matches(matches: np.ndarray, proposals: np.ndarray, k: int) -> Chain:
    """A draft LM's chain: its real proposals are its teacher-forced argmaxes (module docstring)."""
    forwards, per_slot = greedy_chain(matches, k)
    kinds = chain_kinds(matches, k)
    draft_tokens = np.where(kinds != KIND_BONUS, proposals, NO_DRAFT_TOKEN).astype(np.int32)
    return Chain(forwards, per_slot, kinds, draft_tokens)


@torch.no_grad()
def _teacher_forced(draft: torch.nn.Module, examples, device, batch_size: int, features=None):
    was_training = draft.training
    draft.eval()
    try:
        for start in range(0, len(examples), batch_size):
            group = examples[start : start + batch_size]
            batch = distill.batch_for(draft, group, device, features)
            logits = distill.draft_logits(draft, batch)  # [N, V]
            if isinstance(draft, HeadDraft):  # a head proposes from its draft vocabulary alone
                logits = draft.only_draft_vocab(logits)
            q = torch.softmax(logits, dim=-1).gather(1, batch.topk_ids)  # [N, m]
            p = batch.topk_logprobs.exp()
            low = torch.minimum(p, q).sum(dim=-1)
            high = (low + (1 - p.sum(dim=-1)).clamp_min(0)).clamp_max(1)
            rows, index = batch.rows.cpu().numpy(), batch.index.cpu().numpy()
            argmax, low, high = (t.cpu().numpy() for t in (logits.argmax(dim=-1), low, high))
            for row, example in enumerate(group):
                mine = rows == row
                scored = _Scored(example, *(np.full(len(example.token_ids), fill) for fill in (-1, 0.0, 0.0)))
                for name, values in (("argmax", argmax), ("alpha_low", low), ("alpha_high", high)):
                    getattr(scored, name)[index[mine]] = values[mine]
                yield scored
    finally:
        draft.train(was_training)


def _greedy_chains(draft, greedy: list[_Scored], *, k, window, device, batch_size, features) -> list[Chain]:
    """The chains of the greedy requests: a draft LM's from its teacher-forced argmaxes; a head's by simulating
    the engine's rounds (pipelines.heads.replay), because its steps >= 2 read its own outputs, not the target's."""
    if isinstance(draft, HeadDraft) and k > 0:
        from pipelines.heads.replay import head_chains

        examples = [s.example for s in greedy]
        return head_chains(draft, examples, k=k, window=window, device=device, batch_size=batch_size, features=features)
    return [chain_from_matches(s.argmax == s.example.token_ids, s.argmax, k) for s in greedy]


def replay(
    draft: torch.nn.Module,
    examples: Sequence[RequestFeedback],
    *,
    k: int,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    window: int | None = None,
) -> ReplayMetrics:
    """Score `draft` on recorded requests: exact greedy-chain AvgLen with k draft tokens, plus sampling acceptance.

    `draft` is a draft LM or a head (pipelines.heads.model.HeadDraft, replayed by pipelines.heads.replay, whose
    catch-up `window` is the engine's: its max k + 1; default k + 1; a draft LM ignores it). `device` is where the
    inputs go (default: the draft's); the draft's mode is restored afterwards."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    started = time.perf_counter()
    device = device if device is not None else next(draft.parameters()).device
    examples = distill.usable(examples)
    features = distill.feature_bank_for(draft)  # a head's target features, computed once for both passes
    scored = list(_teacher_forced(draft, examples, device, batch_size, features))
    greedy = [s for s in scored if is_greedy(s.example)]
    chains = _greedy_chains(draft, greedy, k=k, window=window, device=device, batch_size=batch_size, features=features)
    alpha_low = sum(float(s.alpha_low[1:].sum()) for s in scored)  # position 0 is the prefill's, never drafted
    alpha_high = sum(float(s.alpha_high[1:].sum()) for s in scored)
    alpha_positions = sum(len(s.alpha_low) - 1 for s in scored)
    tokens = sum(len(s.example.token_ids) for s in greedy)
    forwards = sum(chain.forwards for chain in chains)
    per_slot = [sum(chain.per_slot[slot] for chain in chains) for slot in range(k)]
    matched = sum(int((s.argmax == s.example.token_ids)[1:].sum()) for s in greedy)
    match_positions = sum(len(s.example.token_ids) - 1 for s in greedy)
    return ReplayMetrics(
        k=k,
        avg_len=tokens / forwards if forwards else float("nan"),
        tokens=tokens,
        forwards=forwards,
        requests=len(examples),
        greedy_requests=len(greedy),
        accepted_at_position=per_slot,
        argmax_match=matched / match_positions if match_positions else float("nan"),
        acceptance=alpha_low / alpha_positions if alpha_positions else float("nan"),
        acceptance_upper=alpha_high / alpha_positions if alpha_positions else float("nan"),
        acceptance_positions=alpha_positions,
        seconds=time.perf_counter() - started,
    )


def chain_kinds(matches: np.ndarray, k: int) -> np.ndarray:
    """[n] KIND_* of every emitted position in the greedy chain (see greedy_chain); position 0 is a bonus."""
    n = len(matches)
    kinds = np.full(n, KIND_BONUS, dtype=np.uint8)
    i = 1
    while i < n:
        accepted = 0
        while accepted < k and i + accepted < n and matches[i + accepted]:
            kinds[i + accepted] = KIND_ACCEPTED
            accepted += 1
        if i + accepted < n:
            kinds[i + accepted] = KIND_BONUS if accepted == k else KIND_RECOVERED
        i += accepted + 1
    return kinds


def served_by(
    draft: torch.nn.Module,
    examples: Sequence[RequestFeedback],
    *,
    k: int,
    version: str,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    window: int | None = None,
) -> list[RequestFeedback]:
    """The feedback as if `draft` had served each greedy request with k draft tokens: kinds and draft_tokens of
    its exact greedy chain (for learners that train on their own rejected positions, e.g. OSD, in benchmarks
    that serve once). Sampled requests and requests without tokens come back unchanged; a head's draft_sources
    become SOURCE_HEAD where it proposed."""
    device = device if device is not None else next(draft.parameters()).device
    features = distill.feature_bank_for(draft)
    scored = _teacher_forced(draft, distill.usable(examples), device, batch_size, features)
    greedy = [s for s in scored if is_greedy(s.example)]
    chains = _greedy_chains(draft, greedy, k=k, window=window, device=device, batch_size=batch_size, features=features)
    relabeled = {}
    for scored_one, chain in zip(greedy, chains):
        example = scored_one.example
        fields = dict(kinds=chain.kinds, draft_tokens=chain.draft_tokens, draft_version=version)
        if isinstance(draft, HeadDraft):
            fields["draft_sources"] = np.where(chain.draft_tokens != NO_DRAFT_TOKEN, SOURCE_HEAD, SOURCE_NONE)
            fields["draft_sources"] = fields["draft_sources"].astype(np.uint8)
        relabeled[id(example)] = replace(example, **fields)
    return [relabeled.get(id(e), e) for e in examples]
