"""Blocking client for the framed socket protocol (PROTOCOL.md "Socket framing").

Meant for tests, benchmarks, tools and outside clients that want to talk to
a Central or an Engine without running an actor system. The actor
transports do not use it.

Not thread-safe: use one client per thread. Reads happen only inside the
calling thread's ``send``/``recv``, so frames the peer sends are ACKed
(and queued for :meth:`FrameClient.recv`) whenever the caller is waiting
for something: an ACK in ``send`` or a frame in ``recv``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import deque
from types import TracebackType
from typing import Any

from transport.framing import (
    ACK,
    ENQ,
    EOT,
    MAX_DATA,
    NACK,
    BadFrame,
    Control,
    Frame,
    FrameDecoder,
    Garbage,
    encode_frame,
)

__all__ = [
    "FrameClient",
    "FrameClientError",
    "HandshakeRefused",
    "FrameRejected",
    "PeerClosed",
]

log = logging.getLogger(__name__)

_ACK_B = bytes((ACK,))
_NACK_B = bytes((NACK,))
_ENQ_B = bytes((ENQ,))
_EOT_B = bytes((EOT,))
_RECV_SIZE = 65536 + 4096
_WRITE_TIMEOUT = 10.0  # a peer that stops reading must not hang a tool forever


class FrameClientError(Exception):
    """Base class for protocol-level failures of a FrameClient."""


class HandshakeRefused(FrameClientError, ConnectionError):
    """The listener answered ENQ with NACK (e.g. full) or closed the connection."""


class FrameRejected(FrameClientError):
    """The peer NACKed a frame on every attempt (1 + retries transmissions)."""


class PeerClosed(FrameClientError, ConnectionError):
    """The peer closed the connection (EOF or EOT) while we were waiting on it."""


class FrameClient:
    """One framed TCP session: ENQ/ACK handshake, ACKed frames, EOT on close.

    Create it with :meth:`connect`. Received frames are checked as protocol
    DATA (UTF-8 JSON object) before being ACKed, so bad JSON is NACKed as
    PROTOCOL.md asks; pass ``validate_json=False`` to accept any bytes.
    Not thread-safe (one thread per client).
    """

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        *,
        name: str = "peer",
        max_data: int = MAX_DATA,
        validate_json: bool = True,
    ) -> None:
        """Wrap an already connected socket; no handshake is done here (see connect)."""
        self._sock = sock
        self._where = f"{name} at {address}"
        self._max_data = max_data
        self._validate_json = validate_json
        self._decoder = FrameDecoder(max_data)
        self._inbox: deque[tuple[bytes, Any]] = deque()
        self._answers: deque[int] = deque()  # ACK/NACK codes from the peer
        self._peer_closed = False
        self._closed = False
        self.garbage_bytes = 0
        """Stray bytes the peer sent between frames (for logging/diagnostics)."""
        self.bad_frames = 0
        """Frames from the peer that we NACKed."""
        self.transmissions = 0
        """Frames written by send(), counting retransmissions."""

    # ------------------------------------------------------------------ setup
    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        timeout: float = 5.0,
        *,
        name: str = "peer",
        max_data: int = MAX_DATA,
        validate_json: bool = True,
    ) -> FrameClient:
        """Open TCP to host:port, send ENQ and wait for ACK within ``timeout`` seconds.

        ``name`` (e.g. "CENTRAL") only makes error sentences readable.
        Raises HandshakeRefused on NACK/EOT/close, TimeoutError when no answer
        comes in time, ConnectionError when the TCP connect fails.
        """
        address = f"{host}:{port}"
        where = f"{name} at {address}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{where} did not accept the TCP connection within {timeout:g} s") from exc
        except OSError as exc:
            raise ConnectionError(f"could not connect to {where}: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(sock, address, name=name, max_data=max_data, validate_json=validate_json)
        try:
            client._handshake(timeout)
        except BaseException:
            client._sock.close()
            client._closed = True
            raise
        return client

    def _handshake(self, timeout: float) -> None:
        try:
            self._handshake_steps(timeout)
        except PeerClosed as exc:
            raise HandshakeRefused(f"{self._where} refused the session (connection closed)") from exc

    def _handshake_steps(self, timeout: float) -> None:
        self._sendall(_ENQ_B)
        deadline = time.monotonic() + timeout
        while True:
            if self._answers:
                code = self._answers.popleft()
                if code == ACK:
                    return
                raise HandshakeRefused(f"{self._where} refused the session (NACK)")
            if self._peer_closed:
                raise HandshakeRefused(f"{self._where} refused the session (connection closed)")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pump(remaining):
                raise TimeoutError(f"{self._where} did not answer ENQ within {timeout:g} s")

    # ---------------------------------------------------------------- sending
    def send(self, data: bytes, retries: int = 3, ack_timeout: float = 2.0) -> None:
        """Send one frame and wait for its ACK; on NACK resend up to ``retries`` times.

        Raises FrameTooLarge/ValueError before sending anything if DATA is not
        framable, FrameRejected after 1 + retries NACKs, TimeoutError when no
        answer comes within ``ack_timeout`` seconds of a transmission, and
        PeerClosed if the peer hangs up meanwhile.
        """
        frame = encode_frame(data, self._max_data)
        self._check_open()
        # One frame in flight at a time: an answer left over from an earlier
        # timed-out send would otherwise be taken for this frame's answer.
        self._answers.clear()
        attempts = 1 + max(0, retries)
        for attempt in range(1, attempts + 1):
            self._sendall(frame)
            self.transmissions += 1
            if self._wait_answer(ack_timeout) == ACK:
                return
            log.debug("%s NACKed frame (attempt %d of %d)", self._where, attempt, attempts)
        raise FrameRejected(
            f"{self._where} rejected a {len(data)}-byte frame {attempts} times (NACK); giving up"
        )

    def send_json(self, obj: dict[str, Any], retries: int = 3, ack_timeout: float = 2.0) -> None:
        """Serialise compactly (control characters escaped, so framable) and send."""
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        self.send(data, retries=retries, ack_timeout=ack_timeout)

    def send_raw(self, raw: bytes) -> None:
        """Write bytes as they are, no framing: for fault-injection tests."""
        self._check_open()
        self._sendall(raw)

    def _wait_answer(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            if self._answers:
                return self._answers.popleft()
            if self._peer_closed:
                raise PeerClosed(f"{self._where} closed the connection while we waited for an ACK")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pump(remaining):
                raise TimeoutError(f"{self._where} did not ACK the frame within {timeout:g} s")

    # -------------------------------------------------------------- receiving
    def recv(self, timeout: float | None = 5.0) -> bytes:
        """Return the DATA of the next intact frame (already ACKed).

        ``timeout`` None waits forever. Raises TimeoutError, or PeerClosed
        once the peer has hung up and every queued frame has been returned.
        """
        return self._next_frame(timeout)[0]

    def recv_json(self, timeout: float | None = 5.0) -> dict[str, Any]:
        """Like recv, parsed: the next frame's JSON object."""
        data, parsed = self._next_frame(timeout)
        if parsed is None:
            parsed = json.loads(data.decode("utf-8"))
        if not isinstance(parsed, dict):
            raise ValueError(f"{self._where} sent JSON that is not an object: {type(parsed).__name__}")
        return parsed

    def _next_frame(self, timeout: float | None) -> tuple[bytes, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._peer_closed:
                raise PeerClosed(f"{self._where} closed the connection")
            self._check_open()
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not self._pump(remaining):
                raise TimeoutError(f"{self._where} sent no frame within {timeout:g} s")

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Send EOT (politely ending the session) and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._peer_closed:
                self._sock.settimeout(1.0)
                self._sock.sendall(_EOT_B)
        except OSError:
            pass  # the peer is already gone; nothing more to say to it
        finally:
            self._sock.close()

    def __enter__(self) -> FrameClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent EOT or closed its end."""
        return self._peer_closed

    # -------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise FrameClientError(f"session with {self._where} is already closed")

    def _sendall(self, raw: bytes) -> None:
        try:
            self._sock.settimeout(_WRITE_TIMEOUT)
            self._sock.sendall(raw)
        except TimeoutError as exc:
            raise TimeoutError(
                f"{self._where} stopped reading: write blocked for {_WRITE_TIMEOUT:g} s"
            ) from exc
        except OSError as exc:
            self._peer_closed = True
            raise PeerClosed(f"{self._where} is unreachable: write failed ({exc.strerror or exc})") from exc

    def _pump(self, timeout: float | None) -> bool:
        """Read once (up to ``timeout`` s) and handle what arrived; False on timeout."""
        try:
            self._sock.settimeout(timeout)
            chunk = self._sock.recv(_RECV_SIZE)
        except TimeoutError:
            return False
        except OSError as exc:
            log.debug("%s read failed: %s", self._where, exc)
            self._peer_closed = True
            return True
        if not chunk:
            self._peer_closed = True
            return True
        replies = bytearray()
        for event in self._decoder.feed(chunk):
            if isinstance(event, Frame):
                parsed, problem = self._check_data(event.data)
                if problem is None:
                    replies += _ACK_B
                    self._inbox.append((event.data, parsed))
                else:
                    replies += _NACK_B
                    self.bad_frames += 1
                    log.warning("%s sent a frame with %s; NACKed", self._where, problem)
            elif isinstance(event, BadFrame):
                replies += _NACK_B
                self.bad_frames += 1
                log.warning("%s sent a bad frame (%s); NACKed", self._where, event.reason)
            elif isinstance(event, Control):
                if event.code in (ACK, NACK):
                    self._answers.append(event.code)
                elif event.code == EOT:
                    self._peer_closed = True
                # ENQ from the listener side is meaningless here: ignore it.
            elif isinstance(event, Garbage):
                self.garbage_bytes += event.count
                log.debug("%s sent %d garbage bytes", self._where, event.count)
        if replies:
            self._sendall(bytes(replies))
        return True

    def _check_data(self, data: bytes) -> tuple[Any, str | None]:
        """Parse DATA when validating; return (parsed or None, problem or None)."""
        if not self._validate_json:
            return None, None
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return None, f"bad JSON ({exc})"
        except RecursionError:
            return None, "bad JSON (nested too deeply)"
        if not isinstance(parsed, dict):
            return None, "JSON that is not an object"
        return parsed, None
