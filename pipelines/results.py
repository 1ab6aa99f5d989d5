"""From the engine's device buffers to GenerationResults: the kept tokens, text, counters and feedback of the rows
that finished.

A row's device-to-host copies happen here, once, after its last round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.decode_state import COUNT_ACCEPTED, COUNT_DRAFTED, COUNT_ROUNDS, DecodeState
from pipelines.types import (
    KIND_ACCEPTED,
    SOURCE_NAMES,
    GenerationRequest,
    GenerationResult,
    RequestCounters,
    RequestFeedback,
)


@dataclass(frozen=True)
class RowTimes:
    """Seconds from a request's submission to: its admission into a slot, its first token, its last round."""

    queued: float
    first_token: float
    finished: float


def collect(
    state: DecodeState,
    rows: list[int],
    requests: list[GenerationRequest],
    tokenizer,
    eos_ids: set[int],
    k: int,
    draft_version: str,
    times: list[RowTimes],
) -> list[GenerationResult]:
    """Results of the requests in `rows` (slot indices, aligned with `requests` and `times`)."""
    index = torch.tensor(rows, dtype=torch.int64, device=state.lengths.device)
    generated = state.generated[index].cpu().numpy()
    width = max(int(generated.max()), 1)
    host = {
        name: getattr(state, name)[index, :width].cpu().numpy()
        for name in (
            "out_tokens",
            "out_kinds",
            "out_draft_tokens",
            "out_sources",
            "out_step_slot",
            "out_topk_ids",
            "out_topk_logprobs",
        )
    }
    forwards = state.target_forwards[index].cpu().numpy()
    drafted = state.drafted[index].cpu().numpy()
    draft_steps = state.draft_steps[index].cpu().numpy()
    by_source = state.source_counts[index].cpu().numpy()
    results = []
    for row, (request, time) in enumerate(zip(requests, times)):
        keep, reason = kept_length(host["out_tokens"][row, : generated[row]], request, tokenizer, eos_ids)
        kinds = host["out_kinds"][row, :keep]
        slots = host["out_step_slot"][row, :keep]
        counters = RequestCounters(
            draft_steps=int(draft_steps[row]),
            drafted=int(drafted[row]),
            accepted=int((kinds == KIND_ACCEPTED).sum()),
            target_forwards=int(forwards[row]),
            emitted=keep,
            accepted_at_position=[int(((kinds == KIND_ACCEPTED) & (slots == j)).sum()) for j in range(k)],
            by_proposer={
                SOURCE_NAMES[source]: {
                    "rounds": int(c[COUNT_ROUNDS]),
                    "drafted": int(c[COUNT_DRAFTED]),
                    "accepted": int(c[COUNT_ACCEPTED]),
                }
                for source, c in enumerate(by_source[row])
                if c[COUNT_ROUNDS]
            },
        )
        token_ids = host["out_tokens"][row, :keep].astype(np.int64).tolist()
        feedback = RequestFeedback(
            prompt_ids=np.asarray(request.input_ids, dtype=np.int32),
            token_ids=host["out_tokens"][row, :keep].astype(np.int32),
            kinds=kinds.astype(np.uint8),
            draft_tokens=host["out_draft_tokens"][row, :keep].astype(np.int32),
            target_topk_ids=host["out_topk_ids"][row, :keep].astype(np.int32),
            target_topk_logprobs=host["out_topk_logprobs"][row, :keep].astype(np.float16),
            draft_version=draft_version,
            draft_sources=host["out_sources"][row, :keep].astype(np.uint8),
        )
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if reason == "stop":
            text = cut_at_stop(text, request.stop)
        results.append(
            GenerationResult(
                request.id,
                token_ids,
                text,
                reason,
                counters,
                feedback,
                seconds=time.finished,
                queued_seconds=time.queued,
                first_token_seconds=time.first_token,
            )
        )
    return results


def kept_length(tokens: np.ndarray, request: GenerationRequest, tokenizer, eos_ids: set[int]) -> tuple[int, str]:
    """How many emitted tokens belong to the answer, and why decoding ended."""
    limit = min(len(tokens), request.max_new_tokens)
    for index in range(limit):
        if int(tokens[index]) in eos_ids:
            return index + 1, "eos"
    if request.stop:
        for index in range(1, limit + 1):
            text = tokenizer.decode(tokens[:index].tolist(), skip_special_tokens=True)
            if any(stop in text for stop in request.stop):
                return index, "stop"
    return limit, "length"


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
