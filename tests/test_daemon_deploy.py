"""The systemd units: notify type, restart policy, watchdog, and a template with one instance per GPU."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / name)
    return parser


@pytest.mark.parametrize("name", ["onlinespec.service", "onlinespec@.service"])
def test_units_are_notify_services_that_restart_on_failure_with_a_watchdog(name):
    service = unit(name)["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    assert "onlinespec serve --config" in service["ExecStart"]
    # systemd must wait longer than the daemon's own drain before it sends SIGKILL.
    assert int(service["TimeoutStopSec"]) > Settings().daemon.shutdown_grace_s


def test_template_runs_one_process_per_gpu():
    service = unit("onlinespec@.service")["Service"]
    text = (DEPLOY / "onlinespec@.service").read_text()
    assert "CUDA_VISIBLE_DEVICES=%i" in text
    assert "--metrics-port ${METRICS_PORT}" in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in ("onlinespec.service", "onlinespec@.service"):
        text = (DEPLOY / name).read_text().replace("/opt/onlinespec/.venv/bin/onlinespec", "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "./onlinespec.service", "./onlinespec@0.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in result.stderr.splitlines() if "onlinespec" in line]
    assert result.returncode == 0 and not problems, result.stderr
