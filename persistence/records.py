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
    "ChargeRequestRecord",
    "WeatherRecord",
    "cents_from_eur",
    "bill_cents",
    "DEFAULT_MAX_POWER_KW",
    "columns",
]

#: Session statuses that hold the driver's and the CP's single live slot.
LIVE_STATUSES: Final = ("authorized", "supplying")

#: A CP's power limit when the operator did not give one (migration 2's column default).
DEFAULT_MAX_POWER_KW: Final = 350.0


@dataclass(frozen=True, slots=True)
class CpRecord:
    """A charging point as Central knows it (price comes from here, never from the CP)."""

    cp_id: str
    location: str
    price_eur_kwh: float
    state: str
    max_power_kw: float = DEFAULT_MAX_POWER_KW
    stopped: bool = False  # the operator's durable stop decision


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
    review: str | None = None  # why the bill needs an operator's look (None: nothing)
    cancelled_by: str | None = None  # 'cp' (it refused) or 'central' (gave up on its own); None unless cancelled


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
    review: str | None = None  # why the bill needs an operator's look (None: nothing)
    reported_energy_kwh: float | None = None  # the Engine's figures; energy/cost above are Central's
    reported_cost_eur: float | None = None


@dataclass(frozen=True, slots=True)
class ChargeRequestRecord:
    """The first answer to a driver's charge_request, kept so a redelivery gets it again.

    ``status`` 'pending' means the CP has not answered yet (the session is open).
    """

    driver_id: str
    correlation_id: str
    cp_id: str
    status: str
    session_id: str | None
    reason: str | None
    at: float


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the operator-facing audit trail."""

    id: int
    at: float
    component: str
    subject: str
    event: str
    detail: str
    address: str | None = None
    params: str | None = None  # JSON object


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


_CENT: Final = Decimal("0.01")


def bill_cents(energy_kwh: float, price_eur_kwh: float) -> int:
    """THE billing rule, in one place: energy × the price agreed at authorisation,
    rounded once, half up, to whole cents.

    Exact decimal arithmetic on the shortest decimal form of each float (so
    ``1.005 kWh × 1 €/kWh`` is 1.01 €, not 1.00 € from binary noise), and a
    single rounding of the product (never a rounded energy times a price).
    """
    product = Decimal(repr(float(energy_kwh))) * Decimal(repr(float(price_eur_kwh)))
    return int(product.quantize(_CENT, rounding=ROUND_HALF_UP).scaleb(2))


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """A registered CP or driver: only the slow hash (verifier) of its secret."""

    kind: str
    id: str
    verifier: bytes
    created_at: float
    deregistered_at: float | None

    @property
    def registered(self) -> bool:
        return self.deregistered_at is None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key Central issued to a CP."""

    key_id: str
    cp_id: str
    key: bytes
    issued_at: float
    state: str
    ended_at: float | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class WeatherRecord:
    """A location EV_W watches or reported an alert for (migration 6)."""

    key: str  # case-folded, trimmed: what CP locations are matched against
    location: str  # as first given
    watched: bool
    alert: bool
    temperature_c: float | None
    updated_at: float | None
