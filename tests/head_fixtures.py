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


def with_draft_vocab(draft, vocab):
    """The same head (its weights copied) proposing only the token ids in `vocab`: a reduced draft vocabulary."""
    return draft.restricted_to(vocab)


def half_of_the_tokens(sequences) -> list[int]:
    """The more frequent half of the distinct tokens in `sequences`: a draft vocabulary that holds most of what the
    target says and misses some of it (so drafts are also rejected for being outside it)."""
    from pipelines.heads.model import most_frequent_tokens

    sequences = [list(map(int, sequence)) for sequence in sequences]
    distinct = len({token for sequence in sequences for token in sequence})
    return most_frequent_tokens(sequences, distinct // 2, max(max(s) for s in sequences) + 1).tolist()


def right_padded(sequences: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, list[int]]:
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    return tokens, [len(s) for s in sequences]


def target_only(target, tokenizer, prompts, max_new: list[int], temperature: float = 0.0, top_m: int = 16):
    """Feedback of the target decoding alone (the engine with proposer none)."""
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.types import GenerationRequest

    settings = EngineSettings(proposer="none", max_batch_size=4, max_seq_len=160, top_m=top_m)
    requests = [
        GenerationRequest(f"r{i}", tokenizer(p).input_ids, max_new_tokens=n, temperature=temperature, seed=i)
        for i, (p, n) in enumerate(zip(prompts, max_new))
    ]
    return [r.feedback for r in SpeculativeEngine(target, None, tokenizer, settings).generate(requests)]


def fitted_head(target, feedback, steps: int = 60, seed: int = 0, feature_layers: tuple[int, ...] = ()):
    """A fresh head trained for a few steps on the requests it will be replayed on: it agrees with the target
    often, over several drafting steps, without being perfect (so rounds accept, reject and take bonus tokens).
    With `feature_layers` it is a fused head, whose training moves its fusion off the last layer alone."""
    from pipelines.heads.losses import HeadLossSettings, head_loss
    from pipelines.heads.model import DraftHead, HeadDraft

    # init random: the tiny random target's last layer is no warm start (measured: argmax match 0.23 vs 0.97)
    draft = HeadDraft(DraftHead.for_target(target, init="random", seed=seed, feature_layers=feature_layers), target)
    tokens, lengths = right_padded([list(f.prompt_ids) + list(f.token_ids) for f in feedback])
    draft.requires_grad_(True)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        head_loss(draft, tokens, lengths, HeadLossSettings(unroll=2), backward=True)
        optimizer.step()
    return draft.requires_grad_(False).eval()
