"""Simulated charging points: many real protocol clients in one thread.

A real Monitor is an actor system of about eight threads, so a thousand of
them would measure the simulator, not Central. :class:`Fleet` speaks the same
wire protocol as a Monitor (PROTOCOL.md: ENQ/ACK, STX/ETX/LRC frames, one
frame in flight until its ACK, JSON messages) for many CPs over real loopback
sockets, from one ``selectors`` loop:

* connect, ENQ -> ACK, ``register_request`` -> ``register_response``;
* ``heartbeat`` every ``heartbeat_interval`` s per CP (phases spread evenly),
  the time from sending it to Central's ACK recorded (heartbeat handling);
* ``authorize_supply`` -> ``supply_authorization_response`` accepted, then
  ``supply_started`` (the Engine's part), and the session is handed to the
  telemetry thread;
* ``stop_supply`` -> ``supply_ended``.

:class:`Telemetry` is the Engine's Kafka side: one ``charging_data`` per
second per supplying CP (``seq`` 1, 2, ...), through one KafkaProducer with
the Engine's settings. The cumulative ``energy_kwh`` is the energy a
``POWER_KW`` charger delivered since ``t0``, so the send time of any record
can be read back from the value Central shows (``sent_at``): this is how
the scale benchmark measures telemetry-to-panel lag without a side channel.

:class:`FakeEngine` is the other side of a Monitor's engine link (it answers
health checks with ok), for benchmarks that need many real Monitors but do
not measure Engines.

Run as a program (``python -m bench.simcp``) it is the load generator of the
scale benchmark; see :func:`main`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import queue
import re
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import LOOPBACK, pct
from transport import framing, protocol

POWER_KW = 7.4
ACK_B, NACK_B, ENQ_B, EOT_B = bytes([framing.ACK]), bytes([framing.NACK]), bytes([framing.ENQ]), bytes([framing.EOT])


def sent_at(energy_kwh: float, t0: float) -> float:
    """Inverse of the simulated meter: when a record with this energy was sent."""
    return t0 + energy_kwh * 3600.0 / POWER_KW


def meter(now: float, t0: float) -> float:
    return (now - t0) * POWER_KW / 3600.0


def frame_of(msg: Any) -> bytes:
    return framing.encode_frame(protocol.encode(msg))


# --- the Monitor side --------------------------------------------------------------------
@dataclass(eq=False)
class SimCP:
    cp_id: str
    index: int
    sock: socket.socket | None = None
    phase: str = "new"  # new, connecting, enq, open, closed
    decoder: framing.FrameDecoder = field(default_factory=framing.FrameDecoder)
    wbuf: bytearray = field(default_factory=bytearray)
    outbox: deque = field(default_factory=deque)  # (kind, frame bytes)
    in_flight: tuple[str, bytes] | None = None
    in_flight_at: float = 0.0
    attempts: int = 0
    registered: bool = False
    register_corr: str = ""
    session: tuple[str, str, float] | None = None  # session_id, driver_id, price
    hb_frame: bytes = b""
    hb_due: float = 0.0
    connected_at: float = 0.0
    registered_at: float = 0.0


class Fleet:
    """Many simulated Monitors of CPs in one selector thread (see the module docstring)."""

    def __init__(
        self,
        central: tuple[str, int],
        cp_ids: list[str],
        *,
        heartbeat_interval: float = 1.0,
        ack_timeout: float = 2.0,
        connect_rate: float = 500.0,
        on_session: Callable[[str, str, str, float], None] | None = None,
        on_session_end: Callable[[str, str], None] | None = None,
        preseeded: dict[str, tuple[str, str, float]] | None = None,
    ) -> None:
        self.central = central
        self.cps = [SimCP(cp, i) for i, cp in enumerate(cp_ids)]
        self.by_fd: dict[int, SimCP] = {}
        self.heartbeat_interval = heartbeat_interval
        self.ack_timeout = ack_timeout
        self.connect_rate = connect_rate
        self.on_session = on_session
        self.on_session_end = on_session_end
        self.preseeded = dict(preseeded or {})  # cp -> (session, driver, price): supplies Central already knows
        self.sel = selectors.DefaultSelector()
        self._halt = threading.Event()
        self._timers: list[tuple[float, int, int, str]] = []
        self._tseq = 0
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.reset_window()
        self.totals = {"connects": 0, "registered": 0, "authorized": 0, "disconnects": 0, "ack_timeouts": 0,
                       "nacks": 0, "errors_from_central": 0}

    def reset_window(self) -> None:
        """Start a measurement window: heartbeat figures are kept from now on."""
        self.hb_rtt: list[float] = []
        self.hb_sent = 0
        self.hb_acked = 0
        self.hb_late = 0  # sent > 0.25 s after due: the simulator itself was late
        self.hb_skipped = 0  # due while the previous one still waited for its ACK
        self.window_disconnects = 0
        self.window_ack_timeouts = 0

    # --- control from other threads ---------------------------------------------------
    def start(self) -> Fleet:
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self._wake()
        self._thread.join(timeout)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the fleet thread (the only one touching sockets)."""
        self._calls.put(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def counts(self) -> dict[str, int]:
        return {"cps": len(self.cps), "open": sum(c.phase == "open" for c in self.cps),
                "registered": sum(c.registered for c in self.cps),
                "supplying": sum(c.session is not None for c in self.cps), **self.totals}

    def window(self) -> dict[str, Any]:
        return {"hb_sent": self.hb_sent, "hb_acked": self.hb_acked, "hb_late_sends": self.hb_late, "hb_skipped": self.hb_skipped,
"hb_ack_p50_ms": pct(self.hb_rtt, 50) * 1000,
                "hb_ack_p95_ms": pct(self.hb_rtt, 95) * 1000, "hb_ack_p99_ms": pct(self.hb_rtt, 99) * 1000,
                "hb_ack_max_ms": (max(self.hb_rtt) * 1000) if self.hb_rtt else float("nan"),
                "disconnects": self.window_disconnects, "ack_timeouts": self.window_ack_timeouts}

    # --- the loop -------------------------------------------------------------------------
    def _timer(self, due: float, cp: SimCP, kind: str) -> None:
        self._tseq += 1
        heapq.heappush(self._timers, (due, self._tseq, cp.index, kind))

    def _run(self) -> None:
        start = time.monotonic()
        for i, cp in enumerate(self.cps):  # connects paced at connect_rate per second
            self._timer(start + i / self.connect_rate, cp, "connect")
        while not self._halt.is_set():
            now = time.monotonic()
            timeout = 0.05
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self._drain_wake()
                    continue
                cp = key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._writable(cp)
                    if mask & selectors.EVENT_READ and cp.phase != "closed":
                        self._readable(cp)
                except OSError as exc:
                    self._close(cp, f"socket error: {exc}")
            now = time.monotonic()
            for _ in range(10_000):  # bounded per turn
                if not self._timers or self._timers[0][0] > now:
                    break
                due, _, index, kind = heapq.heappop(self._timers)
                self._on_timer(self.cps[index], kind, due, now)
        for cp in self.cps:
            if cp.sock is not None:
                try:
                    cp.sock.sendall(EOT_B)
                except OSError:
                    pass
                cp.sock.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def _on_timer(self, cp: SimCP, kind: str, due: float, now: float) -> None:
        if kind == "connect":
            self._connect(cp)
        elif kind == "hb":
            if cp.phase != "open" or not cp.registered or due != cp.hb_due:
                return
            if (cp.in_flight is not None and cp.in_flight[0] == "hb") or any(k == "hb" for k, _ in cp.outbox):
                self.hb_skipped += 1  # the previous life message still waits for its ACK: do not pile up
            else:
                late = now - due
                if late > 0.25:
                    self.hb_late += 1
                self._queue(cp, "hb", cp.hb_frame)
            cp.hb_due = due + self.heartbeat_interval
            self._timer(cp.hb_due, cp, "hb")
        elif (kind == "ack" and cp.in_flight is not None and cp.phase == "open"
              and now - cp.in_flight_at >= self.ack_timeout - 1e-3):
            self.totals["ack_timeouts"] += 1
            self.window_ack_timeouts += 1
            if cp.attempts > 3:
                self._close(cp, "no ACK after 4 attempts")
            else:
                self._transmit(cp)

    def _connect(self, cp: SimCP) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        s.connect_ex(self.central)
        cp.sock, cp.phase = s, "connecting"
        cp.decoder = framing.FrameDecoder()
        self.by_fd[s.fileno()] = cp
        self.sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, cp)

    def _close(self, cp: SimCP, why: str) -> None:
        if cp.sock is not None:
            try:
                self.sel.unregister(cp.sock)
            except (KeyError, ValueError):
                pass
            cp.sock.close()
        cp.sock, cp.phase, cp.registered, cp.in_flight = None, "closed", False, None
        cp.outbox.clear()
        self.totals["disconnects"] += 1
        self.window_disconnects += 1
        if cp.session is not None and self.on_session_end:
            self.on_session_end(cp.cp_id, cp.session[0])
        cp.session = None

    def _writable(self, cp: SimCP) -> None:
        assert cp.sock is not None
        if cp.phase == "connecting":
            err = cp.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(cp, f"connect failed ({err})")
                return
            cp.phase = "enq"
            cp.connected_at = time.monotonic()
            self.totals["connects"] += 1
            cp.wbuf += ENQ_B
        if cp.wbuf:
            n = cp.sock.send(cp.wbuf)
            del cp.wbuf[:n]
        if not cp.wbuf:
            self.sel.modify(cp.sock, selectors.EVENT_READ, cp)

    def _write(self, cp: SimCP, data: bytes) -> None:
        if cp.sock is None:
            return
        if cp.wbuf:
            cp.wbuf += data
            return
        try:
            n = cp.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            cp.wbuf += data[n:]
            self.sel.modify(cp.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cp)

    def _readable(self, cp: SimCP) -> None:
        assert cp.sock is not None
        try:
            chunk = cp.sock.recv(65536)
        except BlockingIOError:
            return
        if not chunk:
            self._close(cp, "Central closed the connection")
            return
        now = time.monotonic()
        if cp.phase == "enq":
            if chunk[:1] != ACK_B:
                self._close(cp, "handshake refused")
                return
            cp.phase = "open"
            chunk = chunk[1:]
            cp.register_corr = protocol.new_id()
            self._queue(cp, "register", frame_of(protocol.RegisterRequest(
                cp_id=cp.cp_id, correlation_id=cp.register_corr, location=f"Simulated {cp.cp_id}")))
        for event in cp.decoder.feed(chunk):
            if isinstance(event, framing.Control):
                if event.code == framing.ACK:
                    self._on_ack(cp, now)
                elif event.code == framing.NACK:
                    self.totals["nacks"] += 1
                    if cp.in_flight is not None:
                        self._transmit(cp)
                elif event.code == framing.EOT:
                    self._close(cp, "Central said EOT")
                    return
            elif isinstance(event, framing.Frame):
                self._write(cp, ACK_B)
                self._on_message(cp, json.loads(event.data))
            elif isinstance(event, framing.BadFrame):
                self._write(cp, NACK_B)

    def _queue(self, cp: SimCP, kind: str, frame: bytes) -> None:
        cp.outbox.append((kind, frame))
        if cp.in_flight is None:
            self._next(cp)

    def _next(self, cp: SimCP) -> None:
        if cp.in_flight is None and cp.outbox:
            cp.in_flight = cp.outbox.popleft()
            cp.attempts = 0
            self._transmit(cp)

    def _transmit(self, cp: SimCP) -> None:
        assert cp.in_flight is not None
        cp.attempts += 1
        cp.in_flight_at = time.monotonic()
        if cp.in_flight[0] == "hb":
            self.hb_sent += 1
        self._write(cp, cp.in_flight[1])
        self._timer(cp.in_flight_at + self.ack_timeout, cp, "ack")

    def _on_ack(self, cp: SimCP, now: float) -> None:
        if cp.in_flight is None:
            return
        if cp.in_flight[0] == "hb":
            self.hb_acked += 1
            self.hb_rtt.append(now - cp.in_flight_at)
        cp.in_flight = None
        self._next(cp)

    def _set_heartbeat(self, cp: SimCP) -> None:
        sid = cp.session[0] if cp.session else None
        cp.hb_frame = frame_of(protocol.Heartbeat(cp_id=cp.cp_id, engine_ok=True,
                                                  state="SUPPLYING" if sid else "ACTIVE", supplying_session_id=sid))

    def _on_message(self, cp: SimCP, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "register_response":
            if msg.get("correlation_id") == cp.register_corr and msg.get("status") == "accepted":
                cp.registered = True
                cp.registered_at = time.monotonic()
                self.totals["registered"] += 1
                seeded = self.preseeded.pop(cp.cp_id, None)
                if seeded is not None:  # a supply that was running before: the Engine goes on with it
                    cp.session = seeded
                    self._queue(cp, "started", frame_of(protocol.SupplyStarted(
                        cp_id=cp.cp_id, session_id=seeded[0], driver_id=seeded[1])))
                    if self.on_session:
                        self.on_session(cp.cp_id, *seeded)
                self._set_heartbeat(cp)
                self._queue(cp, "hb", cp.hb_frame)  # the first life message at once
                # then every interval, phases spread over the interval by CP index
                cp.hb_due = time.monotonic() + self.heartbeat_interval * (1 + (cp.index % 97) / 97.0)
                self._timer(cp.hb_due, cp, "hb")
        elif kind == "authorize_supply":
            sid, driver, price = msg["session_id"], msg["driver_id"], float(msg["price_eur_kwh"])
            self._queue(cp, "auth", frame_of(protocol.SupplyAuthorizationResponse(
                correlation_id=msg["correlation_id"], session_id=sid, accepted=True)))
            self._queue(cp, "started", frame_of(protocol.SupplyStarted(cp_id=cp.cp_id, session_id=sid,
                                                                       driver_id=driver)))
            cp.session = (sid, driver, price)
            self.totals["authorized"] += 1
            self._set_heartbeat(cp)
            if self.on_session:
                self.on_session(cp.cp_id, sid, driver, price)
        elif kind == "stop_supply":
            if cp.session is not None and cp.session[0] == msg.get("session_id"):
                sid, driver, _ = cp.session
                self._queue(cp, "ended", frame_of(protocol.SupplyEnded(
                    cp_id=cp.cp_id, session_id=sid, end_reason=msg.get("reason") or "central_stop",
                    driver_id=driver)))
                if self.on_session_end:
                    self.on_session_end(cp.cp_id, sid)
                cp.session = None
                self._set_heartbeat(cp)
        elif kind == "error":
            self.totals["errors_from_central"] += 1


# --- the Engine's Kafka side --------------------------------------------------------------
def charging_data(cp_id: str, session_id: str, driver_id: str, seq: int, energy_kwh: float, cost_eur: float,
                  timestamp: float) -> bytes:
    """A ``charging_data`` record's value, as ``protocol.encode`` writes it, by string formatting.

    Why not ``protocol.encode``: at 2,000 CPs the simulator shares the machine with Central and
    the broker, and encoding through the dataclass was 16 % of its time (py-spy); the simulator is
    the measuring instrument, not what is measured. ``tests/test_bench_tools.py`` checks that
    both give the same record.
    """
    return (f'{{"type":"charging_data","cp_id":{json.dumps(cp_id)},"session_id":{json.dumps(session_id)},'
            f'"driver_id":{json.dumps(driver_id)},"seq":{seq},"energy_kwh":{energy_kwh!r},"cost_eur":{cost_eur!r},'
            f'"power_kw":{POWER_KW!r},"message_id":"{protocol.new_id()}","timestamp":{timestamp!r}}}').encode()


class Telemetry:
    """One ``charging_data`` per second per live session, through one producer thread."""

    def __init__(self, bootstrap: str, topic_prefix: str, t0: float, interval: float = 1.0) -> None:
        from kafka import KafkaProducer

        from transport.broker import KafkaSettings

        self.settings = KafkaSettings(bootstrap=bootstrap, topic_prefix=topic_prefix)
        # the Engine's Publisher settings (acks=all, linger 1 ms)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="bench-telemetry", acks="all",
                                      enable_idempotence=False, linger_ms=1,
                                      **self.settings.client_options(KafkaProducer))
        self.t0 = t0
        self.interval = interval
        self.topic = self.settings.topic("charging_session_data")
        self._inbox: queue.SimpleQueue[tuple[str, ...]] = queue.SimpleQueue()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self.sent = 0
        self.late = 0  # records sent > 0.25 s after due: the simulator was late
        self.errors = 0

    def start(self) -> Telemetry:
        self._thread.start()
        return self

    def begin(self, cp_id: str, session_id: str, driver_id: str, price: float) -> None:
        self._inbox.put(("begin", cp_id, session_id, driver_id, str(price)))

    def end(self, cp_id: str, session_id: str) -> None:
        self._inbox.put(("end", cp_id, session_id))

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(5)
        try:
            self.producer.flush(5)
            self.producer.close(2)
        except Exception:
            pass

    def _err(self, _exc: BaseException) -> None:
        self.errors += 1

    def _run(self) -> None:
        live: dict[str, tuple[str, str, float, int]] = {}  # cp -> (sid, driver, price, seq)
        heap: list[tuple[float, str, str]] = []
        while not self._halt.is_set():
            for _ in range(10_000):
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "begin":
                    _, cp, sid, driver, price = item
                    live[cp] = (sid, driver, float(price), 0)
                    heapq.heappush(heap, (time.monotonic() + self.interval, cp, sid))
                else:
                    _, cp, sid = item
                    if cp in live and live[cp][0] == sid:
                        del live[cp]
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                due, cp, sid = heapq.heappop(heap)
                entry = live.get(cp)
                if entry is None or entry[0] != sid:
                    continue
                sid, driver, price, seq = entry
                seq += 1
                live[cp] = (sid, driver, price, seq)
                if now - due > 0.25:
                    self.late += 1
                stamp = time.time()
                energy = meter(stamp, self.t0)
                value = charging_data(cp, sid, driver, seq, energy, energy * price, stamp)
                self.producer.send(self.topic, key=cp.encode(), value=value).add_errback(self._err)
                self.sent += 1
                heapq.heappush(heap, (due + self.interval, cp, sid))
            wait = min(0.05, heap[0][0] - time.monotonic()) if heap else 0.05
            self._halt.wait(max(0.0, wait))


class Answers:
    """Counts Central's charge_response records (status and reason), for the scale ramp's diagnostics."""

    def __init__(self, bootstrap: str, topic_prefix: str) -> None:
        self.bootstrap, self.topic = bootstrap, f"{topic_prefix}driver_responses"
        self.counts: dict[str, int] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="answers", daemon=True)

    def start(self) -> Answers:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(5)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items(), key=lambda kv: -kv[1])[:6])

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from transport.broker import TOPICS

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id="bench-answers",
                                 enable_auto_commit=False, fetch_max_wait_ms=100)
        tps = [TopicPartition(self.topic, p) for p in range(TOPICS["driver_responses"])]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        try:
            while not self._halt.is_set():
                for records in consumer.poll(timeout_ms=200, max_records=2000).values():
                    for r in records:
                        if b'"charge_response"' not in r.value:
                            continue
                        m = json.loads(r.value)
                        reason = re.sub(r"\S*\d\S*", "#", str(m.get("reason")))[:50] if m.get("reason") else ""
                        key = m.get("status", "?") + (f": {reason}" if reason else "")
                        self.counts[key] = self.counts.get(key, 0) + 1
        finally:
            consumer.close()


# --- the Engine side of a Monitor's engine link --------------------------------------------
class FakeEngine:
    """Accepts Monitors' engine links on one port and answers every health_check with ok."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((host, 0))
        self.server.listen(512)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ, "accept")
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self.checks = 0

    def start(self) -> FakeEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(3)

    def _run(self) -> None:
        conns: dict[socket.socket, list[Any]] = {}
        while not self._halt.is_set():
            for key, _ in self.sel.select(0.1):
                if key.data == "accept":
                    try:
                        s, _ = self.server.accept()
                    except BlockingIOError:
                        continue
                    s.setblocking(True)
                    s.settimeout(2.0)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s] = [False, framing.FrameDecoder()]
                    self.sel.register(s, selectors.EVENT_READ, "conn")
                    continue
                s = key.fileobj
                state = conns[s]
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    self.sel.unregister(s)
                    s.close()
                    del conns[s]
                    continue
                try:
                    if not state[0]:
                        if chunk[:1] == ENQ_B:
                            s.sendall(ACK_B)
                            state[0] = True
                        chunk = chunk[1:]
                    out = bytearray()
                    for event in state[1].feed(chunk):
                        if isinstance(event, framing.Frame):
                            out += ACK_B
                            msg = json.loads(event.data)
                            if msg.get("type") == "health_check":
                                self.checks += 1
                                out += frame_of(protocol.HealthStatus(seq=int(msg["seq"]), ok=True))
                        elif isinstance(event, framing.BadFrame):
                            out += NACK_B
                    if out:
                        s.sendall(bytes(out))
                except OSError:
                    self.sel.unregister(s)
                    s.close()
                    del conns[s]
        for s in list(conns):
            s.close()
        self.server.close()


# --- the scale benchmark's load generator ---------------------------------------------------
def seeded_session(cp_id: str) -> tuple[str, str, float]:
    """The live supply the scale benchmark writes into Central's database for ``cp_id``."""
    return f"S-{cp_id}", f"drv-{cp_id}", 0.30



def main(argv: list[str] | None = None) -> int:
    """Simulate ``--cps`` CPs against Central, start a supply on each, report as JSON lines.

    Reads commands on stdin: ``mark`` (start the measurement window),
    ``dump PATH`` (write the window's figures to PATH), ``quit``.
    """
    from kafka import KafkaProducer

    p = argparse.ArgumentParser(description="simulated CPs for the scale benchmark")
    p.add_argument("--central", required=True, help="HOST:PORT of Central's Monitor port (loopback)")
    p.add_argument("--broker", required=True)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--cps", type=int, required=True)
    p.add_argument("--t0", type=float, required=True, help="the meter's zero (epoch seconds)")
    p.add_argument("--sessions", choices=("seeded", "charge"), default="seeded",
                   help="seeded: Central's database already holds a live supply per CP (session S-<cp>, driver "
                        "drv-<cp>), the Engines go on with it; charge: ask for each supply over Kafka")
    p.add_argument("--charge-rate", type=float, default=50.0, help="charge requests per second during the ramp")
    p.add_argument("--deadline", type=float, default=600.0, help="exit after this many seconds whatever happens")
    args = p.parse_args(argv)
    host, port = args.central.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("the simulator talks to loopback addresses only")

    def say(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    telemetry = Telemetry(args.broker, args.topic_prefix, args.t0).start()
    cp_ids = [f"SIM{i:04d}" for i in range(args.cps)]
    seeded = {cp: seeded_session(cp) for cp in cp_ids} if args.sessions == "seeded" else None
    fleet = Fleet((host, int(port)), cp_ids, on_session=telemetry.begin, on_session_end=telemetry.end,
                  preseeded=seeded).start()
    driver = KafkaProducer(bootstrap_servers=args.broker, client_id="bench-drivers", acks="all",
                           enable_idempotence=False, linger_ms=5, **telemetry.settings.client_options(KafkaProducer))
    requests_topic = f"{args.topic_prefix}driver_requests"
    commands: queue.SimpleQueue[str] = queue.SimpleQueue()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    # Only when it asks for supplies: reading every driver_responses record (1,000 a second at 1,000
    # CPs) to count charge_responses was 8 % of the simulator's time, for nothing in seeded mode.
    answers = Answers(args.broker, args.topic_prefix).start() if args.sessions == "charge" else None
    started = time.monotonic()
    hard_deadline = started + args.deadline
    asked: dict[str, float] = {}
    attempts: dict[str, int] = {}
    last_status = 0.0
    all_ready_at = None
    telemetry_mark = (0, 0, 0)
    while time.monotonic() < hard_deadline:
        try:
            cmd = commands.get(timeout=0.2)
        except queue.Empty:
            cmd = ""
        if cmd == "quit":
            break
        if cmd == "mark":
            fleet.call(fleet.reset_window)
            telemetry_mark = (telemetry.sent, telemetry.late, telemetry.errors)
            say(event="marked")
        elif cmd.startswith("dump "):
            done = threading.Event()
            box: dict[str, Any] = {}

            def grab(box: dict[str, Any] = box, done: threading.Event = done) -> None:  # this command's, if late
                box.update(fleet.window())
                done.set()

            fleet.call(grab)
            done.wait(5)
            box.update(counts=fleet.counts(), telemetry_sent=telemetry.sent - telemetry_mark[0],
                       telemetry_late=telemetry.late - telemetry_mark[1],
                       telemetry_errors=telemetry.errors - telemetry_mark[2])
            with open(cmd.split(" ", 1)[1], "w", encoding="utf-8") as f:
                json.dump(box, f)
            say(event="dumped")
        now = time.monotonic()
        counts = fleet.counts()
        # every CP registered (and its first heartbeat out) for 1 s: ask for a supply at each,
        # --charge-rate a second, again after 5 s for those that did not get one (at most 5 times)
        if counts["registered"] == args.cps and all_ready_at is None:
            all_ready_at = now
        if args.sessions == "charge" and all_ready_at is not None and now - all_ready_at >= 1.0:
            supplying = {c.cp_id for c in fleet.cps if c.session is not None}
            sent = 0
            for cp in cp_ids:
                if sent >= args.charge_rate * 0.2:  # paced: drivers do not all ask in the same instant
                    break
                if cp in supplying or attempts.get(cp, 0) >= 5 or now - asked.get(cp, -1e9) < 5.0:
                    continue
                attempts[cp] = attempts.get(cp, 0) + 1
                asked[cp] = now
                sent += 1
                d = f"drv-{cp}"
                driver.send(requests_topic, key=d.encode(), value=protocol.encode(
                    protocol.ChargeRequest(driver_id=d, cp_id=cp, correlation_id=protocol.new_id())))
            if sent:
                driver.flush(10)
        if now - last_status >= 1.0:
            last_status = now
            say(event="status", t=round(now - started, 2), **counts, telemetry_sent=telemetry.sent,
                telemetry_late=telemetry.late, answers=answers.summary() if answers else {})
    fleet.stop()
    telemetry.stop()
    if answers is not None:
        answers.stop()
    driver.close(2)
    say(event="bye")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
