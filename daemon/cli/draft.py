"""`onlinespec draft init --kind head`: bootstrap a fresh head against the target before it serves.

    data      --corpus records (text, or the daemon's prompt / messages contract: daemon/cli/corpus.py) are taught
              as they are; --prompts with --generate N adds the target's own greedy answers to N prompts
              (self-distillation: the features the head will read when it serves)
    held out  --heldout prompts never trained on (from --heldout-prompts, else the --prompts records after the
              first N), answered greedily by the target; the head's exact replay AvgLen at --k before and after
    train     pipelines.heads.train: AdamW with warm-up and cosine decay, float32 weights (bfloat16 autocast with a
              bfloat16 target), until the token budget (--tokens, or --epochs over the data) or --max-seconds of
              training; a progress line with tokens, tokens/s and ETA (rewritten on a terminal, every 10 s in logs)
    output    a head folder (head_config.json + head.safetensors, DraftHead.save) whose metadata holds the recipe
              (data, tokens, steps, time, settings) and the held-out numbers; it serves as the base version

--max-seconds bounds training; generating the target's answers and the held-out replay come on top (each is timed
in the recipe).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

from daemon.cli.errors import EXIT_USAGE, CommandError
from daemon.cli.progress import Progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("draft", help="drafts: init (bootstrap a head against the target)")
    commands = parser.add_subparsers(dest="draft_command", required=True)
    init = commands.add_parser(
        "init", help="train a fresh head against the target from a corpus and the target's own answers"
    )
    init.add_argument("--kind", choices=["head"], required=True, help="what to bootstrap: head")
    init.add_argument("--target", required=True, help="target model: HF folder or .gguf file")
    init.add_argument("--corpus", type=Path, help="JSONL: {text} or the daemon's {prompt}/{messages} records")
    init.add_argument("--prompts", type=Path, help="JSONL prompt records (the daemon's contract) for the target")
    init.add_argument("--generate", type=int, default=0, help="train on the target's answers to N prompts")
    init.add_argument("--max-new-tokens", type=int, default=256, help="answer length for records without one")
    init.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are skipped")
    init.add_argument("--generate-batch", type=int, default=16, help="prompts the target answers together")
    init.add_argument("--heldout-prompts", type=Path, help="JSONL prompts for the held-out AvgLen (default: --prompts)")
    init.add_argument("--heldout", type=int, default=32, help="held-out prompts (default 32; 0: no evaluation)")
    init.add_argument("--k", type=int, default=5, help="draft tokens per round of the held-out replay (default 5)")
    init.add_argument("--layers", type=int, default=1, help="decoder layers of the head (default 1)")
    init.add_argument("--init", choices=["last_layer", "random"], default="last_layer", help="how the layers start")
    init.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="tokens the head may propose: the N most frequent in the training data (a cheaper drafting step; "
        "default 0: the target's whole vocabulary)",
    )
    init.add_argument(
        "--feature-layers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also read the target's hidden state after its first N decoder layers, for each N (EAGLE-3 fusion, "
        "e.g. 2 14 for a 28-layer target; default: the last hidden state only)",
    )
    budget = init.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, help="token budget of training")
    budget.add_argument("--epochs", type=float, help="passes over the data (default 1 without --tokens)")
    init.add_argument("--max-seconds", type=float, help="stop training after this long, then save and evaluate")
    init.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    init.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per step (default 16384)")
    init.add_argument("--max-length", type=int, default=2048, help="tokens per training sequence (default 2048)")
    init.add_argument("--unroll", type=int, default=2, help="drafting steps trained per position (default 2)")
    init.add_argument("--regression-weight", type=float, default=0.1, help="feature regression weight (default 0.1)")
    init.add_argument(
        "--loss-vocab",
        choices=["draft", "whole"],
        default="draft",
        help="with --draft-vocab: train over the draft vocabulary only (default: faster, and what the head drafts "
        "from) or over the whole vocabulary (the online learners: their step-1 KL over the whole one, their chain "
        "term over the draft one)",
    )
    init.add_argument(
        "--feature-cache-gib",
        type=float,
        help="GiB of target features kept across epochs, so later epochs skip the target's pass (default: half the "
        "free GPU memory, a quarter of the available RAM on a CPU, at most what the features take; 0: recompute)",
    )
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    init.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="the target's dtype")
    init.add_argument("--out", type=Path, required=True, help="the head folder to write (new or empty)")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    settings = check_arguments(args)
    progress = Progress("draft init: ")
    target, tokenizer = load_target(args, progress)
    check_head_shape(args, target)
    sequences, heldout, data = gather_data(args, target, tokenizer, progress)
    if not sequences:
        raise CommandError("no training data: every corpus line and prompt was unusable")

    from pipelines.heads.model import DraftHead, HeadDraft, most_frequent_tokens
    from pipelines.heads.train import train_head
    from pipelines.models import model_identity

    data["target"]["identity"] = model_identity(target)  # what the daemon's checkpoints record as target_identity
    vocab = None
    if args.draft_vocab:
        try:
            vocab = most_frequent_tokens(sequences, args.draft_vocab, target.get_output_embeddings().weight.shape[0])
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        covered = _coverage(sequences, vocab)
        progress.say(f"draft vocabulary: the {len(vocab)} most frequent tokens, {covered:.1%} of the training tokens")
    head = DraftHead.for_target(
        target, args.layers, args.init, args.seed, draft_vocab=vocab, feature_layers=tuple(args.feature_layers)
    )
    draft = HeadDraft(head, target)
    before = evaluate(draft, heldout, args.k, progress, "fresh head")
    progress.say(f"training on {len(sequences)} sequences ({sum(map(len, sequences))} tokens) on {args.device}")
    report = train_head(draft, sequences, settings, on_progress=lambda p: progress.update(progress_line(p)))
    progress.say(
        f"trained {report.steps} steps, {report.tokens} tokens in {report.seconds:.1f} s "
        f"(stopped by {report.stopped_by}), loss {_number(report.loss_first)} -> {_number(report.loss_last)}; "
        f"target features of {report.cached_batches}/{report.batches} batches kept across epochs "
        f"({report.feature_cache_bytes / 2**30:.1f} of {report.feature_cache_limit_bytes / 2**30:.1f} GiB allowed)"
    )
    after = evaluate(draft, heldout, args.k, progress, "trained head")
    whole = None  # the same weights proposing any token: what the draft vocabulary costs in acceptance
    if vocab is not None:
        whole = evaluate(draft.with_whole_vocab(), heldout, args.k, progress, "...whole vocabulary")
    metadata = {
        "recipe": {
            **data,
            "head": {
                "layers": args.layers,
                "init": args.init,
                "seed": args.seed,
                "draft_vocab": args.draft_vocab,
                "feature_layers": list(args.feature_layers),
            },
        },
        "training": report.to_dict(),
        "heldout": heldout_record(args, heldout, before, after, whole),
        "created_at": datetime.now(UTC).isoformat(),
    }
    draft.head.save(args.out, metadata)
    gain = "" if before is None else f": held-out AvgLen {before.avg_len:.3f} -> {after.avg_len:.3f} at k={args.k}"
    progress.say(f"wrote {args.out}{gain}")
    return 0


def check_head_shape(args: argparse.Namespace, target) -> None:
    """Refuse a head the target cannot have (e.g. --feature-layers past its depth) before any answer is generated."""
    from pipelines.heads.model import HeadConfig

    try:
        HeadConfig(args.layers, target.config.to_dict(), feature_layers=tuple(args.feature_layers))
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _coverage(sequences: list[list[int]], vocab) -> float:
    """Share of the training tokens inside the draft vocabulary."""
    import torch

    from pipelines.heads.model import flat_tokens

    tokens = flat_tokens(sequences)
    return float(torch.isin(tokens, vocab).float().mean()) if len(tokens) else 0.0


def check_arguments(args: argparse.Namespace):
    """The training settings, with every flag checked before a model loads."""
    from daemon.config import check_device
    from pipelines.heads.losses import HeadLossSettings
    from pipelines.heads.train import BootstrapSettings

    for path in (args.corpus, args.prompts, args.heldout_prompts):
        if path is not None and not path.is_file():
            raise CommandError(f"{path}: no such file", EXIT_USAGE)
    if args.corpus is None and not (args.prompts and args.generate):
        raise CommandError("give --corpus FILE, or --prompts FILE with --generate N, or both", EXIT_USAGE)
    if args.generate and args.prompts is None:
        raise CommandError("--generate needs --prompts FILE", EXIT_USAGE)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CommandError(f"{args.out} exists and is not an empty folder", EXIT_USAGE)
    for name in ("generate", "heldout", "draft_vocab"):
        if getattr(args, name) < 0:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 0", EXIT_USAGE)
    for name in ("k", "layers", "max_new_tokens", "max_prompt_tokens", "generate_batch"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1", EXIT_USAGE)
    try:
        check_device(args.device)
        loss = HeadLossSettings(
            regression_weight=args.regression_weight, unroll=args.unroll, draft_vocab_only=args.loss_vocab == "draft"
        )
        return BootstrapSettings(
            tokens=args.tokens,
            epochs=args.epochs,
            max_seconds=args.max_seconds,
            max_length=args.max_length,
            batch_tokens=args.batch_tokens,
            lr=args.lr,
            seed=args.seed,
            feature_cache_gib=args.feature_cache_gib,
            loss=loss,
        )
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def load_target(args, progress: Progress):
    from pipelines.models import check_reference, load_model, load_tokenizer

    check_reference(args.target)
    progress.say(f"loading target {args.target} on {args.device}")
    return load_model(args.target, args.dtype, args.device), load_tokenizer(args.target)


def gather_data(args, target, tokenizer, progress: Progress) -> tuple[list[list[int]], list, dict]:
    """(training sequences, held-out feedback, the data part of the recipe)."""
    from daemon.cli.corpus import Skipped, read_corpus, read_prompts
    from daemon.config import LimitSettings

    skipped = Skipped()
    sequences = read_corpus(args.corpus, tokenizer, skipped) if args.corpus else []
    corpus_sequences = len(sequences)
    limits = LimitSettings(default_max_new_tokens=args.max_new_tokens, max_new_tokens=max(args.max_new_tokens, 1024))
    prompts = lambda path, skip, count: read_prompts(  # noqa: E731
        path, tokenizer, limits, args.max_prompt_tokens, skipped, skip=skip, count=count
    )
    train_requests = prompts(args.prompts, 0, args.generate) if args.generate else []
    heldout_source, skip = (args.heldout_prompts, 0) if args.heldout_prompts else (args.prompts, args.generate)
    heldout_requests = prompts(heldout_source, skip, args.heldout) if heldout_source and args.heldout else []
    started = time.monotonic()
    answers = answer(target, tokenizer, train_requests, args.generate_batch, progress, "training prompts")
    sequences += [list(r.input_ids) + list(a.token_ids) for r, a in zip(train_requests, answers)]
    heldout = [
        a.feedback for a in answer(target, tokenizer, heldout_requests, args.generate_batch, progress, "held-out")
    ]
    if skipped.reasons:
        progress.say(f"skipped {skipped.summary()}")
    data = {
        "target": {"path": args.target, "device": args.device, "dtype": args.dtype},
        "corpus": None if args.corpus is None else str(args.corpus),
        "corpus_sequences": corpus_sequences,
        "prompts": None if args.prompts is None else str(args.prompts),
        "generated": len(answers),
        "generated_tokens": sum(len(a.token_ids) for a in answers),
        "generation_seconds": time.monotonic() - started,
        "max_new_tokens": args.max_new_tokens,
        "training_sequences": len(sequences),
        "skipped": skipped.reasons[:20],
        "skipped_lines": len(skipped.reasons),
    }
    return sequences, heldout, data


def answer(target, tokenizer, requests, batch_size: int, progress: Progress, what: str) -> list:
    from pipelines.heads.train import target_outputs

    if not requests:
        return []
    progress.say(f"the target answers {len(requests)} {what} (greedy, batches of {batch_size})")
    started = time.monotonic()
    report = lambda done: progress.update(f"{what}: {done}/{len(requests)} answered")  # noqa: E731
    results = target_outputs(target, tokenizer, requests, batch_size=batch_size, on_batch=report)
    tokens = sum(len(r.token_ids) for r in results)
    progress.say(f"{what}: {tokens} tokens in {time.monotonic() - started:.1f} s")
    return results


def evaluate(draft, heldout: list, k: int, progress: Progress, label: str):
    """Exact replay of the head on the held-out answers (None without held-out prompts)."""
    from pipelines.replay import replay

    if not heldout:
        return None
    metrics = replay(draft, heldout, k=k, batch_size=16)
    progress.say(f"{label}: held-out AvgLen {metrics.avg_len:.3f} at k={k} on {metrics.tokens} tokens")
    return metrics


def heldout_record(args, heldout: list, before, after, whole=None) -> dict:
    if after is None:
        return {"requests": 0, "note": "no held-out prompts (--heldout-prompts, or --prompts beyond --generate)"}
    extra = {} if whole is None else {"avg_len_whole_vocab": whole.avg_len}  # the same weights, any token proposed
    return {
        **extra,
        "prompts": str(args.heldout_prompts or args.prompts),
        "requests": len(heldout),
        "k": args.k,
        "window": args.k + 1,
        "avg_len_before": before.avg_len,
        "avg_len_after": after.avg_len,
        "before": before.to_dict(),
        "after": after.to_dict(),
    }


def progress_line(p) -> str:
    eta = "n/a" if p.eta_s != p.eta_s else f"{int(p.eta_s) // 60}m{int(p.eta_s) % 60:02d}s"
    return (
        f"training: {p.tokens}/{p.budget} tokens ({p.progress:.0%}), {p.tokens_per_s:,.0f} tok/s, step {p.steps}, "
        f"loss {p.loss:.3f}, top-1 {p.top1:.2f}, lr {p.lr:.2e}, ETA {eta}"
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
