"""Opt-X: optimistic online gradient descent, using the previous step's direction as the hint for the next.

Variant "ogd" (default), per optimizer step t, with g_t the clipped gradient of the mean KL over all emitted
positions of the step's requests (as in `online`):

    d_t        = g_t                                        optimizer = "sgd"
    d_t        = m_hat_t / (sqrt(v_hat_t) + eps)            optimizer = "adamw" (Adam's bias-corrected moments)
    theta_t+1  = theta_t (1 - lr * weight_decay) - lr (2 d_t - d_t-1)

i.e. the textbook optimistic step x_{t+1} = x_t - eta (2 g_t - g_{t-1}) (with "sgd"), or the same extrapolation
applied to Adam's normalised step (optimistic Adam) with "adamw". d_t-1 is the previous *step's* direction and
persists across rounds (it is optimizer state). The very first step after a re-base has no previous direction and
takes d_-1 = d_0, i.e. a plain step.

Variant "momentum" (the paper's code): SGD with momentum `momentum` (0.9) whose buffer persists across rounds,
    b_t = momentum b_t-1 + g_t;  theta_t+1 = theta_t - lr b_t
whatever `optimizer` says (its lr is an SGD step size).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.learners.online import OnlineLearner


class OptimisticGD(torch.optim.Optimizer):
    """theta <- theta (1 - lr wd) - lr (2 d_t - d_{t-1}); d = the gradient ("sgd") or Adam's step ("adam")."""

    def __init__(
        self,
        params,
        lr: float,
        precondition: str = "sgd",
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if precondition not in ("sgd", "adam"):
            raise ValueError(f"Unknown precondition {precondition!r}; use 'sgd' or 'adam'")
        super().__init__(
            params, dict(lr=lr, precondition=precondition, betas=betas, eps=eps, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["precondition"] == "adam":
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                    v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                    direction = m_hat / (v_hat.sqrt() + group["eps"])
                else:
                    direction = p.grad.clone()
                previous = state.get("previous_direction", direction)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(2 * direction - previous, alpha=-lr)
                state["previous_direction"] = direction


class OptimisticLearner(OnlineLearner):
    name = "optimistic"
    positions = "all"

    def _new_optimizer(self, weights, lr: float) -> torch.optim.Optimizer:
        s = self.settings
        if s.optimistic_variant == "momentum":
            return torch.optim.SGD(weights, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
        precondition = "adam" if s.optimizer == "adamw" else "sgd"
        return OptimisticGD(weights, lr=lr, precondition=precondition, betas=s.betas, weight_decay=s.weight_decay)

    def state_summary(self) -> dict[str, Any]:
        summary = super().state_summary()
        summary["variant"] = self.settings.optimistic_variant
        if self.members:
            state = self.members[0].optimizer.state
            summary["has_previous_direction"] = any("previous_direction" in s for s in state.values())
            summary["has_momentum_buffer"] = any(s.get("momentum_buffer") is not None for s in state.values())
        return summary
