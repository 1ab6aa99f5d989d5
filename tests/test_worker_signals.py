"""What the Worker says about signals (its handler called directly, as arq's tests do): SIGTERM is logged when it
arrives, and a second one abandons the work in hand saying so, not "grace period over"."""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from tests.daemon_fixtures import produce, prompt_records
from tests.worker_fixtures import RunningWorker, make_worker

pytestmark = pytest.mark.kafka


class GatedEngine:
    """The real engine, but its steps wait until the test releases them: the test decides when the requests in
    hand finish, so the second signal certainly arrives while they are in flight."""

    def __init__(self, inner):
        self.engine = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        self.entered.set()
        assert self.release.wait(60), "the test never released the decode"
        return self.engine.step()


def wait_for_message(caplog, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.02)


def test_sigterm_is_logged_and_a_second_one_abandons_the_work_in_hand(
    kafka_names, sqlite_url, tiny_models, engine, caplog
):
    gated = GatedEngine(engine)
    worker = make_worker(kafka_names, sqlite_url, tiny_models, gated, daemon={"shutdown_grace_s": 600.0})
    with caplog.at_level(logging.INFO, logger="daemon.serving.worker"):
        running = RunningWorker(worker)
        try:
            with running:
                produce(kafka_names.bootstrap, kafka_names.prompts, prompt_records(["g0", "g1"]))
                assert gated.entered.wait(60), "nothing reached the engine"
                worker.handle_signal(signal.SIGTERM)
                wait_for_message(caplog, "SIGTERM received: taking no more records")
                worker.handle_signal(signal.SIGTERM)
                wait_for_message(caplog, "second SIGTERM: abandoning")
        finally:
            gated.release.set()
    messages = [record.getMessage() for record in caplog.records]
    assert not any("grace period over" in message for message in messages), messages
    assert any(m.startswith("onlinespec stopped (SIGTERM, abandoned") for m in messages), messages
    assert running.exit_code == 0
