"""Listener: accepts framed-socket peers and starts one connection actor each.

The accept loop runs in its own thread; each new socket gets a short-lived
handshake thread (so a peer that connects and says nothing cannot block the
others) that waits for ENQ and answers ACK, or NACK when ``max_connections``
are already open. Accepted sockets become :class:`ServerConnection` actors,
started as *temporary* children of a supervisor.
The listener cannot import the supervisor (layers only import downward), so
whoever wires the system passes ``spawn``: a function that starts a
temporary child and returns its ref. A failure to bind (port in use) crashes ``setup``: the supervisor retries
with backoff and logs why.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.runtime import Directory, SupervisedActor, Supervision
from transport.connection import ServerConnection
from transport.link import LinkOptions, _close_socket, handshake_as_server

log = logging.getLogger("evcharging.listener")

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ListenerPort:
    """Ask: the port the listener is bound to (useful after binding port 0)."""


@dataclass(frozen=True, slots=True)
class ListenerConnections:
    """Ask: how many connection actors it started are still alive."""

#: spawn(name, actor_class, args, kwargs) -> ref of a started temporary child
Spawn = Callable[[str, type, tuple[Any, ...], dict[str, Any]], "pykka.ActorRef[Any] | None"]


class Listener(SupervisedActor):
    """Listens on host:port; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        owner: str,
        directory: Directory,
        spawn: Spawn,
        *,
        max_connections: int = 2000,
        handshake_timeout: float = 5.0,
        options: LinkOptions = LinkOptions(),
        component: str = "listener",
        gate: str | None = None,
        auth_deadline: float | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        """``gate`` and ``auth_deadline`` are given to every connection (see
        :class:`~transport.connection.ServerConnection`)."""
        super().__init__(supervision=supervision)
        self.gate = gate
        self.auth_deadline = auth_deadline
        self.host = host
        self.port = port
        self.owner = owner
        self.directory = directory
        self.spawn = spawn
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.options = options
        self.component = component
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._live: set[pykka.ActorRef[Any]] = set()
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def setup(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((self.host, self.port))
        except OSError as exc:
            server.close()
            raise OSError(f"Cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        server.listen(512)
        server.settimeout(0.5)
        self.port = server.getsockname()[1]
        self._server = server
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.component}-accept", daemon=True)
        self._thread.start()
        log.info("%s: listening on %s:%d", self.component, self.host, self.port)

    def teardown(self) -> None:
        self._halt.set()
        if self._server is not None:
            self._server.close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def on_receive(self, message: Any) -> Any:
        match message:
            case ListenerPort():
                return self.port
            case ListenerConnections():
                return self._count()
        return None

    def _count(self) -> int:
        with self._lock:
            self._live = {r for r in self._live if r.is_alive()}
            return len(self._live)

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._halt.is_set():
            try:
                sock, addr = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._halt.is_set():
                    return
                continue
            threading.Thread(target=self._handshake, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted = handshake_as_server(sock, self.handshake_timeout, lambda: self._count() < self.max_connections)
        except OSError:
            accepted = False
        if not accepted:
            _close_socket(sock)
            return
        if self._halt.is_set():
            _close_socket(sock)
            return
        name = f"{self.component}-conn-{next(_ids)}"
        kwargs = {"options": self.options, "component": f"{self.component}[{peer}]", "gate": self.gate,
                  "auth_deadline": self.auth_deadline}
        try:
            ref = self.spawn(name, ServerConnection, (sock, peer, self.owner, self.directory), kwargs)
        except Exception as exc:  # the supervisor is gone or refused
            log.warning("%s: could not start a connection actor for %s: %s", self.component, peer, exc)
            ref = None
        if ref is None:
            _close_socket(sock)
            return
        with self._lock:
            self._live.add(ref)
