"""bench.head_corpus keeps every prompt a benchmark times or holds out away from the head's training prompts, and
keeps the held-out set of earlier bootstraps whatever extra prompts are added (the sources are stubbed: the real
ones are downloaded archives)."""

from __future__ import annotations

import json

from bench import head_corpus
from bench.prompts import Prompt

BENCH_IDS = {
    "sharegpt": ["sharegpt/a", "sharegpt/b"],
    "stdlib_code": ["stdlib-3.12/json/decoder.py:10", "stdlib-3.12/csv.py:5"],
    "shakespeare": ["shakespeare/0000-hamlet:3", "shakespeare/0001-lear:9"],
}


def fake_sources(monkeypatch):
    monkeypatch.setattr(head_corpus, "bench_ids", lambda name: BENCH_IDS[name])
    sources = head_corpus.sources
    chats = [Prompt(f"sharegpt/{c}", f"question {c}") for c in "abcdef"]
    monkeypatch.setattr(sources, "sharegpt", lambda: chats)
    monkeypatch.setattr(
        sources, "text_to_sql", lambda n, seed: [Prompt(f"sql/{seed}/{i}", f"sql {i}") for i in range(n)]
    )
    files = ["json/decoder.py", "ast.py", "csv.py", "enum.py"]
    monkeypatch.setattr(
        sources,
        "stdlib_code",
        lambda n, seed: [Prompt(f"stdlib-3.12/{files[i % 4]}:{i}", f"code {i}") for i in range(n)],
    )
    works = ["hamlet", "tempest", "lear", "macbeth"]
    monkeypatch.setattr(
        sources,
        "shakespeare",
        lambda n, seed: [Prompt(f"shakespeare/{i:04d}-{works[i % 4]}:{i}", f"verse {i}") for i in range(n)],
    )


def stub_corpus(monkeypatch, n_prompts: int) -> list[dict]:
    """Stub sources, a tiny corpus and `n_prompts` distillation prompts in written order; returns those prompts."""
    fake_sources(monkeypatch)
    earlier = [{"id": f"distill/d/{i}", "prompt": f"p{i}"} for i in range(n_prompts)]
    monkeypatch.setattr(head_corpus, "distillation_prompts", lambda bench_prompts, per_domain: list(earlier))
    monkeypatch.setattr(head_corpus.random.Random, "shuffle", lambda self, items: None)
    for part in ("code_records", "sharegpt_records"):
        monkeypatch.setattr(head_corpus, part, lambda max_chars: [{"text": "x"}])
    monkeypatch.setattr(head_corpus, "shakespeare_records", lambda max_chars, bench_prompts: [{"text": "y"}])
    return earlier


def run_main(out, *args: str) -> tuple[list[dict], list[dict]]:
    head_corpus.main(["--out", str(out), *args])
    read = lambda name: [json.loads(line) for line in open(out / name)]  # noqa: E731
    return read("prompts.jsonl"), read("heldout.jsonl")


def test_extra_prompts_come_from_no_bench_conversation_file_or_timed_work(monkeypatch):
    fake_sources(monkeypatch)
    extra = head_corpus.extra_prompts(per_domain=2, bench_prompts=1)
    by_domain = {}
    for record in extra:
        by_domain.setdefault(record["id"].split("/")[1], []).append(record)
    assert {d: len(r) for d, r in by_domain.items()} == {
        "sharegpt": 2,
        "text_to_sql": 2,
        "stdlib_code": 2,
        "shakespeare": 2,
    }
    assert {r["messages"][0]["content"] for r in by_domain["sharegpt"]} == {"question c", "question d"}
    assert {r["prompt"] for r in by_domain["stdlib_code"]} == {"code 1", "code 3"}  # ast.py and enum.py
    # Only the works of the first `bench_prompts` Shakespeare prompts are kept out, as in the corpus: lear stays.
    assert {r["prompt"] for r in by_domain["shakespeare"]} == {"verse 1", "verse 2"}
    assert all("messages" in r for r in by_domain["text_to_sql"])
    assert head_corpus.extra_prompts(per_domain=0, bench_prompts=1) == []


def test_the_held_out_prompts_stay_those_of_earlier_bootstraps_and_never_train(monkeypatch, tmp_path):
    earlier = stub_corpus(monkeypatch, 450)
    prompts, heldout = run_main(tmp_path, "--extra-per-domain", "3")
    assert heldout == earlier[384:416]
    assert prompts[:384] == earlier[:384] and prompts[384:418] == earlier[416:]
    assert len(prompts) == 384 + 34 + 12 and not {r["id"] for r in prompts} & {r["id"] for r in heldout}


def test_with_few_prompts_the_last_ones_are_held_out(monkeypatch, tmp_path):
    earlier = stub_corpus(monkeypatch, 100)
    prompts, heldout = run_main(tmp_path, "--heldout", "24")
    assert heldout == earlier[76:] and prompts == earlier[:76]
