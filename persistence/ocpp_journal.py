"""The OCPP gateway's own journal (issue #13): its transactions and its chargers, in one SQLite file.

Why the gateway keeps one: an OCPP charger names a transaction by the integer
``transactionId`` the gateway gave it, and it repeats transaction messages
until they are answered (after a lost answer, a reconnect, or days offline).
The gateway must therefore remember, across its own restarts:

* which Central session each ``transactionId`` is (and which driver, at which
  price), so a queued MeterValues or StopTransaction after a restart still
  reaches the right session;
* the highest meter reading applied to each transaction and its telemetry
  sequence, so readings stay monotonic (a lower one is flagged, never billed)
  and Central's dedupe by ``seq`` keeps working after a restart;
* which StopTransactions were already turned into a completion, and whether
  Kafka and then Central confirmed it: a duplicate StopTransaction answers the
  same and bills nothing, a completion Kafka never confirmed is sent again, one
  Central never confirmed is sent again until its ticket is seen.

A row is one *supply* at one charger, keyed by its ``transaction_id`` (the row
id, so it is known from the moment Central authorises the supply):

    authorized ──start──▶ charging ──stop──▶ stopped ─▶ (published_at) ─▶ (billed_at)
        │                                        ▲
        ├──stop (no StartTransaction came)───────┘  0 kWh, billed like the Engine's unplugged supply
        └──drop (Central cancelled it)──▶ dropped    no completion, no bill
    refused                                          a StartTransaction Central did not authorise

Nothing secret is stored: no password, verifier or key. The file is opened
like Central's database (WAL, ``synchronous=FULL``): a committed stop
survives a SIGKILL and a power cut. Meter readings are the exception: a
charger sends one a second, and an fsync each would queue every charger of
the gateway behind the disk. They are written together, once a second
(:meth:`OcppJournal.write_behind`), without an fsync, and before anything
else the journal does. A gateway killed in between loses at most that
second of readings, which is harmless: a charger's register is absolute, so
its next reading and its StopTransaction's meterStop carry the energy, and
the telemetry sequence of a transaction read back after a restart is
continued from well above the stored one (see the charger actor).

One journal (one connection) serves every charger actor of the gateway: its
methods take a lock, so the actors' writes queue in the process instead of
contending for SQLite's file lock (whose busy handler sleeps milliseconds at a
time: measured, with 150 chargers and one connection each, it alone made the
meter-to-panel lag grow to seconds). The actors keep what they read every
second (their live row) in memory and come here to write it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from persistence.db import Migration, SqliteStore, transaction
from persistence.records import columns

__all__ = ["OcppJournal", "TxRow", "ChargerRow", "OCPP_MIGRATIONS", "LIVE", "AUTHORIZED", "CHARGING", "STOPPED",
           "DROPPED", "REFUSED"]

AUTHORIZED: Final = "authorized"
CHARGING: Final = "charging"
STOPPED: Final = "stopped"
DROPPED: Final = "dropped"
REFUSED: Final = "refused"
LIVE: Final = (AUTHORIZED, CHARGING)

_V1: Final = """
CREATE TABLE transactions (
    transaction_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    cp_id           TEXT NOT NULL,
    session_id      TEXT UNIQUE,
    driver_id       TEXT NOT NULL,
    price_eur_kwh   REAL NOT NULL DEFAULT 0,
    status          TEXT NOT NULL CHECK (status IN ('authorized', 'charging', 'stopped', 'dropped', 'refused')),
    origin          TEXT NOT NULL DEFAULT 'local',
    connector_id    INTEGER,
    start_key       TEXT,
    meter_start_wh  REAL,
    last_meter_wh   REAL,
    last_meter_at   REAL,
    seq             INTEGER NOT NULL DEFAULT 0,
    energy_kwh      REAL NOT NULL DEFAULT 0,
    lower_readings  INTEGER NOT NULL DEFAULT 0,
    requested_end   TEXT,
    created_at      REAL NOT NULL,
    started_at      REAL,
    ended_at        REAL,
    meter_stop_wh   REAL,
    end_reason      TEXT,
    published_at    REAL,
    billed_at       REAL,
    UNIQUE (cp_id, start_key)
);
CREATE INDEX transactions_live ON transactions (cp_id, status);
CREATE INDEX transactions_unbilled ON transactions (cp_id) WHERE status = 'stopped' AND billed_at IS NULL;
CREATE TABLE chargers (
    cp_id       TEXT PRIMARY KEY,
    status      TEXT,
    error_code  TEXT,
    stopped     INTEGER NOT NULL DEFAULT 0,
    updated_at  REAL NOT NULL
);
"""

#: The journal's schema history (its own, independent of Central's). Append only.
OCPP_MIGRATIONS: Final[tuple[Migration, ...]] = (Migration(1, "OCPP gateway transactions and chargers", _V1),)


@dataclass(frozen=True, slots=True)
class TxRow:
    """One supply at one charger (see the module docstring for the life cycle)."""

    transaction_id: int
    cp_id: str
    session_id: str | None
    driver_id: str
    price_eur_kwh: float
    status: str
    origin: str  # 'local' (Authorize/StartTransaction at the charger) or 'remote' (a driver's charge_request)
    connector_id: int | None
    start_key: str | None
    meter_start_wh: float | None
    last_meter_wh: float | None
    last_meter_at: float | None
    seq: int
    energy_kwh: float
    lower_readings: int
    requested_end: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    meter_stop_wh: float | None
    end_reason: str | None
    published_at: float | None
    billed_at: float | None

    @property
    def cost_eur(self) -> float:
        return self.energy_kwh * self.price_eur_kwh


@dataclass(frozen=True, slots=True)
class ChargerRow:
    """What the gateway last knew of a charger (its availability, and whether Central stopped it)."""

    cp_id: str
    status: str | None
    error_code: str | None
    stopped: bool
    updated_at: float


_COLS: Final = columns(TxRow)
F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Run ``method`` under the journal's lock (the charger actors of a gateway share one journal), after
    writing the readings still held in memory: every method sees them as if they had been written."""

    @functools.wraps(method)
    def locked(self: OcppJournal, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._readings and not self._closed:
                self._write_readings()
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class OcppJournal(SqliteStore):
    """The gateway's durable memory; see the module docstring. Every method that changes a
    row is idempotent: called again (a repeated OCPP message), it changes nothing and says so."""

    MIGRATIONS = OCPP_MIGRATIONS

    def __init__(self, path: str | Path, *, durable: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, durable=durable, clock=clock)
        self._durable = self.DURABLE if durable is None else durable
        self._lock = threading.RLock()
        self._readings: dict[tuple[str, int], tuple[float, float | None, int, float]] = {}  # not written yet
        self._readings_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()

    @_locked
    def close(self) -> None:
        """Write the readings held in memory, then close (idempotent)."""
        self._closing.set()
        super().close()

    def write_behind(self, interval: float = 1.0) -> None:
        """Write meter readings every ``interval`` s in one transaction (a thread of the journal's, until
        :meth:`close`) instead of one write each; see the module docstring."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, args=(interval,), name="ocpp-journal",
                                             daemon=True)
            self._flusher.start()

    def _flush_loop(self, interval: float) -> None:
        while not self._closing.wait(interval):
            with self._lock:
                if self._readings and not self._closed:
                    self._write_readings()

    def _write_readings(self) -> None:
        """Write the readings held in memory (under the journal's lock), one transaction, no fsync."""
        with self._readings_lock:
            batch, self._readings = self._readings, {}
        self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with transaction(self._conn):
                self._conn.executemany(
                    "UPDATE transactions SET last_meter_wh = ?, last_meter_at = ?, seq = ?, energy_kwh = ? "
                    "WHERE transaction_id = ? AND cp_id = ? AND status = 'charging' AND seq < ?",
                    [(wh, at, seq, kwh, tx, cp, seq) for (cp, tx), (wh, at, seq, kwh) in batch.items()])
        finally:
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if self._durable else 'NORMAL'}")

    # --- reading ---------------------------------------------------------------------
    def _one(self, where: str, *args: object) -> TxRow | None:
        row = self._conn.execute(f"SELECT {_COLS} FROM transactions WHERE {where}", args).fetchone()
        return TxRow(*row) if row else None

    @_locked
    def get(self, cp_id: str, transaction_id: int) -> TxRow | None:
        """The transaction ``transaction_id`` *of this charger* (another charger's id is None)."""
        return self._one("transaction_id = ? AND cp_id = ?", int(transaction_id), cp_id)

    @_locked
    def by_session(self, cp_id: str, session_id: str) -> TxRow | None:
        return self._one("session_id = ? AND cp_id = ?", session_id, cp_id)

    @_locked
    def by_start_key(self, cp_id: str, start_key: str) -> TxRow | None:
        return self._one("start_key = ? AND cp_id = ?", start_key, cp_id)

    @_locked
    def live(self, cp_id: str) -> list[TxRow]:
        """The charger's authorised and charging supplies, oldest first."""
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM transactions WHERE cp_id = ? AND status IN ('authorized', 'charging') "
            "ORDER BY transaction_id", (cp_id,))
        return [TxRow(*r) for r in rows]

    @_locked
    def unpublished(self, cp_id: str) -> list[TxRow]:
        """Stopped supplies whose completion Kafka has not confirmed (to send again)."""
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM transactions WHERE cp_id = ? AND status = 'stopped' AND published_at IS NULL "
            "AND session_id IS NOT NULL ORDER BY transaction_id", (cp_id,))
        return [TxRow(*r) for r in rows]

    @_locked
    def unbilled(self, cp_id: str) -> list[TxRow]:
        """Stopped supplies in Kafka whose ticket the gateway has not seen (oldest first)."""
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM transactions WHERE cp_id = ? AND status = 'stopped' AND billed_at IS NULL "
            "AND published_at IS NOT NULL AND session_id IS NOT NULL ORDER BY transaction_id", (cp_id,))
        return [TxRow(*r) for r in rows]

    @_locked
    def count(self, status: str | None = None) -> int:
        if status is None:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM transactions").fetchone()
        else:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM transactions WHERE status = ?", (status,)).fetchone()
        return int(n)

    # --- the life cycle ------------------------------------------------------------------
    @_locked
    def hold(self, cp_id: str, session_id: str, driver_id: str, price_eur_kwh: float, origin: str,
             now: float | None = None) -> TxRow:
        """Central authorised ``session_id`` here: a row 'authorized' with its transaction id.
        Idempotent: the same session again returns the existing row unchanged."""
        at = self._clock() if now is None else now
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO transactions (cp_id, session_id, driver_id, price_eur_kwh, status, origin, created_at) "
                "VALUES (?, ?, ?, ?, 'authorized', ?, ?) ON CONFLICT (session_id) DO NOTHING",
                (cp_id, session_id, driver_id, float(price_eur_kwh), origin, at))
            row = self._one("session_id = ?", session_id)
        assert row is not None
        return row

    @_locked
    def refuse(self, cp_id: str, driver_id: str, connector_id: int, meter_start_wh: float, start_key: str,
               now: float | None = None) -> TxRow:
        """A StartTransaction Central did not authorise: a transaction id the charger can stop, never billed.
        Idempotent per ``start_key``."""
        at = self._clock() if now is None else now
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO transactions (cp_id, driver_id, status, connector_id, start_key, meter_start_wh, "
                "last_meter_wh, created_at, started_at) VALUES (?, ?, 'refused', ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (cp_id, start_key) DO NOTHING",
                (cp_id, driver_id, int(connector_id), start_key, float(meter_start_wh), float(meter_start_wh), at,
                 at))
            row = self._one("start_key = ? AND cp_id = ?", start_key, cp_id)
        assert row is not None
        return row

    @_locked
    def start(self, cp_id: str, transaction_id: int, connector_id: int, meter_start_wh: float, start_key: str,
              started_at: float) -> TxRow:
        """The charger started the authorised supply: 'authorized' → 'charging' with its meter start.
        Idempotent: a row already started is returned unchanged."""
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE transactions SET status = 'charging', connector_id = ?, start_key = ?, meter_start_wh = ?, "
                "last_meter_wh = ?, started_at = ? WHERE transaction_id = ? AND cp_id = ? AND status = 'authorized'",
                (int(connector_id), start_key, float(meter_start_wh), float(meter_start_wh), started_at,
                 int(transaction_id), cp_id))
            row = self.get(cp_id, transaction_id)
        assert row is not None
        return row

    def reading(self, cp_id: str, transaction_id: int, meter_wh: float, meter_at: float | None, seq: int,
                energy_kwh: float) -> None:
        """A meter reading applied (only forward: a higher ``seq`` on a charging row). With :meth:`write_behind`
        it is held in memory until the next write (every method of the journal writes it first); else it is
        written now. Never with an fsync (see the module docstring)."""
        with self._readings_lock:
            held = self._readings.get((cp_id, int(transaction_id)))
            if held is None or held[2] < seq:
                self._readings[(cp_id, int(transaction_id))] = (float(meter_wh), meter_at, int(seq), float(energy_kwh))
        if self._flusher is None:
            with self._lock:
                if self._readings:
                    self._write_readings()

    @_locked
    def flag_lower(self, cp_id: str, transaction_id: int, n: int = 1) -> None:
        """``n`` readings lower than the last applied one arrived: counted, not applied."""
        self._conn.execute("UPDATE transactions SET lower_readings = lower_readings + ? WHERE transaction_id = ? "
                           "AND cp_id = ?", (int(n), int(transaction_id), cp_id))

    @_locked
    def request_end(self, cp_id: str, transaction_id: int, end_reason: str) -> None:
        """Who asked for the stop (a driver, Central): the end reason a later "Remote" stop is billed with."""
        self._conn.execute("UPDATE transactions SET requested_end = ? WHERE transaction_id = ? AND cp_id = ? "
                           "AND requested_end IS NULL", (end_reason, int(transaction_id), cp_id))

    @_locked
    def stop(self, cp_id: str, transaction_id: int, *, energy_kwh: float, end_reason: str, ended_at: float,
             meter_stop_wh: float | None = None) -> tuple[TxRow, bool]:
        """The supply is over with ``energy_kwh``: 'authorized'/'charging' → 'stopped'. Returns the row and
        whether *this* call stopped it (False: it was already stopped — a repeated StopTransaction)."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE transactions SET status = 'stopped', energy_kwh = ?, end_reason = ?, ended_at = ?, "
                "meter_stop_wh = ? WHERE transaction_id = ? AND cp_id = ? AND status IN ('authorized', 'charging')",
                (float(energy_kwh), end_reason, ended_at, meter_stop_wh, int(transaction_id), cp_id))
            row = self.get(cp_id, transaction_id)
        assert row is not None
        return row, cursor.rowcount == 1

    @_locked
    def drop(self, cp_id: str, session_id: str, now: float | None = None) -> bool:
        """Central cancelled a supply the charger never started: no completion, no bill. True if dropped."""
        at = self._clock() if now is None else now
        cursor = self._conn.execute(
            "UPDATE transactions SET status = 'dropped', ended_at = ? WHERE session_id = ? AND cp_id = ? "
            "AND status = 'authorized'", (at, session_id, cp_id))
        return cursor.rowcount == 1

    @_locked
    def mark_published(self, cp_id: str, session_id: str) -> bool:
        """Kafka confirmed the completion (acks=all). True if this call marked it."""
        cursor = self._conn.execute(
            "UPDATE transactions SET published_at = ? WHERE session_id = ? AND cp_id = ? AND status = 'stopped' "
            "AND published_at IS NULL", (self._clock(), session_id, cp_id))
        return cursor.rowcount == 1

    @_locked
    def mark_billed(self, cp_id: str, session_id: str) -> bool:
        """Central has the ticket (its ``session_billed``): nothing left to send. True if this call marked it."""
        now = self._clock()
        cursor = self._conn.execute(
            "UPDATE transactions SET billed_at = ?, published_at = COALESCE(published_at, ?) WHERE session_id = ? "
            "AND cp_id = ? AND status = 'stopped' AND billed_at IS NULL", (now, now, session_id, cp_id))
        return cursor.rowcount == 1

    @_locked
    def prune(self, before: float) -> int:
        """Delete billed, dropped and refused rows that ended before ``before`` (the file stays small)."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "DELETE FROM transactions WHERE ((status = 'stopped' AND billed_at IS NOT NULL) "
                "OR status IN ('dropped', 'refused')) AND COALESCE(ended_at, created_at) < ?", (before,))
        return cursor.rowcount

    # --- chargers ----------------------------------------------------------------------
    @_locked
    def charger(self, cp_id: str) -> ChargerRow | None:
        row = self._conn.execute("SELECT cp_id, status, error_code, stopped, updated_at FROM chargers "
                                 "WHERE cp_id = ?", (cp_id,)).fetchone()
        return ChargerRow(row[0], row[1], row[2], bool(row[3]), row[4]) if row else None

    @_locked
    def save_charger(self, cp_id: str, *, status: str | None, error_code: str | None, stopped: bool) -> None:
        self._conn.execute(
            "INSERT INTO chargers (cp_id, status, error_code, stopped, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (cp_id) DO UPDATE SET status = excluded.status, error_code = excluded.error_code, "
            "stopped = excluded.stopped, updated_at = excluded.updated_at",
            (cp_id, status, error_code, int(stopped), time.time()))
