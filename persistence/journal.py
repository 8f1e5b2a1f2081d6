"""The Engine's on-disk journal of its supplies.

Why: SPEC §3 says energy already supplied is not lost when an Engine dies;
when it comes back it must send the final state of that supply so Central
issues exactly one ticket. The Engine therefore writes every telemetry
step here (one row per session, a single UPDATE per step) and, after a
restart, finishes and publishes what :meth:`EngineJournal.unfinished` and
:meth:`EngineJournal.unpublished` return. Re-publishing a completion is
harmless: Central's unique ticket key turns a duplicate into a no-op.

Life cycle of a row: ``begin`` → 'supplying' → ``finish`` → 'ended'
(completion to be published) → ``mark_published`` → 'published' →
``mark_billed`` (Central's ``session_billed``: ``billed_at`` set; until then the
Engine republishes the completion now and then). A supply Central cancelled
before the plug-in is ``discard``-ed (no completion, no bill).

The journal is its own small SQLite file, opened with the same settings as
Central's database (WAL, ``synchronous=FULL``: an update that returned
survives a SIGKILL of the Engine and a power cut, so the journal is never
behind the telemetry Central saw; Central rejects a completion below that). Thread-safety: one connection, used by
one thread at a time (the Engine actor that owns it).
"""

from __future__ import annotations

from typing import Final

from persistence.db import Migration, SqliteStore, transaction
from persistence.errors import UnknownSession
from persistence.records import JournalEntry, columns

__all__ = ["EngineJournal", "JOURNAL_MIGRATIONS"]

_JOURNAL_V1: Final = """
CREATE TABLE supplies (
    session_id     TEXT PRIMARY KEY,
    cp_id          TEXT NOT NULL,
    driver_id      TEXT NOT NULL,
    price_eur_kwh  REAL NOT NULL,
    status         TEXT NOT NULL DEFAULT 'supplying'
                   CHECK (status IN ('supplying', 'ended', 'published')),
    started_at     REAL NOT NULL,
    last_seq       INTEGER NOT NULL DEFAULT 0,
    energy_kwh     REAL NOT NULL DEFAULT 0,
    cost_eur       REAL NOT NULL DEFAULT 0,
    updated_at     REAL NOT NULL,
    end_reason     TEXT,
    ended_at       REAL,
    published_at   REAL
);
CREATE INDEX supplies_by_status ON supplies (status);
"""

# Version 2: Central's ticket. A 'published' supply stays unbilled (billed_at
# NULL) until Central says ``session_billed``; until then the Engine asks
# Central and republishes its completion now and then (issue #10 item 7).
_JOURNAL_V2: Final = """
ALTER TABLE supplies ADD COLUMN billed_at REAL;
CREATE INDEX supplies_unbilled ON supplies (status) WHERE billed_at IS NULL;
"""

#: The journal's schema history (independent of Central's). Append only.
JOURNAL_MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "engine supply journal", _JOURNAL_V1),
    Migration(2, "billed_at: Central's ticket seen", _JOURNAL_V2),
)

_COLS = columns(JournalEntry)


class EngineJournal(SqliteStore):
    """Durable record of the Engine's supplies; see the module docstring."""

    MIGRATIONS = JOURNAL_MIGRATIONS

    def _get(self, session_id: str) -> JournalEntry | None:
        row = self._conn.execute(
            f"SELECT {_COLS} FROM supplies WHERE session_id = ?", (session_id,)
        ).fetchone()
        return JournalEntry(*row) if row else None

    def begin(
        self,
        session_id: str,
        cp_id: str,
        driver_id: str,
        price_eur_kwh: float,
        started_at: float,
    ) -> JournalEntry:
        """Record that a supply started (status 'supplying', zero totals).

        Idempotent: if the session is already journaled, the existing entry
        is returned unchanged, so a replayed start never resets its totals.
        """
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO supplies (session_id, cp_id, driver_id, price_eur_kwh, "
                "started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id) DO NOTHING",
                (session_id, cp_id, driver_id, float(price_eur_kwh), started_at, started_at),
            )
            entry = self._get(session_id)
        assert entry is not None
        return entry

    def update(self, session_id: str, seq: int, energy_kwh: float, cost_eur: float, at: float) -> bool:
        """Store the running totals after telemetry step ``seq``.

        A single autocommitted UPDATE (one WAL append, no fsync), cheap
        enough for every step. Only moves forward: ignored if ``seq`` is not
        greater than the stored one or the supply already ended. Returns
        True if stored (False also for an unknown session).
        """
        cursor = self._conn.execute(
            "UPDATE supplies SET last_seq = ?, energy_kwh = ?, cost_eur = ?, updated_at = ? "
            "WHERE session_id = ? AND status = 'supplying' AND last_seq < ?",
            (int(seq), float(energy_kwh), float(cost_eur), at, session_id, int(seq)),
        )
        return cursor.rowcount == 1

    def finish(self, session_id: str, end_reason: str, ended_at: float) -> JournalEntry:
        """Mark the supply ended with its last totals, awaiting publication
        of the completion. Idempotent: an entry already ended or published is
        returned unchanged. Raises UnknownSession if it was never begun."""
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE supplies SET status = 'ended', end_reason = ?, ended_at = ?, updated_at = ? "
                "WHERE session_id = ? AND status = 'supplying'",
                (end_reason, ended_at, ended_at, session_id),
            )
            entry = self._get(session_id)
            if entry is None:
                raise UnknownSession(session_id)
        return entry

    def mark_published(self, session_id: str) -> bool:
        """The broker acknowledged the completion: nothing left to resend.
        True if this call marked it; False if it was not 'ended' (still
        supplying, already published) -- raises UnknownSession if unknown."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE supplies SET status = 'published', published_at = ? "
                "WHERE session_id = ? AND status = 'ended'",
                (self._clock(), session_id),
            )
            if cursor.rowcount == 0 and self._get(session_id) is None:
                raise UnknownSession(session_id)
        return cursor.rowcount == 1

    def unfinished(self) -> list[JournalEntry]:
        """Supplies begun but never finished: the Engine died mid-supply."""
        return self._by_status("supplying")

    def unpublished(self) -> list[JournalEntry]:
        """Supplies finished whose completion is not yet acknowledged."""
        return self._by_status("ended")

    def _by_status(self, status: str) -> list[JournalEntry]:
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM supplies WHERE status = ? ORDER BY started_at, session_id",
            (status,),
        )
        return [JournalEntry(*row) for row in rows]

    def get(self, session_id: str) -> JournalEntry | None:
        """The entry for a session, or None."""
        return self._get(session_id)

    def prune_published(self, before: float) -> int:
        """Delete published entries older than ``before`` so the file stays
        small. Returns how many were removed."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "DELETE FROM supplies WHERE status = 'published' AND published_at < ?", (before,)
            )
        return cursor.rowcount

    # --- Central's ticket (schema version 2) -------------------------------------

    def mark_billed(self, session_id: str) -> bool:
        """Central has the ticket: nothing left to republish. Marks a finished
        entry ('ended' or 'published'; the ticket proves the completion arrived)
        billed; True if this call marked it, False if already billed, still
        supplying, or unknown."""
        with transaction(self._conn):
            now = self._clock()
            cursor = self._conn.execute(
                "UPDATE supplies SET billed_at = ?, status = 'published', published_at = COALESCE(published_at, ?) "
                "WHERE session_id = ? AND status IN ('ended', 'published') AND billed_at IS NULL",
                (now, now, session_id),
            )
        return cursor.rowcount == 1

    def unbilled(self) -> list[JournalEntry]:
        """Supplies whose completion is in Kafka but whose ticket the Engine has not
        seen yet (oldest first)."""
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM supplies WHERE status = 'published' AND billed_at IS NULL "
            "ORDER BY started_at, session_id"
        )
        return [JournalEntry(*row) for row in rows]

    def billed_at(self, session_id: str) -> float | None:
        """When the Engine learnt the session was billed (None: not yet, or unknown)."""
        row = self._conn.execute("SELECT billed_at FROM supplies WHERE session_id = ?", (session_id,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def discard(self, session_id: str) -> bool:
        """Forget a supply Central cancelled before any energy flowed (still
        'supplying' with no telemetry step): no completion, no bill. True if
        removed; False if it had supplied, ended, or is unknown."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "DELETE FROM supplies WHERE session_id = ? AND status = 'supplying' AND last_seq = 0",
                (session_id,),
            )
        return cursor.rowcount == 1

