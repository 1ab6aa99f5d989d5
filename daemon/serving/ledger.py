"""The worker's two units of work against `storage`: admit a batch, then save its results in one transaction.

admit   records every valid request (idempotent on the request id, one statement) and sorts the batch by what
        the id's row says (the contract is in daemon/serving/messages.py):
        decode    new; received before but never completed and not in flight here (a crash mid-batch, or another
                  worker has it: whichever stores first wins); or a dead-lettered request sent again corrected
        resend    the same request has a stored completion: produce it again, byte for byte, never decode twice
        wait      the same request is being decoded in this daemon right now: answered once that copy is stored
        rejected  the id belongs to a different request (id_conflict), or the same dead-lettered record again
save    completions + feedback of the decoded requests, answers for the waiting ones and every dead letter (a
        dead_letters row, and the request's status when it has a usable id), in one transaction; returns what to
        produce per request (another worker's stored message when it stored first).
"""

from __future__ import annotations

import logging
from collections.abc import Container
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
    wait: list[Inbound] = field(default_factory=list)  # the first copy is in flight in this daemon
    rejected: list[tuple[Inbound, InvalidMessage]] = field(default_factory=list)  # DLQ

    def extend(self, other: Admission) -> None:
        self.decode += other.decode
        self.resend += other.resend
        self.wait += other.wait
        self.rejected += other.rejected


@dataclass
class Saved:
    messages: dict[str, str] = field(default_factory=dict)  # request id -> completion to produce
    answered: list[tuple[Inbound, str]] = field(default_factory=list)  # waiting records and their completion
    dead: list[tuple[Inbound, InvalidMessage]] = field(default_factory=list)  # waiting records left unanswered
    refused: set[tuple] = field(default_factory=set)  # (tp, offset) of decoded records the database refused


class BatchStore:
    def __init__(self, session_factory, target_identity: str, *, keep_dead_letter_values: bool = False):
        self.session_factory = session_factory
        self.target_identity = target_identity
        self.keep_dead_letter_values = keep_dead_letter_values

    def admit(self, items: list[Inbound], in_flight: Container[str] = ()) -> Admission:
        """Record and sort a batch of valid records; `in_flight` holds the ids this daemon is decoding now."""
        from storage.requests_repo import find_completions, record_requests_received

        admission = Admission()
        if not items:
            return admission
        received = [_received(item) for item in items]
        with self.session_factory.begin() as session:
            rows = record_requests_received(session, received).requests
            completions = find_completions(session, [rid for rid, (_, is_new) in rows.items() if not is_new])
            decoding: set[str] = set()
            for item, record in zip(items, received):
                row, is_new = rows[item.request.id]
                self._sort(
                    session,
                    admission,
                    item,
                    record,
                    row,
                    is_new and record.same_position(row),
                    completions,
                    in_flight,
                    decoding,
                )
        return admission

    def _sort(
        self,
        session,
        admission: Admission,
        item: Inbound,
        record,
        row,
        first_sight: bool,
        completions,
        in_flight: Container[str],
        decoding: set[str],
    ) -> None:
        from storage.models import RequestStatus
        from storage.requests_repo import readmit_dead_lettered

        request_id = item.request.id
        same_record = record.same_position(row)
        # A row from before request hashes were kept: its own position is all that identifies it.
        same_request = row.request_hash == record.request_hash or (row.request_hash is None and same_record)
        if first_sight:
            admission.decode.append(item)
            decoding.add(request_id)
        elif row.status == RequestStatus.DEAD_LETTERED:
            if same_record and same_request:  # the DLQ ack may not have arrived: send the dead letter again
                code, _, reason = (row.error or "dead_lettered: no reason recorded").partition(": ")
                admission.rejected.append((item, InvalidMessage(code, reason, request_id)))
            elif readmit_dead_lettered(session, record):  # sent again, corrected: serve it
                log.info(
                    "request %s at %s was dead-lettered before (%s); serving the corrected request",
                    request_id,
                    item.where,
                    row.error,
                )
                admission.decode.append(item)
                decoding.add(request_id)
            else:
                admission.rejected.append((item, _conflict(item, row, record.request_hash)))
        elif not same_request:
            admission.rejected.append((item, _conflict(item, row, record.request_hash)))
        elif request_id in completions:
            admission.resend.append((item, completions[request_id].message_json))
        elif request_id in in_flight or request_id in decoding:
            admission.wait.append(item)
        else:
            admission.decode.append(item)
            decoding.add(request_id)

    def save(
        self, decoded: list[Decoded], dead: list[tuple[Inbound, InvalidMessage]], waiting: list[Inbound] = ()
    ) -> Saved:
        """One transaction: completions + feedback, answers for `waiting`, dead letters."""
        from storage.requests_repo import CompletedRequest, find_completions, store_results

        saved = Saved()
        if not decoded and not dead and not waiting:
            return saved
        with self.session_factory.begin() as session:
            completed = [CompletedRequest(d.result, d.message_json, d.timings) for d in decoded]
            saved.messages = store_results(session, completed, target_identity=self.target_identity)
            stored = find_completions(session, [item.request.id for item in waiting])
            for item in waiting:
                if item.request.id in stored:
                    saved.answered.append((item, stored[item.request.id].message_json))
                else:  # its first copy failed (an engine error) and was dead-lettered meanwhile
                    saved.dead.append(
                        (
                            item,
                            InvalidMessage(
                                "not_completed",
                                f"the first copy of request {item.request.id!r} was not completed",
                                item.request.id,
                            ),
                        )
                    )
            self._record_dead_letters(session, list(dead) + saved.dead)
        return saved

    def record_dead_letters(self, dead: list[tuple[Inbound, InvalidMessage]]) -> None:
        """Dead letters found after save (a completion that cannot be produced), in their own transaction."""
        with self.session_factory.begin() as session:
            self._record_dead_letters(session, dead)

    def _record_dead_letters(self, session, dead: list[tuple[Inbound, InvalidMessage]]) -> None:
        from storage.dead_letters_repo import DeadLetterRecord, record_dead_letters
        from storage.requests_repo import DeadLetteredRequest, mark_requests_dead_lettered

        letters = [
            DeadLetterRecord(
                error.request_id, item.tp.topic, item.tp.partition, item.offset, error.code, error.reason, item.value
            )
            for item, error in dead
        ]
        record_dead_letters(session, letters, keep_values=self.keep_dead_letter_values)
        mark_requests_dead_lettered(
            session,
            [
                DeadLetteredRequest(
                    error.request_id, item.tp.topic, item.tp.partition, item.offset, f"{error.code}: {error.reason}"
                )
                for item, error in dead
                if error.request_id
            ],
        )


def _received(item: Inbound):
    from storage.requests_repo import ReceivedRequest

    return ReceivedRequest(
        item.request.id,
        item.tp.topic,
        item.tp.partition,
        item.offset,
        _params(item),
        len(item.request.input_ids),
        item.request_hash,
    )


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


def _conflict(item: Inbound, row, request_hash: str | None) -> InvalidMessage:
    first = f"{row.kafka_topic}/{row.kafka_partition}@{row.kafka_offset}"
    log.warning(
        "request id %r at %s conflicts with the request first received at %s: request hash %s, first %s",
        item.request.id,
        item.where,
        first,
        request_hash,
        row.request_hash,
    )
    stored = f"request hash {row.request_hash[:12]}" if row.request_hash else "no request hash (stored before 0002)"
    return InvalidMessage(
        "id_conflict",
        f"request id {item.request.id!r} was first received at {first} for another request ({stored}, this one "
        f"{(request_hash or '')[:12]}); send a different request under a new id",
        item.request.id,
    )
