"""Greedy speculative decoding is lossless: the same tokens as transformers' greedy generate of the target."""

from __future__ import annotations

import pytest
import torch

from pipelines.engine import EngineSettings, PromptTooLongError, SpeculativeEngine
from pipelines.models import load_model, load_tokenizer
from pipelines.types import KIND_ACCEPTED, KIND_BONUS, KIND_RECOVERED, NO_DRAFT_TOKEN, GenerationRequest
from tests.tiny_models import make_tiny_pair

PROMPTS = [
    "def add(a, b):",
    "The quick brown",
    "SELECT name FROM users WHERE",
    "To be, or not to be, that is the question. All the world's",
    "for i in range(10):\n    print(",
    "T",
    "All the world's a stage. The quick brown fox jumps over",
    "return a +",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, draft_dir = make_tiny_pair(tmp_path_factory.mktemp("models"))
    tokenizer = load_tokenizer(str(target_dir))
    return load_model(str(target_dir)), load_model(str(draft_dir)), tokenizer


def hf_greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    output = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, len(input_ids) :].tolist()


def requests_for(tokenizer, count: int, max_new_tokens: int = 24) -> list[GenerationRequest]:
    return [
        GenerationRequest(id=f"r{i}", input_ids=tokenizer(PROMPTS[i]).input_ids, max_new_tokens=max_new_tokens)
        for i in range(count)
    ]


@pytest.mark.parametrize("k", [0, 1, 3, 5, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_matches_transformers_generate(pair, k, batch_size):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=k, max_batch_size=8, max_seq_len=96))
    requests = requests_for(tokenizer, batch_size)
    for request, result in zip(requests, engine.generate(requests)):
        expected = hf_greedy(target, request.input_ids, request.max_new_tokens)
        assert result.token_ids == expected, f"request {request.id} with k={k}"
        assert result.finish_reason == ("eos" if expected[-1] == tokenizer.eos_token_id else "length")


def test_batches_larger_than_max_batch_size_are_split_and_kept_in_order(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=2, max_batch_size=3, max_seq_len=96))
    requests = requests_for(tokenizer, 8, max_new_tokens=10)
    results = engine.generate(requests)
    assert [r.id for r in results] == [r.id for r in requests]
    for request, result in zip(requests, results):
        assert result.token_ids == hf_greedy(target, request.input_ids, 10)


def test_draft_equal_to_target_accepts_every_draft_token(pair):
    target, _, tokenizer = pair
    engine = SpeculativeEngine(target, target, tokenizer, EngineSettings(k=4, max_batch_size=8, max_seq_len=96))
    results = engine.generate(requests_for(tokenizer, 8, max_new_tokens=21))
    for result in results:
        assert KIND_RECOVERED not in result.feedback.kinds.tolist()
        counters = result.counters
        if result.finish_reason == "length":  # 1 prefill token + 4 full steps of k + 1 = 5 tokens
            assert counters.target_forwards == 5 and counters.accepted == 16
            assert counters.accepted_at_position == [4, 4, 4, 4]
    assert any(r.finish_reason == "length" for r in results)


def test_target_only_mode_without_a_draft(pair):
    target, _, tokenizer = pair
    engine = SpeculativeEngine(target, None, tokenizer, EngineSettings(k=5, max_batch_size=4, max_seq_len=96))
    request = requests_for(tokenizer, 1)[0]
    [result] = engine.generate([request])
    assert result.token_ids == hf_greedy(target, request.input_ids, request.max_new_tokens)
    assert result.counters.drafted == 0 and result.counters.target_forwards == result.counters.emitted
    assert result.feedback.draft_version == "none"


def test_feedback_is_complete_and_consistent_with_counters(pair):
    target, draft, tokenizer = pair
    settings = EngineSettings(k=3, max_batch_size=4, max_seq_len=96, top_m=5)
    engine = SpeculativeEngine(target, draft, tokenizer, settings, draft_version="v7")
    requests = requests_for(tokenizer, 4, max_new_tokens=16)
    for request, result in zip(requests, engine.generate(requests)):
        fb, counters = result.feedback, result.counters
        n = len(result.token_ids)
        assert fb.token_ids.tolist() == result.token_ids and fb.prompt_ids.tolist() == request.input_ids
        assert fb.kinds.shape == (n,) and fb.draft_tokens.shape == (n,)
        assert fb.target_topk_ids.shape == (n, 5) and fb.target_topk_logprobs.shape == (n, 5)
        assert fb.draft_version == "v7"
        kinds = fb.kinds.tolist()
        assert counters.emitted == n
        assert counters.accepted == kinds.count(KIND_ACCEPTED) == sum(counters.accepted_at_position)
        assert counters.mean_accepted_length == pytest.approx(n / counters.target_forwards)
        assert kinds.count(KIND_RECOVERED) + kinds.count(KIND_BONUS) <= counters.target_forwards
        assert kinds[0] == KIND_BONUS and fb.draft_tokens[0] == NO_DRAFT_TOKEN  # the prefill's token
        for i, kind in enumerate(kinds):
            if kind == KIND_ACCEPTED:
                assert fb.draft_tokens[i] == fb.token_ids[i]
            elif kind == KIND_RECOVERED:
                assert fb.draft_tokens[i] not in (fb.token_ids[i], NO_DRAFT_TOKEN)
        # The stored top-m log-probs are the target's own at each emitted position (no extra forward needed).
        sequence = torch.tensor([request.input_ids + result.token_ids[:-1]])
        with torch.no_grad():
            logprobs = torch.log_softmax(target(sequence).logits[0, len(request.input_ids) - 1 :].float(), -1)
        top = logprobs.topk(5, dim=-1)
        assert torch.equal(top.indices, torch.from_numpy(fb.target_topk_ids).long())
        torch.testing.assert_close(top.values, torch.from_numpy(fb.target_topk_logprobs).float(), atol=2e-2, rtol=0)
        assert top.indices[:, 0].tolist() == result.token_ids  # greedy: the emitted token is the target's top-1


def test_stop_strings_and_max_new_tokens(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=2, max_seq_len=96))
    base = requests_for(tokenizer, 1, max_new_tokens=24)[0]
    [full] = engine.generate([base])
    stop = full.text[3:5]
    assert stop, "the reference completion is too short to pick a stop string from"
    stopped_request = GenerationRequest(id="s", input_ids=base.input_ids, max_new_tokens=24, stop=(stop,))
    short_request = GenerationRequest(id="m", input_ids=base.input_ids, max_new_tokens=2)
    stopped, short = engine.generate([stopped_request, short_request])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert full.text.startswith(stopped.text)
    assert full.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert short.token_ids == full.token_ids[:2] and short.finish_reason == "length"


def test_prompt_longer_than_the_cache_is_refused_with_a_clear_error(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=2, max_seq_len=32))
    request = GenerationRequest(id="long", input_ids=[5] * 40)
    with pytest.raises(PromptTooLongError, match="'long'.*40 tokens"):
        engine.generate([request])


def test_swap_draft_changes_version_and_keeps_output_lossless(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=2, max_seq_len=96))
    request = requests_for(tokenizer, 1)[0]
    [before] = engine.generate([request])
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: t + 0.3 * torch.randn(t.shape, generator=generator) for name, t in draft.state_dict().items()}
    original = {name: t.clone() for name, t in draft.state_dict().items()}
    try:
        engine.swap_draft(perturbed, "v-perturbed")
        [after] = engine.generate([request])
    finally:
        engine.swap_draft(original, "base")
    assert before.feedback.draft_version == "base" and after.feedback.draft_version == "v-perturbed"
    assert after.token_ids == before.token_ids == hf_greedy(target, request.input_ids, request.max_new_tokens)
    assert not torch.equal(torch.from_numpy(after.feedback.kinds), torch.from_numpy(before.feedback.kinds)) or (
        after.counters.accepted == before.counters.accepted
    )


def test_swap_draft_refuses_weights_of_another_shape(pair):
    target, draft, tokenizer = pair
    engine = SpeculativeEngine(target, draft, tokenizer, EngineSettings(k=3, max_batch_size=2, max_seq_len=96))
    with pytest.raises(ValueError, match="do not fit"):
        engine.swap_draft({"nonsense": torch.zeros(1)}, "bad")
    assert engine.draft_version == "base"
