"""Tests for transport.framing (pure decoder) and transport.frame_client
(blocking client against a tiny threaded server on 127.0.0.1)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.frame_client import (
    FrameClient,
    FrameRejected,
    HandshakeRefused,
    PeerClosed,
)
from transport.framing import (
    ACK,
    ENQ,
    EOT,
    ETX,
    MAX_DATA,
    NACK,
    STX,
    BadFrame,
    Control,
    Event,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    Garbage,
    encode_frame,
    lrc,
)

# --------------------------------------------------------------------------- helpers


def frame_bytes(data: bytes) -> bytes:
    """Hand-built frame, independent of encode_frame, for known-vector tests."""
    x = 0
    for b in data:
        x ^= b
    return bytes([STX]) + data + bytes([ETX, x])


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(decoder: FrameDecoder, chunks: list[bytes], bound: int | None = None) -> list[Event]:
    """Feed chunks, checking the memory bound after every call."""
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
        if bound is not None:
            assert decoder.pending <= bound
    return events


def normalise(events: list[Event]) -> tuple[list[tuple[str, object]], int]:
    """Chunking-independent view: events without Garbage (kind, payload) + garbage total.

    BadFrame reasons are reduced to their first word (bad/oversized/cut).
    """
    out: list[tuple[str, object]] = []
    garbage = 0
    for ev in events:
        if isinstance(ev, Garbage):
            garbage += ev.count
        elif isinstance(ev, Frame):
            out.append(("frame", ev.data))
        elif isinstance(ev, Control):
            out.append(("control", ev.code))
        else:
            out.append(("bad", ev.reason.split()[0].rstrip(":")))
    return out, garbage


def reference_decode(stream: bytes, max_data: int) -> tuple[list[tuple[str, object]], int]:
    """Slow byte-by-byte model of the specified behaviour, for differential tests."""
    out: list[tuple[str, object]] = []
    garbage = 0
    state = "out"
    buf = bytearray()
    over = False
    for b in stream:
        if state == "out":
            if b == STX:
                state, buf, over = "data", bytearray(), False
            elif b in (ENQ, ACK, NACK, EOT):
                out.append(("control", b))
            else:
                garbage += 1
        elif state == "data":
            if b == STX:
                out.append(("bad", "oversized" if over else "cut"))
                buf, over = bytearray(), False
            elif b == ETX:
                state = "lrc"
            elif not over:
                buf.append(b)
                if len(buf) > max_data:
                    over, buf = True, bytearray()
        else:
            if over:
                out.append(("bad", "oversized"))
            elif lrc(bytes(buf)) == b:
                out.append(("frame", bytes(buf)))
            else:
                out.append(("bad", "bad"))
            state, buf, over = "out", bytearray(), False
    return out, garbage


# Payloads as the protocol would carry them: anything except raw STX/ETX.
payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x02", b"x").replace(b"\x03", b"y"))

# --------------------------------------------------------------------------- lrc / encode


def test_lrc_known_vectors() -> None:
    assert lrc(b"") == 0
    assert lrc(b"\x00") == 0
    assert lrc(b"\xff") == 0xFF
    assert lrc(b"\x01\x02\x04\x08") == 0x0F
    assert lrc(b"\xaa\xaa") == 0
    assert lrc(b"A") == 0x41
    assert lrc(b"AB") == 0x41 ^ 0x42 == 0x03
    assert lrc(b'{"a":1}') == 0x7B ^ 0x22 ^ 0x61 ^ 0x22 ^ 0x3A ^ 0x31 ^ 0x7D
    assert lrc(bytes(range(256))) == 0  # each bit set in exactly 128 bytes
    assert lrc(b"\x5a" * 1001) == 0x5A  # odd count
    assert lrc(b"\x5a" * 1000) == 0


@given(st.binary(max_size=5000))
def test_lrc_matches_naive_xor(data: bytes) -> None:
    x = 0
    for b in data:
        x ^= b
    assert lrc(data) == x


def test_encode_frame_layout() -> None:
    assert encode_frame(b"AB") == b"\x02AB\x03\x03"
    assert encode_frame(b"") == b"\x02\x03\x00"
    assert encode_frame(b'{"a":1}') == frame_bytes(b'{"a":1}')


def test_encode_frame_limits() -> None:
    assert encode_frame(b"a" * MAX_DATA)[1:-2] == b"a" * MAX_DATA
    with pytest.raises(FrameTooLarge):
        encode_frame(b"a" * (MAX_DATA + 1))
    with pytest.raises(FrameTooLarge):
        encode_frame(b"abcde", max_data=4)
    assert issubclass(FrameTooLarge, ValueError)
    for bad in (b"a\x02b", b"a\x03b"):
        with pytest.raises(ValueError):
            encode_frame(bad)


def test_json_dumps_never_contains_stx_etx() -> None:
    data = json.dumps({"s": "\x02\x03 é ✓"}, separators=(",", ":"), ensure_ascii=False).encode()
    assert b"\x02" not in data and b"\x03" not in data
    assert Frame(data) in FrameDecoder().feed(encode_frame(data))


# --------------------------------------------------------------------------- decoder basics


def test_single_frame_round_trip() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b'{"type":"heartbeat"}')) == [Frame(b'{"type":"heartbeat"}')]
    assert dec.pending == 0


def test_many_frames_in_one_chunk() -> None:
    datas = [f'{{"n":{i}}}'.encode() for i in range(500)]
    stream = b"".join(encode_frame(d) for d in datas)
    assert FrameDecoder().feed(stream) == [Frame(d) for d in datas]


def test_frame_byte_by_byte_and_lrc_in_next_chunk() -> None:
    data = b'{"cp_id":"CP1"}'
    wire = encode_frame(data)
    dec = FrameDecoder()
    events = feed_all(dec, [wire[i : i + 1] for i in range(len(wire))])
    assert events == [Frame(data)]
    dec2 = FrameDecoder()
    assert dec2.feed(wire[:-1]) == []
    assert dec2.pending == len(wire) - 1  # STX + DATA + ETX
    assert dec2.feed(wire[-1:]) == [Frame(data)]
    assert dec2.pending == 0


@pytest.mark.parametrize("lrc_value", [STX, ETX, ENQ, ACK, NACK, EOT, 0x00, 0xFF])
def test_lrc_byte_may_be_any_value(lrc_value: int) -> None:
    # Build a DATA whose LRC is exactly the given awkward byte.
    data = b"ab" + bytes([lrc_value ^ lrc(b"ab") ^ 0x40, 0x40])
    assert b"\x02" not in data and b"\x03" not in data
    assert lrc(data) == lrc_value
    wire = encode_frame(data)
    assert wire[-1] == lrc_value
    assert FrameDecoder().feed(wire + encode_frame(b"next")) == [Frame(data), Frame(b"next")]
    dec = FrameDecoder()
    assert dec.feed(wire[:-1]) == []
    assert dec.feed(wire[-1:] + encode_frame(b"next")) == [Frame(data), Frame(b"next")]


def test_bad_lrc_is_bad_frame_then_recovery() -> None:
    wire = bytearray(encode_frame(b"hello"))
    wire[-1] ^= 0x01
    events = FrameDecoder().feed(bytes(wire) + encode_frame(b"ok"))
    assert len(events) == 2
    assert isinstance(events[0], BadFrame) and "LRC" in events[0].reason
    assert events[1] == Frame(b"ok")


def test_corrupted_data_byte_is_bad_frame() -> None:
    wire = bytearray(encode_frame(b'{"k":"value"}'))
    wire[3] ^= 0x20
    [ev] = FrameDecoder().feed(bytes(wire))
    assert isinstance(ev, BadFrame)


def test_oversized_frame_reported_once_memory_bounded_then_next_frame() -> None:
    max_data = 1000
    dec = FrameDecoder(max_data=max_data)
    big = b"x" * 10_000
    wire = bytes([STX]) + big + bytes([ETX, lrc(big)]) + encode_frame(b"after")
    events: list[Event] = []
    for i in range(0, len(wire), 97):
        events.extend(dec.feed(wire[i : i + 97]))
        assert dec.pending <= max_data + 2
    bad = [e for e in events if isinstance(e, BadFrame)]
    assert len(bad) == 1 and "oversized" in bad[0].reason
    assert events[-1] == Frame(b"after")
    assert len(events) == 2


def test_frame_of_exactly_max_data_is_accepted() -> None:
    dec = FrameDecoder(max_data=10)
    assert dec.feed(encode_frame(b"a" * 10, max_data=10)) == [Frame(b"a" * 10)]
    [ev] = dec.feed(frame_bytes(b"a" * 11))
    assert isinstance(ev, BadFrame) and "oversized" in ev.reason


def test_oversized_default_limit_in_one_chunk() -> None:
    dec = FrameDecoder()
    big = b"y" * (MAX_DATA + 1)
    events = dec.feed(frame_bytes(big))
    assert len(events) == 1 and isinstance(events[0], BadFrame)
    assert dec.pending == 0


def test_oversized_never_terminated_stays_bounded() -> None:
    dec = FrameDecoder(max_data=64)
    assert dec.feed(b"\x02") == []
    for _ in range(200):
        assert dec.feed(b"z" * 1000) == []
        assert dec.pending <= 66
    # An STX finally cuts it: reported once as oversized, and the new frame works.
    events = dec.feed(encode_frame(b"fresh"))
    assert [type(e) for e in events] == [BadFrame, Frame]
    assert "oversized" in events[0].reason  # type: ignore[union-attr]
    assert events[1] == Frame(b"fresh")


def test_garbage_then_frame_one_garbage_event_per_feed() -> None:
    dec = FrameDecoder()
    events = dec.feed(b"hello world" + encode_frame(b"data") + b"\xff\xfe")
    assert events == [Frame(b"data"), Garbage(13)]
    assert dec.feed(b"junk") == [Garbage(4)]
    assert dec.feed(b"") == []


def test_stx_inside_a_frame_cuts_it_and_starts_a_new_one() -> None:
    dec = FrameDecoder()
    events = dec.feed(b"\x02partial" + encode_frame(b"whole"))
    assert len(events) == 2
    assert isinstance(events[0], BadFrame) and "STX" in events[0].reason
    assert events[1] == Frame(b"whole")
    # Split across chunks too.
    dec = FrameDecoder()
    assert dec.feed(b"\x02par") == []
    events = dec.feed(b"tial\x02wh")
    assert len(events) == 1 and isinstance(events[0], BadFrame)
    assert dec.feed(b"ole\x03" + bytes([lrc(b"whole")])) == [Frame(b"whole")]


def test_control_bytes_between_frames() -> None:
    stream = (
        bytes([ENQ])
        + encode_frame(b"one")
        + bytes([ACK, NACK])
        + encode_frame(b"two")
        + bytes([EOT])
    )
    assert FrameDecoder().feed(stream) == [
        Control(ENQ),
        Frame(b"one"),
        Control(ACK),
        Control(NACK),
        Frame(b"two"),
        Control(EOT),
    ]


def test_control_bytes_inside_data_are_data() -> None:
    data = bytes([ENQ, ACK, NACK, EOT]) + b"text"
    assert FrameDecoder().feed(encode_frame(data)) == [Frame(data)]


def test_lone_etx_outside_frame_is_garbage() -> None:
    assert FrameDecoder().feed(b"\x03\x06") == [Control(ACK), Garbage(1)]


def test_accepts_bytearray_and_memoryview() -> None:
    wire = encode_frame(b"mv")
    assert FrameDecoder().feed(bytearray(wire)) == [Frame(b"mv")]
    assert FrameDecoder().feed(memoryview(wire)) == [Frame(b"mv")]  # type: ignore[arg-type]


def test_64k_frame_decodes_fast() -> None:
    data = json.dumps({"blob": "é" * 20_000 + "a" * 25_000}, ensure_ascii=False).encode()
    assert 60_000 < len(data) <= MAX_DATA
    wire = encode_frame(data)
    dec = FrameDecoder()
    dec.feed(wire)  # warm-up
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        events = dec.feed(wire)
        best = min(best, time.perf_counter() - t0)
        assert events == [Frame(data)]
    assert best < 0.05, f"64 KiB frame took {best * 1000:.1f} ms"
    t0 = time.perf_counter()
    encode_frame(data)
    assert time.perf_counter() - t0 < 0.05


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=150, deadline=None)
@given(st.lists(payloads, max_size=20), st.data())
def test_round_trip_any_chunking(datas: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(d) for d in datas)
    cuts = data.draw(st.lists(st.integers(0, max(0, len(stream))), max_size=40))
    dec = FrameDecoder()
    events = feed_all(dec, split(stream, cuts), bound=MAX_DATA + 2)
    assert events == [Frame(d) for d in datas]
    assert dec.pending == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=8), st.data())
def test_round_trip_byte_by_byte(datas: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(d) for d in datas)
    assert feed_all(FrameDecoder(), [stream[i : i + 1] for i in range(len(stream))]) == [
        Frame(d) for d in datas
    ]


# Streams mixing real frames, control codes, stray STX/ETX and random bytes,
# so the fuzz actually reaches every decoder state.
_pieces = st.one_of(
    payloads.map(encode_frame),
    st.sampled_from([b"\x02", b"\x03", b"\x05", b"\x06", b"\x15", b"\x04"]),
    st.binary(max_size=40),
)
_streams = st.one_of(st.binary(max_size=2000), st.lists(_pieces, max_size=30).map(b"".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams, st.sampled_from([0, 1, 8, 64, MAX_DATA]), st.data())
def test_fuzz_never_raises_bounded_and_chunking_invariant(
    stream: bytes, max_data: int, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, max(0, len(stream))), max_size=30))
    dec = FrameDecoder(max_data=max_data)
    chunked = feed_all(dec, split(stream, cuts), bound=max_data + 2)
    whole = FrameDecoder(max_data=max_data).feed(stream)
    assert normalise(chunked) == normalise(whole) == reference_decode(stream, max_data)
    for ev in chunked:
        if isinstance(ev, Frame):
            assert len(ev.data) <= max_data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=20))
def test_at_most_one_garbage_event_per_feed(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    for chunk in chunks:
        events = dec.feed(chunk)
        assert sum(isinstance(e, Garbage) for e in events) <= 1
        assert all(e.count > 0 for e in events if isinstance(e, Garbage))


# --------------------------------------------------------------------------- FrameClient

WAIT = 5.0  # upper bound for any wait in these tests; normal runs take milliseconds


class Peer:
    """Server side of one accepted connection, with decoded-event helpers."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.decoder = FrameDecoder()
        self.events: deque[Event] = deque()
        self.frames: list[bytes] = []  # every frame received, retransmissions included
        self.controls: list[int] = []  # every control code received

    def next_event(self) -> Event | None:
        """Next non-garbage event, or None at EOF."""
        while not self.events:
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            for ev in self.decoder.feed(chunk):
                if isinstance(ev, Frame):
                    self.frames.append(ev.data)
                elif isinstance(ev, Control):
                    self.controls.append(ev.code)
                if not isinstance(ev, Garbage):
                    self.events.append(ev)
        return self.events.popleft()

    def expect(self, kind: type, code: int | None = None) -> Event:
        ev = self.next_event()
        assert isinstance(ev, kind), f"expected {kind.__name__}, got {ev!r}"
        if code is not None:
            assert isinstance(ev, Control) and ev.code == code, ev
        return ev

    def send(self, raw: bytes | int) -> None:
        self.conn.sendall(bytes([raw]) if isinstance(raw, int) else raw)

    def accept_session(self) -> None:
        self.expect(Control, ENQ)
        self.send(ACK)

    def drain_to_eof(self) -> None:
        while self.next_event() is not None:
            pass


class ScriptedServer:
    """Accepts one connection on 127.0.0.1:<ephemeral> and runs ``script`` on it in a thread."""

    def __init__(self, script: Callable[[Peer], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port: int = self.listener.getsockname()[1]
        self.peer: Peer | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scripted-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(WAIT)
                self.peer = Peer(conn)
                self.script(self.peer)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc
        finally:
            self.listener.close()
            self.done.set()

    def finish(self) -> Peer:
        self.thread.join(timeout=WAIT + 1)
        assert not self.thread.is_alive(), "server script did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.peer is not None
        return self.peer


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Peer], None]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Callable[[Peer], None]) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.thread.join(timeout=WAIT + 1)


def test_handshake_ack_send_and_eot_on_close(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.expect(Frame)
        peer.send(ACK)
        peer.expect(Control, EOT)
        assert peer.next_event() is None

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT, name="CENTRAL") as client:
        client.send_json({"type": "heartbeat", "cp_id": "CP1", "engine_ok": True})
        assert client.transmissions == 1
    peer = server.finish()
    assert json.loads(peer.frames[0]) == {"type": "heartbeat", "cp_id": "CP1", "engine_ok": True}
    assert peer.frames[0] == b'{"type":"heartbeat","cp_id":"CP1","engine_ok":true}'


def test_handshake_nack_raises_handshake_refused(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.expect(Control, ENQ)
        peer.send(NACK)

    server = serve(script)
    with pytest.raises(HandshakeRefused) as info:
        FrameClient.connect("127.0.0.1", server.port, timeout=WAIT, name="CENTRAL")
    assert str(info.value) == f"CENTRAL at 127.0.0.1:{server.port} refused the session (NACK)"
    server.finish()


def test_handshake_close_raises_handshake_refused(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.expect(Control, ENQ)  # then close without answering

    server = serve(script)
    with pytest.raises(HandshakeRefused, match="refused the session"):
        FrameClient.connect("127.0.0.1", server.port, timeout=WAIT)
    server.finish()


def test_handshake_timeout(serve: Callable[..., ScriptedServer]) -> None:
    release = threading.Event()

    def script(peer: Peer) -> None:
        peer.expect(Control, ENQ)
        release.wait(WAIT)  # never answer while the client waits

    server = serve(script)
    with pytest.raises(TimeoutError, match="did not answer ENQ"):
        FrameClient.connect("127.0.0.1", server.port, timeout=0.2)
    release.set()
    server.finish()


def test_nack_twice_then_ack_succeeds_after_three_transmissions(
    serve: Callable[..., ScriptedServer],
) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        for answer in (NACK, NACK, ACK):
            peer.expect(Frame)
            peer.send(answer)
        peer.drain_to_eof()

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        client.send(b'{"n":1}', retries=3, ack_timeout=WAIT)
        assert client.transmissions == 3
    peer = server.finish()
    assert peer.frames == [b'{"n":1}'] * 3


def test_nack_forever_raises_frame_rejected_after_four_transmissions(
    serve: Callable[..., ScriptedServer],
) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        while (ev := peer.next_event()) is not None:
            if isinstance(ev, Frame):
                peer.send(NACK)

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        with pytest.raises(FrameRejected, match="4 times"):
            client.send(b'{"n":2}', retries=3, ack_timeout=WAIT)
        assert client.transmissions == 4
    peer = server.finish()
    assert len(peer.frames) == 1 + 3


def test_ack_timeout_raises_timeout_error(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.drain_to_eof()  # swallow frames, never answer

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT, name="ENGINE") as client:
        with pytest.raises(TimeoutError, match=r"ENGINE at .* did not ACK the frame within 0.2 s"):
            client.send(b'{"n":3}', ack_timeout=0.2)
    peer = server.finish()
    assert peer.frames == [b'{"n":3}']


def test_recv_frame_from_server_is_acked(serve: Callable[..., ScriptedServer]) -> None:
    msg = {"type": "authorize_supply", "correlation_id": "c-1", "session_id": "s-1"}

    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.send(encode_frame(json.dumps(msg).encode()))
        peer.expect(Control, ACK)
        peer.send(encode_frame(b'{"type":"resume_cp"}'))
        peer.expect(Control, ACK)
        peer.drain_to_eof()

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        assert client.recv_json(timeout=WAIT) == msg
        assert client.recv(timeout=WAIT) == b'{"type":"resume_cp"}'
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.05)
    peer = server.finish()
    assert peer.controls == [ENQ, ACK, ACK, EOT]


def test_bad_frames_from_server_are_nacked(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        corrupted = bytearray(encode_frame(b'{"a":1}'))
        corrupted[-1] ^= 0xFF
        peer.send(bytes(corrupted))
        peer.expect(Control, NACK)
        peer.send(encode_frame(b"not json"))
        peer.expect(Control, NACK)
        peer.send(encode_frame(b'{"a":2}'))
        peer.expect(Control, ACK)
        peer.drain_to_eof()

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        assert client.recv_json(timeout=WAIT) == {"a": 2}
        assert client.bad_frames == 2
    server.finish()


def test_frame_arriving_while_waiting_for_ack_is_acked_and_queued(
    serve: Callable[..., ScriptedServer],
) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.expect(Frame)
        # Our own frame first, then the ACK for theirs, in the same write.
        peer.send(encode_frame(b'{"type":"stop_cp"}') + bytes([ACK]))
        peer.expect(Control, ACK)
        peer.drain_to_eof()

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        client.send_json({"type": "heartbeat"}, ack_timeout=WAIT)
        assert client.recv_json(timeout=0) == {"type": "stop_cp"}  # already queued
    server.finish()


def test_send_raw_and_peer_eot(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.expect(BadFrame)
        peer.send(NACK)
        peer.send(EOT)

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        client.send_raw(b"\x02{}\x03\x00")  # wrong LRC on purpose
        with pytest.raises(PeerClosed):
            client.recv(timeout=WAIT)
        assert client.peer_closed
    server.finish()


def test_send_rejects_oversized_before_writing(serve: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.accept_session()
        peer.drain_to_eof()

    server = serve(script)
    with FrameClient.connect("127.0.0.1", server.port, timeout=WAIT) as client:
        with pytest.raises(FrameTooLarge):
            client.send(b"a" * (MAX_DATA + 1))
        assert client.transmissions == 0
    peer = server.finish()
    assert peer.frames == []
