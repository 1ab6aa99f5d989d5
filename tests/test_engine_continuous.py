"""Continuous batching: requests join the running batch at round boundaries, prompts are prefilled in chunks between
rounds, and every output stays the target's own (greedy: transformers' generate on its stock attention)."""

from __future__ import annotations

import random

import pytest

from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.slots import SlotTable
from pipelines.types import GenerationRequest
from tests.engine_fixtures import PROMPTS
from tests.test_engine_greedy import draft_model, reference


def engine(models, proposer: str, k: int, batch: int, **settings) -> SpeculativeEngine:
    proposer, _, model = proposer.partition("+")
    draft = draft_model(models, model or ("head" if proposer == "head" else "strong"))
    settings = {"max_batch_size": batch, "max_seq_len": 160, "prefill_chunk_tokens": 7, **settings}
    return SpeculativeEngine(
        models.target,
        draft,
        models.tokenizer,
        EngineSettings(proposer=proposer, k=k, auto={"k_choices": [k]}, **settings),
    )


def run_with_joins(engine: SpeculativeEngine, requests: list[GenerationRequest], seed: int) -> dict:
    """Submit the requests one at a time at random step boundaries; returns id -> (request, result)."""
    rng = random.Random(seed)
    waiting, done, steps = list(requests), {}, 0
    while waiting or engine.busy:
        if waiting and rng.random() < 0.4:
            request = waiting.pop(0)
            engine.submit(request, tag=request)
        for request, result in engine.step():
            done[request.id] = (request, result)
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    return done


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("proposer", ["none", "draft", "head", "suffix", "hybrid", "hybrid+head", "auto"])
def test_requests_joining_mid_flight_decode_the_targets_greedy_output(engine_models, proposer, batch, k):
    rng = random.Random(batch * 10 + k)
    tokenizer = engine_models.tokenizer
    requests = [
        GenerationRequest(f"r{i}", tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, max_new_tokens=rng.randint(3, 30))
        for i in range(14)
    ]
    done = run_with_joins(engine(engine_models, proposer, k, batch), requests, seed=batch + k)
    assert sorted(done) == sorted(r.id for r in requests)
    for request, result in done.values():
        assert result.token_ids == reference(engine_models, request), f"{request.id} with {proposer}"
    if proposer in ("draft", "head", "hybrid", "hybrid+head"):
        accepted = sum(result.counters.accepted for _, result in done.values())
        assert accepted > 0, "the model proposer's drafts must be accepted sometimes"


def test_a_short_request_arriving_while_a_long_one_decodes_finishes_first(engine_models):
    """With continuous batching the short one takes the free slot at the next round; with static batching it waits
    for the long one's batch to finish."""
    tokenizer = engine_models.tokenizer
    long = GenerationRequest("long", tokenizer(PROMPTS[1]).input_ids, max_new_tokens=60)  # no EOS before 60
    short = GenerationRequest("short", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=4)
    for scheduling, short_first in (("continuous", True), ("static", False)):
        eng = engine(engine_models, "draft", 3, 2, scheduling=scheduling)
        eng.submit(long, "long")
        order = []
        for _ in range(3):  # the long request is decoding
            order += [tag for tag, _ in eng.step()]
        eng.submit(short, "short")
        while eng.busy:
            order += [tag for tag, _ in eng.step()]
        assert order == (["short", "long"] if short_first else ["long", "short"]), scheduling


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(engine_models):
    tokenizer = engine_models.tokenizer
    eng = engine(engine_models, "none", 1, 2, prefill_chunk_tokens=4)
    running = GenerationRequest("running", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=40)
    long_prompt = tokenizer(PROMPTS[8]).input_ids
    assert len(long_prompt) > 12
    newcomer = GenerationRequest("newcomer", long_prompt, max_new_tokens=5)
    eng.submit(running, "running")
    eng.step()
    eng.submit(newcomer, "newcomer")
    progress = []
    while not progress or not eng.slots.slots[1].decoding:
        eng.step()
        progress.append((eng.slots.slots[1].prefilled, int(eng.state.generated[0])))
    prefilled = [p for p, _ in progress]
    assert prefilled == sorted(prefilled) and len(prefilled) >= len(long_prompt) // 4  # chunks of at most 4
    generated = [g for _, g in progress]
    assert generated[-1] > generated[0] + len(prefilled) - 2  # a round after every chunk
    results = {}
    while eng.busy:
        results.update({tag: r for tag, r in eng.step()})
    assert results["newcomer"].token_ids == reference(engine_models, newcomer)
    assert results["running"].token_ids == reference(engine_models, running)
    assert results["newcomer"].first_token_seconds >= results["newcomer"].queued_seconds


def test_static_batching_admits_a_batch_only_into_empty_slots():
    table = SlotTable(2, [1, 2], static=True)
    for i in range(3):
        table.queue.append(_queued(i))
    assert table.admit() == [0, 1]
    table.release(0)
    assert table.admit() == []  # slot 1 still decodes
    table.release(1)
    assert table.admit() == [0]


def test_prefill_plan_takes_the_oldest_newcomers_first_within_the_budget():
    table = SlotTable(3, [1, 2, 4], static=False)
    for i, length in enumerate((10, 3, 6)):
        table.queue.append(_queued(i, length))
    table.admit()
    plan = table.prefill_plan(8)
    assert [(c.slot, c.start, c.end, c.last) for c in plan] == [(0, 0, 8, False)]
    table.slots[0].prefilled = 8
    plan = table.prefill_plan(8)
    assert [(c.slot, c.start, c.end, c.last) for c in plan] == [(0, 8, 10, True), (1, 0, 3, True), (2, 0, 3, False)]
    assert [(c.slot, c.end) for c in table.prefill_plan(0)] == [(0, 10), (1, 3), (2, 6)]  # 0: no limit


def _queued(i: int, length: int = 3):
    from pipelines.slots import Queued

    return Queued(GenerationRequest(f"q{i}", list(range(1, length + 1))), tag=i)


def test_abort_frees_every_slot_and_the_engine_serves_again(engine_models):
    tokenizer = engine_models.tokenizer
    eng = engine(engine_models, "draft", 3, 2)
    for i in range(3):
        eng.submit(GenerationRequest(f"x{i}", tokenizer(PROMPTS[i]).input_ids, max_new_tokens=20), tag=f"x{i}")
    eng.step()
    eng.step()
    assert sorted(eng.abort()) == ["x0", "x1", "x2"]  # two in slots, one queued
    assert not eng.busy and eng.free_slots == 2
    request = GenerationRequest("after", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=12)
    assert eng.generate([request])[0].token_ids == reference(engine_models, request)


def test_the_phase_clock_splits_engine_time_into_prefill_and_rounds(engine_models):
    eng = engine(engine_models, "draft", 3, 2)
    eng.generate([GenerationRequest("p", engine_models.tokenizer(PROMPTS[8]).input_ids, max_new_tokens=12)])
    totals = eng.clock.totals()
    assert totals["prefill"] > 0 and totals["rounds"] > 0 and totals["catch_up"] > 0  # the draft caught up once


def test_rows_that_fail_to_be_collected_stay_in_the_engine_for_abort(engine_models, monkeypatch):
    import pipelines.engine as engine_module

    tokenizer = engine_models.tokenizer
    eng = engine(engine_models, "none", 1, 2)
    eng.submit(GenerationRequest("short", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=2), tag="short")
    eng.submit(GenerationRequest("long", tokenizer(PROMPTS[1]).input_ids, max_new_tokens=40), tag="long")

    def broken(*args, **kwargs):
        raise RuntimeError("the device failed")

    monkeypatch.setattr(engine_module, "collect", broken)
    with pytest.raises(RuntimeError, match="the device failed"):
        while True:
            eng.step()
    assert sorted(eng.abort()) == ["long", "short"]  # the finished one was not lost


class SyncSpy:
    def __init__(self, proposer):
        self.calls = []
        self.widths = []
        self._sync = proposer.sync

    def __call__(self, state, rows, lengths, width=None):
        self.calls.append((list(rows), list(lengths)))
        self.widths.append(width)
        return self._sync(state, rows, lengths, width)


def test_a_draft_round_after_a_hybrid_round_catches_the_draft_model_up_first(engine_models, monkeypatch):
    """A hybrid round can leave the draft LM's cache behind on suffix tokens it never saw; the draft re-feeds only
    its own window, so the engine syncs the rows before a draft round (or a hybrid round of smaller k) follows."""
    from pipelines.proposers import Variant

    tokenizer = engine_models.tokenizer
    eng = engine(engine_models, "hybrid", 4, 2)
    spy = SyncSpy(eng.model_proposer)
    monkeypatch.setattr(eng.model_proposer, "sync", spy)
    eng.submit(GenerationRequest("r", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=30), tag="r")
    while not spy.calls:  # prefill (in chunks), then a hybrid round: the newcomer is synced first
        eng.step()
    assert len(spy.calls) == 1 and eng._previous_variant == Variant("hybrid", 4)
    eng._follow_rows(Variant("hybrid", 4), [0])
    assert len(spy.calls) == 1  # another hybrid round of the same k re-feeds enough
    eng._follow_rows(Variant("draft", 4), [0])
    assert len(spy.calls) == 2 and spy.calls[-1][0] == [0]
    eng._previous_variant = Variant("hybrid", 4)
    eng._follow_rows(Variant("hybrid", 2), [0])
    assert len(spy.calls) == 3


def test_finished_rows_are_never_caught_up(engine_models, monkeypatch):
    """A request done at its first token (max_new_tokens 1) is parked at the end of its cache: catching it up would
    run the draft over the whole cache for nothing."""
    tokenizer = engine_models.tokenizer
    eng = engine(engine_models, "draft", 3, 2)
    spy = SyncSpy(eng.model_proposer)
    monkeypatch.setattr(eng.model_proposer, "sync", spy)
    one = GenerationRequest("one", tokenizer(PROMPTS[0]).input_ids, max_new_tokens=1)
    assert len(eng.generate([one])[0].token_ids) == 1
    assert spy.calls == []


@pytest.mark.parametrize("proposer", ["none", "draft", "head", "hybrid+head"])
def test_padded_prefill_and_catch_up_forwards_keep_the_targets_greedy_output(engine_models, proposer):
    """pad_tokens (64 on CUDA) right-pads prefill chunks and a model proposer's catch-up forwards to a few widths;
    a captured prefill (CUDA) also pads its rows to a batch bucket, each padding row repeating the first row at its
    parking positions. Here the rows are padded as a captured shape would be (the CPU has no graphs); none of it
    may change a token, a prompt of the longest allowed length included."""
    eng = engine(engine_models, proposer, 3, 4, pad_tokens=16, prefill_chunk_tokens=40)
    calls = []
    prefill = eng.prefill.forward

    def spy_prefill(tokens, positions, cache):
        calls.append((cache.rows.tolist(), positions[:, 0].tolist(), tuple(tokens.shape)))
        return prefill(tokens, positions, cache)

    eng.prefill.forward = spy_prefill
    sync = None
    if eng.model_proposer is not None:
        sync = eng.model_proposer.sync = SyncSpy(eng.model_proposer)
    eng.warmup()  # without graphs: one row at every padded chunk width, into row 0's cache
    assert [shape for _, _, shape in calls] == [(1, 16), (1, 32), (1, 48)]
    calls.clear()
    eng.prefill.rows_for = lambda rows, width: min(b for b in (1, 2, 4) if b >= rows)  # as captured shapes would
    tokenizer = engine_models.tokenizer
    requests = [
        GenerationRequest(f"r{i}", tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, max_new_tokens=5 + 3 * i)
        for i in range(10)
    ]
    done = run_with_joins(eng, requests, seed=3)
    for request, result in done.values():
        assert result.token_ids == reference(engine_models, request), f"{request.id} with {proposer}"
    longest = (tokenizer(" ".join(PROMPTS)).input_ids * 4)[: eng.max_prompt_tokens]
    # three newcomers in one step (padded to 4 rows), one of them as long as a prompt may be: its last chunk's
    # width padding runs into the parking positions the padding row writes
    together = requests[:2] + [GenerationRequest("longest", longest, max_new_tokens=2)]
    for request, result in zip(together, eng.generate(together)):
        assert result.token_ids == reference(engine_models, request), f"{request.id} with {proposer}, together"
    assert all(rows in (1, 2, 4) and width % 16 == 0 for _, _, (rows, width) in calls)
    padded = 0
    for rows, starts, _ in calls:
        real = len(dict.fromkeys(rows))  # padding rows repeat the first row, after the real (distinct) ones
        assert rows[real:] == [rows[0]] * (len(rows) - real)
        assert all(start == eng.park for start in starts[real:]), "a padding row writes only from the parking slot"
        padded += len(rows) - real
    assert padded, "no padded prefill rows: the row padding went untested"
    if sync is not None:
        assert sync.widths, "newcomers must be caught up by the model proposer"
        assert all(width % 16 == 0 for width in sync.widths)


def test_prefill_graphs_cover_each_bucket_and_width_under_the_token_cap(engine_models):
    """With graphs (CUDA), warm-up captures every (batch bucket, padded width) of at most prefill_graph_tokens
    tokens, widest first; a prefill then runs with the smallest captured bucket holding its rows, or eagerly on its
    own rows when no captured shape fits (padding would be wasted work)."""
    from pipelines.prefill import PrefillRunner

    eng = engine(engine_models, "none", 3, 4, pad_tokens=16, prefill_chunk_tokens=40)
    runner = PrefillRunner(engine_models.target, eng.state.target_cache, use_graphs=True, graph_tokens=96)
    captured = []
    runner._capture = lambda rows, tokens, positions: captured.append(tuple(tokens.shape)) or object()
    runner.warm([1, 2, 4], [16, 32, 48], eng.park)
    assert sorted(captured) == [(1, 16), (1, 32), (1, 48), (2, 16), (2, 32), (2, 48), (4, 16)]
    sizes = [rows * width for rows, width in captured]
    assert sizes == sorted(sizes, reverse=True)
    assert [runner.rows_for(n, 16) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [runner.rows_for(n, 48) for n in (1, 2, 3)] == [1, 2, 3]  # (4, 48) is over the cap: eager, unpadded
