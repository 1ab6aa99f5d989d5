"""Batched chain speculative decoding with transformers models: draft proposes k, target verifies, lossless.

One decoding *round* (`_round`) is a fixed sequence of tensor operations on static buffers:

    propose   draft runs k steps from (previous, current) and proposes d_1..d_k
    verify    target runs once on [current, d_1..d_k] at positions L..L+k
    accept    pipelines.verify keeps n draft tokens and adds a recovered or bonus token
    record    emitted tokens and feedback (target top-m log-probs) go to per-row output buffers
    advance   lengths += n + 1; rejected cache slots are simply overwritten next round

With no draft (or k = 0) the same round is plain target decoding: verify one token, emit one bonus token.
On CUDA each round is captured once per (batch size, greedy-only) as a CUDA graph and replayed; the host
only reads one "any row still active" flag per round, a round late, so it never stalls the GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipelines import sampling
from pipelines.decode_state import DecodeState
from pipelines.kv_cache import PositionalKVCache, attention_mask
from pipelines.types import (
    KIND_ACCEPTED,
    KIND_BONUS,
    KIND_RECOVERED,
    NO_DRAFT_TOKEN,
    GenerationRequest,
    GenerationResult,
    RequestCounters,
    RequestFeedback,
)
from pipelines.verify import verify_greedy, verify_sampled

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the KV cache for decoding."""


@dataclass(frozen=True)
class EngineSettings:
    k: int = 5  # draft tokens per verification step (0 = target-only)
    max_batch_size: int = 8
    max_seq_len: int = 2048  # KV cache slots per row: prompt + generated + k
    top_m: int = 16  # target log-probabilities kept per emitted position
    device: str = "cpu"
    cuda_graphs: bool = True  # capture each round as a CUDA graph (CUDA only)
    compile: bool = False  # torch.compile the model forwards before capture (CUDA only)

    def __post_init__(self) -> None:
        if not 0 <= self.k <= 8:
            raise ValueError(f"k must be between 0 and 8, got {self.k}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {self.top_m}")
        if self.max_seq_len < self.k + 8:
            raise ValueError(f"max_seq_len {self.max_seq_len} is too small for k = {self.k}")


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes with their own buffers and graphs: powers of two up to the maximum, and the maximum."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch_size]))


class SpeculativeEngine:
    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        settings: EngineSettings,
        draft_version: str = "base",
    ):
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.settings = settings
        self.draft_version = draft_version if draft is not None else "none"
        self.k = settings.k if draft is not None else 0
        self.device = torch.device(settings.device)
        self.eos_ids = self._eos_ids(target, tokenizer)
        self._use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self._target_forward = self._compiled(target)
        self._draft_forward = self._compiled(draft) if draft is not None else None
        target_cache = PositionalKVCache.allocate(target, settings.max_batch_size, settings.max_seq_len)
        draft_cache = (
            PositionalKVCache.allocate(draft, settings.max_batch_size, settings.max_seq_len) if draft else None
        )
        self._states = {
            size: DecodeState.allocate(
                size,
                target_cache.rows(size),
                draft_cache.rows(size) if draft_cache else None,
                settings.top_m,
                self.device,
            )
            for size in batch_buckets(settings.max_batch_size)
        }
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------------ public API

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt that still leaves room for one verification step."""
        return self.settings.max_seq_len - self.k - 2

    def warmup(self) -> None:
        """Capture every round graph before serving (CUDA), so no request pays for capture."""
        if not self._use_graphs:
            return
        started = time.perf_counter()
        for size in self._states:
            for greedy_only in (True, False):
                self._graph(size, greedy_only)
        log.info("captured %d round graphs in %.1f s", len(self._graphs), time.perf_counter() - started)

    def swap_draft(self, weights: PreTrainedModel | dict[str, torch.Tensor], version: str) -> None:
        """Load new draft weights in place (captured graphs keep pointing at the same parameters)."""
        if self.draft is None:
            raise ValueError("this engine runs without a draft model")
        state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        own = self.draft.state_dict()
        missing = set(own) - set(state_dict)
        unexpected = set(state_dict) - set(own)
        misshapen = sorted(n for n in set(own) & set(state_dict) if own[n].shape != state_dict[n].shape)
        if missing or unexpected or misshapen:
            raise ValueError(
                f"draft weights do not fit the draft model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}, wrong shape {misshapen[:3]}"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])
        self.draft_version = version

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode requests in batches of at most max_batch_size; results come back in request order."""
        for request in requests:
            if len(request.input_ids) > self.max_prompt_tokens:
                raise PromptTooLongError(
                    f"request {request.id!r}: prompt has {len(request.input_ids)} tokens, "
                    f"the limit is {self.max_prompt_tokens} (max_seq_len {self.settings.max_seq_len})"
                )
        results = []
        size = self.settings.max_batch_size
        for start in range(0, len(requests), size):
            results.extend(self._generate_batch(requests[start : start + size]))
        return results

    # ------------------------------------------------------------------ one batch

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        state = self._states[min(s for s in self._states if s >= len(requests))]
        greedy_only = all(r.temperature == 0 for r in requests)
        with torch.inference_mode():
            self._prefill(state, requests)
            self._decode(state, greedy_only, requests)
        elapsed = time.perf_counter() - started
        return self._collect(state, requests, elapsed)

    def _decode(self, state: DecodeState, greedy_only: bool, requests: list[GenerationRequest]) -> None:
        run_round = self._graph(state.batch_size, greedy_only).replay if self._use_graphs else None
        if run_round is None:
            run_round = lambda: self._round(state, greedy_only)  # noqa: E731
        has_stops = any(r.stop for r in requests)
        max_rounds = max(r.max_new_tokens for r in requests) + 1
        if self.device.type != "cuda" or has_stops:
            for _ in range(max_rounds):
                if not bool(state.active.any()):
                    break
                run_round()
                if has_stops:
                    self._apply_stop_strings(state, requests)
            return
        # Read the "still active" flag one round late: the next round is already queued while we wait,
        # so the GPU never idles on the host. A round after the last finish is a no-op.
        flags = [torch.zeros((), dtype=torch.bool).pin_memory() for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        for round_index in range(max_rounds):
            run_round()
            slot = round_index % 2
            flags[slot].copy_(state.active.any(), non_blocking=True)
            events[slot].record()
            if round_index > 0:
                events[1 - slot].synchronize()
                if not bool(flags[1 - slot]):
                    break
        torch.cuda.current_stream().synchronize()

    def _apply_stop_strings(self, state: DecodeState, requests: list[GenerationRequest]) -> None:
        generated = state.generated.tolist()
        for row, request in enumerate(requests):
            if not request.stop or not bool(state.active[row]):
                continue
            text = self.tokenizer.decode(state.out_tokens[row, : generated[row]].tolist(), skip_special_tokens=True)
            if any(stop in text for stop in request.stop):
                state.active[row] = False

    # ------------------------------------------------------------------ prefill

    def _prefill(self, state: DecodeState, requests: list[GenerationRequest]) -> None:
        """Run both models over the prompts (right-padded) and emit each row's first token from the target."""
        batch = state.batch_size
        longest = max(len(r.input_ids) for r in requests)
        tokens = torch.zeros((batch, longest), dtype=torch.int64)
        prompt_lengths = torch.ones(batch, dtype=torch.int64)
        for row, request in enumerate(requests):
            tokens[row, : len(request.input_ids)] = torch.tensor(request.input_ids)
            prompt_lengths[row] = len(request.input_ids)
        tokens, prompt_lengths = tokens.to(self.device), prompt_lengths.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(batch, -1)

        def per_row(values, default):
            padded = list(values) + [default] * (batch - len(requests))
            return torch.tensor(padded, device=self.device)

        state.active.copy_(per_row([True] * len(requests), False))
        state.max_new_tokens.copy_(per_row([r.max_new_tokens for r in requests], 1))
        state.temperature.copy_(per_row([float(r.temperature) for r in requests], 0.0).float())
        state.top_p.copy_(per_row([float(r.top_p) for r in requests], 1.0).float())
        state.seed.copy_(per_row([r.seed for r in requests], 0))
        state.generated.zero_()
        state.target_forwards.copy_(state.active.long())

        # Hidden states only, then the LM head on each row's last prompt token: full prompt logits would
        # cost batch x prompt x vocab memory for nothing.
        last = (prompt_lengths - 1)[:, None, None]
        hidden = self._hidden_states(self.target, state.target_cache, tokens, positions)
        hidden = hidden.gather(1, last.expand(-1, 1, hidden.shape[-1]))
        logits = self.target.get_output_embeddings()(hidden).float()  # [B, 1, V]
        if self.draft is not None:
            self._hidden_states(self.draft, state.draft_cache, tokens, positions)

        probs = sampling.warp(logits, state.temperature, state.top_p)
        first = sampling.sample(probs, state.seed, prompt_lengths[:, None], sampling.STREAM_RESIDUAL)  # [B, 1]
        topk = torch.log_softmax(logits, dim=-1).topk(self.settings.top_m, dim=-1)
        none = torch.full_like(first, NO_DRAFT_TOKEN)
        state.record(first, state.active[:, None], torch.full_like(first, KIND_BONUS), none, topk.indices, topk.values)
        state.generated.copy_(state.active.long())
        state.lengths.copy_(prompt_lengths)
        state.current.copy_(first[:, 0])
        state.previous.copy_(tokens.gather(1, (prompt_lengths - 1)[:, None])[:, 0])
        self._finish_rows(state, first, state.active[:, None])

    def _hidden_states(self, model, cache: PositionalKVCache, tokens, positions) -> torch.Tensor:
        cache.positions = positions
        mask = attention_mask(positions, cache.max_seq_len)
        decoder = model.get_decoder()
        return decoder(
            input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True
        ).last_hidden_state

    # ------------------------------------------------------------------ one round (captured on CUDA)

    def _round(self, state: DecodeState, greedy_only: bool) -> None:
        k = self.k
        lengths = state.lengths
        steps = torch.arange(k + 1, device=self.device)

        draft_tokens, draft_probs = self._propose(state, greedy_only)  # [B, k], [B, k, V] or None
        verify_tokens = torch.cat([state.current[:, None], draft_tokens], dim=1)  # [B, k + 1]
        target_logits = self._logits(
            self._target_forward, state.target_cache, verify_tokens, lengths[:, None] + steps
        ).float()  # [B, k + 1, V]
        if greedy_only:
            outcome = verify_greedy(draft_tokens, target_logits)
        else:
            target_probs = sampling.warp(target_logits, state.temperature, state.top_p)
            if draft_probs is None:  # target-only: no proposals, the bonus token is drawn from p itself
                draft_probs = target_probs[:, :0]
            outcome = verify_sampled(draft_tokens, draft_probs, target_probs, state.seed, lengths + 1)

        accepted = outcome.accepted[:, None]  # [B, 1]
        next_token = outcome.next_token[:, None]
        padded_drafts = torch.cat([draft_tokens, torch.full_like(next_token, NO_DRAFT_TOKEN)], dim=1)
        emitted = torch.where(steps == accepted, next_token, padded_drafts)  # [B, k + 1]
        valid = (steps <= accepted) & state.active[:, None]
        last_kind = torch.where(accepted == k, KIND_BONUS, KIND_RECOVERED)
        kinds = torch.where(steps < accepted, KIND_ACCEPTED, last_kind)
        topk = torch.log_softmax(target_logits, dim=-1).topk(self.settings.top_m, dim=-1)
        state.record(emitted, valid, kinds, padded_drafts, topk.indices, topk.values)

        advance = torch.where(state.active, outcome.accepted + 1, 0)
        state.previous.copy_(torch.where(state.active, verify_tokens.gather(1, accepted)[:, 0], state.previous))
        state.current.copy_(torch.where(state.active, outcome.next_token, state.current))
        state.lengths.add_(advance)
        state.generated.add_(advance)
        state.target_forwards.add_(state.active.long())
        self._finish_rows(state, emitted, valid)

    def _propose(self, state: DecodeState, greedy_only: bool):
        """k draft steps; the first re-feeds `previous` so the draft cache catches up after a full acceptance."""
        batch = state.batch_size
        if self.k == 0:
            return torch.zeros((batch, 0), dtype=torch.int64, device=self.device), None
        lengths = state.lengths
        tokens = torch.stack([state.previous, state.current], dim=1)
        positions = torch.stack([lengths - 1, lengths], dim=1)
        proposals, probs = [], []
        for step in range(self.k):
            logits = self._logits(self._draft_forward, state.draft_cache, tokens, positions, last_only=True)
            if greedy_only:
                token = logits[:, -1].argmax(dim=-1)
            else:
                q = sampling.warp(logits[:, -1:], state.temperature, state.top_p)  # [B, 1, V]
                token = sampling.sample(q, state.seed, (lengths + 1 + step)[:, None], sampling.STREAM_DRAFT)[:, 0]
                probs.append(q[:, 0])
            proposals.append(token)
            tokens, positions = token[:, None], (lengths + 1 + step)[:, None]
        return torch.stack(proposals, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def _finish_rows(self, state: DecodeState, emitted: torch.Tensor, valid: torch.Tensor) -> None:
        eos = torch.isin(emitted, self.eos_ids) & valid
        no_room = state.lengths + self.k + 1 > state.target_cache.max_seq_len
        done = eos.any(dim=1) | (state.generated >= state.max_new_tokens) | no_room
        state.active.logical_and_(~done)

    def _logits(self, forward, cache, tokens, positions, last_only: bool = False) -> torch.Tensor:
        cache.positions = positions
        mask = attention_mask(positions, cache.max_seq_len)
        return forward(tokens, positions, mask, cache, 1 if last_only else 0)

    # ------------------------------------------------------------------ compilation and graphs

    def _compiled(self, model: PreTrainedModel):
        def forward(tokens, positions, mask, cache, logits_to_keep):
            return model(
                input_ids=tokens,
                position_ids=positions,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            ).logits

        if self.settings.compile and self.device.type == "cuda":
            # One static shape per (batch size, tokens per forward, logits kept): more than Dynamo's default 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            return torch.compile(forward, fullgraph=True, dynamic=False)
        return forward

    def _graph(self, batch_size: int, greedy_only: bool) -> torch.cuda.CUDAGraph:
        key = (batch_size, greedy_only)
        if key in self._graphs:
            return self._graphs[key]
        state = self._states[batch_size]
        state.active.zero_()  # every row inactive: warm-up and capture change nothing that matters
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._round(state, greedy_only)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._round(state, greedy_only)
        torch.cuda.synchronize()
        self._graphs[key] = graph
        return graph

    # ------------------------------------------------------------------ results

    def _collect(self, state: DecodeState, requests: list[GenerationRequest], elapsed: float) -> list[GenerationResult]:
        rows = len(requests)
        generated = state.generated[:rows].cpu().numpy()
        width = int(generated.max())
        tokens = state.out_tokens[:rows, :width].cpu().numpy()
        kinds = state.out_kinds[:rows, :width].cpu().numpy()
        draft_tokens = state.out_draft_tokens[:rows, :width].cpu().numpy()
        slots = state.out_step_slot[:rows, :width].cpu().numpy()
        topk_ids = state.out_topk_ids[:rows, :width].cpu().numpy()
        topk_logprobs = state.out_topk_logprobs[:rows, :width].cpu().numpy()
        forwards = state.target_forwards[:rows].cpu().numpy()
        eos = set(self.eos_ids.tolist())
        results = []
        for row, request in enumerate(requests):
            keep, reason = self._kept_length(tokens[row, : generated[row]], request, eos)
            row_kinds = kinds[row, :keep]
            counters = RequestCounters(
                draft_steps=int(forwards[row] - 1) if self.k else 0,
                drafted=int(forwards[row] - 1) * self.k,
                accepted=int((row_kinds == KIND_ACCEPTED).sum()),
                target_forwards=int(forwards[row]),
                emitted=keep,
                accepted_at_position=[
                    int(((row_kinds == KIND_ACCEPTED) & (slots[row, :keep] == j)).sum()) for j in range(self.k)
                ],
            )
            token_ids = tokens[row, :keep].astype(np.int64).tolist()
            feedback = RequestFeedback(
                prompt_ids=np.asarray(request.input_ids, dtype=np.int32),
                token_ids=tokens[row, :keep].astype(np.int32),
                kinds=row_kinds.astype(np.uint8),
                draft_tokens=draft_tokens[row, :keep].astype(np.int32),
                target_topk_ids=topk_ids[row, :keep].astype(np.int32),
                target_topk_logprobs=topk_logprobs[row, :keep].astype(np.float16),
                draft_version=self.draft_version,
            )
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if reason == "stop":
                text = _cut_at_stop(text, request.stop)
            results.append(GenerationResult(request.id, token_ids, text, reason, counters, feedback, elapsed))
        return results

    def _kept_length(self, tokens: np.ndarray, request: GenerationRequest, eos: set[int]) -> tuple[int, str]:
        """How many emitted tokens belong to the answer, and why decoding ended."""
        limit = min(len(tokens), request.max_new_tokens)
        for index in range(limit):
            if int(tokens[index]) in eos:
                return index + 1, "eos"
        if request.stop:
            for index in range(1, limit + 1):
                text = self.tokenizer.decode(tokens[:index].tolist(), skip_special_tokens=True)
                if any(stop in text for stop in request.stop):
                    return index, "stop"
        return limit, "length"

    @staticmethod
    def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        ids = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return torch.tensor(sorted(set(ids)) or [-1], dtype=torch.int64, device=model.device)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
