"""CentralActor: the CP registry, the CP state machine, authorisation and admin.

Inputs, all as messages in one mailbox (so no locks and no races):
* ``FrameIn``/``LinkUp``/``LinkDown`` from Monitor connections (socket adapter);
* ``Delivery`` of ``driver_requests`` from its Kafka pump (asked: the pump
  commits only after this actor answered, i.e. after the DB writes);
* ``ProgressBatch`` (newest telemetry per session, one per Kafka poll) from the router;
* ``SupplyFinished``/``SessionBilled`` from session actors;
* ``ConsoleLine`` commands typed into Central's terminal;
* operator and weather commands (``AdminCommand``, ``RevokeKey``, ``WeatherAlert``,
  ``WatchLocation``, ``WeatherView``: actors/operations.py) from the console and
  API_Central, each answered with an ``OperatorResult``;
* its own timers: life-message check, authorisation deadlines, panel refresh.

Each message type has its own handler method: ``on_receive`` dispatches
actor messages, :attr:`CentralActor.FRAME_HANDLERS` the Monitor's frames and
:attr:`CentralActor.DRIVER_HANDLERS` the driver requests, by protocol type.

State shown to people comes from :func:`actors.cp_state.derive_state` (the
same rule the Monitor uses), so the panel cannot disagree with the rules.
A CP is out of service when the operator stopped it or an active weather
alert holds its location (``CpView.stop_reasons``, the one stop rule; the
weather bookkeeping is :class:`actors.weather_state.WeatherBook`), and
:meth:`CentralActor._apply_stop` is the one place that tells a CP so.

After a restart (its supervisor is rest_for_one; see
``supervisors/central_system.py``) this actor knows only what the database
says: CPs, prices and live sessions. Its Monitor connections restart after
it, so every Monitor reconnects and registers again, and that is how it
re-learns which CP is on which link.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pykka

from actors.console import ConsoleLine
from actors.cp_state import CpState, derive_state
from actors.driver_auth import Denial, DriverAuth, denial_answers
from actors.gatekeeper import CpRegistered, KeysRevoked, RevokeCp
from actors.messages import MarkSupplying, ProgressBatch, Ready, SessionBilled, SessionProgress, SupplyFinished
from actors.operations import (  # AdminCommand is imported from here too
    CONFLICT,
    INVALID,
    NOT_FOUND,
    OK,
    UNAVAILABLE,
    AdminCommand,
    OperatorResult,
    RevokeKey,
    WatchLocation,
    WeatherAlert,
    WeatherView,
)
from actors.panel import (
    CHARGER,
    FAULT_MARK,
    OPERATOR,
    WEATHER,
    CpTile,
    MessageRow,
    PanelSnapshot,
    RequestRow,
    WeatherRow,
)
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, Ticker, schedule, tell
from actors.session import SessionActor
from actors.weather_state import Outcome, WeatherBook, console_lines, row_dict
from persistence import Conflict, Repository, SessionRecord
from transport import protocol, security
from transport.kafka import DeadLettered, Delivery, Handled, Inbound, Publish, PumpDown, PumpUp, SetAside
from transport.link import Close, FrameIn, FrameRejected, LinkDown, LinkUp, Send
from transport.security import address_of

log = logging.getLogger("evcharging.central")

ACTIVE, DISCONNECTED = CpState.ACTIVE, CpState.DISCONNECTED

DEAD_AUDIT_PER_SECOND = 20
"""At most this many ``record_rejected`` audit lines a second (the rest are counted in one line)."""

CLOSING_TIMEOUT = 30.0
"""Seconds Central waits for the ticket of a session it closed itself before it may try again."""
FULL_SWEEP_INTERVAL = 1.0
"""Seconds between the ticks that derive every CP's state in full (the others check liveness only)."""

REJECTED_AUDIT_EVERY = 1.0
"""Seconds: frames refused on one link are audited at most this often (one line with their count)."""

OPEN_WARNING = ("WARNING: enrolment is OPEN (--enroll open): CPs are not authenticated and their messages "
                "are not sealed; anyone who reaches Central's port can act as any CP. Development only.")

CONSOLE_HELP = ("Commands: stop CP_ID | stop all | resume CP_ID | resume all | close SESSION_ID | status | "
                "weather | revoke CP_ID [REASON] | audit [N] | audit export PATH | enroll-driver DRIVER_ID")

MESSAGES_KEPT = 100
"""Application messages a panel snapshot carries (the newest; each has a seq, so the API sees which are new)."""

OPERATOR_STOP = "stopped by Central"
"""The stop_cp reason of an operator's stop (a weather stop says ``weather: <location> <temp> °C``)."""


@dataclass(frozen=True, slots=True)
class CentralConfig:
    """Central's policies and timings (all flags of EV_Central)."""

    db_path: str
    # "registry": only CPs registered with a credential, after authenticating (issue #11);
    # "open": development only, no authentication, unknown CPs are enrolled (logged loudly).
    enroll: str = "registry"
    default_price: float = 0.30
    default_location: str = "unknown"
    life_timeout: float = 2.5  # two missed life messages (1 s apart) and half a period
    authorize_timeout: float = 5.0
    panel_interval: float = 0.5
    life_check_interval: float = 0.1  # how late a silent CP may be noticed after its timeout
    request_max_age: float = 10.0  # a charge request older than this was sent while Central was away
    reconcile_grace: float = 5.0  # the CP's heartbeat disagrees with Central about a session this long: act
    completion_wait: float = 10.0  # the CP ended a supply but no completion came: Central closes it after this
    stop_retry: float = 2.0  # a cancel/stop the CP has not confirmed is repeated this often
    lost_deadline: float = 300.0  # a live session whose CP is gone this long is closed from its last checkpoint
    auth_timeout: float = 5.0  # a Monitor connection must authenticate within this, or it is closed
    auth_failures: int = 5  # failed authentications per address within auth_window before it is refused
    auth_window: float = 60.0
    key_grace: float = 60.0  # a replaced CP key still opens Kafka records this long
    signature_max_age: float = 300.0  # a signed driver request older than this is denied (a replay)


@dataclass(eq=False)
class CpView:
    """What Central knows about one CP (mutable, private to the actor)."""

    cp_id: str
    location: str
    price: float
    link: pykka.ActorRef[Any] | None = None
    last_heartbeat: float = 0.0
    #: Its life messages are not overdue: set by each one, cleared by Central's tick (see _on_tick),
    #: when its link goes and when it registers on a new link. Nothing else judges life from the clock.
    alive: bool = False
    engine_ok: bool | None = None
    stopped: bool = False  # by the operator (stored)
    weather: str | None = None  # the key of the weather alert holding its location (WeatherBook.hold_of)
    out_of_service: str | None = None  # the CP's own word, from its heartbeat (an OCPP charger's Unavailable)
    session_id: str | None = None
    driver_id: str | None = None
    supplying: bool = False
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    seq: int = 0  # newest telemetry seq shown for the live session (duplicates and late ones are ignored)
    power_kw: float = 0.0
    fault: str | None = None
    state: CpState = DISCONNECTED
    # Reconciliation of the live session with the CP (issue #10):
    idle_since: float | None = None  # monotonic: since when the CP's heartbeat does not show the session
    ended: tuple[float, float, str] | None = None  # the CP's supply_ended figures (kWh, €, end reason)
    lost_since: float | None = None  # monotonic: since when the CP's Monitor is gone (with a live session)

    def bind(self, session_id: str | None, driver_id: str | None) -> None:
        """Start (or, with None, forget) the CP's session: what Central learnt about the
        previous one (its final figures, idle and lost clocks) never carries over."""
        self.session_id, self.driver_id = session_id, driver_id
        self.ended = self.idle_since = self.lost_since = None

    @property
    def ordered_stop(self) -> bool:
        """Central took it out of service: the operator stopped it or a weather alert holds its location
        (both may hold). What the CP is told (stop_cp / resume_cp) follows this alone."""
        return self.stopped or self.weather is not None

    @property
    def stop_reasons(self) -> tuple[str, ...]:
        """The one stop rule: out of service when Central ordered it (operator, weather) or the CP
        says it took itself out of service (its heartbeat's ``out_of_service``); back in service
        when none holds."""
        return ((OPERATOR,) * self.stopped + (WEATHER,) * (self.weather is not None)
                + (CHARGER,) * (self.out_of_service is not None))

    def derive(self) -> CpState:
        """Connected means: a Monitor link and life messages not overdue (``alive``)."""
        return derive_state(connected=self.link is not None and self.alive, engine_ok=self.engine_ok,
                            supplying=self.supplying,
                            stopped=bool(self.stop_reasons))


@dataclass(slots=True)
class _Pending:
    """An authorisation waiting for the CP's answer."""

    session_id: str
    cp_id: str
    driver_id: str
    origin: str  # "driver" or "cp"
    request_correlation: str
    link: pykka.ActorRef[Any]
    timer: Scheduled | None = None
    started: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class _Tick:
    at: float  #: when the ticker told it (monotonic)


@dataclass(frozen=True, slots=True)
class _AuthTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Ask (operator, last resort): end a session now. A pending or never-supplied
    session is cancelled (no bill) and the CP told to drop it; a supplying one is
    stopped at the CP and billed from the best figures Central has, flagged for
    review. Audited. Returns a sentence. Console: ``close SESSION_ID``."""

    session_id: str
    who: str = "console"


@dataclass(slots=True)
class _Cancel:
    """A session Central cancelled that the CP has not yet confirmed dropping."""

    cp_id: str
    reason: str
    since: float  # monotonic
    sent: float = 0.0  # monotonic, last cancel_supply sent


@dataclass(frozen=True, slots=True)
class CentralStatus:
    """Ask: a dict snapshot of every CP (for tests, the launcher and tools)."""


@dataclass(frozen=True, slots=True)
class EnrollDriver:
    """Ask (operator): register ``driver_id`` with a fresh secret; returns the secret (shown once,
    never logged). Console: ``enroll-driver DRIVER_ID``."""

    driver_id: str
    who: str = "api"


@dataclass(frozen=True, slots=True)
class ExportAudit:
    """Ask (operator): write the audit log as JSON lines to ``path``; returns a sentence.
    Console: ``audit export PATH``."""

    path: str
    who: str = "api"


class CentralActor(SupervisedActor):
    """See the module docstring."""

    def __init__(
        self,
        config: CentralConfig,
        directory: Directory,
        spawn: Callable[..., Any],
        *,
        supervision: Supervision | None = None,
    ) -> None:
        """``spawn(name, cls, args, kwargs)`` starts a session actor under the sessions supervisor."""
        super().__init__(supervision=supervision)
        self.config = config
        self.directory = directory
        self.spawn = spawn
        self._started: dict[str, float] = {}
        self._repo: Repository | None = None
        self.cps: dict[str, CpView] = {}
        self._by_link: dict[str, str] = {}  # link urn -> cp_id
        self._pending: dict[str, _Pending] = {}  # authorize correlation id -> pending
        self._live: dict[str, CpView] = {}  # session id -> its CP
        self._messages: deque[MessageRow] = deque(maxlen=MESSAGES_KEPT)
        # Starts at the clock in µs, so a restarted actor's messages still come after the last
        # run's (a consumer keeping the highest seq it saw misses none); +1 for each message.
        self._message_seq = time.time_ns() // 1000
        self._weather = WeatherBook(lambda: self.repo)
        self._ticker: Ticker | None = None
        self._next_full_sweep = 0.0  # monotonic: when the tick next derives every CP's state in full
        self._dirty = True
        self._cancels: dict[str, _Cancel] = {}  # session id -> cancel the CP must confirm
        self._strays: dict[str, float] = {}  # session id the CP holds, unknown to Central -> first seen
        # Sessions Central is billing itself (its completion is on its way to the session
        # actor) -> since when. An entry that outlives CLOSING_TIMEOUT failed (the session
        # actor crashed or the ledger rejected it): the deadlines and the reconciliation
        # may act on that session again.
        self._closing: dict[str, float] = {}
        self._unconfirmed: set[str] = set()  # reloaded sessions the CP has not shown in a heartbeat yet
        self._states_to_store: dict[str, str] = {}  # CP states changed since the last tick
        self._run_id: int | None = None
        self._up_since = time.time()
        self._down_since: float | None = None  # the previous run's last sign of life (own clock)
        self._requests_up: float | None = None  # monotonic: when the requests pump first said PumpUp
        self._alive_at = 0.0
        self._dead_audited: dict[str, tuple[float, int]] = {}  # topic|key -> (last audited, records since)
        self._dead_second, self._dead_spent, self._dead_held = 0, 0, 0  # the global audit budget of this second
        self._rejected: dict[str, tuple[float, int]] = {}  # link urn -> (last audit, refusals since)
        # Driver requests: signed by registered drivers unless enroll is "open" (actors/driver_auth.py)
        self._driver_auth = DriverAuth(lambda: self.repo, registry=config.enroll != "open",
                                       max_age=config.signature_max_age)

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        self._repo = Repository(self.config.db_path)
        self.repo.set_all_cp_states(DISCONNECTED)
        self._weather.load()  # an alert active before a restart still holds its CPs
        for rec in self.repo.list_cps():  # with the operator's stored stop decisions
            self.cps[rec.cp_id] = CpView(rec.cp_id, rec.location, rec.price_eur_kwh, stopped=rec.stopped,
                                         weather=self._weather.hold_of(rec.location))
        reloaded = self.repo.live_sessions()
        for s in reloaded:
            self._adopt_session(s)
        self._note(f"Central started: {len(self.cps)} CPs loaded, {len(reloaded)} live sessions reloaded")
        for place in self._weather.alerts():
            self._note(f"Weather alert at {place.location} still active: its CPs stay out of service")
        if self.config.enroll == "open":
            log.warning("%s", OPEN_WARNING)
            self._note(OPEN_WARNING)
        else:
            self._note("Enrolment: registry (CPs authenticate with their credential; their messages are sealed)")
        # One ticker for both duties: life deadlines every life_check_interval
        # (so a silent CP shows DISCONNECTED within ~0.1 s of its timeout) and
        # a panel snapshot every panel_interval when something changed.
        self._ticker = Ticker(min(self.config.life_check_interval, self.config.panel_interval), self.actor_ref,
                              None, name="central-tick", make=lambda: _Tick(time.monotonic()))
        self._next_snapshot = 0.0

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        for p in self._pending.values():
            if p.timer:
                p.timer.cancel()
        if self._repo is not None:
            self._store_states()
            self._repo.close()

    @property
    def repo(self) -> Repository:
        assert self._repo is not None
        return self._repo

    # --- dispatch --------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case FrameIn(link, msg, principal):
                self._on_frame(link, msg, principal)
            case FrameRejected(link, peer, reason, principal):
                self._on_rejected(link, peer, reason, principal)
            case KeysRevoked():
                self._on_keys_revoked(message)
            case CpRegistered(cp_id):
                self._on_cp_registered(cp_id)
            case Delivery(items):
                return Handled(tuple(sa for item in items if (sa := self._on_driver_record(item)) is not None))
            case DeadLettered():
                self._on_dead_letter(message)
            case ProgressBatch(items):
                for p in items:
                    self._on_progress(p)
            case SupplyFinished(cp_id, session_id):
                return self._on_completion(cp_id, session_id)
            case SessionBilled():
                self._on_billed(message)
            case LinkUp():
                pass  # a Monitor connected; it becomes a CP when it registers
            case PumpUp(_pump, name) if "request" in name and self._requests_up is None:
                self._requests_up = time.monotonic()
                log.info("Central: Kafka consumer %s is reading", name)
            case PumpUp(_pump, name):
                log.info("Central: Kafka consumer %s is reading", name)
            case PumpDown(_pump, name, reason):
                log.info("Central: Kafka consumer %s is down (%s); its supervisor starts another", name, reason)
            case LinkDown(link, _peer, reason):
                self._on_link_down(link, reason)
            case _Tick(at):
                self._on_tick(at)
            case _AuthTimeout(corr):
                self._on_auth_timeout(corr)
            case ConsoleLine(text):
                self._on_console(text)
            case CloseSession(sid, who):
                return self._close_command(sid, who)
            case AdminCommand(action, cp_id, who, address):
                return self._admin(action, cp_id, who, address)
            case RevokeKey(cp_id, reason, who, address):
                return self._revoke_command(cp_id, reason, who, address)
            case WeatherAlert(location, temperature_c, alert, error, who):
                return self._on_weather(self._weather.report(location, temperature_c, alert, error, who))
            case WatchLocation(location, watch, who, address):
                self._operator("watch" if watch else "unwatch", who, location=protocol.clip(str(location), 80),
                               address=address)
                return self._on_weather(self._weather.watch(location, watch, who))
            case WeatherView():
                return [row_dict(r) for r in self._weather_rows()]
            case EnrollDriver(driver_id, who):
                return self._enroll_driver(driver_id, who)
            case ExportAudit(path, who):
                return self._export_audit(path, who)
            case CentralStatus():
                return self._status()
            case Ready():
                return True
            case _:
                log.warning("Central ignored an unexpected %s", type(message).__name__)
        return None

    # --- Monitor side ---------------------------------------------------------
    def _on_frame(self, link: pykka.ActorRef[Any], msg: protocol.Message, principal: str | None = None) -> None:
        if isinstance(msg, protocol.RegisterRequest):
            self._register(link, msg, principal)
            return
        cp = self._cp_of(link)
        if cp is not None and self._secured and principal != cp.cp_id:
            # Cannot happen through the gatekeeper (it admits a link for one CP); refused if it does.
            self._on_rejected(link, "?", f"a {msg.TYPE} on the link of CP {cp.cp_id} authenticated as "
                                         f"{principal or 'nobody'}", principal)
            tell(link, Send(protocol.ErrorMessage(reason=f"this connection is not authenticated as CP {cp.cp_id}",
                                                 correlation_id=protocol.correlation_of(msg))))
            return
        if cp is None:
            log.warning("Ignored %s from an unregistered connection", msg.TYPE)
            tell(link, Send(protocol.ErrorMessage(reason="register first: send register_request with your cp_id",
                                                 correlation_id=protocol.correlation_of(msg))))
            return
        handler = self.FRAME_HANDLERS.get(type(msg))
        if handler is None:
            log.warning("Ignored %s from CP %s: not a Monitor message", msg.TYPE, cp.cp_id)
            return
        handler(self, cp, link, msg)

    def _on_heartbeat(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.Heartbeat) -> None:
        was = cp.state
        cp.last_heartbeat = time.monotonic()
        cp.alive = True
        cp.engine_ok = msg.engine_ok
        if msg.engine_ok:
            cp.fault = None
        if msg.out_of_service != cp.out_of_service:
            cp.out_of_service = msg.out_of_service
            self._note(f"CP {cp.cp_id} took itself out of service: {msg.out_of_service}" if msg.out_of_service
                       else f"CP {cp.cp_id} is back in service by itself")
        self._refresh(cp)
        if was == DISCONNECTED and cp.state != DISCONNECTED:
            self._note(f"CP {cp.cp_id} is {cp.state}")
        self._reconcile(cp, msg.supplying_session_id)

    def _on_fault(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.FaultNotification) -> None:
        cp.engine_ok = False
        cp.fault = msg.reason
        self._note(f"CP {cp.cp_id} reported a fault: {msg.reason}", fault=True)
        if cp.session_id:
            self._driver_event(cp.driver_id, cp.session_id, cp.cp_id, "fault",
                               f"CP {cp.cp_id} reported a fault: {msg.reason}")
        self._refresh(cp)

    def _on_fault_cleared(self, cp: CpView, _link: pykka.ActorRef[Any], _msg: protocol.FaultCleared) -> None:
        cp.engine_ok = True
        cp.fault = None
        self._note(f"CP {cp.cp_id} recovered from its fault")
        self._refresh(cp)

    def _on_authorization(self, cp: CpView, _link: pykka.ActorRef[Any],
                          resp: protocol.SupplyAuthorizationResponse) -> None:
        if resp.correlation_id not in self._pending:
            sid = resp.session_id
            if resp.accepted and sid not in self._live:
                # Central cancelled it meanwhile (timeout, link loss): the CP must not supply it.
                self._note(f"CP {cp.cp_id} accepted session {sid} too late: telling it to drop it")
                self._cancel_at_cp(cp.cp_id, sid, "Central had cancelled it (the answer came too late)")
            else:
                log.info("Late authorisation answer from CP %s for %s ignored", cp.cp_id, sid)
            return
        self._finish_pending(resp.correlation_id, resp.accepted, resp.reason or "the CP refused")

    def _on_supply_ended(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.SupplyEnded) -> None:
        if self._cancels.pop(msg.session_id, None) is not None:
            self._note(f"CP {cp.cp_id} confirmed it dropped cancelled session {msg.session_id}")
        self._strays.pop(msg.session_id, None)
        if cp.session_id == msg.session_id:
            cp.supplying = False
            # The completion (Kafka) bills it; if it never comes, Central closes the
            # session with these figures after completion_wait (see _reconcile).
            cp.ended = (cp.energy_kwh if msg.energy_kwh is None else msg.energy_kwh,
                        cp.cost_eur if msg.cost_eur is None else msg.cost_eur, msg.end_reason)
            if cp.idle_since is None:
                cp.idle_since = time.monotonic()
            self._note(f"CP {cp.cp_id} ended supply {msg.session_id} ({msg.end_reason})")
            self._refresh(cp)

    def _on_cp_supply_request(self, cp: CpView, link: pykka.ActorRef[Any], msg: protocol.CpSupplyRequest) -> None:
        denial = self._authorize(cp.cp_id, msg.driver_id, "cp", msg.correlation_id)
        if denial:
            tell(link, Send(protocol.CpSupplyResponse(correlation_id=msg.correlation_id, cp_id=cp.cp_id,
                                                     status="denied", reason=denial)))

    def _on_cp_error(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.ErrorMessage) -> None:
        log.warning("CP %s says: %s", cp.cp_id, msg.reason)

    @property
    def _secured(self) -> bool:
        return self.config.enroll != "open"

    def _register(self, link: pykka.ActorRef[Any], req: protocol.RegisterRequest, principal: str | None = None) -> None:
        refusal: str | None = None
        if (self._secured or principal is not None) and principal != req.cp_id:
            refusal = (f"this connection authenticated as CP {principal}, not {req.cp_id}" if principal
                       else f"CP {req.cp_id} has not authenticated (auth_request first)")
        rec = self.repo.get_cp(req.cp_id) if refusal is None else None
        if refusal is None and rec is None and self._secured:
            refusal = f"unknown CP {req.cp_id}"
        if refusal is not None:
            tell(link, Send(protocol.RegisterResponse(correlation_id=req.correlation_id, status="denied",
                                                      reason=refusal)))
            self.repo.audit("central", req.cp_id, "register_refused", refusal,
                            params={"cp_id": req.cp_id, "principal": principal})
            self._note(f"Refused registration of {req.cp_id}: {refusal}", fault=True)
            tell(link, Close(f"registration refused: {refusal}"))
            return
        if rec is None:
            rec = self.repo.enroll_cp(req.cp_id, req.location or self.config.default_location,
                                      self.config.default_price)
            self.repo.audit("central", req.cp_id, "enrolled", rec.location)
            self._note(f"Enrolled new CP {req.cp_id} at {rec.location}, {rec.price_eur_kwh:.2f} €/kWh")
        cp = self.cps.get(rec.cp_id)
        if cp is None:
            cp = self.cps[rec.cp_id] = CpView(rec.cp_id, rec.location, rec.price_eur_kwh,
                                              weather=self._weather.hold_of(rec.location))
        if cp.link is not None and cp.link.actor_urn != link.actor_urn:
            old = cp.link
            self._by_link.pop(old.actor_urn, None)
            tell(old, Close("replaced by a new connection of the same CP"))
        cp.link = link
        cp.engine_ok = None  # known with the first heartbeat
        cp.out_of_service = None  # likewise
        cp.alive = False  # likewise: a new link is alive with its own first life message
        self._by_link[link.actor_urn] = cp.cp_id
        tell(link, Send(protocol.RegisterResponse(correlation_id=req.correlation_id, status="accepted",
                                                 price_eur_kwh=cp.price, location=cp.location)))
        if cp.ordered_stop:  # out of service (operator, weather): it learns so at once
            tell(link, Send(protocol.StopCp(reason=self._stop_reason(cp))))
        self._note(f"CP {cp.cp_id} registered ({cp.location})")
        self._refresh(cp)

    def _cp_of(self, link: pykka.ActorRef[Any]) -> CpView | None:
        cp_id = self._by_link.get(link.actor_urn)
        return self.cps.get(cp_id) if cp_id else None

    def _on_link_down(self, link: pykka.ActorRef[Any], reason: str) -> None:
        self._rejected.pop(link.actor_urn, None)
        cp_id = self._by_link.pop(link.actor_urn, None)
        cp = self.cps.get(cp_id) if cp_id else None
        if cp is None or cp.link is None or cp.link.actor_urn != link.actor_urn:
            return
        cp.link = None
        cp.alive = False  # a new link is not alive before its own first life message
        self._note(f"CP {cp.cp_id} lost its Monitor ({reason})", fault=True)
        if cp.session_id:
            self._driver_event(cp.driver_id, cp.session_id, cp.cp_id, "fault",
                               f"CP {cp.cp_id} lost its monitor; if it is not back soon the supply ends "
                               "and you get the ticket")
        for corr, p in list(self._pending.items()):
            if p.cp_id == cp.cp_id:
                self._finish_pending(corr, accepted=False, reason=f"CP {cp.cp_id} disconnected", stop_cp=True)
        self._refresh(cp)

    def _on_tick(self, at: float) -> None:
        now = time.monotonic()
        lost = False
        # Time changes a CP's state in one way only: its life messages stop (every other change is an
        # event, which refreshes the CP there and then). So most ticks look at that alone, a compare per
        # CP; once a second every CP's state is derived in full, in case an event did not refresh it.
        # (At 1,000 CPs and 10 ticks a second, a full derive per CP per tick was ~3 % of a core.)
        full = now >= self._next_full_sweep
        if full:
            self._next_full_sweep = now + FULL_SWEEP_INTERVAL
        # Life is judged as of ``at``, when the ticker told this tick, not as of now, when it is
        # handled: one mailbox, in order, so every life message told before the tick has been handled
        # (and stamped) by now, and a CP is silent only if none came within the life timeout before
        # ``at``. Judged as of now, a Central busy for longer than the timeout called CPs silent whose
        # life messages were waiting in its mailbox: at 1,500 CPs connecting at once it held 1,700-
        # 6,700 messages and 1,069-1,243 CPs were shown DISCONNECTED and back (bench.scale).
        silent_before = at - self.config.life_timeout
        for cp in self.cps.values():
            before = cp.state
            if before == DISCONNECTED:
                continue
            fresh = cp.last_heartbeat >= silent_before
            if not full and cp.link is not None and fresh:
                continue  # alive: nothing time-driven can have changed
            cp.alive = fresh
            if cp.derive() == before:
                continue
            self._refresh(cp)
            lost = lost or cp.state == DISCONNECTED
            if cp.state == DISCONNECTED and cp.link is not None:
                self._note(f"CP {cp.cp_id} missed its life messages for {self.config.life_timeout:g} s: DISCONNECTED",
                           fault=True)
                if cp.session_id:
                    self._driver_event(cp.driver_id, cp.session_id, cp.cp_id, "fault",
                                       f"CP {cp.cp_id} stopped answering; you will get the ticket when it reports")
        self._check_deadlines(now)
        self._store_states()
        if self._dirty and (lost or now >= self._next_snapshot):
            self._dirty = False
            self._next_snapshot = now + self.config.panel_interval - 0.01
            snap = self._snapshot()
            self.directory.tell("panel", snap)
            self.directory.tell("web", snap)  # API_Central's event stream, when it runs

    def _store_states(self) -> None:
        """Write the CP states that changed since the last tick. Why batched: at 1,000 CPs a state
        change each was a commit each (an fsync), and a wave of them stalled Central for seconds.
        The database's state column is for tools and a restart, which re-derives it anyway."""
        if self._states_to_store:
            states, self._states_to_store = self._states_to_store, {}
            self.repo.set_cp_states(states)

    def _refresh(self, cp: CpView) -> None:
        state = cp.derive()
        if state != cp.state:
            cp.state = state
            self._states_to_store[cp.cp_id] = state  # stored at the end of the tick, all in one commit
        self._dirty = True

    # --- authorisation ----------------------------------------------------------
    def _authorize(self, cp_id: str, driver_id: str, origin: str, request_corr: str) -> str | None:
        """Start authorising a supply; return a denial sentence, or None if asked to the CP."""
        cp = self.cps.get(cp_id)
        if cp is None:
            return f"unknown CP {cp_id}"
        self._refresh(cp)
        if cp.state != ACTIVE or cp.session_id is not None:
            state = "busy" if cp.state == ACTIVE else cp.state
            return f"CP {cp_id} is {state}"
        for other in self._live.values():
            if other.driver_id == driver_id:
                return f"driver {driver_id} is already supplying at {other.cp_id}"
        session_id = "S" + protocol.new_id()[:10].upper()
        try:  # a driver's request is stored with its session, in one transaction (its first answer)
            self.repo.open_session(session_id, cp_id, driver_id, cp.price, time.time(),
                                   correlation_id=request_corr if origin == "driver" else None)
        except Conflict as exc:
            return str(exc)
        assert cp.link is not None
        corr = protocol.new_id()
        pending = _Pending(session_id, cp_id, driver_id, origin, request_corr, cp.link)
        self._started[session_id] = pending.started
        pending.timer = schedule(self.config.authorize_timeout, self.actor_ref, _AuthTimeout(corr))
        self._pending[corr] = pending
        cp.bind(session_id, driver_id)
        cp.energy_kwh = cp.cost_eur = cp.power_kw = 0.0
        cp.seq = 0
        self._live[session_id] = cp
        tell(cp.link, Send(protocol.AuthorizeSupply(correlation_id=corr, session_id=session_id, driver_id=driver_id,
                                                   price_eur_kwh=cp.price, cp_id=cp_id)))
        self._driver_event(driver_id, session_id, cp_id, "requested", f"asked CP {cp_id} to authorise")
        self._driver_event(driver_id, session_id, cp_id, "waiting_cp", None)
        self._note(f"Driver {driver_id} requested CP {cp_id} (session {session_id})")
        self._dirty = True
        return None

    def _finish_pending(self, corr: str, accepted: bool, reason: str, stop_cp: bool = False) -> None:
        """End an authorisation. ``stop_cp``: Central gave up on its own (timeout, link
        loss, operator), so the CP may have accepted: it is told to drop the session
        (``cancel_supply``, repeated until it confirms)."""
        p = self._pending.pop(corr)
        if p.timer:
            p.timer.cancel()
        cp = self.cps[p.cp_id]
        if accepted:
            self.repo.request_authorized(p.session_id)  # the stored answer, before the driver is told
            self._driver_event(p.driver_id, p.session_id, p.cp_id, "authorized", f"plug in at CP {p.cp_id}")
        else:
            self.repo.cancel_session(p.session_id, reason, time.time(), by="central" if stop_cp else "cp")
            if stop_cp:
                self._cancel_at_cp(p.cp_id, p.session_id, reason)
            self._live.pop(p.session_id, None)
            self._started.pop(p.session_id, None)
            if cp.session_id == p.session_id:
                cp.bind(None, None)
            self._note(f"Session {p.session_id} at CP {p.cp_id} denied: {reason}")
            self._refresh(cp)
        if p.origin == "driver":
            self._to_driver(p.driver_id, protocol.ChargeResponse(
                driver_id=p.driver_id, correlation_id=p.request_correlation,
                status="authorized" if accepted else "denied", cp_id=p.cp_id,
                session_id=p.session_id if accepted else None, reason=None if accepted else reason))
        else:
            tell(p.link, Send(protocol.CpSupplyResponse(
                correlation_id=p.request_correlation, cp_id=p.cp_id, status="authorized" if accepted else "denied",
                session_id=p.session_id if accepted else None, reason=None if accepted else reason)))
            if not accepted:
                self._driver_event(p.driver_id, p.session_id, p.cp_id, "denied", reason)
        if accepted:
            # After the answer (it is stored and on its way: the driver waits for it, not for this),
            # and before this actor handles anything else, so no reading of the session finds it missing.
            rec = self.repo.get_session(p.session_id)
            assert rec is not None
            self._start_session_actor(rec)
            self._note(f"CP {p.cp_id} authorised session {p.session_id} for driver {p.driver_id}")

    def _on_auth_timeout(self, corr: str) -> None:
        p = self._pending.get(corr)
        if p is not None:
            self._finish_pending(corr, False, f"CP {p.cp_id} did not answer within {self.config.authorize_timeout:g} s",
                                 stop_cp=True)

    def _start_session_actor(self, rec: SessionRecord) -> None:
        self._started[rec.session_id] = rec.created_at
        name = f"session:{rec.session_id}"
        if self.directory.get(name) is not None:
            return
        try:
            self.spawn(name, SessionActor, (rec, self.directory), {})
        except Exception as exc:
            # Without its actor the session is still safe: its completion is billed as an orphan.
            log.error("Could not start the session actor of %s: %s", rec.session_id, exc)

    def _adopt_session(self, rec: SessionRecord) -> None:
        """A live session from the database (Central restarted): own it again."""
        cp = self.cps.get(rec.cp_id)
        if cp is None:
            return
        cp.bind(rec.session_id, rec.driver_id)
        cp.energy_kwh, cp.cost_eur, cp.seq = rec.energy_kwh, rec.cost_eur, rec.last_seq
        cp.supplying = rec.status == "supplying"
        self._live[rec.session_id] = cp
        # Until the CP's heartbeat shows it, nobody knows whether the CP has it: a
        # reloaded session is resolved by _reconcile (confirmed, or ended after a
        # deadline), so a lost answer cannot leave the CP and the driver stuck.
        self._unconfirmed.add(rec.session_id)
        cp.lost_since = time.monotonic()  # no Monitor yet: the lost deadline runs until it registers
        self._start_session_actor(rec)

    def _answer_reloaded(self, cp: CpView, sid: str) -> None:
        """The CP confirmed a session Central reloaded after a restart: if the charge_request that
        opened it was never answered (Central died waiting for the CP), answer it now, once."""
        req = self.repo.pending_request_of(sid)
        if req is not None and self.repo.request_authorized(sid):
            self._to_driver(req.driver_id, protocol.ChargeResponse(
                driver_id=req.driver_id, correlation_id=req.correlation_id, status="authorized", cp_id=cp.cp_id,
                session_id=sid))

    def _on_supply_started(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.SupplyStarted) -> None:
        sid = msg.session_id
        if cp.session_id != sid:
            log.warning("CP %s started unknown session %s", cp.cp_id, sid)
            return
        cp.supplying = True
        cp.idle_since = None
        if sid in self._unconfirmed:
            self._unconfirmed.discard(sid)
            self._answer_reloaded(cp, sid)
        self.directory.tell("ledger", MarkSupplying(sid, time.time()))
        self._driver_event(cp.driver_id, sid, cp.cp_id, "plugged_in", f"supplying at CP {cp.cp_id}")
        self._note(f"CP {cp.cp_id} is supplying driver {cp.driver_id}")
        self._refresh(cp)

    def _on_progress(self, p: SessionProgress) -> None:
        cp = self._live.get(p.session_id)
        if cp is None or p.seq <= cp.seq:
            return
        if p.cp_id != cp.cp_id:  # sealed by another CP's key: never Central's meter of this session
            log.warning("Ignored telemetry of session %s (CP %s) that claims CP %s", p.session_id, cp.cp_id, p.cp_id)
            return
        cp.seq = p.seq
        cp.energy_kwh, cp.cost_eur, cp.power_kw = p.energy_kwh, p.cost_eur, p.power_kw
        if not cp.supplying and cp.session_id == p.session_id:
            cp.supplying = True  # telemetry proves the plug-in even if supply_started was lost
            self._refresh(cp)
        self._dirty = True

    def _on_completion(self, cp_id: str, session_id: str) -> str:
        """A session actor is about to bill the CP's vetted completion of ``session_id``: the CP
        supplied it. If the charge_request that opened it is still unanswered (Central died while
        waiting for the CP, and the supply ended before the CP showed it in a heartbeat), the
        driver is answered now, before its ticket, so it knows whose ticket that is."""
        self._unconfirmed.discard(session_id)
        cp = self.cps.get(cp_id)
        if cp is not None:
            self._answer_reloaded(cp, session_id)
        return self._on_supply_finished(cp_id, session_id)

    def _on_supply_finished(self, cp_id: str, session_id: str) -> str:
        cp = self.cps.get(cp_id)
        if cp is None:
            return DISCONNECTED
        if cp.session_id == session_id:
            cp.bind(None, None)
            cp.supplying = False
            cp.power_kw = 0.0
        self._live.pop(session_id, None)
        self._started.pop(session_id, None)
        self._refresh(cp)
        return cp.state

    def _on_billed(self, b: SessionBilled) -> None:
        self._tell_cp_billed(b.cp_id, b.session_id)
        self._live.pop(b.session_id, None)
        self._started.pop(b.session_id, None)
        cp = self.cps.get(b.cp_id)
        if cp is not None and cp.session_id == b.session_id:
            cp.bind(None, None)
            cp.supplying = False
            self._refresh(cp)
        if b.created:
            self._note(f"Ticket {b.session_id}: driver {b.driver_id} at {b.cp_id}, {b.energy_kwh:.3f} kWh, "
                       f"{b.cost_eur:.2f} € ({b.end_reason})")

    # --- session lifecycle: deadlines and reconciliation with the CP (issue #10) ----------
    def _cancel_at_cp(self, cp_id: str, session_id: str, reason: str) -> None:
        """Tell the CP to drop a session Central cancelled; repeated (``stop_retry``) until
        the CP confirms: ``supply_ended``, or a heartbeat not showing the session."""
        cancel = self._cancels.get(session_id)
        if cancel is None:
            cancel = self._cancels[session_id] = _Cancel(cp_id, reason, time.monotonic())
        self._send_cancel(session_id, cancel)

    def _send_cancel(self, session_id: str, cancel: _Cancel) -> None:
        cp = self.cps.get(cancel.cp_id)
        if cp is not None and cp.link is not None:
            cancel.sent = time.monotonic()
            tell(cp.link, Send(protocol.CancelSupply(session_id=session_id, reason=cancel.reason[:200])))

    def _reconcile(self, cp: CpView, held: str | None) -> None:
        """Compare the CP's heartbeat (the session it holds) with Central's view."""
        now = time.monotonic()
        cp.lost_since = None
        for cancelled, cancel in list(self._cancels.items()):
            if cancel.cp_id != cp.cp_id:
                continue
            if held == cancelled:
                if now - cancel.sent >= self.config.stop_retry:
                    self._send_cancel(cancelled, cancel)
            elif cancel.sent and now - cancel.sent >= self.config.stop_retry:
                del self._cancels[cancelled]  # the CP does not hold it: confirmed (a late accept re-arms it)
            elif now - cancel.since > 600:
                del self._cancels[cancelled]
            elif not cancel.sent:
                self._send_cancel(cancelled, cancel)  # cancelled while the CP was away: tell it now
        pending = {p.session_id for p in self._pending.values()}
        if held is not None and held not in self._live and held not in pending and held not in self._cancels:
            first = self._strays.setdefault(held, now)
            if now - first >= self.config.reconcile_grace:
                del self._strays[held]
                rec = self.repo.get_session(held)
                if rec is not None and rec.status == "completed" and cp.link is not None:
                    # Central closed and billed it (operator, lost deadline) while the CP went on.
                    self._note(f"CP {cp.cp_id} is still running session {held}, already billed: "
                               "telling it to stop")
                    self.repo.audit("central", cp.cp_id, "billed_session_running", held)
                    tell(cp.link, Send(protocol.StopSupply(session_id=held, reason="central_stop")))
                elif rec is None or rec.status != "completed":
                    why = f"CP {cp.cp_id} was running session {held}, which Central does not consider live"
                    self._note(why + ": telling it to stop; what it supplied is billed for review")
                    self.repo.audit("central", cp.cp_id, "stray_session", held)
                    if rec is not None:
                        self.repo.flag_session_review(held, why)
                    self._cancel_at_cp(cp.cp_id, held, "Central does not consider this session live")
        for old in [s for s in self._strays if s != held and self._strays[s] < now - 60]:
            del self._strays[old]
        sid = cp.session_id
        if sid is None or sid in pending or sid in self._closing:
            return
        if held == sid and cp.ended is None:
            cp.idle_since = None
            if sid in self._unconfirmed:
                self._unconfirmed.discard(sid)
                self._note(f"CP {cp.cp_id} confirmed session {sid} after Central's restart")
                self._answer_reloaded(cp, sid)
                if not cp.supplying:
                    self._driver_event(cp.driver_id, sid, cp.cp_id, "authorized", f"plug in at CP {cp.cp_id}")
            return
        if cp.idle_since is None:
            cp.idle_since = now
            return
        idle = now - cp.idle_since
        if cp.ended is not None:
            if idle >= self.config.completion_wait:
                kwh, eur, why = cp.ended
                self._close(cp, sid, f"CP {cp.cp_id} ended it ({why}) but its completion did not arrive",
                            (kwh, eur), why, review=False)
        elif idle >= self.config.reconcile_grace:
            why = f"CP {cp.cp_id} is not running it (its heartbeat shows {held or 'no session'} for {idle:.0f} s)"
            rec = self.repo.get_session(sid)
            supplied = cp.supplying or cp.seq > 0 or (rec is not None and (rec.status == "supplying"
                                                                           or rec.last_seq > 0))
            if not supplied:
                self._close(cp, sid, why, None, "central_stop", review=True)  # cancelled: nothing to bill
                return
            # It supplied, and its final figures did not reach Central (a supply_ended lost
            # in a link restart). Never bill from the meter Central saw, which may lag: ask
            # the CP again (an Engine answers stop_supply for a finished session with its
            # supply_ended), and its completion, kept until billed, bills it in any case.
            log.info("%s; asking it for its final figures", why)
            if cp.link is not None:
                tell(cp.link, Send(protocol.StopSupply(session_id=sid, reason="central_stop")))
            cp.idle_since = now

    def _check_deadlines(self, now: float) -> None:
        """Every tick: Central's liveness record, and the deadline of sessions whose CP is gone."""
        for closing, since in list(self._closing.items()):
            if now - since > CLOSING_TIMEOUT:
                log.warning("Central's own close of session %s did not produce a ticket in %g s; "
                            "it will be tried again", closing, CLOSING_TIMEOUT)
                del self._closing[closing]
        self._ensure_run()
        wall = time.time()
        if self._run_id is not None and wall - self._alive_at >= 1.0:
            self._alive_at = wall
            self.repo.mark_alive(self._run_id, wall)
        for cp in self.cps.values():
            sid = cp.session_id
            if sid is None or (cp.link is not None and cp.alive):
                continue  # (the cheap test first: this runs for every CP ten times a second)
            if sid in self._closing or any(p.session_id == sid for p in self._pending.values()):
                continue
            if cp.lost_since is None:
                cp.lost_since = now
            elif now - cp.lost_since >= self.config.lost_deadline:
                figures = cp.ended[:2] if cp.ended else None
                self._close(cp, sid, f"CP {cp.cp_id} has been gone for {now - cp.lost_since:.0f} s", figures,
                            cp.ended[2] if cp.ended else "monitor_lost", review=True)

    def _close(self, cp: CpView, sid: str, why: str, figures: tuple[float, float] | None, end_reason: str,
               *, review: bool) -> str:
        """Central ends a live session itself. Never supplied (authorised, no telemetry,
        no figures): cancelled, no bill, the CP told to drop it. Otherwise billed through
        the session actor with ``figures`` (the CP's supply_ended) or the last checkpoint;
        a completion arriving later is a replay of that ticket."""
        rec = self.repo.get_session(sid)
        if rec is None or rec.status not in ("authorized", "supplying"):
            self._on_supply_finished(cp.cp_id, sid)
            return f"session {sid} is not live"
        self._unconfirmed.discard(sid)
        cp.idle_since = None
        if figures is None and rec.status == "authorized" and max(cp.seq, rec.last_seq) == 0 and not cp.supplying:
            unanswered = self.repo.pending_request_of(sid)  # Central died before the CP answered it
            self.repo.cancel_session(sid, why, time.time(), by="central")  # ...which denies that request
            self.repo.audit("central", cp.cp_id, "session_cancelled", f"{sid}: {why}")
            self._cancel_at_cp(cp.cp_id, sid, why)
            self._driver_event(rec.driver_id, sid, cp.cp_id, "denied", f"session cancelled: {why}")
            if unanswered is not None:
                self._to_driver(rec.driver_id, protocol.ChargeResponse(
                    driver_id=rec.driver_id, correlation_id=unanswered.correlation_id, status="denied",
                    cp_id=cp.cp_id, session_id=sid, reason=f"session cancelled: {why}"[:protocol.REASON_MAX_LEN]))
            self._on_supply_finished(cp.cp_id, sid)
            self._note(f"Session {sid} at CP {cp.cp_id} cancelled: {why}")
            return f"session {sid} cancelled (nothing was supplied)"
        kwh, eur = figures if figures is not None else (max(cp.energy_kwh, rec.energy_kwh),
                                                        max(cp.cost_eur, rec.cost_eur))
        reason = end_reason if end_reason in protocol.END_REASONS else "central_stop"
        if review:
            self.repo.flag_session_review(sid, f"closed by Central: {why}")
        else:
            self.repo.audit("central", cp.cp_id, "session_closed", f"{sid}: {why}")
        if cp.link is not None and not cp.ended:
            tell(cp.link, Send(protocol.StopSupply(session_id=sid, reason="central_stop")))
        self._closing[sid] = time.monotonic()
        self._start_session_actor(rec)
        completion = protocol.ChargeCompletion(cp_id=cp.cp_id, session_id=sid, driver_id=rec.driver_id,
                                               energy_kwh=kwh, cost_eur=eur, end_reason=reason)
        if not self.directory.tell(f"session:{sid}", completion):
            self._closing.pop(sid, None)
            return f"session {sid}: its session actor is not running; try again"
        self._driver_event(rec.driver_id, sid, cp.cp_id, "stopped", why)
        self._note(f"Central closed session {sid} at CP {cp.cp_id}: {why} ({kwh:.3f} kWh, {eur:.2f} €)")
        return f"session {sid} closed and billed: {kwh:.3f} kWh, {eur:.2f} €"

    def _close_command(self, sid: str, who: str) -> str:
        """The operator's last resort (``close SESSION_ID``), audited."""
        self.repo.audit(who, sid, "operator_close", "")
        for corr, p in list(self._pending.items()):
            if p.session_id == sid:
                self._finish_pending(corr, False, f"closed by the operator ({who})", stop_cp=True)
                return f"session {sid} cancelled while waiting for the CP"
        cp = self._live.get(sid)
        if cp is None:
            return f"no live session {sid}"
        if sid in self._closing:
            return f"session {sid} is already being closed"
        figures = cp.ended[:2] if cp.ended else None
        return self._close(cp, sid, f"closed by the operator ({who})", figures,
                           cp.ended[2] if cp.ended else "central_stop", review=True)

    def _tell_cp_billed(self, cp_id: str, session_id: str) -> None:
        """The ticket exists: the CP may stop republishing its completion."""
        self._closing.pop(session_id, None)
        cp = self.cps.get(cp_id)
        if cp is not None:
            if cp.session_id == session_id:
                cp.ended, cp.idle_since = None, None
            if cp.link is not None:
                tell(cp.link, Send(protocol.SessionBilled(session_id=session_id, cp_id=cp_id)))

    def _on_billing_query(self, cp: CpView, link: pykka.ActorRef[Any], msg: protocol.BillingQuery) -> None:
        ticket = self.repo.get_ticket(msg.session_id)
        session = self.repo.get_session(msg.session_id) if ticket is None else None
        # Settled: billed, or refused by the CP itself (never billed, so the Engine
        # must stop republishing it). A session Central cancelled on its own is not
        # settled until its completion is billed (the CP may have supplied it).
        refused = session is not None and session.status == "cancelled" and session.cancelled_by != "central"
        owner = ticket.cp_id if ticket is not None else session.cp_id if session is not None else None
        if (ticket is not None or refused) and owner == cp.cp_id:
            tell(link, Send(protocol.SessionBilled(session_id=msg.session_id, cp_id=cp.cp_id)))

    def _ensure_run(self) -> None:
        if self._run_id is None:
            self._run_id, self._down_since = self.repo.start_run(self._up_since)
            self._alive_at = self._up_since

    def _request_expired(self, item: Inbound) -> str | None:
        """Was this charge request appended while Central was down? (SPEC §3: such
        requests are not accepted.) The producer's clock is not trusted, and Tansu
        has no LogAppendTime; Central uses its own record of its downtime instead:
        after a restart that followed a real downtime (the previous run's last
        ``alive_at`` is older than ``request_max_age`` before this run's start),
        the records the requests pump delivers within ``request_max_age`` of its
        first ``PumpUp`` *and* that were already in the log when Central came
        up are the backlog of the downtime. "Already in the log" is judged with
        Central's own receive time: a record received in the first second after
        the pump was positioned was there before (the pump fetches the backlog
        at once). See docs/flows.md, "Session lifecycle"."""
        self._ensure_run()
        if self._down_since is None or self._requests_up is None:
            return None
        downtime = self._up_since - self._down_since
        if downtime < self.config.request_max_age:
            return None  # a quick restart: requests waiting in Kafka are still fresh enough
        if time.monotonic() - self._requests_up > 1.0:
            return None
        return (f"request expired: it was sent while Central was unavailable (down for {downtime:.0f} s); "
                "please ask again")

    # --- drivers -----------------------------------------------------------------
    def _on_driver_record(self, item: Inbound) -> SetAside | None:
        """Handle one driver_requests record; a record that can never be handled is set aside (dead-lettered)."""
        if item.message is None:  # undecodable (the pump sets these aside itself): item.error says why
            return SetAside(item, f"cannot decode: {item.error}")
        msg = item.message
        if not isinstance(msg, protocol.Signed) and type(msg) not in self.DRIVER_HANDLERS:
            return SetAside(item, f"a {msg.TYPE} record does not belong on driver_requests")
        checked = self._driver_auth.check(msg)  # a signed request's inner one, or why not (audited)
        if isinstance(checked, Denial):
            self._deny_driver(checked)
            return None  # decodable, only not allowed: answered, not set aside
        handler = self.DRIVER_HANDLERS.get(type(checked))
        if handler is None:
            return SetAside(item, f"a {checked.TYPE} record does not belong on driver_requests")
        handler(self, checked, item)
        return None

    def _deny_driver(self, denial: Denial) -> None:
        """Answer a request that is not authenticated with its own response, status denied
        (actors/driver_auth.py). Nothing else happens: no driver row, no session, no stored
        answer. A charge request whose (driver, correlation id) was answered before keeps that one
        answer (e.g. a redelivery after a restart, now older than --signature-max-age): it is sent
        again, as to any redelivery; the driver's partition already had it."""
        req = denial.request
        if isinstance(req, protocol.ChargeRequest) and req.driver_id == denial.driver_id \
                and self._answer_again(req):
            return
        for answer in denial_answers(denial):
            self._to_driver(denial.driver_id, answer)

    def _on_dead_letter(self, d: DeadLettered) -> None:
        """A record went to a dead-letter topic: a fault the operator sees in the panel and the log,
        and an audit line ``record_rejected`` (at most one a second per topic and key, with a count)."""
        where = f" (partition {d.partition}, offset {d.offset})" if d.offset is not None else ""
        slot = f"{d.topic}|{d.key}"
        now = time.monotonic()
        last, count = self._dead_audited.get(slot, (0.0, 0))
        count += 1
        second = int(now)
        if second != self._dead_second:  # a new second: say how many the global budget held back
            if self._dead_held:
                self.repo.audit("central", "*", "record_rejected",
                                f"{self._dead_held} more rejected record(s) not audited one by one (a flood)",
                                params={"count": self._dead_held})
            self._dead_second, self._dead_spent, self._dead_held = second, 0, 0
        if now - last < REJECTED_AUDIT_EVERY:
            self._dead_audited[slot] = (last, count)
        elif self._dead_spent >= DEAD_AUDIT_PER_SECOND:  # keys are the sender's choice: a global bound too
            self._dead_held += count
            self._dead_audited[slot] = (now, 0)
        else:
            if len(self._dead_audited) > 10_000:  # bounded: a flood of distinct keys forgets the oldest
                self._dead_audited.pop(next(iter(self._dead_audited)))
            self._dead_audited[slot] = (now, 0)
            self._dead_spent += 1
            self.repo.audit("central", d.key or "unknown", "record_rejected", d.reason,
                            params={"topic": d.topic, "partition": d.partition, "offset": d.offset,
                                    "component": d.component, "count": count})
        self._note(f"FAULT: a record on {d.topic}{where}, key {d.key}, was set aside in {d.topic}.dead: "
                   f"{protocol.clip(d.reason, 160)}")

    def _on_list_request(self, msg: protocol.AvailableCpsRequest, _item: Inbound) -> None:
        """One page of the CPs, by cp_id: those after ``msg.after``, at most ``msg.limit`` (PAGE_SIZE)."""
        for cp in self.cps.values():
            self._refresh(cp)
        limit = msg.limit or protocol.PAGE_SIZE
        listed = sorted((c for c in self.cps.values() if protocol.is_id(c.cp_id)), key=lambda c: c.cp_id)
        rest = [c for c in listed if msg.after is None or c.cp_id > msg.after]
        page = rest[:limit]
        cps = tuple(protocol.CpInfo(cp_id=c.cp_id, location=protocol.clip(c.location, protocol.LOCATION_MAX_LEN),
                                    price_eur_kwh=c.price, state=c.state) for c in page)
        more = len(rest) > limit
        self._to_driver(msg.driver_id, protocol.AvailableCpsResponse(
            driver_id=msg.driver_id, correlation_id=msg.correlation_id, charging_points=cps, more=more,
            next_after=page[-1].cp_id if more else None, total=len(listed)))

    def _on_charge_request(self, msg: protocol.ChargeRequest, item: Inbound) -> None:
        """A (driver_id, correlation_id) gets one answer, ever: its first (stored with the
        session or the denial), re-sent to a redelivered request, never a contradicting one."""
        d, cp_id, corr = msg.driver_id, msg.cp_id, msg.correlation_id
        if self._answer_again(msg):
            return
        self.repo.ensure_driver(d)
        denial: str | None = self._request_expired(item)  # SPEC §3: none accepted while Central was down
        if denial is None:
            denial = self._authorize(cp_id, d, "driver", corr)
        if denial:
            denial = self.repo.record_denial(d, corr, cp_id, denial, time.time()).reason or denial
            self._note(f"Driver {d} denied at {cp_id}: {denial}")
            self._to_driver(d, protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="denied",
                                                       cp_id=cp_id, reason=denial))

    def _answer_again(self, msg: protocol.ChargeRequest) -> bool:
        """A redelivered charge_request (producer retry, replay after a failed commit or a
        restart): re-send its stored answer. 'pending' (the CP has not answered): nothing now
        if this Central is still waiting (the answer follows); after a restart, the answer
        the session's state gives. False for a new request."""
        d, corr = msg.driver_id, msg.correlation_id
        stored = self.repo.charge_request(d, corr)
        if stored is None:
            return False
        status, sid, reason = stored.status, stored.session_id, stored.reason
        if status == "pending":
            if any(p.request_correlation == corr and p.driver_id == d and p.origin == "driver"
                   for p in self._pending.values()):
                log.info("Charge request %s of driver %s again: its answer follows when CP %s answers",
                         corr, d, stored.cp_id)
                return True
            if sid in self._unconfirmed:
                # reloaded after a restart and not yet shown by the CP: the CP's next heartbeat
                # or completion decides, and the request is answered then (authorized or denied)
                log.info("Charge request %s of driver %s again: its answer follows when CP %s confirms or "
                         "drops session %s", corr, d, stored.cp_id, sid)
                return True
            session = self.repo.get_session(sid) if sid else None
            if session is None or session.status == "cancelled":
                status, reason = "denied", (session.end_reason if session else None) or "the request was cancelled"
            else:
                status = "authorized"
        log.info("Charge request %s of driver %s again: answered %s as the first time", corr, d, status)
        self._to_driver(d, protocol.ChargeResponse(
            driver_id=d, correlation_id=corr, status="authorized" if status == "authorized" else "denied",
            cp_id=stored.cp_id, session_id=sid if status == "authorized" else None,
            reason=None if status == "authorized" else reason))
        return True

    def _on_stop_request(self, msg: protocol.StopChargingRequest, _item: Inbound) -> None:
        d, sid, corr = msg.driver_id, msg.session_id, msg.correlation_id
        cp = self._live.get(sid)
        if cp is None or cp.driver_id != d:
            self._to_driver(d, protocol.StopChargingResponse(driver_id=d, correlation_id=corr, status="error",
                                                             session_id=sid, reason=f"no live session {sid} of yours"))
        elif cp.link is None:
            self._to_driver(d, protocol.StopChargingResponse(
                driver_id=d, correlation_id=corr, status="error", session_id=sid,
                reason=f"CP {cp.cp_id} is not connected; the supply ends when it reports"))
        else:
            tell(cp.link, Send(protocol.StopSupply(session_id=sid, reason="driver_stop")))
            self._to_driver(d, protocol.StopChargingResponse(driver_id=d, correlation_id=corr, status="ok",
                                                             session_id=sid))
            self._note(f"Driver {d} asked to stop session {sid}")

    def _on_driver_hello(self, msg: protocol.DriverHello, _item: Inbound) -> None:
        d = msg.driver_id
        self.repo.ensure_driver(d)
        active = None
        for sid, cp in self._live.items():
            if cp.driver_id == d:
                active = protocol.ActiveSessionInfo(session_id=sid, cp_id=cp.cp_id, energy_kwh=cp.energy_kwh,
                                                    cost_eur=cp.cost_eur, state=cp.state)
        tickets = tuple(
            protocol.TicketInfo(session_id=t.session_id, cp_id=t.cp_id, price_eur_kwh=t.price_eur_kwh,
                                energy_kwh=t.energy_kwh, cost_eur=t.cost_eur,
                                started_at=t.started_at or t.issued_at, ended_at=t.ended_at or t.issued_at,
                                end_reason=t.end_reason or "unplugged")
            for t in self.repo.unacked_tickets(d)[:protocol.LIST_MAX_ITEMS])  # the rest after their acks
        self._to_driver(d, protocol.DriverHelloResponse(driver_id=d, correlation_id=msg.correlation_id,
                                                        tickets=tickets, active_session=active))

    def _on_ticket_ack(self, msg: protocol.TicketAck, _item: Inbound) -> None:
        self.repo.ack_ticket(msg.driver_id, msg.session_id)

    def _to_driver(self, driver_id: str, message: protocol.Message) -> None:
        self.directory.tell("publisher", Publish("driver_responses", driver_id, message))

    def _driver_event(self, driver_id: str | None, sid: str, cp_id: str, event: str, detail: str | None) -> None:
        if driver_id:
            self._to_driver(driver_id, protocol.SupplyEvent(driver_id=driver_id, session_id=sid, cp_id=cp_id,
                                                            event=event, detail=detail))

    # --- operator ------------------------------------------------------------
    def _on_console(self, text: str) -> None:
        words = text.split()
        if not words:
            return
        command, args = words[0].lower(), words[1:]
        if command in ("stop", "resume") and len(args) == 1:
            self._admin(command, None if args[0].lower() == "all" else args[0], who="console")
        elif command == "close" and len(args) == 1:
            self._operator("close", "console", session_id=args[0])
            log.info("%s", self._close_command(args[0], "console"))
        elif command == "status":
            for c in sorted(self.cps.values(), key=lambda c: c.cp_id):
                log.info("%s %-12s %s %s", c.cp_id, c.state, c.location,
                         f"session {c.session_id}" if c.session_id else "")
        elif command == "revoke" and args:
            self._revoke_command(args[0], " ".join(args[1:]), "console")
        elif command == "weather" and not args:
            for line in console_lines(self._weather_rows()):
                self._say(line)
        elif command == "audit" and len(args) == 2 and args[0] == "export":
            self._say(self._export_audit(args[1], "console"))
        elif command == "audit" and len(args) <= 1 and (not args or args[0].isdigit()):
            self._show_audit(int(args[0]) if args else 20)
        elif command == "enroll-driver" and len(args) == 1:
            self._enroll_driver(args[0], "console")
        else:
            self._say(CONSOLE_HELP)

    def _operator(self, command: str, who: str, *, address: str | None = None, **params: Any) -> None:
        """Every operator command is audited with its parameters (never a secret) and, when it came
        over the network, the address it came from."""
        self.repo.audit("central", "operator", "operator_command", command, address=address,
                        params={"command": command, "via": who, **params})

    def _say(self, text: str) -> None:
        """An answer to the operator: in the log and among the panel's messages."""
        self._note(text)

    def _revoke_command(self, cp_id: str, reason: str, who: str, address: str | None = None) -> OperatorResult:
        """``revoke CP_ID [REASON]``: the gatekeeper revokes every key of the CP and closes its link;
        the CP is out of service until its Monitor authenticates again (automatically)."""
        cp_id, reason = protocol.clip(cp_id, protocol.ID_MAX_LEN), protocol.clip(" ".join(reason.split()), 200)
        self._operator("revoke", who, cp_id=cp_id, reason=reason or None, address=address)
        if cp_id not in self.cps and (not protocol.is_id(cp_id) or self.repo.credential("cp", cp_id) is None):
            return self._result(NOT_FOUND, f"Cannot revoke: there is no CP {cp_id}.")
        why = "key revoked by the operator" + (f": {reason}" if reason else "")
        if not self.directory.tell("gatekeeper", RevokeCp(cp_id, why, "operator")):
            return self._result(UNAVAILABLE, f"Cannot revoke the keys of CP {cp_id} now: the gatekeeper is "
                                             "restarting; try again.")
        return self._result(OK, f"Revoking the keys of CP {cp_id}: it is out of service until its Monitor "
                                "authenticates again.", (cp_id,))

    def _result(self, status: str, text: str, cp_ids: tuple[str, ...] = ()) -> OperatorResult:
        """An operator command's answer, also among the panel's messages (and so in the log)."""
        self._say(text)
        return OperatorResult(status, text, cp_ids)

    def _on_keys_revoked(self, msg: KeysRevoked) -> None:
        """The gatekeeper revoked a CP's keys (the operator, or a deregistration): close its link."""
        cp = self.cps.get(msg.cp_id)
        if cp is not None and cp.link is not None:
            tell(cp.link, Close(msg.reason))
        if msg.deregistered:
            self._say(f"CP {msg.cp_id} was deregistered: its keys are revoked and its link closed")
        else:
            self._say(f"CP {msg.cp_id}: {len(msg.key_ids)} key(s) revoked ({msg.reason}); out of service until "
                      "its Monitor authenticates again")

    def _on_cp_registered(self, cp_id: str) -> None:
        rec = self.repo.get_cp(cp_id)
        if rec is None:
            return
        cp = self.cps.get(cp_id)
        if cp is None:
            self.cps[cp_id] = CpView(rec.cp_id, rec.location, rec.price_eur_kwh, stopped=rec.stopped,
                                     weather=self._weather.hold_of(rec.location))
        elif cp.session_id is None:
            cp.location, cp.price = rec.location, rec.price_eur_kwh
            self._apply_stop(cp, cp.stopped, self._weather.hold_of(cp.location))  # a new location, maybe frozen
        self._say(f"CP {cp_id} was registered ({rec.location}, {rec.price_eur_kwh:.2f} €/kWh)")

    def _on_rejected(self, link: pykka.ActorRef[Any], peer: str, reason: str, principal: str | None) -> None:
        """A frame refused at the trust boundary: audited, at most once a second per link (with a count)."""
        urn = link.actor_urn
        now = time.monotonic()
        last, count = self._rejected.get(urn, (0.0, 0))
        count += 1
        if now - last < REJECTED_AUDIT_EVERY:
            self._rejected[urn] = (last, count)
            return
        self._rejected[urn] = (now, 0)
        cp_id = principal or self._by_link.get(urn) or "unknown"
        self.repo.audit("central", cp_id, "frame_rejected", reason, address=address_of(peer) if peer != "?" else None,
                        params={"reason": reason, "count": count})
        if count == 1 or now - last > 60:
            self._note(f"Refused a frame from CP {cp_id}: {protocol.clip(reason, 160)}", fault=True)

    def _show_audit(self, n: int) -> None:
        """``audit [N]``: the latest N audit lines, oldest first, readable."""
        rows = self.repo.recent_audit(max(1, min(n, 1000)))
        if not rows:
            self._say("The audit log is empty")
            return
        self._say(f"The latest {len(rows)} audit lines (time, component, who, address, event, detail):")
        for r in reversed(rows):  # in the log, and the newest among the panel's messages
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
            self._say(f"AUDIT {when} {r.component} {r.subject} {r.address or '-'} {r.event} "
                      f"{protocol.clip(r.detail, 200)}")

    def _export_audit(self, path: str, who: str) -> str:
        self._operator("audit export", who, path=path)
        try:
            with open(path, "w", encoding="utf-8") as out:
                n = self.repo.export_audit(out)
        except OSError as exc:
            return f"Cannot export the audit log to {path}: {exc.strerror or exc}"
        return f"Exported {n} audit lines to {path} (JSON lines)"

    def _enroll_driver(self, driver_id: str, who: str) -> str | None:
        """``enroll-driver DRIVER_ID``: register a driver with a fresh secret, printed once (never logged)."""
        self._operator("enroll-driver", who, driver_id=driver_id)
        if not protocol.is_id(driver_id):
            self._say(f"Cannot enroll {driver_id!r}: not a valid driver id")
            return None
        secret = security.new_secret()
        self.repo.register("driver", driver_id, security.verifier("driver", driver_id, secret), who="operator")
        if who == "console":
            print(f"Driver {driver_id} is enrolled. Its secret, shown only this once: {secret}\n"
                  f"Give it to the driver (EV_DRIVER_SECRET, or a credential file); Central keeps only its hash.",
                  flush=True)
        self._say(f"Driver {driver_id} enrolled (its secret was shown once on the console)")
        return secret

    def _admin(self, action: str, cp_id: str | None, who: str = "api", address: str | None = None) -> OperatorResult:
        """The operator's stop/resume of one CP or all (console and API alike), stored across
        restarts. A stop of a supplying CP ends its supply at the CP (stop_cp), billed as usual.
        A resume clears the operator's stop only: a CP an active weather alert holds stays
        STOPPED (CONFLICT for one CP; for all, the sentence names how many stay out)."""
        if cp_id is not None:
            cp_id = protocol.clip(cp_id, protocol.ID_MAX_LEN)
        self._operator(action, who, cp_id=cp_id or "all", address=address)
        if action not in ("stop", "resume"):
            return self._result(INVALID, f"Unknown operator action {protocol.clip(action, 20)!r}: stop or resume.")
        if cp_id is not None and cp_id not in self.cps:
            return self._result(NOT_FOUND, f"There is no CP {cp_id}.")
        stop = action == "stop"
        targets = list(self.cps.values()) if cp_id is None else [self.cps[cp_id]]
        self.repo.set_cp_stopped(None if cp_id is None else [cp_id], stop)  # kept across restarts
        for cp in targets:
            self._apply_stop(cp, stop, cp.weather)
        ids = tuple(cp.cp_id for cp in targets)
        held = [cp.weather for cp in targets if cp.weather is not None]
        if stop:
            return self._result(OK, f"Stopped {'all CPs' if cp_id is None else f'CP {cp_id}'} (out of service).", ids)
        if cp_id is not None and held:
            return self._result(CONFLICT, f"CP {cp_id} stays out of service: weather alert at "
                                          f"{self._weather.name(held[0])}.", ids)
        if held:
            return self._result(OK, f"Resumed all CPs; {len(held)} stay out of service under a weather alert "
                                    f"({', '.join(sorted({self._weather.name(k) for k in held})[:5])}).",
                                tuple(cp.cp_id for cp in targets if cp.weather is None))
        return self._result(OK, f"Resumed {'all CPs' if cp_id is None else f'CP {cp_id}'} (back in service).", ids)

    def _apply_stop(self, cp: CpView, stopped: bool, weather: str | None) -> bool:
        """The one place a CP's stop decision changes (operator: ``stopped``; a weather alert:
        ``weather``, the key of the alert holding it, or None). The CP hears of it when it is
        taken out of service or put back (stop_cp ends a running supply at the CP, as an
        operator's stop always has); nothing is sent when it stays as it was. True: it changed."""
        was = cp.ordered_stop
        cp.stopped, cp.weather = stopped, weather
        now = cp.ordered_stop
        if was != now and cp.link is not None:
            tell(cp.link, Send(protocol.StopCp(reason=self._stop_reason(cp)) if now else protocol.ResumeCp()))
        self._refresh(cp)
        return was != now

    def _stop_reason(self, cp: CpView) -> str:
        """What a stop_cp says: the weather alert's location and temperature, or the operator's stop."""
        return self._weather.stop_reason(cp.weather) or OPERATOR_STOP

    # --- weather (EV_W) ---------------------------------------------------------------
    def _on_weather(self, outcome: Outcome | OperatorResult) -> OperatorResult:
        """A reading (WeatherAlert: idempotent) or a watch change: when a location's alert changed,
        re-apply the stop rule to the CPs there; say what happened (refusals come as results)."""
        if isinstance(outcome, OperatorResult):
            return outcome
        acted: list[str] = []
        kept: list[str] = []  # held or released by this alert, but out of service anyway (the operator)
        if outcome.alert_changed:
            key = outcome.place.key
            for cp in self.cps.values():
                hold = self._weather.hold_of(cp.location)
                if hold != cp.weather and key in (hold, cp.weather):
                    (acted if self._apply_stop(cp, cp.stopped, hold) else kept).append(cp.cp_id)
        text = outcome.summary(acted, kept)
        if outcome.noted:
            self._note(text, fault=outcome.fault)
        self._dirty = True  # a new reading at least: the weather rows of the next snapshot
        return OperatorResult(OK, text, tuple(sorted(acted)))

    def _weather_rows(self) -> tuple[WeatherRow, ...]:
        return self._weather.rows((c.cp_id, c.location) for c in self.cps.values())

    # --- views ---------------------------------------------------------------------
    def _note(self, text: str, *, fault: bool | None = None) -> None:
        """An application message: in the log and the panel (``fault``: shown as a failure;
        by default, a text marked FAULT_MARK). Each gets the next ``seq`` of this run."""
        fault = FAULT_MARK in text if fault is None else fault
        (log.warning if fault else log.info)("%s", text)
        self._message_seq += 1
        self._messages.append(MessageRow(self._message_seq, time.time(), text, fault))
        self._dirty = True

    def _status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for c in self.cps.values():
            self._refresh(c)
            out[c.cp_id] = {"state": c.state, "location": c.location, "price_eur_kwh": c.price,
                            "session_id": c.session_id, "driver_id": c.driver_id, "energy_kwh": c.energy_kwh,
                            "cost_eur": c.cost_eur, "power_kw": c.power_kw, "connected": c.link is not None,
                            "stopped": c.stopped, "stop_reasons": list(c.stop_reasons), "fault": c.fault}
        return out

    def _snapshot(self) -> PanelSnapshot:
        tiles = tuple(
            CpTile(c.cp_id, c.location, c.price, c.state, c.driver_id if c.supplying else None,
                   c.power_kw if c.supplying else 0.0, c.energy_kwh if c.supplying else 0.0,
                   c.cost_eur if c.supplying else 0.0, c.fault, c.stop_reasons, c.session_id)
            for c in sorted(self.cps.values(), key=lambda c: c.cp_id))
        rows = [RequestRow(p.started, p.driver_id, p.cp_id, "waiting for CP") for p in self._pending.values()]
        for sid, cp in self._live.items():
            if not any(p.session_id == sid for p in self._pending.values()) and cp.driver_id:
                rows.append(RequestRow(self._started.get(sid), cp.driver_id, cp.cp_id,
                                       "supplying" if cp.supplying else "authorised"))
        return PanelSnapshot(tiles, tuple(rows), tuple(self._messages), time.time(), self._weather_rows())

    #: One handler per Monitor message type (after registration).
    FRAME_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        protocol.Heartbeat: _on_heartbeat,
        protocol.FaultNotification: _on_fault,
        protocol.FaultCleared: _on_fault_cleared,
        protocol.SupplyAuthorizationResponse: _on_authorization,
        protocol.SupplyStarted: _on_supply_started,
        protocol.SupplyEnded: _on_supply_ended,
        protocol.CpSupplyRequest: _on_cp_supply_request,
        protocol.ErrorMessage: _on_cp_error,
        protocol.BillingQuery: _on_billing_query,
    }

    #: One handler per driver request type on ``driver_requests``.
    DRIVER_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        protocol.AvailableCpsRequest: _on_list_request,
        protocol.ChargeRequest: _on_charge_request,
        protocol.StopChargingRequest: _on_stop_request,
        protocol.DriverHello: _on_driver_hello,
        protocol.TicketAck: _on_ticket_ack,
    }
