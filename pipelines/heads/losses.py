"""The head's training loss on teacher-forced sequences: distillation from the target plus EAGLE's feature regression,
optionally over a few unrolled drafting steps ("training-time test", as in EAGLE-3 / HASS).

Terms as in pipelines.heads.model: f_p is the target's feature at position p, g_p the head's output for inputs
(embed(t_{p+1}), f_p), which predicts f_{p+1}; p_q = softmax(lm_head(f_q)) is the target's full next-token
distribution at q (the token t_{q+1}). For a sequence t_0..t_{L-1}:

    step 1   g1_p = head(embed(t_{p+1}), f_p) at position p                    p = 0 .. L-2, target q = p + 1
    step s   gs_p = head(embed(t_{p+s}), g(s-1)_p) at position p + s - 1       target q = p + s <= L - 1
    loss_s   mean over its positions of  KL(p_q || softmax(lm_head(gs_p))) + regression_weight * smooth_l1(gs_p, f_q)
    loss     sum_s decay^(s-1) loss_s / sum_s decay^(s-1)

With `draft_vocab_only` and a head that has a reduced draft vocabulary, both distributions are taken over that
vocabulary's LM-head rows only: p is the target's distribution renormalised over the tokens the head can propose,
q the head's as it drafts (pipelines.heads.model.HeadDraft.draft_logits). That is what serving asks of the head
(its argmax there is the target's whenever the target's is proposable), and it cuts the LM-head products and the
[chunk, V] softmax work by V / V' (4.6x for 32k of Qwen's 152k), the bulk of a step after the target's pass.
top1 then counts agreement within the draft vocabulary.

Step s >= 2 reads the head's own output in place of the target's feature, as live drafting does
(pipelines.heads.drafting.draft_chain): there step j's query at position L + j - 2 sees the cache's true entries at
positions <= L - 1 (the catch-up) and the chain's own entries after that. Here the chain started at p sees the TRUE
step-1 keys of positions <= p and the keys of its own steps 2..s only: an UnrollCache holds the step-1 keys and
values and each step's after them, and an explicit mask [causal | I | ... | I] says which a query sees.
Tokens stay teacher-forced (t_{p+s}, not the head's own guess): the chain is the one that matters for acceptance,
the one whose earlier proposals were right.

Memory. lm_head over every position at once would be [B, T, V] float32: 4.9 GB for 8k positions of a 150k
vocabulary, twice (target and head). The loss is taken over chunks of `chunk_positions` positions; with
`backward` each chunk's gradient is taken at once into a detached copy of the head's outputs, and one backward
through the head follows (the chunked cross-entropy trick): [chunk, V] blocks only, and lm_head runs once forward
and once backward per chunk, where activation checkpointing would run it twice forward. Nothing is read back to the
host: sums come back as tensors, and the target's pass (pipelines.heads.model.target_features) gets an explicit
causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadLossSettings:
    regression_weight: float = 0.1  # smooth_l1(g, f) next to the KL (EAGLE: 1.0 against a 0.1-weighted CE)
    unroll: int = 1  # drafting steps trained per position; 1 = step 1 only (no training-time test)
    unroll_decay: float = 0.8  # weight of step s is decay^(s-1): later steps matter less (each needs the earlier)
    chunk_positions: int = 1024  # positions per [chunk, V] logits block
    draft_vocab_only: bool = False  # p and q over the head's draft vocabulary, when it has one (module docstring)

    def __post_init__(self) -> None:
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions must be >= 1, got {self.chunk_positions}")
        if self.regression_weight < 0 or not 0 < self.unroll_decay <= 1:
            raise ValueError("regression_weight must be >= 0 and unroll_decay in (0, 1]")

    def step_weights(self) -> list[float]:
        raw = [self.unroll_decay**s for s in range(self.unroll)]
        return [w / sum(raw) for w in raw]


@dataclass
class HeadLoss:
    """Sums per unrolled step (tensors on the device, not synchronised) and the host-side position counts."""

    objective: torch.Tensor  # scalar: the weighted mean loss (detached)
    kl: torch.Tensor  # [unroll] summed KL
    regression: torch.Tensor  # [unroll] summed smooth_l1
    top1: torch.Tensor  # [unroll] positions where the head's argmax equals the target's
    positions: list[int]  # [unroll] positions each step was scored on


class UnrollCache:
    """Keys and values of every unrolled step so far, concatenated along the key axis: step 1's at columns
    0..T-1, step s's at (s-1)T..sT-1. It implements the one method the decoder layers call on a cache."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


def unroll_mask(width: int, step: int, device) -> torch.Tensor:
    """[1, 1, T, step * T] bool: chain p sees step-1 keys at positions <= p and its own keys of steps 2..step."""
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    own = torch.eye(width, dtype=torch.bool, device=device)
    return torch.cat([causal] + [own] * (step - 1), dim=1)[None, None]


def unrolled_outputs(draft, tokens: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """[g1, .., g_steps], each [B, T - 1, H]: gs[:, p] is step s of the chain started at position p (inputs
    embed(t_{p+s}) and g(s-1)_p at position p + s - 1). Entries whose token t_{p+s} is past the row's end are
    computed from padding and must be ignored."""
    width = tokens.shape[1] - 1
    positions = torch.arange(width, device=tokens.device).expand(tokens.shape[0], -1)
    if steps == 1:
        return [draft(tokens[:, 1:], features[:, :-1], positions)]
    cache = UnrollCache()
    outputs = [draft(tokens[:, 1:], features[:, :-1], positions, cache, unroll_mask(width, 1, tokens.device))]
    for step in range(2, steps + 1):
        shifted = torch.nn.functional.pad(tokens[:, step:], (0, step - 1))  # t_{p+s}, padded past the end
        mask = unroll_mask(width, step, tokens.device)
        outputs.append(draft(shifted, outputs[-1], positions + step - 1, cache, mask))
    return outputs


def target_positions(lengths: list[int], starts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of every target position q = start_b .. L_b - 1 of every row (start_b >= 1): built on the
    host, sent once."""
    rows = torch.cat(
        [torch.full((max(n - q0, 0),), b, dtype=torch.int64) for b, (n, q0) in enumerate(zip(lengths, starts))]
    )
    columns = torch.cat([torch.arange(q0, max(n, q0), dtype=torch.int64) for n, q0 in zip(lengths, starts)])
    if torch.device(device).type == "cuda":
        rows, columns = rows.pin_memory(), columns.pin_memory()
    return rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)


def head_loss(
    draft,  # pipelines.heads.model.HeadDraft
    tokens: torch.Tensor,  # [B, T] int64, right-padded
    lengths: list[int],  # [B] real tokens per row (host)
    settings: HeadLossSettings,
    *,
    features: torch.Tensor | None = None,  # [B, T, F] the target's (draft.target_features), if the caller has them
    backward: bool = False,
    scale: float = 1.0,  # with backward: the gradient accumulated is that of scale x the objective
    starts: list[int] | None = None,  # [B] first target position q scored per row (>= 1; default 1: all of them)
) -> HeadLoss:
    """The loss of the module docstring; with `backward`, the gradient of `scale` times it is accumulated into the
    head's parameters (with scale 1, divide nothing afterwards: the objective is already a mean). `starts` scores
    only positions q >= start_b of row b (e.g. a request's answer, not its prompt); earlier positions still feed
    the unrolled chains as inputs."""
    device = tokens.device
    if features is None:
        with torch.no_grad():
            features = draft.target_features(tokens)
    steps = settings.unroll
    starts = [max(q0, 1) for q0 in starts] if starts is not None else [1] * len(lengths)
    counts = [sum(max(n - max(s, q0), 0) for n, q0 in zip(lengths, starts)) for s in range(1, steps + 1)]
    scales = [w / c if c else 0.0 for w, c in zip(settings.step_weights(), counts)]
    with torch.set_grad_enabled(backward):
        outputs = unrolled_outputs(draft, tokens, features, steps)
    leaves = [o.detach().requires_grad_(True) for o in outputs] if backward else outputs
    rows, columns = target_positions(lengths, starts, device)
    restricted = settings.draft_vocab_only and draft.head.draft_vocab is not None
    logits_of = draft.draft_logits if restricted else draft.logits
    zeros = lambda: torch.zeros(steps, device=device)  # noqa: E731
    kl, regression, top1, objective = zeros(), zeros(), zeros(), torch.zeros((), device=device)
    for start in range(0, rows.shape[0], settings.chunk_positions):
        b, q = rows[start : start + settings.chunk_positions], columns[start : start + settings.chunk_positions]
        wanted = features[b, q, : draft.config.hidden_size]  # [C, H] f_q (a fused feature's first H)
        with torch.no_grad():
            log_p = torch.log_softmax(logits_of(wanted), dim=-1)  # [C, V] (V' when restricted)
            p, target_top = log_p.exp(), log_p.argmax(dim=-1)
        with torch.set_grad_enabled(backward):
            chunk_objective = torch.zeros((), device=device)
            for s in range(1, steps + 1):
                counted = (q >= s).float()  # the chain started at q - s exists
                guess = leaves[s - 1][b, (q - s).clamp_min(0)]  # [C, H] gs_{q-s}
                log_q = torch.log_softmax(logits_of(guess), dim=-1)
                step_kl = (p * (log_p - log_q)).sum(dim=-1) * counted
                smooth = torch.nn.functional.smooth_l1_loss(guess.float(), wanted.float(), reduction="none")
                step_regression = smooth.mean(dim=-1) * counted
                chunk_objective = chunk_objective + scales[s - 1] * (
                    step_kl.sum() + settings.regression_weight * step_regression.sum()
                )
                kl[s - 1] += step_kl.sum().detach()
                regression[s - 1] += step_regression.sum().detach()
                top1[s - 1] += ((log_q.detach().argmax(dim=-1) == target_top).float() * counted).sum()
            if backward and chunk_objective.requires_grad:
                (chunk_objective * scale).backward()
        objective += chunk_objective.detach()
    if backward:
        pairs = [(o, leaf.grad) for o, leaf in zip(outputs, leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return HeadLoss(objective, kl, regression, top1, counts)
