"""Batched lossless speculative decoding with transformers models and pluggable proposers.

A batch is prefilled, then decoded round by round (pipelines.round: propose -> verify -> record -> advance) with
one *variant*: a proposer and its k (pipelines.proposers). `engine.proposer` fixes the variant (`none`, `draft`,
`suffix`, `hybrid`, each with `k`) or lets the goodput controller pick one per batch (`auto`, the default:
pipelines.controller, which may pick target-only).

On CUDA every (batch bucket, variant, greedy or sampled) round is captured once as a CUDA graph at warm-up, all
graphs sharing one memory pool, and replayed; the host reads one "any row still active" flag per round, a round
late, so it never waits on the GPU while rounds remain. Requests with stop strings are the exception: their text
is checked on the host after every round. Costs of every variant are timed at warm-up (graph replays) for the
controller.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipelines import sampling
from pipelines.controller import BatchObservation, GoodputController
from pipelines.decode_state import COUNT_ACCEPTED, COUNT_FULL, COUNT_ROUNDS, DecodeState
from pipelines.kv_cache import PositionalKVCache, decoder_forward
from pipelines.proposers import TARGET_ONLY, Variant
from pipelines.proposers.draft import DraftModelProposer
from pipelines.proposers.hybrid import HybridProposer
from pipelines.proposers.suffix import SuffixCache, SuffixProposer
from pipelines.results import collect
from pipelines.round import RoundModels, finish_rows, run_round
from pipelines.settings import EngineSettings
from pipelines.types import KIND_BONUS, NO_DRAFT_TOKEN, SOURCE_DRAFT, SOURCE_NONE, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the KV cache for decoding."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes with their own buffers and graphs: powers of two up to the maximum, and the maximum."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch_size]))


def variants_for(settings: EngineSettings, has_draft: bool) -> list[Variant]:
    """The variants an engine can run: one for a fixed proposer, several for auto (target-only among them)."""
    proposer, k = settings.proposer, settings.k
    if proposer in ("draft", "hybrid") and not has_draft:
        raise ValueError(f"engine.proposer {proposer!r} needs a draft model")
    if proposer == "none" or (proposer != "auto" and k == 0):
        return [TARGET_ONLY]
    if proposer != "auto":
        return [Variant(proposer, k)]
    kinds = ("suffix", "draft", "hybrid") if has_draft else ("suffix",)
    return [TARGET_ONLY] + [Variant(kind, choice) for kind in kinds for choice in settings.auto.k_choices]


class SpeculativeEngine:
    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        settings: EngineSettings | None = None,
        draft_version: str = "base",
        suffix_cache: SuffixCache | None = None,
    ):
        settings = settings or EngineSettings()
        self.target = target
        self.tokenizer = tokenizer
        self.settings = settings
        self.k = settings.k
        self.device = target.device
        self.variants = variants_for(settings, draft is not None)
        self.max_k = max(v.k for v in self.variants)
        self._use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self._compile = settings.compile and self.device.type == "cuda"
        self.eos_ids = self._eos_ids(target, tokenizer)
        size, length = settings.max_batch_size, settings.max_seq_len

        uses_draft = any(v.uses_draft_model for v in self.variants)
        self.draft_proposer = DraftModelProposer(draft, size, length, self._compile) if uses_draft else None
        self.draft_version = draft_version if self.draft_proposer is not None else "none"
        suffix_k = max((v.k for v in self.variants if v.uses_suffix), default=0)
        self.suffix = None
        if suffix_k:
            self.suffix_cache = suffix_cache or SuffixCache(settings.suffix, self.device)
            self.suffix = SuffixProposer(
                self.suffix_cache, suffix_k, compile=settings.suffix.compile and self.device.type == "cuda"
            )
        hybrid = None
        if any(v.proposer == "hybrid" for v in self.variants):
            hybrid = HybridProposer(self.suffix, self.draft_proposer)
        self.controller = None  # picks the variant with auto; keeps the evidence a hybrid's per-row choice uses
        if settings.proposer == "auto" or hybrid is not None:
            ratio = _parameters(draft) / _parameters(target) if draft is not None else 0.0
            self.controller = GoodputController(settings.auto, self.variants, draft_cost_ratio=ratio)
        self._models = RoundModels(
            target_forward=decoder_forward(target, self._compile),
            lm_head=target.get_output_embeddings(),
            eos_ids=self.eos_ids,
            top_m=settings.top_m,
            max_k=self.max_k,
            draft=self.draft_proposer,
            suffix=self.suffix,
            hybrid=hybrid,
            shadow_k=suffix_k,
        )
        # Prefill runs eagerly: its width is the batch's longest prompt, and a compiled forward would recompile
        # for every new prompt length.
        self._prefill_forward = decoder_forward(target)
        target_cache = PositionalKVCache.allocate(target, size, length)
        self._states = {bucket: self._allocate_state(bucket, target_cache) for bucket in batch_buckets(size)}
        self._graphs: dict[tuple[int, Variant, bool, bool], torch.cuda.CUDAGraph] = {}
        self._batches = 0
        self._graph_pool = None
        self.last_variant: Variant | None = None
        self._last_choice: dict[int, Variant] = {}  # per batch bucket, for the switch log line

    def _allocate_state(self, bucket: int, target_cache: PositionalKVCache) -> DecodeState:
        state = DecodeState.allocate(bucket, target_cache.rows(bucket), self.settings.top_m, self.device)
        for proposer in (self.draft_proposer, self.suffix):
            if proposer is not None:
                state.proposer_state[proposer.name] = proposer.allocate(bucket)
        return state

    # ------------------------------------------------------------------ public API

    @property
    def draft(self) -> PreTrainedModel | None:
        return None if self.draft_proposer is None else self.draft_proposer.model

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt that still leaves room for one round of the widest variant."""
        return self.settings.max_seq_len - self.max_k - 2

    def warmup(self) -> None:
        """Capture every round graph before serving (CUDA), then time every variant for the controller (CUDA; on
        CPU the controller learns costs from the batches themselves)."""
        started = time.perf_counter()
        if self._use_graphs:
            for size in self._states:
                for variant in self.variants:
                    for greedy_only in (True, False):
                        for shadow in {False, self._can_shadow(variant)}:
                            self._graph(size, variant, greedy_only, shadow)
            log.info("captured %d round graphs in %.1f s", len(self._graphs), time.perf_counter() - started)
        if self.controller is not None and self.device.type == "cuda":
            for size in self._states:
                self._profile(size)
            log.info(
                "timed %d variants x %d batch buckets: %s",
                len(self.variants),
                len(self._states),
                self.controller.snapshot()["costs_ms"],
            )

    def swap_draft(self, weights: PreTrainedModel | dict[str, torch.Tensor], version: str) -> None:
        """Load new draft weights in place (captured graphs keep pointing at the same parameters)."""
        if self.draft_proposer is None:
            raise ValueError("this engine runs without a draft model")
        self.draft_proposer.swap(weights)
        self.draft_version = version

    def reset_stream(self) -> None:
        """Forget what the stream taught: the suffix cache and the controller's acceptance evidence (its measured
        costs stay). For benchmarks that replay several streams through one engine."""
        if self.suffix is not None:
            self.suffix_cache.clear()
            self.suffix.hist.zero_()
        if self.controller is not None:
            self.controller.forget_evidence()

    def add_to_stream(self, completions: list[list[int]], prompts: list[list[int]] | None = None) -> int:
        """Teach the suffix proposer earlier completions (at start: the stored ones); returns tokens added."""
        return self.suffix_cache.add(completions, prompts) if self.suffix is not None else 0

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
        bucket = min(s for s in self._states if s >= len(requests))
        state = self._states[bucket]
        greedy_only = all(r.temperature == 0 for r in requests)
        variant = self._choose(bucket)
        self._batches += 1
        # auto: every shadow_every-th batch that drafts no suffix tokens scores shadow suffix proposals (a few
        # kernels per round), so the controller keeps measuring what suffix would gain
        shadow = self._can_shadow(variant) and (
            self._batches % self.settings.auto.shadow_every == 0
            or self.controller.suffix_rounds() < self.settings.auto.shadow_until
        )
        with torch.inference_mode():
            self._prefill(state, requests, variant)
            decode_started = time.perf_counter()
            rounds = self._decode(state, variant, greedy_only, requests, shadow)
            decode_seconds = time.perf_counter() - decode_started
        eos = set(self.eos_ids.tolist())
        results = collect(
            state, requests, self.tokenizer, eos, variant.k, self.draft_version, time.perf_counter() - started
        )
        self._learn(state, requests, bucket, variant, rounds, None if shadow else decode_seconds, results)
        return results

    def _choose(self, bucket: int) -> Variant:
        if self.settings.proposer != "auto":
            variant = self.variants[0]
        else:
            variant = self.controller.choose(bucket, draft_version=self.draft_version)
            if self._last_choice.get(bucket) != variant:
                self._log_switch(bucket, variant)
            self._last_choice[bucket] = variant
        self._share_expectations()
        self.last_variant = variant
        return variant

    def _log_switch(self, bucket: int, variant: Variant) -> None:
        """One line whenever auto changes its choice for a batch size: what it now runs and why."""
        choice = self.controller.last
        ranked = sorted(choice.goodput.items(), key=lambda item: -item[1])[:4]
        log.info(
            "proposer auto, batch %d: %s -> %s%s; expected tokens/s per row: %s",
            bucket,
            self._last_choice.get(bucket, "start"),
            variant,
            " (exploring)" if choice.explored else "",
            ", ".join(f"{v} {g:.0f}" for v, g in ranked) or "none measured yet",
        )

    def _share_expectations(self) -> None:
        """What the hybrid's per-row choice compares, from the controller's evidence (written between batches)."""
        hybrid = self._models.hybrid
        if hybrid is None:
            return
        expected = self.controller.suffix_expected_accepted(self.settings.suffix.max_match, self.max_k)
        self.suffix.expected_accepted.copy_(torch.from_numpy(expected))
        alpha = self.controller.model_alpha(self.draft_version)
        hybrid.model_expected_accepted.fill_(sum(alpha**j for j in range(1, self.max_k + 1)))

    def _learn(self, state, requests, bucket, variant, rounds, decode_seconds, results) -> None:
        """After a batch: the controller's evidence, and the suffix cache learns the completions."""
        if self.controller is not None:
            counts = state.source_counts[: len(requests), SOURCE_DRAFT].sum(dim=0).cpu().numpy()
            hist = None
            if self.suffix is not None:
                hist = self.suffix.hist.cpu().numpy().copy()  # on CPU .cpu() is the tensor itself
                self.suffix.hist.zero_()
            self.controller.observe(
                BatchObservation(
                    bucket,
                    variant,
                    rounds,
                    decode_seconds,
                    self.draft_version,
                    model_rounds=int(counts[COUNT_ROUNDS]),
                    model_accepted=int(counts[COUNT_ACCEPTED]),
                    model_full=int(counts[COUNT_FULL]),
                    suffix_hist=hist,
                    rows=len(requests),
                    tokens=sum(r.counters.emitted - 1 for r in results),
                )
            )
        if self.suffix is not None:
            self.suffix_cache.add([r.token_ids for r in results], [q.input_ids for q in requests])

    def _can_shadow(self, variant: Variant) -> bool:
        return self.settings.proposer == "auto" and self.suffix is not None and not variant.uses_suffix

    def _decode(self, state: DecodeState, variant: Variant, greedy_only: bool, requests, shadow: bool) -> int:
        """Run rounds until every row finished; returns the rounds run."""
        if self._use_graphs:
            run_once = self._graph(state.batch_size, variant, greedy_only, shadow).replay
        else:
            run_once = lambda: run_round(self._models, state, variant, greedy_only, shadow)  # noqa: E731
        has_stops = any(r.stop for r in requests)
        max_rounds = max(r.max_new_tokens for r in requests) + 1
        if self.device.type != "cuda" or has_stops:
            for done in range(max_rounds):
                if not bool(state.active.any()):
                    return done
                run_once()
                if has_stops:
                    self._apply_stop_strings(state, requests)
            return max_rounds
        # Read the "still active" flag one round late: the next round is already queued while we wait,
        # so the GPU never idles on the host. A round after the last finish is a no-op.
        flags = [torch.zeros((), dtype=torch.bool).pin_memory() for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        rounds = 0
        for round_index in range(max_rounds):
            run_once()
            rounds += 1
            slot = round_index % 2
            flags[slot].copy_(state.active.any(), non_blocking=True)
            events[slot].record()
            if round_index > 0:
                events[1 - slot].synchronize()
                if not bool(flags[1 - slot]):
                    break
        torch.cuda.current_stream().synchronize()
        return rounds

    def _apply_stop_strings(self, state: DecodeState, requests: list[GenerationRequest]) -> None:
        generated = state.generated.tolist()
        for row, request in enumerate(requests):
            if not request.stop or not bool(state.active[row]):
                continue
            text = self.tokenizer.decode(state.out_tokens[row, : generated[row]].tolist(), skip_special_tokens=True)
            if any(stop in text for stop in request.stop):
                state.active[row] = False

    # ------------------------------------------------------------------ prefill

    def _prefill(self, state: DecodeState, requests: list[GenerationRequest], variant: Variant) -> None:
        """Run the target (and the draft, when the variant uses it) over the right-padded prompts and emit each
        row's first token from the target."""
        batch, rows = state.batch_size, len(requests)
        longest = max(len(r.input_ids) for r in requests)
        tokens = torch.zeros((batch, longest), dtype=torch.int64)
        prompt_lengths = torch.ones(batch, dtype=torch.int64)
        for row, request in enumerate(requests):
            tokens[row, : len(request.input_ids)] = torch.tensor(request.input_ids)
            prompt_lengths[row] = len(request.input_ids)
        tokens, prompt_lengths = tokens.to(self.device), prompt_lengths.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(batch, -1)

        def per_row(values, default):
            return torch.tensor(list(values) + [default] * (batch - rows), device=self.device)

        state.active.copy_(per_row([True] * rows, False))
        state.max_new_tokens.copy_(per_row([r.max_new_tokens for r in requests], 1))
        state.temperature.copy_(per_row([float(r.temperature) for r in requests], 0.0).float())
        state.top_p.copy_(per_row([float(r.top_p) for r in requests], 1.0).float())
        state.seed.copy_(per_row([r.seed for r in requests], 0))
        for counter in (state.generated, state.drafted, state.draft_steps, state.source_counts):
            counter.zero_()
        state.target_forwards.copy_(state.active.long())
        state.tokens[:, :longest].copy_(tokens)
        if self.suffix is not None:
            state.proposer_state[self.suffix.name].reset()

        # Hidden states only, then the LM head on each row's last prompt token: full prompt logits would
        # cost batch x prompt x vocab memory for nothing.
        hidden = self._prefill_forward(tokens, positions, state.target_cache)
        last = (prompt_lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
        logits = self._models.lm_head(hidden.gather(1, last)).float()  # [B, 1, V]
        if variant.uses_draft_model:
            self.draft_proposer.prefill(state, tokens, positions)

        probs = sampling.warp(logits, state.temperature, state.top_p)
        first = sampling.sample(probs, state.seed, prompt_lengths[:, None], sampling.STREAM_RESIDUAL)  # [B, 1]
        topk = torch.log_softmax(logits, dim=-1).topk(self.settings.top_m, dim=-1)
        state.lengths.copy_(prompt_lengths - 1)  # record() writes the token after `lengths`: position P
        state.record(
            first,
            state.active[:, None],
            torch.full_like(first, KIND_BONUS),
            torch.full_like(first, NO_DRAFT_TOKEN),
            torch.full_like(first, SOURCE_NONE),
            topk.indices,
            topk.values,
        )
        state.generated.copy_(state.active.long())
        state.lengths.copy_(prompt_lengths)
        state.current.copy_(first[:, 0])
        state.previous.copy_(tokens.gather(1, (prompt_lengths - 1)[:, None])[:, 0])
        finish_rows(self._models, state, first, state.active[:, None])

    # ------------------------------------------------------------------ graphs and costs

    def _graph(self, batch_size: int, variant: Variant, greedy_only: bool, shadow: bool = False):
        key = (batch_size, variant, greedy_only, shadow)
        if key in self._graphs:
            return self._graphs[key]
        state = self._states[batch_size]
        state.active.zero_()  # every row inactive: warm-up and capture change nothing that matters
        if self._graph_pool is None:
            # One pool for every graph: they never run concurrently and keep no tensor alive between replays.
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run_round(self._models, state, variant, greedy_only, shadow)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                run_round(self._models, state, variant, greedy_only, shadow)
        torch.cuda.synchronize()
        self._graphs[key] = graph
        return graph

    def _profile(self, bucket: int) -> None:
        """Seconds per greedy round of every variant at this bucket (rows inactive: the work is the same)."""
        state = self._states[bucket]
        state.active.zero_()
        for variant in self.variants:
            self.controller.set_cost(bucket, variant, self._time_round(state, variant))

    def _time_round(self, state: DecodeState, variant: Variant) -> float:
        with torch.inference_mode():
            if not self._use_graphs:  # CUDA without graphs: eager rounds, the first one untimed
                run_round(self._models, state, variant, True)
                torch.cuda.synchronize()
                started = time.perf_counter()
                run_round(self._models, state, variant, True)
                torch.cuda.synchronize()
                return time.perf_counter() - started
            graph = self._graph(state.batch_size, variant, True)
            graph.replay()
            times = []
            for _ in range(self.settings.auto.profile_rounds):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            return statistics.median(times)

    @staticmethod
    def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        ids = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return torch.tensor(sorted(set(ids)) or [-1], dtype=torch.int64, device=model.device)


def _parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
