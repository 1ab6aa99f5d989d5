"""Turning prompts into token ids: one rule for the daemon, `onlinespec generate` and the benchmarks.

    encode_prompt(tokenizer, "def add(a, b):")                  plain text, the tokenizer's special tokens added
    encode_chat(tokenizer, [{"role": "user", "content": ...}])  the chat template, an assistant turn opened
    encode_prompt(tokenizer, text, chat=True)                   text as one user turn of a chat

A chat is rendered to text by the tokenizer's own template (so the target sees what it was trained on) and then
tokenized without adding special tokens: the template already wrote them, and adding a BOS again would give the
model a prompt it never saw in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class NoChatTemplateError(ValueError):
    """A chat was given but the tokenizer has no chat template to render it with."""


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The chat as the text the model reads, ending with an opened assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [dict(message) for message in messages], add_generation_prompt=True, tokenize=False
    )


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a chat (role/content turns) rendered with the tokenizer's chat template."""
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False).input_ids)


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of a plain prompt; with `chat`, the prompt is the single user turn of a chat."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt).input_ids)
