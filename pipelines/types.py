"""Data handed between the engine, storage and the daemon.

Terms (defined once, used everywhere):
- *draft token*: a token proposed by the draft model.
- *accepted token*: a draft token the verifier kept.
- *recovered token*: the token the target emits at the first rejected position (greedy: the target's argmax;
  sampling: a draw from the residual distribution norm(max(0, p - q))).
- *bonus token*: the token the target emits after the last verified position when every draft token of the
  step was accepted (and every token of target-only decoding, which is the k = 0 case).
- *target forward*: one verification pass of the target (the prefill pass counts: it yields the first token).
- *mean accepted length* (AvgLen): emitted tokens / target forwards, bonus tokens included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Values of RequestFeedback.kinds, one per emitted position.
KIND_ACCEPTED = 0
KIND_RECOVERED = 1
KIND_BONUS = 2
NO_DRAFT_TOKEN = -1  # draft_tokens value where the draft proposed nothing (bonus positions)

# Values of RequestFeedback.draft_sources: who proposed the draft token at each emitted position.
SOURCE_NONE = 0  # nothing was proposed there (the prefill's token, bonus tokens, target-only rounds)
SOURCE_DRAFT = 1  # the draft LM (proposer `draft`)
SOURCE_SUFFIX = 2  # the model-free suffix proposer
SOURCE_HEAD = 3  # an EAGLE-style head over the target's hidden states
SOURCE_NAMES = {SOURCE_NONE: "none", SOURCE_DRAFT: "draft", SOURCE_SUFFIX: "suffix", SOURCE_HEAD: "head"}


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to decode. `input_ids` is already tokenized (chat template applied by the caller)."""

    id: str
    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise ValueError(f"request {self.id!r}: input_ids is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"request {self.id!r}: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"request {self.id!r}: top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RequestFeedback:
    """Verification feedback for every emitted position of one request, captured at no extra forward pass.

    Arrays are aligned: index i is the i-th emitted token. Shapes in comments; n = emitted tokens, m = top-m.
    """

    prompt_ids: np.ndarray  # [P] int32
    token_ids: np.ndarray  # [n] int32, the emitted tokens (the target's own output: decoding is lossless)
    kinds: np.ndarray  # [n] uint8, KIND_ACCEPTED | KIND_RECOVERED | KIND_BONUS
    draft_tokens: np.ndarray  # [n] int32, the draft's proposal at that position or NO_DRAFT_TOKEN
    target_topk_ids: np.ndarray  # [n, m] int32, the target's top-m tokens at that position (temperature 1)
    target_topk_logprobs: np.ndarray  # [n, m] float16, their log-probabilities
    draft_version: str
    # [n] uint8 SOURCE_*: who drafted each position. None for feedback recorded before sources were kept, when
    # every draft token came from the draft model.
    draft_sources: np.ndarray | None = None


@dataclass
class RequestCounters:
    """Raw counters; ratios are derived when read."""

    draft_steps: int = 0  # verification steps in which the draft proposed tokens
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    target_forwards: int = 0  # prefill included
    emitted: int = 0  # tokens emitted (accepted + recovered + bonus)
    accepted_at_position: list[int] = field(default_factory=list)  # [k] accepted count per draft position
    # Per proposer that drafted for this request (SOURCE_NAMES): {"rounds": .., "drafted": .., "accepted": ..}.
    by_proposer: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def add(self, other: RequestCounters) -> None:
        self.draft_steps += other.draft_steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_forwards += other.target_forwards
        self.emitted += other.emitted
        width = max(len(self.accepted_at_position), len(other.accepted_at_position))
        merged = [0] * width
        for counts in (self.accepted_at_position, other.accepted_at_position):
            for i, c in enumerate(counts):
                merged[i] += c
        self.accepted_at_position = merged
        for name, counts in other.by_proposer.items():
            mine = self.by_proposer.setdefault(name, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value


@dataclass
class GenerationResult:
    id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "eos" | "stop"
    counters: RequestCounters
    feedback: RequestFeedback
    seconds: float  # from submission to the engine until the last round
    queued_seconds: float = 0.0  # from submission until a slot took it
    first_token_seconds: float = 0.0  # from submission until its first token (the prefill's)
