"""Framed socket actors over real loopback sockets: the happy path and abuse."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import pytest

from actors.runtime import Directory, SupervisedActor, Supervision
from supervisors.supervisor import ChildSpec, StartChild, Supervisor, spawner, start_tree
from tests.frame_client import FrameClient
from tests.waiting import wait_until
from transport import framing, protocol
from transport.broker import free_port
from transport.client_link import ClientLink
from transport.link import FrameIn, LinkDown, LinkOptions, LinkStats, LinkUp, Send
from transport.listener import Listener, ListenerConnections, ListenerPort


class Owner(SupervisedActor):
    """Records what its links tell it; echoes heartbeats back as ErrorMessage."""

    def __init__(self, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.events: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case LinkUp() | LinkDown():
                self.events.append(message)
            case FrameIn(link, msg):
                self.events.append(message)
                if isinstance(msg, protocol.Heartbeat):
                    link.tell(Send(protocol.ErrorMessage(reason=f"echo {msg.cp_id}")))
            case "events":
                return list(self.events)
        return None


def frames_in(directory: Directory) -> list[Any]:
    return [e.message for e in directory.get("owner").ask("events") if isinstance(e, FrameIn)]


@pytest.fixture
def server() -> tuple[Directory, int]:
    directory = Directory()
    tree = start_tree("t", [ChildSpec("owner", Owner),
                            ChildSpec("conns", Supervisor, ("conns",), {"directory": directory})],
                      directory=directory)
    spawn = spawner(directory.get("conns"))
    tree.ask(StartChild(ChildSpec(
        "listener", Listener, ("127.0.0.1", 0, "owner", directory, spawn),
        {"max_connections": 50, "options": LinkOptions(ack_timeout=0.5, max_garbage=4096)})))
    port = directory.get("listener").ask(ListenerPort())
    yield directory, port
    tree.stop()


def heartbeat(cp: str = "CP1") -> dict[str, Any]:
    return protocol.to_dict(protocol.Heartbeat(cp_id=cp, engine_ok=True))


def raw_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(bytes([framing.ENQ]))
    assert s.recv(1) == bytes([framing.ACK])
    return s


def test_round_trip_and_reply(server) -> None:
    directory, port = server
    with FrameClient.connect("127.0.0.1", port, name="CENTRAL") as client:
        client.send_json(heartbeat())
        wait_until(lambda: frames_in(directory) == [protocol.Heartbeat(cp_id="CP1", engine_ok=True)])
        assert client.recv_json(timeout=5) == {"type": "error", "reason": "echo CP1", "correlation_id": None}
    wait_until(lambda: any(isinstance(e, LinkDown) for e in directory.get("owner").ask("events")), what="LinkDown")


def test_bad_lrc_bad_json_oversized_are_nacked_and_the_link_survives(server) -> None:
    directory, port = server
    s = raw_session(port)
    good = framing.encode_frame(protocol.encode(protocol.Heartbeat(cp_id="CP2", engine_ok=False)))
    s.sendall(good[:-1] + bytes([good[-1] ^ 0xFF]))  # bad LRC
    assert s.recv(1) == bytes([framing.NACK])
    s.sendall(framing.encode_frame(b"{not json"))
    assert s.recv(1) == bytes([framing.NACK])
    s.sendall(bytes([framing.STX]) + b"x" * (framing.MAX_DATA + 10) + bytes([framing.ETX, 0]))
    assert s.recv(1) == bytes([framing.NACK])
    s.sendall(good)
    assert s.recv(1) == bytes([framing.ACK])
    wait_until(lambda: protocol.Heartbeat(cp_id="CP2", engine_ok=False) in frames_in(directory))
    s.close()


def test_json_nested_too_deeply_is_nacked_not_a_crash(server) -> None:
    """json.loads raises RecursionError (not ValueError) on ~30,000 "[": the link must NACK it."""
    directory, port = server
    s = raw_session(port)
    for data in (b"[" * 30000 + b"]" * 30000, b'{"a":' * 5000 + b"1" + b"}" * 5000):
        s.sendall(framing.encode_frame(data))
        assert s.recv(1) == bytes([framing.NACK])
    good = framing.encode_frame(protocol.encode(protocol.Heartbeat(cp_id="DEEP", engine_ok=True)))
    s.sendall(good)
    assert s.recv(1) == bytes([framing.ACK])  # the same connection still works
    wait_until(lambda: protocol.Heartbeat(cp_id="DEEP", engine_ok=True) in frames_in(directory))
    s.close()


def test_valid_json_but_bad_message_gets_ack_and_an_error_reply(server) -> None:
    _, port = server
    with FrameClient.connect("127.0.0.1", port) as client:
        client.send_json({"type": "register_request", "correlation_id": "c9"})  # cp_id missing
        reply = client.recv_json(timeout=5)
        assert reply["type"] == "error" and reply["correlation_id"] == "c9" and "cp_id" in reply["reason"]


def test_unanswered_frame_is_resent_then_link_dropped(server) -> None:
    _directory, port = server
    s = raw_session(port)
    s.sendall(framing.encode_frame(protocol.encode(protocol.Heartbeat(cp_id="CP3", engine_ok=True))))
    assert s.recv(1) == bytes([framing.ACK])
    # we never ACK the echo: it is sent 1 + 3 times, then the link gives up
    decoder, frames = framing.FrameDecoder(), []
    s.settimeout(5)
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        frames += [e for e in decoder.feed(chunk) if isinstance(e, framing.Frame)]
    assert len(frames) == 4


def test_garbage_half_frames_and_connection_churn_leave_the_server_serving(server) -> None:
    directory, port = server
    # pure garbage: dropped after max_garbage bytes
    g = raw_session(port)
    g.sendall(b"\xaa" * 10_000)
    g.settimeout(5)
    assert g.recv(100) == b""
    # half a frame, then silence: harmless
    h = raw_session(port)
    h.sendall(bytes([framing.STX]) + b'{"type": "heart')
    # 300 connections opened and dropped, with and without a handshake
    for i in range(300):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            c.sendall(bytes([framing.ENQ]))
        c.close()
    with FrameClient.connect("127.0.0.1", port) as client:
        client.send_json(heartbeat("CP4"))
        assert client.recv_json(timeout=5)["reason"] == "echo CP4"
    h.close()
    wait_until(lambda: directory.get("listener").ask(ListenerConnections()) == 0, what="all connection actors gone")


def test_half_a_frame_then_silence_is_dropped_after_the_frame_timeout() -> None:
    """A peer that starts a frame and goes silent must not hold a connection slot forever
    (an Engine accepts only 4 connections)."""
    directory = Directory()
    tree = start_tree("t", [ChildSpec("owner", Owner),
                            ChildSpec("conns", Supervisor, ("conns",), {"directory": directory})],
                      directory=directory)
    try:
        tree.ask(StartChild(ChildSpec(
            "listener", Listener, ("127.0.0.1", 0, "owner", directory, spawner(directory.get("conns"))),
            {"options": LinkOptions(io_timeout=0.2, frame_timeout=0.6)})))
        port = directory.get("listener").ask(ListenerPort())
        idle = raw_session(port)  # a session with nothing in flight is not a half frame: it stays
        h = raw_session(port)
        h.sendall(bytes([framing.STX]) + b'{"type": "heart')
        h.settimeout(5)
        assert h.recv(100) == b""  # closed by the server
        wait_until(lambda: any(isinstance(e, LinkDown) and "part of a frame" in e.reason
                               for e in directory.get("owner").ask("events")), what="LinkDown with the reason")
        assert directory.get("listener").ask(ListenerConnections()) == 1
        idle.close()
    finally:
        tree.stop()


def test_full_listener_answers_nack(server) -> None:
    directory, port = server
    clients = [FrameClient.connect("127.0.0.1", port) for _ in range(50)]
    wait_until(lambda: directory.get("listener").ask(ListenerConnections()) == 50)
    from tests.frame_client import HandshakeRefused

    with pytest.raises(HandshakeRefused):
        FrameClient.connect("127.0.0.1", port)
    for c in clients:
        c.close()


class CrashableLink(ClientLink):
    def on_other(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("injected")
        return super().on_other(message)


def test_client_link_retries_until_the_server_appears_and_restarts_after_a_crash(caplog, stop_at_end) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    port = free_port()
    directory = Directory()
    tree = start_tree("t", [
        ChildSpec("owner", Owner),
        ChildSpec("conns", Supervisor, ("conns",), {"directory": directory}),
        ChildSpec("link", CrashableLink, ("127.0.0.1", port, "owner", directory),
                  {"peer_name": "CENTRAL", "retry_base": 0.05, "retry_max": 0.2}),
    ], directory=directory, backoff_base=0.01)
    stop_at_end(tree)
    wait_until(lambda: any("Cannot reach CENTRAL at 127.0.0.1" in r.getMessage() for r in caplog.records),
               what="a plain retry message")
    server_dir = directory
    tree.ask(StartChild(ChildSpec(
        "listener", Listener, ("127.0.0.1", port, "owner", server_dir, spawner(directory.get("conns"))))))
    ups = lambda: [e for e in directory.get("owner").ask("events") if isinstance(e, LinkUp)]  # noqa: E731
    wait_until(lambda: len(ups()) >= 2, what="both ends up")  # client side and server side
    link = directory.get("link")
    link.tell(Send(protocol.Heartbeat(cp_id="CP5", engine_ok=True)))
    wait_until(lambda: protocol.Heartbeat(cp_id="CP5", engine_ok=True) in frames_in(directory))
    link.tell("crash")
    wait_until(lambda: directory.get("link") not in (None, link), what="supervisor restarted the link")
    wait_until(lambda: len(ups()) >= 4, what="reconnected after the restart")
    directory.get("link").tell(Send(protocol.Heartbeat(cp_id="CP6", engine_ok=True)))
    wait_until(lambda: protocol.Heartbeat(cp_id="CP6", engine_ok=True) in frames_in(directory))
    assert directory.get("link").ask(LinkStats())["connected"]
    tree.stop()


class DownsOnly(Owner):
    """Keeps only LinkDown (a flood of frames would grow the list); echoes heartbeats like Owner."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FrameIn) and not isinstance(message.message, protocol.Heartbeat):
            return None
        return super().on_receive(message)


def _tcp_pair(server_sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(server end, client end) of a real loopback connection; the client's window is small, and the
    server's send buffer too if asked (so a peer that never reads fills it within a few KB)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(srv.getsockname())
        server_end, _ = srv.accept()
    if server_sndbuf:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    return server_end, client


def test_peers_that_never_read_do_not_hold_up_the_others_and_are_dropped() -> None:
    """An attack on the pooled connections: a few peers flood frames and never read, so the 1-byte
    ACKs fill their sockets' buffers. All connections share a couple of threads, and a write that
    waited for room would hold one of them: the honest peer must still get its ACKs at once, and
    the flooders are dropped once they read nothing for ``io_timeout``."""
    from transport.connection import ServerConnection

    directory = Directory()
    owner = DownsOnly.start()
    directory.register("owner", owner)
    frame = framing.encode_frame(json.dumps(protocol.to_dict(protocol.FaultCleared(cp_id="X"))).encode())
    options = LinkOptions(io_timeout=2.0)
    flooders, links = [], []
    try:
        for i in range(4):  # more than the pool's threads
            server_end, client = _tcp_pair(server_sndbuf=4096)
            client.settimeout(0.05)
            flooders.append(client)
            links.append(ServerConnection.start(server_end, f"flooder-{i}", "owner", directory, options=options))
        server_end, honest = _tcp_pair()
        links.append(ServerConnection.start(server_end, "honest", "owner", directory, options=options))
        honest.settimeout(5)
        slowest = 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for s in flooders:
                try:
                    s.sendall(frame * 200)
                except OSError:
                    pass  # our own side is full too, or we were dropped: both fine
            t0 = time.monotonic()
            honest.sendall(framing.encode_frame(json.dumps(heartbeat("OK")).encode()))
            assert honest.recv(1) == bytes([framing.ACK])
            slowest = max(slowest, time.monotonic() - t0)
            echo = framing.FrameDecoder(framing.MAX_DATA)  # the owner's echo: read it and ACK it
            while not any(isinstance(e, framing.Frame) for e in echo.feed(honest.recv(4096))):
                pass
            honest.sendall(bytes([framing.ACK]))
            if sum(isinstance(e, LinkDown) for e in owner.ask("events")) >= 4:
                break
        downs = [e for e in owner.ask("events") if isinstance(e, LinkDown)]
        assert sorted(e.peer for e in downs) == [f"flooder-{i}" for i in range(4)], downs
        assert all("read nothing" in e.reason or "not reading" in e.reason for e in downs), downs
        assert slowest < 1.0, f"the honest peer waited {slowest:.2f} s for an ACK"
        assert links[-1].is_alive()
    finally:
        for s in flooders:
            s.close()
        for ref in links:
            ref.stop()
        owner.stop()
