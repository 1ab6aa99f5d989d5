"""sd_notify over a real datagram socket, as systemd reads it."""

from __future__ import annotations

import os
import socket

from daemon.serving.systemd import SystemdNotifier


def receive_all(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notifications_reach_the_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = SystemdNotifier(
            {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert notifier.enabled and notifier.watchdog_interval_s == 2.0
        assert notifier.ready("consuming prompts")
        assert notifier.watchdog()
        assert not notifier.watchdog()  # not due again for another 2 s
        assert notifier.status("served 3")
        assert notifier.stopping("draining")
        assert receive_all(server) == [
            "READY=1\nSTATUS=consuming prompts",
            "WATCHDOG=1",
            "STATUS=served 3",
            "STOPPING=1\nSTATUS=draining",
        ]


def test_abstract_socket_address():
    name = f"onlinespec-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert receive_all(server) == ["READY=1\nSTATUS=ok"]


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert not notifier.ready("x")


def test_watchdog_for_another_pid_is_ignored():
    assert SystemdNotifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_a_vanished_socket_is_logged_not_raised(tmp_path):
    assert not SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("x")


def test_a_reader_that_stopped_reading_does_not_hang_the_daemon(tmp_path, monkeypatch):
    import time

    import daemon.serving.systemd

    monkeypatch.setattr(daemon.serving.systemd, "SEND_TIMEOUT_S", 0.05)
    path = str(tmp_path / "stuck.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)  # never read: the datagram queue fills up
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
        started = time.monotonic()
        results = [notifier.status(f"n{i}") for i in range(60)]
        assert time.monotonic() - started < 10
        assert results[0] and not results[-1]
