"""Ens-X: an online ensemble over learning rates, Hedge meta-weights, the served draft is the weighted merge.

State: N = ensemble_size members theta_1..theta_N, all equal to the given weights at a re-base, member i with
learning rate lr_i = lr * ensemble_lr_ratio ** (i - (N - 1) / 2) (N = 3, ratio 2: lr/2, lr, 2 lr), each with
its own optimizer state, and cumulative losses C_i (0 at a re-base). One round t:

    1. loss   l_i,t = mean KL of member i on the round's positions, measured BEFORE training on them
                      (the online-learning convention: a round's loss is that of the weights that served it)
    2. Hedge  C_i  += l_i,t ;   w_i = exp(-hedge_eta * C_i) / sum_j exp(-hedge_eta * C_j)
    3. train  each member exactly like `online` (its own lr and optimizer state) on the round
    4. merge  candidate = sum_i w_i theta_i  (float32, trainable tensors; frozen ones are shared), written into
              the draft. The members themselves are not replaced by the merge: they keep their own trajectories.

Next round the learner continues iff it gets its own merge back (see pipelines/learners/base.py); a re-base resets
every member to the given weights and every C_i to 0. Losses are per-token means (nats), so hedge_eta sets how many
nats of cumulative advantage make a member dominate (a gap of 1/eta nats = a factor e in weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipelines.learners.base import Learner, LearnerSettings, NonFiniteError


class EnsembleLearner(Learner):
    name = "ensemble"
    positions = "all"

    def __init__(self, settings: LearnerSettings):
        super().__init__(settings)
        self.cumulative_losses: list[float] = []

    def reset(self) -> None:
        super().reset()
        self.cumulative_losses = []

    def _member_lrs(self) -> list[float]:
        s = self.settings
        middle = (s.ensemble_size - 1) / 2
        return [s.lr * s.ensemble_lr_ratio ** (i - middle) for i in range(s.ensemble_size)]

    def weights(self) -> list[float]:
        """Hedge weights from the cumulative losses (uniform before the first round)."""
        if not self.cumulative_losses:
            return [1.0 / len(self.members)] * len(self.members) if self.members else []
        eta = self.settings.hedge_eta
        best = min(self.cumulative_losses)  # shift for numerical safety; cancels in the normalisation
        raw = [math.exp(-eta * (c - best)) for c in self.cumulative_losses]
        return [r / sum(raw) for r in raw]

    def _train_round(self, draft, params, examples) -> dict[str, Any]:
        if not self.cumulative_losses:
            self.cumulative_losses = [0.0] * len(self.members)
        round_losses = []
        for member in self.members:
            self._load(params, member.weights)
            loss, _ = self._evaluate(draft, examples)
            if not math.isfinite(loss):
                raise NonFiniteError(f"ensemble: member with lr {member.lr} has loss {loss}")
            round_losses.append(loss)
        self.cumulative_losses = [total + loss for total, loss in zip(self.cumulative_losses, round_losses)]
        weights = self.weights()

        steps, member_details = 0, []
        for member in self.members:
            details = self._train_member(draft, params, member, examples)
            steps += details["steps"]
            member_details.append({"lr": member.lr, **details})

        with torch.no_grad():
            merged = [sum(w * m.weights[j] for w, m in zip(weights, self.members)) for j in range(len(self.names))]
        self._load(params, merged)
        return {
            "steps": steps,
            "candidate": merged,
            "member_losses_before": round_losses,
            "cumulative_losses": list(self.cumulative_losses),
            "weights": weights,
            "members": member_details,
        }

    def member_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s float32 trainable weights by parameter name (for inspection and tests)."""
        return dict(zip(self.names, self.members[index].weights))

    def state_summary(self) -> dict[str, Any]:
        summary = super().state_summary()
        summary["cumulative_losses"] = list(self.cumulative_losses)
        summary["weights"] = self.weights()
        return summary
