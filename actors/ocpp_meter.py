"""Reading OCPP 1.6 values the way the gateway bills them: meter readings, times, end reasons.

Pure functions (no actor, no I/O), so each rule is tested on its own
(tests/test_ocpp_units.py) and written once:

* :func:`energy_readings`: the ``Energy.Active.Import.Register`` readings of a
  MeterValues (or a StopTransaction's ``transactionData``), in Wh, in order,
  one per sampled time; the measurand is that register when a sampled value
  names none (OCPP 1.6 §7.31); a per-phase or non-outlet value, a signed
  value, a unit other than Wh/kWh, a value that is not a finite
  non-negative number, or one above :data:`MAX_WH` is skipped with a reason;
* :func:`parse_time`: an OCPP date-time (RFC 3339) as seconds since the epoch,
  None when it is not one or is outside the protocol's bounds;
* :func:`end_reason`: OCPP's StopTransaction reason as one of the end reasons
  Central bills with;
* :func:`ocpp_now`: the current time as OCPP writes it.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from transport import protocol

__all__ = ["Reading", "energy_readings", "parse_time", "end_reason", "ocpp_now", "ENERGY_REGISTER", "MAX_WH",
           "MAX_CONNECTOR", "power_between"]

ENERGY_REGISTER: Final = "Energy.Active.Import.Register"
POWER: Final = "Power.Active.Import"
#: The largest meter register accepted, in Wh (10 GWh: more than any charger's lifetime).
MAX_WH: Final = 1e10
#: The largest connector id accepted (a charger has a handful).
MAX_CONNECTOR: Final = 64
_ENERGY_UNITS: Final = {None: 1.0, "Wh": 1.0, "kWh": 1000.0}
_POWER_UNITS: Final = {None: 0.001, "W": 0.001, "kW": 1.0}


@dataclass(frozen=True, slots=True)
class Reading:
    """One energy register reading (Wh) at a time the charger gave (seconds since the epoch, or None)."""

    wh: float
    at: float | None
    power_kw: float | None = None


def energy_readings(meter_values: Iterable[Mapping[str, Any]]) -> tuple[list[Reading], list[str]]:
    """The energy readings of a list of OCPP ``MeterValue`` (snake_case keys), and why any value was skipped."""
    readings: list[Reading] = []
    skipped: list[str] = []
    for mv in meter_values:
        at = parse_time(mv.get("timestamp"))
        energy: float | None = None
        power: float | None = None
        for sv in mv.get("sampled_value") or ():
            measurand = sv.get("measurand") or ENERGY_REGISTER
            if measurand not in (ENERGY_REGISTER, POWER) or sv.get("phase") is not None \
                    or sv.get("location") not in (None, "Outlet"):
                continue  # another quantity (current, SoC, a phase, the EV side): not what is billed
            if sv.get("format") == "SignedData":
                skipped.append(f"a signed {measurand} value (this gateway reads plain values only)")
                continue
            units = _ENERGY_UNITS if measurand == ENERGY_REGISTER else _POWER_UNITS
            unit = sv.get("unit")
            if unit not in units:
                expected = "Wh or kWh" if units is _ENERGY_UNITS else "W or kW"
                skipped.append(f"a {measurand} value in {unit!r} (expected {expected})")
                continue
            value = _number(sv.get("value"))
            if value is None or value < 0:
                skipped.append(f"a {measurand} value that is not a non-negative number: {str(sv.get('value'))[:40]!r}")
                continue
            if measurand == ENERGY_REGISTER:
                wh = value * units[unit]
                if wh > MAX_WH:
                    skipped.append(f"an energy register of {wh:.0f} Wh (more than {MAX_WH:.0f})")
                    continue
                energy = wh
            else:
                power = min(value * units[unit], protocol.MAX_POWER_KW)
        if energy is not None:
            readings.append(Reading(energy, at, power))
    return readings, skipped


def power_between(before_wh: float, before_at: float | None, after: Reading) -> float:
    """The average power (kW) between two readings by the charger's clock; 0 when it cannot tell."""
    if after.power_kw is not None:
        return after.power_kw
    if before_at is None or after.at is None or after.at <= before_at:
        return 0.0
    kw = (after.wh - before_wh) / 1000.0 / ((after.at - before_at) / 3600.0)
    return max(0.0, min(kw, protocol.MAX_POWER_KW))


def _number(text: Any) -> float | None:
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_time(text: Any) -> float | None:
    """An RFC 3339 date-time ("2026-01-01T10:00:00Z", "…+01:00", fractions) as epoch seconds; None if not one.

    A time without an offset is taken as UTC (OCPP 1.6 says times are UTC); outside 1970 to 2100: None."""
    if not isinstance(text, str) or not 10 <= len(text) <= 40:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    seconds = when.timestamp()
    return seconds if 0 <= seconds <= protocol.MAX_TIMESTAMP else None


def ocpp_now(now: float | None = None) -> str:
    """``now`` (default: the current time) as OCPP writes a date-time: UTC, milliseconds, a ``Z``."""
    when = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


#: OCPP 1.6 StopTransaction reasons → the end reason Central bills with.
_REASONS: Final = {
    "EVDisconnected": "unplugged", "Local": "unplugged", "Other": "unplugged", "UnlockCommand": "unplugged",
    "EmergencyStop": "fault", "PowerLoss": "fault", "HardReset": "fault", "SoftReset": "fault", "Reboot": "fault",
    "DeAuthorized": "central_stop", "Remote": "central_stop",
}


def end_reason(ocpp_reason: str | None, requested: str | None = None) -> str:
    """The end reason of a StopTransaction: who asked for a remote stop (``requested``: a driver's stop or
    Central's) when the charger says "Remote" or gives no reason after being asked; else OCPP's reason."""
    if requested in protocol.END_REASONS and ocpp_reason in (None, "Remote", "Local", "Other"):
        return requested
    return _REASONS.get(ocpp_reason or "Local", "unplugged")
