"""The messages between the driver app's three actors (all frozen dataclasses).

The driver app is three actors with one job each (see ``supervisors/driver_system.py``):

* ``driver``   — :class:`~actors.driver.DriverActor`: request correlation. It
  owns the pending requests (correlation ids, timeouts), the hello, the live
  supply and the tickets already seen; it is the only one that publishes to
  Central and the only one the pump delivers to.
* ``services`` — :class:`~actors.driver_services.ServicesRunner`: walks the
  services file (next service ``pause`` seconds after the last one ended),
  keeps the results and writes the report.
* ``output``   — :class:`~actors.driver_console.DriverConsole`: what the
  person sees (every sentence is worded there) and what the person types
  (console lines parsed into the commands below).

Directions: console → driver (commands), driver → output (news), driver →
services (service facts), services → driver (charge requests, progress),
services → output (service news). Every field is a protocol type, a plain
value or a tuple: nothing mutable crosses an actor boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transport import protocol

RequestKind = Literal["hello", "list", "charge", "stop"]


# --- console → driver: what the person asked for --------------------------------
@dataclass(frozen=True, slots=True)
class ListCps:
    """``list``: ask Central for the first page of charging points; ``list more``: the next page."""

    more: bool = False


@dataclass(frozen=True, slots=True)
class ChargeAt:
    """``charge CP_ID`` (interactive mode only)."""

    cp_id: str


@dataclass(frozen=True, slots=True)
class StopSupply:
    """``stop``: stop the live supply."""


@dataclass(frozen=True, slots=True)
class ShowStatus:
    """``status``: the driver answers with :class:`StatusNews` to the output."""


@dataclass(frozen=True, slots=True)
class Quit:
    """``quit``: leave the app (a live supply goes on)."""


Command = ListCps | ChargeAt | StopSupply | ShowStatus | Quit


# --- services ↔ driver --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunnerStarted:
    """services → driver: a (re)started runner; the driver answers with CentralAnswered if it can."""


@dataclass(frozen=True, slots=True)
class DriverStarted:
    """driver → services: a (re)started driver lost every pending request; resync."""


@dataclass(frozen=True, slots=True)
class RequestCharge:
    """services → driver: request a supply at ``cp_id`` for service number ``service`` (0-based)."""

    cp_id: str
    service: int


@dataclass(frozen=True, slots=True)
class ServicesProgress:
    """services → driver: the results so far, for the DriverStatus/DriverResults asks."""

    total: int
    results: tuple[dict[str, Any], ...]
    finished: bool


@dataclass(frozen=True, slots=True)
class CentralAnswered:
    """driver → services: the hello was answered (or failed); the services may begin.

    ``live_session_id``: the supply Central says is running for us (None if
    none); ``pending_service``: the service whose charge request still waits
    for its answer (None if none).
    """

    live_session_id: str | None
    hello_failed: bool
    pending_service: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceAuthorised:
    """driver → services: service ``service`` got session ``session_id``; its ticket ends it."""

    service: int
    session_id: str


@dataclass(frozen=True, slots=True)
class ServiceFailed:
    """driver → services: service ``service`` ended without a supply."""

    service: int
    outcome: Literal["denied", "unavailable"]
    reason: str
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionCancelled:
    """driver → services: Central cancelled session ``session_id`` after authorising it (nothing
    was supplied, so no ticket will come): the service that waited for its ticket ends denied."""

    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class TicketShown:
    """driver → services: a ticket shown for the first time."""

    ticket: protocol.TicketInfo


@dataclass(frozen=True, slots=True)
class LiveChanged:
    """driver → services: the live supply now (``None``: none), for the report."""

    active_session: dict[str, Any] | None
    tickets_seen: tuple[str, ...]


# --- driver → output: news to show -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class LinkNews:
    event: Literal["connected", "restarted"]


@dataclass(frozen=True, slots=True)
class HelloNews:
    """Central's answer to the hello; ``adopted`` is the live supply taken from it (if any)."""

    response: protocol.DriverHelloResponse
    adopted: protocol.ActiveSessionInfo | None
    plugged: bool
    fresh_tickets: int


@dataclass(frozen=True, slots=True)
class TicketNews:
    ticket: protocol.TicketInfo


@dataclass(frozen=True, slots=True)
class ConsumptionNews:
    update: protocol.ChargingStatusUpdate


@dataclass(frozen=True, slots=True)
class StepNews:
    """A supply event, already deduplicated (``authorized`` comes as AuthorisedNews)."""

    event: protocol.SupplyEvent


@dataclass(frozen=True, slots=True)
class AuthorisedNews:
    cp_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class DeniedNews:
    response: protocol.ChargeResponse


@dataclass(frozen=True, slots=True)
class CpsNews:
    response: protocol.AvailableCpsResponse


@dataclass(frozen=True, slots=True)
class StopNews:
    response: protocol.StopChargingResponse


@dataclass(frozen=True, slots=True)
class UnansweredNews:
    """A request got no answer within ``wait_s``; a hello is retried in ``retry_in`` s."""

    kind: RequestKind
    wait_s: float
    cp_id: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class RefusedNews:
    """Central answered with an error; ``kind`` None: not about a request of ours."""

    reason: str
    kind: RequestKind | None = None


@dataclass(frozen=True, slots=True)
class LateChargeNews:
    """A charge answer after its timeout: shown as denied, adopted, or cancelled."""

    response: protocol.ChargeResponse
    action: Literal["denied", "adopted", "cancelled"]


@dataclass(frozen=True, slots=True)
class StaleNews:
    """Central now handles a request given up in file mode (it will be cancelled)."""

    event: protocol.SupplyEvent


@dataclass(frozen=True, slots=True)
class StillWaitingNews:
    session_id: str


@dataclass(frozen=True, slots=True)
class CommandNews:
    """What a console command did (or why not)."""

    outcome: Literal["deferred", "already_supplying", "charge_pending", "bad_cp", "charge_sent", "list_sent",
                     "nothing_to_stop", "stop_sent", "leaving"]
    command: Command
    cp_id: str | None = None
    session_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class StatusNews:
    driver_id: str
    online: bool
    hello_answered: bool
    active_session: dict[str, Any] | None
    tickets_seen: int
    services_done: int | None = None
    services_total: int | None = None


# --- services → output -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServiceNews:
    """``requesting`` service ``number``/``total`` at ``cp_id``; ``next`` in ``pause`` s;
    ``after_ticket`` of ``session_id``; ``done`` with the outcome counts."""

    event: Literal["requesting", "next", "after_ticket", "done"]
    number: int = 0
    total: int = 0
    cp_id: str | None = None
    pause: float = 0.0
    session_id: str | None = None
    outcomes: tuple[str, ...] = ()
