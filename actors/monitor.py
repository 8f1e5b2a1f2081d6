"""MonitorActor: a charging point's watchman and go-between (EV_CP_M's domain).

Why a separate actor from its links: the links (``engine-link`` and
``central-link``, both :class:`~transport.client_link.ClientLink`) crash and
reconnect; what the Monitor knows (registered? engine OK? stopped? which
supply runs?) must survive that, so it lives here and the links only carry
frames. Both links tell this actor ``LinkUp``/``FrameIn``/``LinkDown``; it
tells them ``Send``.

The rules (docs/flows.md): register with Central on every connect and count
as registered only once Central *accepted* (SPEC §5: the seed went ACTIVE
before that); health-check the Engine every ``health_interval`` and call it
KO after ``health_timeout`` without an answer, on ``ok=false``, or at once
when the Engine's socket closes (a dead Engine need not wait for a timeout);
report KO and recovery to Central once each; send the life message while registered;
relay commands both ways, answering for the Engine when it cannot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import pykka

from actors.cp_state import CpState, derive_state
from actors.runtime import Directory, SupervisedActor, Supervision, Ticker, schedule, tell
from transport import protocol
from transport.link import FrameIn, LinkDown, LinkUp, Send

log = logging.getLogger("evcharging.monitor")

__all__ = ["MonitorActor", "MonitorOptions", "MonitorStatus"]

ENGINE, CENTRAL = "engine", "central"


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """Timings of one Monitor; each field is a flag of EV_CP_M."""

    location: str | None = None
    heartbeat_interval: float = 1.0
    health_interval: float = 1.0
    health_timeout: float = 1.5
    register_retry: float = 5.0
    register_timeout: float = 5.0
    stop_confirm: float = 2.0


# --- messages ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MonitorStatus:
    """Ask: a dict snapshot of the Monitor (for tests and the launcher)."""


@dataclass(frozen=True, slots=True)
class _HealthTick:
    pass


@dataclass(frozen=True, slots=True)
class _HeartbeatTick:
    pass


@dataclass(frozen=True, slots=True)
class _Register:
    """Time to (re)send register_request, if still unregistered on the same link."""

    link_urn: str


@dataclass(frozen=True, slots=True)
class _RegisterTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _StopUnconfirmed:
    """After a re-registration: did Central repeat its stop_cp? If not, it resumed us meanwhile."""

    registration: int


class MonitorActor(SupervisedActor):
    """See the module docstring."""

    def __init__(
        self,
        cp_id: str,
        directory: Directory,
        *,
        options: MonitorOptions = MonitorOptions(),
        engine_link: str = "engine-link",
        central_link: str = "central-link",
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.cp_id = cp_id
        self.directory = directory
        self.options = options
        self.link_names = {ENGINE: engine_link, CENTRAL: central_link}
        self.location = options.location
        self.price_eur_kwh = 0.0
        self.registered = False
        self.stopped = False
        self.stop_reason = ""
        self.supplying: str | None = None  # the session whose vehicle is plugged in
        # The session the Engine holds (authorised or supplying): the heartbeat's
        # supplying_session_id, which Central reconciles its live sessions with.
        self.session: str | None = None
        # engine health: None = not known yet (no answer, no timeout so far)
        self.engine_ok: bool | None = None
        self._fault_reported = False
        self._last_answer = time.monotonic()
        self._health_seq = 0
        self._last_check = 0.0  # when the last health_check was sent
        self._links: dict[str, pykka.ActorRef[Any] | None] = {ENGINE: None, CENTRAL: None}
        self._register_id: str | None = None
        self._registrations = 0
        self._stop_confirmed = False
        self._timers: list[threading.Timer] = []
        self._tickers: list[Ticker] = []
        self._state = CpState.DISCONNECTED

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        me = self.actor_ref
        self._tickers = [
            # Ticks four times per check so a silent Engine is called KO within
            # a quarter interval of its timeout; a check is sent once per interval.
            Ticker(self.options.health_interval / 4, me, _HealthTick(), name=f"monitor-health-{self.cp_id}"),
            Ticker(self.options.heartbeat_interval, me, _HeartbeatTick(), name=f"monitor-heartbeat-{self.cp_id}"),
        ]

    def teardown(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        for timer in self._timers:
            timer.cancel()

    def _later(self, delay: float, message: Any) -> None:
        self._timers = [t for t in self._timers if t.is_alive()]
        self._timers.append(schedule(delay, self.actor_ref, message))

    # --- messages ---------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case FrameIn(link, msg):
                side = self._side_of(link)
                if side == ENGINE:
                    self._from_engine(link, msg)
                elif side == CENTRAL:
                    self._from_central(link, msg)
            case LinkUp(link, peer, name):
                self._on_link_up(link, peer, name)
            case LinkDown(link, peer, reason):
                self._on_link_down(link, peer, reason)
            case _HealthTick():
                self._health_tick()
            case _HeartbeatTick():
                self._heartbeat()
            case _Register(urn):
                central = self._links[CENTRAL]
                if central is not None and central.actor_urn == urn and not self.registered:
                    self._register(central)
            case _RegisterTimeout(correlation_id) if correlation_id == self._register_id and not self.registered:
                log.warning("%s: Central did not answer the registration within %g s — asking again",
                            self.cp_id, self.options.register_timeout)
                central = self._links[CENTRAL]
                if central is not None:
                    self._register(central)
            case _StopUnconfirmed(n) if n == self._registrations and self.registered and self.stopped:
                if not self._stop_confirmed:
                    log.info("%s: Central did not repeat its stop order after re-registering — back in service",
                             self.cp_id)
                    self.stopped, self.stop_reason = False, ""
                    self._to_engine(protocol.ResumeCp())
            case MonitorStatus():
                return self._status()
            case _:
                log.debug("%s: ignoring %s", self.cp_id, type(message).__name__)
        self._update_state()
        return None

    # --- links -------------------------------------------------------------------
    def _side_of(self, link: pykka.ActorRef[Any]) -> str | None:
        """Which of our current links ``link`` is; None for an old link's late message."""
        for side in (ENGINE, CENTRAL):
            current = self._links[side]
            if current is not None and current.actor_urn == link.actor_urn:
                return side
        return None

    def _on_link_up(self, link: pykka.ActorRef[Any], peer: str, name: str) -> None:
        """A link connected. The links start after this actor (rest_for_one), so every
        link of ours, also after a restart of either side, introduces itself here."""
        side = next((s for s, n in self.link_names.items() if n == name), None)
        if side is None:
            log.warning("%s: a link to %s came up that is neither the Engine nor Central", self.cp_id, peer)
            return
        self._attach(side, link, peer)

    def _attach(self, side: str, link: pykka.ActorRef[Any], peer: str) -> None:
        """A link is up: greet the Engine or register with Central."""
        self._links[side] = link
        if side == ENGINE:
            log.info("%s: connected to its Engine (%s)", self.cp_id, peer)
            self._send(ENGINE, protocol.Hello(cp_id=self.cp_id, price_eur_kwh=self.price_eur_kwh))
            if self.stopped:  # a restarted Engine forgot Central's order
                self._send(ENGINE, protocol.StopCp(reason=self.stop_reason or "stopped by Central"))
            self._last_answer = time.monotonic()  # a fresh link gets a full timeout
            self._last_check = 0.0
            self._health_tick()  # know the Engine's health now, not in a second
        else:
            log.info("%s: connected to Central (%s) — registering", self.cp_id, peer)
            self.registered = False
            self._register(link)

    def _on_link_down(self, link: pykka.ActorRef[Any], peer: str, reason: str) -> None:
        side = self._side_of(link)
        if side is None:  # _side_of matched it against our current links
            return  # an old link's late goodbye
        self._links[side] = None
        if side == ENGINE:
            log.warning("%s: lost its Engine (%s)", self.cp_id, reason)
            if self.supplying is not None:
                # The Engine ends it (monitor_lost) and reports it over Kafka.
                log.warning("%s: supply %s ends with the Engine link", self.cp_id, self.supplying)
                self.supplying = None
            self.session = None  # learnt again from the Engine's supply_state
            # A closed socket is an answer: the Engine is gone (or unreachable)
            # now, not after the health timeout. Reconnecting clears it.
            self._set_engine_ok(False, f"the Engine is not connected ({reason})")
        else:
            was = self.registered
            self.registered = False
            self._register_id = None
            self._fault_reported = False  # Central forgets; re-reported after re-registration
            log.warning("%s: lost Central (%s) — %s", self.cp_id, reason,
                        "the CP accepts no new supply until it is back" if was else "not registered")

    def _send(self, side: str, message: protocol.Message) -> bool:
        return tell(self._links[side], Send(message))

    # --- registration ---------------------------------------------------------------
    def _register(self, link: pykka.ActorRef[Any]) -> None:
        self._register_id = protocol.new_id()
        tell(link, Send(protocol.RegisterRequest(cp_id=self.cp_id, correlation_id=self._register_id,
                                                 location=self.location)))
        self._later(self.options.register_timeout, _RegisterTimeout(self._register_id))

    def _on_register_response(self, link: pykka.ActorRef[Any], msg: protocol.RegisterResponse) -> None:
        if msg.correlation_id != self._register_id:
            log.debug("%s: ignoring an old register_response", self.cp_id)
            return
        self._register_id = None
        if msg.status != "accepted":
            retry = self.options.register_retry
            log.error("Central refused to register %s: %s — trying again in %g s",
                      self.cp_id, msg.reason or "no reason given", retry)
            self._later(retry, _Register(link.actor_urn))
            return
        self.registered = True
        self._registrations += 1
        if self.stopped:
            # Central is the judge of stop/resume and repeats stop_cp after
            # accepting a stopped CP; a resume given while we were away is not
            # repeated, so an unconfirmed stop is dropped after a moment.
            self._stop_confirmed = False
            self._later(self.options.stop_confirm, _StopUnconfirmed(self._registrations))
        if msg.price_eur_kwh is not None:
            self.price_eur_kwh = msg.price_eur_kwh
        if msg.location:
            self.location = msg.location
        log.info("Central accepted %s (%s, %.2f €/kWh)", self.cp_id, self.location or "no location", self.price_eur_kwh)
        self._send(ENGINE, protocol.Hello(cp_id=self.cp_id, price_eur_kwh=self.price_eur_kwh))
        if self.engine_ok is False:
            self._report_fault(self._ko_reason())
        self._update_state()
        self._heartbeat()

    # --- engine health ------------------------------------------------------------------
    def _health_tick(self) -> None:
        now = time.monotonic()
        if self._links[ENGINE] is not None and now - self._last_check >= self.options.health_interval * 0.99:
            self._last_check = now
            self._health_seq += 1
            self._send(ENGINE, protocol.HealthCheck(seq=self._health_seq))
        self._check_engine()

    def _check_engine(self) -> None:
        silent = time.monotonic() - self._last_answer
        if silent > self.options.health_timeout and self.engine_ok is not False:
            self._set_engine_ok(False, self._ko_reason())

    def _ko_reason(self) -> str:
        if self._links[ENGINE] is None:
            return "the Engine is not connected"
        if self.engine_ok is False and time.monotonic() - self._last_answer <= self.options.health_timeout:
            return "the Engine reports a fault (KO)"
        return f"the Engine did not answer a health check for {self.options.health_timeout:g} s"

    def _set_engine_ok(self, ok: bool, reason: str = "") -> None:
        if ok == self.engine_ok:
            return
        before, self.engine_ok = self.engine_ok, ok
        if ok:
            if before is False:
                log.info("%s: the Engine is OK again", self.cp_id)
            else:
                log.info("%s: the Engine answers OK", self.cp_id)
            if self._fault_reported and self.registered:
                self._send(CENTRAL, protocol.FaultCleared(cp_id=self.cp_id))
            self._fault_reported = False
        else:
            log.warning("%s: the Engine is KO: %s", self.cp_id, reason)
            if self.supplying is not None:
                self.supplying = None  # the Engine ends a supply when it goes KO
            self.session = None
            self._report_fault(reason)
        if before is None:
            self._heartbeat()  # the first life message waited for this

    def _report_fault(self, reason: str) -> None:
        if (self.registered and not self._fault_reported
                and self._send(CENTRAL, protocol.FaultNotification(cp_id=self.cp_id, reason=reason))):
            self._fault_reported = True

    # --- life message --------------------------------------------------------------------
    def _heartbeat(self) -> None:
        # Not before the Engine's health is known (at most health_timeout after
        # start): an engine_ok=false meaning "not asked yet" would show BROKEN.
        if not self.registered or self.engine_ok is None:
            return
        self._update_state()
        self._send(CENTRAL, protocol.Heartbeat(
            cp_id=self.cp_id, engine_ok=bool(self.engine_ok), state=self._state,
            supplying_session_id=self.session or self.supplying,
        ))

    # --- relaying ---------------------------------------------------------------------------
    def _from_engine(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        match msg:
            case protocol.HealthStatus(ok=ok):
                self._last_answer = time.monotonic()
                self._set_engine_ok(ok, "the Engine reports a fault (KO)")
            case protocol.FaultNotification(reason=reason):
                self._last_answer = time.monotonic()
                self._set_engine_ok(False, f"the Engine reports a fault ({reason})")
            case protocol.FaultCleared():
                self._last_answer = time.monotonic()
                self._set_engine_ok(True)
            case protocol.SupplyStarted(session_id=sid):
                self.supplying = self.session = sid
                log.info("%s: supplying %s", self.cp_id, sid)
                self._to_central(msg)
            case protocol.SupplyEnded(session_id=sid, end_reason=why):
                if self.supplying == sid:
                    self.supplying = None
                if self.session == sid:
                    self.session = None
                log.info("%s: supply %s ended (%s)", self.cp_id, sid, why.replace("_", " "))
                self._to_central(msg)
            case protocol.SupplyAuthorizationResponse(session_id=sid, accepted=accepted):
                if accepted:
                    self.session = sid
                self._to_central(msg)
            case protocol.SupplyState(session_id=sid, plugged=plugged):
                # The Engine's answer to hello: what it holds (also after our restart).
                self.session = sid
                self.supplying = sid if plugged else None
            case protocol.BillingQuery():
                self._to_central(msg)
            case protocol.CpSupplyRequest(cp_id, driver_id, correlation_id):
                if self.registered:
                    self._to_central(msg)
                else:
                    reason = "Central is unavailable" if self._links[CENTRAL] is None else \
                        f"{self.cp_id} is not registered with Central yet"
                    log.warning("%s: cannot ask Central for a supply for driver %s: %s", self.cp_id, driver_id, reason)
                    tell(link, Send(protocol.CpSupplyResponse(
                        correlation_id=correlation_id, cp_id=cp_id, status="denied", reason=reason)))
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: the Engine could not accept a message: %s", self.cp_id, reason)
            case _:
                log.warning("%s: ignoring a %s from the Engine", self.cp_id, msg.TYPE)

    def _from_central(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        match msg:
            case protocol.RegisterResponse():
                self._on_register_response(link, msg)
            case protocol.AuthorizeSupply():
                refusal = self._engine_refusal()
                if refusal is not None:
                    log.info("%s: refused supply %s for driver %s: %s", self.cp_id, msg.session_id, msg.driver_id,
                             refusal)
                    tell(link, Send(protocol.SupplyAuthorizationResponse(
                        correlation_id=msg.correlation_id, session_id=msg.session_id, accepted=False, reason=refusal)))
                else:
                    self._send(ENGINE, msg)
            case protocol.StopCp(reason):
                self.stopped, self.stop_reason, self._stop_confirmed = True, reason, True
                log.warning("%s: stopped by Central (%s)", self.cp_id, reason)
                self._to_engine(msg)
            case protocol.ResumeCp():
                self.stopped, self.stop_reason = False, ""
                log.info("%s: resumed by Central", self.cp_id)
                self._to_engine(msg)
            case protocol.StopSupply() | protocol.CpSupplyResponse() | protocol.CancelSupply() \
                    | protocol.SessionBilled():
                self._to_engine(msg)
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: Central could not accept a message: %s", self.cp_id, reason)
            case _:
                log.warning("%s: ignoring a %s from Central", self.cp_id, msg.TYPE)

    def _engine_refusal(self) -> str | None:
        if self._links[ENGINE] is None:
            return f"the Engine of {self.cp_id} is not connected"
        if not self.engine_ok:
            return f"{self.cp_id} is out of order (its Engine is KO)"
        return None

    def _to_central(self, msg: protocol.Message) -> None:
        if not self.registered or not self._send(CENTRAL, msg):
            log.info("%s: Central is unavailable; %s not relayed", self.cp_id, msg.TYPE)

    def _to_engine(self, msg: protocol.Message) -> None:
        if not self._send(ENGINE, msg):
            log.warning("%s: the Engine is not connected; %s not relayed", self.cp_id, msg.TYPE)

    # --- state --------------------------------------------------------------------------------
    def _compute_state(self) -> CpState:
        # Connected, for the Monitor, means registered with Central.
        return derive_state(connected=self.registered, engine_ok=self.engine_ok,
                            supplying=self.supplying is not None, stopped=self.stopped)

    def _update_state(self) -> None:
        state = self._compute_state()
        if state != self._state:
            self._state = state
            log.info("%s is now %s", self.cp_id, state)

    def _status(self) -> dict[str, Any]:
        self._update_state()
        return {
            "cp_id": self.cp_id,
            "state": self._state,
            "registered": self.registered,
            "engine_ok": bool(self.engine_ok),
            "central_connected": self._links[CENTRAL] is not None,
            "engine_connected": self._links[ENGINE] is not None,
            "price_eur_kwh": self.price_eur_kwh,
            "location": self.location,
            "stopped": self.stopped,
            "supplying_session_id": self.supplying,
            "session_id": self.session or self.supplying,
        }
