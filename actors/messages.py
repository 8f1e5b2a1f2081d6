"""Messages between Central's own actors (the wire messages are in transport/protocol.py).

Frozen dataclasses only: no dicts travel between actors.
"""

from __future__ import annotations

from dataclasses import dataclass

from transport import protocol


# --- session ↔ ledger ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Latest telemetry totals of a session; the ledger batches them to disk."""

    session_id: str
    seq: int
    energy_kwh: float
    cost_eur: float


@dataclass(frozen=True, slots=True)
class MarkSupplying:
    session_id: str
    at: float


@dataclass(frozen=True, slots=True)
class Bill:
    """Ask: complete the session and issue its ticket, in one transaction, with
    Central's own figure (``persistence.bill_cents``; the Engine's cost is only
    cross-checked).

    Returns ``(TicketRecord, created)``; a replay returns the existing ticket
    with ``created=False``; a completion Central will not bill returns a
    :class:`BillRejected` (audited). ``cp_state`` is None for an orphan completion;
    ``metered_kwh`` is the newest energy the session actor saw in telemetry.
    """

    completion: protocol.ChargeCompletion
    cp_state: str | None
    metered_kwh: float = 0.0


@dataclass(frozen=True, slots=True)
class VetCompletion:
    """Ask the ledger, before a session ends its supply: would this completion be billed?

    Returns None (yes, or it is a replay of a billed one) or a :class:`BillRejected`
    (audited), so a forged or mismatched completion never ends a live supply.
    """

    completion: protocol.ChargeCompletion
    metered_kwh: float = 0.0


@dataclass(frozen=True, slots=True)
class BillRejected:
    """The ledger's answer for a completion Central does not bill: it names another CP
    or driver than the session, the session was cancelled, or its energy is below what
    Central metered. Audited; the router sets the record aside (dead letter)."""

    session_id: str
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class BillOrphan:
    """Ask: a completion no session actor owns (replay, or Central lost track)."""

    completion: protocol.ChargeCompletion


@dataclass(frozen=True, slots=True)
class LoadSession:
    """Ask the ledger: the session's current row (a restarted session actor re-learns its figures)."""

    session_id: str


# --- router → session ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Telemetry:
    """Tell: the ``charging_data`` records of one session from one Kafka poll, in arrival order.

    One message per session per poll instead of one per record: under a
    backlog (a restart, a burst) the session applies them all and sends the
    driver and the ledger only the newest figures (Central's panel gets them
    from the router, in one ``ProgressBatch``).
    """

    session_id: str
    records: tuple[protocol.ChargingData, ...]


# --- router/session ↔ central ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class SessionProgress:
    """The newest telemetry of one session: Central updates its CP view (if ``seq`` is newer)."""

    session_id: str
    cp_id: str
    seq: int
    energy_kwh: float
    cost_eur: float
    power_kw: float


@dataclass(frozen=True, slots=True)
class ProgressBatch:
    """Tell: the newest reading of every session in one Kafka poll (one message, not one per record)."""

    items: tuple[SessionProgress, ...]


@dataclass(frozen=True, slots=True)
class SupplyFinished:
    """Ask: the session is being billed; returns the CP's state after it."""

    cp_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class SessionBilled:
    """Tell: the ticket exists (``created`` False for a replay)."""

    session_id: str
    cp_id: str
    driver_id: str
    energy_kwh: float
    cost_eur: float
    end_reason: str
    created: bool


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Ask a session actor: its figures (for tests and the panel)."""


@dataclass(frozen=True, slots=True)
class RouterStats:
    """Ask the session router: its counters (``data``, ``completions``, ``orphans``, ``unrouted_data``, ``bad``)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Ask: returns once the actor finished its start-up (mailbox is FIFO)."""
