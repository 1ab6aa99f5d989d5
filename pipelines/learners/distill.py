"""Forward KL from the target's stored top-m to the draft, at the emitted positions of verification feedback.

Teacher forcing: one draft forward over `prompt_ids + token_ids[:-1]` (the last emitted token is never an
input). For emitted token i of a request with P prompt tokens, the draft's prediction is the logit row at
sequence index P - 1 + i. With the target's stored top-m ids x_1..x_m and log-probs l_1..l_m at that position
(temperature 1, captured at verification, so no target forward is needed):

    p_j     = softmax(l / tau)_j                          (the top-m renormalised to sum to 1)
    log q_j = log_softmax(draft logits over the full vocabulary)[x_j]
    KL_i    = sum_j p_j (log p_j - log q_j)

tau (LearnerSettings.target_temperature) sharpens the target: tau = 1 is the target's own distribution, what the
sampling acceptance sum_x min(p, q) rewards; as tau -> 0, p becomes the target's argmax and KL_i the cross-entropy
-log q(argmax), what greedy acceptance (draft argmax == target argmax) rewards. In between, a position where the
target hesitates between two tokens still asks the draft to rank the target's favourite first.

KL_i >= 0 only up to the missing tail: q is not renormalised over the top-m, so the loss also pushes draft mass
out of the tail into the target's top-m, which is what raises acceptance. Positions with p_j = 0 (a log-prob
that underflowed float16) contribute 0.

Logits are computed only at the emitted positions (hidden states of the whole sequence, then the LM head on the
gathered rows): a full [batch, sequence, vocabulary] logit tensor would cost gigabytes for a 150k vocabulary.

Drafts of two kinds, told apart in three places only (batch_for, draft_logits, feature_bank_for): a draft LM
(a transformers causal LM) and a head (pipelines.heads.model.HeadDraft), whose prediction of emitted token i is its
output at index c - 1 over the target's features (pipelines.heads.feedback: the positions, the features and what
recomputing them costs). For a head the batch skips c = 0 and carries the target's features; OSD's positions are
those the head's own proposals were verified at (SOURCE_HEAD) instead of the draft model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.heads.feedback import FeatureBank, head_logits
from pipelines.heads.model import HeadDraft
from pipelines.types import KIND_RECOVERED, NO_DRAFT_TOKEN, SOURCE_DRAFT, SOURCE_HEAD, SOURCE_NONE, RequestFeedback

PAD_ID = 0  # right padding never reaches a real position under causal attention


@dataclass
class FeedbackBatch:
    """Right-padded teacher-forcing inputs and the emitted positions to score; N = emitted positions in all rows."""

    input_ids: torch.Tensor  # [B, T] int64
    rows: torch.Tensor  # [N] int64, row of each emitted position
    columns: torch.Tensor  # [N] int64, sequence index P - 1 + i whose logits predict emitted token i
    index: torch.Tensor  # [N] int64, i (0 = the prefill's token)
    tokens: torch.Tensor  # [N] int64, the emitted token
    kinds: torch.Tensor  # [N] uint8, KIND_*
    proposed: torch.Tensor  # [N] bool, the draft model's verification covered this position (model_verified)
    topk_ids: torch.Tensor  # [N, m] int64
    topk_logprobs: torch.Tensor  # [N, m] float32
    features: torch.Tensor | None = None  # [B, T, H] the target's features (heads only; None: computed when needed)

    @property
    def positions(self) -> int:
        return int(self.rows.shape[0])


def usable(examples: Sequence[RequestFeedback]) -> list[RequestFeedback]:
    """Feedback with at least one emitted token (the only kind that can be scored or trained on)."""
    return [e for e in examples if len(e.token_ids) > 0]


def sequence_length(example: RequestFeedback) -> int:
    return len(example.prompt_ids) + len(example.token_ids) - 1


def collate(
    examples: Sequence[RequestFeedback],
    device: torch.device | str,
    *,
    source: int = SOURCE_DRAFT,
    first_column: int = 0,
) -> FeedbackBatch:
    """Pack feedback rows into one right-padded batch (every example must have emitted tokens). `source` is the
    proposer whose verified positions are `proposed` (model_verified); positions predicted from an index below
    `first_column` are left out (1 for heads: see the module docstring)."""
    width = max(sequence_length(e) for e in examples)
    top_m = min(e.target_topk_ids.shape[1] for e in examples)
    input_ids = np.full((len(examples), width), PAD_ID, dtype=np.int64)
    rows, columns, index = [], [], []
    for row, example in enumerate(examples):
        prompt, tokens = example.prompt_ids, example.token_ids
        sequence = np.concatenate([prompt, tokens[:-1]])
        input_ids[row, : len(sequence)] = sequence
        n = len(tokens)
        rows.append(np.full(n, row))
        columns.append(len(prompt) - 1 + np.arange(n))
        index.append(np.arange(n))
    kept = np.concatenate(columns) >= first_column
    cat = lambda arrays: np.concatenate(arrays)[kept]  # noqa: E731
    field = lambda name: cat([getattr(e, name) for e in examples])  # noqa: E731
    to = lambda array, dtype: torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)  # noqa: E731
    return FeedbackBatch(
        input_ids=to(input_ids, torch.int64),
        rows=to(cat(rows), torch.int64),
        columns=to(cat(columns), torch.int64),
        index=to(cat(index), torch.int64),
        tokens=to(field("token_ids"), torch.int64),
        kinds=to(field("kinds"), torch.uint8),
        proposed=to(cat([model_verified(e, source) for e in examples]), torch.bool),
        topk_ids=to(cat([e.target_topk_ids[:, :top_m] for e in examples]), torch.int64),
        topk_logprobs=to(cat([e.target_topk_logprobs[:, :top_m] for e in examples]), torch.float32),
    )


def feature_bank_for(draft: torch.nn.Module) -> FeatureBank | None:
    """Where a head's target features are kept while its feedback is used several times; None for a draft LM."""
    return FeatureBank(draft.target, draft.config.feature_layers) if isinstance(draft, HeadDraft) else None


def batch_for(
    draft: torch.nn.Module,
    examples: Sequence[RequestFeedback],
    device: torch.device | str,
    features: FeatureBank | None = None,
) -> FeedbackBatch:
    """collate for this kind of draft; a head's batch also carries the target's features (from `features`, or
    computed by head_logits when it is None)."""
    if not isinstance(draft, HeadDraft):
        return collate(examples, device)
    batch = collate(examples, device, source=SOURCE_HEAD, first_column=1)
    if features is not None:
        batch.features = features.padded(examples, batch.input_ids, draft.config.feature_layers)
    return batch


def model_verified(example: RequestFeedback, source: int = SOURCE_DRAFT) -> np.ndarray:
    """[n] bool: positions the `source` proposer's own proposals were verified at (the draft model's, or a head's),
    so their kind says how it did: every position of a request it drafted for, except those drafted by another
    proposer (suffix). Feedback recorded before draft_sources existed came from the draft model alone."""
    model = example.draft_tokens != NO_DRAFT_TOKEN
    if example.draft_sources is not None:
        model = model & (example.draft_sources == source)
    elif source != SOURCE_DRAFT:
        return np.zeros(len(example.token_ids), dtype=bool)
    if not model.any():
        return np.zeros(len(example.token_ids), dtype=bool)
    if example.draft_sources is None:
        return np.ones(len(example.token_ids), dtype=bool)
    others = (example.draft_sources != source) & (example.draft_sources != SOURCE_NONE)
    return ~others


def micro_batches(examples: Sequence[RequestFeedback], max_tokens: int) -> list[list[RequestFeedback]]:
    """Consecutive groups whose padded size (rows x longest sequence) stays within max_tokens (>= 1 row each)."""
    groups: list[list[RequestFeedback]] = []
    current: list[RequestFeedback] = []
    longest = 0
    for example in examples:
        length = sequence_length(example)
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(example)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


def draft_logits(draft: torch.nn.Module, batch: FeedbackBatch) -> torch.Tensor:
    """[N, V] float32 draft logits at the emitted positions of the batch (teacher-forced; a head: its step 1)."""
    if isinstance(draft, HeadDraft):
        return head_logits(draft, batch)
    hidden = draft.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [B, T, H]
    picked = hidden[batch.rows, batch.columns]  # [N, H]
    return draft.get_output_embeddings()(picked).float()


def forward_kl(logits: torch.Tensor, batch: FeedbackBatch, temperature: float = 1.0) -> torch.Tensor:
    """[N] KL(p_target top-m at `temperature`, renormalised || q_draft) per emitted position (module docstring)."""
    log_q = torch.log_softmax(logits, dim=-1).gather(1, batch.topk_ids)  # [N, m]
    log_p = torch.log_softmax(batch.topk_logprobs / temperature, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def rejected_positions(logits: torch.Tensor, batch: FeedbackBatch) -> torch.Tensor:
    """[N] bool: OSD's positions. Where the draft model's proposals were verified (model_verified), the positions
    it got rejected at (KIND_RECOVERED); elsewhere (target-only feedback, positions another proposer drafted), the
    positions where the draft being trained would be rejected now (its teacher-forced argmax differs from the
    emitted token)."""
    recovered = batch.kinds == KIND_RECOVERED
    mismatch = logits.detach().argmax(dim=-1) != batch.tokens
    return torch.where(batch.proposed, recovered, mismatch)


def select(logits: torch.Tensor, batch: FeedbackBatch, positions: str) -> torch.Tensor:
    """[N] bool mask of the positions a loss is taken over: "all" or "rejected"."""
    if positions == "all":
        return torch.ones_like(batch.tokens, dtype=torch.bool)
    if positions == "rejected":
        return rejected_positions(logits, batch)
    raise ValueError(f"Unknown positions {positions!r}; use 'all' or 'rejected'")


@torch.no_grad()
def mean_kl(
    draft: torch.nn.Module,
    examples: Sequence[RequestFeedback],
    *,
    positions: str = "all",
    micro_batch_tokens: int = 8192,
    temperature: float = 1.0,
    features: FeatureBank | None = None,
) -> tuple[float, int]:
    """Mean forward KL (target at `temperature`) over the selected emitted positions, and how many positions that
    was (0 -> nan). `features`: a head's feature bank to use and fill (feature_bank_for)."""
    device = next(draft.parameters()).device
    total, count = 0.0, 0
    for group in micro_batches(usable(examples), micro_batch_tokens):
        batch = batch_for(draft, group, device, features)
        logits = draft_logits(draft, batch)
        mask = select(logits, batch, positions)
        total += float(forward_kl(logits, batch, temperature)[mask].sum())
        count += int(mask.sum())
    return (total / count if count else float("nan")), count
