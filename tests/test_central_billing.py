"""Issue #10 items 3, 5, 6 through Central in-process (real broker, sockets, SQLite):
Central's own bill, forged and mismatched completions (audited, dead-lettered),
the same charge_request twice, and operator stops across a Central restart."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from actors.central import CentralStatus
from actors.console import ConsoleLine
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from tests import fault_matrix, test_central
from tests.fakes import FakeMonitor
from tests.test_central import active_monitor, charge, response, state
from tests.waiting import wait_until
from transport import protocol
from transport.broker import TOPICS
from transport.listener import ListenerPort

pytestmark = pytest.mark.broker

central = test_central.central  # the fixture: Central with MAD1 and MAD2 seeded


def supplying_session(central, m: FakeMonitor, driver: str, cp: str, kwh: float) -> str:
    """Authorise and start a supply; telemetry up to ``kwh`` (seen by Central). Returns the session id."""
    corr = charge(central, driver, cp)
    auth = m.expect(protocol.AuthorizeSupply)
    sid = auth.session_id
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=sid, accepted=True))
    assert response(central, corr).status == "authorized"
    m.send(protocol.SupplyStarted(cp_id=cp, session_id=sid, driver_id=driver))
    for seq in (1, 2, 3):
        central.peer.send("charging_session_data", cp, protocol.ChargingData(
            cp_id=cp, session_id=sid, driver_id=driver, seq=seq, energy_kwh=kwh * seq / 3, cost_eur=0.0, power_kw=7.4))
    wait_until(lambda: central.ask("central", CentralStatus())[cp]["energy_kwh"] == pytest.approx(kwh),
               what="Central saw the telemetry")
    return sid


def audit(central, event: str) -> list[str]:
    with Repository(central.db) as repo:
        return [a.detail for a in repo.recent_audit(200) if a.event == event]


def dead_letters(central, topic: str, where, count: int = 1, timeout: float = 20.0) -> list:
    """Records on ``<topic>.dead`` whose value (the original bytes) matches ``where``."""
    settings = central.peer.settings
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    try:
        tps = [TopicPartition(settings.dead_topic(topic), p) for p in range(TOPICS[topic])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        found: list = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=100).values():
                found += [r for r in records if where(r.value)]
        assert len(found) >= count, f"no dead letter on {settings.dead_topic(topic)} within {timeout} s"
        return found
    finally:
        consumer.close()


def test_a_forged_completion_before_the_genuine_one_is_not_the_ticket(central) -> None:
    """(a) A stock Kafka client publishes a completion with the right session, CP and driver,
    0.001 kWh for 9,999 €: below what Central metered, so rejected, audited, dead-lettered;
    the supply goes on, and the genuine completion is billed with Central's figure."""
    m = active_monitor(central, "MAD1")
    sid = supplying_session(central, m, "d1", "MAD1", 1.5)
    forged = protocol.ChargeCompletion(cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=0.001,
                                       cost_eur=9999.0, end_reason="unplugged")
    central.peer.send("charging_session_complete", "MAD1", forged)
    wait_until(lambda: any(forged.message_id in d for d in audit(central, "completion_rejected")),
               what="the forgery audited")
    dead_letters(central, "charging_session_complete", lambda v: forged.message_id.encode() in v)
    m.heartbeat(True)
    assert state(central, "MAD1") == "SUPPLYING"  # the forgery did not end the supply
    with Repository(central.db) as repo:
        assert repo.get_ticket(sid) is None
    # the genuine completion: 1.6 kWh; the Engine's cost is off (0.70 €): Central bills 1.6 × 0.40
    genuine = protocol.ChargeCompletion(cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=1.6, cost_eur=0.70,
                                        end_reason="unplugged")
    central.peer.send("charging_session_complete", "MAD1", genuine)
    ticket = central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid)[0]
    assert (ticket.energy_kwh, ticket.cost_eur) == (1.6, 0.64)
    with Repository(central.db) as repo:
        billed = repo.get_ticket(sid)
        assert (billed.energy_kwh, billed.cost_cents, billed.reported_cost_eur) == (1.6, 64, 0.70)
    assert any(sid in d and "0.7000 EUR" in d for d in audit(central, "cost_mismatch"))
    central.peer.send("charging_session_complete", "MAD1", forged)  # replayed after the bill: the ticket is re-sent
    again = central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid, count=2)
    assert {(t.energy_kwh, t.cost_eur) for t in again} == {(1.6, 0.64)}
    with Repository(central.db) as repo:
        assert [(t.session_id, t.cost_cents) for t in repo.tickets()] == [(sid, 64)]


@pytest.mark.parametrize("wrong", ["cp_id", "driver_id"])
def test_a_completion_naming_another_cp_or_driver_is_rejected_and_dead_lettered(central, wrong: str) -> None:
    """(b) Right session id, wrong CP or driver: not billed, audited, set aside on the dead-letter topic."""
    m1, m2 = active_monitor(central, "MAD1"), active_monitor(central, "MAD2")
    sid = supplying_session(central, m1, "d1", "MAD1", 0.3)
    ids = {"cp_id": "MAD1", "driver_id": "d1"} | ({"cp_id": "MAD2"} if wrong == "cp_id" else {"driver_id": "d666"})
    bad = protocol.ChargeCompletion(session_id=sid, energy_kwh=5.0, cost_eur=2.0, end_reason="unplugged", **ids)
    central.peer.send("charging_session_complete", ids["cp_id"], bad)
    kind = "cp_mismatch" if wrong == "cp_id" else "driver_mismatch"
    wait_until(lambda: any(bad.message_id in d and kind in d for d in audit(central, "completion_rejected")),
               what="the mismatch audited")
    dead = dead_letters(central, "charging_session_complete", lambda v: bad.message_id.encode() in v)
    assert kind in dict(dead[0].headers)["reason"].decode()
    with Repository(central.db) as repo:
        assert repo.get_ticket(sid) is None and repo.get_session(sid).status == "supplying"
    m1.heartbeat(True)
    m2.heartbeat(True)
    assert state(central, "MAD1") == "SUPPLYING"
    good = protocol.ChargeCompletion(cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=0.3, cost_eur=0.12,
                                     end_reason="unplugged")
    central.peer.send("charging_session_complete", "MAD1", good)
    assert central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid)[0].cost_eur == 0.12


def test_a_completion_of_a_cancelled_session_is_rejected(central) -> None:
    m = active_monitor(central, "MAD1")
    corr = charge(central, "d1", "MAD1")
    auth = m.expect(protocol.AuthorizeSupply)
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=False, reason="no"))
    assert response(central, corr).status == "denied"
    late = protocol.ChargeCompletion(cp_id="MAD1", session_id=auth.session_id, driver_id="d1", energy_kwh=0.2,
                                     cost_eur=0.08, end_reason="unplugged")
    central.peer.send("charging_session_complete", "MAD1", late)
    wait_until(lambda: any(late.message_id in d and "cancelled" in d for d in audit(central, "completion_rejected")))
    dead_letters(central, "charging_session_complete", lambda v: late.message_id.encode() in v)
    with Repository(central.db) as repo:
        assert repo.tickets() == [] and repo.get_session(auth.session_id).status == "cancelled"


def answers(central, corr: str) -> list[tuple]:
    central.peer.poll()
    return [(r.status, r.session_id, r.reason) for r in central.peer.received
            if isinstance(r, protocol.ChargeResponse) and r.correlation_id == corr]


def test_the_same_charge_request_twice_gets_the_same_answer(central) -> None:
    """(c) A charge_request delivered again (producer retry, replay) is answered as the first time:
    never "busy" then "authorized" for one correlation id, and never a second session."""
    m = active_monitor(central, "MAD1")
    request = protocol.ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id=uuid.uuid4().hex)
    central.peer.send("driver_requests", "d1", request)
    auth = m.expect(protocol.AuthorizeSupply)
    central.peer.send("driver_requests", "d1", request)  # while the CP has not answered yet
    time.sleep(0.5)
    assert answers(central, request.correlation_id) == []  # no "busy": the answer follows
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=True))
    first = central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == request.correlation_id)[0]
    assert (first.status, first.session_id) == ("authorized", auth.session_id)
    central.peer.send("driver_requests", "d1", request)  # once more, after the answer
    central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == request.correlation_id, count=2)
    assert set(answers(central, request.correlation_id)) == {("authorized", auth.session_id, None)}
    with pytest.raises(AssertionError):
        m.expect(protocol.AuthorizeSupply, timeout=0.5)  # no second session was opened
    # denied: d2's request while MAD1 is busy stays denied with the same reason after MAD1 is free again
    busy = protocol.ChargeRequest(driver_id="d2", cp_id="MAD1", correlation_id=uuid.uuid4().hex)
    central.peer.send("driver_requests", "d2", busy)
    denied = central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == busy.correlation_id)[0]
    assert (denied.status, denied.reason) == ("denied", "CP MAD1 is busy")
    central.peer.send("charging_session_complete", "MAD1", protocol.ChargeCompletion(
        cp_id="MAD1", session_id=auth.session_id, driver_id="d1", energy_kwh=0.0, cost_eur=0.0,
        end_reason="unplugged"))
    central.peer.wait_for(protocol.Ticket, lambda t: t.session_id == auth.session_id)
    m.heartbeat(True)
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    central.peer.send("driver_requests", "d2", busy)
    central.peer.wait_for(protocol.ChargeResponse, lambda r: r.correlation_id == busy.correlation_id, count=2)
    assert set(answers(central, busy.correlation_id)) == {("denied", None, "CP MAD1 is busy")}
    with pytest.raises(AssertionError):
        m.expect(protocol.AuthorizeSupply, timeout=0.5)
    row = fault_matrix.billing_row("10 same charge_request three times", central.db, [auth.session_id], None)
    assert (row.lost, row.double_billed) == (0, 0)


def test_stop_all_survives_a_central_restart(central, kafka_settings) -> None:
    """(d) The operator's stop all is stored: after Central stops and starts again, every CP
    that registers is told stop_cp and shows STOPPED; resume all is stored the same way."""
    m1, m2 = active_monitor(central, "MAD1"), active_monitor(central, "MAD2")
    central.get("central").tell(ConsoleLine("stop all"))
    m1.expect(protocol.StopCp)
    m2.expect(protocol.StopCp)
    wait_until(lambda: {state(central, "MAD1"), state(central, "MAD2")} == {"STOPPED"})
    m1.close()
    m2.close()
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap,
                                 db_path=central.db, topic_prefix=kafka_settings.topic_prefix, authorize_timeout=2.0,
                                 life_timeout=30.0)

    def restart_and_register():
        central.stop()
        system = start_central(config)
        port = system.ask("monitor-listener", ListenerPort())
        monitors = [FakeMonitor(port, cp) for cp in ("MAD1", "MAD2")]
        for m in monitors:
            assert m.register().status == "accepted"
            m.heartbeat(True)
        return system, monitors

    again, (n1, n2) = restart_and_register()
    try:
        n1.expect(protocol.StopCp)
        n2.expect(protocol.StopCp)
        wait_until(lambda: {s["state"] for s in again.ask("central", CentralStatus()).values()} == {"STOPPED"})
        again.get("central").tell(ConsoleLine("resume MAD1"))
        n1.expect(protocol.ResumeCp)
        wait_until(lambda: again.ask("central", CentralStatus())["MAD1"]["state"] == "ACTIVE")
        n1.close()
        n2.close()
    finally:
        again.stop()
    central_db = Repository(central.db)
    try:
        assert {c.cp_id: c.stopped for c in central_db.list_cps()} == {"MAD1": False, "MAD2": True}
    finally:
        central_db.close()
