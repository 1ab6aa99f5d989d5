"""Helpers for head tests: the tiny 4-layer target (devtools/tiny_models.py) loaded like the daemon loads it, heads
over it, and teacher-forced sequences of the target's own greedy text."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def head_target(tiny_models):
    """(target, tokenizer): the tiny target through pipelines.models, float32 on CPU."""
    from pipelines.models import load_model, load_tokenizer

    target_dir, _ = tiny_models
    return load_model(str(target_dir)), load_tokenizer(str(target_dir))


def scrambled_head(target, seed: int = 0, scale: float = 0.3):
    """A HeadDraft whose every weight is random (fc included): each input changes its output, so a test that
    compares two ways of computing it compares something."""
    from pipelines.heads.model import DraftHead, HeadDraft

    head = DraftHead.for_target(target, num_layers=1, init="random", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return HeadDraft(head, target)


def right_padded(sequences: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, list[int]]:
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    return tokens, [len(s) for s in sequences]
