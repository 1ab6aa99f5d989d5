"""Proposer `suffix`: model-free drafting from the longest earlier match (SuffixDecoding, vLLM `ngram`).

A row's context ends with ... t_{L-1} t_L (t_L = `current`). Two places can hold an earlier occurrence of that
ending, and what followed it there is the draft:

    the row itself    its prompt and everything it emitted so far (state.tokens): code that repeats names, SQL that
                      copies columns from the schema in the prompt, text that quotes the question
    the stream        earlier completions, in a bounded ring of tokens (SuffixCache) with a hashed bigram index:
                      bucket(t_{L-1}, t_L) -> the `ways` most recent positions where that bigram ended

Each candidate is scored by its match length m (how many tokens before and including t_L agree, up to
max_match) and, in the stream, by its support (how many other candidates agree on the next token: frequency, as
SuffixDecoding scores continuations); the row's own context wins ties. The row drafts min(k, available,
floor(spec_factor * m)) tokens, or none when m < min_match: short matches are weak evidence. Everything is tensor
work on static buffers, so it runs inside the captured round with no host synchronisation; it is deterministic,
so verification uses a one-hot q.

The stream ring is written between batches (`SuffixCache.add`, from the host), with every finished request's
completion after the end of its prompt; at daemon start it is rebuilt from stored completions, so a restart keeps
what the stream taught it.
Memory is bounded: 4 bytes per ring token plus 4 * ways bytes per bucket on the device (and 4 bytes per bucket on
the host); the oldest tokens are overwritten, and an index entry always points at whatever its slot now holds,
which the token-by-token match verifies.

Acceptance statistics for the goodput controller: `hist[m, a]` counts rounds in which a row with match length m
had a accepted suffix tokens, from real suffix rounds and from *shadow* proposals during target-only rounds (the
proposal is checked against the tokens the target then emitted: decoding is lossless, so that is exactly what
verification would have accepted under greedy decoding). `capped[m, a]` counts those of them whose draft filled
all k slots and was accepted whole (a = k): how many more a larger k would have gained is unknown, so the
controller treats them as censored rather than as rounds that stopped at a. `exposure[m]` counts every row-round
with match length m whose suffix proposal was computed, also where a hybrid gave the row the model's draft (its
suffix outcome is then unknown): the controller weighs match lengths by how often rows have them, not by how often
the suffix draft was taken (rows that a hybrid gives the model have short matches; leaving them out made the
hybrid look better than it was).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.decode_state import DecodeState
from pipelines.proposers import Proposal
from pipelines.settings import SuffixSettings
from pipelines.types import SOURCE_NONE, SOURCE_SUFFIX

SEPARATOR = -1  # ring value between completions: a continuation never runs across it
_NEVER = -2  # padding before position 0 of a row: matches no token
_HASH = 1_000_003
_RECENCY_BITS = 32  # score = (match length, support) above, newness (< cache_tokens <= 2**31) below


def bigram_bucket(first, second, buckets: int):
    """The index bucket of a bigram; the same arithmetic for numpy arrays (host) and torch tensors (device)."""
    return (first * _HASH + second) & (buckets - 1)


def leading_run(agree: torch.Tensor) -> torch.Tensor:
    """[..., J] bool -> [...] int64: how many leading entries are True (the index of the first False, else J)."""
    width = agree.shape[-1]
    index = torch.arange(width, device=agree.device)
    return torch.where(agree, width, index).amin(dim=-1)


def trailing_run(agree: torch.Tensor) -> torch.Tensor:
    """[..., J] bool -> [...] int64: how many trailing entries are True."""
    width = agree.shape[-1]
    index = torch.arange(width, device=agree.device)
    return width - 1 - torch.where(agree, -1, index).amax(dim=-1)


def drafted_whole(accepted: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """[B] bool: rows whose draft filled all `width` slots and was accepted whole: censored at width (a larger k
    might have gained more; the goodput controller's suffix estimate treats them so)."""
    return (accepted == counts) & (counts == width)


class SuffixCache:
    """The stream's earlier completions on the device: a token ring and a W-way hashed bigram index of ring slots.

    Index entries are ring slots (int32) with no age: an entry whose slot was overwritten since simply points at
    newer text, and the proposer verifies every candidate token by token (a wrong draft costs acceptance, never
    correctness). The host keeps only the per-bucket insertion counters and the write head."""

    def __init__(self, settings: SuffixSettings, device: torch.device | str):
        self.settings = settings
        capacity, buckets, ways = settings.cache_tokens, settings.table_buckets, settings.ways
        self._fill = np.zeros(buckets, dtype=np.int32)  # insertions per bucket, mod ways: its next way
        self.total = 0  # tokens ever written; the write head is total % cache_tokens
        self.sequences = 0
        self.ring = torch.full((capacity,), SEPARATOR, dtype=torch.int32, device=device)
        self.table = torch.full((buckets, ways), -1, dtype=torch.int32, device=device)  # ring slots, -1 = empty
        self.head = torch.zeros((), dtype=torch.int64, device=device)  # slot of the next write

    def clear(self) -> None:
        self._fill.fill(0)
        self.total = self.sequences = 0
        self.ring.fill_(SEPARATOR)
        self.table.fill_(-1)
        self.head.zero_()

    @property
    def nbytes(self) -> int:
        """Device ring and index plus the host's insertion counters."""
        return self.ring.numel() * 4 + self.table.numel() * 4 + self._fill.nbytes

    def add(self, completions: Iterable[Sequence[int]], prompts: Iterable[Sequence[int]] | None = None) -> int:
        """Append completions, each after a separator and the last max_match tokens of its prompt (when given), and
        index the bigrams that end inside the completion: the first one spans the prompt's last token, so a repeated
        request matches from its first generated token. Returns tokens written. Call between rounds: on CUDA a round
        may still be running, which is safe because these writes are queued on the same stream behind it."""
        completions = [np.asarray(c, dtype=np.int64) for c in completions]
        tails = [np.asarray(p, dtype=np.int64)[-self.settings.max_match :] for p in prompts or ()]
        tails += [np.zeros(0, dtype=np.int64)] * (len(completions) - len(tails))
        blocks, indexed = [], []
        for tail, completion in zip(tails, completions):
            if not len(completion):
                continue
            blocks.append(np.concatenate([[SEPARATOR], tail, completion]))
            indexed.append(np.arange(len(blocks[-1])) >= 1 + len(tail))
        if not blocks:
            return 0
        values, indexable = np.concatenate(blocks), np.concatenate(indexed)
        capacity = self.settings.cache_tokens
        if len(values) > capacity:  # only the newest `capacity` tokens can be kept anyway
            values, indexable = values[-capacity:], indexable[-capacity:]
        slots = (self.total + np.arange(len(values), dtype=np.int64)) % capacity
        device = self.ring.device
        self.ring[torch.from_numpy(slots).to(device)] = torch.from_numpy(values.astype(np.int32)).to(device)
        self._index(values, slots, indexable)
        self.total += len(values)
        self.sequences += len(blocks)
        self.head.fill_(self.total % capacity)
        return len(values)

    def _index(self, values: np.ndarray, slots: np.ndarray, indexable: np.ndarray) -> None:
        """Record, per bigram, the ring slot of its second token; each bucket keeps its `ways` newest."""
        ends = np.nonzero((values[:-1] >= 0) & (values[1:] >= 0) & indexable[1:])[0] + 1
        if not len(ends):
            return
        ways = self.settings.ways
        buckets = bigram_bucket(values[ends - 1], values[ends], self.settings.table_buckets)
        order = np.argsort(buckets, kind="stable")  # insertion order kept within a bucket
        buckets, ends = buckets[order], ends[order]
        unique, first, counts = np.unique(buckets, return_index=True, return_counts=True)
        rank = np.arange(len(buckets)) - np.repeat(first, counts)
        newest = rank >= np.repeat(counts, counts) - ways  # older ones would be overwritten in this same call
        buckets, ends, rank = buckets[newest], ends[newest], rank[newest]
        way = (self._fill[buckets].astype(np.int64) + rank) % ways
        device = self.table.device
        self.table[torch.from_numpy(buckets).to(device), torch.from_numpy(way).to(device)] = torch.from_numpy(
            slots[ends].astype(np.int32)
        ).to(device)
        self._fill[unique] = (self._fill[unique].astype(np.int64) + counts) % ways


@dataclass
class ShadowState:
    """Per row: the suffix proposal pending against tokens the target has not emitted yet."""

    tokens: torch.Tensor  # [B, k] proposed tokens
    counts: torch.Tensor  # [B] how many
    start: torch.Tensor  # [B] position of the first proposed token
    match: torch.Tensor  # [B] match length the proposal was made with
    live: torch.Tensor  # [B] bool: a proposal is pending

    @classmethod
    def allocate(cls, batch_size: int, k: int, device) -> ShadowState:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            zeros(batch_size, k),
            zeros(batch_size),
            zeros(batch_size),
            zeros(batch_size),
            torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def rows(self, batch_size: int) -> ShadowState:
        return ShadowState(*(getattr(self, name)[:batch_size] for name in self.__dataclass_fields__))

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the pending proposals of `rows` (a new request took the slot)."""
        self.live[rows] = False


class SuffixProposer:
    name = "suffix"
    source = SOURCE_SUFFIX

    def __init__(self, cache: SuffixCache, max_k: int, compile: bool = False):
        self.cache = cache
        self.settings = cache.settings
        self.max_k = max_k
        device = cache.table.device
        self._back = torch.arange(max(self.settings.max_match, max_k), device=device)  # 0, 1, 2, ...
        self._match = self._match_eager
        if compile:
            # ~60 small kernels eager (about 1 ms per round on an H200, a quarter of a 1.5B target forward);
            # fused by Inductor into a few. One compile per (batch bucket, k).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self._match = torch.compile(self._match_eager, fullgraph=True)
        # Rounds by (match length, accepted suffix tokens); read and cleared by the controller between batches.
        self.hist = torch.zeros((self.settings.max_match + 1, max_k + 1), dtype=torch.int64, device=device)
        self.capped = torch.zeros_like(self.hist)  # of those, rounds whose k drafted tokens were all accepted
        self.exposure = torch.zeros(self.settings.max_match + 1, dtype=torch.int64, device=device)  # row-rounds by m
        # Expected accepted tokens by match length (hybrid's per-row choice); written by the controller.
        self.expected_accepted = torch.zeros(self.settings.max_match + 1, dtype=torch.float32, device=device)

    def allocate(self, batch_size: int) -> ShadowState:
        return ShadowState.allocate(batch_size, self.max_k, self.cache.table.device)

    # ------------------------------------------------------------------ propose (captured)

    def propose(self, state: DecodeState, k: int) -> tuple[Proposal, torch.Tensor]:
        """Up to k tokens per row from the best earlier match; also returns each row's match length [B]."""
        tokens, counts, sources, match = self._match(state.tokens, state.lengths, k)
        return Proposal(tokens, counts, None, sources), match

    def _match_eager(self, tokens: torch.Tensor, lengths: torch.Tensor, k: int):
        """(draft tokens [B, k], counts [B], sources [B], match length [B]): pure tensor work, so torch.compile
        fuses it into a few kernels on CUDA (SuffixSettings.compile)."""
        s = self.settings
        tail_positions = lengths[:, None] - self._back  # [B, J]: positions of t_L, t_{L-1}, ...
        # a tail slot before position 0 holds a value no token has: it matches nothing
        tail = torch.where(tail_positions >= 0, tokens.gather(1, tail_positions.clamp_min(0)), _NEVER)

        own_match, own_tokens, own_avail = self._own_match(tokens, lengths, tail, k)
        stream_match, stream_tokens, stream_avail = self._stream_match(tail, k)
        use_own = own_match >= stream_match
        match = torch.where(use_own, own_match, stream_match)
        continuation = torch.where(use_own[:, None], own_tokens, stream_tokens)
        available = torch.where(use_own, own_avail, stream_avail)

        by_factor = torch.floor(match * s.spec_factor).long()
        counts = torch.minimum(available, by_factor).clamp_max(k)
        counts = torch.where(match >= s.min_match, counts, 0)
        sources = torch.where(counts > 0, SOURCE_SUFFIX, SOURCE_NONE).to(torch.uint8)
        # Padding slots must still hold token ids the target can embed (the ring's separators are -1).
        continuation = torch.where(self._back[:k] >= counts[:, None], 0, continuation)
        return continuation, counts, sources, match

    def _own_match(self, tokens, lengths, tail, k):
        """Best earlier occurrence inside the row (prompt and output): match length, continuation, available."""
        s = self.settings
        batch, width = tokens.shape
        padded = torch.cat([tokens.new_full((batch, s.max_match - 1), _NEVER), tokens], dim=1)
        windows = padded.unfold(1, s.max_match, 1)  # [B, width, J]: windows[b, p, J-1-j] = t_{p-j}
        run = trailing_run(windows == tail.flip(-1)[:, None, :])  # [B, width] match of the occurrence ending at p
        ends = torch.arange(width, device=tokens.device)
        score = torch.where((run >= s.min_match) & (ends < lengths[:, None]), run * width + ends, -1)
        best = score.argmax(dim=1, keepdim=True)  # longest, then most recent
        match = torch.where(score.gather(1, best) >= 0, run.gather(1, best), 0)[:, 0]
        end = ends[best[:, 0]]
        continuation = tokens.gather(1, (end[:, None] + 1 + self._back[:k]).clamp_max(width - 1))
        available = (lengths - end).clamp(0, k)  # tokens after the occurrence that are already known
        return match, continuation, available

    def _stream_match(self, tail, k):
        """Best occurrence in the stream ring among the indexed slots of the row's last bigram."""
        s, cache = self.settings, self.cache
        capacity = s.cache_tokens
        candidates = cache.table[bigram_bucket(tail[:, 1], tail[:, 0], s.table_buckets)].long()  # [B, W] slots
        before = cache.ring[(candidates[..., None] - self._back) % capacity]  # [B, W, J]
        match = torch.where(candidates >= 0, leading_run(before == tail[:, None, :]), 0)  # [B, W]

        steps = self._back[:k]
        continuation = cache.ring[(candidates[..., None] + 1 + steps) % capacity].long()  # [B, W, k]
        # tokens between the slot and the write head: beyond it lies the oldest text of the ring
        before_head = steps < ((cache.head - candidates - 1) % capacity)[..., None]
        available = leading_run((continuation >= 0) & before_head)  # up to the next separator
        usable = (match >= s.min_match) & (available > 0)
        if k:
            first = continuation[..., 0]
            support = ((first[:, :, None] == first[:, None, :]) & usable[:, None, :]).sum(dim=-1)
        else:
            support = torch.zeros_like(match)
        age = (cache.head - candidates) % capacity  # slots since it was written: smaller is newer
        score = (match * (s.ways + 1) + support) * (1 << _RECENCY_BITS) + (capacity - age)
        best = torch.where(usable, score, -1).argmax(dim=1, keepdim=True)  # [B, 1]
        best_match = torch.where(usable.gather(1, best), match.gather(1, best), 0)[:, 0]
        best_tokens = continuation.gather(1, best[..., None].expand(-1, 1, k))[:, 0]
        return best_match, best_tokens, available.gather(1, best)[:, 0].clamp_max(k)

    # ------------------------------------------------------------------ statistics (captured)

    def record(
        self,
        match: torch.Tensor,
        accepted: torch.Tensor,
        rows: torch.Tensor,
        capped: torch.Tensor | None = None,
        exposed: torch.Tensor | None = None,
    ) -> None:
        """A round: count (match length, accepted) for the rows in `rows` [B] bool, in `capped` those whose draft
        filled k and passed whole, and the match lengths of the rows in `exposed` (default `rows`): a hybrid's rows
        that took the model's draft are exposed without an outcome."""
        clamped = match.clamp_max(self.settings.max_match)
        index = clamped * (self.max_k + 1) + accepted.clamp_max(self.max_k)
        self.hist.view(-1).index_add_(0, index, rows.long())
        if capped is not None:
            self.capped.view(-1).index_add_(0, index, (rows & capped).long())
        self.exposure.index_add_(0, clamped, (rows if exposed is None else exposed).long())

    def take_statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hist, capped, exposure) as host arrays, all cleared (one host read: between windows, never per round)."""
        flat = torch.cat([self.hist.view(-1), self.capped.view(-1), self.exposure]).cpu().numpy()
        cells = self.hist.numel()
        hist, capped = flat[:cells].reshape(self.hist.shape), flat[cells : 2 * cells].reshape(self.hist.shape)
        self.clear_statistics()
        return hist, capped, flat[2 * cells :]

    def clear_statistics(self) -> None:
        self.hist.zero_()
        self.capped.zero_()
        self.exposure.zero_()

    def shadow(self, state: DecodeState, k: int) -> None:
        """After a round without suffix drafts: score the pending proposals against what the target emitted, then
        propose again from each row's new context (what a suffix round would have drafted next)."""
        pending: ShadowState = state.proposer_state[self.name]
        steps = torch.arange(pending.tokens.shape[1], device=state.lengths.device)
        positions = pending.start[:, None] + steps
        proposed = steps < pending.counts[:, None]
        known = positions <= state.lengths[:, None]  # t_L and everything before it is emitted
        emitted = state.tokens.gather(1, positions.clamp_max(state.tokens.shape[1] - 1))
        agree = (emitted == pending.tokens) | ~proposed
        matched = (agree & known).long().cumprod(dim=1).sum(dim=1).minimum(pending.counts)
        mismatch_seen = (~agree & known).any(dim=1)
        all_known = known.gather(1, (pending.counts - 1).clamp_min(0)[:, None])[:, 0]
        resolved = pending.live & (mismatch_seen | all_known)
        filled = drafted_whole(matched, pending.counts, pending.tokens.shape[1])
        self.record(pending.match, matched, resolved & state.active, filled)

        proposal, match = self.propose(state, k)
        renew = (resolved | ~pending.live) & state.active
        pending.tokens.copy_(torch.where(renew[:, None], proposal.tokens, pending.tokens))
        pending.counts.copy_(torch.where(renew, proposal.counts, pending.counts))
        pending.start.copy_(torch.where(renew, state.lengths + 1, pending.start))
        pending.match.copy_(torch.where(renew, match, pending.match))
        pending.live.copy_(torch.where(renew, proposal.counts > 0, pending.live & state.active))
        # A row without a proposal this round still had a round: it would have drafted nothing.
        self.record(match, torch.zeros_like(match), renew & (proposal.counts == 0))
