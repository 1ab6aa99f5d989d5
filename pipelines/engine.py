"""Batched lossless speculative decoding with transformers models, pluggable proposers and continuous batching.

The engine has `max_batch_size` *slots*: rows of static buffers (pipelines.decode_state) and KV caches.

    submit(request, tag)  queue a request
    step()                one iteration: admit queued requests into free slots (pipelines.slots), prefill
                          newcomers (at most prefill_chunk_tokens prompt tokens per step, so a long prompt never
                          stalls the running rows for long), run one decoding round (pipelines.round: propose ->
                          verify -> record -> advance) over the smallest batch bucket holding every decoding slot,
                          and return (tag, result) for the requests that finished
    generate(requests)    submit them all and step until they are done; results in request order

A finished row's slot is refilled at the next round boundary (continuous batching, Orca-style iteration-level
scheduling); with `scheduling: static`, the baseline, a batch is admitted only when every slot is free and decodes
until its last row finishes. A free or prefilling slot rides along in the rounds as a no-op whose writes land at
its *parking* position at the end of its own cache, where no prompt lives.

A round runs one *variant* (a proposer and its k) for the whole bucket: `engine.proposer` fixes it, or the goodput
controller (pipelines.controller) picks one per window of rounds (`auto`, the default, which may pick target-only).
The model proposer (a draft LM or a head) catches rows up eagerly before a round that uses it (`sync`: a newcomer,
or rows that other variants drafted for), so the variant can change between windows and a newcomer can join.

On CUDA every (bucket, variant, greedy or sampled, shadow) round is captured once at warm-up as a CUDA graph, all
graphs sharing one memory pool, and replayed, and so is every prefill shape up to `prefill_graph_tokens`
(pipelines.prefill); the host reads which rows are still active one round late, so it
never waits on the GPU while rounds remain (a finished row runs one extra round as a no-op before its slot is
refilled). Requests with stop strings are the exception: their text is checked on the host after every round.
Costs of every variant are timed at warm-up (graph replays) for the controller.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipelines import sampling
from pipelines.controller import BatchObservation, GoodputController
from pipelines.decode_state import TALLY_ROW_ROUNDS, TALLY_TOKENS, DecodeState
from pipelines.heads.model import HeadDraft
from pipelines.kv_cache import PositionalKVCache, decoder_forward, padded_width
from pipelines.phase_clock import PhaseClock
from pipelines.prefill import PrefillRunner
from pipelines.proposers import TARGET_ONLY, Variant
from pipelines.proposers.draft import DraftModelProposer
from pipelines.proposers.head import HeadProposer
from pipelines.proposers.hybrid import HybridProposer
from pipelines.proposers.suffix import SuffixCache, SuffixProposer
from pipelines.results import RowTimes, collect
from pipelines.round import RoundModels, finish_rows, run_round
from pipelines.round_graphs import RoundGraphs
from pipelines.settings import EngineSettings
from pipelines.slots import PrefillChunk, Queued, SlotTable
from pipelines.types import (
    KIND_BONUS,
    NO_DRAFT_TOKEN,
    SOURCE_DRAFT,
    SOURCE_NONE,
    GenerationRequest,
    GenerationResult,
)

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the KV cache for decoding."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes with their own graphs: powers of two up to the maximum, and the maximum."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch_size]))


def model_kind(draft) -> str | None:
    """ "head" for a HeadDraft, "draft" for a draft LM, None without one."""
    if draft is None:
        return None
    return "head" if isinstance(draft, HeadDraft) else "draft"


def variants_for(settings: EngineSettings, kind: str | None) -> list[Variant]:
    """The variants an engine can run: one for a fixed proposer, several for auto (target-only among them)."""
    proposer, k = settings.proposer, settings.k
    if proposer in ("draft", "head") and kind != proposer:
        raise ValueError(f"engine.proposer {proposer!r} needs a {proposer} model, this engine has {kind or 'none'}")
    if proposer == "hybrid" and kind is None:
        raise ValueError("engine.proposer 'hybrid' needs a draft model or a head")
    if proposer == "none" or (proposer != "auto" and k == 0):
        return [TARGET_ONLY]
    if proposer != "auto":
        return [Variant(proposer, k)]
    kinds = ("suffix", kind, "hybrid") if kind else ("suffix",)
    return [TARGET_ONLY] + [Variant(name, choice) for name in kinds for choice in settings.auto.k_choices]


@dataclass
class _Window:
    """Rounds run with one variant at one bucket since the last choice: the controller's next observation."""

    bucket: int
    variant: Variant
    shadow: bool
    rounds: int = 0
    events: list = field(default_factory=list)  # CUDA: (start, end) event pairs around each round
    host_seconds: float = 0.0  # CPU: the rounds' own time (prefill, catch-up and collecting excluded)


class SpeculativeEngine:
    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | HeadDraft | None,
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
        self.variants = variants_for(settings, model_kind(draft))
        self.max_k = max(v.k for v in self.variants)
        self._use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self._compile = settings.compile and self.device.type == "cuda"
        self.eos_ids = self._eos_ids(target, tokenizer)
        self._eos_set = set(self.eos_ids.tolist())  # for collecting results on the host
        size, length = settings.max_batch_size, settings.max_seq_len
        # Where the rounds of a free or prefilling slot write: the last max_k + 1 positions, past any prompt.
        self.park = length - self.max_k - 1

        self.model_proposer = None
        if any(v.uses_model for v in self.variants):
            if isinstance(draft, HeadDraft):
                self.model_proposer = HeadProposer(draft, length, window=self.max_k + 1)
            else:
                self.model_proposer = DraftModelProposer(draft, length, self._compile)
        self.draft_version = draft_version if self.model_proposer is not None else "none"
        suffix_k = max((v.k for v in self.variants if v.uses_suffix), default=0)
        self.suffix = None
        if suffix_k:
            self.suffix_cache = suffix_cache or SuffixCache(settings.suffix, self.device)
            self.suffix = SuffixProposer(
                self.suffix_cache, suffix_k, compile=settings.suffix.compile and self.device.type == "cuda"
            )
        hybrid = None
        if any(v.proposer == "hybrid" for v in self.variants):
            hybrid = HybridProposer(self.suffix, self.model_proposer)
        self.controller = None  # picks the variant with auto; keeps the evidence a hybrid's per-row choice uses
        if settings.proposer == "auto" or hybrid is not None:
            ratio = _model_step_cost_ratio(draft, target)
            self.controller = GoodputController(settings.auto, self.variants, model_cost_ratio=ratio)
        head = self.model_proposer if isinstance(self.model_proposer, HeadProposer) else None
        # a fused head reads lower target layers too: the verify pass and the prefill return them beside the last
        feature_layers = head.model.config.feature_layers if head is not None else ()
        if feature_layers and settings.compile:
            # transformers records hidden states through hooks installed under a lock, which torch.compile's
            # fullgraph mode refuses (measured: torch 2.13, transformers 5.17); CUDA graphs capture them fine.
            # Refused on a CPU too (where compile does nothing), so a config that starts here starts on a GPU.
            raise ValueError(
                "engine.compile does not work with a head fused over lower target layers: use compile false"
            )
        self._models = RoundModels(
            target_forward=decoder_forward(target, self._compile, feature_layers),
            lm_head=target.get_output_embeddings(),
            hidden_size=target.config.hidden_size,
            eos_ids=self.eos_ids,
            top_m=settings.top_m,
            max_k=self.max_k,
            park=self.park,
            model=self.model_proposer,
            suffix=self.suffix,
            hybrid=hybrid,
            head=head,
            shadow_k=suffix_k,
        )
        self.pad_tokens = settings.pad_tokens or (64 if self.device.type == "cuda" else 1)
        self.state = DecodeState.allocate(
            size, PositionalKVCache.allocate(target, size, length), settings.top_m, self.device, max_k=self.max_k
        )
        self.prefill = PrefillRunner(
            target, self.state.target_cache, self._use_graphs, settings.prefill_graph_tokens, feature_layers
        )
        for proposer in (self.model_proposer, self.suffix):
            if proposer is not None:
                self.state.proposer_state[proposer.name] = proposer.allocate(size)
        self.state.lengths.fill_(self.park)
        self._views = {bucket: self.state.rows(bucket) for bucket in batch_buckets(size)}
        self.slots = SlotTable(size, list(self._views), static=settings.scheduling == "static")
        self._stale: set[int] = set()  # slots the model proposer has not followed (sync before it drafts)
        self.graphs = RoundGraphs(self._models, self._views, self._use_graphs, settings.auto.profile_rounds)
        self._warm = False
        self._rounds = 0  # rounds run since start
        self._windows = 0
        self._window: _Window | None = None
        self._flags: deque[tuple[int, torch.Tensor, Any]] = deque()  # (round, active snapshot, event), oldest first
        if self.device.type == "cuda":
            self._pinned = [torch.zeros(size, dtype=torch.bool).pin_memory() for _ in range(3)]
        self.last_variant: Variant | None = None
        self._last_choice: dict[int, Variant] = {}  # per batch bucket, for the switch log line
        self.clock = PhaseClock(self.device.type == "cuda")  # seconds in prefill, rounds and catch-up
        self._previous_variant: Variant | None = None

    # ------------------------------------------------------------------ public API

    @property
    def draft(self) -> PreTrainedModel | HeadDraft | None:
        return None if self.model_proposer is None else self.model_proposer.model

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt that still leaves room for one round of the widest variant."""
        return self.settings.max_seq_len - self.max_k - 2

    @property
    def busy(self) -> bool:
        """Requests are queued or in slots."""
        return self.slots.busy

    @property
    def free_slots(self) -> int:
        return sum(slot is None for slot in self.slots.slots) - len(self.slots.queue)

    def occupancy(self) -> tuple[int, int]:
        """(slots decoding, slots in all)."""
        return len(self.slots.decoding), len(self.slots.slots)

    def warmup(self) -> None:
        """Capture every round graph before serving (CUDA), then time every variant for the controller (CUDA; on
        CPU the controller learns costs from the rounds themselves). Call while no request is in flight."""
        assert not self.slots.occupied, "warm-up runs rounds: no request may be in flight"
        started = time.perf_counter()
        if self._use_graphs:
            for size in self._views:
                for variant in self.variants:
                    for greedy_only in (True, False):
                        for shadow in {False, self._can_shadow(variant)}:
                            self.graphs.get(size, variant, greedy_only, shadow)
            log.info("captured %d round graphs in %.1f s", len(self.graphs), time.perf_counter() - started)
        if self.pad_tokens > 1:
            self.prefill.warm(list(self._views), self._prefill_widths(), self.park)
        if self.controller is not None and self.device.type == "cuda":
            for size in self._views:
                for variant in self.variants:
                    self.controller.set_cost(size, variant, self.graphs.seconds_per_round(size, variant))
            log.info(
                "timed %d variants x %d batch buckets: %s",
                len(self.variants),
                len(self._views),
                self.controller.snapshot()["costs_ms"],
            )
        self._warm = True

    def _prefill_widths(self) -> list[int]:
        """Every padded width a prefill chunk can have."""
        budget = 0 if self.slots.static else self.settings.prefill_chunk_tokens
        widest = padded_width(min(budget or self.max_prompt_tokens, self.max_prompt_tokens), self.pad_tokens)
        return list(range(self.pad_tokens, widest + 1, self.pad_tokens))

    def swap_draft(self, weights: PreTrainedModel | HeadDraft | dict[str, torch.Tensor], version: str) -> None:
        """Load new draft weights in place (captured graphs keep pointing at the same parameters). Rows in flight
        are caught up with the new weights before the model next drafts for them."""
        if self.model_proposer is None:
            raise ValueError("this engine runs without a draft model")
        if self._window is not None:
            self._close_window()  # what the old version drafted is its evidence, not the new one's
        self.model_proposer.swap(weights)
        self.draft_version = version
        self._stale.update(self.slots.occupied)

    def reset_stream(self) -> None:
        """Forget what the stream taught: the suffix cache and the controller's acceptance evidence (its measured
        costs stay). For benchmarks that replay several streams through one engine."""
        if self.suffix is not None:
            self.suffix_cache.clear()
            self.suffix.clear_statistics()
        if self.controller is not None:
            self.controller.forget_evidence()

    def add_to_stream(self, completions: list[list[int]], prompts: list[list[int]] | None = None) -> int:
        """Teach the suffix proposer earlier completions (at start: the stored ones); returns tokens added."""
        return self.suffix_cache.add(completions, prompts) if self.suffix is not None else 0

    def submit(self, request: GenerationRequest, tag: Any = None) -> None:
        """Queue a request; `tag` comes back with its result from step()."""
        self._check_prompt(request)
        self.slots.queue.append(Queued(request, tag))

    def _check_prompt(self, request: GenerationRequest) -> None:
        if len(request.input_ids) > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"request {request.id!r}: prompt has {len(request.input_ids)} tokens, "
                f"the limit is {self.max_prompt_tokens} (max_seq_len {self.settings.max_seq_len})"
            )

    def step(self) -> list[tuple[Any, GenerationResult]]:
        """One scheduling iteration (module docstring); returns (tag, result) of the requests that finished."""
        if self._use_graphs and not self._warm and not self.slots.occupied:
            self.warmup()
        with torch.inference_mode():
            self._admit()
            self._prefill()
            decoding = self.slots.decoding
            if decoding:
                self._run_round(decoding)
            finished = self._reap(final=not decoding)
            if self._window is not None and not self.slots.occupied:
                self._close_window()  # idle: the next request starts a new window (and a new choice)
            return finished

    def abort(self) -> list[Any]:
        """Drop every queued and in-flight request (after an engine error, say) and return their tags; the slots are
        free and parked again, the window closed without evidence."""
        tags = [queued.tag for queued in self.slots.queue]
        self.slots.queue.clear()
        for row in self.slots.occupied:
            tags.append(self.slots.release(row).tag)
        self.state.active.zero_()
        self.state.lengths.fill_(self.park)
        self._stale.clear()
        self._flags.clear()
        self._window = None
        self.state.reset_tallies()
        if self.suffix is not None:
            self.suffix.clear_statistics()
        return tags

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode requests; results come back in request order. On an error every request in the engine is dropped
        (abort) before it propagates, so the engine serves again afterwards."""
        for request in requests:  # refuse before anything is queued
            self._check_prompt(request)
        for index, request in enumerate(requests):
            self.submit(request, tag=("generate", index))
        results: dict[int, GenerationResult] = {}
        try:
            while len(results) < len(requests):
                for tag, result in self.step():
                    results[tag[1]] = result
        except BaseException:
            self.abort()
            raise
        return [results[index] for index in range(len(requests))]

    # ------------------------------------------------------------------ admission and prefill

    def _admit(self) -> None:
        """Queued requests take free slots: their rows are reset and parked until their prompt is prefilled."""
        if self.slots.static and not self.slots.occupied and self._window is not None:
            self._close_window()  # a static batch is its own window
        filled = self.slots.admit()
        if not filled:
            return
        state, device = self.state, self.device
        rows = torch.tensor(filled, dtype=torch.int64, device=device)
        requests = [self.slots.slots[i].request for i in filled]
        values = lambda items, dtype: torch.tensor(items, dtype=dtype, device=device)  # noqa: E731
        state.lengths[rows] = self.park
        state.active[rows] = False
        state.max_new_tokens[rows] = values([r.max_new_tokens for r in requests], torch.int64)
        state.temperature[rows] = values([float(r.temperature) for r in requests], torch.float32)
        state.top_p[rows] = values([float(r.top_p) for r in requests], torch.float32)
        state.seed[rows] = values([r.seed for r in requests], torch.int64)
        for counter in (state.generated, state.drafted, state.draft_steps, state.source_counts, state.target_forwards):
            counter[rows] = 0
        for row, request in zip(filled, requests):
            state.tokens[row, : len(request.input_ids)] = values(request.input_ids, torch.int64)
        if self.suffix is not None:
            state.proposer_state[self.suffix.name].reset(rows)
        self._stale.update(filled)

    def _prefill(self) -> None:
        """Prefill this step's prompt chunks (one target forward over the chunks' rows); rows whose prompt is
        complete emit their first token from the target and start decoding."""
        budget = 0 if self.slots.static else self.settings.prefill_chunk_tokens
        plan = self.slots.prefill_plan(budget)
        if not plan:
            return
        started = self.clock.start()
        self._prefill_chunks(plan)
        self.clock.stop("prefill", started)

    def _prefill_chunks(self, plan: list[PrefillChunk]) -> None:
        state, device = self.state, self.device
        n = len(plan)
        width = padded_width(max(c.end - c.start for c in plan), self.pad_tokens)
        # A captured prefill runs a batch bucket's rows: a padding row repeats the first row, writing at that row's
        # parking positions, where no prompt lives.
        size = self.prefill.rows_for(n, width)
        rows = torch.tensor([c.slot for c in plan] + [plan[0].slot] * (size - n), dtype=torch.int64, device=device)
        starts = torch.tensor([c.start for c in plan] + [self.park] * (size - n), dtype=torch.int64, device=device)
        # width padding continues each row's positions (it lands past the chunk, where later writes overwrite it)
        positions = (starts[:, None] + torch.arange(width, device=device)).clamp_max(self.settings.max_seq_len - 1)
        tokens = state.tokens[rows].gather(1, positions)
        hidden = self.prefill(rows, tokens, positions)[:n]  # [n, w, F]: H, or wider with a fused head
        rows, positions = rows[:n], positions[:n]
        if self._models.head is not None:
            features = state.proposer_state[self._models.head.name].features
            features[rows[:, None], positions] = hidden.to(features.dtype)
        for chunk in plan:
            self.slots.slots[chunk.slot].prefilled = chunk.end
        done = [i for i, chunk in enumerate(plan) if chunk.last]
        if done:
            self._first_tokens([plan[i] for i in done], hidden[done], positions[done])

    def _first_tokens(self, chunks: list[PrefillChunk], hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Emit each row's first token from the target's logits at its last prompt token, record it and start the
        row decoding."""
        state, device = self.state, self.device
        rows = torch.tensor([c.slot for c in chunks], dtype=torch.int64, device=device)
        prompt_lengths = torch.tensor([c.end for c in chunks], dtype=torch.int64, device=device)
        hidden = hidden[..., : self._models.hidden_size]  # a fused head's lower layers follow the last hidden state
        last = (prompt_lengths - 1 - positions[:, 0])[:, None, None].expand(-1, 1, hidden.shape[-1])
        logits = self._models.lm_head(hidden.gather(1, last)).float()  # [n, 1, V]
        probs = sampling.warp(logits, state.temperature[rows], state.top_p[rows])
        first = sampling.sample(probs, state.seed[rows], prompt_lengths[:, None], sampling.STREAM_RESIDUAL)  # [n, 1]
        topk = torch.log_softmax(logits, dim=-1).topk(self.settings.top_m, dim=-1)

        # record() works on every row with a validity mask: the new rows' first token is their only valid slot
        size = self.state.batch_size
        valid = torch.zeros((size, 1), dtype=torch.bool, device=device)
        valid[rows] = True

        def widen(values: torch.Tensor, fill) -> torch.Tensor:
            wide = torch.full((size, *values.shape[1:]), fill, dtype=values.dtype, device=device)
            return wide.index_copy_(0, rows, values)

        tokens = widen(first, 0)
        state.lengths[rows] = prompt_lengths - 1  # record() writes the token after `lengths`: position P
        state.record(
            tokens,
            valid,
            torch.full_like(tokens, KIND_BONUS),
            torch.full_like(tokens, NO_DRAFT_TOKEN),
            torch.full_like(tokens, SOURCE_NONE),
            widen(topk.indices, 0),
            widen(topk.values, 0.0),
        )
        state.generated[rows] = 1
        state.target_forwards[rows] = 1
        state.lengths[rows] = prompt_lengths
        state.current[rows] = first[:, 0]
        state.previous[rows] = state.tokens[rows].gather(1, (prompt_lengths - 1)[:, None])[:, 0]
        state.active[rows] = True
        finish_rows(self._models, state, tokens, valid)
        now = time.perf_counter()
        for chunk in chunks:
            slot = self.slots.slots[chunk.slot]
            slot.decoding, slot.first_token_at, slot.first_round = True, now, self._rounds

    # ------------------------------------------------------------------ rounds

    def _run_round(self, decoding: list[int]) -> None:
        bucket = self.slots.bucket(decoding)
        window = self._window_for(bucket)
        variant = window.variant
        self._follow_rows(variant, decoding)
        greedy_only = all(self.slots.slots[i].request.temperature == 0 for i in decoding)
        view = self._views[window.bucket]
        cuda = self.device.type == "cuda"
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        started = time.perf_counter()
        if self._use_graphs:
            key = (window.bucket, variant, greedy_only, window.shadow)
            assert self.graphs.captured(key), f"round graph {key} was not captured at warm-up"
            self.graphs.get(*key).replay()
        else:
            run_round(self._models, view, variant, greedy_only, window.shadow)
        if cuda:
            end.record()
            window.events.append((begin, end))
            self.clock.add("rounds", begin, end)
        else:
            seconds = time.perf_counter() - started
            window.host_seconds += seconds
            self.clock.add_seconds("rounds", seconds)
        window.rounds += 1
        self._rounds += 1
        self._previous_variant = variant
        stops = [i for i in decoding if self.slots.slots[i].request.stop]
        if stops:
            self._apply_stop_strings(stops)
        self._snapshot_active(window.bucket)  # after the stop check: a stop ends the row in this snapshot

    def _follow_rows(self, variant: Variant, decoding: list[int]) -> None:
        """Keep the model proposer's cache following the rows it drafts for: catch up the rows it has not followed
        (newcomers, rows other variants drafted for) before a round that uses it; after a round that does not,
        every decoding row is behind; the proposer says when rows it followed fell behind anyway (a draft LM after a
        hybrid round: its needs_catch_up)."""
        if self.model_proposer is None:
            return
        if not variant.uses_model:
            self._stale.update(decoding)
            return
        if self.model_proposer.needs_catch_up(self._previous_variant, variant):
            self._stale.update(decoding)
        self._sync_model(decoding)

    def _window_for(self, bucket: int) -> _Window:
        """The current window, or a new one (a new choice) when the bucket changed or the window is full. A static
        batch keeps its first bucket and its variant until it is done."""
        window = self._window
        if window is not None:
            if self.slots.static:
                return window
            if window.bucket == bucket and window.rounds < self.settings.auto.window_rounds:
                return window
            self._close_window()
        variant = self._choose(bucket)
        self._windows += 1
        # auto: every shadow_every-th window that drafts no suffix tokens scores shadow suffix proposals (a few
        # kernels per round), so the controller keeps measuring what suffix would gain
        shadow = self._can_shadow(variant) and (
            self._windows % self.settings.auto.shadow_every == 0
            or self.controller.suffix_rounds() < self.settings.auto.shadow_until
        )
        self._window = _Window(bucket, variant, shadow)
        return self._window

    def _sync_model(self, decoding: list[int]) -> None:
        """Catch the model proposer up on decoding rows it has not followed (one eager forward over their context)."""
        behind = [i for i in decoding if i in self._stale]
        if not behind:
            return
        self._stale.difference_update(behind)
        rows = torch.tensor(behind, device=self.device)
        lengths, active = torch.stack([self.state.lengths[rows], self.state.active[rows].long()]).tolist()  # one read
        behind = [(row, length) for row, length, running in zip(behind, lengths, active) if running]
        if not behind:  # finished rows (parked) need no catching up
            return
        started = self.clock.start()
        lengths = [length for _, length in behind]
        width = padded_width(max(lengths), self.pad_tokens)
        self.model_proposer.sync(self.state, [row for row, _ in behind], lengths, width)
        self.clock.stop("catch_up", started)

    def _snapshot_active(self, bucket: int) -> None:
        """Copy which rows are active after this round, to be read once the round is done (_reap)."""
        if self.device.type == "cuda":
            # a ring of three pinned buffers: at most two snapshots wait to be read (_reap keeps the newest)
            flags = self._pinned[self._rounds % len(self._pinned)][:bucket]
            flags.copy_(self.state.active[:bucket], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flags, event = self.state.active[:bucket].clone(), None
        self._flags.append((self._rounds - 1, flags, event))

    def _reap(self, final: bool) -> list[tuple[Any, GenerationResult]]:
        """Results of rows that finished, from the active snapshots of every round but the newest (all of them when
        no round runs next, on CPU, or while stop strings are checked): the GPU keeps working meanwhile."""
        keep = 0 if final or self.device.type != "cuda" or self._has_stops() else 1
        finished: set[int] = set()
        while len(self._flags) > keep:
            round_index, flags, event = self._flags.popleft()
            if event is not None:
                event.synchronize()
            for row, active in enumerate(flags.tolist()):
                slot = self.slots.slots[row]
                if slot is not None and slot.decoding and slot.first_round <= round_index and not active:
                    finished.add(row)
        return self._collect(sorted(finished)) if finished else []

    def _collect(self, rows: list[int]) -> list[tuple[Any, GenerationResult]]:
        """Results of finished rows; their slots are freed only once the results exist (an error while collecting
        leaves them in the engine, where abort() still finds them)."""
        now = time.perf_counter()
        slots = [self.slots.slots[row] for row in rows]
        times = [
            RowTimes(s.admitted_at - s.submitted_at, s.first_token_at - s.submitted_at, now - s.submitted_at)
            for s in slots
        ]
        requests = [s.request for s in slots]
        results = collect(
            self.state, rows, requests, self.tokenizer, self._eos_set, self.max_k, self.draft_version, times
        )
        if self.suffix is not None:
            self.suffix_cache.add([r.token_ids for r in results], [s.request.input_ids for s in slots])
        for row in rows:
            self.slots.release(row)
        self._stale.difference_update(rows)
        return [(slot.tag, result) for slot, result in zip(slots, results)]

    def _has_stops(self) -> bool:
        return any(self.slots.slots[i].request.stop for i in self.slots.decoding)

    def _apply_stop_strings(self, rows: list[int]) -> None:
        generated, active = self.state.generated.tolist(), self.state.active.tolist()
        for row in rows:
            request = self.slots.slots[row].request
            if not active[row]:
                continue
            text = self.tokenizer.decode(
                self.state.out_tokens[row, : generated[row]].tolist(), skip_special_tokens=True
            )
            if any(stop in text for stop in request.stop):
                self.state.active[row] = False
                self.state.lengths[row] = self.park

    # ------------------------------------------------------------------ the controller

    def _choose(self, bucket: int) -> Variant:
        if self.settings.proposer != "auto":
            variant = self.variants[0]
        else:
            variant = self.controller.choose(bucket, draft_version=self.draft_version)
            if self._last_choice.get(bucket) != variant:
                self._log_switch(bucket, variant)
            self._last_choice[bucket] = variant
        self._share_expectations(variant.k)
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

    def _share_expectations(self, k: int) -> None:
        """What the hybrid's per-row choice compares in this window's rounds of k drafts, from the controller's
        evidence (written between rounds)."""
        hybrid = self._models.hybrid
        if hybrid is None:
            return
        k = max(k, 1)  # both at the window's k, as the controller's estimate of the hybrid assumes
        expected = self.controller.suffix_expected_accepted(self.settings.suffix.max_match, k)
        self.suffix.expected_accepted.copy_(torch.from_numpy(expected))
        hybrid.model_expected_accepted.fill_(self.controller.model_expected_accepted(self.draft_version, k))

    def _close_window(self) -> None:
        """Hand the window's evidence to the controller (one host read of the tallies) and start afresh."""
        window, self._window = self._window, None
        state = self.state
        if self.controller is None:  # nothing reads the tallies: reset them on the device, no host read
            self.clock.totals()
            state.reset_tallies()
            if self.suffix is not None:
                self.suffix.clear_statistics()
            return
        # copies (on a CPU, .cpu() would return the buffers themselves, zeroed below); the first read also waits for
        # the window's rounds, whose events are then readable
        tally = state.tally.to("cpu", copy=True)
        self.clock.totals()  # folds the finished spans in, so the clock's pending events stay few
        positions = state.position_tally.to("cpu", copy=True)
        state.reset_tallies()
        hist = capped = exposure = None
        if self.suffix is not None:
            hist, capped, exposure = self.suffix.take_statistics()
        if window is None or window.rounds == 0:
            return
        if window.events:
            seconds = sum(begin.elapsed_time(end) for begin, end in window.events) / 1e3
        else:
            seconds = window.host_seconds
        model_source = self.model_proposer.source if self.model_proposer is not None else SOURCE_DRAFT
        self.controller.observe(
            BatchObservation(
                window.bucket,
                window.variant,
                window.rounds,
                None if window.shadow else seconds,  # shadow work is not the variant's cost
                self.draft_version,
                model_positions=positions[model_source].numpy(),
                suffix_hist=hist,
                suffix_capped=capped,
                suffix_exposure=exposure,
                tokens=int(tally[TALLY_TOKENS]),
                row_rounds=int(tally[TALLY_ROW_ROUNDS]),
            )
        )

    def _can_shadow(self, variant: Variant) -> bool:
        return self.settings.proposer == "auto" and self.suffix is not None and not variant.uses_suffix

    @staticmethod
    def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        ids = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return torch.tensor(sorted(set(ids)) or [-1], dtype=torch.int64, device=model.device)


def _model_step_cost_ratio(draft, target: PreTrainedModel) -> float:
    """One model step's cost / a target forward, by parameters read (the controller's estimate before it measures):
    a draft LM's own parameters; a head's plus the LM head rows every head step applies."""
    if draft is None:
        return 0.0
    target_parameters = sum(p.numel() for p in target.parameters())
    step = sum(p.numel() for p in draft.parameters())
    if isinstance(draft, HeadDraft):  # its draft vocabulary's rows of the target's LM head (all rows without one)
        lm_head = target.get_output_embeddings().weight
        vocab = draft.head.draft_vocab
        step += lm_head.numel() if vocab is None else len(vocab) * lm_head.shape[1]
    return step / target_parameters
