"""On a CUDA machine: check that captured rounds (and compiled ones) decode exactly like HF greedy generate.

    python -m bench.gpu_smoke [--compile]

Tiny fp32 models, so any mismatch is a bug, not bf16 rounding. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from devtools.tiny_models import make_tiny_pair
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.models import load_pair
from pipelines.types import GenerationRequest

PROMPTS = ["def add(a, b):", "The quick brown", "SELECT name FROM", "To be, or not to be", "T", "for i in"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    target_dir, draft_dir = make_tiny_pair(root)
    target, draft, tokenizer = load_pair(str(target_dir), str(draft_dir), "float32", "cuda")
    failures = 0
    for k in (0, 3, 5):
        settings = EngineSettings(proposer="draft", k=k, max_batch_size=8, max_seq_len=128, compile=args.compile)
        engine = SpeculativeEngine(target, draft, tokenizer, settings)
        started = time.perf_counter()
        engine.warmup()
        warmup = time.perf_counter() - started
        requests = [
            GenerationRequest(id=str(i), input_ids=tokenizer(p).input_ids, max_new_tokens=40)
            for i, p in enumerate(PROMPTS)
        ]
        for batch in (1, 6):
            results = engine.generate(requests[:batch])
            for request, result in zip(requests, results):
                ids = torch.tensor([request.input_ids], device="cuda")
                expected = target.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
                if result.token_ids != expected:
                    failures += 1
                    print(f"MISMATCH k={k} batch={batch} id={request.id}\n ours {result.token_ids}\n hf   {expected}")
        sampled = [
            GenerationRequest(id=r.id, input_ids=r.input_ids, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=7)
            for r in requests
        ]
        first = engine.generate(sampled)
        again = engine.generate(sampled[:1])
        if first[0].token_ids != again[0].token_ids:
            failures += 1
            print(f"NOT REPRODUCIBLE k={k}: {first[0].token_ids} vs {again[0].token_ids}")
        print(
            f"k={k}: warm-up/capture {warmup:.1f} s, graphs {len(engine._graphs)}, sampled AvgLen "
            f"{sum(r.counters.emitted for r in first) / sum(r.counters.target_forwards for r in first):.2f}"
        )
    print("SMOKE", "FAILED" if failures else "OK", f"compile={args.compile}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
