"""The fault-injection suite's figures: each scenario records what it measured, the session prints them at the end
and writes them to var/fault-figures.json (or $ONLINESPEC_FAULT_FIGURES), for BENCHMARKS.md.

Also the helpers the scenarios share: the daemon supervised as systemd runs it (a non-zero exit is followed by a
new start), reading a topic until a condition holds while keeping the daemon running, and the delivery figures
(completion rows, copies on the topic against the stored message) that every scenario asserts on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devtools.fleet import delivery_figures  # noqa: F401  (the scenarios import it from here)
from tests.daemon_fixtures import REPO, DaemonProcess, TopicReader, header

FIGURES_PATH = Path(os.environ.get("ONLINESPEC_FAULT_FIGURES", REPO / "var" / "fault-figures.json"))


class FaultFigures:
    def __init__(self) -> None:
        self.scenarios: dict[str, dict] = {}
        self.started = time.monotonic()

    def record(self, scenario: str, **figures) -> None:
        self.scenarios[scenario] = figures


_FIGURES = FaultFigures()


@pytest.fixture(scope="session")
def fault_figures() -> FaultFigures:
    return _FIGURES


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _FIGURES.scenarios:
        return
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}",
        "suite_seconds": round(time.monotonic() - _FIGURES.started, 1),
        "scenarios": _FIGURES.scenarios,
    }
    FIGURES_PATH.write_text(json.dumps(document, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES.scenarios:
        return
    terminalreporter.section("fault-injection figures")
    for scenario, figures in _FIGURES.scenarios.items():
        terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    terminalreporter.write_line(f"written to {FIGURES_PATH}")


class Supervised:
    """A daemon as systemd runs it (Restart=on-failure): whenever it has exited non-zero, start it again."""

    def __init__(self, daemon: DaemonProcess):
        self.daemon = daemon
        self.restarts = 0
        self.exit_codes: list[int] = []

    def keep_running(self) -> None:
        code = self.daemon.process.poll()
        if code not in (None, 0):
            self.exit_codes.append(code)
            self.restarts += 1
            self.daemon.start()

    def read_until(self, reader: TopicReader, predicate, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while not predicate(reader.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out with {len(reader.records)} records; log:\n{self.log()[-3000:]}")
            self.keep_running()
            reader.read_for(0.3)
        return reader.records

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")


def answered(records) -> set[str]:
    return {header(record, "request-id") for record in records}


def stall_lines(log: str) -> int:
    return len(re.findall(r"partition \S+ stalled: committed offset", log))


def assert_exactly_once(figures: dict) -> None:
    assert figures["completion_rows"] == figures["ids"], figures
    assert figures["duplicates_in_db"] == figures["lost"] == 0, figures
    assert figures["copies_not_as_stored"] == figures["unexpected_ids_on_topic"] == 0, figures
