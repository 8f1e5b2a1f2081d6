"""EV_OCPP at the edge (issue #13): every hostile input is refused with a reason, the connection and the
gateway survive, and nothing forged becomes a bill.

Real parts: the broker, Central in-process (security on), the gateway in-process, real WebSockets (the
``ocpp`` library's client for well-formed chargers, a bare WebSocket for frames no charger library would
send). Each attack records a row in the fault matrix's attacks table.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from tests import fault_matrix
from tests.ocpp_client import TestCharger
from tests.ocpp_net import OcppNet
from tests.waiting import wait_until
from transport import protocol

pytestmark = pytest.mark.broker


@pytest.fixture
def net(kafka_settings: Any, tmp_path: Any) -> Iterator[OcppNet]:
    n = OcppNet(kafka_settings, tmp_path, chargers=("OC1", "OC2", "OC3"),
                gateway={"max_size": 16_384, "failures": 3, "max_chargers": 2, "max_bad": 8})
    try:
        yield n
    finally:
        n.close()


def error_of(answer: Any) -> tuple[str, str]:
    """(unique id, error code) of a CallError frame."""
    assert isinstance(answer, list) and answer[0] == 4, answer
    assert isinstance(answer[3], str) and len(answer[3].split()) >= 3, answer  # a sentence
    return answer[1], answer[2]


def test_malformed_and_unsupported_frames_get_a_call_error_and_the_connection_survives(net: OcppNet) -> None:
    raw = net.raw("OC1")
    attacks: list[tuple[str | bytes, str, str]] = [
        ("this is not json", "-1", "FormationViolation"),
        ('{"not": "a list"}', "-1", "FormationViolation"),
        ("[2]", "-1", "FormationViolation"),
        ('[2, "m1"]', "m1", "FormationViolation"),
        ('[9, "m2", "Heartbeat", {}]', "m2", "FormationViolation"),
        (json.dumps([2, "x" * 37, "Heartbeat", {}]), "-1", "FormationViolation"),  # unique id over 36
        ('[2, 42, "Heartbeat", {}]', "-1", "FormationViolation"),
        ('[2, "m3", "Heartbeat", []]', "m3", "FormationViolation"),
        ("[" * 5000 + "]" * 5000, "-1", "FormationViolation"),
        ('[2, "m4", "FooBar", {}]', "m4", "NotSupported"),  # not an OCPP 1.6 action
        ('[2, "m5", "../../../etc/passwd", {}]', "m5", "NotSupported"),
        ('[2, "m6", "SecurityEventNotification", {"type": "x", "timestamp": "2026-01-01T00:00:00Z"}]', "m6",
         "NotSupported"),  # OCPP 1.6 (security extension), not supported here
        ('[2, "m7", "BootNotification", {"chargePointVendor": 5, "chargePointModel": "m"}]', "m7",
         "TypeConstraintViolation"),
        ('[2, "m8", "BootNotification", {"chargePointModel": "m"}]', "m8", "ProtocolError"),
        ('[2, "m9", "Heartbeat", {"extra": 1}]', "m9", "FormationViolation"),
        ('[2, "m10", "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Sleepy"}]', "m10",
         "FormationViolation"),
        ('[2, "m11", "StatusNotification", {"connectorId": 99999, "errorCode": "NoError", "status": "Available"}]',
         "m11", "PropertyConstraintViolation"),
        ('[2, "m12", "StopTransaction", {"transactionId": 1, "meterStop": -5, "timestamp": "2026-01-01T00:00:00Z"}]',
         "m12", "PropertyConstraintViolation"),
    ]
    refused = 0
    for n, (frame, uid, code) in enumerate(attacks):
        got = error_of(raw.exchange(frame))
        assert got == (uid, code), (frame[:60], got)
        refused += 1
        alive = raw.exchange(json.dumps([2, f"alive-{n}", "Heartbeat", {}]))  # the connection survives each one
        assert alive[:2] == [3, f"alive-{n}"], alive
    # unsolicited answers (a CallResult or CallError nobody asked for) are dropped without a reply
    for i in range(200):
        raw.send(json.dumps([3, f"nobody-{i}", {"status": "Accepted"}]))
        raw.send(json.dumps([4, f"nobody-{i}", "GenericError", "x", {}]))
    ok = raw.exchange('[2, "h1", "Heartbeat", {}]')
    assert ok[0] == 3 and ok[1] == "h1" and ok[2]["currentTime"].endswith("Z")
    fault_matrix.attack_row("OCPP: malformed, unknown and invalid frames", len(attacks) + 400, refused + 400, 0, 0,
                            genuine_ok=raw.open)


def test_a_flood_of_garbage_closes_the_connection_and_a_huge_frame_is_refused(net: OcppNet) -> None:
    raw = net.raw("OC1")
    for _ in range(8):  # --max-bad 8 in a row: the connection is closed
        try:
            raw.exchange("garbage")
        except (ConnectionClosed, TimeoutError):
            break
    wait_until(lambda: not raw.open, what="the flooding connection closed")
    raw = net.raw("OC1")
    with pytest.raises(ConnectionClosed) as big:  # 20 KB > --max-size 16 KB: closed with 1009
        raw.exchange(json.dumps([2, "big", "DataTransfer", {"vendorId": "v", "data": "x" * 20_000}]))
    assert big.value.rcvd is not None and big.value.rcvd.code == 1009
    # the gateway serves the genuine charger as before
    charger = net.charger("OC1")
    assert charger.boot().status == "Accepted"
    net.wait_state("ACTIVE")
    fault_matrix.attack_row("OCPP: garbage flood and oversized frame", 9, 9, 0, 0, genuine_ok=True)


def test_a_charger_cannot_touch_another_chargers_transaction_and_bad_readings_are_not_billed(net: OcppNet) -> None:
    one, two = net.charger("OC1"), net.charger("OC2")
    for c in (one, two):
        c.boot()
        c.status("Available")
    net.wait_state("ACTIVE", "OC1")
    net.wait_state("ACTIVE", "OC2")
    assert one.authorize("drv-1") == "Accepted"
    tx, _ = one.start("drv-1", meter_start=100)
    sid = net.wait_state("SUPPLYING", "OC1")["session_id"]
    one.meter(tx, 1_100)
    # OC2 names OC1's transaction: answered (the charger must not retry forever), nothing changes
    two.stop(tx, 900_000)
    two.meter(tx, 900_000, connector=1)
    # an idTag that is not a driver id; a second Authorize while busy; values that are not numbers
    assert two.authorize("bad tag!") == "Invalid"
    assert one.authorize("drv-2") == "Invalid"
    for value in ("NaN", "abc", "-5", "1e400", "99999999999999"):
        one.call(_meter(tx, value))
    one.call(_meter(tx, "2.0", unit="kWh"))  # 2 kWh = 2,000 Wh: a valid reading in kWh
    assert net.cp("OC1")["state"] == "SUPPLYING" and net.cp("OC2")["state"] == "ACTIVE"
    one.stop(tx, 2_100)
    (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid)
    assert ticket.energy_kwh == pytest.approx(2.0)
    assert len(net.tickets()) == 1
    status = net.charger_status("OC1")
    assert status is not None and status["skipped_values"] == 5
    fault_matrix.attack_row("OCPP: another charger's transaction, bad idTag, bad meter values", 9, 9, 0, 0,
                            genuine_ok=True)


def _meter(tx: int, value: str, unit: str = "Wh") -> Any:
    from ocpp.v16 import call

    return call.MeterValues(connector_id=1, transaction_id=tx, meter_value=[
        {"timestamp": "2026-01-01T00:00:00Z", "sampledValue": [{"value": value, "unit": unit}]}])


def test_handshake_limits_subprotocol_capacity_and_password_guessing(net: OcppNet) -> None:
    with pytest.raises(InvalidStatus) as sub:
        TestCharger(net.url, "OC1", net.secrets["OC1"], subprotocols=("ocpp2.0.1",)).connect()
    assert sub.value.response.status_code == 400
    # capacity: --max-chargers 2 chargers at once; a charger reconnecting replaces its own connection
    one, two = net.charger("OC1"), net.charger("OC2")
    with pytest.raises(InvalidStatus) as full:
        TestCharger(net.url, "OC3", net.secrets["OC3"]).connect()
    assert full.value.response.status_code == 503
    again = net.charger("OC1")
    assert again.boot().status == "Accepted"
    wait_until(lambda: one.closed, what="the older connection of OC1 closed")
    two.close()
    # password guessing: --failures 3 refusals for a charger id from one address, then 429 without asking Central
    for _ in range(3):
        with pytest.raises(InvalidStatus) as wrong:
            TestCharger(net.url, "OC3", "guess").connect()
        assert wrong.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as blocked:
        TestCharger(net.url, "OC3", "guess").connect()
    assert blocked.value.response.status_code == 429
    assert len([a for a in net.audit("login_failed") if a.subject == "OC3"]) == 3
    # another charger is not locked out by OC3's guesser
    assert net.charger("OC2").boot().status == "Accepted"
    fault_matrix.attack_row("OCPP handshake: wrong subprotocol, password guessing, connection flood", 6, 6, 0, 0,
                            genuine_ok=True)


def test_profile_2_serves_the_same_over_tls(kafka_settings: Any, tmp_path: Any) -> None:
    net = OcppNet(kafka_settings, tmp_path, gateway={"tls": True})
    try:
        assert net.url.startswith("ws://")
        url = net.url.replace("ws://", "wss://")
        context = ssl.create_default_context(cafile=str(tmp_path / "ocpp-cert.pem"))
        charger = TestCharger(url, "OC1", net.secrets["OC1"], ssl_context=context)
        net._things.append(charger)
        assert charger.connect().boot().status == "Accepted"
        net.wait_state("ACTIVE")
        with pytest.raises((OSError, InvalidMessage, TimeoutError)):  # plain ws:// to a TLS port gets nowhere
            TestCharger(net.url, "OC1", net.secrets["OC1"]).connect()
    finally:
        net.close()
