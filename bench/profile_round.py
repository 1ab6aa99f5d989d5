"""On a CUDA machine: where does the time of one decoding round go? (kernel table from torch.profiler)

    python -m bench.profile_round --target DIR --draft DIR [--k 5] [--batch 1] [--compile] [--no-graphs]
    python -m bench.profile_round --target DIR [--head DIR] --variants none:0 suffix:2 head:2 --batch-sizes 1 8

Decodes a few chat prompts to warm up, then profiles one more generate() call and prints the CUDA kernels
sorted by total time, with call counts, and the wall time per round.

With --variants: per batch size and variant of an auto engine, the captured round's replay time beside the sum of
its kernels' GPU time in eager rounds (the gap is launch and scheduling overhead inside the graph), kernels per
round, and, by kernel name, the GPU time a variant adds over a target-only round and what it drops (a wider verify
runs other kernel variants). What a speculative round pays for its machinery, before any token is accepted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.decode import load_prompts
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.kv_cache import ATTENTION_NAME
from pipelines.models import load_pair
from pipelines.types import GenerationRequest


def random_qwen_pair():
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    shapes = {
        "target": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
        "draft": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    }
    torch.manual_seed(0)
    models_ = []
    for shape in shapes.values():
        config = Qwen2Config(
            vocab_size=151936,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            eos_token_id=151643,
            **shape,
        )
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=ATTENTION_NAME)
        models_.append(model.eval().requires_grad_(False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    return models_[0], models_[1], tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", help="HF folder or .gguf; omit with --random-qwen")
    parser.add_argument(
        "--random-qwen",
        action="store_true",
        help="random-init Qwen2.5 1.5B/0.5B shapes (timing only: acceptance is meaningless)",
    )
    parser.add_argument("--draft")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="with --variants")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--head", help="head folder, for head and hybrid variants (with --variants)")
    parser.add_argument("--variants", nargs="+", help="proposer:k each (auto engine; see the module docstring)")
    parser.add_argument("--rounds", type=int, default=20, help="profiled eager rounds per variant (--variants)")
    args = parser.parse_args()
    if args.variants:
        profile_variants(args)
        return
    if args.random_qwen:
        target, draft, tokenizer = random_qwen_pair()
        draft = draft if args.k > 0 else None
    else:
        target, draft, tokenizer = load_pair(args.target, args.draft, "bfloat16", "cuda")
    # The engine runs on the target's device; a fixed draft proposer with k (k 0: target-only).
    settings = EngineSettings(
        proposer="draft" if draft is not None else "none",
        k=args.k if draft is not None else 0,
        max_batch_size=args.batch,
        max_seq_len=1024,
        cuda_graphs=not args.no_graphs,
        compile=args.compile,
    )
    engine = SpeculativeEngine(target, draft, tokenizer, settings)
    engine.warmup()
    if args.random_qwen:
        prompts = [torch.randint(0, 150000, (128,)).tolist() for _ in range(args.batch)]
    else:
        prompts = load_prompts("bench/data/humaneval.jsonl", args.batch, tokenizer, chat=True)
    requests = [GenerationRequest(id=str(i), input_ids=ids, max_new_tokens=args.new) for i, ids in enumerate(prompts)]
    engine.generate(requests)
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = engine.generate(requests)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    forwards = max(r.counters.target_forwards for r in results)
    print(
        f"k={settings.k} batch={args.batch}: {seconds * 1000:.1f} ms for {forwards} rounds "
        f"= {seconds / forwards * 1000:.2f} ms per round (prefill and collect included)"
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(requests)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=35, max_name_column_width=70)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        prof.export_chrome_trace(str(Path(args.out).with_suffix(".trace.json")))


def profile_variants(args) -> None:
    from pipelines.models import load_head
    from pipelines.proposers import Variant
    from pipelines.round import run_round

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    target, _, tokenizer = load_pair(args.target, None, dtype, device)
    head = load_head(args.head, target) if args.head else None
    variants = [Variant(name, int(k)) for name, k in (v.split(":") for v in args.variants)]
    choices = sorted({v.k for v in variants if v.k})
    settings = EngineSettings(max_batch_size=max(args.batch_sizes), max_seq_len=1024, auto={"k_choices": choices})
    engine = SpeculativeEngine(target, head, tokenizer, settings)
    engine.warmup()
    cuda = device == "cuda"  # on a CPU (a dry run) only the table's shape means anything
    rows = []
    for bucket in args.batch_sizes:
        view = engine._views[bucket]
        view.active.zero_()
        for variant in variants:
            replay_ms = engine.graphs.seconds_per_round(bucket, variant) * 1e3 if cuda else float("nan")
            with torch.inference_mode():
                run_round(engine._models, view, variant, True)  # untimed: allocations, kernel set-up
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    for _ in range(args.rounds):
                        run_round(engine._models, view, variant, True)
                    if cuda:
                        torch.cuda.synchronize()
            kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / args.rounds
            per_name: dict[str, float] = {}
            for event in kernels:
                per_name[event.name] = per_name.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3 / args.rounds
            rows.append((bucket, str(variant), replay_ms, gpu_ms, len(kernels) / args.rounds, per_name))
    print(f"{'batch':>5} {'variant':<10} {'replay ms':>9} {'kernels ms':>10} {'kernels':>7}")
    for bucket, variant, replay_ms, gpu_ms, count, _ in rows:
        print(f"{bucket:>5} {variant:<10} {replay_ms:>9.3f} {gpu_ms:>10.3f} {count:>7.0f}")
    base = {bucket: per_name for bucket, variant, *_, per_name in rows if variant == "none:0"}
    for bucket, variant, *_, per_name in rows:
        if variant == "none:0" or bucket not in base:
            continue
        # by kernel name, both ways: a wider verify runs other kernel variants than target-only's, so what a variant
        # adds under one name is partly what it no longer runs under another
        names = set(per_name) | set(base[bucket])
        delta = sorted(((per_name.get(n, 0.0) - base[bucket].get(n, 0.0), n) for n in names), reverse=True)
        print(f"batch {bucket} {variant}: GPU time per round against none:0, by kernel name (most added, most dropped)")
        for ms, name in delta[:8] + [d for d in delta[-4:] if d[0] < 0]:
            print(f"  {ms * 1e3:+9.1f} us  {name[:100]}")
    if args.out:
        fields = ("batch", "variant", "replay_ms", "kernels_ms", "kernels", "kernel_ms_by_name")
        Path(args.out).write_text(json.dumps([dict(zip(fields, row)) for row in rows]))


if __name__ == "__main__":
    main()
