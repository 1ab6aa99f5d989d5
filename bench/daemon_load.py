"""Load benchmark of the daemon: end-to-end tokens/s through Kafka versus the engine's own tokens/s.

Same prompts, same batch size, same engine settings, both greedy:
  engine   SpeculativeEngine.generate in batches of --batch-size, in this process, after a warm-up batch
  daemon   `onlinespec serve` as a subprocess against a Tansu broker started here and a fresh database;
           clock from the first prompt produced to the last completion consumed (the daemon is up and has
           its partitions before the clock starts, so start-up and group join are not counted)

Without --target it builds a target-only tiny Qwen2 model (devtools/tiny_models.py) so it runs anywhere:

    python -m bench.daemon_load                                   # tiny target-only model, CPU, SQLite
    python -m bench.daemon_load --layers 8 --hidden 256 --repeat 3   # a larger random model, median of 3
    python -m bench.daemon_load --target T --draft D --device cuda --prompts 512 --batch-size 16 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench

With --learning the daemon also runs learning rounds while it serves (learning.enabled, a round every
--round-tokens new feedback tokens), and the result adds, per round, the completion tokens/s seen by the consumer
while the round ran against outside every round, and the daemon's own decode tokens/s during and between rounds
(`onlinespec rounds list --json`): does training stall serving?

    python -m bench.daemon_load --target T --draft D --device cuda --prompts 768 --learning --round-tokens 8000

With --proposers the daemon runs once per proposer (engine.proposer; the rest of the engine config at its
defaults) on the same stream, in one run: e.g. `--proposers auto none` compares the default auto with target-only.
--prompt-file takes several files: their prompts are interleaved (a mixed stream); --chat sends them as chat
`messages`; --max-new-tokens-per-file gives each file's requests their own max_new_tokens (short SQL answers
beside long chat answers).

Prints one JSON object (also written to --out) with both rates and their ratio.

With --compare-scheduling (issue 14; bench/load_points.py has the measurements) it compares engine.scheduling
static and continuous through the daemon on the same mixed stream, per batch size (--batch-sizes), each daemon
started once and serving its load points back to back: throughput at saturation (a burst of
--saturation-batches x batch size prompts), then Poisson arrivals at 50% and 90% (--load-fractions) of its own
saturation rate and, for continuous, also at static's 50%/90% (the same arrival times and prompts as static got):
p50/p99 time to first token and end-to-end latency, slot occupancy. No engine baseline; target-only unless
--proposers names another proposer (later points replay the stream, so a suffix proposer would have seen it).
Prints progress lines, a short table last, the JSON to --out.

    python -m bench.daemon_load --compare-scheduling --batch-sizes 8 \\
        --prompt-file bench/data/text_to_sql.jsonl bench/data/sharegpt.jsonl --max-new-tokens-per-file 32 128 \\
        --prompt-chars 800 --budget-s 320 --point-s 60 --out /tmp/scheduling-cpu.json   # tiny target, CPU: 5.5 min
    python -m bench.daemon_load --compare-scheduling --batch-sizes 8 32 --target T --device cuda \\
        --dtype bfloat16 --chat --prompt-file bench/data/text_to_sql.jsonl bench/data/sharegpt.jsonl \\
        --max-new-tokens-per-file 32 128 --prompt-chars 2000 --threads 4 --start-together --budget-s 240 \\
        --out scheduling-h200.json       # one GPU, ~4.5 min (bench/gpu_final.sh OUT scheduling runs this)

--draft is loaded only for a proposer other than none. --budget-s covers the whole comparison, daemon starts
included: the Poisson points get what is left once the other steps are reckoned (at most --point-s seconds of
arrivals each, at least --min-point-requests requests); --start-together overlaps the starts (a GPU has the memory
for four idle daemons; on a small CPU box they would compete with the measured one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from daemon.config import LimitSettings
from daemon.serving.messages import parse_prompt, tokenize
from devtools.fleet import DaemonLog

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    from bench import load_points

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target model (default: build a tiny random one)")
    parser.add_argument("--draft", help="draft model (default: none, target-only)")
    parser.add_argument("--layers", type=int, default=4, help="tiny target: layers (default 4)")
    parser.add_argument("--hidden", type=int, default=64, help="tiny target: hidden size (default 64)")
    parser.add_argument("--prompts", type=int, default=128, help="number of prompts (default 128)")
    parser.add_argument(
        "--prompt-file",
        nargs="+",
        default=[str(REPO / "bench/data/humaneval.jsonl")],
        help="one file: a homogeneous stream; several: their prompts interleaved",
    )
    parser.add_argument("--chat", action="store_true", help="send prompts as chat `messages`")
    parser.add_argument(
        "--proposers",
        nargs="+",
        help="engine.proposer of each daemon run, same stream (default: auto; with --compare-scheduling: none, "
        "target-only, and only one)",
    )
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine baseline")
    parser.add_argument("--prompt-chars", type=int, default=300, help="truncate prompts to this many characters")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--max-new-tokens-per-file",
        type=int,
        nargs="+",
        help="max_new_tokens of each --prompt-file's requests, in order (default: --max-new-tokens for all)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=5, help="draft tokens per step when a draft is given")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        help="engine.prefill_chunk_tokens: prompt tokens prefilled per engine step (default: the engine's, 512)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for engine and daemon alike (default 1: on a small shared machine "
        "spinning OpenMP threads of several processes slow each other down many times)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate engine and daemon runs this many times; the ratio reported is the median",
    )
    parser.add_argument(
        "--learning",
        action="store_true",
        help="run learning rounds in the daemon while it serves (needs --draft); report serving "
        "tokens/s during rounds against outside them",
    )
    parser.add_argument(
        "--round-tokens",
        type=int,
        default=8000,
        help="--learning: a round starts once this many new feedback tokens arrived",
    )
    parser.add_argument("--learner", default="online", help="--learning: learner name (default online)")
    parser.add_argument("--out", help="write the JSON result here too")
    load_points.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.learning and not args.draft:
        parser.error("--learning needs --draft")  # checked before any broker or model starts
    if args.max_new_tokens_per_file:
        if len(args.max_new_tokens_per_file) != len(args.prompt_file):
            parser.error("--max-new-tokens-per-file needs one value per --prompt-file")
        args.max_new_tokens = max(args.max_new_tokens_per_file)  # the daemon's limit
    if args.compare_scheduling:
        if args.learning:
            parser.error("--compare-scheduling runs without --learning")
        args.proposers = args.proposers or ["none"]
        if len(args.proposers) != 1:
            parser.error("--compare-scheduling takes one proposer")
        args.batch_sizes = args.batch_sizes or [args.batch_size]
    args.proposers = args.proposers or ["auto"]
    return args


def load_prompt_values(
    args, count: int | None = None, prefix: str = "load", max_new_tokens: list[int] | None = None
) -> list[bytes]:
    """`count` (default args.prompts) greedy prompt records `{prefix}-00000`, ...: record i from prompt file
    i % files (the files interleaved), asking for max_new_tokens[that file] (default args.max_new_tokens)."""
    files = [[json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()] for f in args.prompt_file]
    max_new_tokens = max_new_tokens or [args.max_new_tokens] * len(files)
    values = []
    for i in range(args.prompts if count is None else count):
        lines = files[i % len(files)]
        prompt = lines[(i // len(files)) % len(lines)]["prompt"][: args.prompt_chars]
        text = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
        record = {"id": f"{prefix}-{i:05d}", **text, "max_new_tokens": max_new_tokens[i % len(files)], "temperature": 0}
        values.append(json.dumps(record).encode())
    return values


def build_tiny_target(root: Path, layers: int, hidden: int) -> Path:
    from devtools.tiny_models import build_tokenizer, make_model_dir

    return make_model_dir(root / "target", build_tokenizer(), layers=layers, hidden=hidden, seed=1)


def engine_section(args, proposer: str) -> dict:
    """The same engine settings for the engine run and the daemon's config."""
    section = {
        "proposer": proposer,
        "k": args.k,
        "max_seq_len": args.max_seq_len,
        "top_m": 16,
        "max_batch_size": args.batch_size,
    }
    if args.prefill_chunk_tokens is not None:
        section["prefill_chunk_tokens"] = args.prefill_chunk_tokens
    return section


def engine_rate(args, target: str, values: list[bytes], proposer: str) -> dict:
    """Tokens/s of the engine alone on the same requests the daemon will get."""
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import load_pair

    target_model, draft_model, tokenizer = load_pair(target, args.draft, args.dtype, args.device)
    settings = EngineSettings(**engine_section(args, proposer))
    engine = SpeculativeEngine(target_model, draft_model, tokenizer, settings)
    engine.warmup()
    limits = LimitSettings(max_new_tokens=args.max_new_tokens, default_max_new_tokens=args.max_new_tokens)
    requests = [tokenize(parse_prompt(v, limits), tokenizer, engine.max_prompt_tokens) for v in values]
    engine.generate(requests[: args.batch_size])  # warm-up
    _sync(args.device)
    started = time.perf_counter()
    results = []
    for start in range(0, len(requests), args.batch_size):
        results.extend(engine.generate(requests[start : start + args.batch_size]))
    _sync(args.device)
    seconds = time.perf_counter() - started
    tokens = sum(r.counters.emitted for r in results)
    forwards = sum(r.counters.target_forwards for r in results)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tok_s": round(tokens / seconds, 1),
        "avg_len": round(tokens / forwards, 3),
    }


def daemon_rate(args, target: str, values: list[bytes], workdir: Path, proposer: str) -> dict:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from devtools.local_broker import TansuBroker, free_port, fresh_names
    from storage.migrate import upgrade_to_head

    broker = TansuBroker(workdir)
    broker.start()
    daemon = None
    try:
        names = fresh_names(broker)
        broker.create_topics(names.prompts, names.completions, names.dlq)
        database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
        metrics_port = free_port()
        upgrade_to_head(database_url)
        config = daemon_config(args, names, database_url, target, args.draft, proposer, metrics_port)
        if args.learning:
            config["learning"] = learning_config(args, workdir)
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = workdir / "daemon.log"
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config_path)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for(log_path, "partitions assigned", daemon, timeout=600)

        reader = KafkaConsumer(bootstrap_servers=names.bootstrap, enable_auto_commit=False)
        reader.assign([TopicPartition(names.completions, 0), TopicPartition(names.dlq, 0)])
        reader.seek_to_beginning()
        producer = KafkaProducer(bootstrap_servers=names.bootstrap, acks="all", linger_ms=5)

        started = time.perf_counter()
        for value in values:
            producer.send(names.prompts, value=value)
        producer.flush()
        tokens, received, rejected = 0, 0, 0
        arrivals = []  # (wall-clock time, completion tokens): serving rate during vs outside learning rounds
        stream_started = time.time()
        deadline = time.monotonic() + 3600
        while received + rejected < len(values) and time.monotonic() < deadline:
            for tp, batch in reader.poll(timeout_ms=100).items():
                for record in batch:
                    if tp.topic == names.dlq:  # counted, so a rejected prompt cannot hang the benchmark
                        rejected += 1
                        continue
                    received += 1
                    count = json.loads(record.value)["usage"]["completion_tokens"]
                    tokens += count
                    arrivals.append((time.time(), count))
        seconds = time.perf_counter() - started
        stages = scrape_stages(metrics_port)
        stages["variants"] = scrape_variants(metrics_port)
        producer.close()
        reader.close()
        daemon.terminate()
        daemon.wait(120)
        result = {
            "tokens": tokens,
            "completions": received,
            "dead_lettered": rejected,
            "seconds": round(seconds, 3),
            "tok_s": round(tokens / seconds, 1),
            "daemon_exit": daemon.returncode,
            "stages": stages,
            "summary": DaemonLog.read("daemon", log_path).stopped,
        }
        if args.learning:
            result["learning"] = serving_during_rounds(config_path, arrivals, stream_started)
        return result
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        broker.stop()


def daemon_config(args, names, database_url: str, target: str, draft: str | None, proposer: str, metrics_port: int):
    """A benchmark daemon's settings: short Kafka sessions for Tansu, the engine of engine_section, INFO logs."""
    return {
        "kafka": names.daemon_kafka(),
        "database": {"url": database_url},
        "models": {"target": target, "draft": draft, "device": args.device, "dtype": args.dtype},
        "engine": engine_section(args, proposer),
        "batching": {"max_wait_ms": args.max_wait_ms, "queue_size": max(64, 4 * args.batch_size)},
        "limits": {"max_new_tokens": args.max_new_tokens, "default_max_new_tokens": args.max_new_tokens},
        "daemon": {"metrics_port": metrics_port, "metrics_host": "127.0.0.1", "log_level": "INFO"},
    }


def learning_config(args, workdir: Path) -> dict:
    """Rounds as often as the stream allows: small windows, a short trigger check, no interval rounds."""
    return {
        "enabled": True,
        "learner": {"name": args.learner},
        "interval_s": 86_400,
        "check_interval_s": 1.0,
        "min_new_tokens": args.round_tokens,
        "window_max_rows": 256,
        "heldout_rows": 16,
        "min_heldout_tokens": 500,
        "checkpoint_dir": str(workdir / "checkpoints"),
    }


def serving_during_rounds(config_path: Path, arrivals: list[tuple[float, int]], stream_started: float) -> dict:
    """Per finished round: completion tokens/s the consumer saw while it ran vs outside every round (wall clock,
    from the first prompt to the last completion), and the daemon's own decode tokens/s during and between."""
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "rounds",
            "list",
            "--json",
            "--limit",
            "1000",
            "--config",
            str(config_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    rounds = sorted(json.loads(listing.stdout)["rounds"], key=lambda r: r["id"])
    stream_ended = arrivals[-1][0] if arrivals else stream_started
    spans, per_round = [], []
    for entry in rounds:
        if not entry["finished_at"]:
            continue
        # storage hands back aware UTC datetimes (storage.models), so the ISO strings carry their offset
        start, end = (datetime.fromisoformat(entry[key]).timestamp() for key in ("started_at", "finished_at"))
        start, end = max(start, stream_started), min(end, stream_ended)
        if end <= start:
            continue  # ran after the stream
        spans.append((start, end))
        inside = sum(n for t, n in arrivals if start <= t <= end)
        serving = entry["candidate_metrics"].get("serving") or entry["active_metrics"].get("serving") or {}
        per_round.append(
            {
                "id": entry["id"],
                "decision": entry["decision"],
                "seconds": round(end - start, 2),
                "completion_tok_s": round(inside / (end - start), 1),
                "candidate_avg_len": entry["candidate_avg_len"],
                "active_avg_len": entry["active_avg_len"],
                "decode_tps_during": serving.get("decode_tps_during"),
                "decode_tps_between": serving.get("decode_tps_between"),
                "error": entry["error"],
            }
        )
    in_rounds = sum(end - start for start, end in spans)
    outside = (stream_ended - stream_started) - in_rounds
    tokens_in = sum(n for t, n in arrivals if any(a <= t <= b for a, b in spans))
    tokens_out = sum(n for _, n in arrivals) - tokens_in
    return {
        "rounds": per_round,
        "seconds_in_rounds": round(in_rounds, 2),
        "seconds_outside": round(outside, 2),
        "completion_tok_s_in_rounds": round(tokens_in / in_rounds, 1) if in_rounds > 0 else None,
        "completion_tok_s_outside": round(tokens_out / outside, 1) if outside > 0 else None,
    }


def metric_families(port: int) -> list:
    """The daemon's metrics, parsed (prometheus_client Metric families)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return list(text_string_to_metric_families(text))


def unlabelled_samples(families: list) -> dict[str, float]:
    """The unlabelled samples of scraped `families` by name (gauges, histogram sums and counts)."""
    return {s.name: s.value for f in families for s in f.samples if not s.labels}


def labelled_samples(families: list, name: str, label: str) -> dict[str, float]:
    """One labelled metric's samples of scraped `families` by label value."""
    return {s.labels[label]: s.value for f in families for s in f.samples if s.name == name}


def metric_samples(port: int) -> dict[str, float]:
    """The daemon's unlabelled samples by name (gauges, histogram sums and counts)."""
    return unlabelled_samples(metric_families(port))


def scrape_stages(port: int) -> dict:
    """Per-batch time of each worker stage, from the daemon's own histograms."""
    sums = metric_samples(port)
    batches = sums.get("onlinespec_batch_size_count", 0) or 1
    stages = {"batches": int(batches), "mean_batch_size": round(sums.get("onlinespec_batch_size_sum", 0) / batches, 2)}
    for stage in ("decode", "store", "produce"):
        stages[f"{stage}_s_per_batch"] = round(sums.get(f"onlinespec_{stage}_seconds_sum", 0) / batches, 4)
    return stages


def scrape_labelled(port: int, name: str, label: str) -> dict[str, float]:
    """One labelled metric's samples by label value (e.g. onlinespec_engine_seconds_total by phase)."""
    return labelled_samples(metric_families(port), name, label)


def scrape_variants(port: int) -> dict:
    """Batches per variant the daemon ran (onlinespec_variant_batches)."""
    batches = scrape_labelled(port, "onlinespec_variant_batches_total", "variant")
    return {variant: int(value) for variant, value in batches.items()}


def _wait_for(path: Path, text: str, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"daemon did not log {text!r} within {timeout} s")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def setup(args) -> dict:
    """What a result was measured with."""
    found = {
        "target": args.target or f"tiny random Qwen2 ({args.layers} layers, hidden {args.hidden})",
        "draft": args.draft,
        "device": args.device,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "prompt_chars": args.prompt_chars,
        "max_new_tokens": args.max_new_tokens_per_file or args.max_new_tokens,
        "batch_size": args.batch_size,
        "k": args.k,
        "max_seq_len": args.max_seq_len,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,  # None: the engine's default
        "proposers": args.proposers,
        "prompt_files": [Path(f).name for f in args.prompt_file],
        "chat": args.chat,
        "threads": args.threads,
        "learning": args.learning and {"learner": args.learner, "round_tokens": args.round_tokens},
        "database": "sqlite" if not args.database_url else args.database_url.split(":")[0],
    }
    if args.compare_scheduling:
        del found["prompts"], found["batch_size"]
        keys = ("batch_sizes", "load_fractions", "saturation_batches", "point_s", "min_point_requests", "budget_s")
        found |= {key: getattr(args, key) for key in keys}
        found |= {"seed": args.seed, "start_together": args.start_together, "max_wait_ms": args.max_wait_ms}
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the daemon subprocess
    import torch

    torch.set_num_threads(args.threads)
    command = "python -m bench.daemon_load " + " ".join(sys.argv[1:] if argv is None else argv)
    head = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "setup": setup(args)}
    if args.compare_scheduling:
        from bench.load_points import run

        return run(args, head, command)
    values = load_prompt_values(args, max_new_tokens=args.max_new_tokens_per_file)
    runs = []
    with tempfile.TemporaryDirectory(prefix="daemon-load-") as tmp:
        workdir = Path(tmp)
        target = args.target or str(build_tiny_target(workdir, args.layers, args.hidden))
        for rep in range(args.repeat):
            for proposer in args.proposers:
                # Alternating engine and daemon runs spreads slow phases of a shared machine over both.
                # --learning compares the daemon with itself (during vs outside rounds): no engine baseline.
                skip_engine = args.learning or args.no_engine
                engine = None if skip_engine else engine_rate(args, target, values, proposer)
                rundir = workdir / f"run{rep}-{proposer}"
                rundir.mkdir()
                daemon = daemon_rate(args, target, values, rundir, proposer)
                ratio = round(daemon["tok_s"] / engine["tok_s"], 3) if engine else None
                print(
                    f"run {rep + 1}/{args.repeat} {proposer}: engine {engine and engine['tok_s']} tok/s, daemon "
                    f"{daemon['tok_s']} tok/s, ratio {ratio}, variants {daemon['stages']['variants']}",
                    file=sys.stderr,
                )
                runs.append({"proposer": proposer, "engine": engine, "daemon": daemon, "ratio": ratio})
    result = head | {
        "runs": runs,
        "median_ratio": None if args.learning or args.no_engine else statistics.median(run["ratio"] for run in runs),
        "daemon_tok_s_by_proposer": {
            p: [r["daemon"]["tok_s"] for r in runs if r["proposer"] == p] for p in args.proposers
        },
        "command": command,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
