"""Central in-process against a real broker, real sockets and a real SQLite file.

The Monitor is a FakeMonitor (the wire protocol over a FrameClient); drivers
and Engines are plain Kafka clients (KafkaPeer). Nothing is mocked.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid

import pytest

from actors.central import AdminCommand, CentralStatus
from actors.console import ConsoleLine
from actors.panel import LastSnapshot, PanelText, render_text
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from tests.fakes import FakeMonitor, KafkaPeer
from tests.waiting import wait_until
from transport import protocol
from transport.kafka import PumpFetchWait
from transport.listener import ListenerPort

pytestmark = pytest.mark.broker


@pytest.fixture
def central(kafka_settings, tmp_path, request):
    """Central with MAD1 and MAD2 seeded; ``@pytest.mark.life_timeout(s)`` shortens the life timeout,
    ``@pytest.mark.lost_deadline(s)`` the lost-session deadline."""
    marker = request.node.get_closest_marker("life_timeout")
    lost = request.node.get_closest_marker("lost_deadline")
    db = str(tmp_path / "central.db")
    with Repository(db) as repo:
        # 3,600 kW: 1 kWh a second, so the tests' quick supplies stay plausible (see test_billing.py)
        repo.upsert_cp("MAD1", "Madrid Sol", 0.40, max_power_kw=3600)
        repo.upsert_cp("MAD2", "Madrid Atocha", 0.35, max_power_kw=3600)
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
                                 topic_prefix=kafka_settings.topic_prefix, authorize_timeout=2.0,
                                 life_timeout=marker.args[0] if marker else 30.0,
                                 **({"lost_deadline": lost.args[0]} if lost else {}))
    system = start_central(config)
    assert system.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
    system.port = system.ask("monitor-listener", ListenerPort())
    system.db = db
    peer = KafkaPeer(kafka_settings)
    system.peer = peer
    yield system
    system.stop()
    peer.close()


def state(central, cp: str) -> str:
    return central.ask("central", CentralStatus())[cp]["state"]


def active_monitor(central, cp: str) -> FakeMonitor:
    m = FakeMonitor(central.port, cp)
    assert m.register().status == "accepted"
    m.heartbeat(True)
    wait_until(lambda: state(central, cp) == "ACTIVE", what=f"{cp} ACTIVE")
    return m


def charge(central, driver: str, cp: str) -> str:
    corr = uuid.uuid4().hex
    central.peer.send("driver_requests", driver,
                      protocol.ChargeRequest(driver_id=driver, cp_id=cp, correlation_id=corr))
    return corr


def response(central, corr: str) -> protocol.ChargeResponse:
    return central.peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr)[0]


@pytest.mark.life_timeout(1.5)
def test_starts_with_every_cp_disconnected_and_registers_with_db_price(central) -> None:
    status = central.ask("central", CentralStatus())
    assert {k: v["state"] for k, v in status.items()} == {"MAD1": "DISCONNECTED", "MAD2": "DISCONNECTED"}
    m = FakeMonitor(central.port, "MAD1")
    r = m.register(location="ignored")
    assert (r.status, r.price_eur_kwh, r.location) == ("accepted", 0.40, "Madrid Sol")
    assert state(central, "MAD1") == "DISCONNECTED"  # until the first life message
    m.heartbeat(True)
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    m.heartbeat(False)
    wait_until(lambda: state(central, "MAD1") == "BROKEN")
    m.heartbeat(True)
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    m.send(protocol.FaultNotification(cp_id="MAD1", reason="engine does not answer"))
    wait_until(lambda: state(central, "MAD1") == "BROKEN")
    m.send(protocol.FaultCleared(cp_id="MAD1"))
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    # no life message for life_timeout → DISCONNECTED; one more → back
    wait_until(lambda: state(central, "MAD1") == "DISCONNECTED", timeout=5)
    m.heartbeat(True)
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    m.close()  # the Monitor's socket closes → DISCONNECTED at once
    wait_until(lambda: state(central, "MAD1") == "DISCONNECTED", timeout=1.4)


def test_enrolment_open_and_registry(central, kafka_settings, tmp_path) -> None:
    m = FakeMonitor(central.port, "NEW9")
    r = m.register(location="Valencia Port")
    assert (r.status, r.location, r.price_eur_kwh) == ("accepted", "Valencia Port", 0.30)
    m.close()
    # The default, registry mode: an unknown CP gets nowhere (tests/test_security_cp.py has the rest)
    secured = start_central(CentralSystemConfig(port=0, host="127.0.0.1", broker=kafka_settings.bootstrap,
                                                db_path=str(tmp_path / "registry.db"),
                                                topic_prefix=kafka_settings.topic_prefix + "registry.",
                                                group_id="registry"))
    try:
        port = secured.ask("monitor-listener", ListenerPort())
        m2 = FakeMonitor(port, "NEW9")
        r2 = m2.register()
        assert r2.status == "denied" and "authenticate first" in r2.reason
        m2.close()
        m3 = FakeMonitor(port, "NEW9")
        m3.send(protocol.AuthRequest(cp_id="NEW9", correlation_id="c1"))
        r3 = m3.expect(protocol.AuthResult)
        assert (r3.status, r3.reason) == ("denied", "unknown CP NEW9")
        m3.close()
        assert "NEW9" not in secured.ask("central", CentralStatus())
    finally:
        secured.stop()


def test_authorisation_rules_give_readable_denials(central) -> None:
    m1 = active_monitor(central, "MAD1")
    m2 = FakeMonitor(central.port, "MAD2")
    m2.register()
    m2.heartbeat(False)
    wait_until(lambda: state(central, "MAD2") == "BROKEN")
    assert response(central, charge(central, "d1", "NOPE")).reason == "unknown CP NOPE"
    assert response(central, charge(central, "d1", "MAD2")).reason == "CP MAD2 is BROKEN"
    # d1 is authorised at MAD1 ...
    corr = charge(central, "d1", "MAD1")
    auth = m1.expect(protocol.AuthorizeSupply)
    assert (auth.driver_id, auth.cp_id, auth.price_eur_kwh) == ("d1", "MAD1", 0.40)
    # ... and while that is pending, MAD1 is busy and d1 cannot ask elsewhere
    assert response(central, charge(central, "d2", "MAD1")).reason == "CP MAD1 is busy"
    m2.heartbeat(True)
    wait_until(lambda: state(central, "MAD2") == "ACTIVE")
    assert response(central, charge(central, "d1", "MAD2")).reason == "driver d1 is already supplying at MAD1"
    m1.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                 accepted=True))
    ok = response(central, corr)
    assert (ok.status, ok.session_id) == ("authorized", auth.session_id)
    # a stopped CP
    stopped = central.ask("central", AdminCommand("stop", "MAD2"))
    assert (stopped.status, stopped.cp_ids) == ("ok", ("MAD2",))
    assert central.ask("central", AdminCommand("stop", "NOPE")).status == "not_found"
    m2.expect(protocol.StopCp)
    m2.heartbeat(True)
    assert state(central, "MAD2") == "STOPPED"
    assert response(central, charge(central, "d3", "MAD2")).reason == "CP MAD2 is STOPPED"
    # a CP that refuses, and one that does not answer
    central.ask("central", AdminCommand("resume", "MAD2"))
    m2.expect(protocol.ResumeCp)
    wait_until(lambda: state(central, "MAD2") == "ACTIVE")
    corr = charge(central, "d3", "MAD2")
    a = m2.expect(protocol.AuthorizeSupply)
    m2.send(protocol.SupplyAuthorizationResponse(correlation_id=a.correlation_id, session_id=a.session_id,
                                                 accepted=False, reason="cable damaged"))
    assert response(central, corr).reason == "cable damaged"
    corr = charge(central, "d3", "MAD2")
    m2.expect(protocol.AuthorizeSupply)
    m2.heartbeat(True)
    assert "did not answer" in response(central, corr).reason
    with Repository(central.db) as repo:
        assert [s.status for s in repo.live_sessions()] == ["authorized"]  # only d1's


def test_full_supply_is_billed_exactly_once(central) -> None:
    m = active_monitor(central, "MAD1")
    peer = central.peer
    corr = charge(central, "d1", "MAD1")
    auth = m.expect(protocol.AuthorizeSupply)
    sid = auth.session_id
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=sid, accepted=True))
    assert response(central, corr).status == "authorized"
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=sid, driver_id="d1"))
    m.heartbeat(True)
    wait_until(lambda: state(central, "MAD1") == "SUPPLYING")
    # the panel lists the supply among the ongoing requests
    wait_until(lambda: (snap := central.ask("panel", LastSnapshot())) is not None and
               [(r.driver_id, r.cp_id, r.status) for r in snap.requests] == [("d1", "MAD1", "supplying")],
               what="the supply in the panel's requests table")
    for seq in (1, 2, 2, 3, 1):  # duplicates and a late one
        peer.send("charging_session_data", "MAD1", protocol.ChargingData(
            cp_id="MAD1", session_id=sid, driver_id="d1", seq=seq, energy_kwh=seq * 0.5, cost_eur=seq * 0.2,
            power_kw=7.4))
    # The driver sees the meter move forward only: duplicates and the late one are dropped, and
    # readings that arrive in one poll are sent as the newest one (so 1, 2, 3 or 1, 3 or just 3).
    peer.wait_for(protocol.ChargingStatusUpdate, lambda u: u.session_id == sid and u.seq == 3)
    seqs = [u.seq for u in peer.received if isinstance(u, protocol.ChargingStatusUpdate) and u.session_id == sid]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 3, seqs
    wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["energy_kwh"] == 1.5)
    completion = protocol.ChargeCompletion(cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=1.6,
                                           cost_eur=0.64, end_reason="unplugged")
    peer.send("charging_session_complete", "MAD1", completion)
    peer.send("charging_session_complete", "MAD1", completion)  # same message again
    peer.send("charging_session_complete", "MAD1", protocol.ChargeCompletion(  # same session, new message id
        cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=9.9, cost_eur=9.9, end_reason="unplugged"))
    m.send(protocol.SupplyEnded(cp_id="MAD1", session_id=sid, end_reason="unplugged", driver_id="d1"))
    tickets = peer.wait_for(protocol.Ticket, lambda t: t.session_id == sid, count=3)
    assert {(t.energy_kwh, t.cost_eur) for t in tickets} == {(1.6, 0.64)}  # re-sent, never re-billed
    with Repository(central.db) as repo:
        billed = [t for t in repo.tickets() if t.session_id == sid]
        assert len(billed) == 1 and billed[0].cost_cents == 64
        assert repo.get_cp("MAD1").state == "ACTIVE"
    wait_until(lambda: state(central, "MAD1") == "ACTIVE")
    # the driver comes back: the ticket is offered until acknowledged
    hello = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.DriverHello(driver_id="d1", correlation_id=hello))
    r = peer.wait_for(protocol.DriverHelloResponse, lambda m: m.correlation_id == hello)[0]
    assert [t.session_id for t in r.tickets] == [sid] and r.active_session is None
    peer.send("driver_requests", "d1", protocol.TicketAck(driver_id="d1", session_id=sid))
    hello2 = uuid.uuid4().hex
    peer.send("driver_requests", "d1", protocol.DriverHello(driver_id="d1", correlation_id=hello2))
    assert peer.wait_for(protocol.DriverHelloResponse, lambda m: m.correlation_id == hello2)[0].tickets == ()


def test_a_quiet_central_lets_the_broker_hold_both_consumers_longer(central) -> None:
    """Idle cost (issue #14): after 2 s without records, the driver-requests and the telemetry
    consumers fetch with their idle waits (250 and 500 ms by default); a reading brings the
    telemetry consumer's 100 ms back."""
    config = CentralSystemConfig(port=0, broker="unused")  # the defaults
    wait_until(lambda: central.ask("sessions-pump", PumpFetchWait()) == config.telemetry_idle_fetch_wait_ms,
               timeout=15, what="the telemetry consumer's idle wait")
    wait_until(lambda: central.ask("requests-pump", PumpFetchWait()) == config.requests_idle_fetch_wait_ms,
               timeout=15, what="the requests consumer's idle wait")
    central.peer.send("charging_session_data", "MAD1", protocol.ChargingData(
        cp_id="MAD1", session_id="S-none", driver_id="d1", seq=1, energy_kwh=0.1, cost_eur=0.04, power_kw=7.4))
    wait_until(lambda: central.ask("sessions-pump", PumpFetchWait()) == config.telemetry_fetch_wait_ms,
               timeout=10, what="the short wait back with the first reading")


@pytest.mark.life_timeout(1.0)
def test_a_silent_cp_is_disconnected_right_after_its_life_timeout(central) -> None:
    """Each CP is checked against its own deadline (every 0.1 s), not on a coarse tick."""
    m = active_monitor(central, "MAD1")
    m.heartbeat(True)
    last = time.monotonic()  # then silence: the socket stays open, nothing more comes
    wait_until(lambda: state(central, "MAD1") == "DISCONNECTED", timeout=5, interval=0.01)
    silent = time.monotonic() - last
    assert 1.0 <= silent <= 1.0 + 0.4, silent
    m.close()


@pytest.mark.life_timeout(1.5)
def test_a_busy_central_does_not_call_silent_a_cp_whose_life_messages_wait_in_its_mailbox(
        central, caplog: pytest.LogCaptureFixture) -> None:
    """Found at 1,500 CPs in bench.scale: with every Monitor connecting at once Central's mailbox held
    thousands of messages, and its tick, judging life as of when it was handled, showed >1,000 CPs
    DISCONNECTED and back whose life messages were waiting behind it. Here Central is kept busy for
    3 s (twice the life timeout) by a write waiting for a lock on its database, while MAD1 goes on
    sending life messages every 0.3 s: MAD1 must stay ACTIVE throughout."""
    m = active_monitor(central, "MAD1")
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            m.heartbeat(True)
            stop.wait(0.3)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    lock = sqlite3.connect(central.db, timeout=5, isolation_level=None)
    try:
        with caplog.at_level(logging.WARNING, logger="evcharging.central"):
            lock.execute("BEGIN EXCLUSIVE")
            try:
                corr = charge(central, "d1", "MAD2")  # Central's next write (this denial) waits for our lock
                wait_until(lambda: central.get("central").actor_inbox.qsize() > 20, timeout=10,
                           what="Central's mailbox filling up behind the waiting write")
                time.sleep(3.0)  # the window: Central busy for twice the life timeout, MAD1 still beating
            finally:
                lock.execute("COMMIT")
            assert response(central, corr).status == "denied"  # the busy spell is over
            wait_until(lambda: central.get("central").actor_inbox.qsize() < 5, what="Central caught up")
            time.sleep(0.3)  # a few more ticks, judged after the spell
            assert state(central, "MAD1") == "ACTIVE"
        flaps = [r.getMessage() for r in caplog.records if "missed its life messages" in r.getMessage()]
        assert flaps == []
    finally:
        stop.set()
        beating.join(5)
        lock.close()
    # and a CP that really goes silent is still seen at once (its life messages stop)
    wait_until(lambda: state(central, "MAD1") == "DISCONNECTED", timeout=5, what="MAD1 silent -> DISCONNECTED")
    m.close()


@pytest.mark.life_timeout(1.5)
@pytest.mark.lost_deadline(2.0)
def test_a_cp_registered_again_on_a_new_link_is_not_alive_until_that_link_sends_life_messages(central) -> None:
    """Found in review of the life flag: a second registration replaced MAD1's link and kept the old
    link's 'alive', so a live session's lost deadline never started while the new link stayed silent
    (an OCPP gateway registers a charger whose WebSocket is down and sends nothing for it)."""
    m = active_monitor(central, "MAD1")
    corr = charge(central, "d1", "MAD1")
    auth = m.expect(protocol.AuthorizeSupply)
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=True))
    assert response(central, corr).status == "authorized"
    m.heartbeat(True)
    again = FakeMonitor(central.port, "MAD1")  # the same CP on a new connection; it never sends a life message
    assert again.register().status == "accepted"
    with Repository(central.db) as repo:
        wait_until(lambda: repo.get_session(auth.session_id).status == "cancelled", timeout=15,
                   what="the session closed by the lost deadline (never supplied: cancelled)")
    assert state(central, "MAD1") == "DISCONNECTED"
    again.close()
    m.close()


def test_driver_stop_and_central_stop_all(central) -> None:
    m1, m2 = active_monitor(central, "MAD1"), active_monitor(central, "MAD2")
    corr = charge(central, "d1", "MAD1")
    auth = m1.expect(protocol.AuthorizeSupply)
    m1.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                 accepted=True))
    response(central, corr)
    stop = uuid.uuid4().hex
    central.peer.send("driver_requests", "d1", protocol.StopChargingRequest(driver_id="d1", session_id=auth.session_id,
                                                                            correlation_id=stop))
    assert m1.expect(protocol.StopSupply).reason == "driver_stop"
    r = central.peer.wait_for(protocol.StopChargingResponse, lambda m: m.correlation_id == stop)[0]
    assert r.status == "ok"
    central.get("central").tell(ConsoleLine("stop all"))
    m1.expect(protocol.StopCp)
    m2.expect(protocol.StopCp)
    wait_until(lambda: {state(central, "MAD1"), state(central, "MAD2")} == {"STOPPED"})
    central.get("central").tell(ConsoleLine("resume all"))
    m1.expect(protocol.ResumeCp)
    m2.expect(protocol.ResumeCp)
    wait_until(lambda: {state(central, "MAD1"), state(central, "MAD2")} == {"ACTIVE"})


def test_available_cps_and_the_panel(central) -> None:
    m = active_monitor(central, "MAD1")
    corr = uuid.uuid4().hex
    central.peer.send("driver_requests", "d9", protocol.AvailableCpsRequest(driver_id="d9", correlation_id=corr))
    r = central.peer.wait_for(protocol.AvailableCpsResponse, lambda m: m.correlation_id == corr)[0]
    assert [(c.cp_id, c.state, c.price_eur_kwh) for c in r.charging_points] == [
        ("MAD1", "ACTIVE", 0.40), ("MAD2", "DISCONNECTED", 0.35)]
    text = wait_until(lambda: (t := central.ask("panel", PanelText())) and "MAD1" in t and "ACTIVE" in t and t)
    assert "Madrid Sol" in text and "0.40 €/kWh" in text and "DISCONNECTED" in text
    assert "Ongoing driver requests" in text and "Application messages" in text
    m.close()


def test_panel_render_shows_live_supply() -> None:
    from actors.panel import CpTile, MessageRow, PanelSnapshot, RequestRow, WeatherRow

    snap = PanelSnapshot(
        (CpTile("ALC1", "Alicante", 0.3, "SUPPLYING", "driver7", 7.4, 1.234, 0.37),
         CpTile("MAD2", "Madrid", 0.35, "STOPPED"), CpTile("BCN3", "Barcelona", 0.5, "BROKEN", fault="engine KO"),
         CpTile("OSL4", "Oslo", 0.5, "STOPPED", stop_reasons=("weather",))),
        (RequestRow(time.time(), "driver7", "ALC1", "supplying"),),
        (MessageRow(1, time.time(), "CP ALC1 is supplying driver driver7", False),),
        time.time(), (WeatherRow("Oslo", -4.5, True, None, time.time(), True, ("OSL4",)),))
    text = render_text(snap)
    for expected in ("ALC1", "SUPPLYING", "7.4 kW", "1.234 kWh", "0.37 €", "driver driver7", "Out of Order",
                     "BROKEN", "engine KO", "CP ALC1 is supplying", "(weather)", "Oslo: -4.5 °C",
                     "ALERT: 1 CP(s) out of service"):
        assert expected in text, expected


def test_live_panel_with_a_thousand_cps_draws_what_fits_faults_first() -> None:
    """A thousand tiles cannot be seen and cost ~0.5 s to draw: the live panel draws what fits."""
    import io

    from actors.panel import CpTile, PanelActor, PanelSnapshot, render, tiles_that_fit

    tiles = tuple(CpTile(f"CP{i:04d}", "Somewhere", 0.3, "SUPPLYING", f"d{i}", 7.4, 1.0, 0.3) for i in range(999))
    snap = PanelSnapshot((*tiles, CpTile("CP9999", "Far", 0.3, "BROKEN", fault="engine KO")), (), (), time.time())
    fit = tiles_that_fit(120, 40)
    text_of = io.StringIO()
    from rich.console import Console
    Console(file=text_of, width=120, color_system=None).print(render(snap, fit))
    text = text_of.getvalue()
    assert "1000 CPs: 1 BROKEN · 999 SUPPLYING" in text and f"showing {fit}; {1000 - fit} more" in text
    assert "CP9999" in text and "engine KO" in text  # the fault is shown although its id sorts last
    stream = io.StringIO()
    panel = PanelActor.start("rich", stream=stream)
    try:
        started = time.process_time()
        panel.ask(snap)
        assert time.process_time() - started < 0.4  # not a full 1,000-tile render
    finally:
        panel.stop()  # rich writes a non-terminal stream once, at the end
    assert "CP9999" in stream.getvalue() and "more do not fit" in stream.getvalue()


def test_a_producer_clock_running_late_does_not_expire_a_request(central) -> None:
    """Issue #10: the producer's clock is not trusted. A request stamped 60 s in the past
    by a driver whose clock is wrong, appended while Central is up, is served; requests
    appended while Central was down are recognised from Central's own downtime record
    (tests/test_session_lifecycle.py)."""
    active_monitor(central, "MAD1")
    corr = uuid.uuid4().hex
    msg = protocol.ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id=corr)
    central.peer.producer.send(central.peer.settings.topic("driver_requests"), key=b"d1",
                               value=protocol.encode(msg), timestamp_ms=int((time.time() - 60) * 1000))
    central.peer.producer.flush(5)
    assert response(central, corr).status != "denied" or "unavailable" not in (response(central, corr).reason or "")
