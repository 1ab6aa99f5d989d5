"""The worker's two units of work against `storage`: admit a batch, then save its results in one transaction.

admit   records every valid request (idempotent on the request id, one statement) and sorts the batch into
        decode    new, or received before but never completed (a crash mid-batch, a failed decode)
        resend    a stored completion exists: produce it again, byte for byte, never decode twice
        rejected  the id was first received at another position (a duplicate id), the position belongs to
                  another id (the topic was re-created), or the request was dead-lettered before
save    completions + feedback of the decoded requests and the dead letters, in one transaction; returns the
        message to produce per request (another worker's stored message when it stored first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from daemon.serving.batching import Inbound
from daemon.serving.messages import InvalidMessage
from pipelines.types import GenerationResult

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    item: Inbound
    result: GenerationResult
    message_json: str  # the completion record value as decoded here
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Admission:
    decode: list[Inbound] = field(default_factory=list)
    resend: list[tuple[Inbound, str]] = field(default_factory=list)  # (record, stored message_json)
    rejected: list[tuple[Inbound, InvalidMessage]] = field(default_factory=list)  # DLQ, nothing to record


class BatchStore:
    def __init__(self, session_factory, target_identity: str):
        self.session_factory = session_factory
        self.target_identity = target_identity

    def admit(self, items: list[Inbound]) -> Admission:
        from storage.models import RequestStatus
        from storage.requests_repo import ReceivedRequest, find_completions, record_requests_received

        admission = Admission()
        if not items:
            return admission
        received = [
            ReceivedRequest(item.request.id, item.tp.topic, item.tp.partition, item.offset, _params(item),
                            len(item.request.input_ids))  # fmt: skip
            for item in items
        ]
        with self.session_factory.begin() as session:
            batch = record_requests_received(session, received)
            conflicts = {(c.received.topic, c.received.partition, c.received.offset): c for c in batch.conflicts}
            completions = find_completions(session, [rid for rid, (_, is_new) in batch.requests.items() if not is_new])
            for item in items:
                conflict = conflicts.get((item.tp.topic, item.tp.partition, item.offset))
                if conflict is not None:
                    admission.rejected.append((item, InvalidMessage("position_conflict", conflict.describe(),
                                                                    item.request.id)))  # fmt: skip
                    continue
                row, _ = batch.requests[item.request.id]
                if (row.kafka_topic, row.kafka_partition, row.kafka_offset) != (item.tp.topic, item.tp.partition,
                                                                                item.offset):  # fmt: skip
                    admission.rejected.append((item, _duplicate(item, row)))
                elif item.request.id in completions:
                    admission.resend.append((item, completions[item.request.id].message_json))
                elif row.status == RequestStatus.DEAD_LETTERED:
                    # Dead-lettered before, but the DLQ ack may not have arrived: send it again.
                    admission.rejected.append((item, InvalidMessage("dead_lettered", row.error or "dead-lettered",
                                                                    item.request.id)))  # fmt: skip
                else:
                    admission.decode.append(item)
        return admission

    def save(self, decoded: list[Decoded], dead: list[tuple[Inbound, InvalidMessage]]) -> dict[str, str]:
        """One transaction; returns request id -> message to produce."""
        from storage.requests_repo import CompletedRequest, store_results

        if not decoded and not dead:
            return {}
        with self.session_factory.begin() as session:
            completed = [CompletedRequest(d.result, d.message_json, d.timings) for d in decoded]
            messages = store_results(session, completed, target_identity=self.target_identity)
            for item, error in dead:
                if error.request_id:
                    _record_dead_letter(session, item, error)
        return messages


def _record_dead_letter(session, item: Inbound, error: InvalidMessage) -> None:
    """Keep why a request with a usable id went to the DLQ (records without one exist only on the DLQ topic)."""
    from storage.errors import KafkaPositionConflictError
    from storage.models import Request
    from storage.requests_repo import mark_dead_lettered

    existing = session.get(Request, error.request_id)
    if existing is not None and (existing.kafka_topic, existing.kafka_partition, existing.kafka_offset) != (
        item.tp.topic, item.tp.partition, item.offset
    ):
        return  # the id belongs to another record: a bad copy must not change that request's status
    try:
        with session.begin_nested():  # a conflicting position must not undo the batch's completions
            mark_dead_lettered(session, error.request_id, f"{error.code}: {error.reason}", topic=item.tp.topic,
                               partition=item.tp.partition, offset=item.offset)  # fmt: skip
    except KafkaPositionConflictError as exc:
        log.warning("not recording the dead letter at %s: %s", item.where, exc)


def _params(item: Inbound) -> dict:
    message, request = item.message, item.request
    return {
        "max_new_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop),
        "chat": message.messages is not None,
        "metadata": message.metadata,
    }


def _duplicate(item: Inbound, row) -> InvalidMessage:
    return InvalidMessage(
        "duplicate_id",
        f"request id {item.request.id!r} was already received at "
        f"{row.kafka_topic}/{row.kafka_partition}@{row.kafka_offset}",
        item.request.id,
    )
