"""Settings owned by the tensor layer, free of torch imports: the daemon's config embeds them
(`engine:` is EngineSettings, `learning.learner:` is LearnerSettings) and validates config.yaml against them
without loading torch.

    EngineSettings      the engine: proposer, k, batch and cache sizes, graphs, compile  (pipelines.engine)
    SuffixSettings      the suffix proposer's stream cache and matching                    (pipelines.proposers.suffix)
    ControllerSettings  the goodput controller of proposer `auto`                          (pipelines.controller)
    LearnerSettings     one learner of the online-learning rounds                          (pipelines.learners)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROPOSER_NAMES = ("none", "draft", "head", "suffix", "hybrid", "auto")
LEARNER_NAMES = ("osd", "online", "optimistic", "ensemble")


class SuffixSettings(BaseModel):
    """engine.suffix in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_tokens: int = Field(4_194_304, ge=1_024, le=1 << 31)  # stream ring: earlier completions' tokens
    table_buckets: int = Field(262_144, ge=1_024, le=1 << 28)  # hashed bigram buckets, a power of two
    ways: int = Field(8, ge=1, le=64)  # most recent positions kept per bucket
    max_match: int = Field(16, ge=2, le=64)  # longest match measured, in tokens
    min_match: int = Field(2, ge=1, le=64)  # shorter matches draft nothing
    spec_factor: float = Field(1.0, gt=0, le=64)  # a row drafts at most spec_factor * match length tokens
    compile: bool = True  # torch.compile the matching on CUDA (a few fused kernels instead of ~60)

    @model_validator(mode="after")
    def _consistent(self) -> SuffixSettings:
        if self.table_buckets & (self.table_buckets - 1):
            raise ValueError(f"table_buckets must be a power of two, got {self.table_buckets}")
        if self.min_match > self.max_match:
            raise ValueError(f"min_match ({self.min_match}) must not exceed max_match ({self.max_match})")
        return self


class ControllerSettings(BaseModel):
    """engine.auto in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k_choices: tuple[int, ...] = (2, 3, 4, 8)  # k tried for each proposer (each at most engine.max_k)
    margin: float = Field(0.02, ge=0, le=1)  # required goodput gain over target-only
    decay: float = Field(0.95, gt=0, le=1)  # weight of old evidence after each window (bench.controller_sim)
    prior_alpha: float = Field(0.5, ge=0, lt=1)  # the model's pass rate at chain position 1 before evidence
    prior_positions: float = Field(32.0, ge=0)  # tested positions the prior is worth, at each position
    explore_every: int = Field(64, ge=0)  # batches per bucket between explorations; 0 = never explore
    profile_rounds: int = Field(5, ge=1, le=100)  # timed replays per (bucket, variant) at warm-up (CUDA)
    shadow_every: int = Field(8, ge=1)  # every n-th batch without suffix drafts scores shadow suffix proposals
    shadow_until: int = Field(256, ge=0)  # ...and every such batch until this many row-rounds were scored
    window_rounds: int = Field(16, ge=1, le=4096)  # continuous batching: rounds between two choices

    @field_validator("k_choices")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError("k_choices must be a non-empty list of k >= 1")
        return tuple(sorted(set(value)))


class EngineSettings(BaseModel):
    """The engine section of config.yaml (daemon.config embeds it as `engine`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    proposer: Literal[PROPOSER_NAMES] = "auto"
    k: int = Field(5, ge=0, le=16)  # draft tokens per round of a fixed proposer; 0 = target-only
    max_batch_size: int = Field(8, ge=1, le=1024)  # requests decoded together (batch buckets up to this)
    max_seq_len: int = Field(2048, ge=16, le=131_072)  # KV cache slots per row: prompt + generated + k
    top_m: int = Field(16, ge=1, le=65_536)  # target log-probabilities kept per emitted position
    cuda_graphs: bool = True  # capture each round as a CUDA graph (CUDA only)
    compile: bool = False  # torch.compile the model forwards before capture (CUDA only)
    # continuous: a finished row's slot is refilled at the next round boundary; static: a batch is admitted only
    # when every slot is free and decodes until its last row finishes (the comparison baseline)
    scheduling: Literal["continuous", "static"] = "continuous"
    # prompt tokens prefilled per engine step (continuous batching): a long prompt is prefilled in chunks between
    # decode rounds, so running rows are not stalled for a whole long prefill; 0 = whole prompts at once
    prefill_chunk_tokens: int = Field(512, ge=0)
    # variable-width forwards (prefill chunks, a model proposer catching rows up) are right-padded to a multiple of
    # this many tokens, so kernels with per-shape set-up costs (attention plans, GEMM heuristics) see a few dozen
    # shapes instead of one per prompt length (warm-up runs a one-row prefill at each padded chunk width, or captures
    # graphs, below); None = 64 on CUDA, 1 (no padding) elsewhere
    pad_tokens: int | None = Field(None, ge=1)
    # CUDA: every (batch bucket, padded width) prefill shape of at most this many tokens is captured as a CUDA graph
    # at warm-up and prefills run padded to it (an eager prefill is launch-bound: one newcomer cost about what eight
    # did); wider ones run eagerly on their own rows; 0 = no prefill graphs
    prefill_graph_tokens: int = Field(8192, ge=0)
    suffix: SuffixSettings = SuffixSettings()
    auto: ControllerSettings = ControllerSettings()

    @model_validator(mode="after")
    def _room_for_a_round(self) -> EngineSettings:
        most = max(self.k, *self.auto.k_choices) if self.proposer == "auto" else self.k
        if self.max_seq_len < most + 8:
            raise ValueError(f"max_seq_len {self.max_seq_len} is too small for k = {most}")
        return self


class LearnerSettings(BaseModel):
    """Settings of one learner (config.yaml `learning.learner`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Update rule: "osd" (KL at rejected positions), "online" (online gradient descent on all positions),
    # "optimistic" (optimistic OGD or persisted momentum), "ensemble" (Hedge over learning rates).
    name: Literal[LEARNER_NAMES] = "online"
    # Step size of the optimizer. For the real 0.5B draft with "layers" trainable and float32 masters, one round
    # of 12 Shakespeare requests (float32, CPU, 2026-11-29): AdamW 2e-5 over-stepped (held-out KL
    # up), 5e-6 gave +20% held-out AvgLen, 1e-6 +17%; SGD with momentum 0.9 needs ~1e-2 (+17%; 1e-1 diverged).
    # The tiny random-init test drafts need ~1e-2 with AdamW.
    lr: float = Field(5e-6, gt=0)
    epochs: int = Field(2, ge=1)  # passes over the round's feedback
    # Temperature the target's stored top-m is sharpened to before the KL (pipelines/learners/distill.py): 1 =
    # match the target's distribution (sampled serving); toward 0 = match its argmax (greedy serving).
    target_temperature: float = Field(1.0, gt=0, le=10)
    batch_size: int = Field(8, ge=1)  # requests per optimizer step
    micro_batch_tokens: int = Field(8192, ge=1)  # padded tokens per forward/backward; gradients accumulate
    max_grad_norm: float | None = Field(1.0, gt=0)  # global gradient-norm clip; None disables clipping
    # Which parameters train: see the module docstring. "layers" was the stable choice on the real 0.5B draft.
    trainable: Literal["all", "layers", "last_layers"] = "layers"
    num_last_layers: int = Field(4, ge=1)  # blocks trained with trainable = "last_layers"
    optimizer: Literal["adamw", "sgd"] = "adamw"  # base optimizer of osd, online, ensemble and optimistic "ogd"
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum (optimizer "sgd" and optimistic "momentum")
    weight_decay: float = Field(0.0, ge=0)  # decoupled for AdamW and optimistic "ogd"; L2 for torch SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    # optimistic: "ogd" = x <- x - lr (2 d_t - d_{t-1}), d = the gradient (sgd) or Adam's normalised step (adamw);
    # "momentum" = SGD with momentum whose buffer persists across rounds (the paper's code).
    optimistic_variant: Literal["ogd", "momentum"] = "ogd"
    ensemble_size: int = Field(3, ge=1)  # ensemble members
    ensemble_lr_ratio: float = Field(2.0, ge=1)  # member i's lr = lr * ratio ** (i - (size - 1) / 2)
    # Hedge: w_i ∝ exp(-hedge_eta * cumulative per-token KL of member i). Member losses differ by ~0.01-0.1 nats
    # per round, so eta ~ 5 separates members within a few rounds without betting on one round's noise.
    hedge_eta: float = Field(5.0, ge=0)
    # Heads only: weight of the chain term, the bootstrap's loss (pipelines/heads/losses.py: two drafting steps,
    # the second reading the head's own output as live drafting does, plus feature regression, over the draft
    # vocabulary, against the target's distribution recomputed from the round's features) over the answers of a
    # step's requests, added to the step-1 KL above whatever the learner (osd too: it trains every answer position,
    # not only rejected ones). It ignores target_temperature and trains step 1 a second time. 0 = the step-1 KL
    # alone. On an H100 the step-1 KL alone raised a strong head's step-1 acceptance while its chain AvgLen fell
    # (BENCHMARKS.md section 8); on the tests' tiny models (bench/head_chain_tiny.py, 3 seeds) weight 1 did 14-22
    # points of mean AvgLen better than the step-1 KL alone in every seed and lr. Not yet measured on a GPU.
    head_chain_weight: float = Field(1.0, ge=0, le=100)
    # What a fit does when handed the same base_version as last time (its candidate was rejected): see above.
    after_rejection: Literal["rebase", "continue"] = "rebase"
    check_weights_every: int = Field(8, ge=1)  # optimizer steps between finiteness checks of the masters
    seed: int = 0  # shuffling of the round's requests between epochs
