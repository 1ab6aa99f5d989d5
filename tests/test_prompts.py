"""One rule for prompt token ids: pipelines.prompts, used by the daemon's input contract, `onlinespec generate` and
the benchmarks; generate accepts exactly the daemon's records."""

from __future__ import annotations

import argparse
import json

import pytest

from daemon.config import LimitSettings
from daemon.serving.messages import InvalidMessage, parse_prompt, tokenize
from devtools.tiny_models import CHAT_TEMPLATE, build_tokenizer
from pipelines.prompts import NoChatTemplateError, encode_chat, encode_prompt, render_chat

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_a_chat_is_rendered_by_the_template_with_an_open_assistant_turn_and_no_second_bos(tokenizer):
    text = render_chat(tokenizer, CHAT)
    assert text == "<|system|>Be brief.\n<|user|>def add(a, b):\n<|assistant|>"
    assert encode_chat(tokenizer, CHAT) == tokenizer(text, add_special_tokens=False).input_ids
    assert encode_prompt(tokenizer, "def add(a, b):", chat=True) == encode_chat(tokenizer, CHAT[1:])
    assert encode_prompt(tokenizer, "def add(a, b):") == tokenizer("def add(a, b):").input_ids


def test_no_chat_template_is_a_typed_error_and_the_daemon_rejects_the_record(tokenizer):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(NoChatTemplateError):
        encode_chat(bare, CHAT)
    message = parse_prompt(json.dumps({"id": "c", "messages": CHAT}).encode(), LimitSettings())
    with pytest.raises(InvalidMessage) as caught:
        tokenize(message, bare, 100)
    assert caught.value.code == "unsupported" and caught.value.request_id == "c"


def test_the_daemon_and_generate_turn_one_record_into_the_same_request(tokenizer):
    from daemon.cli.generate import read_record

    assert tokenizer.chat_template == CHAT_TEMPLATE
    line = json.dumps({"id": "r1", "messages": CHAT, "max_new_tokens": 7, "stop": ["\n"], "metadata": {"n": 1}})
    limits = LimitSettings()
    daemon = tokenize(parse_prompt(line.encode(), limits), tokenizer, 100)
    args = argparse.Namespace(max_new_tokens=None, temperature=None, top_p=None, seed=None, chat=False)
    request, metadata = read_record(line, args, limits, tokenizer, 100)
    assert request == daemon and metadata == {"n": 1}
    assert request.input_ids == encode_chat(tokenizer, CHAT) and request.seed == daemon.seed  # seed from the id


def test_generate_flags_fill_only_the_fields_a_line_leaves_out_and_chat_renders_a_prompt(tokenizer):
    from daemon.cli.generate import read_record

    args = argparse.Namespace(max_new_tokens=9, temperature=0.5, top_p=0.9, seed=3, chat=True)
    line = json.dumps({"id": "p", "prompt": "def add(a, b):", "temperature": 0.0})
    request, _ = read_record(line, args, LimitSettings(), tokenizer, 100)
    assert (request.max_new_tokens, request.temperature, request.top_p, request.seed) == (9, 0.0, 0.9, 3)
    assert request.input_ids == encode_prompt(tokenizer, "def add(a, b):", chat=True)


@pytest.mark.parametrize(
    ("line", "code", "names"),
    [
        ('{"id": "a", "prompt": "x", "max_new_tokens": "many"}', "wrong_type", "`max_new_tokens`"),
        ('{"id": "a", "prompt": "x", "input_ids": [1, 2]}', "unknown_field", "input_ids"),
        ('{"id": "a", "messages": [{"role": "robot", "content": "x"}]}', "out_of_range", "`messages[0]`.role"),
        ("[1, 2]", "not_object", "JSON object"),
    ],
)
def test_generate_refuses_what_the_daemon_refuses_naming_the_field(tokenizer, line, code, names):
    from daemon.cli.generate import read_record

    args = argparse.Namespace(max_new_tokens=None, temperature=None, top_p=None, seed=None, chat=False)
    with pytest.raises(InvalidMessage) as caught:
        read_record(line, args, LimitSettings(), tokenizer, 100)
    assert caught.value.code == code and names in caught.value.reason
