"""Proposers: what drafts the tokens the target verifies. One module per kind, one interface:

    draft    pipelines.proposers.draft    a small LM with the target's tokenizer (its own KV cache)
    head     pipelines.proposers.head     an EAGLE-style head over the target's features (pipelines.heads)
    suffix   pipelines.proposers.suffix   model-free: the longest earlier match in the request and the stream
    hybrid   pipelines.proposers.hybrid   per row and round, suffix or the model (draft or head), whichever
                                          promises more

`propose(state, k, greedy_only)` runs inside the captured round (pure tensor work on static buffers) and returns
a Proposal: up to k tokens per row, how many each row drafted (0..k), the distribution q they were drawn from
(None for a deterministic proposer: verification then uses a one-hot q, which keeps sampling lossless) and who
drafted them. The engine verifies every proposal with the same pure function (pipelines.verify).
`allocate(batch_size)` makes the proposer's per-row buffers (once, for every slot of the engine). The *model*
proposers (draft, head) keep a KV cache that must follow the row's context: `sync(state, rows, lengths)` catches
rows up eagerly between rounds (a newcomer, or rows that other proposers drafted for), and `swap(weights)` copies
new weights in place.

A *variant* is what one round runs: a proposer and its k (`none:0` is target-only decoding). The engine captures
one CUDA graph per (batch bucket, variant, greedy or sampled); the goodput controller (pipelines.controller)
picks the variant for each window of rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NONE = "none"


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, k] int64; slots at or after counts[b] are padding (never accepted)
    counts: torch.Tensor  # [B] int64, tokens drafted per row, 0..k
    probs: torch.Tensor | None  # [B, k, V] warped q the tokens were drawn from; None = deterministic (one-hot q)
    sources: torch.Tensor  # [B] uint8, pipelines.types.SOURCE_* of each row's tokens


@dataclass(frozen=True, order=True)
class Variant:
    """What one round runs: `proposer` with up to `k` draft tokens per row; none:0 is target-only decoding."""

    proposer: str
    k: int

    def __str__(self) -> str:
        return f"{self.proposer}:{self.k}"

    @property
    def uses_model(self) -> bool:
        """Drafts with the engine's model proposer (a draft LM or a head), alone or in a hybrid."""
        return self.proposer in ("draft", "head", "hybrid")

    @property
    def uses_suffix(self) -> bool:
        return self.proposer in ("suffix", "hybrid")

    @classmethod
    def parse(cls, text: str) -> Variant:
        proposer, _, k = text.partition(":")
        return cls(proposer, int(k))


TARGET_ONLY = Variant(NONE, 0)


def empty_proposal(batch: int, device: torch.device) -> Proposal:
    """No draft tokens: the round verifies `current` alone and emits one bonus token per row (target-only)."""
    from pipelines.types import SOURCE_NONE

    return Proposal(
        tokens=torch.zeros((batch, 0), dtype=torch.int64, device=device),
        counts=torch.zeros(batch, dtype=torch.int64, device=device),
        probs=None,
        sources=torch.full((batch,), SOURCE_NONE, dtype=torch.uint8, device=device),
    )


def copy_weights(module: torch.nn.Module, weights: torch.nn.Module | dict[str, torch.Tensor], what: str) -> None:
    """Copy `weights` into `module`'s own tensors in place (captured graphs keep their pointers); refuses weights
    of other names or shapes."""
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    own = module.state_dict()
    missing, unexpected = set(own) - set(state_dict), set(state_dict) - set(own)
    misshapen = sorted(n for n in set(own) & set(state_dict) if own[n].shape != state_dict[n].shape)
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{what} weights do not fit the served {what}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}, wrong shape {misshapen[:3]}"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state_dict[name])
