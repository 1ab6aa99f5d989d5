"""Kafka clients of the daemon: the prompts consumer, a producer that is replaced after a failure, and the records
it sends (completions and dead letters).

`Publisher.send_all` reports per record: acknowledged, or failed with an error that `classify` sorts into
    permanent     no retry can fix it: the record itself (too large, not serializable, refused as invalid) or
                  what we may do (authorization, a topic name the broker refuses). The caller dead-letters or
                  records the record and moves on.
    transient     the cluster's state: connections, timeouts, leader changes, not enough replicas, a topic that is
                  (re)created right now, a producer id the broker lost in a restart. The caller retries with
                  back-off; the record is fine.
    unclassified  anything else: retried like a transient error, but at most UNCLASSIFIED_ATTEMPTS times, so an
                  error nobody foresaw cannot hold a partition forever.
kafka-python's idempotent producer cannot recover from some errors (a broker that lost its producer ids answers
UnknownProducerId / OutOfOrderSequenceNumber for good), so the Publisher closes and recreates it after any
failure past the client-side checks. Duplicates on the completions topic are allowed (at-least-once), lost
records are not.

A dead letter always fits (`dlq_record`): the original value is kept only up to what the producer's
max_request_size leaves after key and headers, with the original size and sha256 in headers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.record.default_records import DefaultRecordBatchBuilder

from daemon.config import KafkaSettings

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "request-id"
HEADER_RESENT = "resent"
HEADER_REASON = "reason"
HEADER_REASON_CODE = "reason-code"
HEADER_ORIGINAL_TOPIC = "original-topic"
HEADER_ORIGINAL_PARTITION = "original-partition"
HEADER_ORIGINAL_OFFSET = "original-offset"
HEADER_ORIGINAL_SIZE = "original-size"
HEADER_ORIGINAL_SHA256 = "original-sha256"
HEADER_ORIGINAL_KEY_SIZE = "original-key-size"  # only when the key was cut
HEADER_TRUNCATED = "truncated"  # "1" when the value is a prefix of the original
HEADER_TOMBSTONE = "tombstone"  # "1" when the original had no value (the DLQ record then has an empty one)
MAX_REASON_BYTES = 1024
MAX_DLQ_KEY_BYTES = 1024
# Room kept below max_request_size for the varints that grow with the value's length.
SIZE_MARGIN_BYTES = 64
UNCLASSIFIED_ATTEMPTS = 5

PERMANENT, TRANSIENT, UNCLASSIFIED = "permanent", "transient", "unclassified"
PERMANENT_ERRORS = (
    kafka_errors.MessageSizeTooLargeError,  # raised by send() against max_request_size, or by the broker
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRecordError,
    kafka_errors.CorruptRecordError,
    kafka_errors.InvalidTimestampError,
    kafka_errors.InvalidTopicError,  # a name the broker will never accept
    kafka_errors.AuthorizationError,  # topic, cluster and transactional-id authorization
    kafka_errors.PolicyViolationError,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.KafkaConfigurationError,
    TypeError,  # serialization: not bytes
    ValueError,  # serialization: neither key nor value, text that is not encodable
)
TRANSIENT_ERRORS = (
    kafka_errors.RetriableError,  # connections, timeouts, leaders, replicas, unknown topic or partition
    kafka_errors.BrokerNotAvailableError,
    kafka_errors.UnknownProducerIdError,  # a restarted broker lost our producer id: a new producer fixes it
    kafka_errors.OutOfOrderSequenceNumberError,
    kafka_errors.InvalidProducerEpochError,
    kafka_errors.ProducerFencedError,
    kafka_errors.IllegalStateError,  # a producer closed under us
    OSError,
)


def classify(exc: BaseException) -> str:
    """PERMANENT, TRANSIENT or UNCLASSIFIED (see the module docstring)."""
    if isinstance(exc, PERMANENT_ERRORS):
        return PERMANENT
    if isinstance(exc, TRANSIENT_ERRORS):
        return TRANSIENT
    return UNCLASSIFIED


@dataclass
class OutboundRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Failure:
    index: int  # into the records given to send_all
    error: BaseException
    kind: str  # PERMANENT | TRANSIENT | UNCLASSIFIED


@dataclass
class Delivery:
    """What became of one send_all: every record not listed in `failures` was acknowledged."""

    failures: list[Failure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failures


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
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        # Fetch sizes follow the message limit so one oversized record cannot stall a partition.
        max_partition_fetch_bytes=max(1_048_576, settings.max_request_size * 2),
        **settings.client_options(),
    )


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    timeout_ms = int(settings.produce_timeout_s * 1000)
    return KafkaProducer(
        acks="all",
        enable_idempotence=True,
        compression_type=settings.compression_type,
        max_request_size=settings.max_request_size,
        linger_ms=2,
        # send() waits this long for a topic's metadata (60 s by default): a missing topic must not hold the
        # sink much longer than a missing ack does.
        max_block_ms=timeout_ms,
        **settings.client_options(),
    )


class Publisher:
    """Produces batches and waits for every ack; recreates the producer after a failure."""

    def __init__(self, settings: KafkaSettings, producer_factory=make_producer):
        self.settings = settings
        self._factory = producer_factory
        self._producer: KafkaProducer | None = None
        self.recreations = 0

    def _get(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self._factory(self.settings)
        return self._producer

    def send_all(self, records: list[OutboundRecord], timeout_s: float | None = None) -> Delivery:
        """Send, wait for the acks, and report each record that failed with its classified error."""
        delivery = Delivery()
        if not records:
            return delivery
        timeout_s = timeout_s or self.settings.produce_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            producer = self._get()
        except Exception as exc:  # no producer (e.g. no broker reachable): nothing was sent
            delivery.failures = [Failure(i, exc, TRANSIENT) for i in range(len(records))]
            self._replace(exc)
            return delivery
        futures = {}
        for index, record in enumerate(records):
            try:
                self._check_size(record)
                futures[index] = producer.send(record.topic, value=record.value, key=record.key, headers=record.headers)
            except Exception as exc:  # checked before sending: too large, not serializable, no metadata
                kind = classify(exc)
                delivery.failures.append(Failure(index, exc, kind))
                if kind != PERMANENT:  # e.g. no metadata in max_block_ms: the rest would wait as long each
                    delivery.failures += [Failure(i, exc, kind) for i in range(index + 1, len(records))]
                    break
        sent_failures = self._wait_for_acks(producer, futures, timeout_s, deadline)
        delivery.failures += sent_failures
        delivery.failures.sort(key=lambda failure: failure.index)
        if sent_failures or any(f.kind != PERMANENT for f in delivery.failures):
            self._replace(delivery.failures[0].error)
        return delivery

    def _check_size(self, record: OutboundRecord) -> None:
        """kafka-python's own size check, done first: send() hashes the key for the partition before it checks,
        in pure Python, and a megabyte key takes it most of a second."""
        size = record_size(record.key, record.value, record.headers)
        if size > self.settings.max_request_size:
            raise kafka_errors.MessageSizeTooLargeError(
                f"the record is {size} bytes, more than max_request_size {self.settings.max_request_size}"
            )

    @staticmethod
    def _wait_for_acks(producer, futures: dict, timeout_s: float, deadline: float) -> list[Failure]:
        try:
            producer.flush(timeout=timeout_s)
        except Exception as exc:  # a flush timeout: the futures below say which records it concerns
            log.debug("flush: %s: %s", type(exc).__name__, exc)
        failures = []
        for index, future in futures.items():
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                failures.append(Failure(index, exc, classify(exc)))
        return failures

    def _replace(self, cause: BaseException) -> None:
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


def dlq_record(
    dlq_topic: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    code: str,
    reason: str,
    request_id: str | None,
    max_record_bytes: int,
) -> OutboundRecord:
    """A dead letter that always fits in max_record_bytes: why and where from in headers, the original key and
    value cut to what fits, the original value's size and sha256 in headers whenever it had one."""
    headers = [
        (HEADER_REASON, _cut_text(reason, MAX_REASON_BYTES)),
        (HEADER_REASON_CODE, code.encode()),
        (HEADER_ORIGINAL_TOPIC, topic.encode()),
        (HEADER_ORIGINAL_PARTITION, str(partition).encode()),
        (HEADER_ORIGINAL_OFFSET, str(offset).encode()),
    ]
    if request_id is not None:
        headers.append((HEADER_REQUEST_ID, request_id.encode()))
    if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
        headers.append((HEADER_ORIGINAL_KEY_SIZE, str(len(key)).encode()))
        key = key[:MAX_DLQ_KEY_BYTES]
    if value is None:
        headers.append((HEADER_TOMBSTONE, b"1"))
        return OutboundRecord(dlq_topic, key, b"", headers)  # an empty value: a null one would be a tombstone
    headers += [
        (HEADER_ORIGINAL_SIZE, str(len(value)).encode()),
        (HEADER_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]
    room = max_record_bytes - record_size(key, b"", headers + [(HEADER_TRUNCATED, b"1")]) - SIZE_MARGIN_BYTES
    if len(value) > room:
        headers.append((HEADER_TRUNCATED, b"1"))
        value = value[: max(0, room)]
    return OutboundRecord(dlq_topic, key, value, headers)


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """What the producer counts against max_request_size for one record (kafka-python's own estimate)."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def completion_record(topic: str, key: bytes | None, request_id: str, value: bytes, resent: bool) -> OutboundRecord:
    headers = [(HEADER_REQUEST_ID, request_id.encode())]
    if resent:
        headers.append((HEADER_RESENT, b"1"))
    return OutboundRecord(topic, key, value, headers)


def _cut_text(text: str, limit: int) -> bytes:
    """UTF-8 of text, at most limit bytes, never ending inside a character."""
    return text.encode("utf-8", errors="replace")[:limit].decode("utf-8", errors="ignore").encode("utf-8")
