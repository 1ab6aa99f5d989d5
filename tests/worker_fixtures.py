"""The Worker in process for tests: the real engine on tiny models (one per test module), a worker on the real
broker and a real database, a thread that runs it, and readers of its metrics and of the rows it wrote.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
import torch

from daemon.config import Settings
from daemon.serving.ledger import BatchStore
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.worker import Worker
from devtools.fleet import completion_rows, rows  # noqa: F401  (completion_rows: imported from here)
from tests.daemon_fixtures import daemon_settings


@pytest.fixture(scope="module")
def engine(tiny_models):
    # One intra-op thread while the worker runs in this process: the broker, the poll thread and other
    # processes share two cores, and spinning OpenMP threads then slow tiny decodes down many times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import load_model, load_tokenizer

    target_dir, draft_dir = tiny_models
    tokenizer = load_tokenizer(str(target_dir))
    yield SpeculativeEngine(
        load_model(str(target_dir)),
        load_model(str(draft_dir)),
        tokenizer,
        EngineSettings(proposer="draft", k=3, max_batch_size=4, max_seq_len=256, top_m=4),
    )
    torch.set_num_threads(threads)


class CountingEngine:
    """The real engine, counting the requests submitted for decoding and optionally slowed down to imitate long
    decodes (every engine step that finishes requests takes delay_s longer)."""

    def __init__(self, engine, delay_s: float = 0.0):
        self.engine = engine
        self.delay_s = delay_s
        self.decoded_ids: list[str] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, request, tag=None):
        self.decoded_ids.append(request.id)
        return self.engine.submit(request, tag)

    def step(self):
        finished = self.engine.step()
        if finished and self.delay_s:
            time.sleep(self.delay_s)
        return finished

    def generate(self, requests):
        self.decoded_ids += [r.id for r in requests]
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.engine.generate(requests)


class RunningWorker:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.exit_code = None
        self.thread = threading.Thread(target=self._run, name="test-worker-main")

    def _run(self):
        self.exit_code = self.worker.run()

    def __enter__(self):
        self.thread.start()
        assert self.worker.assigned.wait(30), "no partition assignment"
        return self.worker

    def __exit__(self, *exc):
        self.worker.stop("test over")
        self.thread.join(60)
        assert not self.thread.is_alive()


def make_worker(
    kafka_names, database_url, tiny_models, engine, metrics=None, producer_factory=None, engine_section=None, **sections
) -> Worker:
    from daemon.service import open_database
    from daemon.serving.kafka_io import make_producer

    target_dir, draft_dir = tiny_models
    if engine_section:
        sections["engine"] = engine_section
    settings = Settings.model_validate(daemon_settings(kafka_names, database_url, target_dir, draft_dir, **sections))
    _, session_factory = open_database(settings)
    store = BatchStore(
        session_factory, target_identity="tiny", keep_dead_letter_values=settings.limits.keep_dead_letter_values
    )
    return Worker(
        settings,
        engine,
        engine.tokenizer,
        store,
        metrics=metrics or DaemonMetrics(),
        producer_factory=producer_factory or make_producer,
    )


def request_statuses(database_url: str) -> dict[str, tuple[str, str | None]]:
    return {
        request_id: (status, error)
        for request_id, status, error in rows(database_url, "SELECT request_id, status, error FROM requests")
    }


def dead_letter_rows(database_url: str) -> set[tuple[int, str | None, str]]:
    """(offset, request id, reason code) of every dead_letters row."""
    return set(rows(database_url, "SELECT kafka_offset, request_id, reason_code FROM dead_letters"))


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric_value(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in the metrics")


def wait_for_metric(port: int, name: str, expected: float, timeout: float = 20.0, **labels) -> str:
    """Scrape until the sample reads `expected` (gauges such as lag are published every second); the text."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        try:
            if metric_value(text, name, **labels) == expected:
                return text
        except AssertionError:
            pass  # not published yet
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} never read {expected} in {timeout} s:\n{text}")
        time.sleep(0.1)
