"""The input contract: every kind of bad record gets a precise reason; valid ones become engine requests; the
request hash says when two records under one id are the same request."""

from __future__ import annotations

import json
import zlib

import pytest

from daemon.config import LimitSettings
from daemon.serving.messages import InvalidMessage, completion_payload, parse_prompt, request_hash, tokenize
from pipelines.types import GenerationResult, RequestCounters, RequestFeedback

LIMITS = LimitSettings(
    max_message_bytes=2048, max_prompt_chars=500, max_metadata_bytes=64, max_new_tokens=100, default_max_new_tokens=10
)


def encode(obj) -> bytes:
    return json.dumps(obj).encode()


def reject(value: bytes | None) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse_prompt(value, LIMITS)
    return caught.value


def test_minimal_prompt_gets_defaults_and_a_seed_derived_from_the_id():
    message = parse_prompt(encode({"id": "a1", "prompt": "hello"}), LIMITS)
    assert (message.id, message.prompt, message.messages) == ("a1", "hello", None)
    assert message.max_new_tokens == 10 and message.temperature == 0.0 and message.top_p == 1.0
    assert message.seed == zlib.crc32(b"a1") and message.stop == () and message.metadata is None


def test_all_optional_fields():
    message = parse_prompt(
        encode(
            {
                "id": "x",
                "messages": [{"role": "user", "content": "hi"}],
                "max_new_tokens": 5,
                "temperature": 0.7,
                "top_p": 0.9,
                "seed": 3,
                "stop": "\n",
                "metadata": {"user": 7},
            }
        ),
        LIMITS,
    )
    assert message.messages == ({"role": "user", "content": "hi"},)
    assert (message.max_new_tokens, message.temperature, message.top_p, message.seed) == (5, 0.7, 0.9, 3)
    assert message.stop == ("\n",) and message.metadata == {"user": 7}


@pytest.mark.parametrize(
    "value, code, fragment",
    [
        (None, "empty", "no value"),
        (b"\xff\xfe", "not_utf8", "not UTF-8"),
        (b"{not json", "not_json", "not JSON"),
        (b"[1, 2]", "not_object", "got array"),
        (encode({"prompt": "p"}), "missing_field", "missing required field `id`"),
        (encode({"id": 5, "prompt": "p"}), "wrong_type", "`id` must be a string, got number"),
        (encode({"id": "", "prompt": "p"}), "out_of_range", "`id` must not be empty"),
        (encode({"id": "a"}), "missing_field", "exactly one of `prompt` or `messages` (got neither)"),
        (encode({"id": "a", "prompt": "p", "messages": []}), "conflicting_fields", "(got both)"),
        (encode({"id": "a", "prompt": ["p"]}), "wrong_type", "`prompt` must be a string, got array"),
        (encode({"id": "a", "prompt": "p", "model": "gpt"}), "unknown_field", "unknown field(s): model"),
        (
            encode({"id": "a", "prompt": "p", "max_new_tokens": "5"}),
            "wrong_type",
            "`max_new_tokens` must be an integer",
        ),
        (encode({"id": "a", "prompt": "p", "max_new_tokens": True}), "wrong_type", "got boolean"),
        (encode({"id": "a", "prompt": "p", "max_new_tokens": 0}), "out_of_range", "between 1 and 100, got 0"),
        (encode({"id": "a", "prompt": "p", "max_new_tokens": 101}), "out_of_range", "between 1 and 100"),
        (encode({"id": "a", "prompt": "p", "temperature": -1}), "out_of_range", "`temperature` must be in [0, 100]"),
        (encode({"id": "a", "prompt": "p", "top_p": 0}), "out_of_range", "`top_p` must be in (0, 1]"),
        (encode({"id": "a", "prompt": "p", "seed": -2}), "out_of_range", "`seed`"),
        (encode({"id": "a", "prompt": "p", "stop": [1]}), "wrong_type", "`stop` must be a string or a list"),
        (encode({"id": "a", "prompt": "p", "stop": [""]}), "out_of_range", "each `stop` string"),
        (encode({"id": "a", "prompt": "p", "metadata": [1]}), "wrong_type", "`metadata` must be an object"),
        (encode({"id": "a", "prompt": "p", "metadata": {"k": "v" * 100}}), "too_large", "`metadata` is"),
        (encode({"id": "a", "prompt": "p" * 501}), "too_large", "501 characters, the limit is 500"),
        (encode({"id": "a", "prompt": "p" * 2100}), "too_large", "the limit is 2048"),
        (encode({"id": "a", "messages": "hi"}), "wrong_type", "`messages` must be a list"),
        (encode({"id": "a", "messages": [{"role": "robot", "content": "x"}]}), "out_of_range", "messages[0]`.role"),
        (encode({"id": "a", "messages": [{"role": "user", "content": 1}]}), "wrong_type", ".content must be a string"),
        (encode({"id": "a", "messages": [{"role": "user", "content": "x", "x": 1}]}), "unknown_field", "x"),
        # What Python's json accepts but JSON, PostgreSQL or the engine do not:
        (b'{"id": "a", "prompt": "p", "temperature": NaN}', "not_json", "NaN is not a JSON number"),
        (b'{"id": "a", "prompt": "p", "top_p": Infinity}', "not_json", "Infinity is not a JSON number"),
        (b'{"id": "a", "prompt": "p", "metadata": {"x": 1e400}}', "not_json", "too large for a double"),
        (b'{"id": "a", "prompt": "\\ud800 alone"}', "not_utf8", "lone UTF-16 surrogate"),
        (b'{"id": "a", "prompt": "p", "metadata": {"\\udfff": 1}}', "not_utf8", "lone UTF-16 surrogate"),
        (encode({"id": "a\u0000b", "prompt": "p"}), "out_of_range", "`id` must not contain control characters"),
    ],
)
def test_rejections_have_a_code_and_a_precise_reason(value, code, fragment):
    error = reject(value)
    assert error.code == code
    assert fragment in error.reason


def test_rejection_keeps_the_request_id_when_there_is_one():
    assert reject(encode({"id": "keep-me", "prompt": 3})).request_id == "keep-me"
    assert reject(encode({"id": 3, "prompt": "p"})).request_id is None
    # An id that could not key a request (a row, a header, a log line) is not kept either.
    for unusable in ("", "   ", "x" * 257, "tab\there", "nul\u0000"):
        assert reject(encode({"id": unusable, "prompt": 3})).request_id is None


def test_the_parsers_own_limits_are_rejections_too():
    large = LimitSettings(max_message_bytes=1_000_000)
    for value, fragment in (
        (b'{"id": "a", "prompt": "p", "seed": ' + b"9" * 5000 + b"}", "not usable JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ):
        with pytest.raises(InvalidMessage, match=fragment) as caught:
            parse_prompt(value, large)
        assert caught.value.code == "not_json"


def test_a_reason_stays_short_however_many_names_it_lists():
    value = encode({"id": "a", "prompt": "p", **{"k" * 1000 + str(i): 1 for i in range(1000)}})
    with pytest.raises(InvalidMessage) as caught:
        parse_prompt(value, LimitSettings(max_message_bytes=2_000_000))
    error = caught.value
    assert error.code == "unknown_field" and len(error.reason) < 700 and "(+992 more)" in error.reason


def test_a_surrogate_pair_escape_is_a_character_not_an_error():
    assert parse_prompt(b'{"id": "a", "prompt": "smile \\ud83d\\ude00"}', LIMITS).prompt == "smile \U0001f600"


def test_the_request_hash_is_the_request_as_parsed():
    def hashed(**fields) -> str:
        return request_hash(parse_prompt(encode({"id": "a", "prompt": "p", **fields}), LIMITS))

    same = hashed(metadata={"x": 1, "y": [1, 2]})
    assert hashed(metadata={"y": [1, 2], "x": 1}) == same  # key order
    assert request_hash(parse_prompt(b'{ "prompt" : "p", "metadata": {"x":1,"y":[1,2]}, "id":"a" }', LIMITS)) == same
    assert hashed(max_new_tokens=10, temperature=0, top_p=1, metadata={"x": 1, "y": [1, 2]}) == same  # defaults
    assert (
        request_hash(
            parse_prompt(
                encode({"id": "other", "prompt": "p", "metadata": {"x": 1, "y": [1, 2]}, "seed": zlib.crc32(b"a")}),
                LIMITS,
            )
        )
        == same
    )  # the id is not hashed
    different = [
        hashed(),
        hashed(metadata={"x": 2, "y": [1, 2]}),
        hashed(metadata={"x": 1, "y": [1, 2]}, seed=1),
        hashed(metadata={"x": 1, "y": [1, 2]}, stop="\n"),
        hashed(metadata={"x": 1, "y": [1, 2]}, max_new_tokens=11),
        request_hash(parse_prompt(encode({"id": "a", "prompt": "q", "metadata": {"x": 1, "y": [1, 2]}}), LIMITS)),
        request_hash(
            parse_prompt(
                encode({"id": "a", "messages": [{"role": "user", "content": "p"}], "metadata": {"x": 1, "y": [1, 2]}}),
                LIMITS,
            )
        ),
    ]
    assert same not in different and len(set(different)) == len(different)


class FakeTokenizer:
    """Character-level stand-in; the daemon tests use the real tiny tokenizer."""

    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        class Encoded:
            input_ids = [ord(c) % 256 for c in text]

        return Encoded()

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_tokenize_renders_chat_and_enforces_the_engine_prompt_limit():
    tokenizer = FakeTokenizer()
    chat = parse_prompt(encode({"id": "c", "messages": [{"role": "user", "content": "hi"}]}), LIMITS)
    assert len(tokenize(chat, tokenizer, 100).input_ids) == len("<user>hi<assistant>")
    long = parse_prompt(encode({"id": "l", "prompt": "x" * 50}), LIMITS)
    with pytest.raises(InvalidMessage) as caught:
        tokenize(long, tokenizer, 49)
    assert caught.value.code == "prompt_too_long"
    assert caught.value.reason == "prompt has 50 tokens, the limit is 49"


def test_completion_payload_follows_the_output_contract():
    import numpy as np

    by_proposer = {"suffix": {"rounds": 2, "drafted": 6, "accepted": 4}}
    counters = RequestCounters(
        draft_steps=2, drafted=6, accepted=4, target_forwards=3, emitted=7, by_proposer=by_proposer
    )
    empty = np.zeros(0, dtype=np.int32)
    feedback = RequestFeedback(
        empty, empty, empty.astype(np.uint8), empty, empty.reshape(0, 1), empty.reshape(0, 1), draft_version="v3"
    )
    result = GenerationResult("r1", [1, 2, 3, 4, 5, 6, 7], "text", "length", counters, feedback, 0.5)
    payload = completion_payload(result, 4, {"k": 1}, 0.25)
    assert set(payload) == {
        "id",
        "text",
        "token_ids",
        "finish_reason",
        "draft_version",
        "usage",
        "acceptance",
        "timings",
        "metadata",
    }
    assert payload["acceptance"] == {
        "drafted": 6,
        "accepted": 4,
        "target_forwards": 3,
        "mean_accepted_length": 2.3333,
        "by_proposer": by_proposer,
    }
    assert payload["draft_version"] == "v3" and payload["metadata"] == {"k": 1}
    assert payload["usage"] == {"prompt_tokens": 4, "completion_tokens": 7}
