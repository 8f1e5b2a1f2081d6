"""Issue #11 items 3 and 5: the Engine obeys only its paired Monitor, seals its Kafka records with
the CP key, and Central's SessionRouter opens them (refusing the unsealed, the wrongly sealed, the
replayed and the misaddressed ones, which are dead-lettered and never billed).

Real parts only: real sockets (a raw framed client plays the stranger and the Monitor, using the
protocol's own security functions), the real Tansu broker, real SQLite journals and databases.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from actors.central import CentralStatus
from actors.engine_pairing import PAIR_FIRST
from actors.messages import RouterStats
from persistence import EngineJournal, Repository
from supervisors.engine_system import EngineConfig, engine_port, start_engine
from supervisors.system import RunningSystem
from tests import fault_matrix
from tests.fakes import FakeMonitor, KafkaPeer
from tests.test_engine import TopicReader, authorize, connect_when_listening, engine_config, status
from tests.waiting import wait_until
from transport import protocol
from transport.broker import TOPICS, KafkaSettings
from transport.listener import ListenerPort
from transport.security import (
    PURPOSE_CENTRAL,
    PURPOSE_ENGINE,
    KeyInfo,
    Keyring,
    LinkSeal,
    MicroCounter,
    SecurityError,
    b64e,
    link_key,
    new_key,
    new_secret,
    proof,
    seal,
    sign,
    unwrap_key,
    verifier,
    write_credential,
)

pytestmark = pytest.mark.broker

CP = "CP1"


# --------------------------------------------------------------------------- helpers
class Credentials:
    """CP1's secret, its verifier and its credential file (0600)."""

    def __init__(self, tmp_path: Path, cp_id: str = CP) -> None:
        self.cp_id = cp_id
        self.secret = new_secret()
        self.verifier = verifier("cp", cp_id, self.secret)
        self.file = write_credential(tmp_path / f"{cp_id}.credential.json", "cp", cp_id, self.secret)


class MonitorStandIn:
    """A raw framed client playing the Monitor: pairs with the Engine as docs/protocol.md says, then
    seals what it sends and opens what it gets (each frame once, in order, as a LinkSeal must)."""

    def __init__(self, system: RunningSystem) -> None:
        self.peer = connect_when_listening("127.0.0.1", engine_port(system))
        self.seal: LinkSeal | None = None
        self._opened: list[protocol.Message] = []
        self._seen = 0
        self._lock = threading.Lock()

    def pair(self, cp_id: str, verifier_: bytes, *, wrong: bool = False) -> dict[str, Any]:
        """The three steps; returns the auth_result frame (the link is sealed when accepted)."""
        self.peer.send(protocol.AuthRequest(cp_id=cp_id, correlation_id="pair-1"))
        challenge = self.peer.wait_for("auth_challenge")
        given = proof(b"\0" * 32 if wrong else verifier_, PURPOSE_ENGINE, cp_id, challenge["nonce"])
        self.peer.send(protocol.AuthProof(correlation_id=challenge["correlation_id"], cp_id=cp_id, proof=given))
        result = self.peer.wait_for("auth_result")
        if result["status"] == "accepted":
            self.seal = LinkSeal(cp_id, "link", link_key(verifier_, PURPOSE_ENGINE, cp_id, challenge["nonce"]),
                                 me="monitor", peer="engine")
        return result

    def send(self, message: protocol.Message) -> None:
        self.peer.send(self.seal.seal(message) if self.seal is not None else message)

    def messages(self, kind: type | None = None) -> list[Any]:
        with self._lock:
            frames = self.peer.messages()
            for frame in frames[self._seen:]:
                msg = protocol.from_dict(frame)
                if isinstance(msg, protocol.Sealed) and self.seal is not None:
                    msg = self.seal.open(msg)
                self._opened.append(msg)
            self._seen = len(frames)
            return [m for m in self._opened if kind is None or isinstance(m, kind)]

    def wait_for(self, kind: type, where: Any = lambda m: True, timeout: float = 10.0) -> Any:
        return wait_until(lambda: next((m for m in self.messages(kind) if where(m)), None), timeout=timeout,
                          what=f"a {kind.__name__} from the Engine")

    def close(self) -> None:
        self.peer.close()


def secure_engine(kafka_settings: KafkaSettings, tmp_path: Path, creds: Credentials, **overrides: Any) -> EngineConfig:
    return engine_config(kafka_settings, tmp_path / "engine.journal", credential_file=str(creds.file),
                         **overrides)


def hello(key_id: str | None = None, key: bytes | None = None) -> protocol.Hello:
    return protocol.Hello(cp_id=CP, price_eur_kwh=0.30, key_id=key_id, key=b64e(key) if key is not None else None)


def in_journal(path: Path, session_id: str) -> bool:
    with EngineJournal(path) as journal:
        return journal.get(session_id) is not None


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    return Credentials(tmp_path)


# --------------------------------------------------------------------------- the Engine obeys only its Monitor
def test_a_strangers_frames_are_refused_and_never_acted_on(kafka_settings, tmp_path, creds, caplog) -> None:
    """Before pairing, anything (authorize_supply at price 0, hello, stop_supply, a health check) is
    answered with the sentence and ignored; the paired Monitor stays the Monitor and its supply goes on."""
    caplog.set_level("WARNING", logger="evcharging")
    system = start_engine(secure_engine(kafka_settings, tmp_path, creds, cp_id=None))  # the id from the file
    monitor = MonitorStandIn(system)
    stranger = None
    try:
        assert monitor.pair(CP, creds.verifier)["status"] == "accepted"
        monitor.send(hello())
        wait_until(lambda: status(system)["cp_id"] == CP and status(system)["monitor_connected"],
                   what="the paired Monitor's hello")

        stranger = connect_when_listening("127.0.0.1", engine_port(system))
        forged: list[protocol.Message] = [
            authorize("EVIL", price=0.0), protocol.Hello(cp_id=CP, price_eur_kwh=0.0), protocol.HealthCheck(seq=1)]
        for msg in forged:
            stranger.send(msg)
        errors = wait_until(lambda: len(e := stranger.messages("error")) == len(forged) and e,
                            what="an error per forged frame")
        assert all(e["reason"] == PAIR_FIRST for e in errors)
        assert not stranger.messages("supply_authorization_response") and not stranger.messages("health_status")
        st = status(system)
        assert (st["state"], st["session_id"], st["price_eur_kwh"], st["paired"]) == ("idle", None, 0.30, 1)
        assert not in_journal(tmp_path / "engine.journal", "EVIL")

        # the genuine Monitor starts a supply; the stranger tries to stop it and to start another
        monitor.send(authorize("S1"))
        assert monitor.wait_for(protocol.SupplyStarted).session_id == "S1"
        more: list[protocol.Message] = [protocol.StopSupply(session_id="S1", reason="driver_stop"),
                                        protocol.StopCp(reason="gotcha"), authorize("EVIL2", price=0.0)]
        for msg in more:
            stranger.send(msg)
        wait_until(lambda: len(stranger.messages("error")) == len(forged) + len(more), what="the other errors")
        seq = status(system)["seq"]
        wait_until(lambda: status(system)["seq"] >= seq + 2, what="the supply metering on")
        st = status(system)
        assert (st["state"], st["session_id"], st["stopped"]) == ("supplying", "S1", False)
        assert not in_journal(tmp_path / "engine.journal", "EVIL")
        assert not in_journal(tmp_path / "engine.journal", "EVIL2")
        assert any("has not paired" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)
        # the Monitor is still the one that paired: the supply's end goes to it
        monitor.send(protocol.StopSupply(session_id="S1", reason="driver_stop"))
        assert monitor.wait_for(protocol.SupplyEnded).end_reason == "driver_stop"
        assert not stranger.messages("supply_ended")
        fault_matrix.attack_row("stranger on the Engine port", attempts=len(forged) + len(more),
                                refused=len(stranger.messages("error")), forged_bills=0, takeovers=0)
    finally:
        if stranger is not None:
            stranger.close()
        monitor.close()
        system.stop()


def test_a_wrong_proof_or_cp_id_is_denied_and_closed_then_rate_limited(kafka_settings, tmp_path, creds) -> None:
    system = start_engine(secure_engine(kafka_settings, tmp_path, creds, cp_id=CP))
    clients: list[MonitorStandIn] = []
    try:
        def attempt(cp_id: str, wrong: bool) -> dict[str, Any]:
            client = MonitorStandIn(system)
            clients.append(client)
            client.peer.send(protocol.AuthRequest(cp_id=cp_id, correlation_id="x"))
            answer = wait_until(lambda: next(iter(client.peer.messages("auth_challenge")
                                                  + client.peer.messages("auth_result")), None),
                                what="a challenge or a verdict")
            if answer["type"] == "auth_challenge":
                given = proof(b"\0" * 32 if wrong else creds.verifier, PURPOSE_ENGINE, cp_id, answer["nonce"])
                client.peer.send(protocol.AuthProof(correlation_id="x", cp_id=cp_id, proof=given))
            result = client.peer.wait_for("auth_result")
            if result["status"] == "denied":
                assert client.peer.closed.wait(5), "a refused pairing closes the link"
            return result

        wrong = attempt(CP, wrong=True)
        assert (wrong["status"], wrong["reason"]) == ("denied", f"wrong proof for CP {CP}")
        other = attempt("MAD9", wrong=False)
        assert (other["status"], other["reason"]) == ("denied", f"this Engine is CP {CP}, not MAD9")
        for _ in range(4):
            attempt(CP, wrong=True)
        assert status(system)["paired"] == 0 and not status(system)["monitor_connected"]
        # six failures from this host: the real Monitor (on the same host, 127.0.0.1 like any local
        # process) still pairs; failures are rate-limited per address only from other hosts
        genuine = attempt(CP, wrong=False)
        assert genuine["status"] == "accepted", genuine
        fault_matrix.attack_row("wrong pairing proof at the Engine", attempts=6, refused=6, forged_bills=0,
                                takeovers=0)
    finally:
        for client in clients:
            client.close()
        system.stop()


def test_a_silent_connection_is_closed_after_the_deadline_a_paired_one_is_not(kafka_settings, tmp_path,
                                                                              creds) -> None:
    system = start_engine(secure_engine(kafka_settings, tmp_path, creds, auth_timeout=0.5))
    monitor = MonitorStandIn(system)
    silent = None
    try:
        assert monitor.pair(CP, creds.verifier)["status"] == "accepted"
        silent = connect_when_listening("127.0.0.1", engine_port(system))
        assert silent.closed.wait(5), "a connection that does not pair is closed after --auth-timeout"
        assert not monitor.peer.closed.is_set()  # paired before its deadline, which has passed too
        monitor.send(protocol.HealthCheck(seq=5))
        assert monitor.wait_for(protocol.HealthStatus).seq == 5
    finally:
        if silent is not None:
            silent.close()
        monitor.close()
        system.stop()


def test_a_second_pairing_replaces_the_first_monitor(kafka_settings, tmp_path, creds) -> None:
    """The real Monitor restarted: its new link pairs, and the old one is closed."""
    system = start_engine(secure_engine(kafka_settings, tmp_path, creds))
    first, second = MonitorStandIn(system), None
    try:
        assert first.pair(CP, creds.verifier)["status"] == "accepted"
        first.send(hello())
        wait_until(lambda: status(system)["monitor_connected"], what="the first Monitor")
        second = MonitorStandIn(system)
        assert second.pair(CP, creds.verifier)["status"] == "accepted"
        assert first.peer.closed.wait(5), "the older paired link is closed"
        second.send(hello())
        second.send(authorize("S1"))
        assert second.wait_for(protocol.SupplyStarted).session_id == "S1"
        assert status(system)["paired"] == 1
    finally:
        if second is not None:
            second.close()
        first.close()
        system.stop()


# --------------------------------------------------------------------------- sealed records from the Engine
def open_with(env: protocol.Sealed, key_id: str, key: bytes, *, state: str = "current") -> protocol.Message:
    ring = Keyring()
    ring.add(KeyInfo(key_id, CP, key, 0.0, state=state))
    return ring.open(env, topic="t")


def test_records_wait_for_a_key_are_sealed_and_a_new_key_reseals_the_completion(kafka_settings, tmp_path,
                                                                                 creds) -> None:
    """With a credential and no key yet nothing goes out plain: the newest reading and the completion
    wait. Key 1 seals them; key 2 (the Monitor authenticated again, key 1 revoked) seals the completion
    again at once — rotation and revocation never lose a bill."""
    system = start_engine(secure_engine(kafka_settings, tmp_path, creds, auto_plug=True))
    monitor = MonitorStandIn(system)
    data = TopicReader(kafka_settings, "charging_session_data")
    done = TopicReader(kafka_settings, "charging_session_complete")
    k1, k2 = new_key(), new_key()
    try:
        assert monitor.pair(CP, creds.verifier)["status"] == "accepted"
        monitor.send(hello())  # the Monitor has not authenticated to Central: no key
        monitor.send(authorize("S1"))
        wait_until(lambda: status(system)["seq"] >= 3, what="a few ticks without a key")
        assert status(system)["held_data"] == 1  # only the newest reading is kept
        monitor.send(protocol.StopSupply(session_id="S1", reason="driver_stop"))
        ended = monitor.wait_for(protocol.SupplyEnded)
        wait_until(lambda: status(system)["held_completions"] == 1, what="the completion waiting for a key")
        assert data.poll() == [] and done.poll() == []  # nothing plain, nothing at all

        monitor.send(hello("key-1", k1))
        [first] = done.wait_for(lambda ms: ms if len(ms) == 1 else None, what="the completion sealed with key 1")
        assert isinstance(first, protocol.Sealed) and (first.key_id, first.sender) == ("key-1", "engine")
        inner = open_with(first, "key-1", k1)
        assert isinstance(inner, protocol.ChargeCompletion)
        assert (inner.session_id, inner.energy_kwh) == ("S1", pytest.approx(ended.energy_kwh))
        [reading] = data.wait_for(lambda ms: ms if ms else None, what="the held reading, sealed")
        assert isinstance(open_with(reading, "key-1", k1), protocol.ChargingData)
        assert all(key == CP for key, _ in done.records + data.records)

        # key 1 is revoked at Central: what it sealed no longer opens; key 2 reseals the completion
        with pytest.raises(SecurityError, match="revoked"):
            open_with(first, "key-1", k1, state="revoked")
        monitor.send(hello("key-2", k2))
        second = done.wait_for(lambda ms: ms[1] if len(ms) == 2 else None, what="the completion sealed with key 2")
        assert second.key_id == "key-2" and second.ctr > first.ctr
        again = open_with(second, "key-2", k2)
        assert isinstance(again, protocol.ChargeCompletion)
        assert (again.session_id, again.energy_kwh, again.end_reason) == (inner.session_id, inner.energy_kwh,
                                                                          inner.end_reason)
        assert status(system)["key_id"] == "key-2"
    finally:
        data.close()
        done.close()
        monitor.close()
        system.stop()


def test_without_a_credential_the_engine_runs_as_before_and_says_so(kafka_settings, tmp_path, caplog) -> None:
    caplog.set_level("WARNING", logger="evcharging")
    system = start_engine(engine_config(kafka_settings, tmp_path / "engine.journal"))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        assert any("DEVELOPMENT MODE" in r.getMessage() for r in caplog.records)
        peer.send(protocol.AuthRequest(cp_id=CP, correlation_id="c1"))
        refused = peer.wait_for("auth_result")
        assert refused["status"] == "denied" and "without a credential" in refused["reason"]
        peer.send(protocol.HealthCheck(seq=1))
        assert peer.wait_for("health_status")["ok"] is True
    finally:
        peer.close()
        system.stop()


def test_engine_listens_on_loopback_by_default_and_a_credential_needs_the_cp_id(tmp_path, monkeypatch) -> None:
    from supervisors.engine_system import build_parser, config_from_args, engine_credential

    assert EngineConfig().listen_host == "127.0.0.1"
    assert config_from_args(build_parser().parse_args(["127.0.0.1:9092"])).listen_host == "127.0.0.1"
    secret = new_secret()
    bare = tmp_path / "bare.secret"
    bare.write_text(secret)
    with pytest.raises(SecurityError, match="--cp-id"):
        engine_credential(EngineConfig(credential_file=str(bare)))
    monkeypatch.setenv("EV_CP_SECRET", secret)
    config, cred = engine_credential(EngineConfig(cp_id="MAD1"))
    assert cred is not None and cred.verifier == verifier("cp", "MAD1", secret) and config.cp_id == "MAD1"
    assert secret not in repr(cred) and secret not in repr(config)
    named = write_credential(tmp_path / "mad2.json", "cp", "MAD2", secret)
    monkeypatch.delenv("EV_CP_SECRET")
    config, cred = engine_credential(EngineConfig(credential_file=str(named)))
    assert config.cp_id == "MAD2" and cred is not None and cred.cp_id == "MAD2"
    with pytest.raises(SecurityError, match="is for 'MAD2', not 'MAD1'"):
        engine_credential(EngineConfig(cp_id="MAD1", credential_file=str(named)))


# --------------------------------------------------------------------------- Central's router opens them
class SealedMonitor(FakeMonitor):
    """FakeMonitor that authenticates to Central (docs/protocol.md) and then seals every frame."""

    def __init__(self, port: int, cp_id: str, verifier_: bytes) -> None:
        super().__init__(port, cp_id)
        self.verifier = verifier_
        self.seal: LinkSeal | None = None

    def authenticate(self) -> tuple[str, bytes]:
        """The CP key Central issued (its id, its bytes): the key the Engine seals with."""
        corr = uuid.uuid4().hex
        self.send(protocol.AuthRequest(cp_id=self.cp_id, correlation_id=corr))
        challenge = self.expect(protocol.AuthChallenge)
        self.send(protocol.AuthProof(correlation_id=corr, cp_id=self.cp_id,
                                     proof=proof(self.verifier, PURPOSE_CENTRAL, self.cp_id, challenge.nonce)))
        result = self.expect(protocol.AuthResult)
        assert result.status == "accepted", result.reason
        key = unwrap_key(self.verifier, self.cp_id, challenge.nonce, result.key_id, result.wrapped_key)
        self.seal = LinkSeal(self.cp_id, result.key_id, key, me="monitor", peer="central")
        return result.key_id, key

    def send(self, msg: Any) -> None:
        super().send(self.seal.seal(msg) if self.seal is not None else msg)

    def decode(self, data: bytes) -> Any:
        m = protocol.decode(data)
        return self.seal.open(m) if isinstance(m, protocol.Sealed) and self.seal is not None else m


def dead_records(settings: KafkaSettings, logical: str, count: int, timeout: float = 20.0) -> list[Any]:
    """The first ``count`` records of every partition of ``<logical>.dead``."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    found: list[Any] = []
    try:
        tps = [TopicPartition(settings.dead_topic(logical), p) for p in range(TOPICS[logical])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)

        def enough() -> bool:
            for records in consumer.poll(timeout_ms=100).values():
                found.extend(records)
            return len(found) >= count
        wait_until(enough, timeout=timeout, what=f"{count} record(s) on {settings.dead_topic(logical)}")
    finally:
        consumer.close()
    return found


@pytest.fixture
def secured_central(kafka_settings: KafkaSettings, tmp_path: Path) -> Any:
    """Central with security on (enroll=registry): MAD1 and driver d1 registered with the registry."""
    from supervisors.central_system import CentralSystemConfig, start_central

    db = str(tmp_path / "central.db")
    cp_secret, driver_secret = new_secret(), new_secret()
    with Repository(db) as repo:
        repo.upsert_cp("MAD1", "Madrid Sol", 0.40, max_power_kw=3600)  # 1 kWh a second is plausible
        repo.register("cp", "MAD1", verifier("cp", "MAD1", cp_secret))
        repo.register("driver", "d1", verifier("driver", "d1", driver_secret))
    config = CentralSystemConfig(port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
                                 topic_prefix=kafka_settings.topic_prefix, authorize_timeout=2.0, enroll="registry")
    system = start_central(config)
    peer = KafkaPeer(kafka_settings)
    try:
        assert system.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
        system.port = system.ask("monitor-listener", ListenerPort())
        system.db = db
        system.peer = peer
        system.cp_secret = cp_secret  # for an Engine of MAD1 (its credential file)
        system.cp_verifier = verifier("cp", "MAD1", cp_secret)
        system.driver_verifier = verifier("driver", "d1", driver_secret)
        yield system
    finally:
        system.stop()
        peer.close()


def open_supply(central: Any, m: SealedMonitor) -> str:
    """A signed charge request of d1 at MAD1, authorised and started by the Monitor; the session id."""
    corr = uuid.uuid4().hex
    request = protocol.ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id=corr)
    central.peer.send("driver_requests", "d1", sign(central.driver_verifier, "d1", request))
    auth = m.expect(protocol.AuthorizeSupply)
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=True))
    answer = central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == corr)[0]
    assert answer.status == "authorized", answer.reason
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=auth.session_id, driver_id="d1"))
    return str(auth.session_id)


def test_central_bills_only_the_genuine_sealed_completion(secured_central) -> None:
    """(a) unsealed, (b) wrong key, (c) genuine, (d) the genuine record again, (e) sealed for MAD1 but keyed
    MAD2, and sealed claiming MAD2 with MAD1's key: one ticket, with the genuine figures; the rest
    dead-lettered as refused and never seen by a session, the ledger or Central's figures."""
    central = secured_central
    m = SealedMonitor(central.port, "MAD1", central.cp_verifier)
    try:
        key_id, key = m.authenticate()
        assert m.register().status == "accepted"
        m.heartbeat(True)
        wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["state"] == "ACTIVE", what="MAD1 ACTIVE")
        sid = open_supply(central, m)
        ctr = MicroCounter()

        def sealed(msg: protocol.Message, *, with_key: bytes = key, cp_id: str = "MAD1") -> protocol.Sealed:
            return seal(with_key, cp_id, key_id, "engine", ctr.next(), msg)

        def reading(seq: int, kwh: float) -> protocol.ChargingData:
            return protocol.ChargingData(cp_id="MAD1", session_id=sid, driver_id="d1", seq=seq, energy_kwh=kwh,
                                         cost_eur=kwh * 0.4, power_kw=7.4)

        for seq in (1, 2, 3):
            central.peer.send("charging_session_data", "MAD1", sealed(reading(seq, 0.5 * seq)))
        central.peer.send("charging_session_data", "MAD1", reading(4, 500.0))  # unsealed: refused
        wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["energy_kwh"] == pytest.approx(1.5),
                   what="Central saw the sealed telemetry")

        def completion(kwh: float, cost: float) -> protocol.ChargeCompletion:
            return protocol.ChargeCompletion(cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=kwh,
                                             cost_eur=cost, end_reason="unplugged")

        genuine = sealed(completion(1.6, 0.64))
        attacks = {
            "unsealed": ("MAD1", completion(900.0, 0.01)),
            "wrong key": ("MAD1", sealed(completion(1.7, 0.01), with_key=new_key())),
            "keyed MAD2": ("MAD2", sealed(completion(1.8, 0.01))),
            "claims MAD2": ("MAD2", sealed(protocol.ChargeCompletion(
                cp_id="MAD2", session_id=sid, driver_id="d1", energy_kwh=1.9, cost_eur=0.01,
                end_reason="unplugged"), cp_id="MAD2")),
        }
        for name in ("unsealed", "wrong key"):
            central.peer.send("charging_session_complete", *attacks[name])
        central.peer.send("charging_session_complete", "MAD1", genuine)
        ticket = central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid)[0]
        assert (ticket.energy_kwh, ticket.cost_eur) == (1.6, 0.64)
        central.peer.send("charging_session_complete", "MAD1", genuine)  # (d) a replay at a new offset
        for name in ("keyed MAD2", "claims MAD2"):
            central.peer.send("charging_session_complete", *attacks[name])

        dead = dead_records(central.peer.settings, "charging_session_complete", 5)
        reasons = {r.value: dict(r.headers)["reason"].decode() for r in dead}
        assert all(reason.startswith("refused: ") for reason in reasons.values()), reasons
        assert "not sealed" in reasons[protocol.encode(attacks["unsealed"][1])]
        assert "does not open" in reasons[protocol.encode(attacks["wrong key"][1])]
        assert "replayed" in reasons[protocol.encode(genuine)]
        assert "keyed 'MAD2'" in reasons[protocol.encode(attacks["keyed MAD2"][1])]
        assert "key of CP MAD1" in reasons[protocol.encode(attacks["claims MAD2"][1])]
        [plain_reading] = dead_records(central.peer.settings, "charging_session_data", 1)
        assert dict(plain_reading.headers)["reason"].decode().startswith("refused: not sealed")

        stats = central.ask("router", RouterStats())
        assert (stats["refused"], stats["completions"], stats["orphans"]) == (6, 1, 0)
        with Repository(central.db) as repo:
            assert [(t.session_id, t.energy_kwh, t.cost_cents) for t in repo.tickets()] == [(sid, 1.6, 64)]
            assert repo.get_session(sid).energy_kwh == 1.6
            audited = " ".join(a.detail for a in repo.recent_audit(500)
                               if a.event in ("completion_rejected", "energy_review", "cost_mismatch"))
        for _, forged in attacks.values():
            assert getattr(forged, "message_id", "-") not in audited  # the ledger never saw them
        fault_matrix.attack_row("unsealed completion", attempts=2, refused=2, forged_bills=0, takeovers=0)
        fault_matrix.attack_row("wrongly sealed completion", attempts=3, refused=3, forged_bills=0, takeovers=0)
        fault_matrix.attack_row("replayed completion", attempts=1, refused=1, forged_bills=0, takeovers=0)
    finally:
        m.close()


def test_a_completion_sealed_with_a_revoked_key_is_resealed_with_the_new_key_and_billed_once(
        secured_central, kafka_settings, tmp_path) -> None:
    """The real Engine behind a relaying Monitor stand-in: Central revokes MAD1's key mid-supply, the
    completion sealed with it is dead-lettered; the Monitor authenticates again and hands the new key
    over in hello, and the Engine at once sends the completion sealed with it: billed exactly once."""
    from actors.gatekeeper import RevokeCp

    central = secured_central
    file = write_credential(tmp_path / "MAD1.credential.json", "cp", "MAD1", central.cp_secret)
    m = SealedMonitor(central.port, "MAD1", central.cp_verifier)
    m2: SealedMonitor | None = None
    engine = start_engine(engine_config(kafka_settings, tmp_path / "engine.journal", credential_file=str(file)))
    e = MonitorStandIn(engine)
    try:
        k1_id, k1 = m.authenticate()
        assert m.register().status == "accepted"
        m.heartbeat(True)
        assert e.pair("MAD1", central.cp_verifier)["status"] == "accepted"
        e.send(protocol.Hello(cp_id="MAD1", price_eur_kwh=0.40, key_id=k1_id, key=b64e(k1)))
        wait_until(lambda: status(engine)["key_id"] == k1_id, what="the Engine has key 1")

        corr = uuid.uuid4().hex
        central.peer.send("driver_requests", "d1", sign(central.driver_verifier, "d1", protocol.ChargeRequest(
            driver_id="d1", cp_id="MAD1", correlation_id=corr)))
        e.send(m.expect(protocol.AuthorizeSupply))  # the Monitor relays Central's order...
        m.send(e.wait_for(protocol.SupplyAuthorizationResponse))  # ...and the Engine's answer
        m.send(e.wait_for(protocol.SupplyStarted))
        sid = central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == corr)[0].session_id
        wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["energy_kwh"] > 0,
                   what="Central opened the Engine's sealed telemetry")

        assert "MAD1" in central.ask("gatekeeper", RevokeCp("MAD1", "test"))
        e.send(protocol.StopSupply(session_id=sid, reason="driver_stop"))
        ended = e.wait_for(protocol.SupplyEnded)
        dead = wait_until(lambda: [r for r in dead_records(central.peer.settings, "charging_session_complete", 1)
                                   if "revoked" in dict(r.headers)["reason"].decode()],
                          what="the completion sealed with the revoked key dead-lettered")
        assert protocol.decode(dead[0].value).key_id == k1_id
        with Repository(central.db) as repo:
            assert repo.get_ticket(sid) is None

        m2 = SealedMonitor(central.port, "MAD1", central.cp_verifier)
        k2_id, k2 = m2.authenticate()
        assert k2_id != k1_id
        e.send(protocol.Hello(cp_id="MAD1", price_eur_kwh=0.40, key_id=k2_id, key=b64e(k2)))
        ticket = central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid, timeout=20)[0]
        assert ticket.energy_kwh == pytest.approx(ended.energy_kwh)
        with Repository(central.db) as repo:
            assert [t.session_id for t in repo.tickets()] == [sid]
        fault_matrix.attack_row("completion under a revoked key (resealed)", attempts=1, refused=1, forged_bills=0,
                                takeovers=0, genuine_ok=True)
    finally:
        e.close()
        engine.stop()
        m.close()
        if m2 is not None:
            m2.close()
