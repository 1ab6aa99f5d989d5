"""JSONL records as training material for `onlinespec draft init`: token sequences to teacher-force and prompts for
the target to answer.

    {"text": "..."}                              plain text, tokenized as is (the tokenizer's special tokens added)
    {"prompt": "..."} / {"messages": [...]}      the daemon's input contract (daemon/serving/messages.py), rendered
                                                 exactly as the daemon renders it (the chat template for messages);
                                                 `id` may be left out here

A record that is not usable is reported by line number (`Skipped`) and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import LimitSettings
from daemon.serving.messages import InvalidMessage, parse_prompt, tokenize
from pipelines.prompts import encode_prompt
from pipelines.types import GenerationRequest

# A corpus document may be a whole conversation or source file: far longer than a prompt the daemon would take.
CORPUS_LIMITS = LimitSettings(max_message_bytes=100_000_000, max_prompt_chars=100_000_000, max_messages=100_000)
NO_PROMPT_LIMIT = 1 << 62


@dataclass
class Skipped:
    """Lines that were not used, with why (one entry per line)."""

    reasons: list[str] = field(default_factory=list)

    def add(self, path: Path, number: int, reason: str) -> None:
        self.reasons.append(f"{path.name}:{number}: {reason}")

    def summary(self) -> str:
        shown = "; ".join(self.reasons[:3]) + ("; ..." if len(self.reasons) > 3 else "")
        return f"{len(self.reasons)} unusable lines ({shown})" if self.reasons else "no unusable lines"


def read_corpus(path: Path, tokenizer, skipped: Skipped) -> list[list[int]]:
    """Token sequences of every usable record of a corpus file."""
    sequences = []
    for number, line in _lines(path):
        try:
            record = json.loads(line)
            if isinstance(record, dict) and "text" in record:
                if not isinstance(record["text"], str) or not record["text"]:
                    raise InvalidMessage("wrong_type", "`text` must be a non-empty string")
                sequences.append(encode_prompt(tokenizer, record["text"]))
            else:
                sequences.append(read_request(path, number, line, tokenizer, CORPUS_LIMITS, NO_PROMPT_LIMIT).input_ids)
        except (InvalidMessage, ValueError) as exc:
            skipped.add(path, number, str(exc))
    return sequences


def read_prompts(
    path: Path, tokenizer, limits: LimitSettings, max_prompt_tokens: int, skipped: Skipped, *, skip: int, count: int
) -> list[GenerationRequest]:
    """Greedy requests for the usable prompt records after the first `skip` usable ones, at most `count`."""
    requests: list[GenerationRequest] = []
    usable = 0
    for number, line in _lines(path):
        if len(requests) == count:
            break
        try:
            request = read_request(path, number, line, tokenizer, limits, max_prompt_tokens)
        except (InvalidMessage, ValueError) as exc:
            skipped.add(path, number, str(exc))
            continue
        usable += 1
        if usable > skip:
            requests.append(dataclasses.replace(request, temperature=0.0))
    return requests


def read_request(path: Path, number: int, line: str, tokenizer, limits: LimitSettings, max_prompt_tokens: int):
    """One record of the daemon's contract as an engine request; a record without `id` is named after its line."""
    record = json.loads(line)
    if isinstance(record, dict) and "id" not in record:
        record = {"id": f"{path.name}:{number}", **record}
    message = parse_prompt(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"), limits)
    return tokenize(message, tokenizer, max_prompt_tokens)


def _lines(path: Path):
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield number, line
