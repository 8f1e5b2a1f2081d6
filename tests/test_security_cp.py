"""CP authentication to Central, sealed Monitor↔Central frames, revocation, the audit (issue #11).

Central runs in-process in registry mode (the default) on a real SQLite file,
with a real broker; CPs are registered directly in its registry tables. The
genuine CPs are real Engines and Monitors with their credential files; the
attackers are raw sockets speaking the wire protocol from their own loopback
address (127.0.0.X), as a stranger on the network would. Nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.central import CentralStatus, EnrollDriver, ExportAudit
from actors.console import ConsoleLine
from actors.monitor import MonitorStatus, ReAuthenticate
from actors.panel import LastSnapshot
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.engine_system import start_engine
from supervisors.monitor_system import MonitorConfig, start_monitor
from supervisors.system import RunningSystem
from tests import fault_matrix
from tests.crash import crash
from tests.frame_client import FrameClient, HandshakeRefused, PeerClosed
from tests.test_engine import engine_config
from tests.test_engine import status as engine_status
from tests.waiting import wait_until
from transport import framing, protocol, security
from transport.broker import KafkaSettings, free_port
from transport.listener import ListenerConnections, ListenerPort

pytestmark = pytest.mark.broker

SECRETS = {"MAD1": security.new_secret(), "MAD2": security.new_secret(), "MAD3": security.new_secret()}
VERIFIERS = {cp: security.verifier("cp", cp, s) for cp, s in SECRETS.items()}


# --------------------------------------------------------------------------- a raw client
class RawCp:
    """A client written from docs/protocol.md on a raw socket, connecting from ``source``
    (its own loopback address: failed attempts count per address)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(bytes([framing.ENQ]))
        answer = sock.recv(1)
        if answer != bytes([framing.ACK]):
            sock.close()
            raise HandshakeRefused(f"Central answered {answer!r} to ENQ")
        self.client = FrameClient(sock, f"127.0.0.1:{port}", name="CENTRAL")
        self.seal: security.LinkSeal | None = None
        self.raw: list[dict[str, Any]] = []  # every frame received, as it came

    def send(self, msg: protocol.Message, *, plain: bool = False) -> None:
        self.client.send(protocol.encode(msg if plain or self.seal is None else self.seal.seal(msg)))

    def recv(self, timeout: float = 5.0) -> protocol.Message:
        data = self.client.recv(timeout)
        self.raw.append(json.loads(data))
        msg = protocol.decode(data)
        return self.seal.open(msg) if self.seal is not None and isinstance(msg, protocol.Sealed) else msg

    def expect(self, kind: type, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.05, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    def login(self, cp_id: str, verifier: bytes) -> protocol.AuthResult:
        """The whole authentication; with the right verifier the client then seals like a Monitor."""
        corr = uuid.uuid4().hex
        self.send(protocol.AuthRequest(cp_id=cp_id, correlation_id=corr))
        first = self.expect(protocol.AuthChallenge | protocol.AuthResult)
        if isinstance(first, protocol.AuthResult):
            return first
        self.send(protocol.AuthProof(correlation_id=corr, cp_id=cp_id,
                                     proof=security.proof(verifier, security.PURPOSE_CENTRAL, cp_id, first.nonce)))
        result: protocol.AuthResult = self.expect(protocol.AuthResult)
        if result.status == "accepted":
            assert result.key_id and result.wrapped_key
            key = security.unwrap_key(verifier, cp_id, first.nonce, result.key_id, result.wrapped_key)
            self.seal = security.LinkSeal(cp_id, result.key_id, key, me="monitor", peer="central")
        return result

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.client.recv(timeout=max(0.05, deadline - time.monotonic()))
            except PeerClosed:
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.client.close()


class Tap:
    """A TCP relay between a Monitor and Central that keeps a copy of every byte, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.to_central = bytearray()
        self.to_monitor = bytearray()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, self.to_central), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, self.to_monitor), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, copy: bytearray) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    copy += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def frames(self, direction: bytearray) -> list[dict[str, Any]]:
        with self._lock:
            data = bytes(direction)
        events = framing.FrameDecoder().feed(data)
        return [json.loads(e.data) for e in events if isinstance(e, framing.Frame)]

    def close(self) -> None:
        for s in self._socks:
            s.close()


# --------------------------------------------------------------------------- the network
class Net:
    """One secured Central, and the real CPs a test starts against it."""

    def __init__(self, kafka: KafkaSettings, tmp: Path, **central: Any) -> None:
        self.kafka, self.tmp = kafka, tmp
        self.db = str(tmp / "central.db")
        with Repository(self.db) as repo:
            for i, (cp, verifier) in enumerate(VERIFIERS.items()):
                repo.register("cp", cp, verifier, location=f"Madrid {i}", price_eur_kwh=0.40)
        options: dict[str, Any] = dict(auth_timeout=1.0, life_timeout=2.5)
        options.update(central)
        self.config = CentralSystemConfig(port=0, host="127.0.0.1", broker=kafka.bootstrap, db_path=self.db,
                                          topic_prefix=kafka.topic_prefix, group_id=f"c-{uuid.uuid4().hex[:6]}",
                                          **options)
        self.central = start_central(self.config)
        self.port: int = self.central.ask("monitor-listener", ListenerPort())
        self.systems: list[RunningSystem] = []

    def credential(self, cp_id: str, secret: str | None = None) -> str:
        path = self.tmp / f"{cp_id}-{uuid.uuid4().hex[:4]}.cred"
        security.write_credential(path, "cp", cp_id, secret or SECRETS[cp_id])
        return str(path)

    def cp(self, cp_id: str, *, central_port: int | None = None, secret: str | None = None,
           **monitor: Any) -> tuple[RunningSystem, RunningSystem]:
        """A real Engine and Monitor of ``cp_id``, both with its credential."""
        cred = self.credential(cp_id, secret)
        engine_port = free_port()
        engine = start_engine(engine_config(self.kafka, self.tmp / f"{cp_id}.journal", listen_port=engine_port,
                                            cp_id=cp_id, credential_file=cred))
        self.systems.append(engine)
        options: dict[str, Any] = dict(heartbeat_interval=0.2, health_interval=0.1, health_timeout=0.5,
                                       register_retry=0.5, retry_base=0.05, retry_max=0.2)
        options.update(monitor)
        mon = start_monitor(MonitorConfig(engine_host="127.0.0.1", engine_port=engine_port, central_host="127.0.0.1",
                                          central_port=central_port or self.port, cp_id=cp_id,
                                          credential_file=cred, **options))
        self.systems.append(mon)
        return engine, mon

    def status(self, cp_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.central.ask("central", CentralStatus())[cp_id]
        return result

    def active(self, cp_id: str, timeout: float = 10.0) -> None:
        wait_until(lambda: self.status(cp_id)["state"] == "ACTIVE", timeout=timeout, what=f"{cp_id} ACTIVE")

    def audit(self, event: str) -> list[Any]:
        with Repository(self.db) as repo:
            return repo.recent_audit(200, event=event)

    def key_state(self, key_id: str) -> str:
        with sqlite3.connect(self.db) as conn:
            (state,) = conn.execute("SELECT state FROM cp_keys WHERE key_id = ?", (key_id,)).fetchone()
        return str(state)

    def tell_central(self, message: Any) -> None:
        ref = self.central.get("central")
        assert ref is not None
        ref.tell(message)

    def messages(self) -> tuple[str, ...]:
        snap = self.central.ask("panel", LastSnapshot())
        return tuple(m.text for m in snap.messages) if snap else ()

    def stop(self) -> None:
        for s in reversed(self.systems):
            s.stop()
        self.central.stop()


@pytest.fixture
def net(kafka_settings: KafkaSettings, tmp_path: Path) -> Iterator[Net]:
    n = Net(kafka_settings, tmp_path)
    yield n
    n.stop()


def mstatus(monitor: RunningSystem) -> dict[str, Any]:
    result: dict[str, Any] = monitor.ask("monitor", MonitorStatus())
    return result


# --------------------------------------------------------------------------- tests
def test_a_genuine_monitor_authenticates_and_every_frame_after_it_is_sealed(net: Net) -> None:
    tap = Tap(net.port)
    try:
        engine, monitor = net.cp("MAD1", central_port=tap.port)
        net.active("MAD1")
        st = mstatus(monitor)
        assert st["authenticated"] and st["engine_paired"] and st["engine_sealed"]
        # The Engine got Central's key over the paired link (in hello) and seals its records with it
        wait_until(lambda: engine_status(engine)["key_id"] == st["key_id"], what="the Engine has Central's key")
        ok = net.audit("login_ok")
        assert [(r.subject, r.address) for r in ok] == [("MAD1", "127.0.0.1")]
        issued = net.audit("key_issued")
        assert json.loads(issued[0].params)["key_id"] == st["key_id"] and net.key_state(st["key_id"]) == "current"
        # On the wire: the authentication in clear, then nothing but sealed envelopes, both ways
        wait_until(lambda: len(tap.frames(tap.to_central)) >= 5, what="heartbeats on the wire")
        up, down = tap.frames(tap.to_central), tap.frames(tap.to_monitor)
        assert [f["type"] for f in up[:2]] == ["auth_request", "auth_proof"]
        assert {f["type"] for f in up[2:]} == {"sealed"} and all(f["sender"] == "monitor" for f in up[2:])
        assert [f["type"] for f in down[:2]] == ["auth_challenge", "auth_result"]
        assert {f["type"] for f in down[2:]} == {"sealed"}
        assert "heartbeat" not in bytes(tap.to_central).decode("latin-1")
        assert SECRETS["MAD1"] not in bytes(tap.to_central + tap.to_monitor).decode("latin-1")
    finally:
        tap.close()


def test_an_impostor_with_a_live_cp_id_is_refused_and_the_real_monitor_stays(net: Net) -> None:
    _engine, monitor = net.cp("MAD1")
    net.active("MAD1")
    key_before = mstatus(monitor)["key_id"]
    # 1. auth_request + a proof made with a guessed secret, from another address
    impostor = RawCp(net.port, source="127.0.0.77")
    result = impostor.login("MAD1", security.verifier("cp", "MAD1", security.new_secret()))
    assert (result.status, result.reason) == ("denied", "wrong proof for CP MAD1")
    assert impostor.closed_by_peer(), "Central keeps a refused connection open"
    # 2. the original attack: a plain register_request with the live CP's id
    plain = RawCp(net.port, source="127.0.0.78")
    plain.send(protocol.RegisterRequest(cp_id="MAD1", correlation_id="x1", location="Evil street"))
    answer = plain.expect(protocol.RegisterResponse)
    assert answer.status == "denied" and answer.reason.startswith("authenticate first")
    assert plain.closed_by_peer()
    # 3. a proof sent without any challenge
    blind = RawCp(net.port, source="127.0.0.79")
    blind.send(protocol.AuthProof(correlation_id="c", cp_id="MAD1", proof=security.b64e(b"x" * 32)))
    assert blind.expect(protocol.AuthResult).status == "denied"
    time.sleep(0.3)  # a negative check: give Central time to (wrongly) act on them
    st = mstatus(monitor)
    assert (st["logins"], st["key_id"], st["registered"]) == (1, key_before, True)
    assert net.status("MAD1")["state"] == "ACTIVE" and net.status("MAD1")["location"] == "Madrid 0"
    failed = net.audit("login_failed")
    by_address = {r.address: r for r in failed}
    assert by_address["127.0.0.77"].detail == "wrong proof for CP MAD1" and by_address["127.0.0.77"].subject == "MAD1"
    assert "register_request" in by_address["127.0.0.78"].detail
    assert "127.0.0.79" in by_address
    takeovers = int(mstatus(monitor)["logins"] != 1 or net.status("MAD1")["state"] != "ACTIVE")
    fault_matrix.attack_row("impostor with a live CP's id (auth_request + forged proof)", 2, 2, 0, takeovers)
    fault_matrix.attack_row("plain register_request with a live CP's id", 1, 1, 0, takeovers)
    for c in (impostor, plain, blind):
        c.close()


def test_a_wrong_secret_unknown_and_deregistered_cps_are_refused_with_a_reason(
        net: Net, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    # A real Monitor with the wrong secret: refused, audited, it says why and waits before trying again
    _engine, wrong = net.cp("MAD2", secret=security.new_secret(), register_retry=5.0)
    wait_until(lambda: any("Central refused our authentication: wrong proof for CP MAD2" in r.getMessage()
                           for r in caplog.records), what="the Monitor's sentence")
    assert not mstatus(wrong)["authenticated"] and net.status("MAD2")["state"] == "DISCONNECTED"
    assert [r.detail for r in net.audit("login_failed")] == ["wrong proof for CP MAD2"]
    fault_matrix.attack_row("wrong secret (a Monitor with another secret)", 1, 1, 0, 0)
    # Unknown id; a deregistered CP
    stranger = RawCp(net.port, source="127.0.0.81")
    assert stranger.login("NOPE", VERIFIERS["MAD1"]).reason == "unknown CP NOPE"
    with Repository(net.db) as repo:
        assert repo.deregister("cp", "MAD3")
    gone = RawCp(net.port, source="127.0.0.82")
    assert gone.login("MAD3", VERIFIERS["MAD3"]).reason == "CP MAD3 is deregistered"
    # A connected CP that is deregistered is thrown out within ~2 s, its keys revoked, and stays out
    _engine1, monitor = net.cp("MAD1")
    net.active("MAD1")
    key = mstatus(monitor)["key_id"]
    with Repository(net.db) as repo:
        repo.deregister("cp", "MAD1")
    started = time.monotonic()
    wait_until(lambda: not net.status("MAD1")["connected"], timeout=3.0, what="MAD1 thrown out")
    assert time.monotonic() - started < 2.5
    assert net.key_state(key) == "revoked"
    wait_until(lambda: any("CP MAD1 was deregistered" in m for m in net.messages()), what="the panel says so")
    wait_until(lambda: any(r.detail == "CP MAD1 is deregistered" for r in net.audit("login_failed")),
               what="the Monitor's next login refused")
    assert net.status("MAD1")["state"] == "DISCONNECTED"
    for c in (stranger, gone):
        c.close()


def test_failed_attempts_are_limited_per_address(net: Net) -> None:
    wrong = security.verifier("cp", "MAD1", security.new_secret())
    for _ in range(5):
        c = RawCp(net.port, source="127.0.0.90")
        assert c.login("MAD1", wrong).reason == "wrong proof for CP MAD1"
        c.close()
    # The 6th attempt from that address is refused before any proof, even with the right secret
    sixth = RawCp(net.port, source="127.0.0.90")
    refusal = sixth.login("MAD1", VERIFIERS["MAD1"])
    assert refusal.status == "denied"
    assert refusal.reason is not None and refusal.reason.startswith("too many failed attempts from 127.0.0.90 for "
                                                                    "CP MAD1; try again in ")
    assert sixth.closed_by_peer()
    # Another address is not affected, nor another CP behind the same address (a NAT)
    other = RawCp(net.port, source="127.0.0.91")
    assert other.login("MAD1", VERIFIERS["MAD1"]).status == "accepted"
    neighbour = RawCp(net.port, source="127.0.0.90")
    assert neighbour.login("MAD2", VERIFIERS["MAD2"]).status == "accepted"
    neighbour.close()
    assert len([r for r in net.audit("login_failed") if r.address == "127.0.0.90"]) == 6
    fault_matrix.attack_row("guessing a CP's secret (6 tries from one address)", 6, 6, 0, 0)
    for c in (sixth, other):
        c.close()


def test_silent_strangers_are_closed_and_cannot_fill_the_connection_limit(kafka_settings: KafkaSettings,
                                                                          tmp_path: Path) -> None:
    n = Net(kafka_settings, tmp_path, auth_timeout=0.5, max_monitors=3)
    try:
        strangers = [RawCp(n.port, source=f"127.0.0.{100 + i}") for i in range(3)]
        opened = time.monotonic()
        wait_until(lambda: n.central.ask("monitor-listener", ListenerConnections()) == 3, what="3 connections")
        with pytest.raises(HandshakeRefused):  # full: the listener answers NACK
            RawCp(n.port, source="127.0.0.110")
        _engine, monitor = n.cp("MAD1")  # keeps trying while the strangers hold every slot
        for s in strangers:
            assert s.closed_by_peer(timeout=3.0), "a silent stranger was not closed"
        assert time.monotonic() - opened >= 0.4
        n.active("MAD1")
        assert mstatus(monitor)["authenticated"]
        for s in strangers:
            s.close()
    finally:
        n.stop()


def test_unsealed_forged_and_replayed_frames_on_an_authenticated_link_are_refused(net: Net) -> None:
    cp = RawCp(net.port, source="127.0.0.120")  # a Monitor written from the protocol doc, holding MAD2's secret
    assert cp.login("MAD2", VERIFIERS["MAD2"]).status == "accepted"
    cp.send(protocol.RegisterRequest(cp_id="MAD2", correlation_id="r1"))
    accepted = cp.expect(protocol.RegisterResponse)
    assert (accepted.status, accepted.price_eur_kwh) == ("accepted", 0.40)
    assert cp.raw[-1]["type"] == "sealed"  # Central's answer came sealed
    cp.send(protocol.Heartbeat(cp_id="MAD2", engine_ok=True))
    net.active("MAD2")
    # A plain frame on the authenticated connection: refused, answered, audited, never acted on
    cp.send(protocol.FaultNotification(cp_id="MAD2", reason="forged"), plain=True)
    refused = cp.expect(protocol.ErrorMessage)
    assert refused.reason.startswith("refused: a fault_notification that is not sealed")
    # The previous frame again (a retransmission after a lost ACK): dropped quietly, applied once;
    # an older sealed frame replayed after a newer one: refused
    assert cp.seal is not None
    again = cp.seal.seal(protocol.FaultNotification(cp_id="MAD2", reason="replayed"))
    cp.client.send(protocol.encode(again))
    cp.client.send(protocol.encode(again))
    cp.client.send(protocol.encode(cp.seal.seal(protocol.Heartbeat(cp_id="MAD2", engine_ok=False))))
    cp.client.send(protocol.encode(again))
    assert "replayed" in cp.expect(protocol.ErrorMessage).reason
    wait_until(lambda: net.audit("frame_rejected"), what="frame_rejected audited")
    rejected = net.audit("frame_rejected")
    assert rejected[-1].subject == "MAD2" and rejected[-1].address == "127.0.0.120"
    # the one genuine fault went through; the forged plain one did not count
    wait_until(lambda: net.status("MAD2")["fault"] == "replayed", what="the sealed fault applied once")
    cp.close()


def test_revoke_takes_the_cp_out_until_its_monitor_authenticates_again(net: Net) -> None:
    engine, monitor = net.cp("MAD1")
    net.active("MAD1")
    first = mstatus(monitor)["key_id"]
    net.tell_central(ConsoleLine("revoke MAD1 stolen laptop"))
    wait_until(lambda: any("lost its Monitor (key revoked by the operator: stolen laptop)" in m
                           for m in net.messages()), what="MAD1 out of service")
    wait_until(lambda: mstatus(monitor)["logins"] == 2 and mstatus(monitor)["registered"], what="re-authenticated")
    net.active("MAD1")
    second = mstatus(monitor)["key_id"]
    assert second != first and net.key_state(first) == "revoked" and net.key_state(second) == "current"
    wait_until(lambda: engine_status(engine)["key_id"] == second, what="the Engine got the new key")
    revoked = net.audit("key_revoked")[0]
    assert revoked.subject == "operator" and json.loads(revoked.params)["key_ids"] == [first]
    assert "stolen laptop" in json.loads(revoked.params)["reason"]
    commands = [json.loads(r.params) for r in net.audit("operator_command")]
    assert {"command": "revoke", "via": "console", "cp_id": "MAD1", "reason": "stolen laptop"} in commands
    fault_matrix.attack_row("revoked key → out of service → re-authentication", 1, 1, 0, 0,
                            genuine_ok=net.status("MAD1")["state"] == "ACTIVE")
    # The Monitor's menu option: a new login, a new key, handed to the Engine
    assert "authenticate again" in monitor.ask("monitor", ReAuthenticate())
    wait_until(lambda: mstatus(monitor)["logins"] == 3 and mstatus(monitor)["registered"], what="3rd login")
    third = mstatus(monitor)["key_id"]
    assert third not in (first, second) and net.key_state(second) == "replaced"
    wait_until(lambda: engine_status(engine)["key_id"] == third, what="the Engine got the 3rd key")
    net.active("MAD1")


def test_the_audit_log_is_shown_and_exported_and_drivers_are_enrolled_by_the_operator(
        net: Net, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    ok = RawCp(net.port, source="127.0.0.130")
    assert ok.login("MAD2", VERIFIERS["MAD2"]).status == "accepted"
    bad = RawCp(net.port, source="127.0.0.131")
    assert bad.login("MAD1", VERIFIERS["MAD2"]).status == "denied"
    net.tell_central(ConsoleLine("revoke MAD2"))
    net.tell_central(ConsoleLine("enroll-driver driver7"))
    net.tell_central(ConsoleLine("audit 5"))
    wait_until(lambda: any(r.getMessage().startswith("AUDIT ") and "login_failed" in r.getMessage()
                           for r in caplog.records), what="the audit lines shown")
    # enroll-driver: the secret is printed once, stored only as its verifier, never logged
    printed = wait_until(lambda: [ln for ln in capsys.readouterr().out.splitlines() if "driver7" in ln],
                         what="the secret printed")
    secret = printed[0].rsplit(" ", 1)[1]
    with Repository(net.db) as repo:
        cred = repo.credential("driver", "driver7")
    assert cred is not None and cred.verifier == security.verifier("driver", "driver7", secret)
    assert not any(secret in r.getMessage() for r in caplog.records)
    assert len(net.central.ask("central", EnrollDriver("driver8"))) == 43
    out = tmp_path / "audit.jsonl"
    said = net.central.ask("central", ExportAudit(str(out)))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert said == f"Exported {len(lines)} audit lines to {out} (JSON lines)"
    events = {line["event"] for line in lines}
    assert {"login_ok", "key_issued", "login_failed", "key_revoked", "operator_command", "registered"} <= events
    failed = next(line for line in lines if line["event"] == "login_failed")
    assert (failed["who"], failed["address"], failed["params"]["reason"]) == \
        ("MAD1", "127.0.0.131", "wrong proof for CP MAD1")
    assert secret not in out.read_text()
    # the console's own export, audited as an operator command
    console_out = tmp_path / "audit2.jsonl"
    net.tell_central(ConsoleLine(f"audit export {console_out}"))
    wait_until(lambda: console_out.exists() and console_out.read_text().count("\n") >= len(lines), what="export")
    assert any(json.loads(r.params).get("path") == str(console_out) for r in net.audit("operator_command"))
    for c in (ok, bad):
        c.close()


def test_a_crash_of_the_gatekeeper_drops_no_live_cp_and_logins_go_on(net: Net) -> None:
    _engine, monitor = net.cp("MAD1")
    net.active("MAD1")
    before = net.central.get("gatekeeper")
    assert before is not None
    crash(before)
    wait_until(lambda: (ref := net.central.get("gatekeeper")) is not None and ref != before, what="restarted")
    late = RawCp(net.port, source="127.0.0.140")  # a login after the restart
    assert late.login("MAD2", VERIFIERS["MAD2"]).status == "accepted"
    st = mstatus(monitor)
    assert (st["logins"], st["registered"]) == (1, True) and net.status("MAD1")["state"] == "ACTIVE"
    # the keys survive too: revocation still finds MAD1's (the keyring is the system's, not the actor's)
    net.tell_central(ConsoleLine("revoke MAD1"))
    wait_until(lambda: mstatus(monitor)["logins"] == 2 and mstatus(monitor)["registered"], what="re-authenticated")
    assert net.key_state(st["key_id"]) == "revoked"
    late.close()


def test_open_enrolment_is_an_explicit_development_mode_and_says_so(kafka_settings: KafkaSettings, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="evcharging")
    n = Net(kafka_settings, tmp_path, enroll="open")
    try:
        wait_until(lambda: any("enrolment is OPEN" in r.getMessage() and r.levelno == logging.WARNING
                               for r in caplog.records), what="a loud warning at start")
        wait_until(lambda: any("enrolment is OPEN" in m for m in n.messages()), what="the panel warns")
        plain = RawCp(n.port)
        plain.send(protocol.RegisterRequest(cp_id="NEW1", correlation_id="r"))
        assert plain.expect(protocol.RegisterResponse).status == "accepted"
        plain.close()
    finally:
        n.stop()
