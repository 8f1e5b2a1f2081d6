"""Read-only queries for the HTTP API (issue #12): tickets by driver, CP and time, drivers, key states.

API_Central reads these from Central's database file in its own request
threads (WAL: a reader never blocks the ledger, nor waits for it). Nothing
here writes. Every list is bounded by a ``limit`` the caller chooses (the API
bounds it again at its edge).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

from persistence.records import TicketRecord, columns

__all__ = ["QueryMixin", "DriverOverview", "KeyState", "MAX_ROWS"]

#: No query returns more rows than this, whatever it is asked.
MAX_ROWS: Final = 10_000

_TICKET_COLS = columns(TicketRecord)
_LIVE = "status IN ('authorized', 'supplying')"


@dataclass(frozen=True, slots=True)
class DriverOverview:
    """A driver Central knows: registered (a registry credential that works), seen (it sent a request)
    or both; its live session, if any."""

    driver_id: str
    registered: bool
    first_seen: float | None  # when Central first knew it (registered, or its first request)
    live_session_id: str | None


@dataclass(frozen=True, slots=True)
class KeyState:
    """The newest key Central issued to a CP, as the database keeps it."""

    cp_id: str
    key_id: str
    issued_at: float
    state: str  # current | replaced | revoked


class QueryMixin:
    """Read-only methods of :class:`~persistence.repository.Repository` used by API_Central."""

    _conn: sqlite3.Connection  # set by SqliteStore

    def find_tickets(self, *, driver_id: str | None = None, cp_id: str | None = None, since: float | None = None,
                     until: float | None = None, limit: int = 100) -> list[TicketRecord]:
        """Tickets, newest first, of ``driver_id`` and/or ``cp_id`` whose supply ended (or, without an
        end time, was billed) within [``since``, ``until``] (Unix seconds; None: unbounded)."""
        where: list[str] = []
        args: list[str | float] = []
        for column, value in (("driver_id", driver_id), ("cp_id", cp_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("COALESCE(ended_at, issued_at) >= ?")
            args.append(since)
        if until is not None:
            where.append("COALESCE(ended_at, issued_at) <= ?")
            args.append(until)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self._conn.execute(
            f"SELECT {_TICKET_COLS} FROM tickets {clause} ORDER BY COALESCE(ended_at, issued_at) DESC, "
            "ticket_id DESC LIMIT ?", (*args, _bounded(limit)))
        return [TicketRecord(*row) for row in rows]

    def drivers_overview(self, limit: int = 1000) -> list[DriverOverview]:
        """Every driver that is registered or was seen, by id, with its live session."""
        rows = self._conn.execute(
            f"""
            WITH ids AS (SELECT driver_id AS id FROM drivers
                         UNION SELECT id FROM credentials WHERE kind = 'driver')
            SELECT ids.id,
                   EXISTS (SELECT 1 FROM credentials c WHERE c.kind = 'driver' AND c.id = ids.id
                           AND c.deregistered_at IS NULL),
                   (SELECT first_seen FROM drivers d WHERE d.driver_id = ids.id),
                   (SELECT session_id FROM sessions s WHERE s.driver_id = ids.id AND {_LIVE})
            FROM ids ORDER BY ids.id LIMIT ?""", (_bounded(limit),))
        return [DriverOverview(str(i), bool(reg), seen, sid) for i, reg, seen, sid in rows]

    def registered_cp_ids(self) -> set[str]:
        """The CPs with a registry credential that works."""
        rows = self._conn.execute("SELECT id FROM credentials WHERE kind = 'cp' AND deregistered_at IS NULL")
        return {str(r[0]) for r in rows}

    def latest_keys(self) -> dict[str, KeyState]:
        """The newest key of each CP that was ever issued one (replaced and revoked ones included,
        until they are pruned)."""
        rows = self._conn.execute(
            "SELECT cp_id, key_id, issued_at, state FROM cp_keys k WHERE issued_at = "
            "(SELECT MAX(issued_at) FROM cp_keys WHERE cp_id = k.cp_id)")
        return {str(cp): KeyState(str(cp), str(key_id), float(at), str(state)) for cp, key_id, at, state in rows}


def _bounded(limit: int) -> int:
    return max(0, min(int(limit), MAX_ROWS))
