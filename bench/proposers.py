"""Proposer benchmark: tokens/s and AvgLen of target-only, draft, suffix, hybrid and auto, per domain and batch size,
all through our own engine on the same GPU in one run (the figure that counts is the ratio to our target-only).

    python -m bench.proposers --target T --draft D --device cuda --dtype bfloat16 --out OUT \\
        [--domains text_to_sql humaneval ...] [--batch 1 8] [--modes none draft suffix hybrid auto] [--compile]

Per (batch size, mode) one engine is built and warmed up once (CUDA graphs, the controller's cost profile: its
warm-up time is reported). Per domain, a stream of `--warm` earlier prompts is decoded once target-only and its
completions are added to every engine's stream cache (decoding is lossless, so these are the completions every
engine would have produced and remembered; the daemon does this from its database at start), then each mode
decodes the same `--timed` prompts (batch 1) or `--timed8` prompts (batch 8); the modes run in a rotated order per
domain, so no mode is always first on new prompt shapes. Tokens/s counts emitted tokens over wall time, prefill
included. Prints a table last and writes JSON (every figure, auto's choices, match rates against target-only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from bench.learning import DOMAINS, domain_prompts
from pipelines.engine import SpeculativeEngine
from pipelines.models import load_pair
from pipelines.settings import EngineSettings
from pipelines.types import GenerationRequest

MODES = ("none", "draft", "suffix", "hybrid", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft")
    parser.add_argument(
        "--domains",
        nargs="+",
        default=["text_to_sql", "humaneval", "sharegpt", "shakespeare", "stdlib_code"],
        choices=sorted(DOMAINS),
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warm", type=int, default=32, help="earlier prompts of the stream, decoded untimed")
    parser.add_argument("--timed", type=int, default=16, help="timed prompts per mode at batch 1")
    parser.add_argument("--timed8", type=int, default=32, help="timed prompts per mode at batch > 1")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=768)
    parser.add_argument("--k", type=int, default=5, help="k of the fixed proposers (draft, suffix, hybrid)")
    parser.add_argument("--suffix-k", type=int, default=8, help="k of the fixed suffix proposer")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model forwards")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", required=True, help="folder for proposers.json")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    return parser.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(mode: str, batch: int, args, target, draft, tokenizer) -> tuple[SpeculativeEngine, float]:
    k = args.suffix_k if mode == "suffix" else args.k
    settings = EngineSettings(
        proposer=mode, k=k, max_batch_size=batch, max_seq_len=args.max_seq_len, compile=args.compile
    )
    uses_draft = mode in ("draft", "hybrid", "auto")
    started = time.perf_counter()
    engine = SpeculativeEngine(target, draft if uses_draft else None, tokenizer, settings)
    engine.warmup()
    sync(args.device)
    return engine, time.perf_counter() - started


def decode(engine: SpeculativeEngine, prompts: list[list[int]], batch: int, new_tokens: int, device: str) -> dict:
    requests = [GenerationRequest(id=str(i), input_ids=ids, max_new_tokens=new_tokens) for i, ids in enumerate(prompts)]
    choices: Counter[str] = Counter()
    results = []
    sync(device)
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        results += engine.generate(requests[start : start + batch])
        choices[str(engine.last_variant)] += 1
    sync(device)
    seconds = time.perf_counter() - started
    tokens = sum(r.counters.emitted for r in results)
    forwards = sum(r.counters.target_forwards for r in results)
    by_proposer: Counter[str] = Counter()
    for r in results:
        for name, counts in r.counters.by_proposer.items():
            by_proposer[f"{name}_drafted"] += counts["drafted"]
            by_proposer[f"{name}_accepted"] += counts["accepted"]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "avg_len": tokens / forwards,
        "choices": dict(choices),
        "by_proposer": dict(by_proposer),
        "outputs": [r.token_ids for r in results],
    }


def run_domain(domain: str, batch: int, engines: dict, args, tokenizer, order: list[str]) -> dict:
    count = args.timed if batch == 1 else args.timed8
    prompts = domain_prompts(domain, tokenizer, args.warm + count, args.max_prompt_tokens)
    warm, timed = prompts[: args.warm], prompts[args.warm :]
    history = decode(engines["none"], warm, max(args.batch), args.new_tokens, args.device) if args.warm else None
    rows = {}
    for mode in order:
        engine = engines[mode]
        engine.reset_stream()
        if history is not None:
            engine.add_to_stream(history["outputs"], warm)
        rows[mode] = decode(engine, timed, batch, args.new_tokens, args.device)
        if engine.controller is not None:
            rows[mode]["controller"] = engine.controller.snapshot()
    base = rows.get("none")
    for row in rows.values():
        if base is not None:
            row["vs_target_only"] = row["tok_s"] / base["tok_s"]
            row["match_target_only"] = sum(a == b for a, b in zip(row["outputs"], base["outputs"])) / len(timed)
    for row in rows.values():
        row.pop("outputs")
    return rows


def write(report: dict, args) -> None:
    report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"proposers{args.tag}.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> None:
    args = parse_args(argv)
    target, draft, tokenizer = load_pair(args.target, args.draft, args.dtype, args.device)
    modes = [m for m in args.modes if args.draft or m not in ("draft", "hybrid")]
    if "none" not in modes:
        modes.insert(0, "none")
    report = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "results": {},
        "warmup_s": {},
    }
    for batch in args.batch:
        engines = {}
        for mode in modes:
            engines[mode], seconds = build(mode, batch, args, target, draft, tokenizer)
            report["warmup_s"][f"b{batch}/{mode}"] = seconds
            if engines[mode].controller is not None:
                report.setdefault("costs_ms", {})[f"b{batch}/{mode}"] = engines[mode].controller.snapshot()["costs_ms"]
            print(f"[proposers] b{batch} {mode}: warm-up {seconds:.1f} s", flush=True)
        for index, domain in enumerate(args.domains):
            order = modes[index % len(modes) :] + modes[: index % len(modes)]
            rows = run_domain(domain, batch, engines, args, tokenizer, order)
            report["results"][f"{domain}/b{batch}"] = rows
            write(report, args)  # after every domain: a run cut short still leaves what it measured
            print(
                f"[proposers] {domain} b{batch}: "
                + ", ".join(f"{m} {r['tok_s']:.0f} tok/s AvgLen {r['avg_len']:.2f}" for m, r in rows.items()),
                flush=True,
            )
        del engines
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write(report, args)
    print(f"\n{'domain':12s} {'b':>2s} " + " ".join(f"{m:>15s}" for m in modes) + "   (tok/s xTO, AvgLen)")
    for key, rows in report["results"].items():
        domain, batch = key.split("/")
        cells = [
            f"{rows[m]['tok_s']:6.0f} {rows[m].get('vs_target_only', 1):4.2f}x {rows[m]['avg_len']:4.2f}"
            if m in rows
            else ""
            for m in modes
        ]
        print(f"{domain:12s} {batch[1:]:>2s} " + " ".join(f"{c:>15s}" for c in cells))
    auto = {k: r["auto"]["choices"] for k, r in report["results"].items() if "auto" in r}
    print("auto choices:", json.dumps(auto))


if __name__ == "__main__":
    main()
