"""Decode benchmark: HF generate, HF assisted generation, our target-only and our speculative decoding.

All on the same prompts in one run, batch 1 and batch 8, greedy. Prints a table last and writes JSON.

    python -m bench.decode --target T.gguf --draft D.gguf --prompts bench/data/humaneval.jsonl --chat \
        --device cuda --dtype bfloat16 --out results.json
    python -m bench.decode --random-llama8b --device cuda --out llama.json   # bandwidth-floor check

Tokens/s counts generated tokens over wall time, prefill included, after a warm-up run of the same shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.kv_cache import ATTENTION_NAME
from pipelines.models import load_pair
from pipelines.prompts import encode_prompt
from pipelines.types import GenerationRequest


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_prompts(path: str, count: int, tokenizer, chat: bool) -> list[list[int]]:
    prompts = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()][:count]
    return [encode_prompt(tokenizer, prompt, chat=chat) for prompt in prompts]


def time_hf(model, prompts, max_new, device, assistant=None) -> dict:
    model.set_attn_implementation("sdpa")
    if assistant is not None:
        assistant.set_attn_implementation("sdpa")
    outputs, tokens = [], 0
    kwargs = dict(max_new_tokens=max_new, do_sample=False, assistant_model=assistant)
    model.generate(torch.tensor([prompts[0]], device=device), **{**kwargs, "max_new_tokens": 8})  # warm-up
    sync(device)
    started = time.perf_counter()
    for ids in prompts:
        out = model.generate(torch.tensor([ids], device=device), **kwargs)[0, len(ids) :].tolist()
        outputs.append(out)
        tokens += len(out)
    sync(device)
    seconds = time.perf_counter() - started
    model.set_attn_implementation(ATTENTION_NAME)
    if assistant is not None:
        assistant.set_attn_implementation(ATTENTION_NAME)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "outputs": outputs}


def time_ours(engine: SpeculativeEngine, prompts, max_new, batch, device) -> dict:
    requests = [GenerationRequest(id=str(i), input_ids=ids, max_new_tokens=max_new) for i, ids in enumerate(prompts)]
    engine.generate(requests[:batch])  # warm-up: captures this batch size's graph
    sync(device)
    started = time.perf_counter()
    results = []
    for start in range(0, len(requests), batch):
        results.extend(engine.generate(requests[start : start + batch]))
    sync(device)
    seconds = time.perf_counter() - started
    tokens = sum(r.counters.emitted for r in results)
    forwards = sum(r.counters.target_forwards for r in results)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "avg_len": tokens / forwards,
        "outputs": [r.token_ids for r in results],
    }


def match_rate(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of sequences that are identical token for token."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def peak_memory_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(2**30, device=device, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * 10 / (time.perf_counter() - started)


def random_llama8b(device: str):
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        eos_token_id=128001,
        bos_token_id=128000,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=ATTENTION_NAME)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    return model.eval().requires_grad_(False), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--random-llama8b", action="store_true")
    parser.add_argument("--prompts", default="bench/data/humaneval.jsonl")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--n", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--hf-n", type=int, default=4, help="prompts for the slow HF baselines (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[5])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rows, report = (
        [],
        {"args": vars(args), "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
    )
    settings = lambda k, batch: EngineSettings(  # noqa: E731  (runs on the target's device; k 0 = target-only)
        proposer="draft" if k else "none", k=k, max_batch_size=batch, max_seq_len=args.max_seq_len, compile=args.compile
    )

    if args.random_llama8b:
        torch.manual_seed(0)
        started = time.perf_counter()
        target, tokenizer = random_llama8b(args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
        bandwidth = copy_bandwidth(args.device)
        floor_ms = weight_bytes / bandwidth * 1e3
        report["llama8b"] = {
            "weight_bytes": weight_bytes,
            "copy_bandwidth_Bps": bandwidth,
            "floor_ms": floor_ms,
            "init_seconds": time.perf_counter() - started,
        }
        prompts = [torch.randint(0, 128000, (128,)).tolist() for _ in range(max(args.n, 1))]
        hf = time_hf(target, prompts[:1], args.max_new_tokens, args.device)
        rows.append(("HF generate (8B random)", 1, hf["tok_s"], None))
        engine = SpeculativeEngine(target, None, tokenizer, settings(0, 1))
        ours = time_ours(engine, prompts[:2], args.max_new_tokens, 1, args.device)
        rows.append(("ours target-only (8B random)", 1, ours["tok_s"], ours["avg_len"]))
        rows.append((f"bandwidth floor ({floor_ms:.2f} ms/fwd)", 1, 1e3 / floor_ms, None))
        report["llama8b"].update(
            hf_tok_s=hf["tok_s"],
            ours_tok_s=ours["tok_s"],
            floor_tok_s=1e3 / floor_ms,
            fraction_of_floor=ours["tok_s"] * floor_ms / 1e3,
            peak_gib=peak_memory_gib(args.device),
        )
        del engine, target
        torch.cuda.empty_cache()
    if args.target:
        target, draft, tokenizer = load_pair(args.target, args.draft, args.dtype, args.device)
        prompts = load_prompts(args.prompts, args.n, tokenizer, args.chat)
        report["prompt_tokens"] = [len(p) for p in prompts]
        hf_target = time_hf(target, prompts[: args.hf_n], args.max_new_tokens, args.device)
        rows.append(("HF generate (target)", 1, hf_target["tok_s"], None))
        if draft is not None:
            hf_assisted = time_hf(target, prompts[: args.hf_n], args.max_new_tokens, args.device, assistant=draft)
            rows.append(("HF assisted generation", 1, hf_assisted["tok_s"], None))
            report["hf_assisted"] = {k: v for k, v in hf_assisted.items() if k != "outputs"}
        report["hf_target"] = {k: v for k, v in hf_target.items() if k != "outputs"}
        for batch in (1, 8):
            torch.cuda.reset_peak_memory_stats() if args.device.startswith("cuda") else None
            engine = SpeculativeEngine(target, None, tokenizer, settings(0, batch))
            base = time_ours(engine, prompts, args.max_new_tokens, batch, args.device)
            rows.append(("ours target-only", batch, base["tok_s"], base["avg_len"]))
            report[f"ours_target_b{batch}"] = {k: v for k, v in base.items() if k != "outputs"}
            report[f"ours_target_b{batch}"]["match_hf"] = match_rate(base["outputs"][: args.hf_n], hf_target["outputs"])
            del engine
            for k in args.k if draft is not None else []:
                engine = SpeculativeEngine(target, draft, tokenizer, settings(k, batch))
                spec = time_ours(engine, prompts, args.max_new_tokens, batch, args.device)
                rows.append((f"ours speculative k={k}", batch, spec["tok_s"], spec["avg_len"]))
                entry = {key: v for key, v in spec.items() if key != "outputs"}
                entry["match_target_only"] = match_rate(spec["outputs"], base["outputs"])
                entry["match_hf"] = match_rate(spec["outputs"][: args.hf_n], hf_target["outputs"])
                entry["peak_gib"] = peak_memory_gib(args.device)
                report[f"ours_spec_k{k}_b{batch}"] = entry
                del engine
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None

    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'method':40s} {'batch':>5s} {'tok/s':>9s} {'AvgLen':>7s}")
    for name, batch, tok_s, avg_len in rows:
        print(f"{name:40s} {batch:5d} {tok_s:9.1f} {'' if avg_len is None else f'{avg_len:7.2f}'}")
    for key, value in report.items():
        if isinstance(value, dict) and ("match_hf" in value or "peak_gib" in value):
            print(key, {k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()})


if __name__ == "__main__":
    main()
