"""ClientLink: the connecting side of a framed socket, with one reconnect loop.

Used by the Monitor for its Central and Engine links. A connect attempt
(TCP connect + ENQ/ACK) runs in a short-lived thread so the mailbox never
blocks; a failure is told back and the next attempt is scheduled after a
tenacity backoff, with a sentence for the person watching ("Cannot reach
CENTRAL at 10.0.0.2:6001 (connection refused) — retrying in 2 s"). There is
exactly one attempt in flight at a time, so reconnects cannot race (a defect
of the seed design).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from actors.runtime import Directory, Scheduled, Supervision, backoff_strategy, schedule, tell
from transport.link import FramedLink, LinkOptions, _close_socket, handshake_as_client

log = logging.getLogger("evcharging.link")


@dataclass(frozen=True, slots=True)
class _Connect:
    attempt: int


@dataclass(frozen=True, slots=True)
class _Connected:
    attempt: int
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class _ConnectFailed:
    attempt: int
    reason: str


STABLE_LINK = 0.5
"""Seconds a connection must have lasted for its loss to be retried at once (no backoff)."""


class ClientLink(FramedLink):
    """Connects to ``host:port`` and keeps reconnecting until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        owner: str,
        directory: Directory,
        *,
        peer_name: str = "peer",
        connect_timeout: float = 2.0,
        retry_base: float = 0.5,
        retry_max: float = 2.0,
        options: LinkOptions = LinkOptions(),
        component: str = "client-link",
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(owner, directory, options=options, component=component, supervision=supervision)
        self.host = host
        self.port = port
        self.peer_name = peer_name
        self.connect_timeout = connect_timeout
        self._delay = backoff_strategy(retry_base, retry_max)
        self._attempt = 0
        self._failures = 0
        self._connected_at: float | None = None
        self._stopping = False
        self._timer: Scheduled | None = None

    @property
    def target(self) -> str:
        return f"{self.peer_name} at {self.host}:{self.port}"

    def setup(self) -> None:
        self.actor_ref.tell(_Connect(self._attempt + 1))

    def teardown(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        super().teardown()

    def on_link_lost(self, reason: str) -> None:
        if self._stopping:
            return
        log.warning("%s: lost %s (%s) — reconnecting", self.component, self.target, reason)
        held = time.monotonic() - self._connected_at if self._connected_at is not None else 0.0
        self._connected_at = None
        if held >= STABLE_LINK:
            # A link that had been up is tried again at once: a peer whose actor was
            # restarted (or that dropped one connection) is usually back already. A peer
            # that keeps closing fresh connections gets the backoff instead.
            self._timer = schedule(0.0, self.actor_ref, _Connect(self._attempt + 1))
        else:
            self._failures += 1
            self._schedule_retry()

    def on_other(self, message: Any) -> Any:
        log.debug("%s: %s (attempt %d, %d failures)", self.component, type(message).__name__, self._attempt,
                  self._failures)
        match message:
            case _Connect(attempt) if attempt == self._attempt + 1 and not self.connected:
                self._attempt = attempt
                threading.Thread(target=self._connect, args=(attempt,), daemon=True,
                                 name=f"{self.component}-connect").start()
            case _Connected(attempt, sock):
                if attempt != self._attempt or self._stopping or self.connected:
                    _close_socket(sock)
                    return None
                if self._failures:
                    log.info("%s: connected to %s", self.component, self.target)
                self._failures = 0
                self._connected_at = time.monotonic()
                self.attach(sock, self.target)
            case _ConnectFailed(attempt, reason) if attempt == self._attempt:
                self._failures += 1
                self._schedule_retry(reason)
        return None

    def _schedule_retry(self, reason: str | None = None) -> None:
        delay = self._delay(max(1, self._failures))
        if reason is not None and (self._failures <= 3 or self._failures % 10 == 0):
            log.warning("%s: Cannot reach %s (%s) — retrying in %.1f s", self.component, self.target, reason, delay)
        self._timer = schedule(delay, self.actor_ref, _Connect(self._attempt + 1))

    def _connect(self, attempt: int) -> None:
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake_as_client(sock, self.connect_timeout)
        except OSError as exc:
            if sock is not None:
                _close_socket(sock)
            tell(self.actor_ref, _ConnectFailed(attempt, _plain(exc)))
            return
        if not tell(self.actor_ref, _Connected(attempt, sock)):
            _close_socket(sock)


def _plain(exc: OSError) -> str:
    """An OSError as a few plain words (no errno soup)."""
    if isinstance(exc, ConnectionRefusedError) and "NACK" not in str(exc):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "no answer"
    return exc.strerror.lower() if exc.strerror else str(exc)
