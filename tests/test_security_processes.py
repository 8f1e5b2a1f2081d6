"""Issue #11's attacks against a running network of OS processes (the launcher, security on).

EV_Registry, Central, two CPs (Engine + Monitor each) as separate processes; the attacker is
this test with stock clients: a raw framed socket and a plain Kafka producer/consumer. Each
attack is refused with a reason, audited, and changes no bill and no CP; the genuine traffic
beside it (a signed driver's supply, the CPs' sealed records) goes on and bills once. Then the
operator revokes a CP's key at Central's console: out of service, re-authenticated by its
Monitor on its own, ACTIVE again with a new key. Each attack records a fault-matrix row.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from persistence import AuditRecord, EngineJournal, Repository
from persistence.records import columns
from supervisors.launcher import Network
from tests import fault_matrix
from tests.fakes import KafkaPeer
from tests.frame_client import FrameClient, PeerClosed
from tests.test_faults_crashes import assert_no_tracebacks, cp_state, spec, tickets_of
from tests.waiting import wait_until
from transport import protocol, security
from transport.broker import KafkaSettings

pytestmark = pytest.mark.slow


def audit(net: Network, event: str | None) -> list:
    """Audit lines (newest first), read-only: polling must not take Central's write lock."""
    conn = sqlite3.connect(f"file:{net.db_path}?mode=ro", uri=True, timeout=5)
    try:
        where, args = ("WHERE event = ?", (event,)) if event else ("", ())
        rows = conn.execute(f"SELECT {columns(AuditRecord)} FROM audit_log {where} ORDER BY id DESC LIMIT 500",
                            args).fetchall()
    finally:
        conn.close()
    return [AuditRecord(*r) for r in rows]


def answer(client: FrameClient) -> protocol.Message | None:
    """The next message from the peer, or None when it hung up first."""
    try:
        return protocol.decode(client.recv(5.0))
    except PeerClosed:
        return None


def test_attacks_on_a_running_secure_network_change_no_bill_and_take_over_nothing(tmp_path, broker) -> None:
    sp = spec(tmp_path, broker, cps=2, drivers=0, supply_seconds=3, central_console=True)
    host = sp.host
    with Network(sp) as net:
        cps = [cp for cp, _, _ in net.cps]
        victim = cps[0]
        wait_until(lambda: all(cp_state(net, cp) == "ACTIVE" for cp in cps), timeout=30, what="both CPs ACTIVE")
        assert net.wait_central_ready()
        with Repository(net.db_path) as repo:
            key_before = next(k for k in repo.usable_keys(time.time(), 0) if k.cp_id == victim and k.state == "current")

        # 1. the release-1 takeover: a plain register_request with a live CP's id
        with FrameClient.connect(host, net.central_port, name="CENTRAL") as c:
            c.send(protocol.encode(protocol.RegisterRequest(cp_id=victim, correlation_id="t1")))
            reply = answer(c)
        assert isinstance(reply, protocol.RegisterResponse) and reply.status == "denied", reply
        assert "authenticate" in (reply.reason or "")
        # 2. an impostor who knows the protocol but not the secret
        with FrameClient.connect(host, net.central_port, name="CENTRAL") as c:
            c.send(protocol.encode(protocol.AuthRequest(cp_id=victim, correlation_id="t2")))
            challenge = answer(c)
            assert isinstance(challenge, protocol.AuthChallenge)
            forged = security.proof(security.verifier("cp", victim, security.new_secret()), security.PURPOSE_CENTRAL,
                                    victim, challenge.nonce)
            c.send(protocol.encode(protocol.AuthProof(correlation_id="t2", cp_id=victim, proof=forged)))
            verdict = answer(c)
        assert isinstance(verdict, protocol.AuthResult) and verdict.status == "denied", verdict
        try:
            failed = wait_until(lambda: [a for a in audit(net, "login_failed") if a.subject == victim] or None,
                                timeout=5, what="the failed login audited")
        except AssertionError:
            rows = [(a.event, a.subject, a.detail, round(time.time() - a.at, 1)) for a in audit(net, None)][:15]
            raise AssertionError(f"no login_failed for {victim}: {rows}") from None
        assert failed[0].address == host
        # the real Monitor is still the CP's (same key, still ACTIVE)
        assert cp_state(net, victim) == "ACTIVE"
        with Repository(net.db_path) as repo:
            assert any(k.key_id == key_before.key_id and k.state == "current"
                       for k in repo.usable_keys(time.time(), 0))
        fault_matrix.attack_row("process: plain register_request with a live CP id", 1, 1, 0, 0)
        fault_matrix.attack_row("process: impostor with a wrong proof", 1, 1, 0, 0)

        # 3. a stranger on the Engine's port: authorize_supply at price 0, without pairing
        stranger = protocol.AuthorizeSupply(correlation_id="t3", session_id="EVIL1", driver_id="mallory",
                                            price_eur_kwh=0.0, cp_id=victim)
        with FrameClient.connect(host, net.engine_ports[victim], name="ENGINE") as c:
            c.send(protocol.encode(stranger))
            refused = answer(c)
        assert isinstance(refused, protocol.ErrorMessage) and "pair first" in refused.reason, refused
        with EngineJournal(net.run_dir / f"engine-{victim}.journal.db") as journal:
            assert journal.get("EVIL1") is None and not journal.unfinished()
        assert cp_state(net, victim) == "ACTIVE"
        fault_matrix.attack_row("process: stranger's authorize_supply on the Engine port", 1, 1, 0, 0)

        # 4. Kafka, with stock clients: an unsigned driver request and an unsealed completion
        plain = KafkaPeer(KafkaSettings(net.bootstrap, sp.topic_prefix))
        genuine = KafkaPeer.of(net)  # signs as the driver it speaks for (registered in the registry)
        try:
            corr = uuid.uuid4().hex
            plain.send("driver_requests", "mallory", protocol.ChargeRequest(driver_id="mallory", cp_id=victim,
                                                                            correlation_id=corr))
            (denied,) = plain.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr, timeout=20)
            assert denied.status == "denied" and denied.reason.startswith("not authenticated"), denied
            forged_completion = protocol.ChargeCompletion(cp_id=victim, session_id="EVIL1", driver_id="mallory",
                                                          energy_kwh=0.0, cost_eur=0.0, end_reason="unplugged")
            plain.send("charging_session_complete", victim, forged_completion)
            wait_until(lambda: [a for a in audit(net, "record_rejected") if a.subject == victim
                                and "not sealed" in a.detail] or None, timeout=15, what="the unsealed record refused")
            fault_matrix.attack_row("process: unsigned driver request", 1, 1, 0, 0)
            fault_matrix.attack_row("process: unsealed completion", 1, 1, 0, 0)

            # 5. the genuine traffic beside it: a signed driver's supply at the victim, billed once
            corr = uuid.uuid4().hex
            genuine.send("driver_requests", "alice", protocol.ChargeRequest(driver_id="alice", cp_id=victim,
                                                                           correlation_id=corr))
            (ok,) = genuine.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr, timeout=20)
            assert ok.status == "authorized", ok
            (ticket,) = wait_until(lambda: tickets_of(net, ok.session_id), timeout=30, what="the genuine ticket")
            assert ticket.energy_kwh > 0 and ticket.end_reason == "unplugged"
        finally:
            plain.close()
            genuine.close()
        with Repository(net.db_path) as repo:
            tickets = repo.tickets()
            assert [t.session_id for t in tickets] == [ok.session_id]  # nothing from the attacker
            assert repo.get_session("EVIL1") is None

        # 6. the operator revokes the victim's key: out of service, then back with a new key on its own
        revoked_at = time.monotonic()
        net.central_command(f"revoke {victim} suspected key theft")
        wait_until(lambda: [a for a in audit(net, "key_revoked") if f"CP {victim}" in a.detail] or None, timeout=10,
                   what="the revocation audited")

        def new_key() -> str | None:
            with Repository(net.db_path) as repo:
                current = [k for k in repo.usable_keys(time.time(), 0) if k.cp_id == victim and k.state == "current"]
            return current[0].key_id if current and current[0].key_id != key_before.key_id else None

        fresh = wait_until(new_key, timeout=30, what="a new key after the Monitor authenticated again")
        wait_until(lambda: cp_state(net, victim) == "ACTIVE", timeout=20, what="the victim ACTIVE again")
        back_s = time.monotonic() - revoked_at
        with Repository(net.db_path) as repo:
            old = repo._conn.execute("SELECT state FROM cp_keys WHERE key_id = ?", (key_before.key_id,)).fetchone()
        assert old == ("revoked",) and fresh != key_before.key_id
        assert back_s < 30
        fault_matrix.attack_row(f"process: revoke → re-authenticated in {back_s:.1f} s", 0, 0, 0, 0)
        assert_no_tracebacks(net)
