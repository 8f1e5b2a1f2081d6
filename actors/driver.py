"""DriverActor: the driver app's domain — requests, live supply, tickets, services.

Why an actor of its own: the driver's state (pending requests by correlation
id, the live supply, the tickets already shown, the services runner) must
survive a restart of its Kafka pump or publisher, so links live in sibling
actors and this one only *tells* ``Publish`` to the actor named "publisher"
and handles the ``Delivery`` its pump asks it to. It never imports Kafka or
sockets, never blocks and never sleeps: every wait is a timer that tells a
message back (request timeouts, the pause between services, hello retries).

What it reads is the driver's *partition* of ``driver_responses``, shared
with other drivers: records whose key or ``driver_id`` is not ours are
ignored, and Kafka's at-least-once delivery is absorbed by deduplicating
tickets (by session id), telemetry (by seq) and supply events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pykka

from actors.console import ConsoleLine
from transport import protocol
from transport.kafka import Delivery, Inbound, Publish, Published, PublishFailed, PumpReady
from transport.runtime import Directory, SupervisedActor, Supervision, backoff_strategy, schedule

log = logging.getLogger("evcharging.driver")

CENTRAL_UNAVAILABLE = "Central is unavailable"
HELP = (
    "Commands:\n"
    "  list          show the charging points (id, location, price, state)\n"
    "  charge CP_ID  ask Central for a supply at CP_ID\n"
    "  stop          stop your live supply (the ticket follows)\n"
    "  status        what this app knows right now\n"
    "  help          this text\n"
    "  quit          leave the app (a live supply goes on; come back for the ticket)"
)


# --- asks for tests and the launcher ------------------------------------------
@dataclass(frozen=True, slots=True)
class DriverResults:
    """Ask: a list of per-service dicts, in file order, for the services done so far.

    Each dict: cp_id, outcome ('ticket' | 'denied' | 'unavailable'),
    session_id, energy_kwh, cost_eur, reason, ticket (dict or None).
    """


@dataclass(frozen=True, slots=True)
class DriverStatus:
    """Ask: {driver_id, services_total, services_done, done, active_session, tickets_seen}.

    ``done`` is True once every service of the file ended (always False in
    interactive mode); ``active_session`` is a dict or None; ``tickets_seen``
    lists the session ids whose ticket was shown, in the order shown.
    """


# --- timers (private) -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _PumpCheck:
    """Poll the pump until it is positioned (and later: notice a restarted pump)."""


@dataclass(frozen=True, slots=True)
class _RequestTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _RetryHello:
    pass


@dataclass(frozen=True, slots=True)
class _NextService:
    index: int


@dataclass(frozen=True, slots=True)
class _StillWaiting:
    session_id: str


# --- state ------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    """One request that waits for Central's answer."""

    kind: str  # "hello" | "list" | "charge" | "stop"
    cp_id: str | None = None
    session_id: str | None = None
    timer: threading.Timer | None = None
    for_service: int | None = None  # index of the file service this charge request is for
    expired: bool = False  # its timeout passed; a late answer may still come


@dataclass(slots=True)
class _Live:
    """The driver's live supply (at most one: Central enforces it)."""

    session_id: str
    cp_id: str
    plugged: bool = False
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    power_kw: float = 0.0
    last_seq: int = 0
    last_news: float = field(default_factory=time.monotonic)
    timer: threading.Timer | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "cp_id": self.cp_id,
            "state": "supplying" if self.plugged else "authorized",
            "energy_kwh": self.energy_kwh, "cost_eur": self.cost_eur, "power_kw": self.power_kw,
        }


class DriverActor(SupervisedActor):
    """One driver: shows its supply step by step and runs its services file.

    ``services`` None means interactive mode (console commands only); a
    sequence of CP ids runs them one by one, ``pause`` seconds apart.
    ``on_finish(reason)`` is called on ``quit`` and, with ``exit_when_done``,
    after the last service; by default it stops this actor's supervisor (the
    whole driver system), without waiting. ``report(snapshot)`` (file mode)
    gets the results when the last service ended and again when the actor
    stops, so whoever started the driver can keep them (the launcher writes
    them to a JSON file): the status dict plus ``services``, the results.
    """

    def __init__(
        self,
        driver_id: str,
        directory: Directory,
        *,
        services: Sequence[str] | None = None,
        pause: float = 4.0,
        request_timeout: float = 10.0,
        hello_backoff_max: float = 15.0,
        ticket_notice_interval: float = 30.0,
        exit_when_done: bool = False,
        on_finish: Callable[[str], None] | None = None,
        report: Callable[[dict[str, Any]], None] | None = None,
        publisher: str = "publisher",
        pump: str = "pump",
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.driver_id = driver_id
        self.directory = directory
        self.services = tuple(services) if services is not None else None
        self.pause = pause
        self.request_timeout = request_timeout
        self.ticket_notice_interval = ticket_notice_interval
        self.exit_when_done = exit_when_done
        self._on_finish = on_finish
        self._on_report = report
        self._publisher = publisher
        self._pump = pump
        self._hello_delay = backoff_strategy(0.5, hello_backoff_max)
        # links
        self._pump_urn: str | None = None
        self._pump_future: pykka.Future[Any] | None = None
        self._pump_poll = 0.02
        self._online = False
        self._deferred: list[str] = []
        self._timers: list[threading.Timer] = []
        # requests and supply
        self._pending: dict[str, _Pending] = {}
        self._expired: OrderedDict[str, _Pending] = OrderedDict()
        self._hello_attempts = 0
        self._hello_answered = False
        self._hello_retry: threading.Timer | None = None
        self._live: _Live | None = None
        self._tickets_seen: list[str] = []
        self._ticket_set: set[str] = set()
        self._events_seen: set[tuple[str, str]] = set()
        self._cancelled: set[str] = set()
        # services runner
        self._index = 0
        self._started = False
        self._results: list[dict[str, Any]] = []
        self._waiting_session: str | None = None  # the authorised service waits for this ticket
        self._finished = False

    # --- lifecycle -------------------------------------------------------------
    def setup(self) -> None:
        mode = f"{len(self.services)} service(s) from a file" if self.services is not None else "interactive"
        log.info("Driver %s starting (%s); connecting to Kafka", self.driver_id, mode)
        self._later(0.0, _PumpCheck())

    def teardown(self) -> None:
        self._send_report()
        for timer in self._timers:
            timer.cancel()
        for p in self._pending.values():
            if p.timer is not None:
                p.timer.cancel()
        if self._live is not None and self._live.timer is not None:
            self._live.timer.cancel()

    # --- messages ----------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                for item in items:
                    self._on_record(item)
            case ConsoleLine(text):
                self._on_console(text)
            case _PumpCheck():
                self._check_pump()
            case _RequestTimeout(corr):
                self._on_timeout(corr)
            case _RetryHello():
                self._hello_retry = None
                if not self._hello_answered:
                    self._send_hello()
            case _NextService(index):
                if index == self._index and not self._finished:
                    self._request_service()
            case _StillWaiting(sid):
                self._still_waiting(sid)
            case PublishFailed(token, reason):
                log.warning("Could not send %s to Kafka: %s", token or "a message", reason)
            case Published():
                pass
            case DriverResults():
                return [dict(r) for r in self._results]
            case DriverStatus():
                return self._status()
            case _:
                log.debug("driver: ignoring %s", type(message).__name__)
        return None

    # --- timers and publishing ----------------------------------------------------
    def _later(self, delay: float, message: Any) -> threading.Timer:
        self._timers = [t for t in self._timers if t.is_alive()]
        timer = schedule(delay, self.actor_ref, message)
        self._timers.append(timer)
        return timer

    def _publish(self, message: Any, what: str) -> None:
        if not self.directory.tell(self._publisher, Publish("driver_requests", self.driver_id, message,
                                                            self.actor_ref, what)):
            log.warning("Could not send %s: the Kafka publisher is restarting", what)

    def _request(self, pending: _Pending, build: Callable[[str], Any], what: str) -> str:
        corr = protocol.new_id()
        pending.timer = self._later(self.request_timeout, _RequestTimeout(corr))
        self._pending[corr] = pending
        self._publish(build(corr), what)
        return corr

    # --- the pump: nothing is sent before it is positioned --------------------------
    def _check_pump(self) -> None:
        pump = self.directory.get(self._pump)
        if pump is not None and pump.actor_urn != self._pump_urn:
            # first pump, or a restarted one: it starts at the end again, so the
            # records sent while it was away are lost to us; the hello recovers them
            if self._online:
                log.warning("The Kafka link restarted; asking Central again what was missed")
            self._pump_urn, self._pump_future, self._pump_poll = pump.actor_urn, None, 0.02
            self._online = False
        if pump is not None and not self._online:
            ready = self._poll_ready(pump)
            if ready:
                self._go_online()
        # fast while starting, then gently (Kafka may be away for long); 1 s once online
        self._pump_poll = 1.0 if self._online else min(self._pump_poll * 1.2, 0.5)
        self._later(self._pump_poll, _PumpCheck())

    def _poll_ready(self, pump: pykka.ActorRef[Any]) -> bool:
        """Ask without waiting: start an ask, look at its answer on a later tick."""
        if self._pump_future is None:
            try:
                self._pump_future = pump.ask(PumpReady(), block=False)
            except pykka.ActorDeadError:
                return False
            return False
        try:
            ready = bool(self._pump_future.get(timeout=0))
        except pykka.Timeout:
            return False
        except pykka.ActorDeadError:
            ready = False
        self._pump_future = None
        return ready

    def _go_online(self) -> None:
        first = self._hello_attempts == 0
        self._online = True
        if first:
            log.info("Connected to Kafka; saying hello to Central")
        else:
            self._hello_answered = False
        if not any(p.kind == "hello" for p in self._pending.values()):
            if self._hello_retry is not None:
                self._hello_retry.cancel()
                self._hello_retry = None
            self._send_hello()
        deferred, self._deferred = self._deferred, []
        for line in deferred:
            self._on_console(line)

    # --- hello: live supply and missed tickets ------------------------------------
    def _send_hello(self) -> None:
        self._hello_attempts += 1
        self._request(_Pending("hello"),
                      lambda corr: protocol.DriverHello(driver_id=self.driver_id, correlation_id=corr), "hello")

    def _on_hello(self, msg: protocol.DriverHelloResponse) -> None:
        self._hello_answered = True
        if self._hello_retry is not None:
            self._hello_retry.cancel()
            self._hello_retry = None
        if msg.status != "ok":
            log.warning("Central answered the hello with status %s", msg.status)
        active = msg.active_session
        if active is not None and active.session_id not in self._ticket_set | self._cancelled:
            live = self._adopt(active.session_id, active.cp_id)
            live.energy_kwh, live.cost_eur = active.energy_kwh, active.cost_eur
            live.plugged = live.plugged or active.started_at is not None or active.state.upper() == "SUPPLYING" \
                or active.energy_kwh > 0
            if live.plugged:
                log.info("You are charging at %s: %.2f kWh, %.2f € (session %s)",
                         active.cp_id, active.energy_kwh, active.cost_eur, active.session_id)
            else:
                log.info("Your supply at %s (session %s) is authorised, waiting for the plug-in",
                         active.cp_id, active.session_id)
        fresh = [t for t in msg.tickets if t.session_id not in self._ticket_set]
        if fresh:
            log.info("You have %d ticket(s) you had not seen:", len(fresh))
        for t in msg.tickets:
            self._on_ticket(t)
        if active is None and not fresh:
            log.info("Central answered: no supply in progress, no missed tickets")
        self._maybe_start_services()

    # --- records from our partition -------------------------------------------------
    def _on_record(self, item: Inbound) -> None:
        if item.key != self.driver_id:
            return  # the partition is shared with other drivers
        if item.error is not None:
            log.warning("Ignored an unreadable record from Central: %s", item.error)
            return
        msg = item.message
        if getattr(msg, "driver_id", self.driver_id) != self.driver_id:
            return
        try:
            self._dispatch(msg)
        except Exception as exc:  # one odd record must not stall the pump
            log.error("Could not handle a %s from Central: %s", getattr(msg, "TYPE", "record"), exc, exc_info=True)

    def _dispatch(self, msg: Any) -> None:
        corr = protocol.correlation_of(msg)
        match msg:
            case protocol.DriverHelloResponse():
                pending = self._settle(corr, "hello")
                if pending is not None and not (pending.expired and self._hello_answered):
                    self._on_hello(msg)  # a late answer is news only while no later one came
            case protocol.AvailableCpsResponse():
                if self._settle(corr, "list") is not None:
                    self._show_cps(msg.charging_points)
            case protocol.ChargeResponse():
                self._on_charge_response(msg)
            case protocol.StopChargingResponse():
                if self._settle(corr, "stop") is not None:
                    if msg.status == "ok":
                        log.info("Central is stopping your supply%s; the ticket follows",
                                 f" (session {msg.session_id})" if msg.session_id else "")
                    else:
                        log.warning("Central could not stop the supply: %s", msg.reason or msg.status)
            case protocol.SupplyEvent():
                self._on_event(msg)
            case protocol.ChargingStatusUpdate():
                self._on_status_update(msg)
            case protocol.Ticket():
                self._on_ticket(msg)
            case protocol.ErrorMessage(reason=reason):
                self._on_error(corr, reason)
            case _:
                log.debug("driver: ignoring a %s record", getattr(msg, "TYPE", type(msg).__name__))

    def _settle(self, corr: str | None, kind: str) -> _Pending | None:
        """The request ``corr`` answered: stop its timer; None if it is not ours.

        A hello or list answer that comes after its timeout is still welcome
        (late news is news); charge and stop answers are handled by the caller.
        """
        if corr is None:
            return None
        pending = self._pending.pop(corr, None)
        if pending is None:
            late = self._expired.pop(corr, None)
            return late if late is not None and late.kind == kind else None
        if pending.timer is not None:
            pending.timer.cancel()
        return pending if pending.kind == kind else None

    def _on_timeout(self, corr: str) -> None:
        pending = self._pending.pop(corr, None)
        if pending is None:
            return
        pending.expired = True
        self._expired[corr] = pending
        while len(self._expired) > 256:
            self._expired.popitem(last=False)
        wait = f"no answer within {self.request_timeout:g} s"
        match pending.kind:
            case "hello" if self._hello_answered:
                pass  # another hello of ours was answered meanwhile
            case "hello":
                delay = self._hello_delay(self._hello_attempts)
                log.warning("%s (%s) — will retry in %.1f s", CENTRAL_UNAVAILABLE, wait, delay)
                self._hello_retry = self._later(delay, _RetryHello())
                self._maybe_start_services(hello_failed=True)
            case "list":
                log.warning("%s — %s to the list request", CENTRAL_UNAVAILABLE, wait)
            case "stop":
                log.warning("%s — %s to the stop request; try again", CENTRAL_UNAVAILABLE, wait)
            case "charge":
                log.warning("%s — %s to the charge request for %s", CENTRAL_UNAVAILABLE, wait, pending.cp_id)
                if pending.for_service is not None:
                    self._service_ended("unavailable", reason=f"{CENTRAL_UNAVAILABLE} ({wait})")

    def _on_error(self, corr: str | None, reason: str) -> None:
        pending = self._pending.pop(corr, None) if corr else None
        if pending is None:
            log.warning("Central reported an error: %s", reason)
            return
        if pending.timer is not None:
            pending.timer.cancel()
        log.warning("Central refused the %s request: %s", pending.kind, reason)
        if pending.kind == "hello":
            self._hello_retry = self._later(self._hello_delay(self._hello_attempts), _RetryHello())
            self._maybe_start_services(hello_failed=True)
        elif pending.kind == "charge" and pending.for_service is not None:
            self._service_ended("denied", reason=reason)

    # --- a supply, step by step --------------------------------------------------
    def _on_charge_response(self, msg: protocol.ChargeResponse) -> None:
        corr = msg.correlation_id
        pending = self._pending.pop(corr, None)
        if pending is None:
            self._late_charge_response(msg)
            return
        if pending.timer is not None:
            pending.timer.cancel()
        if msg.status == "authorized" and msg.session_id:
            self._announce(msg.session_id, "authorized", "Authorised at %s (session %s) — plug in your vehicle",
                           msg.cp_id, msg.session_id)
            self._adopt(msg.session_id, msg.cp_id)
            if pending.for_service is not None:
                self._waiting_session = msg.session_id
            return
        reason = msg.reason or "no reason given"
        log.warning("Denied at %s: %s", msg.cp_id, reason)
        if pending.for_service is not None:
            self._service_ended("denied", session_id=msg.session_id or pending.session_id, reason=reason)

    def _late_charge_response(self, msg: protocol.ChargeResponse) -> None:
        """Central answered a charge request we had given up on (it was away).

        Interactive: a late authorisation is adopted when nothing else is live.
        File mode: that service was already counted, so the session is stopped
        at once (it still ends in a ticket, which is shown and acknowledged).
        """
        late = self._expired.pop(msg.correlation_id, None)
        if late is None or late.kind != "charge":
            return
        if msg.status != "authorized" or not msg.session_id:
            log.info("Late answer from Central: %s denied (%s)", msg.cp_id, msg.reason or "no reason given")
            return
        if late.for_service is None and self._live is None:
            log.info("Late answer from Central: authorised at %s (session %s) — plug in your vehicle",
                     msg.cp_id, msg.session_id)
            self._adopt(msg.session_id, msg.cp_id)
            return
        # The service was already counted as failed: do not hold the CP for nothing.
        log.info("Late answer from Central: authorised at %s (session %s), but that request was given up; "
                 "cancelling it", msg.cp_id, msg.session_id)
        self._cancelled.add(msg.session_id)
        if self._live is not None and self._live.session_id == msg.session_id:
            self._drop_live()
        self._request(_Pending("stop", msg.cp_id, msg.session_id),
                      lambda corr: protocol.StopChargingRequest(driver_id=self.driver_id, session_id=msg.session_id,
                                                                correlation_id=corr), "stop request")

    def _on_event(self, ev: protocol.SupplyEvent) -> None:
        if ev.session_id in self._ticket_set:
            return  # late or replayed news about a supply already billed
        key = (ev.session_id, f"{ev.event}:{ev.detail or ''}")
        if key in self._events_seen:
            return  # redelivered
        self._events_seen.add(key)
        detail = f" ({ev.detail})" if ev.detail else ""
        pending = self._pending_charge(ev.cp_id)
        if pending is not None and ev.event in ("requested", "waiting_cp"):
            pending.session_id = ev.session_id  # Central is alive and working: give the CP its time
            if pending.timer is not None:
                pending.timer.cancel()
            pending.timer = self._later(self.request_timeout, _RequestTimeout(self._corr_of(pending)))
        live = self._live if self._live is not None and self._live.session_id == ev.session_id else None
        if live is not None:
            live.last_news = time.monotonic()
        if pending is None and live is None and self._is_stale(ev):
            return
        match ev.event:
            case "requested":
                log.info("Central received the request for %s (session %s)", ev.cp_id, ev.session_id)
            case "waiting_cp":
                log.info("Waiting for %s to answer", ev.cp_id)
            case "authorized":
                self._announce(ev.session_id, "authorized", "Authorised at %s (session %s) — plug in your vehicle",
                               ev.cp_id, ev.session_id)
            case "denied":
                log.warning("Denied at %s%s", ev.cp_id, detail)
                if pending is not None and pending.session_id == ev.session_id:
                    # the denial of our pending request, told as an event: the request is over
                    self._settle(self._corr_of(pending), "charge")
                    if pending.for_service is not None:
                        self._service_ended("denied", session_id=ev.session_id, reason=ev.detail or "denied")
            case "plugged_in":
                if live is None and ev.session_id not in self._cancelled:
                    live = self._adopt(ev.session_id, ev.cp_id)
                if live is not None:
                    live.plugged = True
                log.info("Plugged in at %s — the supply has started", ev.cp_id)
            case "fault":
                log.warning("Fault at %s%s — the supply ends; the ticket follows", ev.cp_id, detail)
            case "stopped":
                log.info("Supply at %s stopped%s; the ticket follows", ev.cp_id, detail)
            case "central_unavailable":
                log.warning("%s%s", CENTRAL_UNAVAILABLE, detail)

    def _is_stale(self, ev: protocol.SupplyEvent) -> bool:
        """An event about a request given up in file mode (Central was away): say it once."""
        if ev.session_id in self._cancelled:
            return True
        given_up = any(p.kind == "charge" and p.cp_id == ev.cp_id and p.for_service is not None
                       for p in self._expired.values())
        if not given_up or ev.event not in ("requested", "waiting_cp", "authorized"):
            return False
        self._cancelled.add(ev.session_id)
        log.info("Central is now handling the request for %s it did not answer in time (session %s); "
                 "if authorised, it will be cancelled", ev.cp_id, ev.session_id)
        return True

    def _on_status_update(self, up: protocol.ChargingStatusUpdate) -> None:
        if up.session_id in self._ticket_set or up.session_id in self._cancelled:
            return
        live = self._live
        if live is None or live.session_id != up.session_id:
            if live is not None:
                log.debug("driver: telemetry for %s while %s is live", up.session_id, live.session_id)
                return
            live = self._adopt(up.session_id, up.cp_id)
        if up.seq <= live.last_seq:
            return  # redelivered
        live.last_seq, live.plugged, live.last_news = up.seq, True, time.monotonic()
        live.energy_kwh, live.cost_eur, live.power_kw = up.energy_kwh, up.cost_eur, up.power_kw
        log.info("%s: %.3f kWh · %.2f € · %.1f kW", up.cp_id, up.energy_kwh, up.cost_eur, up.power_kw)

    def _on_ticket(self, t: protocol.Ticket | protocol.TicketInfo) -> None:
        """Show a ticket once, acknowledge it every time (an ack may have been lost)."""
        self._publish(protocol.TicketAck(driver_id=self.driver_id, session_id=t.session_id), "ticket ack")
        if t.session_id in self._ticket_set:
            return
        self._ticket_set.add(t.session_id)
        self._tickets_seen.append(t.session_id)
        log.info("Ticket for %s at %s: %.3f kWh × %.2f €/kWh = %.2f € (%s)",
                 t.session_id, t.cp_id, t.energy_kwh, t.price_eur_kwh, t.cost_eur, t.end_reason.replace("_", " "))
        if self._live is not None and self._live.session_id == t.session_id:
            self._drop_live()
        ticket = {
            "session_id": t.session_id, "cp_id": t.cp_id, "price_eur_kwh": t.price_eur_kwh,
            "energy_kwh": t.energy_kwh, "cost_eur": t.cost_eur, "started_at": t.started_at,
            "ended_at": t.ended_at, "end_reason": t.end_reason,
        }
        pending = self._pending_charge(t.cp_id)
        if pending is not None and pending.session_id == t.session_id and pending.for_service is not None:
            # the charge_response was lost but the supply happened: it is this service's ticket
            self._settle(self._corr_of(pending), "charge")
            self._waiting_session = t.session_id
        if self._waiting_session == t.session_id:
            self._waiting_session = None
            if self._started:
                self._service_ended("ticket", session_id=t.session_id, energy_kwh=t.energy_kwh,
                                    cost_eur=t.cost_eur, ticket=ticket)
            else:  # a supply from before a restart: the services begin after its ticket
                self._maybe_start_services()

    # --- the live supply ------------------------------------------------------------
    def _adopt(self, session_id: str, cp_id: str) -> _Live:
        if self._live is not None and self._live.session_id == session_id:
            return self._live
        if self._live is not None:
            self._drop_live()
        self._live = _Live(session_id, cp_id)
        self._live.timer = self._later(self.ticket_notice_interval, _StillWaiting(session_id))
        return self._live

    def _drop_live(self) -> None:
        if self._live is not None and self._live.timer is not None:
            self._live.timer.cancel()
        self._live = None

    def _still_waiting(self, session_id: str) -> None:
        live = self._live
        if live is None or live.session_id != session_id:
            return
        quiet = time.monotonic() - live.last_news
        if quiet >= self.ticket_notice_interval * 0.99:
            log.info("still waiting for the ticket of %s", session_id)
            live.timer = self._later(self.ticket_notice_interval, _StillWaiting(session_id))
        else:
            live.timer = self._later(self.ticket_notice_interval - quiet, _StillWaiting(session_id))

    def _announce(self, session_id: str, event: str, text: str, *args: Any) -> None:
        """Log a step once, whichever of its two messages comes first."""
        if (session_id, f"shown:{event}") in self._events_seen:
            return
        self._events_seen.add((session_id, f"shown:{event}"))
        log.info(text, *args)

    def _corr_of(self, pending: _Pending) -> str:
        return next(c for c, p in self._pending.items() if p is pending)

    def _pending_charge(self, cp_id: str) -> _Pending | None:
        return next((p for p in self._pending.values() if p.kind == "charge" and p.cp_id == cp_id), None)

    # --- services file ------------------------------------------------------------
    def _maybe_start_services(self, hello_failed: bool = False) -> None:
        """Begin once Central answered the hello (or did not answer in time)."""
        if self.services is None or self._started:
            return
        if self._live is not None and not hello_failed:
            if self._waiting_session != self._live.session_id:
                self._waiting_session = self._live.session_id
                log.info("The services begin after the ticket of %s", self._live.session_id)
            return
        self._started = True
        self._waiting_session = None
        if not self.services:
            self._finish_services()
            return
        self._request_service()

    def _request_service(self) -> None:
        cp_id = self.services[self._index]  # type: ignore[index]
        log.info("Service %d/%d: requesting a supply at %s", self._index + 1, len(self.services or ()), cp_id)
        self._request(_Pending("charge", cp_id, for_service=self._index),
                      lambda corr: protocol.ChargeRequest(driver_id=self.driver_id, cp_id=cp_id, correlation_id=corr),
                      f"charge request for {cp_id}")

    def _service_ended(self, outcome: str, *, session_id: str | None = None, energy_kwh: float = 0.0,
                       cost_eur: float = 0.0, reason: str | None = None,
                       ticket: dict[str, Any] | None = None) -> None:
        assert self.services is not None
        self._results.append({
            "cp_id": self.services[self._index], "outcome": outcome, "session_id": session_id,
            "energy_kwh": energy_kwh, "cost_eur": cost_eur, "reason": reason, "ticket": ticket,
        })
        self._index += 1
        if self._index >= len(self.services):
            self._finish_services()
            return
        log.info("Next service in %g s", self.pause)
        self._later(self.pause, _NextService(self._index))

    def _finish_services(self) -> None:
        self._finished = True
        outcomes = [r["outcome"] for r in self._results]
        log.info("All %d services done: %d tickets, %d denied, %d unavailable", len(outcomes),
                 outcomes.count("ticket"), outcomes.count("denied"), outcomes.count("unavailable"))
        self._send_report()
        if self.exit_when_done:
            self._finish("all services done")

    def _send_report(self) -> None:
        if self._on_report is None or self.services is None:
            return
        try:
            self._on_report(dict(self._status(), services=[dict(r) for r in self._results]))
        except Exception as exc:  # a full disk must not take the driver down
            log.warning("Could not save the results: %s", exc)

    def _finish(self, reason: str) -> None:
        if self._on_finish is not None:
            self._on_finish(reason)
        elif self.supervision is not None:
            self.supervision.supervisor.stop(block=False)
        else:
            self.actor_ref.stop(block=False)

    # --- console ------------------------------------------------------------------
    def _on_console(self, text: str) -> None:
        words = text.split()
        if not words:
            return
        cmd, args = words[0].lower(), words[1:]
        if cmd in ("list", "charge", "stop") and not self._online:
            log.info("Not connected to Kafka yet; '%s' will be sent once connected", text)
            self._deferred.append(text)
            return
        match cmd:
            case "list":
                self._request(_Pending("list"), lambda corr: protocol.AvailableCpsRequest(
                    driver_id=self.driver_id, correlation_id=corr), "list request")
                log.info("Asking Central for the charging points")
            case "charge" if len(args) == 1:
                self._console_charge(args[0])
            case "charge":
                log.info("Usage: charge CP_ID")
            case "stop":
                self._console_stop()
            case "status":
                self._show_status()
            case "help" | "?":
                log.info(HELP)
            case "quit" | "exit":
                if self._live is not None:
                    log.info("Leaving; your supply at %s goes on — start the app again to see it and its ticket",
                             self._live.cp_id)
                else:
                    log.info("Bye")
                self._finish("quit")
            case _:
                log.info("Unknown command %r — type 'help' for the commands", cmd)

    def _console_charge(self, cp_id: str) -> None:
        if self.services is not None:
            log.info("This app runs a services file; it requests the supplies itself")
            return
        if self._live is not None:
            log.info("You are already supplying at %s (session %s); type 'stop' first",
                     self._live.cp_id, self._live.session_id)
            return
        if any(p.kind == "charge" for p in self._pending.values()):
            log.info("A charge request is already waiting for Central's answer")
            return
        try:
            message = protocol.ChargeRequest(driver_id=self.driver_id, cp_id=cp_id, correlation_id="x")
            protocol.encode(message)
        except protocol.ProtocolError as exc:
            log.info("Cannot request %r: %s", cp_id, exc)
            return
        self._request(_Pending("charge", cp_id), lambda corr: protocol.ChargeRequest(
            driver_id=self.driver_id, cp_id=cp_id, correlation_id=corr), f"charge request for {cp_id}")
        log.info("Requested a supply at %s; waiting for Central", cp_id)

    def _console_stop(self) -> None:
        live = self._live
        if live is None:
            log.info("You have no supply to stop")
            return
        self._request(_Pending("stop", live.cp_id, live.session_id), lambda corr: protocol.StopChargingRequest(
            driver_id=self.driver_id, session_id=live.session_id, correlation_id=corr), "stop request")
        log.info("Asking Central to stop your supply at %s", live.cp_id)

    # --- displays -----------------------------------------------------------------
    def _show_cps(self, cps: tuple[protocol.CpInfo, ...]) -> None:
        if not cps:
            log.info("Central knows no charging points yet")
            return
        rows = [("CP", "LOCATION", "PRICE", "STATE")] + [
            (c.cp_id, c.location, f"{c.price_eur_kwh:.2f} €/kWh", c.state) for c in cps]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        available = sum(1 for c in cps if c.state == "ACTIVE")
        log.info("%d charging point(s), %d available:\n%s", len(cps), available, "\n".join(lines))

    def _status(self) -> dict[str, Any]:
        return {
            "driver_id": self.driver_id,
            "services_total": len(self.services) if self.services is not None else 0,
            "services_done": len(self._results),
            "done": self._finished,
            "active_session": self._live.as_dict() if self._live is not None else None,
            "tickets_seen": list(self._tickets_seen),
        }

    def _show_status(self) -> None:
        link = "connected to Kafka" if self._online else "connecting to Kafka"
        central = "Central answered" if self._hello_answered else "waiting for Central"
        live = self._live
        supply = (f"supply at {live.cp_id} (session {live.session_id}): {live.energy_kwh:.3f} kWh, "
                  f"{live.cost_eur:.2f} €" if live is not None else "no supply in progress")
        parts = [f"Driver {self.driver_id}: {link}, {central}", supply, f"{len(self._tickets_seen)} ticket(s) seen"]
        if self.services is not None:
            parts.append(f"services {len(self._results)}/{len(self.services)} done")
        log.info("; ".join(parts))
