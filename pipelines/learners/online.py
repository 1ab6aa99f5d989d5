"""Online-X: online gradient descent on every emitted position of the round.

Update rule, per optimizer step on a batch B of `batch_size` requests (epochs passes over the round, reshuffled):

    L(theta) = (1 / |S|) sum_{i in S} KL(p_target,i || q_theta,i)        S = all emitted positions of B
    g        = clip(grad L, max_grad_norm)
    theta   <- AdamW(theta, g; lr, betas, weight_decay)                 optimizer = "adamw" (default)
    theta   <- theta - lr (g + momentum * buffer)  (torch SGD)          optimizer = "sgd"

The optimizer state (Adam moments / SGD momentum buffer) persists from round to round while the learner's own
candidates keep being promoted (see pipelines/learners/base.py), so consecutive rounds form one online run.
"""

from __future__ import annotations

from typing import Any

from pipelines.learners.base import Learner


class OnlineLearner(Learner):
    name = "online"
    positions = "all"

    def _train_round(self, draft, params, examples) -> dict[str, Any]:
        member = self.members[0]
        details = self._train_member(draft, params, member, examples)
        details["candidate"] = member.weights  # already loaded into the draft by the last step
        details["lr"] = member.lr
        return details
