"""What learning rounds will hold in memory beside the served models, said once at start.

A round trains a copy of the served draft and its learner keeps float32 masters of the trainable parameters plus
the optimizer's state, per member (the ensemble keeps several), across rounds. With the real 0.5B draft in float32
on a 24 GB CPU box that came to 20-21 GB RSS with the served pair: enough to be killed without a word. So the daemon
logs the estimate at start, and warns when it does not fit the memory the machine has available (CPU training) so
an operator can pick a smaller learner (online instead of ensemble, trainable: last_layers) or a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipelines.settings import LearnerSettings

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class LearningMemory:
    training_copy: int  # bytes of the draft copy a round trains
    masters: int  # float32 masters of the trainable parameters, every member
    optimizer: int  # optimizer state (moments, momentum, the optimistic learner's previous step), every member
    members: int
    gradients: int = 0  # float32 gradients of one step (one member at a time; twice with a head's chain term)

    @property
    def total(self) -> int:
        return self.training_copy + self.masters + self.optimizer + self.gradients


def estimate(draft: torch.nn.Module, settings: LearnerSettings, training_dtype: torch.dtype) -> LearningMemory:
    """Bytes a learner of `settings` holds for `draft` (trained in `training_dtype`)."""
    from pipelines.heads.model import HeadDraft
    from pipelines.learners.base import trainable_parameters

    parameters = sum(p.numel() for p in draft.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(draft, settings).values())
    members = settings.ensemble_size if settings.name == "ensemble" else 1
    states = 2 if settings.optimizer == "adamw" else 1  # AdamW: two moments; SGD: momentum
    if settings.name == "optimistic":
        states += 1  # the previous direction
    element = torch.tensor([], dtype=training_dtype).element_size()
    chain = isinstance(draft, HeadDraft) and settings.head_chain_weight > 0  # its own gradient buffers
    return LearningMemory(
        training_copy=parameters * element,
        masters=trainable * 4 * members,
        optimizer=trainable * 4 * states * members,
        members=members,
        gradients=trainable * 4 * (2 if chain else 1),
    )


def check(memory: LearningMemory, device: str, available: int | None) -> bool:
    """Log the estimate; on a CPU, warn when it exceeds what is available. True when it fits (or cannot be told)."""
    line = (
        f"learning holds about {memory.total / GIB:.1f} GiB on {device}: training copy {memory.training_copy / GIB:.1f}"
        f" + float32 masters {memory.masters / GIB:.1f} + optimizer state {memory.optimizer / GIB:.1f}"
        f" + a step's gradients {memory.gradients / GIB:.1f}"
        f" ({memory.members} member{'s' if memory.members > 1 else ''})"
    )
    if device.startswith("cpu") and available is not None and memory.total > available:
        log.warning(
            "%s, more than the %.1f GiB this machine has available: a round may be killed for memory; use a smaller "
            "learner (online, or trainable: last_layers), training_dtype bfloat16, or a GPU",
            line,
            available / GIB,
        )
        return False
    log.info("%s", line)
    return True
