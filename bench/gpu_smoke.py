"""On a CUDA machine: check that captured rounds decode exactly like HF greedy generate, for every proposer, with
requests joining the running batch (continuous batching) and with static batching.

    python -m bench.gpu_smoke [--compile]
    python -m bench.gpu_smoke --device cpu       # the same checks, eager, as a dry run

Tiny float32 models (devtools/tiny_models.py: a target, its draft LM and a head trained briefly on the target's own
outputs, the same head with a reduced draft vocabulary, and a head fused over lower target layers too, whose verify
pass and prefill graphs return the wider features), so any mismatch is a bug, not bf16 rounding. Also checks
that a sampled request decodes to the same tokens alone and among others, for the proposers whose drafts do not
depend on the stream. Exits non-zero on any mismatch; prints one line per engine.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from devtools.tiny_models import make_noisy_copy, make_tiny_pair, train_head_on_own_outputs
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.heads.model import most_frequent_tokens
from pipelines.models import load_pair
from pipelines.types import GenerationRequest

PROMPTS = ["def add(a, b):", "The quick brown", "SELECT name FROM", "To be, or not to be", "T", "for i in"]
QUICK = [
    ("auto", "head", 4, "continuous"),
    ("head", "head", 5, "static"),
    ("head", "reduced", 4, "continuous"),
    ("head", "fused", 4, "continuous"),
]
ENGINES = [  # (proposer, model, k, scheduling)
    ("none", None, 0, "continuous"),
    ("draft", "draft", 3, "continuous"),
    ("head", "head", 3, "continuous"),
    ("head", "head", 5, "static"),
    ("head", "reduced", 4, "continuous"),  # the head with a reduced draft vocabulary
    ("head", "fused", 4, "continuous"),  # a head fused over the target's layers 1 and 2 beside its last
    ("auto", "fused", 4, "static"),
    ("suffix", None, 5, "continuous"),
    ("hybrid", "head", 4, "continuous"),
    ("auto", "head", 4, "continuous"),
    ("auto", "draft", 4, "static"),
]


def reference(target, request: GenerationRequest) -> list[int]:
    ids = torch.tensor([request.input_ids], device=target.device)
    return target.generate(ids, max_new_tokens=request.max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()


def joined(engine: SpeculativeEngine, requests: list[GenerationRequest], seed: int) -> dict[str, list[int]]:
    """Submit the requests at random step boundaries; id -> tokens."""
    rng = random.Random(seed)
    waiting, done = list(requests), {}
    while waiting or engine.busy:
        if waiting and rng.random() < 0.4:
            request = waiting.pop(0)
            engine.submit(request, request.id)
        done.update({tag: result.token_ids for tag, result in engine.step()})
    return done


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="four engines: auto with a head, a static head, a reduced-vocabulary head, a fused head",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    target_dir, _ = make_tiny_pair(root)
    strong = make_noisy_copy(target_dir, root / "strong", 0.004, seed=3)
    target, draft, tokenizer = load_pair(str(target_dir), str(strong), "float32", args.device)
    started = time.perf_counter()
    head = train_head_on_own_outputs(target, tokenizer, PROMPTS, PROMPTS[1])
    print(f"test head trained in {time.perf_counter() - started:.1f} s", flush=True)
    # a reduced draft vocabulary: the more frequent half of the tokens the prompts and the target's answers hold
    sequences = [tokenizer(p).input_ids for p in PROMPTS]
    sequences += [reference(target, GenerationRequest("v", ids, max_new_tokens=24)) for ids in sequences]
    distinct = len({t for s in sequences for t in s})
    vocab = most_frequent_tokens(sequences, distinct // 2, target.get_output_embeddings().weight.shape[0])
    fused = train_head_on_own_outputs(target, tokenizer, PROMPTS, PROMPTS[1], feature_layers=(1, 2))
    models = {"draft": draft, "head": head, "reduced": head.restricted_to(vocab), "fused": fused, None: None}
    rng = random.Random(0)
    requests = [
        GenerationRequest(f"r{i}", tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, max_new_tokens=rng.randint(3, 40))
        for i in range(14)
    ]
    expected = {r.id: reference(target, r) for r in requests}
    failures = 0
    for proposer, model, k, scheduling in QUICK if args.quick else ENGINES:
        settings = EngineSettings(
            proposer=proposer,
            k=k,
            max_batch_size=8,
            max_seq_len=128,
            compile=args.compile,
            scheduling=scheduling,
            prefill_chunk_tokens=5,
            auto={"k_choices": [2, 4]},
        )
        engine = SpeculativeEngine(target, models[model], tokenizer, settings)
        started = time.perf_counter()
        engine.warmup()
        warmup = time.perf_counter() - started
        got = joined(engine, requests, seed=k)
        wrong = [i for i, tokens in got.items() if tokens != expected[i]]
        failures += len(wrong) + len(set(expected) - set(got))
        for i in wrong:
            print(f"MISMATCH {proposer}:{k} {scheduling} {i}\n ours {got[i]}\n hf   {expected[i]}")
        sampled = [
            GenerationRequest(r.id, r.input_ids, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7)
            for r in requests[:6]
        ]
        crowd = engine.generate(sampled)
        alone = engine.generate(sampled[2:3])
        # suffix drafts depend on the stream, which the crowd just grew: other drafts, other (equally lossless) draws
        if settings.proposer not in ("suffix", "hybrid", "auto") and crowd[2].token_ids != alone[0].token_ids:
            failures += 1
            print(f"NOT REPRODUCIBLE {proposer}:{k}: {crowd[2].token_ids} vs {alone[0].token_ids}")
        greedy = engine.generate(requests[:8])
        avg_len = sum(r.counters.emitted for r in greedy) / sum(r.counters.target_forwards for r in greedy)
        print(
            f"{proposer}:{k} ({model}, {scheduling}): warm-up/capture {warmup:.1f} s, graphs {len(engine.graphs)} + "
            f"{len(engine.prefill)} prefill, "
            f"{len(wrong)} mismatches, greedy AvgLen {avg_len:.2f}",
            flush=True,
        )
    print("SMOKE", "FAILED" if failures else "OK", f"compile={args.compile}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
