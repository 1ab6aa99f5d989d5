"""`onlinespec generate`: decode JSONL prompts from stdin with the speculative engine, one JSON result per line.

Input lines: {"id": ..., "prompt": "..."} (with --chat the tokenizer's chat template is applied) or
{"id": ..., "input_ids": [...]}; optional per line: max_new_tokens, temperature, top_p, seed, stop.
A bad line produces {"id": ..., "error": "..."} and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from pipelines.settings import PROPOSER_NAMES
from pipelines.types import GenerationRequest, GenerationResult

LINE_FIELDS = {"id", "prompt", "input_ids", "max_new_tokens", "temperature", "top_p", "seed", "stop"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="decode JSONL prompts from stdin (no Kafka, no database)")
    parser.add_argument("--target", required=True, help="target model: HF folder or .gguf file")
    parser.add_argument("--draft", help="draft model sharing the target's vocabulary")
    parser.add_argument("--no-draft", action="store_true", help="no draft model (proposers none, suffix, auto)")
    parser.add_argument("--proposer", choices=PROPOSER_NAMES, default="auto",
                        help="what drafts: none, draft, suffix, hybrid or auto (default auto; see config.yaml)")
    parser.add_argument("--k", type=int, default=5,
                        help="draft tokens per round of a fixed proposer, 0-16 (default 5; 0 = target-only)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default per line (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="default seed for lines that give none")
    parser.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache slots per request")
    parser.add_argument("--top-m", type=int, default=16, help="target log-probs kept per position")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to `prompt`")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.set_defaults(func=run)


def parse_line(line: str, line_number: int, args, tokenizer) -> GenerationRequest:
    """Turn one input line into a request; raises ValueError with a reason the user can act on."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {line_number}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {line_number}: expected a JSON object")
    unknown = set(obj) - LINE_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise ValueError("`id` must be a non-empty string")
    if ("prompt" in obj) == ("input_ids" in obj):
        raise ValueError("give exactly one of `prompt` or `input_ids`")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError("`prompt` must be a string")
        input_ids = _tokenize(obj["prompt"], tokenizer, args.chat)
    else:
        input_ids = obj["input_ids"]
        if not isinstance(input_ids, list) or not all(isinstance(t, int) and t >= 0 for t in input_ids):
            raise ValueError("`input_ids` must be a list of non-negative integers")
        if any(t >= len(tokenizer) for t in input_ids):
            raise ValueError(f"`input_ids` holds ids outside the vocabulary of {len(tokenizer)}")
    stop = obj.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    return GenerationRequest(
        id=obj["id"],
        input_ids=input_ids,
        max_new_tokens=int(obj.get("max_new_tokens", args.max_new_tokens)),
        temperature=float(obj.get("temperature", args.temperature)),
        top_p=float(obj.get("top_p", args.top_p)),
        seed=int(obj.get("seed", args.seed)),
        stop=tuple(stop),
    )


def _tokenize(prompt: str, tokenizer, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def result_line(result: GenerationResult) -> dict[str, Any]:
    c = result.counters
    return {
        "id": result.id,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "drafted": c.drafted,
        "accepted": c.accepted,
        "mean_accepted_length": round(c.mean_accepted_length, 4),
        "target_forwards": c.target_forwards,
        "seconds": round(result.seconds, 4),
    }


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    draft_ref = None if args.no_draft else args.draft
    if not args.no_draft and not args.draft:
        print("error: give --draft DIR, or --no-draft to decode without a draft model", file=sys.stderr)
        return 2
    # Imported here: torch and transformers take seconds to import, and every other command skips them.
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import load_pair

    target, draft, tokenizer = load_pair(args.target, draft_ref, args.dtype, args.device)
    try:
        settings = EngineSettings(proposer=args.proposer, k=args.k, max_batch_size=args.batch_size,
                                  max_seq_len=args.max_seq_len, top_m=args.top_m)  # fmt: skip
        engine = SpeculativeEngine(target, draft, tokenizer, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine.warmup()

    pending: list[GenerationRequest] = []
    totals = {"requests": 0, "errors": 0, "tokens": 0, "forwards": 0}
    started = time.perf_counter()

    def flush() -> None:
        for result in engine.generate(pending):
            print(json.dumps(result_line(result)), file=stdout, flush=True)
            totals["tokens"] += result.counters.emitted
            totals["forwards"] += result.counters.target_forwards
        pending.clear()

    for number, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        try:
            request = parse_line(line, number, args, tokenizer)
            if len(request.input_ids) > engine.max_prompt_tokens:
                raise ValueError(f"prompt has {len(request.input_ids)} tokens, the limit is {engine.max_prompt_tokens}")
        except ValueError as exc:
            totals["errors"] += 1
            print(json.dumps({"id": _id_of(line), "error": str(exc)}), file=stdout, flush=True)
            continue
        totals["requests"] += 1
        pending.append(request)
        if len(pending) == args.batch_size:
            flush()
    if pending:
        flush()
    elapsed = time.perf_counter() - started
    avg_len = totals["tokens"] / totals["forwards"] if totals["forwards"] else 0.0
    print(
        f"generate: {totals['requests']} requests, {totals['errors']} errors, {totals['tokens']} tokens in "
        f"{elapsed:.1f} s ({totals['tokens'] / max(elapsed, 1e-9):.1f} tok/s), mean accepted length {avg_len:.2f}",
        file=sys.stderr,
    )
    return 0


def _id_of(line: str) -> str | None:
    try:
        obj = json.loads(line)
        return obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
    except json.JSONDecodeError:
        return None
