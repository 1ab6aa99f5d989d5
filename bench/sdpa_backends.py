"""On a CUDA machine: what one verify-width attention call costs per SDPA backend, with the engine's boolean mask over
the whole static cache (the shapes of a Qwen2.5-Coder-1.5B round: 12 query heads, 2 KV heads, head_dim 128).

    python -m bench.sdpa_backends [--seq 1024] [--batch 1 8] [--widths 1 3 5 9]

The profile of a round (bench/profile_round.py) puts most of what a speculative round pays over a target-only
round in the attention kernel; this shows whether another backend would cost less. Prints microseconds per call.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def time_call(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 3, 5, 9])
    args = parser.parse_args()
    device, dtype = "cuda", torch.bfloat16
    print(f"{'batch':>5} {'width':>5} " + " ".join(f"{name:>10}" for name in BACKENDS) + "   (us per call)")
    for batch in args.batch:
        for width in args.widths:
            q = torch.randn(batch, 12, width, 128, device=device, dtype=dtype)
            k = torch.randn(batch, 2, args.seq, 128, device=device, dtype=dtype)
            v = torch.randn_like(k)
            positions = 300 + torch.arange(width, device=device)[None].expand(batch, -1)
            mask = torch.arange(args.seq, device=device)[None, None, None, :] <= positions[:, None, :, None]
            cells = []
            call = functools.partial(
                torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=True
            )
            for backend in BACKENDS.values():
                try:
                    if backend is None:
                        cells.append(f"{time_call(call):10.1f}")
                    else:
                        with sdpa_kernel([backend]):
                            cells.append(f"{time_call(call):10.1f}")
                except RuntimeError:
                    cells.append(f"{'n/a':>10}")
            print(f"{batch:>5} {width:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
