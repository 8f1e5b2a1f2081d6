"""CentralActor: the CP registry, the CP state machine, authorisation and admin.

Inputs, all as messages in one mailbox (so no locks and no races):
* ``FrameIn``/``LinkUp``/``LinkDown`` from Monitor connections (socket adapter);
* ``Delivery`` of ``driver_requests`` from its Kafka pump (asked: the pump
  commits only after this actor answered, i.e. after the DB writes);
* ``ProgressBatch`` (newest telemetry per session, one per Kafka poll) from the router;
* ``SupplyFinished``/``SessionBilled`` from session actors;
* ``ConsoleLine`` commands typed into Central's terminal;
* its own timers: life-message check, authorisation deadlines, panel refresh.

Each message type has its own handler method: ``on_receive`` dispatches
actor messages, :attr:`CentralActor.FRAME_HANDLERS` the Monitor's frames and
:attr:`CentralActor.DRIVER_HANDLERS` the driver requests, by protocol type.

State shown to people comes from :func:`actors.cp_state.derive_state` (the
same rule the Monitor uses), so the panel cannot disagree with the rules.

After a restart (its supervisor is rest_for_one; see
``supervisors/central_system.py``) this actor knows only what the database
says: CPs, prices and live sessions. Its Monitor connections restart after
it, so every Monitor reconnects and registers again, and that is how it
re-learns which CP is on which link.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pykka

from actors.console import ConsoleLine
from actors.cp_state import CpState, derive_state
from actors.messages import MarkSupplying, ProgressBatch, Ready, SessionBilled, SessionProgress, SupplyFinished
from actors.panel import CpTile, PanelSnapshot, RequestRow
from actors.runtime import Directory, SupervisedActor, Supervision, Ticker, schedule, tell
from actors.session import SessionActor
from persistence import Conflict, Repository, SessionRecord
from transport import protocol
from transport.kafka import Delivery, Inbound, Publish, PumpDown, PumpUp
from transport.link import Close, FrameIn, LinkDown, LinkUp, Send

log = logging.getLogger("evcharging.central")

ACTIVE, DISCONNECTED = CpState.ACTIVE, CpState.DISCONNECTED


@dataclass(frozen=True, slots=True)
class CentralConfig:
    """Central's policies and timings (all flags of EV_Central)."""

    db_path: str
    enroll: str = "open"  # "open": unknown CPs are enrolled; "closed": denied
    default_price: float = 0.30
    default_location: str = "unknown"
    life_timeout: float = 2.5  # two missed life messages (1 s apart) and half a period
    authorize_timeout: float = 5.0
    panel_interval: float = 0.5
    life_check_interval: float = 0.1  # how late a silent CP may be noticed after its timeout
    request_max_age: float = 10.0  # a charge request older than this was sent while Central was away


@dataclass(eq=False)
class CpView:
    """What Central knows about one CP (mutable, private to the actor)."""

    cp_id: str
    location: str
    price: float
    link: pykka.ActorRef[Any] | None = None
    last_heartbeat: float = 0.0
    engine_ok: bool | None = None
    stopped: bool = False
    session_id: str | None = None
    driver_id: str | None = None
    supplying: bool = False
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    seq: int = 0  # newest telemetry seq shown for the live session (duplicates and late ones are ignored)
    power_kw: float = 0.0
    fault: str | None = None
    state: CpState = DISCONNECTED

    def derive(self, now: float, life_timeout: float) -> CpState:
        """Connected means: a Monitor link and a life message within ``life_timeout``."""
        connected = self.link is not None and now - self.last_heartbeat <= life_timeout
        return derive_state(connected=connected, engine_ok=self.engine_ok, supplying=self.supplying,
                            stopped=self.stopped)


@dataclass(slots=True)
class _Pending:
    """An authorisation waiting for the CP's answer."""

    session_id: str
    cp_id: str
    driver_id: str
    origin: str  # "driver" or "cp"
    request_correlation: str
    link: pykka.ActorRef[Any]
    timer: threading.Timer | None = None
    started: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class _Tick:
    pass


@dataclass(frozen=True, slots=True)
class _AuthTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class CentralStatus:
    """Ask: a dict snapshot of every CP (for tests, the launcher and tools)."""


@dataclass(frozen=True, slots=True)
class AdminCommand:
    """Stop or resume one CP (``cp_id``) or all of them (``cp_id=None``)."""

    action: str  # "stop" | "resume"
    cp_id: str | None = None


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
        self._messages: deque[str] = deque(maxlen=12)
        self._ticker: Ticker | None = None
        self._dirty = True

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        self._repo = Repository(self.config.db_path)
        self.repo.set_all_cp_states(DISCONNECTED)
        for rec in self.repo.list_cps():
            self.cps[rec.cp_id] = CpView(rec.cp_id, rec.location, rec.price_eur_kwh)
        reloaded = self.repo.live_sessions()
        for s in reloaded:
            self._adopt_session(s)
        self._note(f"Central started: {len(self.cps)} CPs loaded, {len(reloaded)} live sessions reloaded")
        # One ticker for both duties: life deadlines every life_check_interval
        # (so a silent CP shows DISCONNECTED within ~0.1 s of its timeout) and
        # a panel snapshot every panel_interval when something changed.
        self._ticker = Ticker(min(self.config.life_check_interval, self.config.panel_interval), self.actor_ref,
                              _Tick(), name="central-tick")
        self._next_snapshot = 0.0

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        for p in self._pending.values():
            if p.timer:
                p.timer.cancel()
        if self._repo is not None:
            self._repo.close()

    @property
    def repo(self) -> Repository:
        assert self._repo is not None
        return self._repo

    # --- dispatch --------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case FrameIn(link, msg):
                self._on_frame(link, msg)
            case Delivery(items):
                for item in items:
                    self._on_driver_record(item)
                return True
            case ProgressBatch(items):
                for p in items:
                    self._on_progress(p)
            case SupplyFinished(cp_id, session_id):
                return self._on_supply_finished(cp_id, session_id)
            case SessionBilled():
                self._on_billed(message)
            case LinkUp():
                pass  # a Monitor connected; it becomes a CP when it registers
            case PumpUp(_pump, name):
                log.info("Central: Kafka consumer %s is reading", name)
            case PumpDown(_pump, name, reason):
                log.info("Central: Kafka consumer %s is down (%s); its supervisor starts another", name, reason)
            case LinkDown(link, _peer, reason):
                self._on_link_down(link, reason)
            case _Tick():
                self._on_tick()
            case _AuthTimeout(corr):
                self._on_auth_timeout(corr)
            case ConsoleLine(text):
                self._on_console(text)
            case AdminCommand(action, cp_id):
                return self._admin(action, cp_id)
            case CentralStatus():
                return self._status()
            case Ready():
                return True
            case _:
                log.warning("Central ignored an unexpected %s", type(message).__name__)
        return None

    # --- Monitor side ---------------------------------------------------------
    def _on_frame(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        if isinstance(msg, protocol.RegisterRequest):
            self._register(link, msg)
            return
        cp = self._cp_of(link)
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
        cp.engine_ok = msg.engine_ok
        if msg.engine_ok:
            cp.fault = None
        self._refresh(cp)
        if was == DISCONNECTED and cp.state != DISCONNECTED:
            self._note(f"CP {cp.cp_id} is {cp.state}")

    def _on_fault(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.FaultNotification) -> None:
        cp.engine_ok = False
        cp.fault = msg.reason
        self._note(f"CP {cp.cp_id} reported a fault: {msg.reason}")
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
            log.info("Late authorisation answer from CP %s for %s ignored", cp.cp_id, resp.session_id)
            return
        self._finish_pending(resp.correlation_id, resp.accepted, resp.reason or "the CP refused")

    def _on_supply_ended(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.SupplyEnded) -> None:
        if cp.session_id == msg.session_id:
            cp.supplying = False
            self._note(f"CP {cp.cp_id} ended supply {msg.session_id} ({msg.end_reason})")
            self._refresh(cp)

    def _on_cp_supply_request(self, cp: CpView, link: pykka.ActorRef[Any], msg: protocol.CpSupplyRequest) -> None:
        denial = self._authorize(cp.cp_id, msg.driver_id, "cp", msg.correlation_id)
        if denial:
            tell(link, Send(protocol.CpSupplyResponse(correlation_id=msg.correlation_id, cp_id=cp.cp_id,
                                                     status="denied", reason=denial)))

    def _on_cp_error(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.ErrorMessage) -> None:
        log.warning("CP %s says: %s", cp.cp_id, msg.reason)

    def _register(self, link: pykka.ActorRef[Any], req: protocol.RegisterRequest) -> None:
        rec = self.repo.get_cp(req.cp_id)
        if rec is None:
            if self.config.enroll != "open":
                reason = f"unknown CP {req.cp_id} (enrolment is closed)"
                tell(link, Send(protocol.RegisterResponse(correlation_id=req.correlation_id, status="denied",
                                                          reason=reason)))
                self._note(f"Refused registration of {req.cp_id}: {reason}")
                return
            rec = self.repo.enroll_cp(req.cp_id, req.location or self.config.default_location,
                                      self.config.default_price)
            self.repo.audit("central", req.cp_id, "enrolled", rec.location)
            self._note(f"Enrolled new CP {req.cp_id} at {rec.location}, {rec.price_eur_kwh:.2f} €/kWh")
        cp = self.cps.get(rec.cp_id)
        if cp is None:
            cp = self.cps[rec.cp_id] = CpView(rec.cp_id, rec.location, rec.price_eur_kwh)
        if cp.link is not None and cp.link.actor_urn != link.actor_urn:
            old = cp.link
            self._by_link.pop(old.actor_urn, None)
            tell(old, Close("replaced by a new connection of the same CP"))
        cp.link = link
        cp.engine_ok = None  # known with the first heartbeat
        self._by_link[link.actor_urn] = cp.cp_id
        tell(link, Send(protocol.RegisterResponse(correlation_id=req.correlation_id, status="accepted",
                                                 price_eur_kwh=cp.price, location=cp.location)))
        if cp.stopped:
            tell(link, Send(protocol.StopCp(reason="stopped by Central")))
        self._note(f"CP {cp.cp_id} registered ({cp.location})")
        self._refresh(cp)

    def _cp_of(self, link: pykka.ActorRef[Any]) -> CpView | None:
        cp_id = self._by_link.get(link.actor_urn)
        return self.cps.get(cp_id) if cp_id else None

    def _on_link_down(self, link: pykka.ActorRef[Any], reason: str) -> None:
        cp_id = self._by_link.pop(link.actor_urn, None)
        cp = self.cps.get(cp_id) if cp_id else None
        if cp is None or cp.link is None or cp.link.actor_urn != link.actor_urn:
            return
        cp.link = None
        self._note(f"CP {cp.cp_id} lost its Monitor ({reason})")
        if cp.session_id:
            self._driver_event(cp.driver_id, cp.session_id, cp.cp_id, "fault",
                               f"CP {cp.cp_id} lost its monitor; if it is not back soon the supply ends "
                               "and you get the ticket")
        for corr, p in list(self._pending.items()):
            if p.cp_id == cp.cp_id:
                self._finish_pending(corr, accepted=False, reason=f"CP {cp.cp_id} disconnected")
        self._refresh(cp)

    def _on_tick(self) -> None:
        now = time.monotonic()
        lost = False
        for cp in self.cps.values():
            before = cp.state
            if before == DISCONNECTED or cp.derive(now, self.config.life_timeout) == before:
                continue
            self._refresh(cp, now)
            lost = lost or cp.state == DISCONNECTED
            if cp.state == DISCONNECTED and cp.link is not None:
                self._note(f"CP {cp.cp_id} missed its life messages for {self.config.life_timeout:g} s: DISCONNECTED")
                if cp.session_id:
                    self._driver_event(cp.driver_id, cp.session_id, cp.cp_id, "fault",
                                       f"CP {cp.cp_id} stopped answering; you will get the ticket when it reports")
        if self._dirty and (lost or now >= self._next_snapshot):
            self._dirty = False
            self._next_snapshot = now + self.config.panel_interval - 0.01
            self.directory.tell("panel", self._snapshot())

    def _refresh(self, cp: CpView, now: float | None = None) -> None:
        state = cp.derive(time.monotonic() if now is None else now, self.config.life_timeout)
        if state != cp.state:
            cp.state = state
            self.repo.set_cp_state(cp.cp_id, state)
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
        try:
            self.repo.open_session(session_id, cp_id, driver_id, cp.price, time.time())
        except Conflict as exc:
            return str(exc)
        assert cp.link is not None
        corr = protocol.new_id()
        pending = _Pending(session_id, cp_id, driver_id, origin, request_corr, cp.link)
        self._started[session_id] = pending.started
        pending.timer = schedule(self.config.authorize_timeout, self.actor_ref, _AuthTimeout(corr))
        self._pending[corr] = pending
        cp.session_id, cp.driver_id = session_id, driver_id
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

    def _finish_pending(self, corr: str, accepted: bool, reason: str) -> None:
        p = self._pending.pop(corr)
        if p.timer:
            p.timer.cancel()
        cp = self.cps[p.cp_id]
        if accepted:
            rec = self.repo.get_session(p.session_id)
            assert rec is not None
            self._start_session_actor(rec)
            self._driver_event(p.driver_id, p.session_id, p.cp_id, "authorized", f"plug in at CP {p.cp_id}")
            self._note(f"CP {p.cp_id} authorised session {p.session_id} for driver {p.driver_id}")
        else:
            self.repo.cancel_session(p.session_id, reason, time.time())
            self._live.pop(p.session_id, None)
            self._started.pop(p.session_id, None)
            if cp.session_id == p.session_id:
                cp.session_id = cp.driver_id = None
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

    def _on_auth_timeout(self, corr: str) -> None:
        p = self._pending.get(corr)
        if p is not None:
            self._finish_pending(corr, False, f"CP {p.cp_id} did not answer within {self.config.authorize_timeout:g} s")

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
        cp.session_id, cp.driver_id = rec.session_id, rec.driver_id
        cp.energy_kwh, cp.cost_eur, cp.seq = rec.energy_kwh, rec.cost_eur, rec.last_seq
        cp.supplying = rec.status == "supplying"
        self._live[rec.session_id] = cp
        self._start_session_actor(rec)

    def _on_supply_started(self, cp: CpView, _link: pykka.ActorRef[Any], msg: protocol.SupplyStarted) -> None:
        sid = msg.session_id
        if cp.session_id != sid:
            log.warning("CP %s started unknown session %s", cp.cp_id, sid)
            return
        cp.supplying = True
        self.directory.tell("ledger", MarkSupplying(sid, time.time()))
        self._driver_event(cp.driver_id, sid, cp.cp_id, "plugged_in", f"supplying at CP {cp.cp_id}")
        self._note(f"CP {cp.cp_id} is supplying driver {cp.driver_id}")
        self._refresh(cp)

    def _on_progress(self, p: SessionProgress) -> None:
        cp = self._live.get(p.session_id)
        if cp is None or p.seq <= cp.seq:
            return
        cp.seq = p.seq
        cp.energy_kwh, cp.cost_eur, cp.power_kw = p.energy_kwh, p.cost_eur, p.power_kw
        if not cp.supplying and cp.session_id == p.session_id:
            cp.supplying = True  # telemetry proves the plug-in even if supply_started was lost
            self._refresh(cp)
        self._dirty = True

    def _on_supply_finished(self, cp_id: str, session_id: str) -> str:
        cp = self.cps.get(cp_id)
        if cp is None:
            return DISCONNECTED
        if cp.session_id == session_id:
            cp.session_id = cp.driver_id = None
            cp.supplying = False
            cp.power_kw = 0.0
        self._live.pop(session_id, None)
        self._started.pop(session_id, None)
        self._refresh(cp)
        return cp.state

    def _on_billed(self, b: SessionBilled) -> None:
        self._live.pop(b.session_id, None)
        self._started.pop(b.session_id, None)
        cp = self.cps.get(b.cp_id)
        if cp is not None and cp.session_id == b.session_id:
            cp.session_id = cp.driver_id = None
            cp.supplying = False
            self._refresh(cp)
        if b.created:
            self._note(f"Ticket {b.session_id}: driver {b.driver_id} at {b.cp_id}, {b.energy_kwh:.3f} kWh, "
                       f"{b.cost_eur:.2f} € ({b.end_reason})")

    # --- drivers -----------------------------------------------------------------
    def _on_driver_record(self, item: Inbound) -> None:
        if item.message is None:  # undecodable: item.error says why
            log.warning("Ignored a bad driver request (key %s): %s", item.key, item.error)
            return
        handler = self.DRIVER_HANDLERS.get(type(item.message))
        if handler is None:
            log.warning("Ignored a %s record on driver_requests: not a driver request", item.message.TYPE)
            return
        handler(self, item.message, item)

    def _on_list_request(self, msg: protocol.AvailableCpsRequest, _item: Inbound) -> None:
        now = time.monotonic()
        for cp in self.cps.values():
            self._refresh(cp, now)
        cps = tuple(protocol.CpInfo(cp_id=c.cp_id, location=c.location, price_eur_kwh=c.price, state=c.state)
                    for c in sorted(self.cps.values(), key=lambda c: c.cp_id))
        self._to_driver(msg.driver_id, protocol.AvailableCpsResponse(
            driver_id=msg.driver_id, correlation_id=msg.correlation_id, charging_points=cps))

    def _on_charge_request(self, msg: protocol.ChargeRequest, item: Inbound) -> None:
        d, cp_id, corr = msg.driver_id, msg.cp_id, msg.correlation_id
        self.repo.ensure_driver(d)
        age = time.time() - item.timestamp if item.timestamp else 0.0
        if age > self.config.request_max_age:
            # SPEC §3: no new requests are accepted while Central is down, even when
            # Kafka kept them; the driver was already told Central was unavailable.
            denial: str | None = f"request expired: it was sent {age:.0f} s ago, while Central was unavailable"
        else:
            denial = self._authorize(cp_id, d, "driver", corr)
        if denial:
            self._note(f"Driver {d} denied at {cp_id}: {denial}")
            self._to_driver(d, protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="denied",
                                                       cp_id=cp_id, reason=denial))

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
            for t in self.repo.unacked_tickets(d))
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
        if words[0] in ("stop", "resume") and len(words) == 2:
            self._admin(words[0], None if words[1].lower() == "all" else words[1])
        elif words[0] == "status":
            for c in sorted(self.cps.values(), key=lambda c: c.cp_id):
                log.info("%s %-12s %s %s", c.cp_id, c.state, c.location,
                         f"session {c.session_id}" if c.session_id else "")
        else:
            log.info("Commands: stop CP_ID | stop all | resume CP_ID | resume all | status")

    def _admin(self, action: str, cp_id: str | None) -> str:
        targets = list(self.cps.values()) if cp_id is None else [self.cps[cp_id]] if cp_id in self.cps else []
        if not targets:
            log.info("Unknown CP %s", cp_id)
            return f"unknown CP {cp_id}"
        for cp in targets:
            cp.stopped = action == "stop"
            if cp.link is not None:
                tell(cp.link, Send(protocol.StopCp(reason="stopped by Central") if cp.stopped else protocol.ResumeCp()))
            self._refresh(cp)
        what = "all CPs" if cp_id is None else f"CP {cp_id}"
        self._note(f"{'Stopped' if action == 'stop' else 'Resumed'} {what}")
        return "ok"

    # --- views ---------------------------------------------------------------------
    def _note(self, text: str) -> None:
        log.info(text)
        self._messages.append(time.strftime("%H:%M:%S ") + text)
        self._dirty = True

    def _status(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        out = {}
        for c in self.cps.values():
            self._refresh(c, now)
            out[c.cp_id] = {"state": c.state, "location": c.location, "price_eur_kwh": c.price,
                            "session_id": c.session_id, "driver_id": c.driver_id, "energy_kwh": c.energy_kwh,
                            "cost_eur": c.cost_eur, "power_kw": c.power_kw, "connected": c.link is not None,
                            "stopped": c.stopped, "fault": c.fault}
        return out

    def _snapshot(self) -> PanelSnapshot:
        tiles = tuple(
            CpTile(c.cp_id, c.location, c.price, c.state, c.driver_id if c.supplying else None,
                   c.power_kw if c.supplying else 0.0, c.energy_kwh if c.supplying else 0.0,
                   c.cost_eur if c.supplying else 0.0, c.fault)
            for c in sorted(self.cps.values(), key=lambda c: c.cp_id))
        rows = [RequestRow(p.started, p.driver_id, p.cp_id, "waiting for CP") for p in self._pending.values()]
        for sid, cp in self._live.items():
            if not any(p.session_id == sid for p in self._pending.values()) and cp.driver_id:
                rows.append(RequestRow(self._started.get(sid), cp.driver_id, cp.cp_id,
                                       "supplying" if cp.supplying else "authorised"))
        return PanelSnapshot(tiles, tuple(rows), tuple(self._messages), time.time())

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
    }

    #: One handler per driver request type on ``driver_requests``.
    DRIVER_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        protocol.AvailableCpsRequest: _on_list_request,
        protocol.ChargeRequest: _on_charge_request,
        protocol.StopChargingRequest: _on_stop_request,
        protocol.DriverHello: _on_driver_hello,
        protocol.TicketAck: _on_ticket_ack,
    }
