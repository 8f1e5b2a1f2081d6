"""The OCPP gateway's rules one by one (no broker, no network): meter values, times, end reasons, and the
journal that keeps transactions across restarts (a real SQLite file)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from actors.ocpp_meter import MAX_WH, Reading, end_reason, energy_readings, ocpp_now, parse_time, power_between
from persistence.ocpp_journal import AUTHORIZED, CHARGING, DROPPED, REFUSED, STOPPED, OcppJournal


def mv(*values: dict[str, str], at: str = "2026-03-01T10:00:00Z") -> dict[str, object]:
    return {"timestamp": at, "sampled_value": list(values)}


def test_energy_readings_take_the_import_register_in_wh_and_skip_what_cannot_be_billed() -> None:
    readings, skipped = energy_readings([
        mv({"value": "1500"}),  # no measurand: the energy register (OCPP 1.6 §7.31), Wh by default
        mv({"value": "2.5", "unit": "kWh", "measurand": "Energy.Active.Import.Register"},
           {"value": "7400", "unit": "W", "measurand": "Power.Active.Import"}, at="2026-03-01T10:01:00Z"),
        mv({"value": "10", "measurand": "Current.Import", "unit": "A"}),  # another quantity: ignored
        mv({"value": "3000", "phase": "L1"}),  # a phase: not the total
        mv({"value": "3000", "location": "EV"}),  # the vehicle's side
        mv({"value": "NaN"}), mv({"value": "abc"}), mv({"value": "-1"}), mv({"value": "1e400"}),
        mv({"value": "3000", "unit": "varh"}), mv({"value": "3000", "format": "SignedData"}),
        mv({"value": str(int(MAX_WH) + 1)}),
    ])
    assert readings == [Reading(1500.0, parse_time("2026-03-01T10:00:00Z"), None),
                        Reading(2500.0, parse_time("2026-03-01T10:01:00Z"), 7.4)]
    assert len(skipped) == 7 and all(isinstance(s, str) and len(s.split()) > 3 for s in skipped)


def test_times_are_rfc3339_in_bounds_and_power_is_derived_from_the_chargers_clock() -> None:
    assert parse_time("2026-03-01T10:00:00Z") == parse_time("2026-03-01T11:00:00+01:00")
    assert parse_time("2026-03-01T10:00:00.123Z") == pytest.approx(parse_time("2026-03-01T10:00:00Z") + 0.123)
    assert parse_time("2026-03-01T10:00:00") == parse_time("2026-03-01T10:00:00Z")  # UTC when no offset
    for bad in ("yesterday", "", None, 5, "2226-01-01T00:00:00Z", "x" * 100):
        assert parse_time(bad) is None
    assert ocpp_now(0.0) == "1970-01-01T00:00:00.000Z"
    t = parse_time("2026-03-01T10:00:00Z")
    assert t is not None
    assert power_between(1000, t, Reading(2000, t + 360)) == pytest.approx(10.0)  # 1 kWh in 6 min
    assert power_between(1000, None, Reading(2000, t)) == 0.0
    assert power_between(0, t, Reading(1e9, t + 1)) == 1000.0  # bounded by the protocol
    assert not math.isnan(power_between(1000, t, Reading(2000, t)))


def test_end_reasons_follow_who_asked_for_the_stop() -> None:
    assert end_reason("EVDisconnected") == "unplugged"
    assert end_reason(None) == "unplugged"
    assert end_reason("EmergencyStop") == "fault"
    assert end_reason("Remote") == "central_stop"
    assert end_reason("Remote", "driver_stop") == "driver_stop"
    assert end_reason(None, "driver_stop") == "driver_stop"
    assert end_reason("PowerLoss", "driver_stop") == "fault"
    assert end_reason("Whatever") == "unplugged"


def test_meter_readings_are_written_behind_and_read_back_in_order(tmp_path: Path) -> None:
    with OcppJournal.open(tmp_path / "j") as j:
        j.write_behind(60.0)  # no flush by the clock in this test: only by the journal's own reads and close
        row = j.start("OC1", j.hold("OC1", "S1", "drv", 0.3, "local").transaction_id, 1, 0.0, "k", 1.0)
        for seq in range(1, 101):
            j.reading("OC1", row.transaction_id, seq * 10.0, None, seq, seq / 100)
        j.reading("OC1", row.transaction_id, 5.0, None, 50, 0.05)  # older: ignored
        (live,) = j.live("OC1")  # any read writes what is held first
        assert (live.seq, live.last_meter_wh) == (100, 1000.0)
        j.reading("OC1", row.transaction_id, 2000.0, None, 101, 2.0)
    with OcppJournal.open(tmp_path / "j") as j:  # close() wrote it
        (live,) = j.live("OC1")
        assert live.seq == 101


def test_the_journal_keeps_each_transaction_once_and_per_charger(tmp_path: Path) -> None:
    path = tmp_path / "ocpp.journal"
    with OcppJournal.open(path) as j:
        held = j.hold("OC1", "S1", "drv", 0.4, "remote", now=100.0)
        assert held.status == AUTHORIZED and held.transaction_id >= 1
        assert j.hold("OC1", "S1", "drv", 0.4, "remote") == held  # Central asked twice
        started = j.start("OC1", held.transaction_id, 1, 1000.0, "k1", 101.0)
        assert started.status == CHARGING and started.meter_start_wh == 1000.0
        assert j.start("OC1", held.transaction_id, 1, 5.0, "k1", 999.0) == started  # repeated: unchanged
        assert j.get("OC2", held.transaction_id) is None  # another charger cannot name it
        j.reading("OC1", held.transaction_id, 1500.0, 102.0, 1, 0.5)
        j.reading("OC1", held.transaction_id, 1200.0, 103.0, 1, 0.2)  # not forward: ignored
        j.reading("OC2", held.transaction_id, 9e9, 103.0, 2, 9e6)  # another charger's: changes nothing
        j.flag_lower("OC1", held.transaction_id, 2)
    with OcppJournal.open(path) as j:  # a restart: everything is still there
        (row,) = j.live("OC1")
        assert (row.seq, row.last_meter_wh, row.lower_readings) == (1, 1500.0, 2)
        stopped, newly = j.stop("OC1", row.transaction_id, energy_kwh=1.0, end_reason="unplugged", ended_at=110.0)
        assert newly and stopped.status == STOPPED and stopped.cost_eur == pytest.approx(0.4)
        again, newly = j.stop("OC1", row.transaction_id, energy_kwh=99.0, end_reason="fault", ended_at=120.0)
        assert not newly and again.energy_kwh == 1.0  # a repeated StopTransaction changes nothing
        assert [r.session_id for r in j.unpublished("OC1")] == ["S1"]
        assert j.mark_published("OC1", "S1") and not j.mark_published("OC1", "S1")
        assert [r.session_id for r in j.unbilled("OC1")] == ["S1"]
        assert j.mark_billed("OC1", "S1") and not j.mark_billed("OC1", "S1")
        assert j.unbilled("OC1") == [] and j.live("OC1") == []
        # a cancelled hold is dropped (no bill); a refused start keeps an id the charger can stop
        j.hold("OC1", "S2", "drv", 0.4, "local")
        assert j.drop("OC1", "S2") and j.by_session("OC1", "S2").status == DROPPED  # type: ignore[union-attr]
        refused = j.refuse("OC1", "drv", 1, 0.0, "k9")
        assert refused.status == REFUSED and j.refuse("OC1", "drv", 1, 0.0, "k9") == refused
        assert j.by_start_key("OC1", "k9") == refused and j.by_start_key("OC2", "k9") is None
        assert j.prune(before=1e12) == 3
        j.save_charger("OC1", status="Faulted", error_code="GroundFailure", stopped=True)
        c = j.charger("OC1")
        assert c is not None and (c.status, c.error_code, c.stopped) == ("Faulted", "GroundFailure", True)
