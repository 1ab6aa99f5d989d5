"""The start-up estimate of what learning rounds hold in memory, and the warning when it does not fit."""

from __future__ import annotations

import logging

import torch

from daemon.learning.memory import GIB, check, estimate
from pipelines.settings import LearnerSettings


class TwoBlocks(torch.nn.Module):
    """A stand-in draft: embeddings (frozen with trainable 'layers') and two blocks of 100 + 10 parameters."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 5)  # 50 parameters
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.Linear(10, 10) for _ in range(2))  # 2 x 110

    def get_decoder(self):
        return self.model


def test_the_estimate_counts_the_copy_the_masters_and_adams_moments_per_member():
    draft = TwoBlocks()
    online = estimate(draft, LearnerSettings(name="online", trainable="layers"), torch.float32)
    assert (online.training_copy, online.masters, online.optimizer, online.members) == (270 * 4, 220 * 4, 220 * 8, 1)
    assert online.gradients == 220 * 4 and online.total == (270 + 220 + 440 + 220) * 4
    ensemble = estimate(draft, LearnerSettings(name="ensemble", trainable="layers", ensemble_size=3), torch.bfloat16)
    assert (ensemble.training_copy, ensemble.masters, ensemble.optimizer) == (270 * 2, 3 * 220 * 4, 3 * 220 * 8)
    optimistic = estimate(draft, LearnerSettings(name="optimistic", optimizer="sgd", trainable="all"), torch.float32)
    assert optimistic.optimizer == 270 * 4 * 2  # momentum and the previous direction


def test_a_heads_chain_term_counts_a_second_gradient_buffer(head_target):
    from pipelines.heads.model import DraftHead, HeadDraft

    target = head_target[0]
    head = HeadDraft(DraftHead.for_target(target), target)
    trainable = sum(p.numel() for p in head.parameters())
    chain = estimate(head, LearnerSettings(name="online"), torch.float32)
    plain = estimate(head, LearnerSettings(name="online", head_chain_weight=0), torch.float32)
    assert (chain.gradients, plain.gradients) == (2 * trainable * 4, trainable * 4)


def test_a_learner_that_does_not_fit_the_available_memory_is_warned_about(caplog):
    memory = estimate(TwoBlocks(), LearnerSettings(name="ensemble", trainable="all"), torch.float32)
    with caplog.at_level(logging.INFO, logger="daemon.learning.memory"):
        assert check(memory, "cpu", available=memory.total - 1) is False
        assert check(memory, "cpu", available=memory.total + GIB) is True
        assert check(memory, "cuda", available=1) is True  # GPU memory is not what /proc says
    warning, fits, on_gpu = caplog.records
    assert warning.levelname == "WARNING" and "a round may be killed for memory" in warning.getMessage()
    assert fits.levelname == "INFO" and "learning holds about" in fits.getMessage()
    assert "3 members" in warning.getMessage()
