"""Poison records cannot stall billing (issue #10): dead-letter topics, bounded retries, paging.

Against a real broker: the pump sets aside what cannot be decoded or handled in
``<topic>.dead`` (with the reason in the headers) and commits past it; a
retriable failure is retried with backoff, and a record that keeps failing is
found and dead-lettered after the bound; the Publisher dead-letters what the
broker would refuse and keeps serving; Central pages its CP list.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from actors.panel import PanelText
from actors.runtime import Directory, SupervisedActor, Supervision
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.supervisor import ChildSpec, start_tree
from tests import fault_matrix
from tests.fakes import FakeMonitor, KafkaPeer
from tests.waiting import wait_until
from transport import protocol
from transport.broker import KafkaSettings
from transport.kafka import (
    ConsumerPump,
    DeadLettered,
    Delivery,
    Handled,
    Publish,
    Published,
    Publisher,
    PublishFailed,
    SetAside,
    TargetUnavailable,
    wait_ready,
)
from transport.listener import ListenerPort

pytestmark = pytest.mark.broker


# --- helpers ----------------------------------------------------------------------------------
def read_dead(settings: KafkaSettings, logical: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The first ``count`` records of ``<topic>.dead``: {'key', 'value', and each header}."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    tp = TopicPartition(settings.dead_topic(logical), 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    found: list[dict[str, Any]] = []
    try:
        def enough() -> bool:
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    row: dict[str, Any] = {"key": r.key.decode() if r.key else None, "value": r.value}
                    row.update({k: v.decode() for k, v in r.headers})
                    found.append(row)
            return len(found) >= count
        wait_until(enough, timeout=timeout, what=f"{count} record(s) in {settings.dead_topic(logical)}")
    finally:
        consumer.close()
    return found


def raw_send(settings: KafkaSettings, logical: str, records: list[tuple[str, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, enable_idempotence=False, linger_ms=5)
    try:
        for key, value in records:
            producer.send(settings.topic(logical), key=key.encode(), value=value)
        producer.flush(5)
    finally:
        producer.close(1)


class Target(SupervisedActor):
    """A pump target: ``mode`` says how it answers a Delivery.

    * "flaky": raises for the first ``fail_times`` deliveries (a retriable failure);
    * "unavailable": raises TargetUnavailable for the first ``fail_times`` deliveries;
    * "poison": raises whenever a record keyed POISON is in the delivery;
    * "picky": sets aside every record that is not a charging_data.
    """

    def __init__(self, mode: str, fail_times: int = 0, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.mode = mode
        self.fail_times = fail_times
        self.calls = 0
        self.seen: list[Any] = []
        self.notices: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                self.calls += 1
                if self.mode in ("flaky", "unavailable") and self.calls <= self.fail_times:
                    raise (TargetUnavailable if self.mode == "unavailable" else RuntimeError)("database is locked")
                if self.mode == "poison" and any(i.key == "POISON" for i in items):
                    raise ArithmeticError("cost overflows the ledger")
                if self.mode == "picky":
                    bad = tuple(SetAside(i, f"a {i.message.TYPE} is not telemetry") for i in items
                                if not isinstance(i.message, protocol.ChargingData))
                    self.seen.extend(i for i in items if isinstance(i.message, protocol.ChargingData))
                    return Handled(bad)
                self.seen.extend(items)
                return True
            case DeadLettered() | PublishFailed() | Published():
                self.notices.append(message)
            case "seen":
                return list(self.seen)
            case "calls":
                return self.calls
            case "notices":
                return list(self.notices)
        return None


def data(cp: str, seq: int) -> protocol.ChargingData:
    return protocol.ChargingData(cp_id=cp, session_id="s1", driver_id="d1", seq=seq, energy_kwh=seq * 0.1,
                                 cost_eur=seq * 0.03, power_kw=7.4)


def pump_tree(settings: KafkaSettings, target: Target | tuple[Any, ...], topic: str, stop_at_end: Any,
              **pump: Any) -> Directory:
    directory = Directory()
    args = target if isinstance(target, tuple) else ()
    sup = start_tree("t", [
        ChildSpec("target", Target, args),
        ChildSpec("pump", ConsumerPump, (settings, (topic,), "target", directory),
                  {"group_id": "dl-" + uuid.uuid4().hex[:6], "retry_backoff": (0.01, 0.05), **pump}),
    ], directory=directory, backoff_base=0.01)
    stop_at_end(sup)
    assert wait_ready(directory.get("pump"))
    return directory


def seen_keys(directory: Directory) -> list[str]:
    return [i.key for i in directory.get("target").ask("seen")]


# --- the pump -----------------------------------------------------------------------------------
def test_undecodable_and_refused_records_go_to_the_dead_topic_and_the_rest_flows(kafka_settings,
                                                                                 stop_at_end) -> None:
    d = pump_tree(kafka_settings, ("picky",), "charging_session_data", stop_at_end)
    seq_too_big = dict(json.loads(protocol.encode(data("CP1", 1))), seq=2**63)
    raw_send(kafka_settings, "charging_session_data", [
        ("CP1", b"\x00garbage"),
        ("CP1", json.dumps(seq_too_big).encode()),
        ("CP1", protocol.encode(protocol.FaultCleared(cp_id="CP1"))),  # decodes, but the target refuses it
        ("CP1", protocol.encode(data("CP1", 2))),
    ])
    wait_until(lambda: seen_keys(d) == ["CP1"], what="the good record handled")
    dead = read_dead(kafka_settings, "charging_session_data", 3)
    assert [row["offset"] for row in dead] == ["0", "1", "2"]
    assert dead[0]["value"] == b"\x00garbage" and "not valid JSON" in dead[0]["reason"]
    assert "field 'seq' of charging_data must be at most 9,007,199,254,740,991" in dead[1]["reason"]
    assert dead[2]["reason"] == "a fault_cleared is not telemetry"
    assert all(row["topic"] == "charging_session_data" and row["partition"].isdigit() and row["component"] == "pump"
               for row in dead)
    notices = wait_until(lambda: len(n := d.get("target").ask("notices")) == 3 and n, what="3 notices")
    assert all(isinstance(n, DeadLettered) and n.topic == "charging_session_data" for n in notices)
    # committed past them: a new pump of the same group reads only what comes next
    raw_send(kafka_settings, "charging_session_data", [("CP1", protocol.encode(data("CP1", 3)))])
    wait_until(lambda: seen_keys(d) == ["CP1", "CP1"], what="the next record")


def test_a_retriable_failure_is_retried_with_backoff_then_handled(kafka_settings, stop_at_end) -> None:
    d = pump_tree(kafka_settings, ("flaky", 2), "charging_session_data", stop_at_end, retry_attempts=4)
    first_pump = d.get("pump")
    raw_send(kafka_settings, "charging_session_data", [("CP1", protocol.encode(data("CP1", 1)))])
    wait_until(lambda: seen_keys(d) == ["CP1"], what="handled on the third attempt")
    assert d.get("target").ask("calls") == 3
    assert d.get("pump") is first_pump  # retried in place: no crash, no restart


def test_a_target_that_is_not_running_yet_is_waited_for_without_counting(kafka_settings, stop_at_end) -> None:
    # One attempt only: if "not running" counted, the record would be dead-lettered at once.
    d = pump_tree(kafka_settings, ("unavailable", 3), "charging_session_data", stop_at_end, retry_attempts=1)
    raw_send(kafka_settings, "charging_session_data", [("CP1", protocol.encode(data("CP1", 1)))])
    wait_until(lambda: seen_keys(d) == ["CP1"], what="handled once the target could")
    assert d.get("target").ask("notices") == []


def test_a_record_that_always_fails_is_found_and_dead_lettered_after_the_bound(kafka_settings,
                                                                              stop_at_end) -> None:
    d = pump_tree(kafka_settings, ("poison",), "charging_session_complete", stop_at_end, retry_attempts=3)
    completion = protocol.ChargeCompletion(cp_id="CP1", session_id="s1", driver_id="d1", energy_kwh=1.0,
                                           cost_eur=0.3, end_reason="unplugged")
    raw_send(kafka_settings, "charging_session_complete", [
        ("GOOD1", protocol.encode(completion)), ("POISON", protocol.encode(completion)),
        ("GOOD2", protocol.encode(completion))])
    dead = read_dead(kafka_settings, "charging_session_complete", 1)
    assert dead[0]["key"] == "POISON" and dead[0]["value"] == protocol.encode(completion)
    assert dead[0]["reason"] == "target failed 3 times: cost overflows the ledger"
    wait_until(lambda: {"GOOD1", "GOOD2"} <= set(seen_keys(d)), what="the good records handled")
    assert "POISON" not in seen_keys(d)
    raw_send(kafka_settings, "charging_session_complete", [("GOOD3", protocol.encode(completion))])
    wait_until(lambda: "GOOD3" in seen_keys(d), what="the partition flows on")


# --- the publisher --------------------------------------------------------------------------------
def test_the_publisher_dead_letters_a_record_too_large_and_keeps_serving(kafka_settings, stop_at_end) -> None:
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("target", Target, ("picky",)),
        ChildSpec("publisher", Publisher, (kafka_settings,),
                  {"max_request_bytes": 20_000, "faults": (directory, "target"), "component": "central"}),
    ], directory=directory)
    stop_at_end(sup)
    target, publisher = directory.get("target"), directory.get("publisher")
    cps = tuple(protocol.CpInfo(cp_id=f"CP{i}", location="L" * 200, price_eur_kwh=0.3, state="ACTIVE")
                for i in range(200))
    big = protocol.AvailableCpsResponse(driver_id="d1", correlation_id="c1", charging_points=cps)
    publisher.tell(Publish("driver_responses", "d1", big, target, "big"))
    publisher.tell(Publish("driver_responses", "d1", protocol.ErrorMessage(reason="small"), target, "small"))
    notices = wait_until(lambda: len(n := target.ask("notices")) >= 3 and n, what="failed, dead-lettered, published")
    failed = [n for n in notices if isinstance(n, PublishFailed)]
    assert [f.token for f in failed] == ["big"] and "larger" in failed[0].reason
    assert [n.token for n in notices if isinstance(n, Published)] == ["small"]
    assert any(isinstance(n, DeadLettered) and n.topic == "driver_responses" and n.key == "d1" for n in notices)
    dead = read_dead(kafka_settings, "driver_responses", 1)
    assert dead[0]["key"] == "d1" and dead[0]["truncated"] == "true" and "larger" in dead[0]["reason"]
    assert int(dead[0]["size"]) == len(protocol.encode(big)) and len(dead[0]["value"]) < 20_000
    assert dead[0]["value"] == protocol.encode(big)[: len(dead[0]["value"])]
    assert publisher.ask(_stats())["pending"] == 0


def _stats() -> Any:
    from transport.kafka import GetPublisherStats

    return GetPublisherStats()


# --- Central --------------------------------------------------------------------------------------
@pytest.fixture
def central(kafka_settings, tmp_path):
    db = str(tmp_path / "central.db")
    with Repository(db) as repo:
        repo.upsert_cp("MAD1", "Madrid Sol", 0.40)
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
                                 topic_prefix=kafka_settings.topic_prefix, authorize_timeout=2.0, life_timeout=30.0)
    system = start_central(config)
    assert system.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
    system.port = system.ask("monitor-listener", ListenerPort())
    system.db = db
    system.peer = KafkaPeer(kafka_settings)
    yield system
    system.stop()
    system.peer.close()


def test_poison_records_on_the_billing_topics_do_not_stop_billing(central, kafka_settings) -> None:
    from actors.central import CentralStatus

    peer = central.peer
    m = FakeMonitor(central.port, "MAD1")
    assert m.register().status == "accepted"
    m.heartbeat(True)
    wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["state"] == "ACTIVE")
    corr = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id=corr))
    auth = m.expect(protocol.AuthorizeSupply)
    sid = auth.session_id
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=sid, accepted=True))
    peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == corr and r.status == "authorized")
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=sid, driver_id="d1"))
    started = time.monotonic()
    # the poison: a completion costing 1e26 € for a session nobody knows, garbage, a record of the wrong
    # type, telemetry with seq 2^63 ...
    huge = {"type": "charge_completion", "cp_id": "MAD1", "session_id": "ghost", "driver_id": "d9",
            "energy_kwh": 1.0, "cost_eur": 1e26, "end_reason": "unplugged", "message_id": "m1", "timestamp": 1.0}
    raw_send(kafka_settings, "charging_session_complete", [
        ("MAD1", json.dumps(huge).encode()),
        ("MAD1", b"\xde\xad\xbe\xef"),
        ("MAD1", protocol.encode(protocol.ChargingData(cp_id="MAD1", session_id=sid, driver_id="d1", seq=1,
                                                       energy_kwh=0.1, cost_eur=0.04, power_kw=7.4))),
    ])
    bad_seq = dict(json.loads(protocol.encode(protocol.ChargingData(
        cp_id="MAD1", session_id=sid, driver_id="d1", seq=1, energy_kwh=0.1, cost_eur=0.04, power_kw=7.4))),
        seq=2**63)
    raw_send(kafka_settings, "charging_session_data", [("MAD1", json.dumps(bad_seq).encode())])
    # ... then the real supply's telemetry and completion
    peer.send("charging_session_data", "MAD1", protocol.ChargingData(
        cp_id="MAD1", session_id=sid, driver_id="d1", seq=1, energy_kwh=0.5, cost_eur=0.2, power_kw=7.4))
    peer.send("charging_session_complete", "MAD1", protocol.ChargeCompletion(
        cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=1.0, cost_eur=0.4, end_reason="unplugged"))
    ticket = peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid, timeout=30)[0]
    recover = time.monotonic() - started
    assert ticket.cp_id == "MAD1" and ticket.driver_id == "d1"
    dead = read_dead(kafka_settings, "charging_session_complete", 3)
    reasons = [row["reason"] for row in dead]
    assert "field 'cost_eur' of charge_completion must be at most 1,000,000" in reasons[0]
    assert reasons[1].startswith("cannot decode: message is not")
    assert reasons[2] == "a charging_data record does not belong on charging_session_complete"
    assert all(row["component"] == "central-sessions" for row in dead)
    data_dead = read_dead(kafka_settings, "charging_session_data", 1)
    assert "field 'seq' of charging_data must be at most" in data_dead[0]["reason"]
    # Central shows them as faults
    text = wait_until(lambda: (t := central.ask("panel", PanelText())) and t.count("FAULT:") >= 4 and t,
                      what="four FAULT lines in the panel")
    assert "charging_session_complete.dead" in text
    m.close()
    fault_matrix.billing_row("poison records on the billing topics", central.db, [sid], recover)
    with Repository(central.db) as repo:
        assert [t.session_id for t in repo.tickets()] == [sid]


def test_a_wrong_record_on_driver_requests_is_set_aside(central, kafka_settings) -> None:
    peer = central.peer
    peer.send("driver_requests", "d1", protocol.FaultCleared(cp_id="MAD1"))
    corr = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.AvailableCpsRequest(driver_id="d1", correlation_id=corr))
    peer.wait_for(protocol.AvailableCpsResponse, lambda r: r.correlation_id == corr)
    dead = read_dead(kafka_settings, "driver_requests", 1)
    assert dead[0]["reason"] == "a fault_cleared record does not belong on driver_requests"
    assert dead[0]["component"] == "central-requests"


@pytest.fixture
def crowded_central(kafka_settings, tmp_path):
    """Central knowing 1,200 CPs whose locations are maximal (200 characters of 4 UTF-8 bytes)."""
    db = str(tmp_path / "central.db")
    with Repository(db) as repo:
        for i in range(1200):
            repo.upsert_cp(f"CP{i:05d}", "\U0001d11e" * 199 + str(i % 10), 0.30)
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
                                 topic_prefix=kafka_settings.topic_prefix, life_timeout=30.0)
    system = start_central(config)
    assert system.wait_ready(30)
    system.peer = KafkaPeer(kafka_settings)
    yield system
    system.stop()
    system.peer.close()


def test_a_list_bigger_than_a_broker_record_is_paged_and_every_page_arrives(crowded_central) -> None:
    peer = crowded_central.peer
    # an old client (no paging fields) gets the first page and learns there is more
    corr = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.AvailableCpsRequest(driver_id="d1", correlation_id=corr))
    first = peer.wait_for(protocol.AvailableCpsResponse, lambda r: r.correlation_id == corr, timeout=30)[0]
    assert len(first.charging_points) == protocol.PAGE_SIZE and first.more and first.total == 1200
    assert first.next_after == first.charging_points[-1].cp_id == f"CP{protocol.PAGE_SIZE - 1:05d}"
    # follow the cursor to the end
    seen = [c.cp_id for c in first.charging_points]
    after = first.next_after
    pages = 1
    while after is not None:
        corr = uuid.uuid4().hex
        peer.send("driver_requests", "d1", protocol.AvailableCpsRequest(driver_id="d1", correlation_id=corr,
                                                                        after=after, limit=500))
        page = peer.wait_for(protocol.AvailableCpsResponse, lambda r, c=corr: r.correlation_id == c, timeout=30)[0]
        seen += [c.cp_id for c in page.charging_points]
        after = page.next_after if page.more else None
        pages += 1
    assert seen == [f"CP{i:05d}" for i in range(1200)] and pages == 1 + 2  # 200, then 500 + 500
    assert all(len(c.location) == 200 for c in first.charging_points)
    # nothing was held up: a later request is answered
    corr = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.ChargeRequest(driver_id="d1", cp_id="NOPE", correlation_id=corr))
    denied = peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == corr)[0]
    assert denied.reason == "unknown CP NOPE"
    assert crowded_central.ask("publisher", _stats())["dead_lettered"] == 0
