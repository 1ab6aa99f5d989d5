"""What head training costs on a GPU, on a target of the real pair's shape with random weights (no model files
needed: the numbers are throughput, not quality).

    python -m bench.head_train_speed [--seconds 60] [--unroll 1 2] [--shape qwen2.5-1.5b] [--out FILE.json]

    bootstrap   pipelines.heads.train.train_head on random 1024-token sequences for --seconds per unroll:
                tokens/s, steps, peak GPU memory (every step with the target's pass: no features kept)
    syncs       a few steps under torch.cuda.set_sync_debug_mode("warn"): every host synchronisation inside the
                training loop is listed by source line (expected: none per step; the final read of the sums)
    round       one learning round's work on 64 requests of 128 + 384 tokens: OnlineLearner.fit (its FeatureBank
                recomputes the target's features once) and the exact replay of 32 held-out requests at k = 5 by a
                head that accepts nothing (the most rounds a replay can take)
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from devtools.tiny_models import tiny_config
from pipelines.heads.losses import HeadLossSettings
from pipelines.heads.model import DraftHead, HeadDraft
from pipelines.heads.train import BootstrapSettings, train_head
from pipelines.kv_cache import ATTENTION_NAME
from pipelines.learners import LearnerSettings, make_learner
from pipelines.replay import replay
from pipelines.types import KIND_BONUS, NO_DRAFT_TOKEN, RequestFeedback

SHAPES = {
    # Qwen2.5-Coder-1.5B-Instruct's config (the target of the real pair)
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
}


def random_target(shape: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(300, 4, 64, 0) if shape == "tiny" else Qwen2Config(**SHAPES[shape])
    with torch.device(device):  # initialised where it runs: a CPU init of 1.5B random weights takes a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=ATTENTION_NAME)
    return model.eval().requires_grad_(False)


def bootstrap(target, sequences, seconds: float, unroll: int) -> dict:
    draft = HeadDraft(DraftHead.for_target(target), target)
    torch.cuda.reset_peak_memory_stats()
    settings = BootstrapSettings(
        tokens=10**12,
        max_seconds=seconds,
        max_length=1024,
        batch_tokens=16384,
        progress_every_s=10,
        feature_cache_gib=0,  # the cost of a step with the target's pass (kept features skip it from epoch 2 on)
        loss=HeadLossSettings(unroll=unroll),
    )
    report = train_head(draft, sequences, settings)
    return {
        "unroll": unroll,
        "steps": report.steps,
        "tokens": report.tokens,
        "seconds": round(report.seconds, 2),
        "tokens_per_s": round(report.tokens / report.seconds),
        "loss_last": report.loss_last,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def syncs(target, sequences) -> dict:
    draft = HeadDraft(DraftHead.for_target(target), target)
    settings = BootstrapSettings(  # features kept (a set limit: the automatic one asks the device, a sync)
        tokens=16384 * 6, max_length=1024, batch_tokens=16384, progress_every_s=1e9, feature_cache_gib=1
    )
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = train_head(draft, sequences, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = sorted({f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught})
    return {"steps": report.steps, "synchronising_calls": len(caught), "where": where}


def fake_feedback(vocab: int, count: int, prompt: int, emitted: int, seed: int) -> list[RequestFeedback]:
    """Greedy-looking feedback: every emitted token is its position's stored top-1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, emitted).astype(np.int32)
        topk = rng.integers(0, vocab, (emitted, 16)).astype(np.int32)
        topk[:, 0] = tokens
        logprobs = np.sort(-rng.random((emitted, 16)) * 8, axis=1)[:, ::-1].astype(np.float16)
        out.append(
            RequestFeedback(
                prompt_ids=rng.integers(0, vocab, prompt).astype(np.int32),
                token_ids=tokens,
                kinds=np.full(emitted, KIND_BONUS, dtype=np.uint8),
                draft_tokens=np.full(emitted, NO_DRAFT_TOKEN, dtype=np.int32),
                target_topk_ids=topk,
                target_topk_logprobs=np.ascontiguousarray(logprobs),
                draft_version="none",
            )
        )
    return out


def learning_round(target) -> dict:
    vocab = target.config.vocab_size
    train, heldout = fake_feedback(vocab, 64, 128, 384, 0), fake_feedback(vocab, 32, 128, 384, 1)
    draft = HeadDraft(DraftHead.for_target(target), target)
    learner = make_learner(LearnerSettings(name="online", lr=1e-4, trainable="all", epochs=2, batch_size=8))
    torch.cuda.synchronize()
    started = time.perf_counter()
    report = learner.fit(draft, train, base_version="base")
    torch.cuda.synchronize()
    fit_s = time.perf_counter() - started
    metrics = replay(draft, heldout, k=5, batch_size=32)
    return {
        "fit_s": round(fit_s, 2),
        "fit_steps": report.steps,
        "fit_positions": report.tokens,
        "replay_s": round(metrics.seconds, 2),
        "replay_forwards": metrics.forwards,
        "replay_tokens": metrics.tokens,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--unroll", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    target = random_target(args.shape, "cuda")
    vocab = target.config.vocab_size
    sequences = torch.randint(0, vocab, (512, 1024), generator=torch.Generator().manual_seed(0)).tolist()
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "syncs": syncs(target, sequences),
        "bootstrap": [bootstrap(target, sequences, args.seconds, unroll) for unroll in args.unroll],
        "round": learning_round(target),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
