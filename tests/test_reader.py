"""SocketReader: one thread reads many real sockets, with back-pressure and half-frame drops."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tests.waiting import wait_until
from transport import framing
from transport.reader import SocketReader, Watch


class Sink:
    """Collects what the reader hands over, like a link actor's mailbox."""

    def __init__(self) -> None:
        self.batches: list[tuple[framing.Event, ...]] = []
        self.closed: list[str] = []
        self.lock = threading.Lock()

    def deliver(self, events: tuple[framing.Event, ...]) -> bool:
        with self.lock:
            self.batches.append(events)
        return True

    def frames(self) -> list[bytes]:
        with self.lock:
            return [e.data for b in self.batches for e in b if isinstance(e, framing.Frame)]


def watch(sock: socket.socket, sink: Sink, slots: int = 64, frame_timeout: float = 10.0) -> Watch:
    sock.setblocking(False)
    return Watch(sock, framing.FrameDecoder(), threading.BoundedSemaphore(slots), sink.deliver,
                 sink.closed.append, frame_timeout)


@pytest.fixture
def reader() -> Any:
    r = SocketReader(name="test-reader", tick=0.05)
    yield r
    r.stop()


def test_one_thread_reads_many_sockets(reader: SocketReader) -> None:
    before = {t.ident for t in threading.enumerate()}
    pairs = [socket.socketpair() for _ in range(200)]
    sinks = [Sink() for _ in pairs]
    for (ours, _), sink in zip(pairs, sinks, strict=True):
        reader.add(watch(ours, sink))
    for i, (_, theirs) in enumerate(pairs):
        theirs.sendall(framing.encode_frame(f'{{"n": {i}}}'.encode()))
    wait_until(lambda: all(s.frames() for s in sinks), what="a frame on every socket")
    assert [s.frames() for s in sinks] == [[f'{{"n": {i}}}'.encode()] for i in range(200)]
    # No thread per socket: no thread started since (threads of earlier tests may end meanwhile).
    assert {t.ident for t in threading.enumerate()} - before == set()
    for _ours, theirs in pairs:
        theirs.close()
    wait_until(lambda: all(s.closed == ["connection closed by peer"] for s in sinks), what="every EOF reported once")
    wait_until(lambda: reader.watching == 0)
    for ours, _ in pairs:
        ours.close()


def test_a_full_mailbox_holds_that_socket_only(reader: SocketReader) -> None:
    slow_ours, slow_theirs = socket.socketpair()
    fast_ours, fast_theirs = socket.socketpair()
    slow, fast = Sink(), Sink()
    slow_watch = watch(slow_ours, slow, slots=1)
    reader.add(slow_watch)
    reader.add(watch(fast_ours, fast))
    slow_theirs.sendall(framing.encode_frame(b'{"n": 1}'))
    wait_until(lambda: slow.frames() == [b'{"n": 1}'])
    slow_theirs.sendall(framing.encode_frame(b'{"n": 2}'))  # no slot free: held, not delivered
    wait_until(lambda: slow_watch.held is not None, what="the second batch held")
    fast_theirs.sendall(framing.encode_frame(b'{"n": 9}'))
    wait_until(lambda: fast.frames() == [b'{"n": 9}'], what="the other socket unaffected")
    assert slow.frames() == [b'{"n": 1}']
    slow_watch.slots.release()  # the actor handled the first batch
    reader.slot_freed()
    wait_until(lambda: slow.frames() == [b'{"n": 1}', b'{"n": 2}'], what="the held batch delivered")
    slow_watch.slots.release()
    slow_theirs.sendall(framing.encode_frame(b'{"n": 3}'))
    wait_until(lambda: slow.frames()[-1:] == [b'{"n": 3}'], what="reading resumed")
    for s in (slow_ours, slow_theirs, fast_ours, fast_theirs):
        s.close()


def test_half_a_frame_then_silence_is_dropped(reader: SocketReader) -> None:
    ours, theirs = socket.socketpair()
    sink = Sink()
    reader.add(watch(ours, sink, frame_timeout=0.3))
    theirs.sendall(bytes([framing.STX]) + b'{"type": "heart')
    wait_until(lambda: sink.closed, timeout=5, what="the half frame dropped")
    assert "part of a frame" in sink.closed[0]
    ours.close()
    theirs.close()


def test_removed_socket_is_not_read_and_its_number_can_be_reused(reader: SocketReader) -> None:
    ours, theirs = socket.socketpair()
    sink = Sink()
    w = watch(ours, sink)
    reader.add(w)
    reader.remove(w)
    ours.close()  # the next socket may get the same descriptor number
    again_ours, again_theirs = socket.socketpair()
    again = Sink()
    reader.add(watch(again_ours, again))
    again_theirs.sendall(framing.encode_frame(b'{"n": 5}'))
    wait_until(lambda: again.frames() == [b'{"n": 5}'])
    assert sink.batches == [] and sink.closed == []
    for s in (theirs, again_ours, again_theirs):
        s.close()


def test_a_held_socket_is_not_mistaken_for_a_silent_half_frame(reader: SocketReader) -> None:
    """While we hold a socket (its actor is busy) the peer's silence is ours: no frame timeout."""
    import time

    ours, theirs = socket.socketpair()
    sink = Sink()
    w = watch(ours, sink, slots=1, frame_timeout=0.3)
    reader.add(w)
    theirs.sendall(framing.encode_frame(b'{"n": 1}'))
    wait_until(lambda: sink.frames() == [b'{"n": 1}'])
    third = framing.encode_frame(b'{"n": 3}')
    theirs.sendall(framing.encode_frame(b'{"n": 2}') + third[:4])  # a frame and the start of the next
    wait_until(lambda: w.held is not None, what="the second batch held")
    time.sleep(0.8)  # well past the frame timeout, with the socket held by us (a window, not a wait)
    assert sink.closed == []
    w.slots.release()
    reader.slot_freed()
    wait_until(lambda: sink.frames()[-1:] == [b'{"n": 2}'], what="the held frame delivered")
    w.slots.release()
    theirs.sendall(third[4:])
    wait_until(lambda: sink.frames()[-1:] == [b'{"n": 3}'], what="the rest of the frame read")
    assert sink.closed == []
    ours.close()
    theirs.close()
