"""A framed socket seen as an actor: bytes in, typed messages out, and back.

:class:`FramedLink` is the shared base of the two socket actors:
``ServerConnection`` (one per accepted peer) and ``ClientLink`` (the
connecting side, with its own reconnect loop). It owns one socket:

* the process's one :class:`~transport.reader.SocketReader` thread ``recv``s,
  feeds the socket's :class:`~transport.framing.FrameDecoder` and ``tell``s the
  events to the actor (no thread per socket); a semaphore bounds how many
  batches may wait in the mailbox, so a flooding peer is slowed by TCP
  back-pressure instead of growing our memory;
* the actor ACKs or NACKs each frame, decodes it and tells its *owner*
  :class:`FrameIn`; outgoing :class:`Send` messages are sent one at a time
  (stop-and-wait), resent on NACK or ACK timeout at most ``retries`` times.

Garbage, bad frames and bad JSON are answered and logged, never raised; a
peer that sends nothing but garbage is dropped. The owner is looked up by
name in the :class:`~actors.runtime.Directory` at send time, so it may be
restarted under our feet.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, schedule, tell
from transport import framing, protocol
from transport.reader import SocketReader, Watch, shared_reader
from transport.security import DuplicateFrame, LinkSeal, SecurityError

log = logging.getLogger("evcharging.link")


# --- messages between a link and its owner ----------------------------------
@dataclass(frozen=True, slots=True)
class LinkUp:
    """The link is connected and the ENQ/ACK handshake is done.

    Every link tells its owner this on each connect, including the first one
    after either of them was restarted, so an owner learns its links from
    these messages alone. ``name`` is the link's child name (``engine-link``).
    """

    link: pykka.ActorRef[Any]
    peer: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class FrameIn:
    """A valid protocol message arrived on ``link``.

    ``principal`` is the CP id the link authenticated (its frames were sealed
    with that CP's key and opened by the link); None on a link that has not
    been admitted with a seal (before authentication, or ``--enroll open``).
    """

    link: pykka.ActorRef[Any]
    message: protocol.Message
    principal: str | None = None


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """Link → owner: a frame was refused at the trust boundary (``reason``: a sentence, for the audit)."""

    link: pykka.ActorRef[Any]
    peer: str
    reason: str
    principal: str | None = None


@dataclass(frozen=True, slots=True)
class Admit:
    """Owner (or gate) → link: the peer authenticated as ``principal``.

    From now on frames go to the owner (not the gate), carry the principal
    and, with a ``seal``, every frame in both directions is sealed with it
    (:class:`~transport.security.LinkSeal`); a plain or badly sealed frame is
    answered ``error``, reported as :class:`FrameRejected` and never delivered.
    ``seal=None`` admits the link unsealed (development mode). A new socket
    (a reconnect) starts unadmitted again.
    """

    principal: str | None
    seal: LinkSeal | None = None


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The link lost its peer (``reason`` is a sentence)."""

    link: pykka.ActorRef[Any]
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class Send:
    """Owner → link: send one protocol message as a frame."""

    message: protocol.Message


@dataclass(frozen=True, slots=True)
class Close:
    """Owner → link: say EOT and close."""

    reason: str = "closed by owner"


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Ask: counters of this link (frames in/out, NACKs, garbage...)."""


# --- internal ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Events:
    sock_id: int
    events: tuple[framing.Event, ...]
    watch: Watch  # its slots are released when handled: bounds the mailbox


@dataclass(frozen=True, slots=True)
class _ReaderClosed:
    sock_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class _AckTimeout:
    sock_id: int
    serial: int


@dataclass(frozen=True, slots=True)
class _Flush:
    """Try again to send what the socket would not take (its buffer was full)."""

    sock_id: int


#: how soon a link tries again to send bytes the socket's buffer had no room for: the first retry,
#: doubling up to the last (back to the first once the peer reads)
FLUSH_RETRY = 0.01
FLUSH_RETRY_MAX = 0.2


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """Tunables of a framed link; every one is a flag somewhere up the stack."""

    max_data: int = framing.MAX_DATA
    ack_timeout: float = 2.0
    retries: int = 3
    max_queue: int = 1000
    max_bad_frames: int = 20
    max_garbage: int = 64 * 1024
    io_timeout: float = 5.0  # a peer that reads none of what we send for this long is dropped
    max_unsent: int = 256 * 1024  # bytes waiting for room in the socket's buffer before the peer is dropped
    mailbox_batches: int = 64
    frame_timeout: float = 10.0  # a peer silent in the middle of a frame for this long is dropped
    max_rejected: int = 20  # frames refused at the trust boundary before the peer is dropped


class FramedLink(SupervisedActor):
    """Framing state machine over one socket at a time (see module docstring)."""

    def __init__(
        self,
        owner: str,
        directory: Directory,
        *,
        options: LinkOptions = LinkOptions(),
        component: str = "link",
        reader: SocketReader | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.reader = reader
        self.owner = owner
        self.directory = directory
        self.options = options
        self.component = component
        self.peer = "?"
        self._sock: socket.socket | None = None
        self._sock_id = 0
        self._watch: Watch | None = None
        self._outbox: deque[bytes] = deque()
        self._unsent = bytearray()  # bytes the socket's buffer had no room for yet (never blocks the actor)
        self._unsent_deadline = 0.0
        self._flush_delay = FLUSH_RETRY
        self._in_flight: bytes | None = None
        self._serial = 0
        self._attempts = 0
        self._ack_timer: Scheduled | None = None
        self._bad_streak = 0
        self._garbage = 0
        self._rejected = 0
        self.gate: str | None = None  # where frames go before Admit (None: the owner)
        self.principal: str | None = None
        self.admitted = False
        self._seal: LinkSeal | None = None
        self.stats = {"frames_in": 0, "frames_out": 0, "nacks_sent": 0, "nacks_received": 0,
                      "resends": 0, "garbage_bytes": 0, "errors_sent": 0, "rejected": 0}

    # --- hooks for subclasses ----------------------------------------------
    def on_link_lost(self, reason: str) -> None:
        """Called once the socket is gone; the default stops the actor."""
        self.actor_ref.stop(block=False)

    def on_admitted(self) -> None:
        """Called when the link was admitted (an :class:`Admit` arrived)."""

    def on_other(self, message: Any) -> Any:
        """Messages the base class does not know."""
        log.warning("%s: ignoring unexpected %s", self.component, type(message).__name__)
        return None

    # --- socket lifecycle ----------------------------------------------------
    def attach(self, sock: socket.socket, peer: str) -> None:
        """Start framing over a socket whose ENQ/ACK handshake is done."""
        self._sock_id += 1
        self._sock = sock
        self.peer = peer
        self._bad_streak = self._garbage = self._rejected = 0
        self.principal, self.admitted, self._seal = None, False, None  # a new socket proves itself again
        sock.setblocking(False)  # nobody ever waits on it: the reader reads what is there, _write sends what fits
        me, sock_id = self.actor_ref, self._sock_id
        self._watch = Watch(
            sock, framing.FrameDecoder(self.options.max_data),
            threading.BoundedSemaphore(self.options.mailbox_batches),
            deliver=lambda events: tell(me, _Events(sock_id, events, watch)),
            closed=lambda reason: tell(me, _ReaderClosed(sock_id, reason)),
            frame_timeout=self.options.frame_timeout, name=self.component,
        )
        watch = self._watch
        if self.reader is None:
            self.reader = shared_reader()
        self.reader.add(watch)
        self._tell_owner(LinkUp(self.actor_ref, peer, self.child_name))

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def detach(self, reason: str, polite: bool = False) -> None:
        """Close the current socket (EOT first if ``polite``) and tell the owner."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._sock_id += 1  # events still queued from the old socket are now stale
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._outbox.clear()
        self._in_flight = None
        self._unwatch()
        unsent, self._unsent = bytes(self._unsent), bytearray()
        if polite:  # best effort: what the socket's buffer cannot take now (a peer not reading) is lost
            _try_send(sock, unsent + bytes([framing.EOT]))
        _close_socket(sock)
        self._tell_owner(LinkDown(self.actor_ref, self.peer, reason))
        self.on_link_lost(reason)

    def teardown(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            self._unwatch()
            unsent, self._unsent = bytes(self._unsent), bytearray()
            _try_send(sock, unsent + bytes([framing.EOT]))
            _close_socket(sock)
            self._tell_owner(LinkDown(self.actor_ref, self.peer, "link stopped"))
        if self._ack_timer is not None:
            self._ack_timer.cancel()

    def _unwatch(self) -> None:
        """Stop the reader watching the socket, before it is closed (its number is reused)."""
        watch, self._watch = self._watch, None
        if watch is not None and self.reader is not None:
            self.reader.remove(watch)

    # --- messages ------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case _Events(sock_id, events, watch):
                watch.slots.release()
                if watch.held is not None and self.reader is not None:
                    self.reader.slot_freed()
                if sock_id == self._sock_id:
                    self._on_events(events)
            case _ReaderClosed(sock_id, reason):
                if sock_id == self._sock_id:
                    self.detach(reason)
            case Send(msg):
                return self._send(msg)
            case _Flush(sock_id):
                if sock_id == self._sock_id:
                    self._flush()
            case _AckTimeout(sock_id, serial):
                if sock_id == self._sock_id and serial == self._serial and self._in_flight is not None:
                    if self._unsent:  # the frame has not left yet: no ACK is due; _flush's deadline rules
                        self._ack_timer = schedule(self.options.ack_timeout, self.actor_ref,
                                                   _AckTimeout(sock_id, serial))
                    else:
                        self._retransmit(f"no ACK within {self.options.ack_timeout:g} s")
            case Close(reason):
                self.detach(reason, polite=True)
            case Admit(principal, seal):
                self.principal, self._seal, self.admitted = principal, seal, True
                self.on_admitted()
            case LinkStats():
                return dict(self.stats, connected=self.connected, queued=len(self._outbox), unsent=len(self._unsent))
            case _:
                return self.on_other(message)
        return None

    # --- inbound -----------------------------------------------------------
    def _on_events(self, events: tuple[framing.Event, ...]) -> None:
        for event in events:
            if self._sock is None:
                return
            match event:
                case framing.Frame(data):
                    self._on_frame(data)
                case framing.Control(code):
                    self._on_control(code)
                case framing.BadFrame(reason):
                    self.stats["nacks_sent"] += 1
                    self._bad_streak += 1
                    log.warning("%s: bad frame from %s (%s) — answered NACK", self.component, self.peer, reason)
                    self._write(bytes([framing.NACK]))
                    if self._bad_streak > self.options.max_bad_frames:
                        self.detach(f"{self.peer} sent {self._bad_streak} bad frames in a row")
                case framing.Garbage(count):
                    self.stats["garbage_bytes"] += count
                    self._garbage += count
                    if self._garbage > self.options.max_garbage:
                        self.detach(f"{self.peer} sent {self._garbage} bytes that are not frames")

    def _on_frame(self, data: bytes) -> None:
        try:
            obj = _json_object(data)
        except ValueError as exc:  # UnicodeDecodeError included
            self.stats["nacks_sent"] += 1
            self._bad_streak += 1
            log.warning("%s: frame from %s is not a JSON object (%s) — answered NACK", self.component, self.peer, exc)
            self._write(bytes([framing.NACK]))
            return
        self._bad_streak = 0
        self._garbage = 0
        self.stats["frames_in"] += 1
        self._write(bytes([framing.ACK]))
        try:
            message = protocol.from_dict(obj)
        except protocol.ProtocolError as exc:
            log.warning("%s: rejected a message from %s: %s", self.component, self.peer, exc)
            self.stats["errors_sent"] += 1
            correlation = obj.get("correlation_id") if isinstance(obj.get("correlation_id"), str) else None
            self._send(protocol.ErrorMessage(reason=str(exc), correlation_id=correlation))
            return
        if self._seal is not None:
            try:
                message = self._seal.open(message)
            except DuplicateFrame:
                log.debug("%s: %s sent its previous frame again (a lost ACK): dropped", self.component, self.peer)
                return
            except SecurityError as exc:
                self._reject(str(exc))
                return
        elif isinstance(message, protocol.Sealed) and self.admitted:
            self._reject("a sealed frame on a link that was admitted unsealed")
            return
        if not self.admitted and self.gate is not None:
            self.directory.tell(self.gate, FrameIn(self.actor_ref, message))
            return
        self._tell_owner(FrameIn(self.actor_ref, message, self.principal))

    def _reject(self, reason: str) -> None:
        """A frame refused at the trust boundary: answered, reported, counted; never delivered."""
        self.stats["rejected"] += 1
        self._rejected += 1
        log.warning("%s: refused a frame from %s%s: %s", self.component, self.peer,
                    f" (CP {self.principal})" if self.principal else "", reason)
        self._tell_owner(FrameRejected(self.actor_ref, self.peer, reason, self.principal))
        self._send(protocol.ErrorMessage(reason=protocol.clip(f"refused: {reason}")))
        if self._rejected > self.options.max_rejected:
            self.detach(f"{self.peer} sent {self._rejected} frames that were refused")

    def _on_control(self, code: int) -> None:
        if code == framing.ACK:
            if self._in_flight is not None:
                self._in_flight = None
                self._attempts = 0
                if self._ack_timer is not None:
                    self._ack_timer.cancel()
                    self._ack_timer = None
                self._pump_out()
        elif code == framing.NACK:
            self.stats["nacks_received"] += 1
            if self._in_flight is not None:
                self._retransmit("the peer answered NACK")
        elif code == framing.EOT:
            self.detach(f"{self.peer} closed the session (EOT)")
        elif code == framing.ENQ:
            self._write(bytes([framing.ACK]))  # a peer re-opening the session: harmless

    # --- outbound ----------------------------------------------------------
    def _send(self, message: protocol.Message) -> bool:
        if self._sock is None:
            return False
        try:
            if self._seal is not None:
                message = self._seal.seal(message)
            frame = framing.encode_frame(protocol.encode(message), self.options.max_data)
        except (protocol.ProtocolError, ValueError) as exc:
            log.error("%s: cannot send %s to %s: %s", self.component, type(message).__name__, self.peer, exc)
            return False
        if len(self._outbox) >= self.options.max_queue:
            self.detach(f"{self.peer} is not reading: {self.options.max_queue} frames waiting")
            return False
        self._outbox.append(frame)
        self._pump_out()
        return True

    def _pump_out(self) -> None:
        if self._in_flight is not None or not self._outbox or self._sock is None:
            return
        self._in_flight = self._outbox.popleft()
        self._attempts = 0
        self._transmit()

    def _transmit(self) -> None:
        assert self._in_flight is not None
        self._serial += 1
        self._attempts += 1
        self.stats["frames_out"] += 1
        if self._write(self._in_flight):
            self._ack_timer = schedule(
                self.options.ack_timeout, self.actor_ref, _AckTimeout(self._sock_id, self._serial)
            )

    def _retransmit(self, why: str) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._attempts > self.options.retries:
            self.detach(f"{self.peer} did not accept a frame after {self._attempts} attempts ({why})")
            return
        self.stats["resends"] += 1
        self._transmit()

    def _write(self, data: bytes) -> bool:
        """Send now what the socket takes; keep the rest and try again shortly (never wait here:
        a pooled link holds one of its pool's few threads, and a peer that stops reading must not
        stall the others). A peer that reads nothing for ``io_timeout``, or leaves more than
        ``max_unsent`` bytes waiting, is dropped."""
        sock = self._sock
        if sock is None:
            return False
        if self._unsent:  # keep the order: behind what waits already
            if len(self._unsent) + len(data) > self.options.max_unsent:
                self.detach(f"{self.peer} is not reading: {len(self._unsent) + len(data)} bytes wait to be sent")
                return False
            self._unsent += data
            return True
        sent = self._send_now(sock, data)
        if sent is None:
            return False
        if sent < len(data):
            self._unsent += data[sent:]
            self._unsent_deadline = time.monotonic() + self.options.io_timeout
            self._flush_delay = FLUSH_RETRY
            schedule(self._flush_delay, self.actor_ref, _Flush(self._sock_id))
        return True

    def _flush(self) -> None:
        sock = self._sock
        if sock is None or not self._unsent:
            return
        sent = self._send_now(sock, self._unsent)
        if sent is None:
            return
        now = time.monotonic()
        if sent:
            del self._unsent[:sent]
            self._unsent_deadline = now + self.options.io_timeout  # it reads: slow is not gone
            self._flush_delay = FLUSH_RETRY
        else:  # a peer that reads nothing costs fewer and fewer retries until io_timeout drops it
            self._flush_delay = min(FLUSH_RETRY_MAX, self._flush_delay * 2)
        if not self._unsent:
            return
        if now >= self._unsent_deadline:
            self.detach(f"{self.peer} read nothing of what we sent for {self.options.io_timeout:g} s")
            return
        schedule(self._flush_delay, self.actor_ref, _Flush(self._sock_id))

    def _send_now(self, sock: socket.socket, data: bytes | bytearray) -> int | None:
        """Bytes the socket took at once (0: its buffer is full); None when it failed and the link was
        detached."""
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.detach(f"cannot write to {self.peer}: {exc or type(exc).__name__}")
            return None

    def _tell_owner(self, message: Any) -> None:
        if not self.directory.tell(self.owner, message):
            log.debug("%s: owner %r is not running; dropped %s", self.component, self.owner, type(message).__name__)



def _try_send(sock: socket.socket, data: bytes) -> None:
    """Best effort, never waits (a goodbye byte)."""
    try:
        sock.send(data)
    except OSError:
        pass


def _json_object(data: bytes) -> dict[str, Any]:
    """A frame's DATA as a JSON object; ValueError saying why it is not one."""
    try:
        obj = json.loads(data)
    except RecursionError:  # some 30,000 "[" fit in one frame: a bad frame, not a crash
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def handshake_as_client(sock: socket.socket, timeout: float) -> None:
    """Send ENQ and wait for ACK; raise ConnectionError with a sentence otherwise."""
    sock.settimeout(timeout)
    sock.sendall(bytes([framing.ENQ]))
    answer = sock.recv(1)
    if answer == bytes([framing.ACK]):
        return
    if answer == bytes([framing.NACK]):
        raise ConnectionRefusedError("the peer refused the session (NACK), probably full")
    raise ConnectionError("the peer did not answer the ENQ with ACK")


def handshake_as_server(sock: socket.socket, timeout: float, accept: Callable[[], bool]) -> bool:
    """Wait for the client's ENQ; answer ACK if ``accept()`` else NACK. True if accepted."""
    sock.settimeout(timeout)
    first = sock.recv(1)
    if first != bytes([framing.ENQ]):
        return False
    if accept():
        sock.sendall(bytes([framing.ACK]))
        return True
    sock.sendall(bytes([framing.NACK]))
    return False
