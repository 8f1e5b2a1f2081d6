"""Protocol-level stand-ins used by tests: a Monitor over a real socket and a
driver/engine over the real broker. They speak the wire contract only, as
an outside client would (no actor internals)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tests.frame_client import FrameClient
from transport import protocol, security
from transport.broker import TOPICS, KafkaSettings


class FakeMonitor:
    """A Monitor reduced to its wire behaviour, driven step by step by a test."""

    def __init__(self, port: int, cp_id: str, host: str = "127.0.0.1") -> None:
        self.cp_id = cp_id
        self.client = FrameClient.connect(host, port, name="CENTRAL")
        self.inbox: list[Any] = []

    def send(self, msg: Any) -> None:
        self.client.send(protocol.encode(msg))

    def register(self, location: str | None = "Test street") -> protocol.RegisterResponse:
        corr = uuid.uuid4().hex
        self.send(protocol.RegisterRequest(cp_id=self.cp_id, correlation_id=corr, location=location))
        return self.expect(protocol.RegisterResponse, lambda m: m.correlation_id == corr)

    def heartbeat(self, engine_ok: bool = True) -> None:
        self.send(protocol.Heartbeat(cp_id=self.cp_id, engine_ok=engine_ok))

    def expect(self, kind: type, where=lambda m: True, timeout: float = 10.0) -> Any:
        """The next message of ``kind`` matching ``where`` (others are kept)."""
        for i, m in enumerate(self.inbox):
            if isinstance(m, kind) and where(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.decode(self.client.recv(timeout=max(0.05, deadline - time.monotonic())))
            except TimeoutError:
                break
            if isinstance(m, kind) and where(m):
                return m
            self.inbox.append(m)
        raise AssertionError(f"{self.cp_id}: no {kind.__name__} within {timeout} s (got {self.inbox})")

    def decode(self, data: bytes) -> Any:
        """A received frame as a message (a subclass that seals opens it here)."""
        return protocol.decode(data)

    def close(self) -> None:
        self.client.close()


class KafkaPeer:
    """Produces to and reads from the project's topics like an outside client."""

    def __init__(self, settings: KafkaSettings, sign_as: Callable[[str], bytes | None] | None = None) -> None:
        """``sign_as(driver_id)``: that driver's verifier (or None), to sign what is sent on
        ``driver_requests`` as a genuine driver app does; None sends requests unsigned."""
        self.settings = settings
        self.sign_as = sign_as
        self.producer = KafkaProducer(bootstrap_servers=settings.bootstrap, enable_idempotence=False,
                                      linger_ms=0, max_block_ms=5000)
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=10)
        topic = settings.topic("driver_responses")
        tps = [TopicPartition(topic, p) for p in range(TOPICS["driver_responses"])]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)
        self.received: list[Any] = []

    @classmethod
    def of(cls, net: Any) -> KafkaPeer:
        """A peer of a launcher Network; with its security on, it signs as the driver it speaks for
        (registered on first use, like the launcher's own drivers)."""
        return cls(KafkaSettings(net.bootstrap, net.spec.topic_prefix),
                   sign_as=net.driver_verifier if net.secure else None)

    def send(self, topic: str, key: str, msg: Any) -> None:
        if topic == "driver_requests" and self.sign_as is not None and not isinstance(msg, protocol.Signed):
            verifier = self.sign_as(key)
            if verifier is not None:
                msg = security.sign(verifier, key, msg)
        self.producer.send(self.settings.topic(topic), key=key.encode(), value=protocol.encode(msg))
        self.producer.flush(5)

    def poll(self) -> list[Any]:
        for records in self.consumer.poll(timeout_ms=50).values():
            for r in records:
                self.received.append(protocol.decode(r.value))
        return self.received

    def wait_for(self, kind: type, where=lambda m: True, timeout: float = 15.0, count: int = 1) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.poll() if isinstance(m, kind) and where(m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} {kind.__name__} within {timeout} s; got {self.received[-10:]}")

    def close(self) -> None:
        self.producer.close(1)
        self.consumer.close()
