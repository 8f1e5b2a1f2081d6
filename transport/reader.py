"""SocketReader: one thread that reads every framed socket of a process.

A thread per socket made Central's thread count (and its GIL contention)
grow by one per connected CP: 1,000 CPs meant 1,000 reader threads that each
woke once a second for one heartbeat. Here a single ``selectors`` loop reads
all sockets, feeds each socket's :class:`~transport.framing.FrameDecoder` and
tells the decoded events to the link actor that owns the socket.

What the per-socket reader thread did, it still does per socket:

* **back-pressure**: each socket has a semaphore of mailbox slots; when its
  actor has that many batches waiting, the socket is taken out of the
  selector (its peer is slowed by TCP) until the actor frees a slot;
* **half frames**: a peer silent in the middle of a frame for
  ``frame_timeout`` seconds is dropped;
* **end of stream**: EOF or a read error becomes one ``closed(reason)`` call.

The loop never calls into an actor synchronously and never blocks on one
socket, so a slow or hostile peer cannot hold up the others. Sockets are
added and removed from any thread; the loop applies the changes in order.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from transport import framing

log = logging.getLogger("evcharging.reader")

__all__ = ["SocketReader", "Watch", "shared_reader"]


@dataclass(eq=False)
class Watch:
    """One socket the reader watches, and where its events go."""

    sock: socket.socket
    decoder: framing.FrameDecoder
    slots: threading.BoundedSemaphore
    deliver: Callable[[tuple[framing.Event, ...]], bool]  # False: the owner is gone
    closed: Callable[[str], object]  # its result is ignored
    frame_timeout: float
    name: str = "link"
    last_bytes: float = field(default_factory=time.monotonic)
    held: tuple[framing.Event, ...] | None = None  # decoded, waiting for a slot
    done: bool = False


class SocketReader:
    """See the module docstring. Use :func:`shared_reader` unless testing."""

    def __init__(self, name: str = "socket-reader", tick: float = 0.25) -> None:
        self.name = name
        self.tick = tick
        self._selector = selectors.DefaultSelector()
        self._changes: deque[tuple[str, Watch]] = deque()
        self._watches: dict[int, Watch] = {}  # id(watch) -> watch (registered or held)
        self._held: dict[int, Watch] = {}  # the ones waiting for a mailbox slot (not registered)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- any thread -----------------------------------------------------------
    def add(self, watch: Watch) -> None:
        """Start reading ``watch.sock`` (already connected and handshaken)."""
        self._changes.append(("add", watch))
        self._wake()

    def remove(self, watch: Watch) -> None:
        """Stop reading; call *before* closing the socket (its number may be reused)."""
        watch.done = True
        self._changes.append(("remove", watch))
        self._wake()

    def slot_freed(self) -> None:
        """A link actor released a mailbox slot: a held socket may go on."""
        self._wake()

    def stop(self) -> None:
        """End the loop (the shared reader lives as long as its process)."""
        self._halt.set()
        self._wake()
        self._thread.join(timeout=2)

    @property
    def watching(self) -> int:
        return len(self._watches)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    # --- the loop -------------------------------------------------------------
    def _run(self) -> None:
        last_sweep = time.monotonic()
        while not self._halt.is_set():
            try:
                self._apply_changes()
                held = bool(self._held)
                ready = self._selector.select(timeout=0.01 if held else self.tick)
                for key, _ in ready:
                    if key.data is None:
                        self._drain_wake()
                        continue
                    try:
                        self._read(key.data)
                    except Exception:  # a bug with one socket must not stall the others
                        log.exception("%s: unexpected error reading a socket of %s — closing it", self.name,
                                      key.data.name)
                        self._end(key.data, "internal error while reading the connection")
                if self._held:
                    self._retry_held()
                now = time.monotonic()
                if now - last_sweep >= self.tick:
                    last_sweep = now
                    self._sweep(now)
            except Exception:  # a bug here would silence every link: log it and go on
                log.exception("%s: unexpected error in the read loop (continuing)", self.name)
                time.sleep(0.05)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _apply_changes(self) -> None:
        while self._changes:
            op, w = self._changes.popleft()
            if op == "add":
                if w.done:
                    continue
                self._watches[id(w)] = w
                try:
                    self._selector.register(w.sock, selectors.EVENT_READ, w)
                except (ValueError, KeyError, OSError) as exc:  # closed already, or a stale entry
                    self._forget(w)
                    self._close(w, f"cannot watch the socket ({exc})")
            else:
                self._forget(w)

    def _forget(self, w: Watch) -> None:
        self._watches.pop(id(w), None)
        self._held.pop(id(w), None)
        self._unregister(w)

    def _unregister(self, w: Watch) -> None:
        try:
            self._selector.unregister(w.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _read(self, w: Watch) -> None:
        if w.done:
            self._forget(w)
            return
        try:
            chunk = w.sock.recv(65536)
        except (TimeoutError, BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(w, f"connection lost ({exc})")
            return
        if not chunk:
            self._end(w, "connection closed by peer")
            return
        w.last_bytes = time.monotonic()
        events = w.decoder.feed(chunk)
        if events:
            self._hand_over(w, tuple(events))

    def _hand_over(self, w: Watch, events: tuple[framing.Event, ...]) -> None:
        if not w.slots.acquire(blocking=False):  # its mailbox is full: hold the socket
            w.held = events
            self._held[id(w)] = w
            self._unregister(w)
            return
        w.held = None
        if not w.deliver(events):
            self._end(w, "its link actor is gone")

    def _retry_held(self) -> None:
        for w in list(self._held.values()):
            if w.done:
                self._held.pop(id(w), None)
                continue
            if w.slots.acquire(blocking=False):
                events, w.held = w.held, None
                assert events is not None  # a watch is in _held only with its events
                del self._held[id(w)]
                w.last_bytes = time.monotonic()  # the pause was ours, not the peer's silence
                if not w.deliver(events):
                    self._end(w, "its link actor is gone")
                    continue
                try:
                    self._selector.register(w.sock, selectors.EVENT_READ, w)
                except (ValueError, KeyError, OSError) as exc:
                    self._end(w, f"connection lost ({exc})")

    def _sweep(self, now: float) -> None:
        """Drop peers that sent half a frame and then nothing (not while we hold their socket)."""
        for w in list(self._watches.values()):
            silent = now - w.last_bytes
            if not w.done and w.held is None and w.decoder.in_frame and silent >= w.frame_timeout:
                reason = f"the peer sent part of a frame and then nothing for {silent:.0f} s"
                log.warning("%s: %s — closing the connection", w.name, reason)
                self._end(w, reason)

    def _end(self, w: Watch, reason: str) -> None:
        self._forget(w)
        if not w.done:
            w.done = True
            self._close(w, reason)

    @staticmethod
    def _close(w: Watch, reason: str) -> None:
        try:
            w.closed(reason)
        except Exception:
            pass


_shared: SocketReader | None = None
_shared_lock = threading.Lock()


def shared_reader() -> SocketReader:
    """The process's one reader (started on first use; a daemon thread)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SocketReader()
        return _shared
