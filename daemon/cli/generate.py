"""`onlinespec generate`: decode JSONL prompt records from stdin with the speculative engine; no Kafka, no database.

Input: one record per line, the daemon's own input contract (daemon/serving/messages.py): `id`, one of `prompt`
or `messages`, optional max_new_tokens, temperature, top_p, seed, stop, metadata. --max-new-tokens,
--temperature, --top-p and --seed fill the fields a line leaves out (a line without a seed gets the daemon's
seed, derived from its id); with --chat a `prompt` is rendered as the one user turn of a chat.

Output: one JSON line per record in input order, the daemon's output contract (what it publishes on the
completions topic), or {"id", "line", "code", "error"} for a record that cannot be served; the other records
still run. Progress lines and a summary go to stderr. Exit 0 when every record was served, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TextIO

from daemon.cli.errors import EXIT_USAGE, CommandError, validation_summary
from daemon.cli.progress import Progress
from pipelines.settings import PROPOSER_NAMES

DEFAULTED_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed")  # flag dest == field name


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="decode JSONL prompts from stdin (no Kafka, no database)")
    parser.add_argument("--target", required=True, help="target model: HF folder or .gguf file")
    parser.add_argument(
        "--draft", help="draft LM sharing the target's vocabulary, a head folder (draft init), or new-head"
    )
    parser.add_argument("--no-draft", action="store_true", help="no draft model (proposers none, suffix, auto)")
    parser.add_argument(
        "--proposer",
        choices=PROPOSER_NAMES,
        default="auto",
        help="what drafts: none, draft, head, suffix, hybrid or auto (default auto; see config.yaml)",
    )
    parser.add_argument(
        "--k", type=int, default=5, help="draft tokens per round of a fixed proposer, 0-16 (default 5; 0 = target-only)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for lines that give none (default 128)")
    parser.add_argument("--temperature", type=float, help="for lines that give none (default 0: greedy)")
    parser.add_argument("--top-p", type=float, help="for lines that give none (default 1)")
    parser.add_argument("--seed", type=int, help="for lines that give none (default: derived from the id)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache slots per request (default 2048)")
    parser.add_argument("--top-m", type=int, default=16, help="target log-probs kept per position (default 16)")
    parser.add_argument("--chat", action="store_true", help="render a `prompt` as one user turn of the chat template")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    settings, limits = check_arguments(args)
    progress = Progress("generate: ")
    engine, tokenizer = load_engine(args, settings, progress)
    batch = Batch(engine, stdout, progress)
    for number, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        batch.add(number, line, lambda text: read_record(text, args, limits, tokenizer, engine.max_prompt_tokens))
        if len(batch.pending) == args.batch_size:
            batch.flush()
    batch.flush()
    progress.say(batch.summary())
    return 0 if batch.errors == 0 else 1


def check_arguments(args: argparse.Namespace):
    """Engine settings and input limits from the flags, checked before any model is loaded."""
    from pydantic import ValidationError

    from daemon.config import LimitSettings, check_device
    from pipelines.settings import EngineSettings

    if not args.no_draft and not args.draft:
        raise CommandError("give --draft DIR, or --no-draft to decode without a draft model", EXIT_USAGE)
    if args.no_draft and args.proposer in ("draft", "head", "hybrid"):
        raise CommandError(f"--proposer {args.proposer} needs a draft model; drop --no-draft", EXIT_USAGE)
    try:
        check_device(args.device)
        settings = EngineSettings(
            proposer=args.proposer,
            k=args.k,
            max_batch_size=args.batch_size,
            max_seq_len=args.max_seq_len,
            top_m=args.top_m,
        )
    except ValidationError as exc:
        raise CommandError(validation_summary(exc), EXIT_USAGE) from None
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if not 1 <= args.max_new_tokens < args.max_seq_len:
        raise CommandError(
            f"--max-new-tokens must be between 1 and --max-seq-len - 1 ({args.max_seq_len - 1}), "
            f"got {args.max_new_tokens}",
            EXIT_USAGE,
        )
    limits = LimitSettings(default_max_new_tokens=args.max_new_tokens, max_new_tokens=args.max_seq_len - 1)
    from pipelines.models import check_reference  # with torch: generate needs it next anyway

    for ref in (args.target, None if args.no_draft else args.draft):
        if ref:
            check_reference(ref)
    return settings, limits


def load_engine(args, settings, progress: Progress):
    # Imported here: torch and transformers take seconds to import, and every other command skips them.
    from pipelines.engine import SpeculativeEngine
    from pipelines.models import load_pair

    draft = None if args.no_draft else args.draft
    progress.say(f"loading target {args.target}" + (f" and draft {draft}" if draft else "") + f" on {args.device}")
    started = time.monotonic()
    target, draft_model, tokenizer = load_pair(args.target, draft, args.dtype, args.device)
    engine = SpeculativeEngine(target, draft_model, tokenizer, settings)
    engine.warmup()
    progress.say(f"ready after {time.monotonic() - started:.1f} s (proposer {settings.proposer}, k {settings.k})")
    return engine, tokenizer


def read_record(line: str, args, limits, tokenizer, max_prompt_tokens: int):
    """One input line as (engine request, metadata); InvalidMessage names what is wrong with it."""
    from daemon.serving.messages import parse_prompt, tokenize

    message = parse_prompt(with_defaults(line, args).encode("utf-8", errors="surrogatepass"), limits)
    if args.chat and message.prompt is not None:
        message = dataclasses.replace(message, prompt=None, messages=({"role": "user", "content": message.prompt},))
    return tokenize(message, tokenizer, max_prompt_tokens), message.metadata


def with_defaults(line: str, args) -> str:
    """The line with the flags written into the fields it leaves out. A line that is not a JSON object goes on
    as it is: parse_prompt says what is wrong with it."""
    try:
        obj = json.loads(line)
    except ValueError:
        return line
    if not isinstance(obj, dict):
        return line
    given = {name: getattr(args, name) for name in DEFAULTED_FIELDS if getattr(args, name) is not None}
    return json.dumps({**given, **obj}, ensure_ascii=False)


class Batch:
    """Requests waiting to be decoded together; results and errors written in input order."""

    def __init__(self, engine, stdout: TextIO, progress: Progress):
        self.engine = engine
        self.stdout = stdout
        self.progress = progress
        self.pending: list[tuple[object, dict | None, float]] = []  # (request, metadata, read at)
        self.served = self.errors = self.tokens = self.forwards = 0
        self.started = time.monotonic()

    def add(self, number: int, line: str, read) -> None:
        from daemon.serving.messages import InvalidMessage

        try:
            request, metadata = read(line)
        except InvalidMessage as exc:
            self.flush()  # keep the output in input order
            self.errors += 1
            self._write({"id": exc.request_id, "line": number, "code": exc.code, "error": exc.reason})
            return
        self.pending.append((request, metadata, time.monotonic()))

    def flush(self) -> None:
        from daemon.serving.messages import completion_payload

        if not self.pending:
            return
        decode_started = time.monotonic()
        results = self.engine.generate([request for request, _, _ in self.pending])
        for (request, metadata, read_at), result in zip(self.pending, results, strict=True):
            self._write(completion_payload(result, len(request.input_ids), metadata, decode_started - read_at))
            self.served += 1
            self.tokens += result.counters.emitted
            self.forwards += result.counters.target_forwards
        self.pending.clear()
        self.progress.update(self.summary())

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        avg_len = self.tokens / self.forwards if self.forwards else 0.0
        return (
            f"{self.served} served, {self.errors} errors, {self.tokens} tokens in {elapsed:.1f} s "
            f"({self.tokens / max(elapsed, 1e-9):.1f} tok/s), mean accepted length {avg_len:.2f}"
        )

    def _write(self, payload: dict) -> None:
        print(json.dumps(payload, ensure_ascii=False), file=self.stdout, flush=True)
