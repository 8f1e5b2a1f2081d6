"""Fault toolkit for the failure-injection scenarios (issue 4).

Everything here acts on the *outside* of the programs, as a broken network,
a hostile client or a flaky broker would: nothing imports an actor.

* :class:`TcpProxy` — a threaded, loopback-only, bounded TCP forwarder put
  between a client and a server (a Monitor and Central, a Monitor and its
  Engine, every Kafka client and the broker). ``cut()`` tears the link down
  (``mode="reset"``: live connections closed, new ones reset at once) or
  partitions it (``mode="blackhole"``: nothing flows, new connections hang);
  ``restore()`` brings it back.
* Socket garbage (:func:`random_bytes`, :func:`bad_lrc_frames`,
  :func:`oversized_frame`, :func:`bad_json_frames`, :class:`HalfFrames`,
  :func:`churn`, one of each: :func:`garbage_round`) for any framed-socket
  listener (Central's Monitor port, an Engine's port). Each returns what the
  server answered, so a test can check it NACKed instead of crashing.
  :class:`Hammer` keeps sending all of it (and topic garbage) in the
  background while real traffic runs.
* Kafka records (:class:`TopicTool`): raw bytes, protocol messages, garbage
  for every topic (:data:`BAD_RECORDS` and unknown ids), reading a topic back,
  and whether a consumer group has handled everything; :class:`Echo` tails
  the Engine topics and re-injects copies (duplicates, new message ids,
  stale sequence numbers) of every record while the system runs.
* :func:`rss_mb` — resident memory of a process, from ``/proc/<pid>/status``.
* :func:`journal_entries` and :func:`billing_check` — the Engines' own
  record of every supply (their journals) compared with Central's tickets.

All of it is bounded (connection caps, byte caps, timeouts) so a failing
test cannot take the machine down with it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import random
import socket
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transport import framing, protocol, security

log = logging.getLogger("tests.faults")

__all__ = [
    "TcpProxy", "SocketReport", "random_bytes", "bad_lrc_frames", "oversized_frame", "bad_json_frames",
    "HalfFrames", "churn", "garbage_round", "Hammer", "TopicTool", "Echo", "BAD_RECORDS", "with_new_message_id",
    "rss_mb", "terminal_tracebacks", "journal_entries", "billing_check", "BillingCheck", "wait_for_supplying",
    "free_loopback_port",
]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the link die, not a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# =============================================================================== proxy
class TcpProxy:
    """Forwards ``listen_host:listen_port`` to ``target_host:target_port`` (both loopback).

    One accept thread plus two forwarding threads per connection, at most
    ``max_connections`` connections (more are reset at once), reads of at
    most 64 KiB. Use as a context manager or call :meth:`start`/:meth:`close`.

    ``cut(mode="reset")`` closes every live connection with a reset and resets
    new ones as soon as they are accepted, until :meth:`restore`.
    ``cut(mode="blackhole")`` forwards nothing (live connections hang, new ones
    are accepted and parked without reaching the target); :meth:`restore`
    resumes the live ones and closes the parked ones so their clients retry.

    ``slow_frames(seconds, direction)`` makes the link slow for framed traffic
    (``<STX>DATA<ETX><LRC>``, the Monitor↔Central and Monitor↔Engine links):
    every frame flowing ``"down"`` (server → client) or ``"up"`` is forwarded
    ``seconds`` after the proxy read it, in order; the one-byte control codes
    (ACK, NACK, ENQ, EOT) between frames are forwarded at once. A frame still
    held when its sender's side closes is delivered before the close (it was
    on the wire). ``slow_frames(0)`` ends the delay.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, max_connections: int = 512, connect_timeout: float = 2.0,
                 name: str = "proxy") -> None:
        if not (_is_loopback(target_host) and _is_loopback(listen_host)):
            raise ValueError("TcpProxy works on loopback addresses only")
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.listen_port = listen_port or free_loopback_port()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.name = name
        self._server: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._parked: list[socket.socket] = []
        self._mode: str | None = None  # None = forwarding; "reset" | "blackhole" while cut
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self.stats = {"accepted": 0, "refused": 0, "cuts": 0, "bytes_up": 0, "bytes_down": 0}
        self.cut_at: float | None = None
        self.restored_at: float | None = None
        self.last_cut_connections = 0  # live connections the last cut() broke or froze
        self.frame_delay = {"up": 0.0, "down": 0.0}  # see slow_frames()

    # --- lifecycle -----------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def start(self) -> TcpProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.listen_host, self.listen_port))
        server.listen(128)
        server.settimeout(0.2)
        self._server = server
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2)
        self._drop_all()
        self._release_parked()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- faults ----------------------------------------------------------------------
    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    def live_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self, mode: str = "reset") -> None:
        """Break the link (see the class docstring); idempotent."""
        if mode not in ("reset", "blackhole"):
            raise ValueError("mode must be 'reset' or 'blackhole'")
        self.stats["cuts"] += 1
        self.cut_at, self.restored_at = time.monotonic(), None
        self.last_cut_connections = self.live_connections()
        self._mode = mode
        if mode == "reset":
            self._drop_all()
        else:
            self._flowing.clear()
        log.info("%s: link cut (%s)", self.name, mode)

    def restore(self) -> None:
        """Forward again; parked connections are closed so their clients reconnect."""
        self._mode = None
        self._flowing.set()
        self._release_parked()
        self.restored_at = time.monotonic()
        log.info("%s: link restored", self.name)

    def outage(self, seconds: float, mode: str = "reset") -> None:
        """cut(), wait ``seconds`` (the only sleep of the toolkit), restore()."""
        self.cut(mode)
        try:
            time.sleep(seconds)
        finally:
            self.restore()

    def slow_frames(self, seconds: float, direction: str = "down") -> None:
        """Hold every frame flowing ``direction`` (``"up"``: client → server, ``"down"``,
        or ``"both"``) for ``seconds`` (see the class docstring); 0 ends it."""
        if direction not in ("up", "down", "both"):
            raise ValueError("direction must be 'up', 'down' or 'both'")
        for d in ("up", "down") if direction == "both" else (direction,):
            self.frame_delay[d] = max(0.0, seconds)
        log.info("%s: frames %s held %.1f s", self.name, direction, seconds)

    # --- internals ---------------------------------------------------------------------
    def _drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for a, b in pairs:
            _hard_close(a)
            _hard_close(b)

    def _release_parked(self) -> None:
        with self._lock:
            parked, self._parked = self._parked, []
        for s in parked:
            _hard_close(s)

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.stats["accepted"] += 1
            with self._lock:
                full = len(self._pairs) + len(self._parked) >= self.max_connections
            if self._mode == "reset" or full:
                self.stats["refused"] += 1
                _hard_close(client)
                continue
            if self._mode == "blackhole":
                with self._lock:
                    self._parked.append(client)
                continue
            threading.Thread(target=self._open, args=(client,), name=f"{self.name}-open", daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            _hard_close(client)
            return
        for s in (client, upstream):
            s.settimeout(None)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        pair = (client, upstream)
        with self._lock:
            if self._mode == "reset" or self._closed.is_set():
                _hard_close(client)
                _hard_close(upstream)
                return
            self._pairs.add(pair)
        slow = (_SlowFrames(upstream, self.stats, "bytes_up", "up", self.frame_delay),
                _SlowFrames(client, self.stats, "bytes_down", "down", self.frame_delay))
        threading.Thread(target=self._pump, args=(pair, client, slow[0], slow), daemon=True,
                         name=f"{self.name}-up").start()
        threading.Thread(target=self._pump, args=(pair, upstream, slow[1], slow), daemon=True,
                         name=f"{self.name}-down").start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, slow: _SlowFrames,
              both: tuple[_SlowFrames, _SlowFrames]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                # A blackhole holds the bytes (TCP back-pressure does the rest) until restore.
                while not self._flowing.wait(0.2):
                    if self._closed.is_set():
                        return
                with self._lock:
                    if pair not in self._pairs:
                        return
                slow.forward(data)
        except OSError:
            pass
        finally:
            for direction in both:  # frames held either way were on the wire: delivered before the close
                direction.drain(self._closed)
            with self._lock:
                owned = pair in self._pairs
                self._pairs.discard(pair)
            if owned:
                for s in pair:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()


class _SlowFrames:
    """One direction of a :class:`TcpProxy` connection: control bytes at once, frames
    after ``delays[direction]`` seconds (0: everything at once, in order)."""

    def __init__(self, dst: socket.socket, stats: dict[str, int], counter: str, direction: str,
                 delays: dict[str, float]) -> None:
        self.dst, self.stats, self.counter, self.direction, self.delays = dst, stats, counter, direction, delays
        self._send_lock = threading.Lock()
        self._held: list[tuple[float, bytes]] = []  # (due, frame), in order
        self._cond = threading.Condition()
        self._frame = bytearray()  # the frame being read
        self._state = 0  # 0 between frames, 1 in DATA, 2 expecting the LRC
        self._thread: threading.Thread | None = None
        self._done = False

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.dst.sendall(data)
        self.stats[self.counter] += len(data)

    def forward(self, data: bytes) -> None:
        delay = self.delays.get(self.direction, 0.0)
        if delay <= 0 and self._state == 0 and not self._held:
            self._send(data)
            return
        now_bytes = bytearray()
        for b in data:
            if self._state == 0:
                if b == framing.STX:
                    self._state, self._frame = 1, bytearray([b])
                else:
                    now_bytes.append(b)  # control codes (and garbage) between frames: at once
            elif self._state == 1:
                self._frame.append(b)
                if b == framing.ETX:
                    self._state = 2
            else:
                self._frame.append(b)
                self._state = 0
                self._hold(bytes(self._frame), delay)
        if now_bytes:
            self._send(bytes(now_bytes))

    def _hold(self, frame: bytes, delay: float) -> None:
        with self._cond:
            due = time.monotonic() + delay
            if self._held:
                due = max(due, self._held[-1][0])  # frames keep their order
            self._held.append((due, frame))
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, name="proxy-slow-frames", daemon=True)
            self._thread.start()

    def _sender(self) -> None:
        while True:
            with self._cond:
                while not self._held and not self._done:
                    self._cond.wait(0.5)
                if not self._held:
                    return
                due, frame = self._held[0]
                wait = due - time.monotonic()
                if wait > 0 and not self._done:
                    self._cond.wait(min(wait, 0.5))
                    continue
                self._held.pop(0)
            try:
                self._send(frame)
            except OSError:
                with self._cond:
                    self._held.clear()
                return

    def drain(self, closed: threading.Event, timeout: float = 30.0) -> None:
        """The source side closed: deliver the frames still held (at their time), then return."""
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            with self._cond:
                if not self._held:
                    break
            if closed.is_set():
                break
            time.sleep(0.05)
        with self._cond:
            self._done = True
            self._cond.notify()


# ============================================================================= sockets
@dataclass
class SocketReport:
    """What a listener answered to one kind of garbage."""

    what: str
    connections: int = 0
    handshakes_ok: int = 0
    refused: int = 0
    acks: int = 0
    nacks: int = 0
    error_replies: int = 0
    closed_by_peer: int = 0
    bytes_sent: int = 0

    def add(self, other: SocketReport) -> None:
        for name in ("connections", "handshakes_ok", "refused", "acks", "nacks", "error_replies",
                     "closed_by_peer", "bytes_sent"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _connect(host: str, port: int, timeout: float = 3.0) -> socket.socket:
    if not _is_loopback(host):
        raise ValueError("the garbage helpers only target loopback addresses")
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _enq(sock: socket.socket, report: SocketReport) -> bool:
    """ENQ/ACK handshake; True if the listener accepted the session."""
    sock.sendall(bytes([framing.ENQ]))
    try:
        answer = sock.recv(1)
    except OSError:
        answer = b""
    if answer == bytes([framing.ACK]):
        report.handshakes_ok += 1
        return True
    report.refused += 1
    return False


def _drain_answers(sock: socket.socket, report: SocketReport, expect: int, timeout: float) -> None:
    """Read ACK/NACK bytes (and count error frames) until ``expect`` answers or ``timeout``."""
    decoder = framing.FrameDecoder()
    deadline = time.monotonic() + timeout
    got = 0
    while got < expect and time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            report.closed_by_peer += 1
            return
        if not chunk:
            report.closed_by_peer += 1
            return
        replies = bytearray()
        for ev in decoder.feed(chunk):
            if isinstance(ev, framing.Control) and ev.code in (framing.ACK, framing.NACK):
                got += 1
                if ev.code == framing.ACK:
                    report.acks += 1
                else:
                    report.nacks += 1
            elif isinstance(ev, framing.Control) and ev.code == framing.EOT:
                report.closed_by_peer += 1
                return
            elif isinstance(ev, framing.Frame):
                replies.append(framing.ACK)  # be a polite peer so the server is not stuck resending
                try:
                    if json.loads(ev.data).get("type") == "error":
                        report.error_replies += 1
                except (ValueError, AttributeError):
                    pass
        if replies:
            try:
                sock.sendall(bytes(replies))
            except OSError:
                return


def random_bytes(host: str, port: int, *, connections: int = 20, size: int = 8192, handshake: bool = True,
                 seed: int = 1) -> SocketReport:
    """Connections that send ``size`` random bytes (after ENQ if ``handshake``) and leave."""
    rng = random.Random(seed)
    report = SocketReport(f"random bytes{' after ENQ' if handshake else ''}")
    for _ in range(connections):
        try:
            with _connect(host, port) as sock:
                report.connections += 1
                if handshake and not _enq(sock, report):
                    continue
                data = rng.randbytes(size)
                sock.sendall(data)
                report.bytes_sent += len(data)
                _drain_answers(sock, report, expect=10**9, timeout=0.3)
        except OSError:
            report.closed_by_peer += 1
    return report


def _bad_lrc(data: bytes) -> bytes:
    good = framing.encode_frame(data)
    return good[:-1] + bytes([good[-1] ^ 0xFF])


def bad_lrc_frames(host: str, port: int, *, frames: int = 10, connections: int = 3) -> SocketReport:
    """Well-formed frames of a valid message whose LRC byte is wrong: each must be NACKed."""
    report = SocketReport("bad LRC")
    body = protocol.encode(protocol.Heartbeat(cp_id="GARBAGE", engine_ok=True))
    for _ in range(connections):
        try:
            with _connect(host, port) as sock:
                report.connections += 1
                if not _enq(sock, report):
                    continue
                for _ in range(frames):
                    sock.sendall(_bad_lrc(body))
                    report.bytes_sent += len(body) + 3
                    _drain_answers(sock, report, expect=1, timeout=2.0)
        except OSError:
            report.closed_by_peer += 1
    return report


def oversized_frame(host: str, port: int, *, size: int = framing.MAX_DATA + 4096, connections: int = 2) -> SocketReport:
    """One frame whose DATA is over the protocol's limit (with a correct LRC): NACK expected."""
    report = SocketReport("oversized frame")
    data = b"x" * size
    frame = bytes([framing.STX]) + data + bytes([framing.ETX, framing.lrc(data)])
    for _ in range(connections):
        try:
            with _connect(host, port, timeout=10) as sock:
                report.connections += 1
                if not _enq(sock, report):
                    continue
                sock.sendall(frame)
                report.bytes_sent += len(frame)
                _drain_answers(sock, report, expect=1, timeout=5.0)
        except OSError:
            report.closed_by_peer += 1
    return report


#: DATA of frames with a correct LRC that are not acceptable messages.
BAD_FRAME_DATA: tuple[bytes, ...] = (
    b"not json at all",
    b"\xff\xfe\xfd invalid utf-8",
    b"[1, 2, 3]",
    b'"just a string"',
    b"{}",
    b'{"type": 42}',
    b'{"type": "no_such_message", "correlation_id": "c1"}',
    b'{"type": "heartbeat"}',
    b'{"type": "heartbeat", "cp_id": "", "engine_ok": true}',
    b'{"type": "register_request", "cp_id": "' + b"X" * 200 + b'", "correlation_id": "c2"}',
    b'{"type": "charging_data", "seq": NaN}',
    b'{"type": "heartbeat", "cp_id": "GHOST", "engine_ok": "yes"}',
    b'{"type": "supply_ended", "cp_id": "GHOST", "session_id": "NOPE", "end_reason": "unplugged"}',
    b'{"type": "authorize_supply", "correlation_id": "c3", "session_id": "S1", "driver_id": "d", '
    b'"price_eur_kwh": -1}',
    b'{"type": "health_check", "seq": 1e999}',
    b'{"a": ' * 2000 + b"1" + b"}" * 2000,  # nested deeper than any JSON parser's recursion limit
    b"[" * 30000 + b"]" * 30000,
    b'{"type": "heartbeat", "cp_id": "' + b"9" * 5000 + b'", "engine_ok": true}',
    b'{"type": "hello", "cp_id": 12345678901234567890123456789012345678901234567890, "price_eur_kwh": 1}',
)


def bad_json_frames(host: str, port: int, *, connections: int = 2, extra: Iterable[bytes] = ()) -> SocketReport:
    """Intact frames (right LRC) carrying bad JSON, wrong shapes and unknown types or ids.

    The protocol answers bad JSON with NACK and a message that fails
    validation with ACK + an ``error`` frame; either way the server must
    neither crash nor drop the other peers.
    """
    report = SocketReport("bad JSON / unknown types")
    payloads = [d for d in (*BAD_FRAME_DATA, *extra) if framing.STX not in d and framing.ETX not in d]
    for _ in range(connections):
        try:
            with _connect(host, port) as sock:
                report.connections += 1
                if not _enq(sock, report):
                    continue
                for data in payloads:
                    frame = bytes([framing.STX]) + data + bytes([framing.ETX, framing.lrc(data)])
                    sock.sendall(frame)
                    report.bytes_sent += len(frame)
                    _drain_answers(sock, report, expect=1, timeout=2.0)
                _drain_answers(sock, report, expect=10**9, timeout=0.3)  # trailing error frames
        except OSError:
            report.closed_by_peer += 1
    return report


class HalfFrames:
    """Connections that say ENQ, send STX and half a message, then go silent.

    A context manager: the connections stay open (the "silence") until the
    block ends; ``held()`` says how many the server has not closed yet.
    """

    def __init__(self, host: str, port: int, *, connections: int = 3) -> None:
        self.host, self.port, self.count = host, port, connections
        self.socks: list[socket.socket] = []
        self.report = SocketReport("half frames then silence")

    def __enter__(self) -> HalfFrames:
        half = protocol.encode(protocol.Heartbeat(cp_id="HALF", engine_ok=True))[:20]
        for _ in range(self.count):
            try:
                sock = _connect(self.host, self.port)
            except OSError:
                self.report.refused += 1
                continue
            self.report.connections += 1
            if not _enq(sock, self.report):
                sock.close()
                continue
            sock.sendall(bytes([framing.STX]) + half)
            self.report.bytes_sent += len(half) + 1
            self.socks.append(sock)
        return self

    def held(self) -> int:
        """Connections the server still keeps open (what it sent before closing, an EOT say, is read
        and dropped: only the end of the stream counts as closed)."""
        alive = 0
        for s in self.socks:
            try:
                s.setblocking(False)
                while True:
                    data = s.recv(4096)
                    if not data:
                        break  # closed by the server
            except BlockingIOError:
                alive += 1  # nothing more to read, and no end: still open
            except OSError:
                pass
            finally:
                try:
                    s.setblocking(True)
                except OSError:
                    pass
        return alive

    def __exit__(self, *exc: object) -> None:
        for s in self.socks:
            _hard_close(s)
        self.socks.clear()


def churn(host: str, port: int, *, connections: int = 2000, enq_every: int = 4, garbage_every: int = 5,
          parallel: int = 8, seed: int = 2) -> SocketReport:
    """Open and drop ``connections`` connections (bounded: ``parallel`` at a time).

    Every ``enq_every``-th does the ENQ handshake first, every
    ``garbage_every``-th sends a few random bytes; the rest connect and
    close at once (half of those with a reset).
    """
    report = SocketReport("connections opened and dropped")
    lock = threading.Lock()
    counter = iter(range(connections))

    def worker(wid: int) -> None:
        rng = random.Random(seed * 1000 + wid)
        local = SocketReport(report.what)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            try:
                sock = _connect(host, port, timeout=2.0)
            except OSError:
                local.refused += 1
                continue
            local.connections += 1
            try:
                if i % enq_every == 0:
                    sock.sendall(bytes([framing.ENQ]))
                    try:
                        if sock.recv(1) == bytes([framing.ACK]):
                            local.handshakes_ok += 1
                    except OSError:
                        pass
                if i % garbage_every == 0:
                    blob = rng.randbytes(rng.randint(1, 64))
                    sock.sendall(blob)
                    local.bytes_sent += len(blob)
            except OSError:
                local.closed_by_peer += 1
            finally:
                if i % 2:
                    _hard_close(sock)
                else:
                    sock.close()
        with lock:
            report.add(local)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return report


def garbage_round(host: str, port: int, *, seed: int = 1) -> list[SocketReport]:
    """One round of every kind of socket garbage against one listener."""
    return [
        random_bytes(host, port, connections=5, handshake=True, seed=seed),
        random_bytes(host, port, connections=5, handshake=False, seed=seed + 1),
        bad_lrc_frames(host, port, frames=5, connections=2),
        oversized_frame(host, port, connections=1),
        bad_json_frames(host, port, connections=1),
    ]


class Hammer:
    """Garbage on sockets and topics in a background thread, until stopped (bounded).

    Each round sends :func:`garbage_round` to every port, :meth:`TopicTool.garbage`
    to every topic (when a ``tool`` is given) and one slice of the connection
    churn, until ``churn_total`` connections were opened and dropped per port
    and at least ``min_rounds`` rounds ran; then it keeps going (rounds without
    churn) until :meth:`stop` or ``max_rounds``.
    """

    def __init__(self, host: str, ports: dict[int, int], *, tool: TopicTool | None = None,
                 topic_keys: Iterable[str] = ("garbage",), churn_slice: int = 250, min_rounds: int = 1,
                 max_rounds: int = 40) -> None:
        self.host = host
        self.ports = dict(ports)  # port -> connections to open and drop on it in total
        self.tool = tool
        self.topic_keys = tuple(topic_keys)
        self.churn_slice = churn_slice
        self.min_rounds = min_rounds
        self.max_rounds = max_rounds
        self.reports: list[SocketReport] = []
        self.churned: dict[int, int] = dict.fromkeys(self.ports, 0)
        self.records = 0
        self.rounds = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hammer", daemon=True)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def churn_done(self) -> bool:
        return all(self.churned[p] >= n for p, n in self.ports.items()) and self.rounds >= self.min_rounds

    def stop(self, timeout: float = 60.0) -> None:
        self._halt.set()
        self._thread.join(timeout)

    def total(self) -> SocketReport:
        out = SocketReport("all garbage")
        for r in self.reports:
            out.add(r)
        return out

    def _run(self) -> None:
        try:
            while self.rounds < self.max_rounds and not (self._halt.is_set() and self.churn_done):
                for port in self.ports:
                    self.reports += garbage_round(self.host, port, seed=self.rounds * 10)
                if self.tool is not None:
                    self.records += self.tool.garbage(keys=self.topic_keys, tag=f"r{self.rounds}")
                for port, total in self.ports.items():
                    n = min(self.churn_slice, total - self.churned[port])
                    if n > 0:
                        self.reports.append(churn(self.host, port, connections=n, seed=self.rounds))
                        self.churned[port] += n
                self.rounds += 1
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc


# =============================================================================== Kafka
#: Values no Engine, Driver or Central ever produced: every consumer must shrug them off.
BAD_RECORDS: tuple[bytes | None, ...] = (
    None,  # a tombstone
    b"",
    b"not json",
    b"\xff\xfe\x00\x01",
    b"[1,2,3]",
    b"{}",
    b'{"type": 7}',
    b'{"type": "no_such_message"}',
    b'{"type": "charging_data"}',
    b'{"type": "charge_completion", "cp_id": "GHOST", "session_id": "S-NONE", "driver_id": "nobody", '
    b'"energy_kwh": -3, "cost_eur": 1, "end_reason": "unplugged", "message_id": "m"}',
    b'{"type": "charging_data", "seq": 0, "cp_id": "GHOST", "session_id": "S-NONE", "driver_id": "x", '
    b'"energy_kwh": 1, "cost_eur": 1, "power_kw": 1, "message_id": "m", "timestamp": 1}',
    b'{"type": "heartbeat", "cp_id": "GHOST", "engine_ok": true}',
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b"[" * 100000 + b"]" * 100000,
    b'{"type": "ticket_ack", "driver_id": "' + b"d" * 300 + b'", "session_id": "S"}',
    b'{"type": "charge_request", "driver_id": "x", "cp_id": "y", "correlation_id": 12}',
)


def _unknown_id_messages(tag: str) -> dict[str, list[protocol.Message]]:
    """Valid messages naming CPs, sessions and drivers nobody knows, per topic."""
    ghost_cp, ghost_driver, ghost_session = f"GHOST-{tag}", f"ghost-{tag}", f"S-GHOST-{tag}"
    now = time.time()
    return {
        "driver_requests": [
            protocol.ChargeRequest(driver_id=ghost_driver, cp_id=ghost_cp, correlation_id=protocol.new_id()),
            protocol.StopChargingRequest(driver_id=ghost_driver, session_id=ghost_session,
                                         correlation_id=protocol.new_id()),
            protocol.TicketAck(driver_id=ghost_driver, session_id=ghost_session),
            protocol.DriverHello(driver_id=ghost_driver, correlation_id=protocol.new_id()),
            protocol.AvailableCpsRequest(driver_id=ghost_driver, correlation_id=protocol.new_id()),
            protocol.Heartbeat(cp_id=ghost_cp, engine_ok=True),  # a valid message on the wrong topic
        ],
        "charging_session_data": [
            protocol.ChargingData(cp_id=ghost_cp, session_id=ghost_session, driver_id=ghost_driver, seq=1,
                                  energy_kwh=1.0, cost_eur=0.3, power_kw=7.4, timestamp=now),
            protocol.ChargeRequest(driver_id=ghost_driver, cp_id=ghost_cp, correlation_id=protocol.new_id()),
        ],
        "charging_session_complete": [
            protocol.ChargeCompletion(cp_id=ghost_cp, session_id=ghost_session, driver_id=ghost_driver,
                                      energy_kwh=5.0, cost_eur=1.5, end_reason="unplugged", timestamp=now),
            protocol.ChargingData(cp_id=ghost_cp, session_id=ghost_session, driver_id=ghost_driver, seq=3,
                                  energy_kwh=1.0, cost_eur=0.3, power_kw=7.4, timestamp=now),
        ],
        "driver_responses": [
            protocol.Ticket(driver_id=ghost_driver, session_id=ghost_session, cp_id=ghost_cp, price_eur_kwh=0.3,
                            energy_kwh=1.0, cost_eur=0.3, started_at=now, ended_at=now, end_reason="unplugged"),
            protocol.SupplyEvent(driver_id=ghost_driver, session_id=ghost_session, cp_id=ghost_cp, event="fault"),
        ],
    }


class TopicTool:
    """Produce raw or protocol records to the project's topics and read them back.

    The producer is plain (``enable_idempotence=False``, acks=all), like an
    outside client; reads use a fresh, group-less consumer each time.
    """

    def __init__(self, bootstrap: str, topic_prefix: str = "") -> None:
        from kafka import KafkaProducer

        from transport.broker import KafkaSettings

        self.settings = KafkaSettings(bootstrap=bootstrap, topic_prefix=topic_prefix)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all",
                                      linger_ms=0, max_block_ms=10000, request_timeout_ms=10000)
        self.sent = 0

    def close(self) -> None:
        self.producer.close(2)

    def __enter__(self) -> TopicTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- producing ----------------------------------------------------------------
    def raw(self, topic: str, key: str | bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """One record as given (``topic`` is logical: the prefix is added)."""
        k = key.encode() if isinstance(key, str) else key
        self.producer.send(self.settings.topic(topic), key=k, value=value, partition=partition)
        self.sent += 1

    def message(self, topic: str, key: str, msg: protocol.Message | dict[str, Any]) -> None:
        """A protocol message (or any dict, sent as JSON without validation)."""
        value = protocol.encode(msg) if not isinstance(msg, dict) else json.dumps(msg).encode()
        self.raw(topic, key, value)

    def flush(self, timeout: float = 10.0) -> None:
        self.producer.flush(timeout)

    def garbage(self, topics: Iterable[str] | None = None, keys: Iterable[str] = ("garbage",),
                tag: str | None = None) -> int:
        """BAD_RECORDS and unknown-id messages to every topic (under each key); returns how many."""
        from transport.broker import TOPICS

        tag = tag or uuid.uuid4().hex[:6]
        unknown = _unknown_id_messages(tag)
        n = 0
        for topic in topics or TOPICS:
            for key in keys:
                for value in BAD_RECORDS:
                    self.raw(topic, key, value)
                    n += 1
                for msg in unknown.get(topic, ()):
                    self.message(topic, key, msg)
                    n += 1
        self.flush()
        return n

    # --- reading -------------------------------------------------------------------
    def read_all(self, topic: str, timeout: float = 10.0) -> list[Any]:
        """Every record now in ``topic`` (all partitions, from the beginning)."""
        from kafka import KafkaConsumer, TopicPartition

        from transport.broker import TOPICS

        real = self.settings.topic(topic)
        consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False,
                                 group_id=None, fetch_max_wait_ms=50, request_timeout_ms=11000)
        try:
            tps = [TopicPartition(real, p) for p in range(TOPICS[topic])]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            out: list[Any] = []
            deadline = time.monotonic() + timeout
            while any(consumer.position(tp) < ends[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {real} to its end within {timeout:g} s")
                for records in consumer.poll(timeout_ms=200).values():
                    out.extend(records)
            return out
        finally:
            consumer.close()

    def group_caught_up(self, group: str, topics: Iterable[str]) -> bool:
        """True when consumer group ``group`` has committed the end of every partition of ``topics``
        (so everything in them was handled; the project's pumps commit after handling)."""
        from kafka import KafkaConsumer, TopicPartition

        from transport.broker import TOPICS

        consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap, group_id=group,
                                 enable_auto_commit=False)
        try:
            tps = [TopicPartition(self.settings.topic(t), p) for t in topics for p in range(TOPICS[t])]
            ends = consumer.end_offsets(tps)
            return all((consumer.committed(tp) or 0) >= ends[tp] for tp in tps)
        finally:
            consumer.close(autocommit=False)

    def decoded(self, topic: str, kind: type | None = None, *, db_path: Any = None) -> list[Any]:
        """The records of ``topic`` that decode (optionally only messages of ``kind``); with
        ``db_path`` (Central's database), sealed records are opened with the keys Central issued."""
        keys = central_keys(db_path) if db_path is not None else {}
        out = []
        for r in self.read_all(topic):
            try:
                m = protocol.decode(r.value or b"")
                if isinstance(m, protocol.Sealed) and m.key_id in keys:
                    m = security.open_sealed(keys[m.key_id], m)
            except (protocol.ProtocolError, security.SecurityError):
                continue
            if kind is None or isinstance(m, kind):
                out.append(m)
        return out


def with_new_message_id(value: bytes, **changes: Any) -> bytes:
    """The same record with a fresh ``message_id`` (a producer retry or an Engine resend)."""
    obj = json.loads(value)
    obj["message_id"] = protocol.new_id()
    obj.update(changes)
    return json.dumps(obj).encode()


class Echo:
    """Tails topics and re-injects copies of every new record while the system runs.

    For each record of ``charging_session_data`` it sends ``copies`` exact
    duplicates and one with a new message id; every ``stale_every``-th record
    it also re-sends an earlier record of the same session (an out-of-order,
    lower ``seq``). For each ``charge_completion`` it sends ``copies`` exact
    duplicates and ``copies`` with new message ids (one with a later
    timestamp), then re-sends the session's first telemetry record *after*
    the completion. Bounded: at most ``max_records`` injections.
    """

    def __init__(self, tool: TopicTool, *, copies: int = 2, stale_every: int = 3, max_records: int = 5000) -> None:
        self.tool = tool
        self.copies = copies
        self.stale_every = stale_every
        self.max_records = max_records
        self.injected = 0
        self.seen: dict[str, int] = {"charging_session_data": 0, "charging_session_complete": 0}
        self.completions: dict[str, list[bytes]] = {}  # session id -> legit completion values seen
        self.sessions_echoed: set[str] = set()
        self._history: dict[str, list[bytes]] = {}
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)
        self._mine: set[str] = set()  # message ids we produced (never echoed again)
        self.error: BaseException | None = None

    def __enter__(self) -> Echo:
        self._thread.start()
        if not self._ready.wait(15):
            raise AssertionError("the echo consumer did not get its partitions within 15 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(10)
        self.tool.flush()

    def _inject(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self.injected >= self.max_records:
            return
        try:
            self._mine.add(json.loads(value).get("message_id", ""))
        except ValueError:
            pass
        self.tool.raw(topic, key, value)
        self.injected += 1

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from transport.broker import TOPICS

        s = self.tool.settings
        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False, group_id=None,
                                 fetch_max_wait_ms=20)
        try:
            tps = [TopicPartition(s.topic(t), p) for t in self.seen for p in range(TOPICS[t])]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            for tp in tps:
                consumer.position(tp)
            self._ready.set()
            while not self._halt.is_set():
                for tp, records in consumer.poll(timeout_ms=100).items():
                    logical = tp.topic[len(s.topic_prefix):]
                    for r in records:
                        self._on_record(logical, r)
                self.tool.producer.flush(5)
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
        finally:
            consumer.close()

    def _on_record(self, topic: str, r: Any) -> None:
        try:
            obj = json.loads(r.value)
        except (TypeError, ValueError):
            return
        if not isinstance(obj, dict) or obj.get("message_id") in self._mine:
            return
        self.seen[topic] += 1
        sid = obj.get("session_id", "")
        self.sessions_echoed.add(sid)
        if topic == "charging_session_data":
            history = self._history.setdefault(sid, [])
            history.append(r.value)
            for _ in range(self.copies):
                self._inject(topic, r.key, r.value)
            self._inject(topic, r.key, with_new_message_id(r.value))
            if len(history) > 1 and self.seen[topic] % self.stale_every == 0:
                self._inject(topic, r.key, with_new_message_id(history[len(history) // 2 - 1]))
        else:
            self.completions.setdefault(sid, []).append(r.value)
            for i in range(self.copies):
                self._inject(topic, r.key, r.value)
                later = {"timestamp": obj.get("timestamp", time.time()) + 1 + i}
                self._inject(topic, r.key, with_new_message_id(r.value, **later))
            first = self._history.get(sid)
            if first:
                self._inject("charging_session_data", r.key, with_new_message_id(first[0]))


# ============================================================================ processes
def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise LookupError(f"no VmRSS for pid {pid} (a zombie?)")


def terminal_tracebacks(run_dir: str | Path) -> dict[str, str]:
    """Programs whose terminal log (run_dir/<name>.log) shows a traceback: name -> excerpt."""
    bad = {}
    for path in sorted(Path(run_dir).glob("*.log")):
        if path.name.endswith(".detail.log") or path.name in ("broker.log", "launcher.log"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        at = text.find("Traceback")
        if at >= 0:
            bad[path.name] = text[max(0, at - 200):at + 1500]
    return bad


# ============================================================================== billing
def journal_entries(run_dir: str | Path) -> dict[str, Any]:
    """Every supply the Engines journaled in ``run_dir`` (session id -> JournalEntry), read-only."""
    from persistence.records import JournalEntry, columns

    out: dict[str, Any] = {}
    for path in sorted(Path(run_dir).glob("engine-*.journal.db")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            for row in conn.execute(f"SELECT {columns(JournalEntry)} FROM supplies"):
                entry = JournalEntry(*row)
                out[entry.session_id] = entry
        except sqlite3.OperationalError:  # the Engine has not created its table yet
            pass
        finally:
            conn.close()
    return out


@dataclass
class BillingCheck:
    """Journals (what the Engines supplied) against tickets (what Central billed)."""

    supplies: dict[str, Any] = field(default_factory=dict)  # session id -> JournalEntry
    tickets: dict[str, list[Any]] = field(default_factory=dict)  # session id -> TicketRecord list
    lost: list[str] = field(default_factory=list)
    double: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # tickets for no journaled supply
    unpublished: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double or self.mismatched or self.unexpected or self.unpublished)

    def explain(self) -> str:
        lines = [f"{len(self.supplies)} supplies, {sum(len(v) for v in self.tickets.values())} tickets"]
        for name in ("lost", "double", "mismatched", "unexpected", "unpublished"):
            ids = getattr(self, name)
            if ids:
                lines.append(f"{name}: " + ", ".join(
                    f"{sid} (journal {_fig(self.supplies.get(sid))}, tickets "
                    f"{[round(t.energy_kwh, 6) for t in self.tickets.get(sid, [])]})" for sid in ids))
        return "; ".join(lines)


def _fig(entry: Any) -> str:
    if entry is None:
        return "-"
    return f"{entry.energy_kwh:.6f} kWh seq {entry.last_seq} {entry.status}"


def billing_check(run_dir: str | Path, db_path: str | Path, *, rel_tol: float = 1e-9) -> BillingCheck:
    """Every journaled supply must have exactly one ticket with the journal's energy, and the cost
    Central computes from it (``bill_cents``: energy × agreed price, half-up cents)."""
    from persistence import Repository, bill_cents

    check = BillingCheck(supplies=journal_entries(run_dir))
    with Repository(db_path) as repo:
        for t in repo.tickets():
            check.tickets.setdefault(t.session_id, []).append(t)
    for sid, entry in check.supplies.items():
        got = check.tickets.get(sid, [])
        if entry.status != "published":
            check.unpublished.append(sid)
        if not got:
            check.lost.append(sid)
        elif len(got) > 1:
            check.double.append(sid)
        elif not (math.isclose(got[0].energy_kwh, entry.energy_kwh, rel_tol=rel_tol, abs_tol=1e-12)
                  and got[0].cost_cents == bill_cents(entry.energy_kwh, entry.price_eur_kwh)):
            check.mismatched.append(sid)
    check.unexpected = [sid for sid in check.tickets if sid not in check.supplies]
    return check


def wait_for_supplying(db_path: str | Path, count: int) -> Callable[[], list[str]]:
    """A wait_until condition: at least ``count`` CPs are SUPPLYING in Central's database."""
    from persistence import Repository

    def condition() -> list[str]:
        with Repository(db_path) as repo:
            cps = [c.cp_id for c in repo.list_cps() if c.state == "SUPPLYING"]
        return cps if len(cps) >= count else []

    return condition


def central_keys(db_path: Any) -> dict[str, bytes]:
    """Every CP key Central issued (any state), by key id: to read sealed records in tests."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return {k: bytes(v) for k, v in conn.execute("SELECT key_id, key FROM cp_keys")}
    finally:
        conn.close()
