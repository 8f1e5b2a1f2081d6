"""Drivers prove who they are (issue #11, item 6): signed requests on driver_requests.

Central runs in-process in registry mode (security on) against the real broker
and a real SQLite file; forged requests are published with a plain Kafka
producer, as an outside attacker would; the genuine driver is EV_Driver's own
actor system with its secret in a credential file. Drivers are registered
directly in Central's database (``Repository.register``), as the registry does.

The CP the genuine driver charges at is a stand-in Monitor over a real socket
that authenticates as docs/protocol.md says ("A Monitor authenticates to
Central") and seals every frame after.

The DriverAuth unit tests at the end (throttled audit, registry revision,
open mode) need no broker.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from actors.console import ConsoleLine
from actors.driver import DriverStatus
from actors.driver_auth import Denial, DriverAuth, denial_answers
from persistence import Repository
from persistence.records import CredentialRecord
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.driver_system import SECRET_ENV, DriverConfig, driver_verifier, start_driver
from supervisors.system import RunningSystem
from tests import fault_matrix
from tests.fakes import FakeMonitor, KafkaPeer
from tests.test_dead_letters import raw_send, read_dead
from tests.waiting import wait_until
from transport import protocol, security
from transport.broker import TOPICS
from transport.listener import ListenerPort

DRIVER_LOG = "evcharging.driver"
NOT_AUTH = "not authenticated: "
MAX_AGE = 3.0  #: --signature-max-age of the replay test


# --- helpers ------------------------------------------------------------------------
class CpStandIn(FakeMonitor):
    """A Monitor reduced to its wire behaviour that authenticates first, then seals every frame."""

    def __init__(self, port: int, cp_id: str, secret: str) -> None:
        super().__init__(port, cp_id)
        self.seal: security.LinkSeal | None = None
        ver = security.verifier("cp", cp_id, secret)
        corr = uuid.uuid4().hex
        self.client.send(protocol.encode(protocol.AuthRequest(cp_id=cp_id, correlation_id=corr)))
        first = protocol.decode(self.client.recv(timeout=10))
        assert isinstance(first, protocol.AuthChallenge), first
        proof = security.proof(ver, security.PURPOSE_CENTRAL, cp_id, first.nonce)
        self.client.send(protocol.encode(protocol.AuthProof(correlation_id=corr, cp_id=cp_id, proof=proof)))
        result = protocol.decode(self.client.recv(timeout=10))
        assert isinstance(result, protocol.AuthResult) and result.status == "accepted", result
        assert result.key_id and result.wrapped_key
        key = security.unwrap_key(ver, cp_id, first.nonce, result.key_id, result.wrapped_key)
        self.seal = security.LinkSeal(cp_id, result.key_id, key, "monitor", "central")

    def send(self, msg: Any) -> None:
        self.client.send(protocol.encode(self.seal.seal(msg) if self.seal is not None else msg))

    def expect(self, kind: type, where: Any = lambda m: True, timeout: float = 10.0) -> Any:
        for i, m in enumerate(self.inbox):
            if isinstance(m, kind) and where(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = self.client.recv(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            m = protocol.decode(raw)
            if self.seal is not None:
                m = self.seal.open(m)
            if isinstance(m, kind) and where(m):
                return m
            self.inbox.append(m)
        raise AssertionError(f"{self.cp_id}: no {kind.__name__} within {timeout} s (got {self.inbox})")


class RequestTap:
    """Reads driver_requests from its end, like anyone with read access to the topic."""

    def __init__(self, settings: Any) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=10)
        tps = [TopicPartition(settings.topic("driver_requests"), p) for p in range(TOPICS["driver_requests"])]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)
        self.records: list[tuple[bytes, bytes]] = []

    def poll(self) -> list[tuple[bytes, bytes]]:
        for batch in self.consumer.poll(timeout_ms=50).values():
            self.records.extend((r.key, r.value) for r in batch)
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def systems() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        if isinstance(thing, RunningSystem):
            thing.stop()
        else:
            thing.close()


def start_secure_central(kafka_settings: Any, db: str, systems: list[Any], **extra: Any) -> RunningSystem:
    with Repository(db) as repo:
        repo.upsert_cp("MAD1", "Madrid Sol", 0.40, max_power_kw=3600)
    central = start_central(CentralSystemConfig(
        port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
        topic_prefix=kafka_settings.topic_prefix, group_id=f"central-{uuid.uuid4().hex[:6]}",
        enroll="registry", life_timeout=60.0, authorize_timeout=5.0, **extra))
    systems.append(central)
    assert central.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
    return central


def register_driver(db: str, driver_id: str, secret: str) -> bytes:
    ver = security.verifier("driver", driver_id, secret)
    with Repository(db) as repo:
        repo.register("driver", driver_id, ver)
    return ver


def rows(db: str, sql: str, *args: Any) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute(sql, args).fetchone()
    return int(n)


def denied_audit(db: str) -> list[Any]:
    with Repository(db) as repo:
        return repo.recent_audit(500, event="request_denied")


def answer(peer: KafkaPeer, kind: type, corr: str, timeout: float = 15.0) -> Any:
    return peer.wait_for(kind, lambda m: getattr(m, "correlation_id", None) == corr, timeout=timeout)[0]


def charge(driver_id: str, cp_id: str = "MAD1") -> protocol.ChargeRequest:
    return protocol.ChargeRequest(driver_id=driver_id, cp_id=cp_id, correlation_id=uuid.uuid4().hex)


# --- the attacks ---------------------------------------------------------------------
@pytest.mark.broker
def test_unsigned_and_forged_driver_requests_are_denied(kafka_settings, systems, tmp_path) -> None:
    db = str(tmp_path / "central.db")
    secret_a, secret_b, secret_gone = security.new_secret(), security.new_secret(), security.new_secret()
    ver_a = register_driver(db, "dalice", secret_a)
    register_driver(db, "dbob", secret_b)
    ver_gone = register_driver(db, "dgone", secret_gone)
    central = start_secure_central(kafka_settings, db, systems)
    peer = KafkaPeer(kafka_settings)
    systems.append(peer)

    # 1. unsigned charge_request: denied with the request's own response, nothing created
    unsigned = charge("dstranger")
    peer.send("driver_requests", "dstranger", unsigned)
    r = answer(peer, protocol.ChargeResponse, unsigned.correlation_id)
    assert (r.driver_id, r.status, r.cp_id, r.session_id) == ("dstranger", "denied", "MAD1", None)
    assert r.reason == NOT_AUTH + "this Central requires signed requests"
    # the other request types, unsigned, each with its own response (list/hello: an error first)
    d2 = "dstranger2"
    lst = protocol.AvailableCpsRequest(driver_id=d2, correlation_id=uuid.uuid4().hex)
    hello = protocol.DriverHello(driver_id=d2, correlation_id=uuid.uuid4().hex)
    stop = protocol.StopChargingRequest(driver_id=d2, session_id="S1", correlation_id=uuid.uuid4().hex)
    for msg in (lst, hello, stop, protocol.TicketAck(driver_id=d2, session_id="S1")):
        peer.send("driver_requests", d2, msg)
    err = answer(peer, protocol.ErrorMessage, lst.correlation_id)
    assert err.reason.startswith(NOT_AUTH)
    assert answer(peer, protocol.AvailableCpsResponse, lst.correlation_id).status == "denied"
    assert answer(peer, protocol.ErrorMessage, hello.correlation_id).reason.startswith(NOT_AUTH)
    assert answer(peer, protocol.DriverHelloResponse, hello.correlation_id).status == "denied"
    s = answer(peer, protocol.StopChargingResponse, stop.correlation_id)
    assert s.status == "denied" and s.reason.startswith(NOT_AUTH)
    unsigned_attempts = 5

    # 2. forged signatures: a wrong secret; A's signature over a request that speaks for B;
    #    a signature older than --signature-max-age; a deregistered driver
    wrong = charge("dalice")
    peer.send("driver_requests", "dalice",
              security.sign(security.verifier("driver", "dalice", security.new_secret()), "dalice", wrong))
    as_bob = charge("dbob")
    peer.send("driver_requests", "dalice", security.sign(ver_a, "dalice", as_bob))  # signed by A, claims B
    old = charge("dbob")
    peer.send("driver_requests", "dbob", security.sign(security.verifier("driver", "dbob", secret_b), "dbob", old,
                                                       ts=time.time() - 400))
    with Repository(db) as repo:
        assert repo.deregister("driver", "dgone")
    gone = charge("dgone")
    peer.send("driver_requests", "dgone", security.sign(ver_gone, "dgone", gone))

    r = answer(peer, protocol.ChargeResponse, wrong.correlation_id)
    assert (r.driver_id, r.status) == ("dalice", "denied") and r.reason == \
        NOT_AUTH + "the signature of driver dalice's request is wrong"
    r = answer(peer, protocol.ChargeResponse, as_bob.correlation_id)
    assert r.driver_id == "dalice" and r.status == "denied"  # answered to who signed it, never to B
    assert r.reason == NOT_AUTH + "a request signed by driver dalice speaks for 'dbob'"
    r = answer(peer, protocol.ChargeResponse, old.correlation_id)
    assert r.status == "denied" and r.reason.startswith(NOT_AUTH + "driver dbob's request was signed 4")
    assert "s ago (more than 300 s)" in r.reason
    r = answer(peer, protocol.ChargeResponse, gone.correlation_id)
    assert r.status == "denied" and r.reason == NOT_AUTH + "driver dgone is deregistered"
    forged_attempts = 4

    # 3. a signed envelope whose body is over the bound (64 KiB): refused at the edge before any
    #    signature is computed, set aside in the dead-letter topic with the reason, never retried
    huge = json.dumps({"type": "signed", "driver_id": "dalice", "ts": time.time(), "sig": "AAAA",
                       "body": "x" * (protocol.SIGNED_BODY_MAX_LEN + 1)}).encode()
    raw_send(kafka_settings, "driver_requests", [("dalice", huge)])
    dead = read_dead(kafka_settings, "driver_requests", 1)
    assert dead[0]["key"] == "dalice" and dead[0]["value"] == huge
    assert f"field 'body' of signed must be at most {protocol.SIGNED_BODY_MAX_LEN} characters" in dead[0]["reason"]

    # nothing was created: no session, no stored answer, no driver row for strangers
    assert rows(db, "SELECT COUNT(*) FROM sessions") == 0
    assert rows(db, "SELECT COUNT(*) FROM charge_requests") == 0
    assert rows(db, "SELECT COUNT(*) FROM drivers WHERE driver_id LIKE 'dstranger%'") == 0
    status = central.ask("central", _central_status())
    assert status["MAD1"]["session_id"] is None
    # audited: one line per driver per second (dstranger2's four within a second: one line, the
    # rest counted), with the request's type, correlation id and reason
    audit = wait_until(lambda: (a := denied_audit(db)) and {x.subject for x in a} >= {
        "dstranger", "dstranger2", "dalice", "dbob", "dgone"} and a, timeout=10, what="the denials audited")
    by_subject = {x.subject: x for x in audit}
    assert by_subject["dstranger"].component == "central"
    assert unsigned.correlation_id in (by_subject["dstranger"].params or "")
    assert '"type": "charge_request"' in (by_subject["dstranger"].params or "")
    assert sum(1 for x in audit if x.subject == "dalice") <= 2  # two denials within a second: throttled

    fault_matrix.attack_row("unsigned driver request", unsigned_attempts, unsigned_attempts, 0, 0)
    fault_matrix.attack_row("driver signature forged", forged_attempts, forged_attempts, 0, 0)


@pytest.mark.broker
def test_deregistration_is_seen_without_restart(kafka_settings, systems, tmp_path) -> None:
    db = str(tmp_path / "central.db")
    secret = security.new_secret()
    ver = register_driver(db, "dlater", secret)
    start_secure_central(kafka_settings, db, systems)
    peer = KafkaPeer(kafka_settings)
    systems.append(peer)

    def ask_list() -> str:
        req = protocol.AvailableCpsRequest(driver_id="dlater", correlation_id=uuid.uuid4().hex)
        peer.send("driver_requests", "dlater", security.sign(ver, "dlater", req))
        status: str = answer(peer, protocol.AvailableCpsResponse, req.correlation_id).status
        return status

    assert ask_list() == "ok"  # registered: cached by Central
    with Repository(db) as repo:
        assert repo.deregister("driver", "dlater")
    wait_until(lambda: ask_list() == "denied", timeout=10, interval=0.2,
               what="Central sees the deregistration (within a second)")


@pytest.mark.broker
def test_genuine_driver_charges_and_a_replayed_request_opens_no_second_session(
        kafka_settings, systems, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    db = str(tmp_path / "central.db")
    secret, cp_secret = security.new_secret(), security.new_secret()
    register_driver(db, "dgenuine", secret)
    with Repository(db) as repo:
        repo.register("cp", "MAD1", security.verifier("cp", "MAD1", cp_secret), location="Madrid Sol",
                      price_eur_kwh=0.40)
    # a short --signature-max-age, so that a replay can also be too old within the test
    central = start_secure_central(kafka_settings, db, systems, signature_max_age=MAX_AGE)
    peer = KafkaPeer(kafka_settings)
    systems.append(peer)
    tap = RequestTap(kafka_settings)
    systems.append(tap)
    cp = CpStandIn(central.ask("monitor-listener", ListenerPort()), "MAD1", cp_secret)
    systems.append(cp)
    assert cp.register().status == "accepted"
    cp.heartbeat(True)
    wait_until(lambda: central.ask("central", _central_status())["MAD1"]["state"] == "ACTIVE", what="MAD1 ACTIVE")

    cred = security.write_credential(tmp_path / "dgenuine.json", "driver", "dgenuine", secret)
    driver = start_driver(DriverConfig(broker=kafka_settings.bootstrap, driver_id="dgenuine",
                                       topic_prefix=kafka_settings.topic_prefix, console=False,
                                       request_timeout=10.0, secret_file=str(cred)))
    systems.append(driver)

    def lines() -> list[str]:
        return [r.getMessage() for r in list(caplog.records) if r.name == DRIVER_LOG]

    wait_until(lambda: any("no supply in progress" in m for m in lines()), timeout=20,
               what="Central answered the signed hello")
    driver.get("output").tell(ConsoleLine("list"))
    wait_until(lambda: any("charging point(s)" in m and "MAD1" in m for m in lines()), timeout=15,
               what="the signed list answered")
    driver.get("output").tell(ConsoleLine("charge MAD1"))
    auth = cp.expect(protocol.AuthorizeSupply, timeout=15)
    assert auth.driver_id == "dgenuine"
    cp.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                 accepted=True))
    live = wait_until(lambda: (s := driver.ask("driver", DriverStatus(), timeout=2)) and s["active_session"],
                      timeout=15, what="the genuine driver is authorised")
    assert live["session_id"] == auth.session_id
    assert not any("not authenticated" in m for m in lines())

    # everything the driver published was signed, under its own key (the driver id)
    records = wait_until(lambda: [(k, v) for k, v in tap.poll() if k == b"dgenuine"], timeout=5,
                         what="the driver's records read back")
    decoded = [protocol.decode(v) for _k, v in records]
    assert decoded and all(isinstance(m, protocol.Signed) and m.driver_id == "dgenuine" for m in decoded)
    inner = [protocol.decode(m.body) for m in decoded]
    assert {type(m) for m in inner} >= {protocol.DriverHello, protocol.AvailableCpsRequest, protocol.ChargeRequest}
    raw_charge = next(v for (_k, v), m in zip(records, inner, strict=True) if isinstance(m, protocol.ChargeRequest))
    signed_at = next(env.ts for env, m in zip(decoded, inner, strict=True) if isinstance(m, protocol.ChargeRequest))
    corr = next(m.correlation_id for m in inner if isinstance(m, protocol.ChargeRequest))

    # the replay: the same bytes again, twice (within --signature-max-age)
    replays = 2
    for _ in range(replays):
        peer.producer.send(kafka_settings.topic("driver_requests"), key=b"dgenuine", value=raw_charge)
    peer.producer.flush(5)
    again = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr, count=1 + replays)
    assert all(r.status == "authorized" and r.session_id == auth.session_id for r in again)  # one answer, again
    assert rows(db, "SELECT COUNT(*) FROM sessions WHERE driver_id = 'dgenuine'") == 1
    assert rows(db, "SELECT COUNT(*) FROM charge_requests WHERE driver_id = 'dgenuine'") == 1
    with pytest.raises(AssertionError):  # the CP is not asked again (a bounded negative wait)
        cp.expect(protocol.AuthorizeSupply, timeout=0.5)
    assert driver.ask("driver", DriverStatus(), timeout=2)["active_session"]["session_id"] == auth.session_id

    # once older than --signature-max-age the copy is denied (audited), and the request keeps its
    # one answer: the stored one is sent again, never a contradicting "denied"
    wait_until(lambda: time.time() - signed_at > MAX_AGE + 0.2, timeout=MAX_AGE + 1, interval=0.1,
               what="the signature to age")
    peer.producer.send(kafka_settings.topic("driver_requests"), key=b"dgenuine", value=raw_charge)
    peer.producer.flush(5)
    late = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr, count=2 + replays)
    assert all(r.status == "authorized" and r.session_id == auth.session_id for r in late)
    stale = wait_until(lambda: [a for a in denied_audit(db) if a.subject == "dgenuine"], timeout=5,
                       what="the stale replay audited")
    assert "signed" in stale[0].detail and "s ago" in stale[0].detail and corr in (stale[0].params or "")
    assert rows(db, "SELECT COUNT(*) FROM sessions WHERE driver_id = 'dgenuine'") == 1
    assert driver.ask("driver", DriverStatus(), timeout=2)["active_session"]["session_id"] == auth.session_id
    fault_matrix.attack_row("driver request replayed", replays + 1, replays + 1, 0, 0)


@pytest.mark.broker
def test_unsigned_driver_app_shows_the_denial(kafka_settings, systems, tmp_path, caplog, monkeypatch) -> None:
    """A driver without a secret against a Central with security on: the person reads why."""
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    db = str(tmp_path / "central.db")
    start_secure_central(kafka_settings, db, systems)
    driver = start_driver(DriverConfig(broker=kafka_settings.bootstrap, driver_id="dnosecret",
                                       topic_prefix=kafka_settings.topic_prefix, console=False,
                                       request_timeout=10.0))
    systems.append(driver)

    def lines() -> list[str]:
        return [r.getMessage() for r in list(caplog.records) if r.name == DRIVER_LOG]

    assert any("No secret for driver dnosecret" in m for m in lines())
    wait_until(lambda: any("refused the hello request: not authenticated" in m for m in lines()), timeout=20,
               what="the denied hello shown")
    driver.get("output").tell(ConsoleLine("charge MAD1"))
    wait_until(lambda: any("Denied at MAD1: not authenticated: this Central requires signed requests" in m
                           for m in lines()), timeout=15, what="the denied charge shown")
    assert sum("--secret-file FILE or EV_DRIVER_SECRET" in m for m in lines()) == 1  # the hint, once
    assert rows(db, "SELECT COUNT(*) FROM drivers WHERE driver_id = 'dnosecret'") == 0


def _central_status() -> Any:
    from actors.central import CentralStatus

    return CentralStatus()


# --- the driver's secret -----------------------------------------------------------------
def test_driver_secret_from_file_or_environment(tmp_path, monkeypatch, caplog) -> None:
    secret = security.new_secret()
    expected = security.verifier("driver", "d1", secret)
    base = DriverConfig(broker="127.0.0.1:1", driver_id="d1", console=False)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=DRIVER_LOG):
        assert driver_verifier(base) is None
    assert any("requests go unsigned" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(SECRET_ENV, secret)
    assert driver_verifier(base) == expected
    bare = tmp_path / "bare"
    bare.write_text(secret + "\n")
    monkeypatch.delenv(SECRET_ENV)
    from dataclasses import replace

    assert driver_verifier(replace(base, secret_file=str(bare))) == expected
    other = security.write_credential(tmp_path / "other.json", "driver", "d2", secret)
    with pytest.raises(security.SecurityError, match="is for 'd2', not 'd1'"):
        driver_verifier(replace(base, secret_file=str(other)))


# --- DriverAuth without a broker ---------------------------------------------------------
class FakeStore:
    def __init__(self) -> None:
        self.creds: dict[str, CredentialRecord] = {}
        self.rev = 0
        self.reads = 0
        self.lines: list[tuple[str, str, dict[str, Any] | None]] = []

    def credential(self, kind: str, ident: str) -> CredentialRecord | None:
        self.reads += 1
        return self.creds.get(ident)

    def registry_rev(self) -> int:
        return self.rev

    def audit(self, component: str, subject: str, event: str, detail: str = "", *,
              address: str | None = None, params: dict[str, Any] | None = None) -> None:
        self.lines.append((subject, detail, params))

    def add(self, driver_id: str, ver: bytes, gone: bool = False) -> None:
        self.creds[driver_id] = CredentialRecord("driver", driver_id, ver, 0.0, 1.0 if gone else None)
        self.rev += 1


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_driver_auth_throttles_the_audit_and_follows_the_registry() -> None:
    store, mono = FakeStore(), Clock()
    auth = DriverAuth(lambda: store, registry=True, monotonic=mono, audit_per_second=3)
    flood = [auth.check(charge("dx")) for _ in range(50)]
    assert all(isinstance(d, Denial) for d in flood)
    assert len(store.lines) == 1  # one line a second per driver
    mono.t += 1.5
    auth.check(charge("dy"))  # any later record flushes what is owed
    assert ("dx", NOT_AUTH + "this Central requires signed requests") == store.lines[1][:2]
    assert store.lines[1][2] is not None and store.lines[1][2]["repeated"] == 49
    # many drivers at once: at most audit_per_second lines, the rest counted in one line
    mono.t += 1.5
    before = len(store.lines)
    for i in range(20):
        auth.check(charge(f"dz{i}"))
    assert len(store.lines) - before <= 3 + 1
    mono.t += 1.5
    auth.check(charge("dw"))
    assert any(s == "*" and p is not None and p["count"] == 17 for s, _d, p in store.lines)

    # the cache: one read per driver until the registry's revision changes
    ver = security.verifier("driver", "dok", "s" * 20)
    store.add("dok", ver)
    mono.t += 1.5
    for _ in range(5):
        assert isinstance(auth.check(security.sign(ver, "dok", charge("dok"))), protocol.ChargeRequest)
    reads = store.reads
    store.add("dok", ver, gone=True)  # deregistered: seen at the next revision check
    assert isinstance(auth.check(security.sign(ver, "dok", charge("dok"))), protocol.ChargeRequest)  # cached
    mono.t += 1.1
    d = auth.check(security.sign(ver, "dok", charge("dok")))
    assert isinstance(d, Denial) and d.reason == NOT_AUTH + "driver dok is deregistered"
    assert store.reads == reads + 1


def test_driver_auth_open_mode_and_denial_answers() -> None:
    store = FakeStore()
    auth = DriverAuth(lambda: store, registry=False)
    plain = charge("dopen")
    assert auth.check(plain) is plain  # development: unsigned accepted
    anyone = security.verifier("driver", "dfree", "x" * 20)
    signed = security.sign(anyone, "dfree", charge("dfree"))
    assert isinstance(auth.check(signed), protocol.ChargeRequest)  # unregistered: taken as it is
    ver = security.verifier("driver", "dreg", "y" * 20)
    store.add("dreg", ver)
    forged = security.sign(anyone, "dreg", charge("dreg"))
    d = auth.check(forged)  # registered: verified even in open mode
    assert isinstance(d, Denial) and d.driver_id == "dreg"
    answers = denial_answers(d)
    assert len(answers) == 1 and isinstance(answers[0], protocol.ChargeResponse)
    assert answers[0].status == "denied" and answers[0].reason == d.reason
    ack = denial_answers(Denial("dreg", "not authenticated: x", protocol.TicketAck(driver_id="dreg", session_id="S")))
    assert ack == []  # a ticket_ack denial is only audited
    assert denial_answers(Denial("dreg", "not authenticated: x", None)) == []
