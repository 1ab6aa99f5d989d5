"""Memory and time of the suffix proposer's stream cache at a given number of cached completions.

    python -m bench.suffix_cache --tokenizer assets/qwen-coder/target.gguf --completions 100000 --device cpu

Completions are consecutive `--tokens-per-completion`-token pieces of real text (the Python standard library's
sources on this machine, tokenized with the target's tokenizer), each with the previous piece's last 16 tokens as
its "prompt". Reports: bytes per cached token (host + device mirrors), insertion time per completion, and the
time of one proposal round (SuffixProposer.propose for a batch of rows whose context is a later piece of the same
text, so matches are found) at batch 1 and 8, as the engine runs it (eager here; a CUDA graph on the GPU).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.decode_state import DecodeState
from pipelines.kv_cache import PositionalKVCache
from pipelines.models import load_tokenizer
from pipelines.proposers.suffix import SuffixCache, SuffixProposer
from pipelines.settings import SuffixSettings


def corpus_tokens(tokenizer, needed: int) -> np.ndarray:
    pieces, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        ids = tokenizer(path.read_text(errors="replace")).input_ids
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= needed:
            break
    return np.concatenate(pieces)


def time_proposals(
    proposer: SuffixProposer, text: np.ndarray, batch: int, context: int, k: int, device, repeats: int
) -> float:
    """Median seconds of one propose() for `batch` rows holding `context` tokens of already-cached text."""
    capacity = 2048
    cache = PositionalKVCache(
        [torch.zeros(1, 1, capacity, 1, device=device)], [torch.zeros(1, 1, capacity, 1, device=device)]
    )
    state = DecodeState.allocate(batch, cache.rows(1), 4, torch.device(device), max_k=k)
    rng = np.random.default_rng(0)
    for row in range(batch):
        start = int(rng.integers(0, len(text) - context))
        state.tokens[row, :context] = torch.from_numpy(text[start : start + context])
    state.lengths.fill_(context - 1)
    times = []
    for _ in range(repeats + 1):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        proposal, match = proposer.propose(state, k)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    counts = proposal.counts.float().mean().item()
    return float(np.median(times[1:])), counts, match.float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="target model folder or .gguf (its tokenizer)")
    parser.add_argument("--completions", type=int, default=100_000)
    parser.add_argument("--tokens-per-completion", type=int, default=128)
    parser.add_argument("--cache-tokens", type=int, default=1 << 24, help="engine.suffix.cache_tokens")
    parser.add_argument("--table-buckets", type=int, default=1 << 22, help="engine.suffix.table_buckets")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared small machine spinning OpenMP threads of "
        "several processes slow tiny ops down by orders of magnitude)",
    )
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.tokenizer)
    piece = args.tokens_per_completion
    text = corpus_tokens(tokenizer, args.completions * piece + piece)
    count = min(args.completions, len(text) // piece - 1)
    settings = SuffixSettings(cache_tokens=args.cache_tokens, table_buckets=args.table_buckets)
    cache = SuffixCache(settings, args.device)
    started = time.perf_counter()
    chunk = 1000
    for first in range(0, count, chunk):
        ids = range(first, min(first + chunk, count))
        completions = [text[(i + 1) * piece : (i + 2) * piece] for i in ids]
        prompts = [text[(i + 1) * piece - 16 : (i + 1) * piece] for i in ids]
        cache.add(completions, prompts)
    insert_s = time.perf_counter() - started
    proposer = SuffixProposer(cache, args.k)
    cached_tokens = min(cache.total, settings.cache_tokens)
    report = {
        "completions": count,
        "tokens_per_completion": piece,
        "ring_tokens_written": cache.total,
        "cached_tokens": cached_tokens,
        "bytes": cache.nbytes,
        "bytes_per_cached_token": cache.nbytes / cached_tokens,
        "insert_s": insert_s,
        "insert_us_per_completion": insert_s / count * 1e6,
        "device": args.device,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "settings": settings.model_dump(),
    }
    for batch in (1, 8):
        seconds, drafted, match = time_proposals(
            proposer, text[: count * piece], batch, 512, args.k, args.device, args.repeats
        )
        report[f"propose_ms_b{batch}"] = seconds * 1e3
        report[f"mean_drafted_b{batch}"] = drafted
        report[f"mean_match_b{batch}"] = match
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
