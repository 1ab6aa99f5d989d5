"""The suffix proposer's matching and its bounded stream cache, on hand-made token sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.decode_state import DecodeState
from pipelines.kv_cache import PositionalKVCache
from pipelines.proposers.suffix import SuffixCache, SuffixProposer
from pipelines.settings import SuffixSettings

SMALL = SuffixSettings(cache_tokens=1024, table_buckets=1024, ways=4, max_match=8, min_match=2, spec_factor=1.0)


def state_with(contexts: list[list[int]], capacity: int = 64) -> DecodeState:
    """Rows whose sequence so far is `contexts[b]` (the last token is `current`)."""
    cache = PositionalKVCache([torch.zeros(1, 1, capacity, 1)], [torch.zeros(1, 1, capacity, 1)])
    state = DecodeState.allocate(len(contexts), cache, 2, torch.device("cpu"), max_k=8)
    for row, context in enumerate(contexts):
        state.tokens[row, : len(context)] = torch.tensor(context)
        state.lengths[row] = len(context) - 1
    return state


def propose(proposer, contexts, k=6):
    proposal, match = proposer.propose(state_with(contexts), k)
    drafts = [proposal.tokens[row, : int(proposal.counts[row])].tolist() for row in range(len(contexts))]
    return drafts, match.tolist()


def test_a_match_in_the_stream_drafts_what_followed_it_up_to_the_end_of_that_completion():
    cache = SuffixCache(SMALL, "cpu")
    cache.add([[10, 11, 12, 13, 14, 15, 16]], [[1, 2, 3]])
    proposer = SuffixProposer(cache, max_k=6)
    # context ...2 3 10 11: the prompt tail and the completion's start match (4 tokens), so 4 tokens are drafted
    drafts, match = propose(proposer, [[7, 2, 3, 10, 11]])
    assert match == [4] and drafts == [[12, 13, 14, 15]]
    # a longer match drafts further, and never past the completion's end (a separator follows it)
    drafts, match = propose(proposer, [[1, 2, 3, 10, 11, 12, 13, 14]])
    assert match == [8] and drafts == [[15, 16]]
    # a bigram that was never seen drafts nothing
    drafts, match = propose(proposer, [[5, 6, 99, 98]])
    assert drafts == [[]] and match == [0]


def test_the_rows_own_context_wins_ties_and_the_most_supported_continuation_wins_in_the_stream():
    cache = SuffixCache(SMALL, "cpu")
    cache.add([[20, 21, 30, 31], [20, 21, 40, 41], [20, 21, 40, 42]])
    proposer = SuffixProposer(cache, max_k=6)
    drafts, _ = propose(proposer, [[9, 20, 21]])
    assert drafts == [[40, 42]]  # two of three occurrences continue with 40; the newer of those two wins
    drafts, _ = propose(proposer, [[20, 21, 50, 51, 9, 20, 21]])  # the row itself continued 20 21 with 50 51
    assert drafts[0][:2] == [50, 51]


def test_each_bucket_keeps_its_newest_positions_and_the_ring_forgets_the_oldest_tokens():
    settings = SMALL.model_copy(update={"ways": 2})
    cache = SuffixCache(settings, "cpu")
    for value in range(3):
        cache.add([[60, 61, 100 + value]])
    proposer = SuffixProposer(cache, max_k=4)
    drafts, _ = propose(proposer, [[60, 61]])
    assert drafts == [[102]]  # newest first
    # Fill the 1024-token ring with other text: the old bigram's slots now hold new tokens, and nothing of the
    # overwritten completions can be drafted any more.
    rng = np.random.default_rng(0)
    for _ in range(40):
        cache.add([rng.integers(200, 300, size=60).tolist()])
    assert cache.total > settings.cache_tokens
    drafts, _ = propose(proposer, [[60, 61]])
    assert drafts == [[]]
    # ...while the newest text is still found
    newest = rng.integers(300, 400, size=20).tolist()
    cache.add([newest])
    drafts, match = propose(proposer, [newest[:5]], k=3)
    assert drafts == [newest[5:8]] and match == [5]


def test_memory_is_what_the_settings_size_it_to():
    cache = SuffixCache(SMALL, "cpu")
    assert cache.nbytes == 4 * SMALL.cache_tokens + 4 * SMALL.table_buckets * SMALL.ways + 4 * SMALL.table_buckets


@pytest.mark.parametrize("spec_factor, expected", [(1.0, 3), (0.5, 1), (4.0, 6)])
def test_spec_factor_limits_drafts_by_match_length(spec_factor, expected):
    cache = SuffixCache(SMALL.model_copy(update={"spec_factor": spec_factor}), "cpu")
    cache.add([[70, 71, 72, 73, 74, 75, 76, 77, 78, 79]])
    drafts, match = propose(SuffixProposer(cache, max_k=6), [[5, 70, 71, 72]])
    assert match == [3] and len(drafts[0]) == expected
