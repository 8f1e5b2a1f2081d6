"""Central's repository: every read and write of charging points, sessions,
tickets, message dedupe and the audit trail.

Why one class with intent-named methods instead of exposing SQL: the
exactly-once rules (SPEC §3) live in *which* statements share a
transaction, and that must not be re-invented by each caller.

Thread-safety: a Repository owns one SQLite connection, opened with
``check_same_thread=False`` so the actor that owns it may be created in one
thread and run in another. It must be used by one thread at a time only
(its owning actor); give each actor that needs the database its own
Repository on the same file -- WAL and ``BEGIN IMMEDIATE`` serialise them.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Final

from persistence.db import MIGRATIONS, SqliteStore, transaction
from persistence.errors import BillingRejected, Conflict, UnknownChargingPoint, UnknownSession
from persistence.queries import QueryMixin
from persistence.records import (
    DEFAULT_MAX_POWER_KW,
    ChargeRequestRecord,
    CpRecord,
    SessionRecord,
    TicketRecord,
    bill_cents,
    columns,
)
from persistence.trust import TrustMixin
from persistence.weather import WeatherMixin

__all__ = ["Repository", "Checkpoint"]

#: (session_id, last_seq, energy_kwh, cost_eur), as batched by Central.
Checkpoint = tuple[str, int, float, float]

_CP_COLS = columns(CpRecord)
_SESSION_COLS = columns(SessionRecord)
_TICKET_COLS = columns(TicketRecord)
_REQUEST_COLS = columns(ChargeRequestRecord)
_LIVE = "status IN ('authorized', 'supplying')"

#: Energy may differ this much (kWh) from a bound before it counts (float noise).
_KWH_EPSILON: Final = 1e-6
#: Seconds added to a session's duration for the power plausibility bound: clock
#: granularity and the Engine's first tick before Central wrote the session.
_DURATION_SLACK_S: Final = 10.0
#: An Engine's cost may differ from Central's by this much (€) before it is audited.
_COST_TOLERANCE_EUR: Final = 0.01


def _join_review(earlier: str | None, now: str | None) -> str | None:
    """Review notes accumulate ("; "-separated); None when there is none."""
    return "; ".join(n for n in (earlier, now) if n) or None


def _check_price(price_eur_kwh: float) -> float:
    """Reject prices SQLite would store wrongly (NaN becomes NULL) or that make no sense."""
    price = float(price_eur_kwh)
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"A price must be a finite number >= 0 €/kWh, not {price_eur_kwh!r}")
    return price


def _check_power(max_power_kw: float) -> float:
    power = float(max_power_kw)
    if not math.isfinite(power) or power <= 0:
        raise ValueError(f"A power limit must be a finite number > 0 kW, not {max_power_kw!r}")
    return power


def _cp_record(row: tuple[Any, ...]) -> CpRecord:
    record = CpRecord(*row)
    return replace(record, stopped=bool(record.stopped))


def _check_identity(session: SessionRecord, cp_id: str | None, driver_id: str | None) -> None:
    """A completion must name the session's own CP and driver (when it names them)."""
    if cp_id is not None and cp_id != session.cp_id:
        raise BillingRejected(session.session_id, "cp_mismatch",
                              f"it names CP {cp_id} but the session is at CP {session.cp_id}")
    if driver_id is not None and driver_id != session.driver_id:
        raise BillingRejected(session.session_id, "driver_mismatch",
                              f"it names driver {driver_id} but the session is driver {session.driver_id}'s")


def _check_amount(name: str, value: float) -> float:
    amount = float(value)
    if not math.isfinite(amount):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return amount


class Repository(TrustMixin, WeatherMixin, QueryMixin, SqliteStore):
    """Central's database. Construct with a path (opens and migrates) or use
    :meth:`open`; :meth:`close` when done (also a context manager).

    ``clock`` supplies timestamps the caller does not pass explicitly
    (``updated_at``, ``issued_at``, ...); tests inject a fake one.
    """

    MIGRATIONS = MIGRATIONS

    # ------------------------------------------------------------------ helpers

    def _one(self, sql: str, params: Iterable[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def _session(self, session_id: str) -> SessionRecord | None:
        row = self._one(f"SELECT {_SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,))
        return SessionRecord(*row) if row else None

    def _require_session(self, session_id: str) -> SessionRecord:
        session = self._session(session_id)
        if session is None:
            raise UnknownSession(session_id)
        return session

    def _ticket(self, session_id: str) -> TicketRecord | None:
        row = self._one(f"SELECT {_TICKET_COLS} FROM tickets WHERE session_id = ?", (session_id,))
        return TicketRecord(*row) if row else None

    def _cp(self, cp_id: str) -> CpRecord | None:
        row = self._one(f"SELECT {_CP_COLS} FROM charging_points WHERE cp_id = ?", (cp_id,))
        return _cp_record(row) if row else None

    # --------------------------------------------------------- charging points

    def upsert_cp(self, cp_id: str, location: str, price_eur_kwh: float,
                  max_power_kw: float | None = None) -> CpRecord:
        """Create or update a CP's location, price and (if given) power limit
        (operator action); state, stop decision and an omitted power limit are kept
        (a new CP without one gets :data:`DEFAULT_MAX_POWER_KW`)."""
        price = _check_price(price_eur_kwh)
        power = None if max_power_kw is None else _check_power(max_power_kw)
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO charging_points (cp_id, location, price_eur_kwh, updated_at, max_power_kw) "
                "VALUES (?, ?, ?, ?, COALESCE(?, ?)) "
                "ON CONFLICT (cp_id) DO UPDATE SET location = excluded.location, "
                "price_eur_kwh = excluded.price_eur_kwh, updated_at = excluded.updated_at, "
                "max_power_kw = COALESCE(?, max_power_kw)",
                (cp_id, location, price, self._clock(), power, DEFAULT_MAX_POWER_KW, power),
            )
            record = self._cp(cp_id)
        assert record is not None
        return record

    def enroll_cp(self, cp_id: str, location: str, default_price: float) -> CpRecord:
        """Register a CP that connects for the first time; a known CP is
        returned unchanged (its price and location stay Central's)."""
        price = _check_price(default_price)
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO charging_points (cp_id, location, price_eur_kwh, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (cp_id) DO NOTHING",
                (cp_id, location, price, self._clock()),
            )
            record = self._cp(cp_id)
        assert record is not None
        return record

    def get_cp(self, cp_id: str) -> CpRecord | None:
        """The CP, or None if it was never registered."""
        return self._cp(cp_id)

    def list_cps(self) -> list[CpRecord]:
        """All CPs ordered by id (the panel's and the driver's list)."""
        rows = self._conn.execute(f"SELECT {_CP_COLS} FROM charging_points ORDER BY cp_id")
        return [_cp_record(row) for row in rows]

    def set_cp_stopped(self, cp_ids: Iterable[str] | None, stopped: bool) -> int:
        """Store the operator's stop/resume decision for these CPs (``None``: every CP),
        in one transaction; it survives Central's restarts. Returns how many CPs changed."""
        flag = int(bool(stopped))
        with transaction(self._conn):
            if cp_ids is None:
                cursor = self._conn.execute(
                    "UPDATE charging_points SET stopped = ?, updated_at = ? WHERE stopped != ?",
                    (flag, self._clock(), flag),
                )
                return cursor.rowcount
            changed = 0
            for cp_id in cp_ids:
                if self._cp(cp_id) is None:
                    raise UnknownChargingPoint(cp_id)
                changed += self._conn.execute(
                    "UPDATE charging_points SET stopped = ?, updated_at = ? WHERE cp_id = ? AND stopped != ?",
                    (flag, self._clock(), cp_id, flag),
                ).rowcount
            return changed

    def set_cp_state(self, cp_id: str, state: str) -> None:
        """Record a CP's state; raises UnknownChargingPoint for an unregistered id."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE charging_points SET state = ?, updated_at = ? WHERE cp_id = ?",
                (state, self._clock(), cp_id),
            )
            if cursor.rowcount == 0:
                raise UnknownChargingPoint(cp_id)

    def set_cp_states(self, states: dict[str, str]) -> None:
        """Record many CPs' states in one transaction (one commit, not one per CP); ids not
        registered are skipped (a CP deleted meanwhile)."""
        if not states:
            return
        now = self._clock()
        with transaction(self._conn):
            self._conn.executemany("UPDATE charging_points SET state = ?, updated_at = ? WHERE cp_id = ?",
                                   [(state, now, cp_id) for cp_id, state in states.items()])

    def set_all_cp_states(self, state: str) -> int:
        """Set every CP's state (Central start: all DISCONNECTED until their
        Monitors connect). Returns how many CPs there are."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE charging_points SET state = ?, updated_at = ?", (state, self._clock())
            )
        return cursor.rowcount

    # ------------------------------------------------------------------ drivers

    def ensure_driver(self, driver_id: str) -> None:
        """Remember a driver (first sighting time); no-op if already known."""
        with transaction(self._conn):
            self._ensure_driver(driver_id)

    def _ensure_driver(self, driver_id: str) -> None:
        self._conn.execute(
            "INSERT INTO drivers (driver_id, first_seen) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (driver_id, self._clock()),
        )

    # ----------------------------------------------------------------- sessions

    def open_session(
        self,
        session_id: str,
        cp_id: str,
        driver_id: str,
        price_eur_kwh: float,
        at: float,
        correlation_id: str | None = None,
    ) -> SessionRecord:
        """Create an 'authorized' session (also remembering the driver).

        The partial unique indexes make "one live session per driver and per
        CP" hold even against racing actors or processes; a violation is
        raised as :class:`Conflict` naming the session already holding the slot.
        Raises UnknownChargingPoint if the CP is not registered.

        ``correlation_id`` (a driver's charge_request) is stored with the
        session in the same transaction, as a 'pending' answer (see
        :meth:`charge_request`); ``price_eur_kwh`` is the price the ticket uses.
        """
        price = _check_price(price_eur_kwh)
        with transaction(self._conn):
            self._ensure_driver(driver_id)
            try:
                self._conn.execute(
                    "INSERT INTO sessions (session_id, cp_id, driver_id, price_eur_kwh, "
                    "status, created_at) VALUES (?, ?, ?, ?, 'authorized', ?)",
                    (session_id, cp_id, driver_id, price, at),
                )
            except sqlite3.IntegrityError as exc:
                translated = self._explain_open_failure(exc, session_id, cp_id, driver_id)
                if translated is exc:
                    raise
                raise translated from exc
            if correlation_id is not None:
                self._conn.execute(
                    "INSERT INTO charge_requests (driver_id, correlation_id, cp_id, status, session_id, at) "
                    "VALUES (?, ?, ?, 'pending', ?, ?)",
                    (driver_id, correlation_id, cp_id, session_id, at),
                )
            record = self._session(session_id)
        assert record is not None
        return record

    def _explain_open_failure(
        self, exc: sqlite3.IntegrityError, session_id: str, cp_id: str, driver_id: str
    ) -> Exception:
        """Turn the constraint SQLite names into a sentence for the operator."""
        message = str(exc)
        # Checked first: SQLite may report another index of the same row.
        reused = self._session(session_id)
        if reused is not None:
            return Conflict(
                f"Session id {session_id} is already used (driver {reused.driver_id} "
                f"at CP {reused.cp_id}, {reused.status}).",
                kind="session_id",
                existing=reused,
            )
        if "sessions.driver_id" in message:
            existing = self.live_session_for_driver(driver_id)
            return Conflict(
                f"Driver {driver_id} already has a live session"
                + (
                    f" ({existing.session_id}, {existing.status} at CP {existing.cp_id})"
                    if existing
                    else ""
                )
                + "; a driver can have only one supply at a time.",
                kind="driver",
                existing=existing,
            )
        if "sessions.cp_id" in message:
            existing = self.live_session_for_cp(cp_id)
            return Conflict(
                f"Charging point {cp_id} already has a live session"
                + (
                    f" ({existing.session_id}, {existing.status} for driver {existing.driver_id})"
                    if existing
                    else ""
                )
                + "; a charging point serves one driver at a time.",
                kind="cp",
                existing=existing,
            )
        if "FOREIGN KEY" in message and self._cp(cp_id) is None:
            return UnknownChargingPoint(cp_id)
        return exc

    def mark_supplying(self, session_id: str, at: float) -> bool:
        """The driver plugged in: 'authorized' → 'supplying' with ``started_at``.

        Idempotent for replays: True if the session is now supplying (also
        when it already was, keeping the first start time); False, changing
        nothing, when it already ended (completed or cancelled).
        """
        with transaction(self._conn):
            session = self._require_session(session_id)
            if session.status == "authorized":
                self._conn.execute(
                    "UPDATE sessions SET status = 'supplying', started_at = ? WHERE session_id = ?",
                    (at, session_id),
                )
                return True
            return session.status == "supplying"

    def checkpoint_many(self, checkpoints: Iterable[Checkpoint]) -> int:
        """Store the running totals of live sessions, in one transaction (one
        commit for many telemetry records), only moving forward.

        A ``last_seq`` not greater than the stored one (a replayed or
        reordered telemetry record) is ignored, as is any checkpoint of an
        ended session (its final figures must not be overwritten); unknown
        session ids are skipped so one stale id cannot sink the batch.
        Returns how many were applied."""
        applied = 0
        with transaction(self._conn):
            for session_id, last_seq, energy_kwh, cost_eur in checkpoints:
                applied += self._checkpoint(session_id, last_seq, energy_kwh, cost_eur)
        return applied

    def _checkpoint(self, session_id: str, last_seq: int, energy_kwh: float, cost_eur: float) -> bool:
        cursor = self._conn.execute(
            "UPDATE sessions SET last_seq = ?, energy_kwh = ?, cost_eur = ? "
            f"WHERE session_id = ? AND last_seq < ? AND {_LIVE}",
            (
                int(last_seq),
                _check_amount("energy_kwh", energy_kwh),
                _check_amount("cost_eur", cost_eur),
                session_id,
                int(last_seq),
            ),
        )
        return cursor.rowcount == 1

    def cancel_session(self, session_id: str, reason: str, at: float, *, by: str = "cp") -> bool:
        """End a session that was authorised but never started (denied by the
        CP, or the CP vanished before plug-in): no ticket is issued.

        ``by``: 'cp' when the CP refused it, 'central' when Central gave up on
        its own (the CP may have accepted: a completion with energy is then
        billed, flagged for review, see :meth:`complete_session`).

        Only an 'authorized' session is cancelled (returns True). A supplying
        session is left alone (returns False): energy was delivered and must
        be billed through :meth:`complete_session`. Also False when it
        already ended.
        """
        with transaction(self._conn):
            session = self._require_session(session_id)
            if session.status != "authorized":
                return False
            self._conn.execute(
                "UPDATE sessions SET status = 'cancelled', end_reason = ?, ended_at = ?, cancelled_by = ? "
                "WHERE session_id = ?",
                (reason, at, "central" if by == "central" else "cp", session_id),
            )
            # A request the CP had not answered yet is now denied, with this reason
            # (one the driver was already told 'authorized' keeps that answer).
            self._conn.execute(
                "UPDATE charge_requests SET status = 'denied', reason = ? "
                "WHERE session_id = ? AND status = 'pending'",
                (reason, session_id),
            )
            return True

    # -------------------------------------------------------- charge requests

    def charge_request(self, driver_id: str, correlation_id: str) -> ChargeRequestRecord | None:
        """The stored answer to a driver's charge_request, or None if it is new."""
        row = self._one(
            f"SELECT {_REQUEST_COLS} FROM charge_requests WHERE driver_id = ? AND correlation_id = ?",
            (driver_id, correlation_id),
        )
        return ChargeRequestRecord(*row) if row else None

    def pending_request_of(self, session_id: str) -> ChargeRequestRecord | None:
        """The charge_request that opened ``session_id`` while it is still unanswered, or None."""
        row = self._one(f"SELECT {_REQUEST_COLS} FROM charge_requests WHERE session_id = ? AND status = 'pending'",
                        (session_id,))
        return ChargeRequestRecord(*row) if row else None

    def record_denial(self, driver_id: str, correlation_id: str, cp_id: str, reason: str,
                      at: float) -> ChargeRequestRecord:
        """Store a charge_request's denial (the answer about to be sent) and return the
        stored answer: this one, or the first one if the request was already answered."""
        with transaction(self._conn):
            self._ensure_driver(driver_id)
            self._conn.execute(
                "INSERT INTO charge_requests (driver_id, correlation_id, cp_id, status, reason, at) "
                "VALUES (?, ?, ?, 'denied', ?, ?) ON CONFLICT (driver_id, correlation_id) DO NOTHING",
                (driver_id, correlation_id, cp_id, reason, at),
            )
            record = self.charge_request(driver_id, correlation_id)
        assert record is not None
        return record

    def request_authorized(self, session_id: str) -> bool:
        """The CP accepted: the session's pending charge_request is now answered
        'authorized' (before the driver is told). False if there was none pending."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE charge_requests SET status = 'authorized' WHERE session_id = ? AND status = 'pending'",
                (session_id,),
            )
        return cursor.rowcount == 1

    def complete_session(
        self,
        session_id: str,
        energy_kwh: float,
        cost_eur: float,
        end_reason: str,
        ended_at: float,
        cp_state: str | None = None,
        message_id: str | None = None,
        topic: str | None = None,
        *,
        cp_id: str | None = None,
        driver_id: str | None = None,
        metered_kwh: float = 0.0,
    ) -> tuple[TicketRecord, bool]:
        """Bill a supply exactly once, in ONE transaction, with Central's own figure.

        ``energy_kwh``/``cost_eur`` are what the Engine reported. Central bills
        ``bill_cents(energy, the session's price)`` (the price agreed at
        authorisation, stored at open); the Engine's cost is only cross-checked:
        off by more than a cent, an audit line ``cost_mismatch`` is written with
        the ticket. Energy above what the CP's ``max_power_kw`` can deliver
        between the session's creation and now (Central's clocks, plus a few
        seconds) is not billed: the ticket bills that plausible maximum and
        carries ``review`` (on the session too), with an audit line
        ``energy_review``.

        Raises :class:`BillingRejected`, writing nothing, when ``cp_id`` or
        ``driver_id`` (if given) is not the session's, when the session was
        cancelled, or when the energy is below what Central already metered
        (the stored checkpoint or ``metered_kwh``, whichever is higher, but at
        most the plausible maximum): an Engine's completion is never below its
        own telemetry, so that completion is not the Engine's.

        If the session already has a ticket, returns ``(existing, False)`` and
        changes nothing (a replayed completion). Otherwise marks the session
        completed, sets the CP's state if ``cp_state`` is given, inserts the
        ticket and records ``message_id`` as processed if given, then returns
        ``(ticket, True)``. Either all of that is committed or none. Raises
        UnknownSession for an id that does not exist.
        """
        energy = _check_amount("energy_kwh", energy_kwh)
        reported_cost = _check_amount("cost_eur", cost_eur)
        metered = _check_amount("metered_kwh", metered_kwh)
        now = self._clock()
        with transaction(self._conn):
            session = self._require_session(session_id)
            _check_identity(session, cp_id, driver_id)
            existing = self._ticket(session_id)
            if existing is not None:
                return existing, False
            billed, review = self._assess(session, energy, metered, now)
            cents = bill_cents(billed, session.price_eur_kwh)
            cost = cents / 100
            if abs(reported_cost - energy * session.price_eur_kwh) > _COST_TOLERANCE_EUR + 1e-9:
                self._audit(now, "central", session.cp_id, "cost_mismatch",
                            f"{session_id}: the Engine reported {reported_cost:.4f} EUR for {energy:.3f} kWh; "
                            f"Central bills {cost:.2f} EUR at {session.price_eur_kwh:g} EUR/kWh")
            if review is not None:
                self._audit(now, "central", session.cp_id, "energy_review", f"{session_id}: {review}")
            # A review note written earlier (Central closed the session itself, a stray
            # session) is kept and joined with this one; the ticket carries both.
            review = _join_review(session.review, review)
            self._conn.execute(
                "UPDATE sessions SET status = 'completed', energy_kwh = ?, cost_eur = ?, "
                "end_reason = ?, ended_at = ?, review = ? WHERE session_id = ?",
                (billed, cost, end_reason, ended_at, review, session_id),
            )
            if cp_state is not None:
                self._conn.execute(
                    "UPDATE charging_points SET state = ?, updated_at = ? WHERE cp_id = ?",
                    (cp_state, now, session.cp_id),
                )
            self._conn.execute(
                "INSERT INTO tickets (session_id, driver_id, cp_id, price_eur_kwh, energy_kwh, "
                "cost_eur, cost_cents, started_at, ended_at, end_reason, issued_at, review, "
                "reported_energy_kwh, reported_cost_eur) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    session.driver_id,
                    session.cp_id,
                    session.price_eur_kwh,
                    billed,
                    cost,
                    cents,
                    session.started_at,
                    ended_at,
                    end_reason,
                    now,
                    review,
                    energy,
                    reported_cost,
                ),
            )
            if message_id is not None:
                self._mark_processed(message_id, topic, now)
            ticket = self._ticket(session_id)
        assert ticket is not None
        return ticket, True

    def check_completion(self, session_id: str, energy_kwh: float, *, cp_id: str | None = None,
                         driver_id: str | None = None, metered_kwh: float = 0.0) -> None:
        """Would :meth:`complete_session` bill (or find the ticket of) this completion?
        Returns if so; raises :class:`BillingRejected` (or UnknownSession) as it would.
        Writes nothing: a session actor asks before it ends the supply in Central's view."""
        session = self._require_session(session_id)
        _check_identity(session, cp_id, driver_id)
        if self._ticket(session_id) is None:
            self._assess(session, _check_amount("energy_kwh", energy_kwh),
                         _check_amount("metered_kwh", metered_kwh), self._clock())

    def _assess(self, session: SessionRecord, energy: float, metered: float,
                now: float) -> tuple[float, str | None]:
        """Central's billing checks of an unbilled session: ``(kWh to bill, review or None)``,
        or BillingRejected (see :meth:`complete_session`)."""
        note = None
        if session.status == "cancelled":
            if session.cancelled_by != "central" or energy <= _KWH_EPSILON:
                raise BillingRejected(session.session_id, "cancelled",
                                      f"Central cancelled the session ({session.end_reason or 'no reason'})")
            # Central gave up on its own (timeout, link loss) after the CP had accepted,
            # and the CP supplied it: what was supplied is billed, for review.
            note = f"supplied after Central cancelled it ({session.end_reason or 'no reason'})"
        cp = self._cp(session.cp_id)
        max_power = cp.max_power_kw if cp is not None else DEFAULT_MAX_POWER_KW
        duration = max(0.0, now - session.created_at) + _DURATION_SLACK_S
        plausible = max_power * duration / 3600
        floor = min(max(session.energy_kwh, metered), plausible)
        if energy < floor - _KWH_EPSILON:
            raise BillingRejected(session.session_id, "below_metered",
                                  f"{energy:.6f} kWh is less than the {floor:.6f} kWh Central already metered")
        if energy > plausible + _KWH_EPSILON:
            return plausible, _join_review(note, (f"reported {energy:.3f} kWh exceeds what {max_power:g} kW can "
                                                  f"deliver in {duration:.0f} s ({plausible:.3f} kWh); "
                                                  f"billed {plausible:.3f} kWh"))
        return energy, note

    def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or None."""
        return self._session(session_id)

    def live_sessions(self) -> list[SessionRecord]:
        """Sessions still 'authorized' or 'supplying' (Central reloads these
        at start so late or replayed records find an owner)."""
        rows = self._conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE {_LIVE} ORDER BY created_at, session_id"
        )
        return [SessionRecord(*row) for row in rows]

    def live_session_for_driver(self, driver_id: str) -> SessionRecord | None:
        """The driver's live session, if any (there is at most one)."""
        row = self._one(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE driver_id = ? AND {_LIVE}", (driver_id,)
        )
        return SessionRecord(*row) if row else None

    def live_session_for_cp(self, cp_id: str) -> SessionRecord | None:
        """The CP's live session, if any (there is at most one)."""
        row = self._one(f"SELECT {_SESSION_COLS} FROM sessions WHERE cp_id = ? AND {_LIVE}", (cp_id,))
        return SessionRecord(*row) if row else None

    # ------------------------------------------------------------------ tickets

    def get_ticket(self, session_id: str) -> TicketRecord | None:
        """The ticket of a session, or None if it was not billed (yet)."""
        return self._ticket(session_id)

    def tickets(self) -> list[TicketRecord]:
        """Every ticket, oldest first."""
        rows = self._conn.execute(f"SELECT {_TICKET_COLS} FROM tickets ORDER BY ticket_id")
        return [TicketRecord(*row) for row in rows]

    def unacked_tickets(self, driver_id: str) -> list[TicketRecord]:
        """Tickets the driver has not confirmed (re-sent when it comes back)."""
        rows = self._conn.execute(
            f"SELECT {_TICKET_COLS} FROM tickets WHERE driver_id = ? AND acked_at IS NULL "
            "ORDER BY ticket_id",
            (driver_id,),
        )
        return [TicketRecord(*row) for row in rows]

    def ack_ticket(self, driver_id: str, session_id: str) -> bool:
        """The driver confirmed receipt. True if this call acknowledged it;
        False if it was already acknowledged, unknown, or another driver's."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE tickets SET acked_at = ? "
                "WHERE session_id = ? AND driver_id = ? AND acked_at IS NULL",
                (self._clock(), session_id, driver_id),
            )
        return cursor.rowcount == 1

    # --------------------------------------------------------- message dedupe

    def _mark_processed(self, message_id: str, topic: str | None, at: float) -> bool:
        """Inside :meth:`complete_session`'s transaction: note the completion's message id."""
        cursor = self._conn.execute(
            "INSERT INTO processed_messages (message_id, topic, processed_at) VALUES (?, ?, ?) "
            "ON CONFLICT (message_id) DO NOTHING",
            (message_id, topic, at),
        )
        return cursor.rowcount == 1

    # -------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Counts and billed totals for summaries, read in one statement
        (one consistent snapshot). Energy and cost sum the tickets, i.e.
        what was billed."""
        row = self._one(
            """
            SELECT
                (SELECT COUNT(*) FROM charging_points),
                (SELECT COUNT(*) FROM drivers),
                (SELECT COUNT(*) FROM sessions WHERE status = 'authorized'),
                (SELECT COUNT(*) FROM sessions WHERE status = 'supplying'),
                (SELECT COUNT(*) FROM sessions WHERE status = 'completed'),
                (SELECT COUNT(*) FROM sessions WHERE status = 'cancelled'),
                (SELECT COUNT(*) FROM tickets),
                (SELECT COUNT(*) FROM tickets WHERE acked_at IS NULL),
                (SELECT COALESCE(SUM(energy_kwh), 0.0) FROM tickets),
                (SELECT COALESCE(SUM(cost_eur), 0.0) FROM tickets),
                (SELECT COALESCE(SUM(cost_cents), 0) FROM tickets)
            """
        )
        assert row is not None
        (cps, drivers, authorized, supplying, completed, cancelled,
         tickets, unacked, energy, cost, cents) = row  # fmt: skip
        return {
            "charging_points": cps,
            "drivers": drivers,
            "sessions": {
                "authorized": authorized,
                "supplying": supplying,
                "completed": completed,
                "cancelled": cancelled,
            },
            "sessions_total": authorized + supplying + completed + cancelled,
            "tickets": tickets,
            "unacked_tickets": unacked,
            "energy_kwh": float(energy),
            "cost_eur": float(cost),
            "cost_cents": int(cents),
        }

    # ------------------------------------------- Central's runs (migration 3)

    def start_run(self, at: float) -> tuple[int, float | None]:
        """Record that Central started at ``at`` (its own clock). Returns the new
        run id and the previous run's last ``alive_at`` (None for the first run):
        Central was down between that and ``at``."""
        with transaction(self._conn):
            row = self._conn.execute("SELECT MAX(alive_at) FROM central_runs").fetchone()
            cursor = self._conn.execute("INSERT INTO central_runs (up_since, alive_at) VALUES (?, ?)", (at, at))
        run_id = cursor.lastrowid
        assert run_id is not None
        return run_id, (float(row[0]) if row and row[0] is not None else None)

    def mark_alive(self, run_id: int, at: float) -> None:
        """Central is still up at ``at`` (one autocommitted UPDATE, every second)."""
        self._conn.execute("UPDATE central_runs SET alive_at = ? WHERE run_id = ?", (at, run_id))

    def flag_session_review(self, session_id: str, why: str) -> None:
        """Flag a session's bill for an operator's look (Central closed it, or the CP
        supplied a session Central did not consider live), with an audit line."""
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE sessions SET review = CASE WHEN review IS NULL THEN ? ELSE review || '; ' || ? END "
                "WHERE session_id = ?", (why, why, session_id))
            self._conn.execute(
                "INSERT INTO audit_log (at, component, subject, event, detail) VALUES (?, ?, ?, ?, ?)",
                (self._clock(), "central", session_id, "session_review", why))
