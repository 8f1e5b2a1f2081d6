"""Issue #12, Central's side of EV_W: weather stops, the operator's commands, richer panel snapshots.

A real Central (in-process, real broker, real sockets, a real SQLite file) with
FakeMonitors speaking the wire protocol; the weather and operator commands are
the messages API_Central sends (actors/operations.py), asked of Central's actor.
The input rules of the weather book are tested on their own against a real
database file (no actors: fast).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from actors.central import CentralStatus
from actors.console import ConsoleLine
from actors.operations import AdminCommand, OperatorResult, RevokeKey, WatchLocation, WeatherAlert, WeatherView
from actors.panel import LastSnapshot, PanelText
from actors.weather_state import (
    LOCATION_MAX_LEN,
    MAX_LOCATIONS,
    Outcome,
    WeatherBook,
    cp_location_keys,
    location_key,
)
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.system import RunningSystem
from tests.fakes import FakeMonitor, KafkaPeer
from tests.waiting import wait_until
from transport import protocol
from transport.broker import KafkaSettings
from transport.listener import ListenerPort

#: CP id -> location: three in Oslo (spelt three ways), one in Madrid, one in Bergen.
CPS = {"OSL1": "Oslo, Centrum", "OSL2": "  oslo ", "OSL3": "OSLO, Airport", "MAD1": "Madrid, Sol",
       "BRG1": "Bergen"}


def seed(db: str) -> None:
    with Repository(db) as repo:
        for cp_id, location in CPS.items():
            repo.upsert_cp(cp_id, location, 0.40, max_power_kw=3600)


def start(kafka_settings: KafkaSettings, db: str) -> RunningSystem:
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db,
                                 topic_prefix=kafka_settings.topic_prefix, authorize_timeout=2.0, life_timeout=30.0,
                                 panel_interval=0.1)
    system = start_central(config)
    assert system.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
    system.db, system.kafka = db, kafka_settings  # type: ignore[attr-defined]
    return system


@pytest.fixture
def central(kafka_settings: KafkaSettings, tmp_path: Any) -> Any:
    db = str(tmp_path / "central.db")
    seed(db)
    system = start(kafka_settings, db)
    yield system
    system.stop()


def status(central: RunningSystem, cp: str) -> dict[str, Any]:
    return central.ask("central", CentralStatus())[cp]  # type: ignore[no-any-return]


def state(central: RunningSystem, cp: str) -> str:
    return str(status(central, cp)["state"])


def monitor(central: RunningSystem, cp: str) -> FakeMonitor:
    """A Monitor of ``cp``, registered and healthy."""
    m = FakeMonitor(central.ask("monitor-listener", ListenerPort()), cp)
    assert m.register().status == "accepted"
    m.heartbeat(True)
    wait_until(lambda: state(central, cp) != "DISCONNECTED", what=f"{cp} connected")
    return m


def alert(central: RunningSystem, location: Any, temperature: Any, on: Any, error: Any = None) -> Any:
    return central.ask("central", WeatherAlert(location, temperature, on, error))


def quiet(m: FakeMonitor, kind: type, seconds: float = 0.3) -> None:
    """``m`` receives no ``kind`` within ``seconds`` (Central answered the ask that would have sent it already)."""
    with pytest.raises(AssertionError):
        m.expect(kind, timeout=seconds)


def audit_events(db: str, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    with Repository(db) as repo:
        rows = [r for r in reversed(repo.recent_audit(500)) if r.event.startswith(prefix)]
    return [(r.event, json.loads(r.params) if r.params else {}) for r in rows]


@pytest.mark.broker
def test_freeze_thaw_and_the_operator(central: RunningSystem) -> None:
    """Freeze: the CPs at the location are STOPPED (reason weather), told stop_cp once however often
    EV_W repeats it; the operator's stop outlives the thaw and the operator's resume cannot beat the alert."""
    m1, m2, mad = monitor(central, "OSL1"), monitor(central, "OSL2"), monitor(central, "MAD1")
    assert alert(central, "Oslo", -3.5, True).status == "not_found"  # not watched: no reading is taken
    assert central.ask("central", WatchLocation("  OSLO ", True)).ok
    frozen = alert(central, "  OSLO ", -3.5, True)
    assert (frozen.status, frozen.cp_ids) == ("ok", ("OSL1", "OSL2", "OSL3")), frozen
    for m in (m1, m2):
        stop = m.expect(protocol.StopCp)
        assert stop.reason == "weather: OSLO -3.5 °C"
        m.heartbeat(True)
    wait_until(lambda: state(central, "OSL1") == state(central, "OSL2") == "STOPPED", what="Oslo's CPs STOPPED")
    assert status(central, "OSL1")["stop_reasons"] == ["weather"]
    assert state(central, "MAD1") == "ACTIVE" and status(central, "MAD1")["stop_reasons"] == []
    # EV_W says it again every 4 s: only a change of alert acts (the temperature is shown)
    for t in (-4.0, -4.5, -5.0):
        again = alert(central, "oslo", t, True)
        assert (again.status, again.cp_ids) == ("ok", ()), again
    quiet(m1, protocol.StopCp)
    (row,) = [w for w in central.ask("central", WeatherView()) if w["location"] == "OSLO"]
    assert row == {"location": "OSLO", "temperature_c": -5.0, "alert": True, "error": None,
                   "updated_at": row["updated_at"], "watched": True, "cp_ids": ["OSL1", "OSL2", "OSL3"]}
    assert [e for e, _ in audit_events(central.db, "weather_")] == ["weather_watch", "weather_alert"]
    # the panel: tiles with their reasons and session, the weather rows, "(weather)" in the text render
    snap = wait_until(lambda: (s := central.ask("panel", LastSnapshot())) and
                      {t.cp_id: t for t in s.tiles}["OSL2"].state == "STOPPED" and s)
    tile = {t.cp_id: t for t in snap.tiles}["OSL1"]
    assert (tile.state, tile.stop_reasons, tile.session_id) == ("STOPPED", ("weather",), None)
    assert any(w.location == "OSLO" and w.alert for w in snap.weather)
    assert any("Weather alert at OSLO" in m.text for m in snap.messages)
    seqs = [m.seq for m in snap.messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one more for every message
    text = central.ask("panel", PanelText())
    assert "Out of Order (weather)" in text and "OSLO: -5.0 °C" in text

    # the operator stops a weather-held CP (no second stop_cp) and tries to resume another
    stopped = central.ask("central", AdminCommand("stop", "OSL1", who="test"))
    assert (stopped.status, status(central, "OSL1")["stop_reasons"]) == ("ok", ["operator", "weather"])
    refused = central.ask("central", AdminCommand("resume", "OSL2", who="test"))
    assert (refused.status, refused.text) == ("conflict", "CP OSL2 stays out of service: weather alert at OSLO.")
    assert state(central, "OSL2") == "STOPPED" and status(central, "OSL2")["stop_reasons"] == ["weather"]
    quiet(m2, protocol.ResumeCp)
    # the thaw restores the CPs the operator did not stop
    thawed = alert(central, "Oslo", 2.0, False)
    assert (thawed.status, thawed.cp_ids) == ("ok", ("OSL2", "OSL3")), thawed
    assert thawed.text.endswith("; 1 stay stopped by the operator (OSL1)"), thawed.text
    m2.expect(protocol.ResumeCp)
    m2.heartbeat(True)
    wait_until(lambda: state(central, "OSL2") == "ACTIVE", what="OSL2 back in service")
    assert state(central, "OSL1") == "STOPPED" and status(central, "OSL1")["stop_reasons"] == ["operator"]
    quiet(m1, protocol.ResumeCp)
    assert central.ask("central", AdminCommand("resume", "OSL1", who="test")).status == "ok"
    m1.expect(protocol.ResumeCp)
    m1.heartbeat(True)
    wait_until(lambda: state(central, "OSL1") == "ACTIVE", what="OSL1 resumed by the operator")
    commands = [(p["command"], p["via"], p["cp_id"]) for _, p in audit_events(central.db, "operator_command")
                if "cp_id" in p]
    assert commands == [("stop", "test", "OSL1"), ("resume", "test", "OSL2"), ("resume", "test", "OSL1")]
    assert [e for e, _ in audit_events(central.db, "weather_")] == [
        "weather_watch", "weather_alert", "weather_alert_over"]

    # a supply running when the weather stops the CP ends as an operator's stop ends it: stop_cp to its CP
    peer = KafkaPeer(central.kafka)
    try:
        corr = uuid.uuid4().hex
        peer.send("driver_requests", "d1", protocol.ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id=corr))
        auth = mad.expect(protocol.AuthorizeSupply)
        mad.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                      accepted=True))
        mad.send(protocol.SupplyStarted(cp_id="MAD1", session_id=auth.session_id, driver_id="d1"))
        wait_until(lambda: state(central, "MAD1") == "SUPPLYING", what="MAD1 supplying")
        assert central.ask("central", WatchLocation("MADRID", True)).ok
        assert alert(central, "MADRID", -1.0, True).cp_ids == ("MAD1",)
        assert mad.expect(protocol.StopCp).reason == "weather: MADRID -1 °C"
        assert state(central, "MAD1") == "SUPPLYING" and status(central, "MAD1")["stop_reasons"] == ["weather"]
        mad.send(protocol.SupplyEnded(cp_id="MAD1", session_id=auth.session_id, end_reason="central_stop",
                                      driver_id="d1", energy_kwh=0.5, cost_eur=0.2))
        mad.heartbeat(True)
        wait_until(lambda: state(central, "MAD1") == "STOPPED", what="MAD1 out of service after its supply")
    finally:
        peer.close()
    for m in (m1, m2, mad):
        m.close()


@pytest.mark.broker
def test_hostile_and_unknown_input_through_central(central: RunningSystem) -> None:
    """Absurd locations and readings are refused with a sentence (INVALID) and change nothing; an
    alert for a location without CPs is recorded and stops nothing; unknown CPs are NOT_FOUND."""
    m = monitor(central, "BRG1")
    for location in ("", "   ", "x" * (LOCATION_MAX_LEN + 1), "Os\x00lo", "Oslo\nDROP TABLE", "\u202eolsO", 42, None):
        r = alert(central, location, -5.0, True)
        assert r.status == "invalid" and r.text.endswith(".") and r.cp_ids == (), (location, r)
        w = central.ask("central", WatchLocation(location, True))  # type: ignore[arg-type]
        assert w.status == "invalid", (location, w)
    for temperature in (math.nan, math.inf, -1e9, "cold", True):
        assert alert(central, "Bergen", temperature, True).status == "invalid", temperature
    assert alert(central, "Bergen", -5.0, "yes").status == "invalid"
    assert alert(central, "Bergen", -5.0, True, error=["no"]).status == "invalid"
    assert central.ask("central", WeatherView()) == [] and state(central, "BRG1") == "ACTIVE"
    assert central.ask("central", WatchLocation("Bergen", True)).ok
    # a provider error: nothing changes but the error (shown, once as a fault among the messages)
    for _ in range(3):
        assert alert(central, "Bergen", None, True, error="OpenWeather: 401\x1b[31m invalid key " + "!" * 500).ok
    (row,) = central.ask("central", WeatherView())
    assert (row["alert"], row["temperature_c"], len(row["error"])) == (False, None, 200) and "\x1b" not in row["error"]
    assert state(central, "BRG1") == "ACTIVE"
    snap = wait_until(lambda: (s := central.ask("panel", LastSnapshot())) and s.weather and s.weather[0].error and s)
    assert sum(1 for msg in snap.messages if msg.fault and "no reading" in msg.text) == 1
    # a reading for a location nobody watches (e.g. one removed while the reading was on its way): refused
    r = alert(central, "Atlantis", -20.0, True)
    assert (r.status, r.cp_ids) == ("not_found", ()) and "does not watch" in r.text
    assert [w["location"] for w in central.ask("central", WeatherView())] == ["Bergen"]
    # an alert where no CP is: recorded, shown, stops nothing
    assert central.ask("central", WatchLocation("Atlantis", True)).ok
    r = alert(central, "Atlantis", -20.0, True)
    assert (r.status, r.cp_ids) == ("ok", ()) and "0 CP(s)" in r.text
    assert {w["location"]: (w["alert"], w["cp_ids"]) for w in central.ask("central", WeatherView())} == {
        "Atlantis": (True, []), "Bergen": (False, ["BRG1"])}
    assert {s["state"] for s in central.ask("central", CentralStatus()).values()} <= {"ACTIVE", "DISCONNECTED"}
    # watching: added, idempotent, removed (its alert cleared), unknown ones NOT_FOUND
    assert central.ask("central", WatchLocation(" BERGEN ", True)).text == "Already watching the weather at Bergen"
    assert central.ask("central", WatchLocation("Nowhere", False)).status == "not_found"
    assert alert(central, "bergen", -2.0, True).cp_ids == ("BRG1",)
    m.expect(protocol.StopCp)
    removed = central.ask("central", WatchLocation("Bergen", False))
    assert (removed.status, removed.cp_ids) == ("ok", ("BRG1",))
    m.expect(protocol.ResumeCp)
    assert [w["location"] for w in central.ask("central", WeatherView())] == ["Atlantis"]
    # operator commands with absurd ids
    huge = "X" * 100_000
    for action in ("stop", "resume"):
        r = central.ask("central", AdminCommand(action, huge))
        assert r.status == "not_found" and len(r.text) < 200
    assert central.ask("central", AdminCommand("explode", "BRG1")).status == "invalid"
    assert central.ask("central", RevokeKey(huge, "x" * 10_000)).status == "not_found"
    assert central.ask("central", RevokeKey("NOPE")).status == "not_found"
    revoked = central.ask("central", RevokeKey("BRG1", "stolen\nkey", who="test"))
    assert (revoked.status, revoked.cp_ids) == ("ok", ("BRG1",))
    wait_until(lambda: state(central, "BRG1") == "DISCONNECTED", what="BRG1's link closed by the revocation")
    m.close()


@pytest.mark.broker
def test_an_alert_survives_a_restart_and_holds_a_cp_that_registers(kafka_settings: KafkaSettings,
                                                                   tmp_path: Any) -> None:
    db = str(tmp_path / "central.db")
    seed(db)
    first = start(kafka_settings, db)
    try:
        assert first.ask("central", WatchLocation("Oslo", True)).ok
        assert alert(first, "Oslo", -7.0, True).cp_ids == ("OSL1", "OSL2", "OSL3")
        assert first.ask("central", WatchLocation("Bergen", True)).ok
    finally:
        first.stop()
    second = start(kafka_settings, db)
    try:
        assert status(second, "OSL1")["stop_reasons"] == ["weather"]
        assert {w["location"]: (w["alert"], w["watched"]) for w in second.ask("central", WeatherView())} == {
            "Oslo": (True, True), "Bergen": (False, True)}
        m = FakeMonitor(second.ask("monitor-listener", ListenerPort()), "OSL1")
        assert m.register().status == "accepted"
        assert m.expect(protocol.StopCp).reason == "weather: Oslo -7 °C"
        m.heartbeat(True)
        wait_until(lambda: state(second, "OSL1") == "STOPPED", what="OSL1 STOPPED after registering")
        second.get("central").tell(ConsoleLine("weather"))  # type: ignore[union-attr]
        wait_until(lambda: (s := second.ask("panel", LastSnapshot())) is not None
                   and any("Weather Oslo: -7 °C, ALERT" in msg.text for msg in s.messages),
                   what="the console's weather command")
        # removing the watched location clears its alert: the CPs come back
        assert second.ask("central", WatchLocation("OSLO", False)).cp_ids == ("OSL1", "OSL2", "OSL3")
        m.expect(protocol.ResumeCp)
        m.heartbeat(True)
        wait_until(lambda: state(second, "OSL1") == "ACTIVE", what="OSL1 back in service")
        m.close()
    finally:
        second.stop()


def test_location_rules_and_bounds_of_the_weather_book(tmp_path: Any) -> None:
    """The book on its own, against a real database file: matching, bounds, persistence."""
    assert location_key("  São   PAULO ") == "são paulo"
    assert cp_location_keys("Madrid, Puerta del Sol") == ("madrid, puerta del sol", "madrid")
    assert cp_location_keys(" bergen ") == ("bergen",)
    with Repository(str(tmp_path / "w.db")) as repo:
        book = WeatherBook(lambda: repo)
        for i in range(MAX_LOCATIONS):
            assert isinstance(book.watch(f"City {i}", True, "test"), Outcome)
        refused = book.watch("One too many", True, "test")
        assert isinstance(refused, OperatorResult) and refused.status == "invalid"
        assert str(MAX_LOCATIONS) in refused.text
        assert isinstance(book.report("city 7", -1.0, True, None, "test"), Outcome)  # a watched one reports
        assert book.report("One too many", -1.0, True, None, "test").status == "not_found"  # type: ignore[union-attr]
        assert book.hold_of("CITY 7, the station") == "city 7" and book.hold_of("City 8") is None
        reloaded = WeatherBook(lambda: repo)
        reloaded.load()
        assert [(p.location, p.alert, p.temperature_c) for p in reloaded.alerts()] == [("City 7", True, -1.0)]

