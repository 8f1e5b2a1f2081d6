"""Every message of the wire contract (/work/shared/PROTOCOL.md) and one JSON codec.

Each message is a frozen dataclass whose ``TYPE`` is its wire ``type`` string.
The codec is driven by the dataclass type hints: ``from_dict`` reads them (once
per class, cached) to check presence, JSON types and the small rules carried in
``Annotated`` metadata (ids, enumerations, lower bounds).  Anything that does
not pass raises ``ProtocolError`` with a sentence a person can read, so an
actor can log it, reply with an ``error`` message and carry on.

Wire conventions: a message is a JSON object with a ``type`` string; unknown
fields are ignored; optional fields may be missing or null (``encode`` writes
them as null); floats must be finite; ids (cp_id, driver_id, session_id) are
1-64 ASCII letters, digits, '.', '_' or '-'; every number and string has an
upper bound (the constants below; the table is in docs/protocol.md).
``encode`` validates as well, so nothing the decoder would refuse ever
reaches the wire.

Project additions (the contract allows new types and fields):

* ``cp_supply_request`` {cp_id, driver_id, correlation_id}: a supply typed at
  the CP's own menu, Engine -> Monitor -> Central.
* ``cp_supply_response`` {correlation_id, cp_id, status: "authorized" |
  "denied", session_id?, reason?}: Central -> Monitor -> Engine.
* ``supply_started`` / ``supply_ended`` carry an optional ``driver_id``;
  ``supply_ended`` also optional ``energy_kwh`` and ``cost_eur`` (the final
  figures, for when Central missed the Kafka completion).
* ``heartbeat`` carries optional ``state`` (the Monitor's view, one of
  CP_STATES) and ``supplying_session_id``.
* ``authorize_supply`` carries ``cp_id``.
* ``stop_charging_response`` carries optional ``session_id`` and ``reason``.
* Energy, cost, price and power are never negative; telemetry ``seq`` >= 1.
* ``available_cps_request`` carries optional ``after`` and ``limit`` (paging);
  ``available_cps_response`` carries ``more``, ``next_after`` and ``total``.
"""

import dataclasses
import enum
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, NoneType, UnionType
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

# --------------------------------------------------------------------------- enumerations

END_REASONS = frozenset(
    {"unplugged", "driver_stop", "central_stop", "fault", "monitor_lost", "engine_recovered"}
)
SUPPLY_EVENTS = frozenset(
    {"requested", "waiting_cp", "authorized", "denied", "plugged_in", "fault", "stopped",
     "central_unavailable"}
)


class CpState(enum.StrEnum):
    """A CP's state as Central shows it (SPEC §2.3); derived by ``actors.cp_state.derive_state``."""

    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    SUPPLYING = "SUPPLYING"
    BROKEN = "BROKEN"
    DISCONNECTED = "DISCONNECTED"


CP_STATES = frozenset(s.value for s in CpState)
AUTHORIZATION_STATUSES = frozenset({"authorized", "denied"})
REGISTER_STATUSES = frozenset({"accepted", "denied"})

ID_MAX_LEN = 64
#: Bounds of the wire contract (docs/protocol.md has the table). Anything outside is refused
#: by the decoder (and by ``encode``) with a sentence naming the field and the bound.
MAX_SEQ = 2**53 - 1  #: the largest integer a JSON double (every other client's number) holds exactly
MAX_ENERGY_KWH = 10_000.0  #: per session
MAX_POWER_KW = 1_000.0
MAX_PRICE_EUR_KWH = 100.0
MAX_COST_EUR = 1_000_000.0
MAX_TIMESTAMP = 4_102_444_800.0  #: 2100-01-01T00:00:00Z (seconds since the epoch; the minimum is 0)
LOCATION_MAX_LEN = 200
REASON_MAX_LEN = 500  #: reason, detail: error sentences can name a field, its rule and the value
TOKEN_MAX_LEN = 200  #: correlation_id, message_id
WORD_MAX_LEN = 64  #: status, state words
LIST_MAX_ITEMS = 500  #: items in one reply (charging_points, tickets)
PAGE_SIZE = 200  #: available_cps_request default page: < 300 KB even with maximal locations


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not fit the contract.

    ``correlation_id`` is set when the bad message carried a readable one, so
    the receiver can echo it in its ``error`` reply.
    """

    def __init__(self, reason: str, correlation_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.correlation_id = correlation_id


# --------------------------------------------------------------------------- field rules


@dataclass(frozen=True, slots=True)
class OneOf:
    """Rule: the string is one of ``values``."""

    values: frozenset[str]

    def complaint(self, value: str) -> str | None:
        if value in self.values:
            return None
        return f"must be one of {', '.join(sorted(self.values))}"


@dataclass(frozen=True, slots=True)
class AtLeast:
    """Rule: the number is >= ``minimum``."""

    minimum: float

    def complaint(self, value: float) -> str | None:
        return None if value >= self.minimum else f"must be at least {self.minimum:g}"


@dataclass(frozen=True, slots=True)
class AtMost:
    """Rule: the number is <= ``maximum``."""

    maximum: float

    def complaint(self, value: float) -> str | None:
        if value <= self.maximum:
            return None
        shown = f"{int(self.maximum):,}" if float(self.maximum).is_integer() else f"{self.maximum:g}"
        return f"must be at most {shown}"


@dataclass(frozen=True, slots=True)
class MaxLen:
    """Rule: a string has at most ``limit`` characters (an array at most ``limit`` items)."""

    limit: int

    def complaint(self, value: str | tuple[Any, ...]) -> str | None:
        if len(value) <= self.limit:
            return None
        unit = "characters long" if isinstance(value, str) else "items long"
        return f"must be at most {self.limit} {unit} (it has {len(value)})"


#: What an id may be: 1-64 of ASCII letters, digits, '.', '_', '-'.
_ID_MATCH = re.compile(rf"[A-Za-z0-9._-]{{1,{ID_MAX_LEN}}}\Z").match


def is_id(value: str) -> bool:
    """True when ``value`` is a valid id (see :class:`IdRule`)."""
    return _ID_MATCH(value) is not None


@dataclass(frozen=True, slots=True)
class IdRule:
    """Rule: an id is 1-64 characters, each an ASCII letter, a digit, '.', '_' or '-'."""

    def complaint(self, value: str) -> str | None:
        if not value:
            return "must not be empty"
        if len(value) > ID_MAX_LEN:
            return f"must be at most {ID_MAX_LEN} characters long"
        if not is_id(value):
            return "may contain only letters, digits, '.', '_' and '-'"
        return None


Id = Annotated[str, IdRule()]
EndReason = Annotated[str, OneOf(END_REASONS)]
CpStateName = Annotated[str, OneOf(CP_STATES)]
AuthStatus = Annotated[str, OneOf(AUTHORIZATION_STATUSES)]
Energy = Annotated[float, AtLeast(0), AtMost(MAX_ENERGY_KWH)]
Cost = Annotated[float, AtLeast(0), AtMost(MAX_COST_EUR)]
Price = Annotated[float, AtLeast(0), AtMost(MAX_PRICE_EUR_KWH)]
Power = Annotated[float, AtLeast(0), AtMost(MAX_POWER_KW)]
Timestamp = Annotated[float, AtLeast(0), AtMost(MAX_TIMESTAMP)]
Seq = Annotated[int, AtLeast(1), AtMost(MAX_SEQ)]
HealthSeq = Annotated[int, AtLeast(0), AtMost(MAX_SEQ)]
Count = Annotated[int, AtLeast(0), AtMost(MAX_SEQ)]
PageLimit = Annotated[int, AtLeast(1), AtMost(LIST_MAX_ITEMS)]
Token = Annotated[str, MaxLen(TOKEN_MAX_LEN)]
Location = Annotated[str, MaxLen(LOCATION_MAX_LEN)]
Reason = Annotated[str, MaxLen(REASON_MAX_LEN)]
Word = Annotated[str, MaxLen(WORD_MAX_LEN)]
B64_MAX_LEN = 128  #: nonces, proofs, signatures and keys (base64url text)
B64 = Annotated[str, MaxLen(B64_MAX_LEN)]


def clip(text: str, limit: int = REASON_MAX_LEN) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis), to fit a bounded field."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def new_id() -> str:
    """A fresh unique id (uuid4 hex) for message_id, correlation_id, session_id."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- nested values


@dataclass(frozen=True, slots=True)
class CpInfo:
    """One charging point in an available_cps_response."""

    cp_id: Id
    location: Location
    price_eur_kwh: Price
    state: CpStateName


@dataclass(frozen=True, slots=True)
class TicketInfo:
    """A ticket the driver has not acknowledged yet, inside driver_hello_response."""

    session_id: Id
    cp_id: Id
    price_eur_kwh: Price
    energy_kwh: Energy
    cost_eur: Cost
    started_at: Timestamp
    ended_at: Timestamp
    end_reason: EndReason


@dataclass(frozen=True, slots=True)
class ActiveSessionInfo:
    """The driver's live supply, inside driver_hello_response."""

    session_id: Id
    cp_id: Id
    energy_kwh: Energy
    cost_eur: Cost
    state: Word
    started_at: Timestamp | None = None  # None until the vehicle is plugged in


# --------------------------------------------------------------------------- driver_requests


@dataclass(frozen=True, slots=True)
class AvailableCpsRequest:
    """Driver -> Central: list the charging points, one page at a time (ordered by cp_id)."""

    TYPE: ClassVar[str] = "available_cps_request"
    driver_id: Id
    correlation_id: Token
    # Additions (paging): only CPs whose cp_id sorts after ``after`` (the previous page's
    # ``next_after``), at most ``limit`` (default PAGE_SIZE). Without them: the first page.
    after: Id | None = None
    limit: PageLimit | None = None


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """Driver -> Central: start a supply at cp_id."""

    TYPE: ClassVar[str] = "charge_request"
    driver_id: Id
    cp_id: Id
    correlation_id: Token


@dataclass(frozen=True, slots=True)
class StopChargingRequest:
    """Driver -> Central: end the supply session_id."""

    TYPE: ClassVar[str] = "stop_charging_request"
    driver_id: Id
    session_id: Id
    correlation_id: Token


@dataclass(frozen=True, slots=True)
class DriverHello:
    """Driver -> Central, on every (re)start: what is live and unacknowledged for me?"""

    TYPE: ClassVar[str] = "driver_hello"
    driver_id: Id
    correlation_id: Token


@dataclass(frozen=True, slots=True)
class TicketAck:
    """Driver -> Central: ticket session_id received, stop resending it."""

    TYPE: ClassVar[str] = "ticket_ack"
    driver_id: Id
    session_id: Id


# --------------------------------------------------------------------------- driver_responses


@dataclass(frozen=True, slots=True)
class AvailableCpsResponse:
    """Central -> Driver: answer to available_cps_request."""

    TYPE: ClassVar[str] = "available_cps_response"
    driver_id: Id
    correlation_id: Token
    charging_points: Annotated[tuple[CpInfo, ...], MaxLen(LIST_MAX_ITEMS)]
    status: Word = "ok"
    more: bool = False  # addition: more CPs after this page; ask again with after=next_after
    next_after: Id | None = None  # addition: the last cp_id of this page when ``more``
    total: Count | None = None  # addition: how many CPs Central knows


@dataclass(frozen=True, slots=True)
class ChargeResponse:
    """Central -> Driver: answer to charge_request (reason says why when denied)."""

    TYPE: ClassVar[str] = "charge_response"
    driver_id: Id
    correlation_id: Token
    status: AuthStatus
    cp_id: Id
    session_id: Id | None = None
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class SupplyEvent:
    """Central -> Driver: one step of a supply (requested, authorized, fault, ...)."""

    TYPE: ClassVar[str] = "supply_event"
    driver_id: Id
    session_id: Id
    cp_id: Id
    event: Annotated[str, OneOf(SUPPLY_EVENTS)]
    detail: Reason | None = None


@dataclass(frozen=True, slots=True)
class ChargingStatusUpdate:
    """Central -> Driver: live consumption of the driver's supply."""

    TYPE: ClassVar[str] = "charging_status_update"
    driver_id: Id
    session_id: Id
    cp_id: Id
    seq: Seq
    energy_kwh: Energy
    cost_eur: Cost
    power_kw: Power


@dataclass(frozen=True, slots=True)
class Ticket:
    """Central -> Driver: the final bill of a supply."""

    TYPE: ClassVar[str] = "ticket"
    driver_id: Id
    session_id: Id
    cp_id: Id
    price_eur_kwh: Price
    energy_kwh: Energy
    cost_eur: Cost
    started_at: Timestamp
    ended_at: Timestamp
    end_reason: EndReason


@dataclass(frozen=True, slots=True)
class StopChargingResponse:
    """Central -> Driver: answer to stop_charging_request."""

    TYPE: ClassVar[str] = "stop_charging_response"
    driver_id: Id
    correlation_id: Token
    status: Word
    session_id: Id | None = None
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class DriverHelloResponse:
    """Central -> Driver: answer to driver_hello (live supply, unacknowledged tickets)."""

    TYPE: ClassVar[str] = "driver_hello_response"
    driver_id: Id
    correlation_id: Token
    tickets: Annotated[tuple[TicketInfo, ...], MaxLen(LIST_MAX_ITEMS)]
    status: Word = "ok"
    active_session: ActiveSessionInfo | None = None


# --------------------------------------------------------------------------- Kafka from the Engine


@dataclass(frozen=True, slots=True)
class ChargingData:
    """Engine -> Central (charging_session_data): telemetry, once a second while supplying."""

    TYPE: ClassVar[str] = "charging_data"
    cp_id: Id
    session_id: Id
    driver_id: Id
    seq: Seq
    energy_kwh: Energy
    cost_eur: Cost
    power_kw: Power
    message_id: Token = field(default_factory=new_id)
    timestamp: Timestamp = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class ChargeCompletion:
    """Engine -> Central (charging_session_complete): end of a supply; may repeat, billed once."""

    TYPE: ClassVar[str] = "charge_completion"
    cp_id: Id
    session_id: Id
    driver_id: Id
    energy_kwh: Energy
    cost_eur: Cost
    end_reason: EndReason
    message_id: Token = field(default_factory=new_id)
    timestamp: Timestamp = field(default_factory=time.time)


# --------------------------------------------------------------------------- Monitor -> Central


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """Monitor -> Central: authenticate this CP (location only for a new CP)."""

    TYPE: ClassVar[str] = "register_request"
    cp_id: Id
    correlation_id: Token
    location: Location | None = None


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    """Central -> Monitor: answer to register_request; the price comes from Central."""

    TYPE: ClassVar[str] = "register_response"
    correlation_id: Token
    status: Annotated[str, OneOf(REGISTER_STATUSES)]
    reason: Reason | None = None
    price_eur_kwh: Price | None = None
    location: Location | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Monitor -> Central: the life message, every second."""

    TYPE: ClassVar[str] = "heartbeat"
    cp_id: Id
    engine_ok: bool
    state: CpStateName | None = None
    supplying_session_id: Id | None = None
    #: The CP took itself out of service (an OCPP charger reporting Unavailable), and why: Central
    #: shows it STOPPED (stop reason "charger") and sends it no supply until a heartbeat without it.
    out_of_service: Reason | None = None


@dataclass(frozen=True, slots=True)
class FaultNotification:
    """Engine -> Monitor -> Central (or Monitor -> Central): the CP is broken."""

    TYPE: ClassVar[str] = "fault_notification"
    cp_id: Id
    reason: Reason


@dataclass(frozen=True, slots=True)
class FaultCleared:
    """Engine -> Monitor -> Central (or Monitor -> Central): the CP works again."""

    TYPE: ClassVar[str] = "fault_cleared"
    cp_id: Id


@dataclass(frozen=True, slots=True)
class SupplyAuthorizationResponse:
    """Monitor -> Central: the CP's answer to authorize_supply."""

    TYPE: ClassVar[str] = "supply_authorization_response"
    correlation_id: Token
    session_id: Id
    accepted: bool
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class SupplyStarted:
    """Engine -> Monitor -> Central: the vehicle is plugged in, energy flows."""

    TYPE: ClassVar[str] = "supply_started"
    cp_id: Id
    session_id: Id
    driver_id: Id | None = None


@dataclass(frozen=True, slots=True)
class SupplyEnded:
    """Engine -> Monitor -> Central: the supply is over (final figures when known)."""

    TYPE: ClassVar[str] = "supply_ended"
    cp_id: Id
    session_id: Id
    end_reason: EndReason
    driver_id: Id | None = None
    energy_kwh: Energy | None = None
    cost_eur: Cost | None = None


@dataclass(frozen=True, slots=True)
class CpSupplyRequest:
    """Engine -> Monitor -> Central: a supply typed at the CP's own menu (addition)."""

    TYPE: ClassVar[str] = "cp_supply_request"
    cp_id: Id
    driver_id: Id
    correlation_id: Token


# --------------------------------------------------------------------------- Central -> Monitor -> Engine


@dataclass(frozen=True, slots=True)
class AuthorizeSupply:
    """Central -> Monitor -> Engine: get ready to supply driver_id."""

    TYPE: ClassVar[str] = "authorize_supply"
    correlation_id: Token
    session_id: Id
    driver_id: Id
    price_eur_kwh: Price
    cp_id: Id


@dataclass(frozen=True, slots=True)
class StopSupply:
    """Central -> Monitor -> Engine: end supply session_id now."""

    TYPE: ClassVar[str] = "stop_supply"
    session_id: Id
    reason: Reason


@dataclass(frozen=True, slots=True)
class StopCp:
    """Central -> Monitor -> Engine: out of order (ends any supply) until resume_cp."""

    TYPE: ClassVar[str] = "stop_cp"
    reason: Reason


@dataclass(frozen=True, slots=True)
class ResumeCp:
    """Central -> Monitor -> Engine: back in service after stop_cp."""

    TYPE: ClassVar[str] = "resume_cp"


@dataclass(frozen=True, slots=True)
class CpSupplyResponse:
    """Central -> Monitor -> Engine: answer to cp_supply_request (addition)."""

    TYPE: ClassVar[str] = "cp_supply_response"
    correlation_id: Token
    cp_id: Id
    status: AuthStatus
    session_id: Id | None = None
    reason: Reason | None = None


# --------------------------------------------------------------------------- Monitor <-> Engine


@dataclass(frozen=True, slots=True)
class Hello:
    """Monitor -> Engine: the confirmed CP id and Central's price."""

    TYPE: ClassVar[str] = "hello"
    cp_id: Id
    price_eur_kwh: Price
    # The CP's current key from Central (base64url), for sealing its Kafka records;
    # only ever sent on a sealed (paired) link. None: Central gave none (open enrolment).
    key_id: Id | None = None
    key: B64 | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Monitor -> Engine: are you OK? (every second)"""

    TYPE: ClassVar[str] = "health_check"
    seq: HealthSeq


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """Engine -> Monitor: answer to health_check with the same seq."""

    TYPE: ClassVar[str] = "health_status"
    seq: HealthSeq
    ok: bool


# --------------------------------------------------------------------------- any link


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Any receiver -> the sender of a message it could not accept."""

    TYPE: ClassVar[str] = "error"
    reason: Reason
    correlation_id: Token | None = None


# --------------------------------------------------------------------------- session lifecycle (issue #10)


@dataclass(frozen=True, slots=True)
class CancelSupply:
    """Central -> Monitor -> Engine: drop session_id (unplugged: no bill; supplying: end it, billed)."""

    # Central cancelled it (authorisation timeout, link loss, a late "accepted", a
    # stray session, operator close). The Engine always answers supply_ended;
    # Central repeats the order until it does (docs/protocol.md).

    TYPE: ClassVar[str] = "cancel_supply"
    session_id: Id
    reason: Reason = "cancelled by Central"


@dataclass(frozen=True, slots=True)
class SessionBilled:
    """Central -> Monitor -> Engine: the ticket of session_id exists (stop republishing its completion)."""

    TYPE: ClassVar[str] = "session_billed"
    session_id: Id
    cp_id: Id | None = None


@dataclass(frozen=True, slots=True)
class BillingQuery:
    """Engine -> Monitor -> Central: is session_id billed? (answered by session_billed, or nothing)"""

    TYPE: ClassVar[str] = "billing_query"
    cp_id: Id
    session_id: Id


@dataclass(frozen=True, slots=True)
class SupplyState:
    """Engine -> Monitor, answering every hello: the session the Engine holds (null when idle)."""

    # A restarted Monitor learns it here and reports it in its heartbeat's supplying_session_id.

    TYPE: ClassVar[str] = "supply_state"
    cp_id: Id
    session_id: Id | None = None
    plugged: bool = False


# --------------------------------------------------------------------------- trust boundary (issue #11)
# The rules (who sends what, the HMAC inputs, the AAD) are in docs/protocol.md,
# "Authentication and sealing"; the crypto is transport/security.py.

AUTH_STATUSES = frozenset({"accepted", "denied"})
SEALED_MAX_LEN = 1_000_000  #: base64 characters of a sealed message (a Kafka record stays under 1 MB)
SIGNED_BODY_MAX_LEN = 65_536  #: characters of a signed driver request's body (the JSON of the request)
SENDERS = frozenset({"monitor", "engine", "central"})


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Monitor -> Central (and Monitor -> Engine): I am cp_id; challenge me."""

    TYPE: ClassVar[str] = "auth_request"
    cp_id: Id
    correlation_id: Token


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """Central (or Engine) -> Monitor: prove you hold cp_id's secret for this nonce."""

    TYPE: ClassVar[str] = "auth_challenge"
    correlation_id: Token
    nonce: B64


@dataclass(frozen=True, slots=True)
class AuthProof:
    """Monitor -> Central (or Engine): HMAC(verifier, purpose | cp_id | nonce)."""

    TYPE: ClassVar[str] = "auth_proof"
    correlation_id: Token
    cp_id: Id
    proof: B64


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Central (or Engine) -> Monitor: the verdict; from Central also the CP's key, wrapped."""

    TYPE: ClassVar[str] = "auth_result"
    correlation_id: Token
    status: Annotated[str, OneOf(AUTH_STATUSES)]
    reason: Reason | None = None
    key_id: Id | None = None
    wrapped_key: B64 | None = None


@dataclass(frozen=True, slots=True)
class Sealed:
    """Any message, encrypted and authenticated with AES-256-GCM under the CP's key."""

    TYPE: ClassVar[str] = "sealed"
    cp_id: Id
    key_id: Id
    sender: Annotated[str, OneOf(SENDERS)]
    ctr: Seq
    nonce: B64
    data: Annotated[str, MaxLen(SEALED_MAX_LEN)]


@dataclass(frozen=True, slots=True)
class Signed:
    """Driver -> Central: a driver request (``body``, its JSON) signed with the driver's verifier."""

    TYPE: ClassVar[str] = "signed"
    driver_id: Id
    ts: Timestamp
    body: Annotated[str, MaxLen(SIGNED_BODY_MAX_LEN)]
    sig: B64


Message = (
    AvailableCpsRequest | ChargeRequest | StopChargingRequest | DriverHello | TicketAck
    | AvailableCpsResponse | ChargeResponse | SupplyEvent | ChargingStatusUpdate | Ticket
    | StopChargingResponse | DriverHelloResponse
    | ChargingData | ChargeCompletion
    | RegisterRequest | RegisterResponse | Heartbeat | FaultNotification | FaultCleared
    | SupplyAuthorizationResponse | SupplyStarted | SupplyEnded | CpSupplyRequest
    | AuthorizeSupply | StopSupply | StopCp | ResumeCp | CpSupplyResponse
    | Hello | HealthCheck | HealthStatus
    | ErrorMessage
    | CancelSupply | SessionBilled | BillingQuery | SupplyState
    | AuthRequest | AuthChallenge | AuthProof | AuthResult | Sealed | Signed
)
"""Any registered message."""

_REGISTRY: dict[str, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}
assert len(_REGISTRY) == len(get_args(Message)), "two message classes share a TYPE"


def message_types() -> Mapping[str, type[Message]]:
    """Wire type string -> message class (read-only)."""
    return MappingProxyType(_REGISTRY)


def correlation_of(msg: object) -> str | None:
    """The message's correlation_id, or None when it has none."""
    return getattr(msg, "correlation_id", None)


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    hint: Any
    required: bool


_SPECS: dict[type, tuple[_FieldSpec, ...]] = {}


def _specs(cls: type) -> tuple[_FieldSpec, ...]:
    """The fields of a dataclass with resolved hints; computed once per class."""
    specs = _SPECS.get(cls)
    if specs is None:
        hints = get_type_hints(cls, include_extras=True)
        specs = tuple(
            _FieldSpec(
                f.name,
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
        _SPECS[cls] = specs
    return specs


def _show(value: Any) -> str:
    """A short rendering of an offending value for error messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if value is None:
        return "null"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a huge number"
    return text if len(text) <= 40 else text[:37] + "..."


_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


#: Shapes of the type hints met so far (see _shape): the hints are analysed once, not per value.
_SHAPES: dict[Any, tuple[Any, ...]] = {}
_ANNOTATED, _OPTIONAL, _TUPLE, _DATACLASS, _PLAIN = range(5)


def _shape(hint: Any) -> tuple[Any, ...]:
    """What ``_convert`` needs to know about ``hint`` (its origin, arguments, rules), cached."""
    try:
        return _SHAPES[hint]
    except KeyError:
        pass
    except TypeError:  # an unhashable hint: analyse it every time
        return _analyse(hint)
    shape = _SHAPES[hint] = _analyse(hint)
    return shape


def _analyse(hint: Any) -> tuple[Any, ...]:
    origin = get_origin(hint)
    if origin is Annotated:
        base, *rules = get_args(hint)
        return (_ANNOTATED, base, tuple(rules))
    if origin is Union or origin is UnionType:  # only ever X | None here
        (inner,) = [a for a in get_args(hint) if a is not NoneType]
        return (_OPTIONAL, inner)
    if origin is tuple:  # tuple[X, ...]
        return (_TUPLE, get_args(hint)[0])
    if dataclasses.is_dataclass(hint):
        return (_DATACLASS, hint)
    return (_PLAIN, hint)


def _convert(value: Any, hint: Any, path: str, kind: str) -> Any:
    """Check ``value`` against a type hint and return it in Python form.

    ``path`` names the field ("seq", "tickets[0].cost_eur") and ``kind`` the
    message type, both only for error messages.
    """
    shape = _shape(hint)
    how = shape[0]
    if how == _PLAIN:
        # the hot path: str, int, float, bool
        if type(value) is hint:  # exact type: never a bool posing as an int, no conversion
            if hint is str:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ProtocolError(f"field '{path}' of {kind} contains characters that are not valid Unicode") \
                        from None
                return value
            if hint is float and not math.isfinite(value):
                raise ProtocolError(f"field '{path}' of {kind} must be a finite number, got {_show(value)}")
            return value
        ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ProtocolError(f"field '{path}' of {kind} must be {_KIND[hint]}, got {_show(value)}")
        if hint is float:
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ProtocolError(f"field '{path}' of {kind} must be a finite number, got {_show(value)}")
            value = number
        elif hint is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(f"field '{path}' of {kind} contains characters that are not valid Unicode") \
                    from None
        return value
    if how == _ANNOTATED:
        value = _convert(value, shape[1], path, kind)
        for rule in shape[2]:
            problem = rule.complaint(value)
            if problem:
                raise ProtocolError(f"field '{path}' of {kind} {problem}, got {_show(value)}")
        return value
    if how == _OPTIONAL:
        if value is None:
            return None
        return _convert(value, shape[1], path, kind)
    if how == _TUPLE:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"field '{path}' of {kind} must be an array, got {_show(value)}")
        item = shape[1]
        return tuple(_convert(v, item, f"{path}[{i}]", kind) for i, v in enumerate(value))
    if not isinstance(value, dict):
        raise ProtocolError(f"field '{path}' of {kind} must be an object, got {_show(value)}")
    return _build(shape[1], value, kind, f"{path}.")


@dataclass(frozen=True, slots=True)
class _Fast:
    """The fast path of a scalar field: values of exactly type ``base`` that pass every check.

    ``checks`` are (what, argument) pairs ("ascii", "finite", "id", "in", "ge", "le",
    "maxlen"); ``test`` is them as one predicate (the per-field path of :func:`_build`), and
    :func:`_compile_class` writes the same checks inline into one function per message class.
    """

    base: type
    checks: tuple[tuple[str, Any], ...]
    test: Callable[[Any], bool]


#: How each fast check reads as Python (``v`` is the value, ``{0}`` the name of its argument).
_CHECK_SOURCE = {
    "ascii": "v.isascii()",  # ASCII is always valid Unicode; other text is checked in full
    "finite": "_isfinite(v)",
    "id": "_idm(v) is not None",
    "in": "v in {0}",
    "ge": "v >= {0}",
    "le": "v <= {0}",
    "maxlen": "len(v) <= {0}",
}


def _check_source(checks: tuple[tuple[str, Any], ...], prefix: str, namespace: dict[str, Any]) -> list[str]:
    """The checks as Python expressions over ``v``; their arguments go into ``namespace``."""
    out = []
    for j, (what, arg) in enumerate(checks):
        name = f"{prefix}{j}"
        namespace[name] = arg
        out.append(_CHECK_SOURCE[what].format(name))
    return out


def _fast_namespace() -> dict[str, Any]:
    return {"_isfinite": math.isfinite, "_idm": _ID_MATCH}


def _fast_check(hint: Any) -> _Fast | None:
    """For a scalar field: the checks accepting its common valid values at once.

    Anything they do not accept goes through :func:`_convert`, which
    accepts or rejects it with the reason; so this only makes valid input cheaper
    (telemetry is decoded thousands of times a second) and never changes a verdict.
    """
    shape = _shape(hint)
    if shape[0] == _OPTIONAL:  # a value of X | None that is not null is converted exactly as X
        return _fast_check(shape[1])
    base, rules = (shape[1], shape[2]) if shape[0] == _ANNOTATED else (hint, ())
    if _shape(base)[0] != _PLAIN or base not in (str, int, float, bool):
        return None
    checks: list[tuple[str, Any]] = []
    if base is str:
        checks.append(("ascii", None))
    elif base is float:
        checks.append(("finite", None))
    for rule in rules:
        if isinstance(rule, IdRule):
            checks.append(("id", None))
        elif isinstance(rule, OneOf):
            checks.append(("in", rule.values))
        elif isinstance(rule, AtLeast):
            checks.append(("ge", rule.minimum))
        elif isinstance(rule, AtMost):
            checks.append(("le", rule.maximum))
        elif isinstance(rule, MaxLen):
            checks.append(("maxlen", rule.limit))
        else:
            return None
    namespace = _fast_namespace()
    body = " and ".join(_check_source(tuple(checks), "_a", namespace)) or "True"
    exec(f"def test(v):\n    return bool({body})", namespace)  # the source is ours: constants and check names
    return _Fast(base, tuple(checks), namespace["test"])


_T = TypeVar("_T")
_Plan = tuple[tuple[str, bool, Any, _Fast | None], ...]
#: Per message class: its fields' plan (name, required, hint, fast check) and the compiled
#: fast decoder of the whole class (None when some field has no fast check).
_PLANS: dict[type, tuple[_Plan, Callable[[dict[str, Any]], Any] | None]] = {}


def _compile_class(cls: type, plan: _Plan) -> Callable[[dict[str, Any]], Any] | None:
    """One function that builds ``cls`` from a dict whose every field passes its fast check,
    and returns None for anything else (then :func:`_build` checks field by field and says why).

    Why: the hot records (telemetry, completions, sealed envelopes) are decoded thousands of
    times a second; checking each field inline, with the arguments in positional order, costs
    a third of walking the plan. The checks are the plan's own (:class:`_Fast`), so every
    verdict stays the same; missing or null optional fields take the dataclass default, as
    :func:`_build` lets them.
    """
    fields = dataclasses.fields(cls)
    if any(fast is None for *_, fast in plan) or any(f.kw_only for f in fields):
        return None
    namespace = _fast_namespace()
    namespace["_cls"] = cls
    lines = ["def build(d):", "    get = d.get"]
    for i, ((name, required, _hint, fast), f) in enumerate(zip(plan, fields, strict=True)):
        assert fast is not None and f.name == name
        namespace[f"_t{i}"] = fast.base
        cond = " and ".join([f"type(v) is _t{i}", *_check_source(fast.checks, f"_c{i}_", namespace)])
        lines.append(f"    v = get({name!r})")
        if required:  # null (or missing) fails the type check: _build names the problem
            lines += [f"    if not ({cond}):", "        return None", f"    a{i} = v"]
            continue
        if f.default is not dataclasses.MISSING:
            namespace[f"_d{i}"] = f.default
            default = f"_d{i}"
        else:
            namespace[f"_d{i}"] = f.default_factory
            default = f"_d{i}()"
        lines += ["    if v is None:", f"        a{i} = {default}", f"    elif {cond}:", f"        a{i} = v",
                  "    else:", "        return None"]
    lines.append(f"    return _cls({', '.join(f'a{i}' for i in range(len(plan)))})")
    exec("\n".join(lines), namespace)  # the source is made here from our own constants
    build: Callable[[dict[str, Any]], Any] = namespace["build"]
    return build


def _build(cls: type[_T], data: dict[str, Any], kind: str, prefix: str = "") -> _T:
    """Validate ``data`` against the fields of ``cls`` and construct it."""
    entry = _PLANS.get(cls)
    if entry is None:
        plan = tuple((f.name, f.required, f.hint, _fast_check(f.hint)) for f in _specs(cls))
        entry = _PLANS[cls] = (plan, _compile_class(cls, plan))
    plan, compiled = entry
    if compiled is not None:
        built: _T | None = compiled(data)
        if built is not None:
            return built
    kwargs = {}
    for name, required, hint, fast in plan:
        value = data.get(name)
        if value is None:
            if not required:
                continue  # null counts as missing: the dataclass default applies
            if name not in data:
                raise ProtocolError(f"{kind} is missing required field '{prefix}{name}'")
        elif fast is not None and type(value) is fast.base and fast.test(value):
            kwargs[name] = value
            continue
        kwargs[name] = _convert(value, hint, prefix + name, kind)
    return cls(**kwargs)


def from_dict(d: dict[str, Any]) -> Message:
    """Build a message from a decoded JSON object; ProtocolError when it does not fit."""
    if not isinstance(d, dict):
        raise ProtocolError(f"message must be a JSON object, got {_show(d)}")
    corr = d.get("correlation_id")
    corr = corr if isinstance(corr, str) and 0 < len(corr) <= 200 else None
    if "type" not in d:
        raise ProtocolError("message has no 'type' field", corr)
    kind = d["type"]
    if not isinstance(kind, str):
        raise ProtocolError(f"message 'type' must be a string, got {_show(kind)}", corr)
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {_show(kind)}", corr)
    try:
        return _build(cls, d, kind)
    except ProtocolError as exc:
        exc.correlation_id = corr
        raise


#: Field names of the dataclasses met so far, by class (None: not a dataclass).
_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, recursively (JSON-shaped)."""
    cls = type(value)
    try:
        names = _FIELD_NAMES[cls]
    except KeyError:
        names = _FIELD_NAMES[cls] = (tuple(f.name for f in dataclasses.fields(cls))
                                     if dataclasses.is_dataclass(cls) else None)
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON-shaped dict of a message, "type" first."""
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "TYPE", "")) is not cls:
        raise TypeError(f"{cls.__name__} is not a protocol message")
    return {"type": msg.TYPE, **_plain(msg)}


#: One encoder for every call (json.dumps with options would build a new one each time).
_JSON_OUT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode(msg: Message) -> bytes:
    """Compact UTF-8 JSON; validated first, so the peer's decoder will accept it."""
    data = to_dict(msg)
    from_dict(data)
    return _JSON_OUT.encode(data).encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


#: One decoder for every call (json.loads with options would build a new one each time).
_JSON = json.JSONDecoder(parse_constant=_no_constants)


#: The decoder's scanner (the C one): a value and where it ended, from a position.
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def _scan_object(data: str) -> Any:
    """``_JSON.decode(data)``, a little faster for what every peer sends: an object with nothing around it.

    Anything else (whitespace around it, extra data, not an object) goes to ``_JSON.decode``,
    so every verdict and error message stays the decoder's own.
    """
    if data[:1] == "{":
        try:
            obj, end = _SCAN_ONCE(data, 0)
        except StopIteration:
            return _JSON.decode(data)
        if end == len(data):
            return obj
    return _JSON.decode(data)


def decode(data: bytes | bytearray | memoryview | str) -> Message:
    """Parse one message from UTF-8 JSON; ProtocolError for anything unacceptable."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8") from None
    if not isinstance(data, str):
        raise ProtocolError(f"message must be bytes or text, got {type(data).__name__}")
    try:
        if data.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        obj = _scan_object(data)
    except RecursionError:
        raise ProtocolError("message is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if type(obj) is dict:  # the hot path: a message whose every field passes its class's fast checks
        kind = obj.get("type")
        if type(kind) is str:
            entry = _PLANS.get(_REGISTRY.get(kind))  # type: ignore[arg-type]  # None: not built yet
            if entry is not None and entry[1] is not None:
                built: Message | None = entry[1](obj)
                if built is not None:
                    return built
    return from_dict(obj)
