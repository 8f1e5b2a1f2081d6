"""Immutable rows handed out by the repository and the journal.

Frozen so an actor can pass them in messages to other actors without
anyone mutating shared state; field order equals the SELECT column order
(the repository derives its column lists from these fields).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

__all__ = [
    "LIVE_STATUSES",
    "CpRecord",
    "SessionRecord",
    "TicketRecord",
    "AuditRecord",
    "JournalEntry",
    "cents_from_eur",
    "columns",
]

#: Session statuses that hold the driver's and the CP's single live slot.
LIVE_STATUSES: Final = ("authorized", "supplying")


@dataclass(frozen=True, slots=True)
class CpRecord:
    """A charging point as Central knows it (price comes from here, never from the CP)."""

    cp_id: str
    location: str
    price_eur_kwh: float
    state: str


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One supply from authorisation to its end; totals are the last checkpoint."""

    session_id: str
    cp_id: str
    driver_id: str
    price_eur_kwh: float
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    last_seq: int
    energy_kwh: float
    cost_eur: float
    end_reason: str | None


@dataclass(frozen=True, slots=True)
class TicketRecord:
    """The bill of one supply; at most one per session (the exactly-once key)."""

    ticket_id: int
    session_id: str
    driver_id: str
    cp_id: str
    price_eur_kwh: float
    energy_kwh: float
    cost_eur: float
    cost_cents: int
    started_at: float | None
    ended_at: float | None
    end_reason: str | None
    issued_at: float
    acked_at: float | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the operator-facing audit trail."""

    id: int
    at: float
    component: str
    subject: str
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """The Engine's durable memory of one supply.

    ``status``: 'supplying' (running, or the Engine died mid-supply),
    'ended' (finished, completion not yet acknowledged by the broker),
    'published' (completion durable in Kafka; nothing left to do).
    """

    session_id: str
    cp_id: str
    driver_id: str
    price_eur_kwh: float
    status: str
    started_at: float
    last_seq: int
    energy_kwh: float
    cost_eur: float
    updated_at: float
    end_reason: str | None
    ended_at: float | None
    published_at: float | None


def columns(record_type: type) -> str:
    """Comma-separated column list matching ``record_type``'s field order."""
    return ", ".join(f.name for f in fields(record_type))


def cents_from_eur(cost_eur: float) -> int:
    """Whole cents, rounding half up as a customer expects on a bill.

    Plain ``round(cost_eur * 100)`` rounds half to even and suffers binary
    noise (``1.005 * 100 == 100.49999999999999``); going through the float's
    shortest decimal representation avoids both.
    """
    return int(Decimal(repr(float(cost_eur))).scaleb(2).quantize(Decimal(1), rounding=ROUND_HALF_UP))
