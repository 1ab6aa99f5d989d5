"""Sampling that is a pure function of (request seed, token position, purpose).

Random numbers come from a counter-based hash instead of a generator state, so a request decodes to the same
tokens whatever batch it lands in, a redelivered request reproduces its completion, and the hot step holds no
RNG state (it can be captured in a CUDA graph). Each emitted position draws its draft proposal, its acceptance
test and its recovered/bonus token from three independent streams; positions a rejected step discarded are
drawn again with the same numbers, which is sound because nothing emitted depended on them.

Greedy (temperature 0) is the same algorithm on one-hot distributions: the draft proposes its argmax, a
proposal is accepted iff it is the target's argmax, and the recovered/bonus token is the target's argmax.
"""

from __future__ import annotations

import torch

STREAM_DRAFT = 1
STREAM_ACCEPT = 2
STREAM_RESIDUAL = 3
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser (Wellons' "lowbias32"-style). Values stay below 2**32 and the multiplier
    # below 2**28, so int64 arithmetic never overflows on any backend.
    x = ((x >> 16) ^ x) * 0x045D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x045D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, position: torch.Tensor, stream: int, width: int | None = None) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32.

    seed: [B] int64; position: [B, T] int64. Returns [B, T] or, with `width`, [B, T, width] (one per token id).
    """
    key = _mix32((seed & _MASK32)[:, None] ^ 0x9E3779B9)
    key = _mix32(key ^ (position & _MASK32))
    key = _mix32(key ^ (stream * 0x85EBCA6B & _MASK32))
    if width is not None:
        vocab = torch.arange(width, device=seed.device, dtype=torch.int64)
        key = _mix32(key[..., None] ^ (vocab * 0x27D4EB2F & _MASK32))
    # 24 random bits: exactly representable in float32, never 0 or 1.
    return ((key >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities after temperature and top-p, per row; one-hot argmax where temperature is 0.

    logits: [B, T, V]; temperature, top_p: [B]. Applied alike to draft and target, so sampling reproduces the
    target's warped distribution exactly.
    """
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p[:, None, None]  # the most likely token always survives (mass_before = 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(probs.dtype)
    return torch.where(greedy[:, None, None], one_hot, probs)


def sample(probs: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """Draw one token per [B, T] from probs [B, T, V] by an exponential race: argmax(p / E), E ~ Exp(1).

    Unnormalised weights are fine (the race is scale-free); zero weights never win. One-hot rows return
    their hot index, so greedy needs no special case.
    """
    u = uniform(seed, position, stream, probs.shape[-1])
    exponential = -torch.log(u)
    return (probs / exponential).argmax(dim=-1)
