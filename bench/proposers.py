"""Proposer benchmark: tokens/s and AvgLen of target-only, the draft LM, a head, suffix, hybrid and auto, per domain
and batch size, all through our own engine on the same GPU in one run (the figure that counts is the ratio to our
target-only).

    python -m bench.proposers --target T --draft D [--head H] --device cuda --dtype bfloat16 --out OUT \\
        [--domains text_to_sql humaneval ...] [--batch 1 8] \\
        [--modes none suffix:8 draft:5 head:3 head:5 head:7 hybrid:5 auto] [--compile] [--scheduling static]

A mode is `proposer[:k]` (k defaults to --k). draft modes use the draft LM (--draft), head modes the head folder
(--head); hybrid and auto use the head when one is given, else the draft LM. All timed prompts of a (domain, mode)
are submitted at once: with continuous batching (the default) a finished row's slot is refilled at once.

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
from pipelines.models import load_head, load_pair
from pipelines.settings import EngineSettings
from pipelines.types import GenerationRequest

MODES = ("none", "suffix:8", "draft:5", "hybrid:5", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", help="draft LM (draft modes; hybrid and auto without --head)")
    parser.add_argument("--head", help="head folder (head modes; hybrid and auto)")
    parser.add_argument(
        "--domains",
        nargs="+",
        default=["text_to_sql", "humaneval", "sharegpt", "shakespeare", "stdlib_code"],
        choices=sorted(DOMAINS),
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="proposer[:k] each (default %(default)s)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warm", type=int, default=32, help="earlier prompts of the stream, decoded untimed")
    parser.add_argument("--timed", type=int, default=16, help="timed prompts per mode at batch 1")
    parser.add_argument("--timed8", type=int, default=32, help="timed prompts per mode at batch > 1")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=768)
    parser.add_argument("--k", type=int, default=5, help="k of a fixed proposer whose mode names none")
    parser.add_argument("--scheduling", default="continuous", choices=["continuous", "static"])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model forwards")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", required=True, help="folder for proposers.json")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--shape-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode the timed prompts once target-only, untimed, before the modes (default on): the first pass over "
        "new prompt lengths pays one-time kernel costs that otherwise land on whichever mode runs first",
    )
    return parser.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_for(mode: str, models: dict):
    """The model a mode drafts with: the draft LM or the head (hybrid and auto: the head when given); None for none
    and suffix, or when the model it needs was not given."""
    proposer = mode.split(":")[0]
    if proposer in ("none", "suffix"):
        return None
    if proposer in ("draft", "head"):
        return models[proposer]
    return models["head"] if models["head"] is not None else models["draft"]


def build(mode: str, batch: int, args, target, models: dict, tokenizer) -> tuple[SpeculativeEngine, float]:
    """An engine for `mode` (proposer[:k]) with the model it needs: models["draft"] (draft LM), models["head"]."""
    proposer, _, k = mode.partition(":")
    settings = EngineSettings(
        proposer=proposer,
        k=int(k or args.k),
        max_batch_size=batch,
        max_seq_len=args.max_seq_len,
        compile=args.compile,
        scheduling=args.scheduling,
    )
    model = model_for(mode, models)
    started = time.perf_counter()
    engine = SpeculativeEngine(target, model, tokenizer, settings)
    engine.warmup()
    sync(args.device)
    return engine, time.perf_counter() - started


def decode(engine: SpeculativeEngine, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    """All prompts submitted at once (the engine's slots take them as they free up)."""
    requests = [GenerationRequest(id=str(i), input_ids=ids, max_new_tokens=new_tokens) for i, ids in enumerate(prompts)]
    before = Counter(engine.controller.choices) if engine.controller is not None else Counter()
    sync(device)
    started = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    choices = Counter({str(v): n for v, n in (engine.controller.choices - before).items()}) if engine.controller else {}
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
    history = decode(engines["none"], warm, args.new_tokens, args.device) if args.warm else None
    if args.shape_warmup:  # the first pass over new prompt lengths pays one-time kernel costs: keep them out of timing
        decode(engines["none"], timed, args.new_tokens, args.device)
    rows = {}
    for mode in order:
        engine = engines.get(mode)
        if engine is None:  # its engine failed to build
            continue
        try:
            engine.reset_stream()
            if history is not None:
                engine.add_to_stream(history["outputs"], warm)
            rows[mode] = decode(engine, timed, args.new_tokens, args.device)
        except Exception as exc:  # one mode's failure must not cost the run the others' figures
            print(f"[proposers] {domain} b{batch} {mode} FAILED: {type(exc).__name__}: {exc}", flush=True)
            engines.pop(mode)
            continue
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
    models = {"draft": draft, "head": load_head(args.head, target) if args.head else None}
    modes = [m for m in args.modes if model_for(m, models) is not None or m.split(":")[0] in ("none", "suffix", "auto")]
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
            try:
                engines[mode], seconds = build(mode, batch, args, target, models, tokenizer)
            except Exception as exc:  # reported, and the other modes still run
                print(f"[proposers] b{batch} {mode}: FAILED to build: {type(exc).__name__}: {exc}", flush=True)
                report.setdefault("errors", {})[f"b{batch}/{mode}"] = f"{type(exc).__name__}: {exc}"
                continue
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
