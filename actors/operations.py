"""Operator and weather messages Central accepts from its adapters (console, HTTP API, EV_W).

Each is an *ask*: the adapter waits for an :class:`OperatorResult`, whose
``text`` is a sentence for a person and whose ``status`` an HTTP adapter maps
to a status code (ok → 200, not_found → 404, conflict → 409, unavailable →
503, invalid → 422). Every operator command is audited by Central with its
parameters and the adapter it came through (``who``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AdminCommand", "OperatorResult", "RevokeKey", "WeatherAlert", "WatchLocation", "WeatherView", "OK",
           "NOT_FOUND", "CONFLICT", "UNAVAILABLE", "INVALID"]

OK, NOT_FOUND, CONFLICT, UNAVAILABLE, INVALID = "ok", "not_found", "conflict", "unavailable", "invalid"


@dataclass(frozen=True, slots=True)
class OperatorResult:
    """Central's answer to an operator or weather command."""

    status: str  # OK | NOT_FOUND | CONFLICT | UNAVAILABLE | INVALID
    text: str  # one sentence, for a person
    cp_ids: tuple[str, ...] = ()  # the CPs the command acted on

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class AdminCommand:
    """Stop or resume one CP (``cp_id``) or all of them (``cp_id=None``). Console:
    ``stop|resume CP_ID|all``. A stop ends a running supply at the CP (billed as usual); a
    resume clears the operator's stop only: a CP an active weather alert holds stays STOPPED
    (CONFLICT for one CP). Also importable from actors.central."""

    action: str  # "stop" | "resume"
    cp_id: str | None = None
    who: str = "api"
    address: str | None = None  # where the operator's command came from (audited)


@dataclass(frozen=True, slots=True)
class RevokeKey:
    """Revoke every key of ``cp_id`` and close its link (console: ``revoke CP_ID [REASON]``)."""

    cp_id: str
    reason: str = ""
    who: str = "api"
    address: str | None = None  # where the operator's command came from (audited)


@dataclass(frozen=True, slots=True)
class WeatherAlert:
    """EV_W's reading for a location: ``alert`` True puts every CP at ``location`` out of
    service (STOPPED, reason "weather"); False restores those the operator did not stop.
    Sent every poll (idempotent): only a change of ``alert`` acts. ``error`` reports a
    provider failure (no reading: nothing changes, the panel shows the error)."""

    location: str
    temperature_c: float | None
    alert: bool
    error: str | None = None
    who: str = "weather"


@dataclass(frozen=True, slots=True)
class WatchLocation:
    """Add (``watch`` True) or remove a location EV_W reads the weather of."""

    location: str
    watch: bool
    who: str = "api"
    address: str | None = None  # where the operator's command came from (audited)


@dataclass(frozen=True, slots=True)
class WeatherView:
    """Ask: the weather Central knows, a list of dicts (see docs/api.md, ``GET /api/weather``):
    ``location, temperature_c, alert, error, updated_at, watched, cp_ids`` (a list), by location.
    The same rows travel in every ``PanelSnapshot.weather`` (actors/panel.py ``WeatherRow``).
    Watched locations (``GET /api/weather/locations``) are the rows with ``watched`` true."""
