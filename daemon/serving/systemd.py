"""systemd notify protocol (sd_notify) over the datagram socket in $NOTIFY_SOCKET; a no-op without it."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0


class SystemdNotifier:
    """Sends READY=1, STOPPING=1, WATCHDOG=1 and STATUS=... when run under systemd (Type=notify)."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec = environ.get("WATCHDOG_USEC")
        watchdog_pid = environ.get("WATCHDOG_PID")
        mine = watchdog_pid is None or watchdog_pid == str(os.getpid())
        # systemd wants a ping at least every WatchdogSec; pinging at half of it leaves room for a slow batch.
        self.watchdog_interval_s = int(watchdog_usec) / 2e6 if watchdog_usec and mine else None
        self._next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        if not self.address:
            return False
        address = self.address
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A reader that stops reading must not hang the daemon: datagram queues are short (qlen 10).
                sock.settimeout(SEND_TIMEOUT_S)
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """Ping the watchdog, at most once per interval (half of WatchdogSec); False when not due or not enabled."""
        if self.watchdog_interval_s is None:
            return False
        now = time.monotonic()
        if now < self._next_watchdog:
            return False
        self._next_watchdog = now + self.watchdog_interval_s
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")
