"""A head's predictions on recorded feedback: what the learners and the replay need beyond a draft LM's.

Positions. Emitted token i of a request with P prompt tokens sits at sequence index P + i and is predicted from
index c = P - 1 + i (pipelines.learners.distill). A draft LM reads its own logits at c; a head's prediction of that
token is its output at c - 1, whose inputs are embed(t_c) and the target's feature f_{c-1} (pipelines.heads.model):
so the head needs the target's features of the sequence, and position c = 0 (a one-token prompt's first emitted
token) has no head prediction and is skipped.

Features. Serving gets them for free from the verify pass; on stored feedback they are recomputed by a
teacher-forced target pass over prompt + emitted tokens (minus the last). Cost: one no-grad target forward per
stored token, about 2 x target parameters FLOPs per token (3 GFLOP for a 1.5B target), the cost of serving those
tokens once; for a learning round of 64 requests x 512 tokens that is ~0.1 PFLOP (a fraction of a second on an H200
at its bfloat16 rate; on a CPU it is most of the round). A round touches every request several times (loss before,
epochs, loss after, replay), so a FeatureBank computes each request's features once, in batched passes, and keeps
them on the device for the round: tokens x feature width x 2 bytes (64 x 512 x 1536 in bfloat16: 100 MB; three
times that for a head fused over two lower layers, whose features are three hidden states wide).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.heads.model import target_features
from pipelines.types import RequestFeedback


class FeatureBank:
    """The target's features of each request's teacher-forcing sequence (prompt + emitted tokens minus the last),
    computed on first use and kept for the bank's life (a learning round, a replay). Requests are recognised by
    identity: the bank keeps a reference to each, so an id is never reused while it lives."""

    def __init__(self, target, feature_layers: tuple[int, ...] = ()):
        self.target = target
        self.feature_layers = tuple(feature_layers)  # what the heads it serves fuse (pipelines.heads.model)
        self._features: dict[int, tuple[RequestFeedback, torch.Tensor]] = {}  # id -> (request, [S, F])

    def __len__(self) -> int:
        return len(self._features)

    def padded(
        self, examples: Sequence[RequestFeedback], input_ids: torch.Tensor, feature_layers: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """[B, T, F] features of the examples, whose right-padded teacher-forcing ids are `input_ids` [B, T] (as
        pipelines.learners.distill.collate builds them), for a head that fuses `feature_layers` (refused if the
        bank keeps other ones). One target pass over the batch if any is new."""
        if tuple(feature_layers) != self.feature_layers:
            raise ValueError(f"a feature bank of layers {self.feature_layers} read for layers {tuple(feature_layers)}")
        lengths = [len(e.prompt_ids) + len(e.token_ids) - 1 for e in examples]
        if any(id(e) not in self._features for e in examples):
            with torch.no_grad():
                computed = target_features(self.target, input_ids, self.feature_layers)
            for row, (example, length) in enumerate(zip(examples, lengths)):
                self._features[id(example)] = (example, computed[row, :length])
            return computed
        width = input_ids.shape[1]
        rows = [self._features[id(e)][1] for e in examples]
        return torch.stack([torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[0])) for f in rows])


def head_logits(draft, batch) -> torch.Tensor:
    """[N, V] float32 logits of a HeadDraft at the batch's emitted positions (teacher-forced, step 1 of drafting).
    `batch` is a pipelines.learners.distill.FeedbackBatch collated for heads (no position with c = 0); its
    `features` are the target's, or None to compute them here."""
    tokens = batch.input_ids
    if batch.rows.numel() == 0:  # only one-token prompts' first tokens: nothing a head predicts
        return draft.logits(draft.embed(tokens[:0, 0]))  # [0, V]
    features = batch.features
    if features is None:
        with torch.no_grad():
            features = draft.target_features(tokens)
    width = tokens.shape[1] - 1
    positions = torch.arange(width, device=tokens.device).expand(tokens.shape[0], -1)
    outputs = draft(tokens[:, 1:], features[:, :-1], positions)  # [B, T - 1, H]: g_{c-1} at column c - 1
    return draft.logits(outputs[batch.rows, batch.columns - 1])
