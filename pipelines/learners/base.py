"""What every learner shares: settings, the round report, the training loop and the cross-round bookkeeping.

A learner turns one round of verification feedback into a candidate draft:

    fit(draft, examples, base_version)
        sync     continue the learner's own state, or re-base it on the weights in `draft` (below)
        measure  loss_before: mean KL of the entry draft on the round's positions (no gradient)
        train    the learner's update rule (one module per learner: osd, online, optimistic, ensemble)
        measure  loss_after: the same for the candidate, now in `draft`

Training precision. Each learner keeps float32 *master* copies of the trainable parameters and runs its optimizer
on them; the module only computes the forward and backward (in its own dtype, e.g. bfloat16 on a GPU) and gets the
masters copied back after every step. Pure bfloat16 training loses most small steps to rounding: bfloat16 keeps 8
significant bits, so an AdamW step of 5e-6 on a weight of 0.02 is 1/24 of its spacing (1.2e-4). Measured on the
real 0.5B draft (one round, AdamW 5e-6, "layers"): bfloat16 weights updated in place changed 41M of 358M values,
through float32 masters 100M, with held-out KL 0.82 vs 0.76. The masters persist across rounds with the rest of the
learner's state.

Cross-round state (masters, optimizer moments, the optimistic learner's previous direction, SGD momentum buffers,
ensemble members and their cumulative losses) lives in the learner. On entry to fit it *continues* that state iff
the caller hands back the learner's own last candidate, recognised either by
  - base_version being the id the caller stored that candidate under (`note_candidate_version`), or
  - the draft's weights being exactly that candidate (trainable tensors equal to the masters rounded to the
    draft's dtype, frozen tensors with the checksum they had),
so "the last candidate was promoted" continues under any version id. If the caller hands back the same
base_version as at the previous fit, the last candidate was not taken (rejected by the gate): with
after_rejection = "rebase" (default) the learner re-bases on it; with "continue" it keeps its own trajectory (a
shadow learner: its masters are written into `draft` and training goes on from there, so gains that are each
below the promotion margin can add up). In every other case (first round, an operator rolled back or promoted
another version, the learner was reset after a non-finite round) it *re-bases*: masters := the given weights,
optimizer state, previous directions and momentum cleared, ensemble members all := the given weights with
cumulative losses zeroed. `FitReport.details` says which happened ("rebased", "rebase_reason").

Guards: the gradient norm (always computed, for the report) is clipped to max_grad_norm; a non-finite loss or
gradient norm raises NonFiniteError at once, and the float32 masters are checked for finiteness every
check_weights_every steps and at the end. On NonFiniteError the learner resets (the next fit re-bases) and the
contents of `draft` are undefined: the caller keeps the active draft and reloads its training copy.

Trainable parameters: "all" (embeddings, transformer blocks, final norm, LM head), "layers" (the transformer
blocks only: embeddings, final norm and LM head frozen) or "last_layers" (the last num_last_layers blocks: the
parameter-efficient option). Frozen parameters never change and need no master or optimizer state.

Heads (pipelines.heads.model.HeadDraft) train like draft LMs. A head owns no embeddings or LM head (those are the
target's, never trained), so "all" and "layers" are the same: every parameter of the head (its input projection
`fc`, a fused head's `fuse` and its norms, its decoder layers and its norm); "last_layers" is the last
num_last_layers of its decoder layers (the rest frozen). For the round a head needs the target's features of every
request: a FeatureBank (pipelines.heads.feedback, where the cost is documented) computes them in batched target
passes on first use and keeps them until fit returns. With `head_chain_weight` > 0 each step also takes the chain
term (ChainTerm: the bootstrap's loss HEAD_CHAIN_LOSS, two drafting steps and feature regression, over the answers
of the step's requests, on those features), so the drafting steps that read the head's own output are trained too,
not only step 1; the reported losses stay the step-1 KL, the chain term's are in details (chain_loss_*).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.heads.losses import HeadLossSettings, head_loss
from pipelines.heads.model import HeadDraft
from pipelines.learners import distill
from pipelines.settings import LearnerSettings
from pipelines.types import RequestFeedback

log = logging.getLogger(__name__)

# The bootstrap's loss as `draft init` takes it (its default unroll and regression; over the draft vocabulary when
# the head has one), for the learners' head_chain_weight term.
HEAD_CHAIN_LOSS = HeadLossSettings(unroll=2, draft_vocab_only=True)


def answer_start(example: RequestFeedback) -> int:
    """First target position of a request's answer in head_loss's terms: q = P - 1 gives the first emitted token
    (at least 1, where a one-token prompt's first token has no head prediction)."""
    return max(len(example.prompt_ids) - 1, 1)


def chain_positions(example: RequestFeedback) -> int:
    """Step-1 positions the chain term scores in a request: its emitted tokens that a head predicts."""
    return max(distill.sequence_length(example) - answer_start(example), 0)


class ChainTerm:
    """A head's chain term in one optimizer step (LearnerSettings.head_chain_weight): HEAD_CHAIN_LOSS over the
    answers of the step's requests (prompts are read, not scored), each micro-batch's mean weighted by its share of
    the step's answer positions, so the step adds weight x gradient of the term's mean over the step whatever the
    micro-batching (exactly when unroll steps agree on the shares, as with one micro-batch)."""

    def __init__(self, weight: float, positions: int, weights: list[torch.Tensor]):
        self.weight = weight
        self.positions = positions
        self.grads = [torch.zeros_like(w) for w in weights]  # float32, beside the masters
        self._objective = 0.0

    @classmethod
    def for_step(cls, draft, weight: float, groups, weights: list[torch.Tensor]) -> ChainTerm | None:
        if not isinstance(draft, HeadDraft) or weight <= 0:
            return None
        positions = sum(chain_positions(e) for group in groups for e in group)
        return cls(weight, positions, weights) if positions else None

    def add(self, draft: HeadDraft, group: Sequence[RequestFeedback], batch: distill.FeedbackBatch) -> None:
        """The gradient of the group's share x its mean, left in the draft's .grad (the caller takes it)."""
        share = sum(chain_positions(e) for e in group) / self.positions
        if share == 0:
            return
        lengths = [distill.sequence_length(e) for e in group]
        starts = [answer_start(e) for e in group]
        loss = head_loss(
            draft,
            batch.input_ids,
            lengths,
            HEAD_CHAIN_LOSS,
            features=batch.features,
            backward=True,
            scale=share,
            starts=starts,
        )
        self._objective = self._objective + share * loss.objective

    def apply(self, weights: list[torch.Tensor]) -> None:
        for w, g in zip(weights, self.grads):
            w.grad.add_(g, alpha=self.weight)

    def objective(self) -> float:
        return float(self._objective)


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became NaN or infinite: the round is void and the caller keeps the active draft."""


@dataclass
class FitReport:
    learner: str
    steps: int  # optimizer steps this round (all members)
    tokens: int  # emitted positions the loss was taken over (one epoch; OSD: the rejected ones)
    loss_before: float  # mean KL of the entry draft on those positions (nan when there are none)
    loss_after: float  # the same for the candidate
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready: rebasing, grad norms, ensemble weights...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a loss over no positions (nan) becomes None."""
        finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731
        return {
            "learner": self.learner,
            "steps": self.steps,
            "tokens": self.tokens,
            "loss_before": finite(self.loss_before),
            "loss_after": finite(self.loss_after),
            "seconds": self.seconds,
            "details": self.details,
        }


@dataclass
class Member:
    """One trajectory of trainable weights (the ensemble has several): float32 masters and their optimizer."""

    weights: list[torch.Tensor]  # float32 masters, aligned with the learner's trainable parameter names
    optimizer: torch.optim.Optimizer
    lr: float
    steps: int = 0
    chain_losses: list[float] = field(default_factory=list)  # a head's chain term per step of the current fit


def trainable_parameters(model: torch.nn.Module, settings: LearnerSettings) -> dict[str, torch.nn.Parameter]:
    """The parameters `settings.trainable` selects, by name, in the model's order (a head: see the module
    docstring)."""
    named = dict(model.named_parameters())
    if settings.trainable == "all" or (settings.trainable == "layers" and isinstance(model, HeadDraft)):
        return named
    blocks = list(model.head.layers if isinstance(model, HeadDraft) else model.get_decoder().layers)
    if settings.trainable == "last_layers":
        blocks = blocks[-settings.num_last_layers :]
    chosen = {id(p) for block in blocks for p in block.parameters()}
    return {name: p for name, p in named.items() if id(p) in chosen}


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class Learner:
    """Base class: subclasses set `name` and `positions` and implement `_train_round`."""

    name = "learner"
    positions = "all"  # emitted positions the loss is taken over: "all" or "rejected" (distill.select)

    def __init__(self, settings: LearnerSettings):
        self.settings = settings
        self.members: list[Member] = []
        self.names: list[str] = []  # trainable parameter names the members' weights align with
        self.rounds = 0  # fits since the last re-base
        self.total_steps = 0
        self.synced_version: str | None = None  # base_version of the last re-base
        self.last_base_version: str | None = None  # base_version of the last fit
        self.candidate_version: str | None = None  # the id the caller stored the last candidate under
        self._candidate: list[torch.Tensor] | None = None  # float32 weights last written into the draft
        self._frozen_checksum: torch.Tensor | None = None
        self._features: distill.FeatureBank | None = None  # a head's target features, during fit only
        self._generator = torch.Generator().manual_seed(settings.seed)

    # ------------------------------------------------------------------ public API

    def fit(self, draft: torch.nn.Module, examples: Sequence[RequestFeedback], *, base_version: str) -> FitReport:
        """Train on one round's feedback: `draft` holds the active weights on entry and the candidate on return.

        `draft` is the caller's training copy on the training device; its parameters come back with
        requires_grad False, no .grad and in eval mode. Raises NonFiniteError (the learner resets; `draft` is then
        undefined) and ValueError when no example has an emitted token."""
        started = time.perf_counter()
        examples = distill.usable(examples)
        if not examples:
            raise ValueError("fit needs feedback with at least one emitted token")
        params = trainable_parameters(draft, self.settings)
        rebase_reason = self._sync(draft, params, base_version)
        self.last_base_version = base_version
        with self._round_features(draft):
            loss_before, tokens = self._evaluate(draft, examples)
            details = self._train(draft, params, examples)
            loss_after, _ = self._evaluate(draft, examples)
        if not math.isfinite(loss_after) and tokens:
            self.reset()
            raise NonFiniteError(f"{self.name}: the candidate's loss is {loss_after}")
        self._candidate = details.pop("candidate")
        self.candidate_version = None
        self.rounds += 1
        steps = details.pop("steps")
        self.total_steps += steps
        details["rebased"] = rebase_reason is not None
        details["rebase_reason"] = rebase_reason
        return FitReport(self.name, steps, tokens, loss_before, loss_after, time.perf_counter() - started, details)

    def note_candidate_version(self, version: str) -> None:
        """The caller stored the last candidate as `version`: a later fit with base_version == version continues
        even if storage re-rounded the weights (e.g. saved in bfloat16, trained in float32)."""
        self.candidate_version = version

    def reset(self) -> None:
        """Forget all cross-round state: the next fit re-bases on the weights it is given."""
        self.members, self.names = [], []
        self._candidate = self._frozen_checksum = None
        self.synced_version = self.candidate_version = self.last_base_version = None
        self.rounds = 0

    def state_summary(self) -> dict[str, Any]:
        """JSON-ready state, recorded with the round."""
        return {
            "learner": self.name,
            "settings": self.settings.model_dump(mode="json"),
            "synced_version": self.synced_version,
            "last_base_version": self.last_base_version,
            "candidate_version": self.candidate_version,
            "rounds_since_rebase": self.rounds,
            "total_steps": self.total_steps,
            "trainable_tensors": len(self.names),
            "trainable_parameters": sum(w.numel() for w in self.members[0].weights) if self.members else 0,
            "member_lrs": [m.lr for m in self.members],
        }

    def _train(self, draft, params: dict[str, torch.nn.Parameter], examples) -> dict[str, Any]:
        """_train_round with the draft in training mode; afterwards its parameters hold no gradient, need none."""
        try:
            draft.train()
            for p in params.values():
                p.requires_grad_(True)
            return self._train_round(draft, params, examples)
        except NonFiniteError:
            self.reset()
            raise
        finally:
            for p in draft.parameters():
                p.grad = None
                p.requires_grad_(False)
            draft.eval()

    @contextmanager
    def _round_features(self, draft):
        """A head's target features for this fit (None for a draft LM), freed when it returns."""
        self._features = distill.feature_bank_for(draft)
        try:
            yield
        finally:
            self._features = None

    # ------------------------------------------------------------------ subclass hooks

    def _train_round(self, draft, params: dict[str, torch.nn.Parameter], examples) -> dict[str, Any]:
        """Update the members on the round; write the candidate into `draft`. Returns details with "steps" and
        "candidate" (the float32 weights written into the draft, kept to recognise the candidate next round)."""
        raise NotImplementedError

    def _new_optimizer(self, weights: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        s = self.settings
        if s.optimizer == "adamw":
            return torch.optim.AdamW(weights, lr=lr, betas=s.betas, weight_decay=s.weight_decay)
        return torch.optim.SGD(weights, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def _member_lrs(self) -> list[float]:
        return [self.settings.lr]

    # ------------------------------------------------------------------ sync / re-base

    def _sync(self, draft, params: dict[str, torch.nn.Parameter], base_version: str) -> str | None:
        """Continue (returns None) or re-base (returns why)."""
        reason = self._continue_blocker(draft, params, base_version)
        if reason is None:
            self._load(params, self._candidate)  # the masters are the truth when storage re-rounded the weights
            return None
        self.reset()
        self.names = list(params)
        self.members = []
        for lr in self._member_lrs():
            weights = [p.detach().float().clone() for p in params.values()]
            self.members.append(Member(weights, self._new_optimizer(weights, lr), lr))
        self._frozen_checksum = self._checksum(draft, params)
        self.synced_version = base_version
        log.info("%s learner re-based on %s (%s)", self.name, base_version, reason)
        return reason

    def _continue_blocker(self, draft, params, base_version: str) -> str | None:
        """Why the state cannot continue on this draft, or None when it can."""
        if self._candidate is None:
            return "no state"
        if list(params) != self.names:
            return "other trainable parameters"
        if self.candidate_version is not None and base_version == self.candidate_version:
            return None
        frozen_same = torch.equal(self._checksum(draft, params), self._frozen_checksum)
        if frozen_same and all(torch.equal(p, w.to(p.dtype)) for p, w in zip(params.values(), self._candidate)):
            return None
        if base_version == self.last_base_version:
            if self.settings.after_rejection == "continue" and frozen_same:
                return None
            return f"the candidate trained from {base_version} was not taken"
        return f"{base_version} is not the last candidate"

    @staticmethod
    def _checksum(draft, params) -> torch.Tensor:
        trainable = {id(p) for p in params.values()}
        frozen = [p for p in draft.parameters() if id(p) not in trainable]
        if not frozen:
            return torch.zeros(0)
        sums = [torch.stack([p.detach().float().sum(), p.detach().float().square().sum()]) for p in frozen]
        return torch.stack(sums).cpu()

    # ------------------------------------------------------------------ training helpers

    def _evaluate(self, draft, examples) -> tuple[float, int]:
        return distill.mean_kl(
            draft,
            examples,
            positions=self.positions,
            micro_batch_tokens=self.settings.micro_batch_tokens,
            temperature=self.settings.target_temperature,
            features=self._features,
        )

    @staticmethod
    def _take_grads(params: dict[str, torch.nn.Parameter], buffers: list[torch.Tensor]) -> None:
        """Add the draft's parameter gradients (in its dtype) to float32 buffers, and clear them."""
        for p, buffer in zip(params.values(), buffers):
            if p.grad is not None:
                buffer.add_(p.grad.float())
                p.grad = None

    def _load(self, params: dict[str, torch.nn.Parameter], weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(params.values(), weights):
                p.copy_(w)

    def _epoch_order(self, count: int) -> list[int]:
        return torch.randperm(count, generator=self._generator).tolist()

    def _train_member(self, draft, params, member: Member, examples) -> dict[str, Any]:
        """`epochs` passes of optimizer steps on one member, starting from and ending in its masters."""
        s = self.settings
        self._load(params, member.weights)
        device = member.weights[0].device
        losses, norms, steps = [], [], 0
        member.chain_losses = []
        for _ in range(s.epochs):
            order = self._epoch_order(len(examples))
            for start in range(0, len(order), s.batch_size):
                step_examples = [examples[i] for i in order[start : start + s.batch_size]]
                loss, norm = self._step(draft, params, member, step_examples, device)
                if loss is None:
                    continue
                losses.append(loss)
                norms.append(norm)
                steps += 1
                member.steps += 1
                if member.steps % s.check_weights_every == 0 and not all_finite(member.weights):
                    raise NonFiniteError(f"{self.name}: non-finite weights after step {member.steps}")
        if not all_finite(member.weights):
            raise NonFiniteError(f"{self.name}: non-finite weights at the end of the round")
        return {
            "steps": steps,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "grad_norm_mean": sum(norms) / len(norms) if norms else None,
            "grad_norm_max": max(norms) if norms else None,
            # a head's chain term (head_chain_weight), first and last step: the losses above are the step-1 KL only
            "chain_loss_first": member.chain_losses[0] if member.chain_losses else None,
            "chain_loss_last": member.chain_losses[-1] if member.chain_losses else None,
        }

    def _step(self, draft, params, member: Member, examples, device) -> tuple[float | None, float]:
        """One optimizer step on a few requests: accumulate gradients over micro-batches into the float32
        masters, normalise by the number of positions, add a head's chain term (below), check, clip, step, copy
        the masters into the draft."""
        for w in member.weights:
            w.grad = torch.zeros_like(w)
        groups = distill.micro_batches(examples, self.settings.micro_batch_tokens)
        chain = ChainTerm.for_step(draft, self.settings.head_chain_weight, groups, member.weights)
        total, count = 0.0, 0
        for group in groups:
            batch = distill.batch_for(draft, group, device, self._features)
            logits = distill.draft_logits(draft, batch)
            mask = distill.select(logits, batch, self.positions)
            n = int(mask.sum())
            if n:
                loss_sum = distill.forward_kl(logits, batch, self.settings.target_temperature)[mask].sum()
                loss_sum.backward()
                self._take_grads(params, [w.grad for w in member.weights])
                total += float(loss_sum.detach())
                count += n
            if chain is not None:
                chain.add(draft, group, batch)
                self._take_grads(params, chain.grads)
        if count == 0:
            return None, 0.0
        loss = total / count
        if not math.isfinite(loss):
            raise NonFiniteError(f"{self.name}: loss {loss} at step {member.steps + 1}")
        for w in member.weights:
            w.grad.div_(count)
        if chain is not None:
            chain.apply(member.weights)
            member.chain_losses.append(chain.objective())
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.grad) for w in member.weights])))
        if not math.isfinite(norm):
            raise NonFiniteError(f"{self.name}: gradient norm {norm} at step {member.steps + 1}")
        if self.settings.max_grad_norm is not None and norm > self.settings.max_grad_norm:
            scale = self.settings.max_grad_norm / (norm + 1e-6)
            for w in member.weights:
                w.grad.mul_(scale)
        member.optimizer.step()
        for w in member.weights:
            w.grad = None
        self._load(params, member.weights)
        return loss, norm
