"""EV_OCPP (issue #13): OCPP 1.6J chargers join the network through the gateway.

Real parts only: the broker, Central in-process with security on (chargers
registered in its database), the gateway in-process, and the ``ocpp``
library's client ChargePoint as the charger over real WebSockets
(tests/ocpp_client.py). The driver is a Kafka peer that signs its requests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from actors.operations import AdminCommand
from supervisors.ocpp_sim import SimConfig, SimFleet
from tests import fault_matrix
from tests.crash import crash
from tests.ocpp_net import PRICE, OcppNet
from tests.waiting import wait_until
from transport import protocol

pytestmark = pytest.mark.broker


@pytest.fixture
def net(kafka_settings: Any, tmp_path: Any) -> Iterator[OcppNet]:
    """Central and the gateway, charger OC1 registered, driver drv-r registered (it signs its requests)."""
    n = OcppNet(kafka_settings, tmp_path, drivers=("drv-r",))
    try:
        yield n
    finally:
        n.close()


def test_a_registered_charger_boots_and_central_shows_it_active(net: OcppNet) -> None:
    charger = net.charger("OC1")
    boot = charger.boot()
    assert boot.status == "Accepted" and boot.interval == 60
    charger.status("Available", connector=0)
    charger.status("Available", connector=1)
    assert charger.heartbeat().current_time.endswith("Z")
    net.wait_state("ACTIVE")
    logins = net.audit("login_ok")
    assert any(a.subject == "OC1" for a in logins), logins
    # Faulted → BROKEN with the charger's reason; Available again → ACTIVE
    charger.status("Faulted", connector=1, error_code="GroundFailure")
    cp = net.wait_state("BROKEN")
    assert "GroundFailure" in (cp["fault"] or "")
    charger.status("Available", connector=1)
    net.wait_state("ACTIVE")
    # Unavailable by its own choice → STOPPED (stop reason "charger"): no supply is sent there
    charger.status("Unavailable", connector=0)
    cp = net.wait_state("STOPPED")
    assert cp["stop_reasons"] == ["charger"] and not cp["stopped"]
    refused = charge("drv-r")
    net.peer.send("driver_requests", "drv-r", refused)
    denied = answer(net, protocol.ChargeResponse, refused.correlation_id)
    assert denied.status == "denied" and "STOPPED" in (denied.reason or ""), denied
    charger.status("Available", connector=0)
    net.wait_state("ACTIVE")
    # its Available never undoes the operator's stop
    net.central.ask("central", AdminCommand("stop", "OC1", "test"))
    assert charger.expect("ChangeAvailability") == {"connector_id": 0, "type": "Inoperative"}
    charger.status("Unavailable", connector=0)
    charger.status("Unavailable", connector=0)  # the charger changes its mind twice: it is still Central's stop
    charger.status("Available", connector=0)
    assert net.wait_state("STOPPED")["stop_reasons"] == ["operator"]
    net.central.ask("central", AdminCommand("resume", "OC1", "test"))
    assert charger.expect("ChangeAvailability") == {"connector_id": 0, "type": "Operative"}
    net.wait_state("ACTIVE")
    # the charger leaves: Central sees it DISCONNECTED at once (not after missing heartbeats)
    charger.close()
    net.wait_state("DISCONNECTED", timeout=5)


def test_a_wrong_password_or_an_unknown_charger_is_refused_at_the_handshake(net: OcppNet) -> None:
    with pytest.raises(InvalidStatus) as wrong:
        net.charger("OC1", password="not-the-secret")
    assert wrong.value.response.status_code == 401
    assert b"wrong proof" in wrong.value.response.body
    failed = net.audit("login_failed")
    assert any(a.subject == "OC1" and "wrong proof" in a.detail for a in failed), failed
    with pytest.raises(InvalidStatus) as unknown:
        net.charger("NOPE1", password="whatever-secret")
    assert unknown.value.response.status_code == 401
    assert b"unknown CP" in unknown.value.response.body
    with pytest.raises(InvalidStatus) as none:
        net.charger("OC1", password=None)
    assert none.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as path:
        net.charger("bad*id", password="x")
    assert path.value.response.status_code == 404
    # the genuine charger still gets in
    assert net.charger("OC1").boot().status == "Accepted"
    wait_until(lambda: net.cp()["connected"], what="OC1 connected at Central")


def test_a_charge_at_the_charger_is_billed_once_as_energy_times_price(net: OcppNet) -> None:
    """Boot → Authorize → StartTransaction → MeterValues → StopTransaction: the driver's ticket."""
    charger = net.charger("OC1")
    charger.boot()
    charger.status("Available")
    net.wait_state("ACTIVE")
    assert charger.authorize("drv-a") == "Accepted"
    tx, status = charger.start("drv-a", meter_start=1000)
    assert status == "Accepted" and tx >= 1
    cp = net.wait_state("SUPPLYING")
    sid = cp["session_id"]
    assert cp["driver_id"] == "drv-a"
    charger.status("Charging")
    charger.meter(tx, 1500)
    charger.meter(tx, 2500)
    wait_until(lambda: net.cp()["energy_kwh"] == pytest.approx(1.5), what="Central's meter at 1.5 kWh")
    charger.meter(tx, 2000)  # lower than the last reading: flagged, not billed
    answer = charger.stop(tx, 3500, reason="EVDisconnected", tag="drv-a")
    assert answer.id_tag_info["status"] == "Accepted"
    charger.status("Available")
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.driver_id == "drv-a")
    assert ticket.session_id == sid and ticket.cp_id == "OC1"
    assert ticket.energy_kwh == pytest.approx(2.5)
    assert ticket.cost_eur == pytest.approx(2.5 * PRICE)
    assert ticket.end_reason == "unplugged"
    # a StopTransaction the charger repeats (its answer was lost) bills nothing more
    assert charger.stop(tx, 3500, reason="EVDisconnected", tag="drv-a").id_tag_info["status"] == "Accepted"
    net.wait_state("ACTIVE")
    wait_until(lambda: net.charger_status("OC1")["pending_completions"] == 0, what="the completion confirmed")
    assert len(net.tickets(sid)) == 1
    status_ = net.charger_status("OC1")
    assert status_["lower_readings"] == 1 and status_["duplicate_stops"] == 1


def test_a_kafka_driver_starts_and_stops_a_charge_at_an_ocpp_charger(net: OcppNet) -> None:
    """charge_request → RemoteStartTransaction; stop → RemoteStopTransaction; Central's stop/resume →
    ChangeAvailability; a remote start the charger rejects is denied to the driver with the reason."""
    charger = net.charger("OC1")
    charger.boot()
    charger.status("Available")
    net.wait_state("ACTIVE")
    # the charger says no: the driver is told why, nothing is left open
    charger.answers["RemoteStartTransaction"] = "Rejected"
    ask = charge("drv-r")
    net.peer.send("driver_requests", "drv-r", ask)
    assert charger.expect("RemoteStartTransaction")["id_tag"] == "drv-r"
    denied = answer(net, protocol.ChargeResponse, ask.correlation_id)
    assert denied.status == "denied" and "rejected the remote start" in (denied.reason or "")
    net.wait_state("ACTIVE")
    # the charger says yes: the driver's charge runs and ends on the driver's stop
    charger.answers["RemoteStartTransaction"] = "Accepted"
    ask = charge("drv-r")
    net.peer.send("driver_requests", "drv-r", ask)
    remote = charger.expect("RemoteStartTransaction")
    assert remote == {"id_tag": "drv-r", "connector_id": 1}
    ok = answer(net, protocol.ChargeResponse, ask.correlation_id)
    assert ok.status == "authorized" and ok.session_id
    assert charger.authorize("drv-r") == "Accepted"  # a charger that authorises remote starts too
    tx, status = charger.start("drv-r", meter_start=10_000)
    assert status == "Accepted"
    charger.status("Charging")
    net.wait_state("SUPPLYING")
    charger.meter(tx, 10_800)
    stop = protocol.StopChargingRequest(driver_id="drv-r", session_id=ok.session_id, correlation_id=corr())
    net.peer.send("driver_requests", "drv-r", stop)
    assert charger.expect("RemoteStopTransaction") == {"transaction_id": tx}
    charger.stop(tx, 11_200, reason="Remote")
    charger.status("Available")
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == ok.session_id)
    assert ticket.energy_kwh == pytest.approx(1.2) and ticket.cost_eur == pytest.approx(1.2 * PRICE)
    assert ticket.end_reason == "driver_stop"
    net.wait_state("ACTIVE")
    # Central's operator stops and resumes the CP: ChangeAvailability Inoperative, then Operative
    net.central.ask("central", AdminCommand("stop", "OC1", "test"))
    assert charger.expect("ChangeAvailability") == {"connector_id": 0, "type": "Inoperative"}
    charger.status("Unavailable", connector=0)
    net.wait_state("STOPPED")
    refused = charge("drv-r")
    net.peer.send("driver_requests", "drv-r", refused)
    assert answer(net, protocol.ChargeResponse, refused.correlation_id).status == "denied"
    net.central.ask("central", AdminCommand("resume", "OC1", "test"))
    assert charger.expect("ChangeAvailability") == {"connector_id": 0, "type": "Operative"}
    charger.status("Available", connector=0)
    net.wait_state("ACTIVE")
    assert len(net.tickets()) == 1


def corr() -> str:
    return uuid.uuid4().hex


def charge(driver: str, cp: str = "OC1") -> protocol.ChargeRequest:
    return protocol.ChargeRequest(driver_id=driver, cp_id=cp, correlation_id=corr())


def answer(net: OcppNet, kind: type, correlation_id: str) -> Any:
    return net.peer.wait_for(kind, lambda m: getattr(m, "correlation_id", None) == correlation_id)[0]


def test_a_charger_that_drops_mid_charge_and_replays_after_a_gateway_restart_is_billed_once(net: OcppNet) -> None:
    """Offline and replay safety: the charger loses its connection mid-transaction, the gateway restarts,
    the charger reconnects (no BootNotification: it did not reboot) and sends its queued MeterValues and
    its StopTransaction twice; after another gateway restart it sends the StopTransaction once more."""
    charger = net.charger("OC1")
    charger.boot()
    charger.status("Available")
    net.wait_state("ACTIVE")
    assert charger.authorize("drv-o") == "Accepted"
    t0 = time.time()
    tx, _ = charger.start("drv-o", meter_start=5_000, at=t0)
    sid = net.wait_state("SUPPLYING")["session_id"]
    charger.meter(tx, 5_400, at=t0 + 60)
    charger.drop()  # the network is gone: no close frame
    net.wait_state("DISCONNECTED", timeout=5)
    net.restart_gateway()
    again = time.monotonic()
    charger = net.charger("OC1")  # back online: queued messages first, in order, with their old timestamps
    net.wait_state("SUPPLYING")
    recovered = time.monotonic() - again
    assert net.cp()["session_id"] == sid
    charger.meter(tx, 5_900, at=t0 + 120)
    charger.meter(tx, 5_700, at=t0 + 150)  # lower: flagged, not billed
    charger.meter(tx, 6_600, at=t0 + 180)
    charger.stop(tx, 7_000, reason="EVDisconnected", at=t0 + 200)
    charger.stop(tx, 7_000, reason="EVDisconnected", at=t0 + 200)  # its answer was lost: sent again
    charger.status("Available")
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid)
    assert ticket.energy_kwh == pytest.approx(2.0) and ticket.cost_eur == pytest.approx(2.0 * PRICE)
    net.wait_state("ACTIVE")
    wait_until(lambda: (s := net.charger_status("OC1")) is not None and s["pending_completions"] == 0,
               what="the completion confirmed by Kafka")
    charger.close()
    net.restart_gateway()
    charger = net.charger("OC1")
    assert charger.stop(tx, 7_000, reason="EVDisconnected", tag="drv-o").id_tag_info["status"] == "Accepted"
    net.wait_state("ACTIVE")
    time.sleep(0.5)  # nothing is on its way that could bill again; the count below is final
    tickets = net.tickets(sid)
    assert len(tickets) == 1 and tickets[0].energy_kwh == pytest.approx(2.0)
    fault_matrix.billing_row("OCPP gateway restarted mid-transaction, charger replays (stop x3)", net.db, [sid],
                             recovered)


def test_a_charger_reconnecting_mid_charge_keeps_its_transaction(net: OcppNet) -> None:
    """The charger's link drops twice during a charge; each time it reconnects it goes on with the same
    transaction and Central's session; the charge is billed once with all its energy."""
    charger = net.charger("OC1")
    charger.boot()
    charger.status("Available")
    net.wait_state("ACTIVE")
    charger.authorize("drv-c")
    tx, _ = charger.start("drv-c", meter_start=0)
    sid = net.wait_state("SUPPLYING")["session_id"]
    worst = 0.0
    for n, wh in enumerate((700, 1_500)):
        charger.meter(tx, wh)
        charger.drop()
        net.wait_state("DISCONNECTED", timeout=5)
        began = time.monotonic()
        charger = net.charger("OC1")
        net.wait_state("SUPPLYING")
        worst = max(worst, time.monotonic() - began)
        assert net.cp()["session_id"] == sid, f"reconnect {n + 1}"
    charger.meter(tx, 2_100)
    charger.stop(tx, 2_300)
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid)
    assert ticket.energy_kwh == pytest.approx(2.3)
    net.wait_state("ACTIVE")
    assert len(net.tickets(sid)) == 1
    fault_matrix.billing_row("OCPP charger reconnecting mid-transaction (x2)", net.db, [sid], worst)


def test_a_crashed_charger_actor_is_restarted_and_the_charge_goes_on(net: OcppNet) -> None:
    """A bug kills the charger's actor mid-charge: its supervisor restarts it with its Central link (which
    logs in again); the WebSocket stays open and the charge is billed once."""
    charger = net.charger("OC1")
    charger.boot()
    charger.status("Available")
    net.wait_state("ACTIVE")
    charger.authorize("drv-k")
    tx, _ = charger.start("drv-k", meter_start=0)
    sid = net.wait_state("SUPPLYING")["session_id"]
    charger.meter(tx, 400)
    assert net.gateway is not None
    (name,) = [n for n in net.gateway.directory.names() if n.startswith("ocpp:OC1#")]
    ref = net.gateway.get(name)
    assert ref is not None
    crashed = time.monotonic()
    crash(ref, "injected into the charger's actor")
    wait_until(lambda: (new := net.gateway.get(name)) is not None and new.actor_urn != ref.actor_urn
               and (s := net.charger_status("OC1")) is not None and s["registered"], what="a new actor, logged in")
    recovered = time.monotonic() - crashed
    assert not charger.closed
    charger.meter(tx, 900)
    charger.stop(tx, 1_000)
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid)
    assert ticket.energy_kwh == pytest.approx(1.0)
    net.wait_state("ACTIVE")
    assert len(net.tickets(sid)) == 1
    fault_matrix.billing_row("OCPP charger actor crashed mid-transaction", net.db, [sid], recovered)


def test_the_simulated_chargers_of_the_launcher_charge_for_a_kafka_driver(net: OcppNet, tmp_path: Any) -> None:
    """EV_OCPP_SIM (what ``evcharging up --ocpp-chargers N`` runs): its charger boots, accepts the remote start
    of a driver's charge_request, meters, ends by itself, and the driver gets the ticket."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    path = creds / "cp-OC1.json"
    path.write_text(json.dumps({"kind": "cp", "id": "OC1", "secret": net.secrets["OC1"]}), encoding="utf-8")
    path.chmod(0o600)
    config = SimConfig(url=net.url, chargers="OC1", credential_dir=str(creds), power_kw=3600.0, meter_interval=0.2,
                       supply_seconds=1.0)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    runner = threading.Thread(target=loop.run_until_complete, args=(SimFleet(config).run(stop),), daemon=True)
    runner.start()
    try:
        net.wait_state("ACTIVE")
        ask = charge("drv-r")
        net.peer.send("driver_requests", "drv-r", ask)
        ok = answer(net, protocol.ChargeResponse, ask.correlation_id)
        assert ok.status == "authorized"
        (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == ok.session_id)
        assert 0.5 < ticket.energy_kwh < 3.0 and ticket.end_reason == "unplugged"  # ~1 s at 3,600 kW
        assert ticket.cost_eur == pytest.approx(ticket.energy_kwh * PRICE, abs=0.006)
        net.wait_state("ACTIVE")
    finally:
        loop.call_soon_threadsafe(stop.set)
        runner.join(10)


def test_development_mode_without_credentials_against_an_open_central(kafka_settings: Any, tmp_path: Any) -> None:
    """``--security none`` with a Central in ``--enroll open``: no Basic auth, records unsealed, still billed."""
    net = OcppNet(kafka_settings, tmp_path, central={"enroll": "open"}, gateway={"security": "none"})
    try:
        charger = net.charger("OC1", password=None)
        assert charger.boot().status == "Accepted"
        net.wait_state("ACTIVE")
        assert charger.authorize("drv-d") == "Accepted"
        tx, _ = charger.start("drv-d", meter_start=0)
        sid = net.wait_state("SUPPLYING")["session_id"]
        charger.stop(tx, 500)
        (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid)
        assert ticket.energy_kwh == pytest.approx(0.5)
        status = net.charger_status("OC1")
        assert status is not None and not status["authenticated"] and status["key_id"] is None
    finally:
        net.close()
