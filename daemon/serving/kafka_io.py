"""Kafka clients of the daemon: the prompts consumer and a producer that is replaced after a fatal error.

kafka-python's idempotent producer cannot recover from some errors (a broker that lost its producer ids answers
UnknownProducerId / OutOfOrderSequenceNumber for good), so `Publisher` closes and recreates it on any failed
batch; the caller retries the batch. Duplicates on the completions topic are allowed (at-least-once), lost
records are not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from daemon.config import KafkaSettings

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "request-id"
HEADER_RESENT = "resent"
HEADER_REASON = "reason"
HEADER_REASON_CODE = "reason-code"
HEADER_ORIGINAL_TOPIC = "original-topic"
HEADER_ORIGINAL_PARTITION = "original-partition"
HEADER_ORIGINAL_OFFSET = "original-offset"
MAX_REASON_BYTES = 1024


class ProduceError(RuntimeError):
    """A batch of records was not acknowledged; the producer has been replaced and the batch can be retried."""


@dataclass
class OutboundRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def make_consumer(settings: KafkaSettings) -> KafkaConsumer:
    """Manual commits only: offsets move after the database commit and the produce acks, never on a timer."""
    return KafkaConsumer(
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.max_poll_records,
        # Fetch sizes follow the message limit so one oversized record cannot stall a partition.
        max_partition_fetch_bytes=max(1_048_576, settings.max_request_size * 2),
        **settings.client_options(),
    )


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    return KafkaProducer(
        acks="all",
        enable_idempotence=True,
        compression_type=settings.compression_type,
        max_request_size=settings.max_request_size,
        linger_ms=2,
        **settings.client_options(),
    )


class Publisher:
    """Produces batches and waits for every ack; recreates the producer when a batch fails."""

    def __init__(self, settings: KafkaSettings, producer_factory=make_producer):
        self.settings = settings
        self._factory = producer_factory
        self._producer: KafkaProducer | None = None
        self.recreations = 0

    def _get(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self._factory(self.settings)
        return self._producer

    def send_all(self, records: list[OutboundRecord], timeout_s: float | None = None) -> None:
        """Send and wait for all acks; raises ProduceError (after replacing the producer) if any is missing."""
        if not records:
            return
        timeout_s = timeout_s or self.settings.produce_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            producer = self._get()
            futures = [producer.send(r.topic, value=r.value, key=r.key, headers=r.headers) for r in records]
            producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        except (KafkaError, OSError) as exc:
            self._replace(exc)
            raise ProduceError(f"{type(exc).__name__}: {exc}") from exc

    def _replace(self, cause: Exception) -> None:
        log.warning("producer failed (%s: %s); replacing it", type(cause).__name__, cause)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception as exc:  # a broken producer may fail to close; it is dropped either way
                log.debug("closing the failed producer: %s", exc)
        self.recreations += 1

    def close(self, timeout_s: float = 5.0) -> None:
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None


def dlq_record(dlq_topic: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
               code: str, reason: str, request_id: str | None = None) -> OutboundRecord:  # fmt: skip
    """The original bytes, unchanged, with why and where they came from in headers."""
    headers = [
        (HEADER_REASON, reason.encode()[:MAX_REASON_BYTES]),
        (HEADER_REASON_CODE, code.encode()),
        (HEADER_ORIGINAL_TOPIC, topic.encode()),
        (HEADER_ORIGINAL_PARTITION, str(partition).encode()),
        (HEADER_ORIGINAL_OFFSET, str(offset).encode()),
    ]
    if request_id is not None:
        headers.append((HEADER_REQUEST_ID, request_id.encode()))
    return OutboundRecord(dlq_topic, key, value, headers)


def completion_record(topic: str, key: bytes | None, request_id: str, value: bytes, resent: bool) -> OutboundRecord:
    headers = [(HEADER_REQUEST_ID, request_id.encode())]
    if resent:
        headers.append((HEADER_RESENT, b"1"))
    return OutboundRecord(topic, key, value, headers)
