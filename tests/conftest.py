"""Shared pytest plugins: the Tansu broker (tests/kafka_fixtures.py) and the daemon's models and databases."""

from pathlib import Path

pytest_plugins = [
    "tests.kafka_fixtures",
    "tests.daemon_fixtures",
    "tests.rounds_fixtures",
    "tests.engine_fixtures",
    "tests.worker_fixtures",
    "tests.fault_fixtures",
    "tests.head_fixtures",
]
if (Path(__file__).parent / "storage_fixtures.py").exists():
    pytest_plugins.append("tests.storage_fixtures")
