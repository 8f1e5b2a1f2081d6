"""Weather alerts and watched locations (EV_W, issue #12): the table of migration 6.

Only what must survive a Central restart is stored: which locations are
watched and whether each has an active alert (with the reading that set it).
Central writes a row when one of those changes, not at every reading (EV_W
reports every few seconds). The rules are in ``actors/weather_state.py``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from persistence.db import transaction
from persistence.records import WeatherRecord, columns

__all__ = ["WeatherMixin"]

_WEATHER_COLS = columns(WeatherRecord)


class WeatherMixin:
    """Methods of :class:`~persistence.repository.Repository` for weather state."""

    _conn: sqlite3.Connection
    _clock: Callable[[], float]  # both set by SqliteStore
    _audit: Callable[..., None]  # TrustMixin's: an audit line inside the caller's transaction

    def weather_locations(self) -> list[WeatherRecord]:
        """Every stored location, by key."""
        rows = self._conn.execute(f"SELECT {_WEATHER_COLS} FROM weather_locations ORDER BY key")
        return [WeatherRecord(key, loc, bool(watched), bool(alert), temp, at)
                for key, loc, watched, alert, temp, at in rows]

    def save_weather(self, rec: WeatherRecord, *, who: str = "weather", event: str = "",
                     detail: str = "", params: dict[str, Any] | None = None) -> None:
        """Store a location's watch and alert state (insert or replace); a location neither
        watched nor under alert is deleted: there is nothing about it to keep. With ``event``,
        its audit line (component "central", subject ``who``) commits in the same transaction."""
        with transaction(self._conn):
            if event:
                self._audit(self._clock(), "central", who, event, detail, params=params)
            if not rec.watched and not rec.alert:
                self._conn.execute("DELETE FROM weather_locations WHERE key = ?", (rec.key,))
                return
            self._conn.execute(
                f"INSERT OR REPLACE INTO weather_locations ({_WEATHER_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.key, rec.location, int(rec.watched), int(rec.alert), rec.temperature_c,
                 rec.updated_at if rec.updated_at is not None else self._clock()))
