"""Online-learning benchmark: static draft vs osd / online / optimistic / ensemble learners vs the gated daemon.

    PYTHONPATH=/tmp/site python -m bench.learning --target /tmp/stage/target.gguf --draft /tmp/stage/draft.gguf \
        --out OUT [--domains text_to_sql shakespeare humaneval sharegpt] [--rounds 8] [--per-round 24] \
        [--new-tokens 96] [--budget-s 540]
    python -m bench.learning --target T --head HEAD_DIR ...          # a head (draft init) instead of a draft LM
    python -m bench.learning --tiny --out /tmp/learning-smoke          # CPU smoke run with the tiny test pair
    python -m bench.learning --tiny --head new-head --lr 3e-3 --out /tmp/learning-head   # a fresh head, tiny

With --head the draft is a head (a folder, or new-head: a fresh one) and serves as proposer head.

Every domain starts from the same static draft and runs `--rounds` rounds of `--per-round` fresh prompts:

    serve    the round's prompts ONCE with the static draft (engine, batch --batch, greedy): live AvgLen, tok/s.
             Greedy decoding is lossless, so every draft would have emitted these same tokens.
    replay   for every learner, its AvgLen on this round from one teacher-forced pass of the draft it had at the
             START of the round (pipelines.replay, exact greedy chain): the AvgLen it would have seen live
    gated    serve the same prompts again with the gated daemon's active draft (swap_draft), timed: live tok/s
             (static and gated take turns going first, round by round: the second pass on the same prompts ran
             faster in earlier runs whatever the draft)
    train    every learner fits on the round plus the previous --history-rounds rounds (osd on the positions its
             own current draft gets rejected at); non-gated learners always serve their candidate next round;
             the gated one holds out the round's newest requests (at least --gate-holdout of them, more until
             they hold --gate-min-tokens emitted tokens, at most half), trains on the rest plus the history (with
             no history: the previous round's held-out tail), replays candidate and active on the held-out tail,
             and promotes only if the candidate's AvgLen beats the active's by --gate-margin on >=
             --gate-min-tokens tokens

tok/s is measured live for `static` and `gated`; for the other learners it is an ESTIMATE, static tok/s x
(learner AvgLen / static replay AvgLen): a verification round costs the same whatever the draft proposes.
Writes OUT/learning.json (every round), OUT/learning.png (AvgLen over rounds, one panel per domain) and prints a
table last. Stops gracefully when --budget-s is spent (checked before each round) and still writes everything.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.prompts import read_jsonl, text_to_sql
from pipelines.drafts import kind_of
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.gate import decide, heldout_split
from pipelines.learners import LEARNER_NAMES, LearnerSettings, NonFiniteError, make_learner
from pipelines.models import load_pair
from pipelines.prompts import encode_prompt
from pipelines.replay import replay, served_by
from pipelines.types import GenerationRequest

DATA = Path(__file__).resolve().parent / "data"
# domain -> (prompt file, apply the chat template, homogeneous stream)
DOMAINS = {
    "text_to_sql": ("text_to_sql.jsonl", True, True),
    "shakespeare": ("shakespeare.jsonl", False, True),
    "humaneval": ("humaneval.jsonl", True, True),
    "stdlib_code": ("stdlib_code.jsonl", False, True),
    "sharegpt": ("sharegpt.jsonl", True, False),
    "mtbench": ("mtbench.jsonl", True, False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target model: .gguf file or HF folder")
    parser.add_argument("--draft", help="draft model: .gguf file or HF folder")
    parser.add_argument("--head", help="a head folder (draft init) or new-head, instead of a draft model")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with devtools.tiny_models.make_tiny_pair")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--domains",
        nargs="+",
        choices=sorted(DOMAINS),
        default=["text_to_sql", "shakespeare", "humaneval", "sharegpt"],
        help="run in this order; the budget may cut the last ones",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per domain (8; tiny 3)")
    parser.add_argument("--per-round", type=int, default=None, help="prompts per round (24; tiny 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="max new tokens per prompt (96; tiny 24)")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="keep the last N prompt tokens (768; tiny 48)"
    )
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget incl. model load")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (--tiny)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (--tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine forwards")
    # learners
    parser.add_argument("--learners", nargs="+", choices=LEARNER_NAMES, default=list(LEARNER_NAMES))
    parser.add_argument("--lr", type=float, default=None, help="lr of every learner (5e-6; --head 1e-5; tiny 1e-2)")
    for name in (*LEARNER_NAMES, "gated"):
        parser.add_argument(f"--lr-{name}", type=float, default=None, help=f"lr of {name} (default --lr)")
    parser.add_argument(
        "--trainable",
        choices=["all", "layers", "last_layers"],
        default=None,
        help="layers (default); tiny: all (its draft is random-init)",
    )
    parser.add_argument("--num-last-layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--history-rounds",
        type=int,
        default=0,
        help="also train on the previous N rounds' feedback (0: the round alone)",
    )
    parser.add_argument(
        "--target-temperature",
        type=float,
        default=1.0,
        help="LearnerSettings.target_temperature: sharpen the target's top-m before the KL",
    )
    parser.add_argument("--train-batch", type=int, default=8, help="requests per optimizer step")
    parser.add_argument("--optimistic-variant", choices=["ogd", "momentum"], default="ogd")
    parser.add_argument("--hedge-eta", type=float, default=5.0)
    parser.add_argument(
        "--head-chain-weight",
        type=float,
        default=LearnerSettings().head_chain_weight,
        help="heads: LearnerSettings.head_chain_weight, the bootstrap's two-step loss beside the step-1 KL "
        "(default %(default)s; 0: the step-1 KL alone, as in every run before commit f763e6d)",
    )
    # the gate
    parser.add_argument("--gate-learner", choices=LEARNER_NAMES, default="online", help="the gated daemon's learner")
    parser.add_argument(
        "--gate-holdout",
        type=float,
        default=0.25,
        help="least fraction of a round held out for the gate (more until --gate-min-tokens)",
    )
    parser.add_argument(
        "--gate-margin",
        type=float,
        default=0.02,  # the daemon's learning.promote_margin; 0.01 until 2026-12-06 (BENCHMARKS.md section 8)
        help="relative AvgLen gain needed to promote (default %(default)s, the daemon's promote_margin)",
    )
    parser.add_argument("--gate-min-tokens", type=int, default=None, help="256; tiny 32")
    parser.add_argument(
        "--gate-after-rejection",
        choices=["rebase", "continue"],
        default="rebase",
        help="what the gated learner does after a rejected candidate (LearnerSettings.after_rejection)",
    )
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        rounds=(3, 8),
        per_round=(8, 24),
        new_tokens=(24, 96),
        max_prompt_tokens=(48, 768),
        device=("cpu", "cuda"),
        dtype=("float32", "bfloat16"),
        # a head: 1e-5 gained on an H100 where 1e-4 lost (BENCHMARKS.md section 8); a 0.5B draft LM: 5e-6 (section 4)
        lr=(1e-2, 1e-5 if args.head else 5e-6),
        trainable=("all", "layers"),
        gate_min_tokens=(32, 256),
    )
    for key, (small, real) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else real)
    if args.history_rounds < 0:
        parser.error("--history-rounds must be >= 0")
    if not tiny and not (args.target and (args.draft or args.head)):
        parser.error("--target and --draft or --head are required (or --tiny)")
    return args


# ---------------------------------------------------------------------------------------------- inputs


def domain_prompts(name: str, tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """`count` prompts of a domain in file order (text_to_sql is generated when the file has too few),
    tokenized (chat template where the domain says so) and cut to their last max_tokens tokens."""
    filename, chat, _ = DOMAINS[name]
    texts = [p.prompt for p in read_jsonl(DATA / filename)]
    if name == "text_to_sql" and len(texts) < count:
        texts = [p.prompt for p in text_to_sql(count, seed=0)]
    return [encode_prompt(tokenizer, text, chat=chat)[-max_tokens:] for text in texts[:count]]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def serve(engine: SpeculativeEngine, prompts: list[list[int]], new_tokens: int, device: str, tag: str):
    requests = [
        GenerationRequest(id=f"{tag}-{i}", input_ids=ids, max_new_tokens=new_tokens) for i, ids in enumerate(prompts)
    ]
    sync(device)
    started = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    seconds = time.perf_counter() - started
    emitted = sum(r.counters.emitted for r in results)
    forwards = sum(r.counters.target_forwards for r in results)
    live = {
        "avg_len": emitted / forwards,
        "tokens": emitted,
        "forwards": forwards,
        "seconds": seconds,
        "tok_s": emitted / seconds,
    }
    return [r.feedback for r in results], [r.token_ids for r in results], live


# ---------------------------------------------------------------------------------------------- one domain


class Contender:
    """A learner with its own draft copy (the draft it serves next round = its last candidate)."""

    def __init__(self, name: str, settings: LearnerSettings | None, draft):
        self.name = name
        self.learner = make_learner(settings) if settings else None
        self.draft = copy.deepcopy(draft) if settings else draft  # static shares the served draft
        self.serving = self.draft  # what it serves: its last candidate (gated: its active draft, set apart)
        self.version = 0
        self.failed = None  # the NonFiniteError message that stopped it, if any


def learner_settings(args, name: str, lr: float, **extra) -> LearnerSettings:
    return LearnerSettings(
        name=name,
        lr=lr,
        epochs=args.epochs,
        batch_size=args.train_batch,
        target_temperature=args.target_temperature,
        trainable=args.trainable,
        num_last_layers=args.num_last_layers,
        optimistic_variant=args.optimistic_variant,
        hedge_eta=args.hedge_eta,
        head_chain_weight=args.head_chain_weight,
        **extra,
    )


def run_domain(args, name: str, engines: dict, draft, tokenizer, deadline: float, round_seconds: list[float]) -> dict:
    prompts = domain_prompts(name, tokenizer, args.rounds * args.per_round, args.max_prompt_tokens)
    per_round = min(args.per_round, len(prompts) // args.rounds)
    static_engine, gated_engine = engines["static"], engines["gated"]
    gated_active = gated_engine.draft
    gated_engine.swap_draft(draft, "gated-v0")  # every domain starts from the static draft

    lr = lambda learner: getattr(args, f"lr_{learner}") or args.lr  # noqa: E731
    contenders = {"static": Contender("static", None, draft)}
    for learner in args.learners:
        contenders[learner] = Contender(learner, learner_settings(args, learner, lr(learner)), draft)
    gated = Contender(
        "gated",
        learner_settings(args, args.gate_learner, lr("gated"), after_rejection=args.gate_after_rejection),
        draft,
    )
    gated.serving = gated_active
    gated_pending = []  # last round's held-out tail: trained on next round when there is no history
    history = []  # feedback of the previous rounds, one list per round
    rounds = []
    for index in range(args.rounds):
        now = time.perf_counter()
        estimate = sum(round_seconds) / len(round_seconds) if round_seconds else 0.0
        if now + estimate > deadline:
            print(f"[{name}] budget spent before round {index}", flush=True)
            break
        round_prompts = prompts[index * per_round : (index + 1) * per_round]
        gated_first = index % 2 == 1
        if gated_first:
            _, gated_tokens, gated_live = serve(
                gated_engine, round_prompts, args.new_tokens, args.device, f"{name}-{index}-gated"
            )
        feedback, static_tokens, static_live = serve(
            static_engine, round_prompts, args.new_tokens, args.device, f"{name}-{index}"
        )
        if not gated_first:
            _, gated_tokens, gated_live = serve(
                gated_engine, round_prompts, args.new_tokens, args.device, f"{name}-{index}-gated"
            )
        record = {
            "round": index,
            "prompts": len(round_prompts),
            "tokens": static_live["tokens"],
            "static_live": static_live,
            "learners": {},
        }

        # What every contender's start-of-round draft achieves on this round (exact greedy chains).
        for contender in (*contenders.values(), gated):
            metrics = replay(contender.serving, feedback, k=args.k)
            record["learners"][contender.name] = {
                "avg_len": metrics.avg_len,
                "acceptance": metrics.acceptance,
                "version": contender.version,
                "failed": contender.failed,
            }
        static_replay = record["learners"]["static"]["avg_len"]
        for entry in record["learners"].values():
            entry["tok_s_estimate"] = static_live["tok_s"] * entry["avg_len"] / static_replay

        # The gated daemon live: same prompts, its active draft.
        gated_live["served_first"] = gated_first
        gated_live["same_tokens_as_static"] = sum(a == b for a, b in zip(gated_tokens, static_tokens)) / len(
            static_tokens
        )
        record["gated_live"] = gated_live

        # Train.
        past = [f for earlier in history[-args.history_rounds :] for f in earlier] if args.history_rounds else []
        for contender in contenders.values():
            if contender.learner is None or contender.failed:
                continue
            examples = past + feedback
            if contender.name == "osd":  # its own rejected positions, as if its draft had served these requests
                examples = served_by(contender.draft, examples, k=args.k, version=f"{contender.version}")
            record["learners"][contender.name]["fit"] = fit(contender, examples)
        tail = holdout_size(args, feedback)
        record["gate"] = gate_round(
            args, gated, gated_active, gated_engine, feedback, tail, past if args.history_rounds else gated_pending
        )
        gated_pending = feedback[len(feedback) - tail :]
        history.append(feedback)
        record["seconds"] = time.perf_counter() - now
        round_seconds.append(record["seconds"])
        rounds.append(record)
        line = "  ".join(f"{n} {e['avg_len']:.2f}" for n, e in record["learners"].items())
        print(
            f"[{name}] round {index}: {line} | live static {static_live['tok_s']:.0f} tok/s, gated "
            f"{gated_live['tok_s']:.0f} tok/s (AvgLen {gated_live['avg_len']:.2f}) | {record['seconds']:.1f} s",
            flush=True,
        )

    return {"homogeneous": DOMAINS[name][2], "per_round": per_round, "rounds": rounds}


def fit(contender: Contender, examples) -> dict:
    try:
        report = contender.learner.fit(contender.draft, examples, base_version=f"v{contender.version}")
    except NonFiniteError as exc:  # the caller keeps the active draft: restore it from the last good version
        contender.failed = str(exc)
        return {"error": str(exc)}
    contender.version += 1  # always promoted
    return report.to_dict()


def holdout_size(args, feedback) -> int:
    """The gate's held-out tail, chosen like the daemon's (pipelines.gate.heldout_split): the newest requests, at
    least --gate-holdout of the round, more until they hold --gate-min-tokens emitted tokens (short answers, e.g.
    SQL), never more than half the round."""
    least = max(1, round(len(feedback) * args.gate_holdout))
    return len(feedback) - heldout_split(feedback, least, args.gate_min_tokens)


def gate_round(args, gated: Contender, active, engine: SpeculativeEngine, feedback, tail_size: int, earlier) -> dict:
    """Train the gated learner on `earlier` feedback + this round's head, decide on its last tail_size requests."""
    head, tail = feedback[: len(feedback) - tail_size], feedback[len(feedback) - tail_size :]
    train = earlier + head
    active_version = f"v{gated.version}"
    gated.draft.load_state_dict(active.state_dict())  # the training copy holds the active weights on entry
    try:
        report = gated.learner.fit(gated.draft, train, base_version=active_version).to_dict()
    except NonFiniteError as exc:
        return {"promoted": False, "error": str(exc)}
    candidate = replay(gated.draft, tail, k=args.k)
    current = replay(active, tail, k=args.k)
    gate = decide(
        candidate.avg_len, current.avg_len, candidate.tokens, margin=args.gate_margin, min_tokens=args.gate_min_tokens
    )  # the daemon's rule (pipelines.gate)
    promoted = gate.promote
    decision = {
        "promoted": promoted,
        "why_not": gate.why_not,
        "candidate_avg_len": candidate.avg_len,
        "active_avg_len": current.avg_len,
        "held_out_requests": len(tail),
        "held_out_tokens": candidate.tokens,
        "fit": report,
    }
    if promoted:
        gated.version += 1
        gated.learner.note_candidate_version(f"v{gated.version}")
        engine.swap_draft(gated.draft, f"gated-v{gated.version}")
    return decision


# ---------------------------------------------------------------------------------------------- output


def summarise(report: dict) -> list[dict]:
    rows = []
    for domain, result in report["domains"].items():
        rounds = result["rounds"]
        if not rounds:
            continue
        static = [r["learners"]["static"]["avg_len"] for r in rounds]
        later = slice(len(rounds) // 2, None)  # second half: after the learners had a few rounds
        for name in rounds[0]["learners"]:
            values = [r["learners"][name]["avg_len"] for r in rounds]
            row = {
                "domain": domain,
                "learner": name,
                "rounds": len(rounds),
                "avg_len_mean": sum(values) / len(values),
                "avg_len_last": values[-1],
                "gain_mean_pct": 100 * (sum(values) / sum(static) - 1),
                "gain_second_half_pct": 100 * (sum(values[later]) / sum(static[later]) - 1),
                "best_round_gain_pct": 100 * max(v / s - 1 for v, s in zip(values, static)),
            }
            if name in ("static", "gated"):
                live = [r["static_live" if name == "static" else "gated_live"] for r in rounds]
                row["tok_s_live"] = sum(x["tokens"] for x in live) / sum(x["seconds"] for x in live)
                row["avg_len_live"] = sum(x["tokens"] for x in live) / sum(x["forwards"] for x in live)
            else:
                row["tok_s_estimate"] = sum(r["learners"][name]["tok_s_estimate"] for r in rounds) / len(rounds)
            rows.append(row)
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    domains = [d for d, r in report["domains"].items() if r["rounds"]]
    if not domains:
        return
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        rounds = report["domains"][domain]["rounds"]
        for name in rounds[0]["learners"]:
            values = [r["learners"][name]["avg_len"] for r in rounds]
            style = "--" if name == "static" else "-"
            ax.plot(range(len(values)), values, style, marker="o", markersize=3, label=name)
        live = [r["gated_live"]["avg_len"] for r in rounds]
        ax.plot(range(len(live)), live, "x", color="black", label="gated (live)")
        ax.set_title(f"{domain}{'' if report['domains'][domain]['homogeneous'] else ' (mixed)'}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("AvgLen (tokens / target forward)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'domain':12s} {'learner':11s} {'rounds':>6s} {'AvgLen':>7s} {'last':>6s} {'vs static':>9s} "
        f"{'2nd half':>8s} {'best rd':>7s} {'tok/s':>8s}"
    )
    for row in rows:
        tok_s = f"{row['tok_s_live']:.0f}" if "tok_s_live" in row else f"~{row['tok_s_estimate']:.0f}"
        print(
            f"{row['domain']:12s} {row['learner']:11s} {row['rounds']:6d} {row['avg_len_mean']:7.3f} "
            f"{row['avg_len_last']:6.2f} {row['gain_mean_pct']:+8.1f}% {row['gain_second_half_pct']:+7.1f}% "
            f"{row['best_round_gain_pct']:+6.1f}% {tok_s:>8s}"
        )
    print("tok/s: measured live for static and gated; ~ = estimate from replay AvgLen (static tok/s x AvgLen ratio)")


def write(report: dict, out: Path) -> list[dict]:
    rows = summarise(report)
    report["summary"] = rows
    (out / "learning.json").write_text(json.dumps(report, indent=1, default=_json_default))
    plot(report, out / "learning.png")
    return rows


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from devtools.tiny_models import make_tiny_pair

        args.target, args.draft = map(str, make_tiny_pair(Path(tempfile.mkdtemp(prefix="tiny-pair-"))))
    target, draft, tokenizer = load_pair(args.target, args.head or args.draft, args.dtype, args.device)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "load_seconds": time.perf_counter() - started,
        "domains": {},
    }
    print(f"loaded the pair in {report['load_seconds']:.1f} s", flush=True)
    # The engine runs on the models' device (--device); the draft (a draft LM or a head) proposes k tokens per round.
    settings = EngineSettings(
        proposer=kind_of(draft),
        k=args.k,
        max_batch_size=args.batch,
        compile=args.compile,
        max_seq_len=args.max_prompt_tokens + args.new_tokens + args.k + 8,
    )
    engines = {
        "static": SpeculativeEngine(target, draft, tokenizer, settings, draft_version="static"),
        "gated": SpeculativeEngine(target, copy.deepcopy(draft), tokenizer, settings, draft_version="gated-v0"),
    }
    for engine in engines.values():
        engine.warmup()  # CUDA graphs captured once, outside every timing
        warmup = [
            GenerationRequest(id=f"warmup-{i}", input_ids=[1] * (i + 2), max_new_tokens=8) for i in range(args.batch)
        ]
        engine.generate(warmup)
    report["warmup_seconds"] = time.perf_counter() - started - report["load_seconds"]
    round_seconds: list[float] = []  # every round so far: the budget check's estimate of the next one
    try:
        for domain in args.domains:
            if time.perf_counter() > deadline:
                print(f"budget spent: {domain} not run", flush=True)
                break
            report["domains"][domain] = run_domain(args, domain, engines, draft, tokenizer, deadline, round_seconds)
            gc.collect()  # the domain's learners, their masters and optimizer states
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            write(report, args.out)  # partial results survive a kill
    finally:
        report["seconds"] = time.perf_counter() - started
        if args.device.startswith("cuda"):
            report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows = write(report, args.out)
    print_table(rows)
    print(f"wrote {args.out / 'learning.json'} and {args.out / 'learning.png'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
