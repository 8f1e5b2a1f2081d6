"""WeatherBook: Central's weather bookkeeping (EV_W, issue #12), kept out of CentralActor.

EV_W reports each location's reading every few seconds (``WeatherAlert``,
actors/operations.py); the operator adds and removes watched locations
(``WatchLocation``). Central's actor holds one :class:`WeatherBook` and asks it:

* :meth:`WeatherBook.report` / :meth:`WeatherBook.watch`: validate the input,
  update the location, persist what must survive a restart (the watch and the
  alert state, with their audit line in the same transaction) and say what
  changed (:class:`Outcome`); Central then re-applies the stop rule to the CPs;
* :meth:`WeatherBook.hold_of`: which active alert, if any, holds a CP's location.
  That is the weather half of the one stop rule (``CpView.stop_reasons`` in
  actors/central.py); the operator's stop is the other half;
* :meth:`WeatherBook.rows`: the panel's and API's view of every location.

Locations are matched case-insensitively, with surrounding and repeated spaces
ignored (:func:`location_key`). A CP is at location L when its own location is
L, or starts with L followed by a comma: "Madrid, Puerta del Sol" is in
"Madrid" (the launcher's and the registry's "City, place" form), so EV_W
reads the weather of a city once for all its CPs.

Every input is bounded: a location is 1..:data:`LOCATION_MAX_LEN` printable
characters, a temperature a finite number within :data:`TEMPERATURE_RANGE`, an
error is cut to :data:`ERROR_MAX_LEN`, and at most :data:`MAX_LOCATIONS` are
kept; anything else is refused with a sentence (the INVALID result).
"""

from __future__ import annotations

import functools
import math
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from actors.operations import INVALID, NOT_FOUND, OperatorResult
from actors.panel import WeatherRow
from persistence.records import WeatherRecord
from transport import protocol

__all__ = ["LOCATION_MAX_LEN", "MAX_LOCATIONS", "Outcome", "Place", "WeatherBook", "WeatherStore",
           "check_location", "console_lines", "cp_location_keys", "location_key", "row_dict"]

LOCATION_MAX_LEN = 64
"""Characters in a weather location (a city name; OpenWeather's longest are well under this)."""

MAX_LOCATIONS = 1000
"""Locations Central keeps (watched or reported on): a bound on what a confused EV_W can make it hold."""

ERROR_MAX_LEN = 200
"""A provider's error sentence is cut to this many characters."""

TEMPERATURE_RANGE = (-100.0, 70.0)
"""°C: a reading outside this is not a temperature on Earth (refused, not acted on)."""


class WeatherStore(Protocol):
    """What the book reads and writes (Central's :class:`~persistence.Repository`)."""

    def weather_locations(self) -> list[WeatherRecord]: ...

    def save_weather(self, rec: WeatherRecord, *, who: str = ..., event: str = ..., detail: str = ...,
                     params: dict[str, Any] | None = ...) -> None: ...


def location_key(text: str) -> str:
    """The form locations are compared in: case-folded, spaces trimmed and collapsed."""
    return " ".join(text.split()).casefold()


def check_location(value: object) -> str | None:
    """Why ``value`` is not a usable location (a sentence), or None when it is."""
    if not isinstance(value, str):
        return "The location must be text."
    text = value.strip()
    if not text:
        return "The location is empty."
    if len(text) > LOCATION_MAX_LEN:
        return f"The location is too long ({len(text)} characters; at most {LOCATION_MAX_LEN})."
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        return "The location contains control or invisible characters."
    return None


@functools.lru_cache(maxsize=8192)  # asked for every CP at every panel snapshot; locations rarely change
def cp_location_keys(cp_location: str) -> tuple[str, ...]:
    """The weather locations a CP at ``cp_location`` is in: its whole location, and the part
    before its first comma ("Madrid, Puerta del Sol" is in "Madrid")."""
    whole = location_key(cp_location)
    city = location_key(cp_location.split(",", 1)[0])
    return (whole,) if city == whole or not city else (whole, city)


def _clean(text: str, limit: int) -> str:
    """A sentence from outside, fit to show: control characters become spaces, cut to ``limit``."""
    flat = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return protocol.clip(" ".join(flat.split()), limit)


def _degrees(temperature_c: float | None) -> str:
    return "no reading" if temperature_c is None else f"{temperature_c:g} °C"


@dataclass(eq=False)
class Place:
    """One location (mutable, private to the book and Central's actor)."""

    key: str
    location: str  # as first given
    watched: bool = False
    alert: bool = False
    temperature_c: float | None = None
    error: str | None = None
    updated_at: float | None = None  # Unix time of the last report or change

    def record(self) -> WeatherRecord:
        return WeatherRecord(self.key, self.location, self.watched, self.alert, self.temperature_c,
                             self.updated_at)

    def describe(self) -> str:
        """How the operator reads its stop reason: ``weather: Madrid -2 °C``."""
        return f"weather: {self.location}" + ("" if self.temperature_c is None else f" {_degrees(self.temperature_c)}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a report or a watch change did. ``alert_changed``: the alert started or ended (or
    was cleared by unwatching): Central must re-apply the stop rule at ``place``. ``noted``: a
    change the panel shows as a message (``text``; ``fault`` when the provider failed)."""

    place: Place
    text: str
    alert_changed: bool = False
    noted: bool = False
    fault: bool = False

    def summary(self, acted: Sequence[str], kept: Sequence[str] = ()) -> str:
        """The sentence for the operator and the panel, naming the CPs Central acted on and those
        the alert now holds (or released) that were already out of service by the operator."""
        if not self.alert_changed:
            return self.text
        text = (f"{self.text}: {len(acted)} CP(s) {'out of service' if self.place.alert else 'back in service'}"
                + (f" ({_some(acted)})" if acted else ""))
        if kept:
            text += (f"; {len(kept)} already stopped by the operator now also held ({_some(kept)})" if self.place.alert
                     else f"; {len(kept)} stay stopped by the operator ({_some(kept)})")
        return text


def _some(ids: Sequence[str], shown: int = 10) -> str:
    return ", ".join(sorted(ids)[:shown]) + (" …" if len(ids) > shown else "")


class WeatherBook:
    """Every location's weather and watch state; see the module docstring."""

    def __init__(self, store: Callable[[], WeatherStore], *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._places: dict[str, Place] = {}

    def load(self) -> None:
        """Read the stored locations (Central started): an alert active before a restart still holds."""
        self._places = {r.key: Place(r.key, r.location, r.watched, r.alert, r.temperature_c, updated_at=r.updated_at)
                        for r in self._store().weather_locations()}

    def get(self, key: str) -> Place | None:
        return self._places.get(key)

    def alerts(self) -> list[Place]:
        return [p for p in self._places.values() if p.alert]

    def stop_reason(self, key: str | None) -> str | None:
        """The stop_cp reason of the alert ``key`` (``weather: Madrid -2 °C``), None if none."""
        place = self._places.get(key) if key is not None else None
        return protocol.clip(place.describe(), protocol.REASON_MAX_LEN) if place is not None else None

    def name(self, key: str) -> str:
        """How people read the location ``key``."""
        place = self._places.get(key)
        return place.location if place is not None else key

    def hold_of(self, cp_location: str) -> str | None:
        """The key of the active alert that holds a CP at ``cp_location`` out of service, or None."""
        for key in cp_location_keys(cp_location):
            place = self._places.get(key)
            if place is not None and place.alert:
                return key
        return None

    # --- changes -------------------------------------------------------------------
    def report(self, location: object, temperature_c: object, alert: object, error: object,
               who: str) -> Outcome | OperatorResult:
        """EV_W's reading (idempotent: only a change of ``alert`` acts; the temperature and the
        error only update the view). With ``error`` the provider had no reading: nothing but the
        error changes. An INVALID result when the input is refused."""
        why = self._check_report(location, temperature_c, alert, error)
        if why is not None:
            return OperatorResult(INVALID, why)
        assert isinstance(location, str) and (temperature_c is None or isinstance(temperature_c, int | float))
        place = self._places.get(location_key(location))
        if place is None or not place.watched:
            # Only watched locations take readings: a reading still on its way when the operator
            # removed the city must not bring back an alert nobody polls any more.
            return OperatorResult(NOT_FOUND, f"Central does not watch the weather of {' '.join(location.split())}: "
                                             "add the location first.")
        now = self._clock()
        place.updated_at = now
        if error is not None:
            problem = _clean(str(error), ERROR_MAX_LEN) or "the provider failed"
            fresh = place.error is None
            place.error = problem
            text = f"Weather at {place.location}: no reading ({problem})"
            if fresh:
                self._save(place, who, "weather_error", text, {"location": place.location, "error": problem})
            return Outcome(place, text, noted=fresh, fault=True)
        recovered = place.error is not None
        place.error = None
        place.temperature_c = None if temperature_c is None else float(temperature_c)
        if alert == place.alert:
            text = f"Weather at {place.location}: {_degrees(place.temperature_c)}, alert " \
                   f"{'still on' if alert else 'off'}"
            if recovered:
                self._save(place, who, "weather_recovered", text, {"location": place.location})
            return Outcome(place, text, noted=recovered)
        place.alert = alert is True
        text = (f"Weather alert at {place.location} ({_degrees(place.temperature_c)})" if alert
                else f"Weather alert at {place.location} is over ({_degrees(place.temperature_c)})")
        self._save(place, who, "weather_alert" if alert else "weather_alert_over", text,
                   {"location": place.location, "temperature_c": place.temperature_c, "alert": place.alert})
        return Outcome(place, text, alert_changed=True, noted=True)

    @staticmethod
    def _check_report(location: object, temperature_c: object, alert: object, error: object) -> str | None:
        why = check_location(location)
        if why is not None:
            return why
        if not isinstance(alert, bool):
            return "The alert must be true or false."
        if error is not None and not isinstance(error, str):
            return "The error must be text or null."
        if temperature_c is not None:
            if isinstance(temperature_c, bool) or not isinstance(temperature_c, int | float) \
                    or not math.isfinite(temperature_c):
                return "The temperature must be a number of °C or null."
            low, high = TEMPERATURE_RANGE
            if not low <= temperature_c <= high:
                return f"The temperature {temperature_c:g} °C is not plausible (from {low:g} to {high:g} °C)."
        return None

    def watch(self, location: object, watch: bool, who: str) -> Outcome | OperatorResult:
        """Add or remove a watched location. Removing one clears its alert (``alert_changed``).
        NOT_FOUND: removing a location Central does not know; INVALID: refused."""
        why = check_location(location)
        if why is not None:
            return OperatorResult(INVALID, why)
        assert isinstance(location, str)
        key = location_key(location)
        if not watch:
            place = self._places.get(key)
            if place is None or not (place.watched or place.alert):
                return OperatorResult(NOT_FOUND, f"{' '.join(location.split())} is not a watched location.")
            cleared = place.alert
            place.watched = place.alert = False
            place.updated_at = self._clock()
            text = f"No longer watching the weather at {place.location}" + (" (its alert is cleared)" * cleared)
            self._save(place, who, "weather_unwatch", text, {"location": place.location})
            del self._places[key]  # gone from the view too (a later reading of it starts afresh)
            return Outcome(place, text, alert_changed=cleared, noted=True)
        found = self._place(location)
        if isinstance(found, OperatorResult):
            return found
        if found.watched:
            return Outcome(found, f"Already watching the weather at {found.location}")
        found.watched = True
        found.updated_at = self._clock()
        text = f"Watching the weather at {found.location}"
        self._save(found, who, "weather_watch", text, {"location": found.location})
        return Outcome(found, text, noted=True)

    def _place(self, location: str) -> Place | OperatorResult:
        key = location_key(location)
        place = self._places.get(key)
        if place is None:
            if len(self._places) >= MAX_LOCATIONS:
                return OperatorResult(INVALID, f"Central already keeps the weather of {MAX_LOCATIONS} locations; "
                                               "remove one first.")
            place = self._places[key] = Place(key, " ".join(location.split()))
        return place

    def _save(self, place: Place, who: str, event: str, detail: str, params: dict[str, Any]) -> None:
        self._store().save_weather(place.record(), who=who, event=event, detail=detail, params=params)

    # --- views -----------------------------------------------------------------------
    def rows(self, cps: Iterable[tuple[str, str]]) -> tuple[WeatherRow, ...]:
        """Every location, by key, with the CPs at it (``cps``: (cp_id, location) pairs)."""
        if not self._places:
            return ()
        at: dict[str, list[str]] = {key: [] for key in self._places}
        for cp_id, cp_location in cps:
            for key in cp_location_keys(cp_location):
                if key in at:
                    at[key].append(cp_id)
        return tuple(WeatherRow(p.location, p.temperature_c, p.alert, p.error, p.updated_at, p.watched,
                                tuple(sorted(at[key])))
                     for key, p in sorted(self._places.items()))


def row_dict(row: WeatherRow) -> dict[str, Any]:
    """A :class:`WeatherRow` as the API's **Weather** JSON object (docs/api.md)."""
    return {"location": row.location, "temperature_c": row.temperature_c, "alert": row.alert, "error": row.error,
            "updated_at": row.updated_at, "watched": row.watched, "cp_ids": list(row.cp_ids)}


def console_lines(rows: Iterable[WeatherRow]) -> list[str]:
    """Central's console ``weather``: one line per location."""
    lines = [f"Weather {w.location}: {_degrees(w.temperature_c)}, {'ALERT' if w.alert else 'no alert'}"
             f"{'' if w.watched else ', not watched'}{f', error: {w.error}' if w.error else ''}; "
             f"CPs: {', '.join(w.cp_ids) or 'none'}" for w in rows]
    return lines or ["No weather reported and no location watched"]
