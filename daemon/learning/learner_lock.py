"""Exactly one process per deployment runs a learning round at a time.

PostgreSQL (many daemons, many hosts): a session-level advisory lock, `pg_try_advisory_lock(key)`, taken on a
dedicated autocommit connection and held while the round runs. The key is derived from the deployment name,
so deployments sharing one database learn independently. If that connection dies, PostgreSQL releases the lock
with it; a round then finishing in the old process still records its outcome, and promotion stays safe
because moving the active pointer is itself serialized and checked (see rounds.py).

SQLite (one host, one daemon): a lock inside this process. SQLite deployments are single-host by design: run
learning in one daemon only (`learning.enabled` on exactly one of them).

    lock = LearnerLock(engine, "default")
    with lock.hold() as held:
        if held:
            run_round()
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


def advisory_key(deployment: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock(bigint)."""
    digest = hashlib.sha256(f"onlinespec-learner:{deployment}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LearnerLock:
    def __init__(self, engine: Engine, deployment: str):
        self.engine = engine
        self.deployment = deployment
        self.key = advisory_key(deployment)
        self.shared = engine.dialect.name == "postgresql"
        if not self.shared:
            with _LOCAL_LOCKS_GUARD:
                self._local = _LOCAL_LOCKS.setdefault(f"{engine.url}#{deployment}", threading.Lock())

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Try once, never wait: yields True while this process holds the lock, False if another one does."""
        if not self.shared:
            acquired = self._local.acquire(blocking=False)
            try:
                yield acquired
            finally:
                if acquired:
                    self._local.release()
            return
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            acquired = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
            try:
                yield acquired
            finally:
                if acquired:
                    self._unlock(connection)
        finally:
            connection.close()

    def _unlock(self, connection) -> None:
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        except Exception as exc:  # the connection died: PostgreSQL released the lock with the session
            log.warning("releasing the learner lock of deployment %r: %s", self.deployment, exc)
            connection.invalidate()
