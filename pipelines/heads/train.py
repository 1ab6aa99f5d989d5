"""Bootstrap training of a fresh head against its target, before it serves (`onlinespec draft init --kind head`).

    sequences  token lists: corpus text, and the target's own greedy outputs for prompts (self-distillation: the
               features the head reads when serving are those of the target's own text), cut to max_length
    batches    pieces of similar length grouped up to batch_tokens padded tokens (no packing across documents: a
               packed row would need a block-diagonal mask in the target's pass and the head's), in a seeded random
               order, a new one per epoch (the groups stay the same; only their order changes)
    step       the target's features (no grad), the head's loss (pipelines.heads.losses: KL to the target's
               distribution + feature regression, optional unroll), clipped AdamW on float32 weights
    features   kept after a batch's first pass, up to feature_cache_gib (default: half the free GPU memory, a
               quarter of the available RAM on a CPU, never more than the run's features take; nothing when no
               batch comes round twice), so later epochs skip the target's pass: with the loss over a 32k draft
               vocabulary that pass was about two thirds of a step on the H100 (~50k tokens/s in the first epoch,
               ~156k after it; BENCHMARKS.md section 8)
    schedule   linear warm-up then cosine decay to min_lr_ratio, over progress = the larger of tokens done / token
               budget and seconds spent / max_seconds: whichever limit binds, the learning rate ends decayed
    stop       at the token budget (tokens, or epochs x corpus tokens) or at max_seconds, between two steps

Precision: the head's weights are float32 masters whatever the target's dtype; with a bfloat16 target the forward
runs under autocast to bfloat16 (the target's embeddings and features are bfloat16 anyway), so the optimizer's small
steps are not rounded away (see pipelines/learners/base.py for the measurement). The head comes back in the target's
dtype, as it serves.

Speed: nothing is read back to the host per step except the batch sizes it already knows; the losses stay on the
device and are read every `progress_every_s` seconds, for the progress line and the finiteness check.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from pipelines.heads.losses import HeadLossSettings, head_loss
from pipelines.host_memory import available_ram_bytes
from pipelines.learners.base import NonFiniteError, all_finite


@dataclass(frozen=True)
class BootstrapSettings:
    tokens: int | None = None  # token budget (real tokens, not padding); None: epochs decide
    epochs: float | None = None  # passes over the data when no token budget is given (default 1)
    max_seconds: float | None = None  # training time limit: stop cleanly between two steps
    max_length: int = 2048  # tokens per training sequence; longer documents are cut into pieces
    batch_tokens: int = 16384  # padded tokens (rows x longest) per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: float = 0.02  # fraction of the progress spent warming up linearly
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    progress_every_s: float = 5.0
    feature_cache_gib: float | None = None  # target features kept across epochs; None: auto (module docstring)
    loss: HeadLossSettings = field(default_factory=HeadLossSettings)

    def __post_init__(self) -> None:
        if self.tokens is not None and self.epochs is not None:
            raise ValueError("give a token budget or a number of epochs, not both")
        if (self.tokens is not None and self.tokens < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError("tokens and epochs must be positive")
        if self.feature_cache_gib is not None and not 0 <= self.feature_cache_gib < math.inf:
            raise ValueError(f"feature_cache_gib must be a finite number >= 0, got {self.feature_cache_gib}")
        if self.max_length < 2 or self.batch_tokens < self.max_length:
            raise ValueError(f"need 2 <= max_length <= batch_tokens, got {self.max_length} and {self.batch_tokens}")


@dataclass
class TrainProgress:
    """What the progress line shows; losses are means since the previous line."""

    steps: int
    tokens: int
    budget: int
    seconds: float
    progress: float  # 0..1, what the schedule and the ETA use
    tokens_per_s: float
    lr: float
    loss: float
    kl: float
    top1: float  # step 1: fraction of positions where the head's argmax is the target's

    @property
    def eta_s(self) -> float:
        return self.seconds * (1 - self.progress) / self.progress if self.progress > 0 else float("nan")


@dataclass
class TrainReport:
    steps: int
    tokens: int  # real tokens trained on (padding excluded)
    seconds: float
    stopped_by: str  # "budget" (tokens or epochs) | "max_seconds"
    sequences: int
    pieces: int
    corpus_tokens: int
    budget: int
    loss_first: float | None
    loss_last: float | None
    top1_last: float | None
    batches: int  # optimizer steps per epoch
    cached_batches: int  # batches whose target features were kept across epochs
    feature_cache_bytes: int  # what they took
    feature_cache_limit_bytes: int  # what they were allowed (the setting, or the automatic limit)
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


def cut(sequences: Sequence[Sequence[int]], max_length: int) -> list[list[int]]:
    """Each sequence in pieces of at most max_length tokens; pieces of fewer than 2 tokens teach nothing."""
    pieces = [list(s[start : start + max_length]) for s in sequences for start in range(0, len(s), max_length)]
    return [piece for piece in pieces if len(piece) >= 2]


def token_batches(pieces: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    """Pieces grouped by similar length so that rows x longest <= batch_tokens, longest first."""
    ordered = sorted(pieces, key=len, reverse=True)
    batches, current = [], []
    for piece in ordered:
        if current and (len(current) + 1) * len(current[0]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(piece)
    if current:
        batches.append(current)
    return batches


class FeatureCache:
    """The target's features of each batch after its first pass, kept on the device while they fit in
    `limit_bytes`. Batches are the same groups every epoch, so a kept batch never needs the target again."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._features: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def features(self, index: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if index in self._features:
            return self._features[index]
        features = compute()
        size = features.numel() * features.element_size()
        if self.used_bytes + size <= self.limit_bytes:
            self._features[index] = features
            self.used_bytes += size
        return features


def feature_cache_limit(settings: BootstrapSettings, device: torch.device, needed_bytes: int, repeats: bool) -> int:
    """Bytes the feature cache may hold: nothing when no batch comes round twice (a budget of one epoch or less),
    else feature_cache_gib, by default half the free GPU memory or a quarter of the available RAM; never more than
    `needed_bytes`, what every batch's features take."""
    if not repeats:
        return 0
    if settings.feature_cache_gib is not None:
        limit = int(settings.feature_cache_gib * 2**30)
    elif device.type == "cuda":
        torch.cuda.empty_cache()  # blocks the answering engine left behind count as free
        limit = torch.cuda.mem_get_info(device)[0] // 2
    else:
        limit = (available_ram_bytes() or 0) // 4
    return min(limit, needed_bytes)


def features_bytes(batches: list[list[list[int]]], feature_size: int, dtype: torch.dtype) -> int:
    """What the target's features of every batch take, padded as the step pads them (rows x longest)."""
    per_token = feature_size * dtype.itemsize
    return sum(len(batch) * max(map(len, batch)) for batch in batches) * per_token


def learning_rate(settings: BootstrapSettings, progress: float) -> float:
    if progress < settings.warmup:
        return settings.lr * max(progress / settings.warmup, 0.01)
    span = (progress - settings.warmup) / max(1 - settings.warmup, 1e-9)
    cosine = 0.5 * (1 + math.cos(math.pi * min(span, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def train_head(
    draft,  # pipelines.heads.model.HeadDraft, trained in place
    sequences: Sequence[Sequence[int]],
    settings: BootstrapSettings,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainReport:
    """Train the head on the sequences (module docstring); returns what it did. Raises NonFiniteError."""
    target = draft.target
    device = next(target.parameters()).device
    serving_dtype = next(target.parameters()).dtype
    pieces = cut(sequences, settings.max_length)
    if not pieces:
        raise ValueError("no training sequence of at least 2 tokens")
    corpus_tokens = sum(len(p) for p in pieces)
    budget = settings.tokens or math.ceil((settings.epochs or 1.0) * corpus_tokens)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)

    draft.head.float().train().requires_grad_(True)
    params = list(draft.head.parameters())
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay, fused=fused
    )
    autocast = torch.autocast(device.type, dtype=serving_dtype) if serving_dtype != torch.float32 else nullcontext()
    batches = token_batches(pieces, settings.batch_tokens)
    needed = features_bytes(batches, draft.config.feature_size, serving_dtype)
    cache = FeatureCache(feature_cache_limit(settings, device, needed, repeats=budget > corpus_tokens))
    meter = _Meter(settings, budget, device, on_progress)
    stopped_by = None
    try:
        while stopped_by is None:  # one epoch per pass, each in a new order
            order = list(range(len(batches)))
            rng.shuffle(order)
            for index in order:
                stopped_by = meter.stop_reason()
                if stopped_by is not None:
                    break
                lr = learning_rate(settings, meter.progress())
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tokens, lengths = _to_device(batches[index], device)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    features = cache.features(index, partial(_target_features, draft, tokens))
                    loss = head_loss(draft, tokens, lengths, settings.loss, features=features, backward=True)
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm, foreach=True)
                optimizer.step()
                meter.add(loss, sum(lengths), lr)
        meter.flush()  # the last losses, and the finiteness check of the whole run
        if not all_finite(params):
            raise NonFiniteError("the head's weights are not finite after training")
    finally:
        draft.head.to(serving_dtype).eval().requires_grad_(False)
        for p in params:
            p.grad = None
    return TrainReport(
        steps=meter.steps,
        tokens=meter.tokens,
        seconds=meter.elapsed(),
        stopped_by=stopped_by,
        sequences=len(sequences),
        pieces=len(pieces),
        corpus_tokens=corpus_tokens,
        budget=budget,
        loss_first=meter.first_loss,
        loss_last=meter.last_loss,
        top1_last=meter.last_top1,
        batches=len(batches),
        cached_batches=len(cache),
        feature_cache_bytes=cache.used_bytes,
        feature_cache_limit_bytes=cache.limit_bytes,
        settings=asdict(settings),
    )


def _target_features(draft, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return draft.target_features(tokens)


def _to_device(batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    lengths = [len(piece) for piece in batch]
    tokens = torch.zeros(len(batch), max(lengths), dtype=torch.int64)
    for row, piece in enumerate(batch):
        tokens[row, : len(piece)] = torch.tensor(piece, dtype=torch.int64)
    if device.type == "cuda":
        tokens = tokens.pin_memory()
    return tokens.to(device, non_blocking=True), lengths


class _Meter:
    """Counts on the host, sums on the device; reads the device only when a progress line is due."""

    def __init__(self, settings: BootstrapSettings, budget: int, device, on_progress):
        self.settings = settings
        self.budget = budget
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.steps = self.tokens = 0
        self._sums = torch.zeros(3, device=device)  # objective x positions, kl, top1 (step 1)
        self._positions = 0
        self._tokens_at_line, self._time_at_line = 0, self.started
        self._lr = settings.lr
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_top1: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> float:
        done = self.tokens / self.budget
        if self.settings.max_seconds:
            done = max(done, self.elapsed() / self.settings.max_seconds)
        return min(done, 1.0)

    def stop_reason(self) -> str | None:
        if self.tokens >= self.budget:
            return "budget"
        if self.settings.max_seconds is not None and self.elapsed() >= self.settings.max_seconds:
            return "max_seconds"
        return None

    def add(self, loss, tokens: int, lr: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self._lr = lr
        first = loss.positions[0]
        self._sums += torch.stack([loss.objective * first, loss.kl[0], loss.top1[0]])
        self._positions += first
        if time.monotonic() - self._time_at_line >= self.settings.progress_every_s:
            self.flush()

    def flush(self) -> None:
        """Read the sums (a host sync), check them, report a progress line."""
        if not self._positions:
            return
        objective, kl, top1 = (float(x) / self._positions for x in self._sums.tolist())
        if not math.isfinite(objective):
            raise NonFiniteError(f"head training loss is {objective} after step {self.steps}")
        self.first_loss = objective if self.first_loss is None else self.first_loss
        self.last_loss, self.last_top1 = objective, top1
        now = time.monotonic()
        rate = (self.tokens - self._tokens_at_line) / max(now - self._time_at_line, 1e-9)
        self._sums.zero_()
        self._positions = 0
        self._tokens_at_line, self._time_at_line = self.tokens, now
        if self.on_progress is not None:
            progress = TrainProgress(
                steps=self.steps,
                tokens=self.tokens,
                budget=self.budget,
                seconds=now - self.started,
                progress=self.progress(),
                tokens_per_s=rate,
                lr=self._lr,
                loss=objective,
                kl=kl,
                top1=top1,
            )
            self.on_progress(progress)


def target_outputs(
    target,
    tokenizer,
    requests: Sequence,
    *,
    batch_size: int,
    top_m: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list:
    """The target's own outputs for `requests` (GenerationResult, with feedback), decoded target-only by the
    engine in batches: what the head will read when it serves, and what its held-out replay is measured on."""
    from pipelines.engine import EngineSettings, SpeculativeEngine

    if not requests:
        return []
    longest = max(len(r.input_ids) + r.max_new_tokens for r in requests)
    settings = EngineSettings(proposer="none", max_batch_size=batch_size, max_seq_len=max(longest + 8, 16), top_m=top_m)
    engine = SpeculativeEngine(target, None, tokenizer, settings)
    results = []
    for start in range(0, len(requests), batch_size):
        results.extend(engine.generate(list(requests[start : start + batch_size])))
        if on_batch is not None:
            on_batch(len(results))
    return results
