"""The message contracts: validating prompt records and building completion records.

Input (JSON object, UTF-8): `id` (string, required, the idempotency key), exactly one of `prompt` (string) or
`messages` (chat list rendered with the target tokenizer's chat template), optional `max_new_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `metadata` (object, echoed back). Anything else is rejected with a
reason; rejected records go to the DLQ and never stop the daemon. An `id` is usable when it is a non-blank
string of at most `limits.max_id_chars` characters without control characters; NaN, Infinity, numbers too
large for a double, lone UTF-16 surrogates and nesting deeper than the JSON parser allows are rejected too.

Idempotency (the `id`). The request itself is identified by `request_hash`: the sha256 of the parsed request
(prompt or messages, max_new_tokens, temperature, top_p, seed, stop, metadata; not the id, not the JSON layout,
and a field left out hashes like its default written out).
- The same id with the same request (a redelivery, or a client or producer sending it again at another offset)
  is answered with the stored completion, byte for byte, with header `resent: 1`; it is never decoded twice.
  If the first copy is still being decoded in this daemon, the answer follows as soon as that copy is stored.
- The same id with a different request is a conflict: dead-lettered with reason code `id_conflict`, a reason
  that names where the id was first received and both hashes; the first request is unaffected.
- An id whose request was dead-lettered (invalid, prompt too long, too many tokens, ...) is free again: a
  corrected request under the same id is served.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from daemon.config import LimitSettings
from pipelines.prompts import NoChatTemplateError, encode_chat, encode_prompt
from pipelines.types import GenerationRequest, GenerationResult

FIELDS = ("id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "seed", "stop", "metadata")
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_STOP_CHARS = 256
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidMessage(ValueError):
    """A prompt record the daemon cannot serve. `code` is stable (header `reason-code`), the text says why."""

    def __init__(self, code: str, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True)
class PromptMessage:
    """A validated prompt record, before tokenization."""

    id: str
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    metadata: dict[str, Any] | None


def parse_prompt(value: bytes | None, limits: LimitSettings) -> PromptMessage:
    """Validate one record value against the input contract; raises InvalidMessage naming the first problem."""
    if value is None:
        raise InvalidMessage("empty", "record has no value (tombstone)")
    if len(value) > limits.max_message_bytes:
        raise InvalidMessage("too_large", f"record is {len(value)} bytes, the limit is {limits.max_message_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("not_utf8", f"value is not UTF-8 (byte {exc.start})") from None
    obj = _load_json(text)
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object", f"value must be a JSON object, got {_json_type(obj)}")

    request_id = _usable_id(obj.get("id"), limits)
    try:
        return _validate_object(obj, request_id, limits)
    except InvalidMessage as exc:
        exc.request_id = request_id
        raise


def _load_json(text: str) -> Any:
    """json.loads, refusing what Python accepts but JSON and our storage do not (NaN, Infinity, 1e400, lone
    surrogates) and turning the parser's own limits (nesting depth, digits) into InvalidMessage."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except InvalidMessage:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidMessage(
            "not_json", f"value is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidMessage("not_json", "value is nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidMessage("not_json", f"value is not usable JSON: {exc}") from None
    if "\\ud" in text or "\\uD" in text:  # only a \uD800-\uDFFF escape makes one
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage("not_utf8", "value holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF)") from None
    return obj


def _refuse_constant(name: str):
    raise InvalidMessage("not_json", f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise InvalidMessage("not_json", f"number {literal[:40]} is too large for a double")
    return value


def _usable_id(value: Any, limits: LimitSettings) -> str | None:
    """The id when it can key a request (and a DLQ header, a log line, a database row), else None."""
    if not isinstance(value, str) or not value.strip() or len(value) > limits.max_id_chars:
        return None
    return None if CONTROL_CHARACTERS.search(value) else value


def _validate_object(obj: dict[str, Any], request_id: str | None, limits: LimitSettings) -> PromptMessage:
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InvalidMessage("unknown_field", f"unknown field(s): {_some(unknown)}; allowed: {', '.join(FIELDS)}")
    if "id" not in obj:
        raise InvalidMessage("missing_field", "missing required field `id`")
    raw_id = obj["id"]
    if not isinstance(raw_id, str):
        raise InvalidMessage("wrong_type", f"`id` must be a string, got {_json_type(raw_id)}")
    if not raw_id.strip():
        raise InvalidMessage("out_of_range", "`id` must not be empty")
    if len(raw_id) > limits.max_id_chars:
        raise InvalidMessage("out_of_range", f"`id` has {len(raw_id)} characters, the limit is {limits.max_id_chars}")
    if request_id is None:
        raise InvalidMessage("out_of_range", "`id` must not contain control characters")

    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise InvalidMessage(
            "missing_field" if which == "neither" else "conflicting_fields",
            f"give exactly one of `prompt` or `messages` (got {which})",
        )
    prompt = messages = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise InvalidMessage("wrong_type", f"`prompt` must be a string, got {_json_type(prompt)}")
        if not prompt:
            raise InvalidMessage("out_of_range", "`prompt` must not be empty")
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidMessage(
                "too_large", f"`prompt` has {len(prompt)} characters, the limit is {limits.max_prompt_chars}"
            )
    else:
        messages = _validate_messages(obj["messages"], limits)

    return PromptMessage(
        id=request_id,
        prompt=prompt,
        messages=messages,
        max_new_tokens=_int_field(obj, "max_new_tokens", limits.default_max_new_tokens, 1, limits.max_new_tokens),
        temperature=_float_field(obj, "temperature", 0.0, 0.0, MAX_TEMPERATURE, low_open=False),
        top_p=_float_field(obj, "top_p", 1.0, 0.0, 1.0, low_open=True),
        # Without a seed, derive one from the id: a request decoded again after a crash samples the same text.
        seed=_int_field(obj, "seed", zlib.crc32(request_id.encode()), 0, MAX_SEED),
        stop=_validate_stop(obj.get("stop"), limits),
        metadata=_validate_metadata(obj.get("metadata"), limits),
    )


def _validate_messages(messages: Any, limits: LimitSettings) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list):
        raise InvalidMessage("wrong_type", f"`messages` must be a list, got {_json_type(messages)}")
    if not messages:
        raise InvalidMessage("out_of_range", "`messages` must not be empty")
    if len(messages) > limits.max_messages:
        raise InvalidMessage("too_large", f"`messages` has {len(messages)} entries, the limit is {limits.max_messages}")
    total_chars = 0
    for index, message in enumerate(messages):
        where = f"`messages[{index}]`"
        if not isinstance(message, dict):
            raise InvalidMessage("wrong_type", f"{where} must be an object, got {_json_type(message)}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InvalidMessage("unknown_field", f"{where} has unknown field(s): {_some(extra)}")
        if message.get("role") not in CHAT_ROLES:
            raise InvalidMessage("out_of_range", f"{where}.role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InvalidMessage("wrong_type", f"{where}.content must be a string")
        total_chars += len(message["content"])
    if total_chars > limits.max_prompt_chars:
        raise InvalidMessage(
            "too_large", f"`messages` hold {total_chars} characters, the limit is {limits.max_prompt_chars}"
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def _int_field(obj: dict, name: str, default: int, low: int, high: int) -> int:
    if name not in obj or obj[name] is None:
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage("wrong_type", f"`{name}` must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise InvalidMessage("out_of_range", f"`{name}` must be between {low} and {high}, got {value}")
    return value


def _float_field(obj: dict, name: str, default: float, low: float, high: float, low_open: bool) -> float:
    if name not in obj or obj[name] is None:
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidMessage("wrong_type", f"`{name}` must be a number, got {_json_type(value)}")
    if (value <= low if low_open else value < low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidMessage("out_of_range", f"`{name}` must be in {interval}, got {value}")
    return float(value)


def _validate_stop(stop: Any, limits: LimitSettings) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidMessage("wrong_type", "`stop` must be a string or a list of strings")
    if len(stops) > limits.max_stop_strings:
        raise InvalidMessage("out_of_range", f"`stop` has {len(stops)} strings, the limit is {limits.max_stop_strings}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidMessage("out_of_range", f"each `stop` string must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _validate_metadata(metadata: Any, limits: LimitSettings) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidMessage("wrong_type", f"`metadata` must be an object, got {_json_type(metadata)}")
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > limits.max_metadata_bytes:
        raise InvalidMessage("too_large", f"`metadata` is {size} bytes, the limit is {limits.max_metadata_bytes}")
    return metadata


def _some(names: list[str], most: int = 8, chars: int = 40) -> str:
    """A few of the names, each shortened: a reason names the problem and stays a log line long."""
    shown = ", ".join(name if len(name) <= chars else name[:chars] + "..." for name in names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def request_hash(message: PromptMessage) -> str:
    """sha256 of the request as parsed: what makes two records with one id the same request (see the module
    docstring). Canonical JSON, so key order, whitespace and defaults written out do not change it."""
    canonical = {
        "prompt": message.prompt,
        "messages": None if message.messages is None else list(message.messages),
        "max_new_tokens": message.max_new_tokens,
        "temperature": message.temperature,
        "top_p": message.top_p,
        "seed": message.seed,
        "stop": list(message.stop),
        "metadata": message.metadata,
    }
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def tokenize(message: PromptMessage, tokenizer, max_prompt_tokens: int) -> GenerationRequest:
    """Render and tokenize a validated message; a prompt the engine has no room for is InvalidMessage."""
    if message.messages is not None:
        try:
            input_ids = encode_chat(tokenizer, message.messages)
        except NoChatTemplateError:
            reason = "`messages` given but the target tokenizer has no chat template"
            raise InvalidMessage("unsupported", reason, message.id) from None
    else:
        input_ids = encode_prompt(tokenizer, message.prompt)
    if not input_ids:
        raise InvalidMessage("out_of_range", "the prompt tokenizes to nothing", message.id)
    if len(input_ids) > max_prompt_tokens:
        raise InvalidMessage(
            "prompt_too_long", f"prompt has {len(input_ids)} tokens, the limit is {max_prompt_tokens}", message.id
        )
    return GenerationRequest(
        id=message.id,
        input_ids=list(input_ids),
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed,
        stop=message.stop,
    )


def completion_payload(
    result: GenerationResult, prompt_tokens: int, metadata: dict[str, Any] | None, before_engine_s: float
) -> dict[str, Any]:
    """The output contract; stored as sent, so a redelivered request gets the same bytes again. Timings count from
    the record's arrival in the poll thread (`before_engine_s` is its wait until it was handed to the engine):
    queue_s until an engine slot took it, first_token_s until its first token, decode_s from the slot to its last
    token (prefill included)."""
    counters = result.counters
    return {
        "id": result.id,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "draft_version": result.feedback.draft_version,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids)},
        "acceptance": {
            "drafted": counters.drafted,
            "accepted": counters.accepted,
            "target_forwards": counters.target_forwards,
            "mean_accepted_length": round(counters.mean_accepted_length, 4),
            # per proposer that drafted for this request: {"suffix": {"rounds", "drafted", "accepted"}, ...}
            "by_proposer": counters.by_proposer,
        },
        "timings": {
            "queue_s": round(before_engine_s + result.queued_seconds, 4),
            "first_token_s": round(before_engine_s + result.first_token_seconds, 4),
            "decode_s": round(result.seconds - result.queued_seconds, 4),
        },
        "metadata": metadata,
    }


def encode_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
