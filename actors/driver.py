"""DriverActor: the driver app's request correlation — pending requests, the hello, the live supply, tickets.

The driver app is three actors with one job each (``actors/driver_messages.py``
lists the messages between them): this one (``driver``) owns the requests
to Central and the state their answers belong to; ``services``
(``actors/driver_services.py``) walks the services file; ``output``
(``actors/driver_console.py``) words everything the person sees and parses
what the person types.

Why an actor of its own: the driver's state (pending requests by correlation
id, the live supply, the tickets already shown) must survive a restart of its
Kafka pump or publisher, so links live in sibling actors and this one only
*tells* ``Publish`` to the actor named "publisher" and handles the
``Delivery`` its pump asks it to. It never imports Kafka or sockets, never
blocks and never sleeps: every wait is a timer that tells a message back
(request timeouts, hello retries). A restarted DriverActor re-learns what it
lost from Central: it says hello again and gets the live supply and the
tickets not yet acknowledged.

What it reads is the driver's *partition* of ``driver_responses``, shared
with other drivers: records whose key or ``driver_id`` is not ours are
ignored, and Kafka's at-least-once delivery is absorbed by deduplicating
tickets (by session id), telemetry (by seq) and supply events.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors import driver_messages as m
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, backoff_strategy, schedule
from transport import protocol, security
from transport.kafka import Delivery, Inbound, Publish, Published, PublishFailed, PumpDown, PumpUp

log = logging.getLogger("evcharging.driver")

CENTRAL_UNAVAILABLE = "Central is unavailable"


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
class _RequestTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _RetryHello:
    pass


@dataclass(frozen=True, slots=True)
class _StillWaiting:
    session_id: str


# --- state ------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    """One request that waits for Central's answer."""

    kind: m.RequestKind
    cp_id: str | None = None
    session_id: str | None = None
    timer: Scheduled | None = None
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
    timer: Scheduled | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "cp_id": self.cp_id,
            "state": "supplying" if self.plugged else "authorized",
            "energy_kwh": self.energy_kwh, "cost_eur": self.cost_eur, "power_kw": self.power_kw,
        }


class DriverActor(SupervisedActor):
    """One driver's requests: correlation, timeouts, the hello, the live supply, tickets.

    The services file is run by the ``services`` actor (it tells
    ``RequestCharge`` and learns the outcome from ServiceAuthorised /
    ServiceFailed / TicketShown); everything the person sees is told as news
    to the ``output`` actor, which also turns typed lines into the commands
    handled here. ``on_finish(reason)`` is called on ``quit``; by default it
    stops this actor's supervisor (the whole driver system), without waiting.
    """

    def __init__(
        self,
        driver_id: str,
        directory: Directory,
        *,
        request_timeout: float = 10.0,
        hello_backoff_max: float = 15.0,
        ticket_notice_interval: float = 30.0,
        on_finish: Callable[[str], None] | None = None,
        publisher: str = "publisher",
        pump: str = "pump",
        services: str = "services",
        output: str = "output",
        verifier: bytes | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        """``verifier``: the verifier of this driver's secret (``security.verifier``, computed once per
        process by the caller); with it every request is signed, without it they go unsigned."""
        super().__init__(supervision=supervision)
        self.driver_id = driver_id
        self._verifier = verifier
        self.directory = directory
        self.request_timeout = request_timeout
        self.ticket_notice_interval = ticket_notice_interval
        self._on_finish = on_finish
        self._publisher = publisher
        self._pump = pump
        self._services = services
        self._output = output
        self._hello_delay = backoff_strategy(0.5, hello_backoff_max)
        # links
        self._pump_urn: str | None = None
        self._online = False
        self._cps_after: str | None = None  # next_after of the last page of CPs shown
        self._deferred: list[m.Command] = []
        self._timers: list[Scheduled] = []
        # requests and supply
        self._pending: dict[str, _Pending] = {}
        self._expired: OrderedDict[str, _Pending] = OrderedDict()
        self._hello_attempts = 0
        self._hello_answered = False
        self._hello_retry: Scheduled | None = None
        self._live: _Live | None = None
        self._tickets: dict[str, protocol.TicketInfo] = {}  # shown, by session id, in the order shown
        self._events_seen: set[tuple[str, str]] = set()
        self._cancelled: set[str] = set()
        # the services runner's progress, as it last told it (for the asks)
        self._progress: m.ServicesProgress | None = None

    # --- lifecycle -------------------------------------------------------------
    def setup(self) -> None:
        self.directory.tell(self._services, m.DriverStarted())  # a restart lost every pending request

    def teardown(self) -> None:
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
            case m.ListCps() | m.ChargeAt() | m.StopSupply() | m.ShowStatus() | m.Quit():
                self._on_command(message)
            case m.RequestCharge(cp_id, service):
                self._request(_Pending("charge", cp_id, for_service=service),
                              lambda corr: protocol.ChargeRequest(driver_id=self.driver_id, cp_id=cp_id,
                                                                  correlation_id=corr),
                              f"charge request for {cp_id}")
            case m.RunnerStarted():
                if self._hello_answered:
                    self._central_answered(hello_failed=False)
            case m.ServicesProgress():
                self._progress = message
            case PumpUp(pump, name) if name == self._pump:
                self._on_pump_up(pump)
            case PumpDown(pump, name, reason) if name == self._pump and pump.actor_urn == self._pump_urn:
                log.debug("driver: the pump is down (%s); requests wait for the next one", reason)
                self._online = False
            case _RequestTimeout(corr):
                self._on_timeout(corr)
            case _RetryHello():
                self._hello_retry = None
                if not self._hello_answered:
                    self._send_hello()
            case _StillWaiting(sid):
                self._still_waiting(sid)
            case PublishFailed(token, reason):
                log.warning("Could not send %s to Kafka: %s", token or "a message", reason)
            case Published():
                pass
            case DriverResults():
                return [dict(r) for r in self._progress.results] if self._progress is not None else []
            case DriverStatus():
                return self._status()
            case _:
                log.debug("driver: ignoring %s", type(message).__name__)
        return None

    # --- timers, publishing, telling ------------------------------------------------
    def _later(self, delay: float, message: Any) -> Scheduled:
        self._timers = [t for t in self._timers if t.active()]
        timer = schedule(delay, self.actor_ref, message)
        self._timers.append(timer)
        return timer

    def _publish(self, message: protocol.Message, what: str) -> None:
        """The one place requests leave: signed here when the driver has a secret (the record's key
        stays the driver id; its value becomes the ``signed`` envelope, docs/protocol.md)."""
        if self._verifier is not None:
            message = security.sign(self._verifier, self.driver_id, message)
        if not self.directory.tell(self._publisher, Publish("driver_requests", self.driver_id, message,
                                                            self.actor_ref, what)):
            log.warning("Could not send %s: the Kafka publisher is restarting", what)

    def _request(self, pending: _Pending, build: Callable[[str], protocol.Message], what: str) -> str:
        corr = protocol.new_id()
        pending.timer = self._later(self.request_timeout, _RequestTimeout(corr))
        self._pending[corr] = pending
        self._publish(build(corr), what)
        return corr

    def _show(self, news: Any) -> None:
        """Tell the output actor something to show (dropped while it restarts)."""
        self.directory.tell(self._output, news)

    def _to_services(self, fact: Any) -> None:
        """Tell the services runner (there is none in interactive mode)."""
        self.directory.tell(self._services, fact)

    def _central_answered(self, hello_failed: bool) -> None:
        pending = next((p.for_service for p in self._pending.values()
                        if p.kind == "charge" and p.for_service is not None), None)
        self._to_services(m.CentralAnswered(self._live.session_id if self._live is not None else None,
                                            hello_failed, pending))

    def _live_changed(self) -> None:
        self._to_services(m.LiveChanged(self._live.as_dict() if self._live is not None else None,
                                        tuple(self._tickets)))

    # --- the pump: nothing is sent before it is positioned --------------------------
    def _on_pump_up(self, pump: pykka.ActorRef[Any]) -> None:
        """The pump (the first, or a restarted one) is positioned. A restarted pump starts at
        the end again, so records sent while it was away are lost to us; the hello recovers them."""
        if self._pump_urn is not None and pump.actor_urn != self._pump_urn:
            self._show(m.LinkNews("restarted"))
        self._pump_urn = pump.actor_urn
        self._go_online()

    def _go_online(self) -> None:
        first = self._hello_attempts == 0
        self._online = True
        if first:
            self._show(m.LinkNews("connected"))
        else:
            self._hello_answered = False
        if not any(p.kind == "hello" for p in self._pending.values()):
            if self._hello_retry is not None:
                self._hello_retry.cancel()
                self._hello_retry = None
            self._send_hello()
        deferred, self._deferred = self._deferred, []
        for command in deferred:
            self._on_command(command)

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
        active = msg.active_session
        adopted: protocol.ActiveSessionInfo | None = None
        plugged = False
        if active is not None and active.session_id not in self._tickets.keys() | self._cancelled:
            live = self._adopt(active.session_id, active.cp_id)
            live.energy_kwh, live.cost_eur = active.energy_kwh, active.cost_eur
            live.plugged = live.plugged or active.started_at is not None or active.state.upper() == "SUPPLYING" \
                or active.energy_kwh > 0
            adopted, plugged = active, live.plugged
            self._live_changed()
        fresh = [t for t in msg.tickets if t.session_id not in self._tickets]
        self._show(m.HelloNews(msg, adopted, plugged, len(fresh)))
        for t in msg.tickets:
            self._on_ticket(t)
        self._central_answered(hello_failed=False)

    # --- records from our partition -------------------------------------------------
    def _on_record(self, item: Inbound) -> None:
        if item.key != self.driver_id:
            return  # the partition is shared with other drivers
        if item.message is None:  # undecodable: item.error says why
            log.warning("Ignored an unreadable record from Central: %s", item.error)
            return
        msg = item.message
        if getattr(msg, "driver_id", self.driver_id) != self.driver_id:
            return
        try:
            self._dispatch(msg)
        except Exception as exc:  # one odd record must not stall the pump
            log.exception("Could not handle a %s from Central: %s", msg.TYPE, exc)

    def _dispatch(self, msg: protocol.Message) -> None:
        corr = protocol.correlation_of(msg)
        match msg:
            case protocol.DriverHelloResponse() | protocol.AvailableCpsResponse() if msg.status != "ok":
                self._on_refused_answer(corr, msg.status)
            case protocol.DriverHelloResponse():
                pending = self._settle(corr, "hello")
                if pending is not None and not (pending.expired and self._hello_answered):
                    self._on_hello(msg)  # a late answer is news only while no later one came
            case protocol.AvailableCpsResponse():
                if self._settle(corr, "list") is not None:
                    self._cps_after = msg.next_after if msg.more else None  # where "list more" goes on
                    self._show(m.CpsNews(msg))
            case protocol.ChargeResponse():
                self._on_charge_response(msg)
            case protocol.StopChargingResponse():
                if self._settle(corr, "stop") is not None:
                    self._show(m.StopNews(msg))
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
        if pending.kind == "hello":
            if self._hello_answered:
                return  # another hello of ours was answered meanwhile
            delay = self._hello_delay(self._hello_attempts)
            self._show(m.UnansweredNews("hello", self.request_timeout, retry_in=delay))
            self._hello_retry = self._later(delay, _RetryHello())
            self._central_answered(hello_failed=True)
            return
        self._show(m.UnansweredNews(pending.kind, self.request_timeout, cp_id=pending.cp_id))
        if pending.kind == "charge" and pending.for_service is not None:
            reason = f"{CENTRAL_UNAVAILABLE} (no answer within {self.request_timeout:g} s)"
            self._to_services(m.ServiceFailed(pending.for_service, "unavailable", reason))

    def _on_refused_answer(self, corr: str | None, status: str) -> None:
        """A hello or list answered with a status that is not "ok" (these answers carry no reason:
        Central sends an ``error`` with the reason first, which settles the request; this is the
        fallback for a Central that sends only the answer)."""
        if corr is not None and corr in self._pending:
            self._on_error(corr, f"{status} by Central")

    def _on_error(self, corr: str | None, reason: str) -> None:
        pending = self._pending.pop(corr, None) if corr else None
        if pending is None:
            self._show(m.RefusedNews(reason))
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._show(m.RefusedNews(reason, pending.kind))
        if pending.kind == "hello":
            self._hello_retry = self._later(self._hello_delay(self._hello_attempts), _RetryHello())
            self._central_answered(hello_failed=True)
        elif pending.kind == "charge" and pending.for_service is not None:
            self._to_services(m.ServiceFailed(pending.for_service, "denied", reason))

    # --- a supply, step by step --------------------------------------------------
    def _on_charge_response(self, msg: protocol.ChargeResponse) -> None:
        corr = msg.correlation_id
        pending = self._pending.pop(corr, None)
        if pending is None:
            self._late_charge_response(msg)
            return
        if pending.timer is not None:
            pending.timer.cancel()
        if msg.status == "authorized" and msg.session_id in self._tickets:
            # its ticket came first (Central answered after a restart): the service is done
            if pending.for_service is not None:
                self._to_services(m.ServiceAuthorised(pending.for_service, msg.session_id))
                self._to_services(m.TicketShown(self._tickets[msg.session_id]))
            return
        if msg.status == "authorized" and msg.session_id:
            self._announce(msg.session_id, msg.cp_id)
            self._adopt(msg.session_id, msg.cp_id)
            self._live_changed()
            if pending.for_service is not None:
                self._to_services(m.ServiceAuthorised(pending.for_service, msg.session_id))
            return
        self._show(m.DeniedNews(msg))
        if pending.for_service is not None:
            self._to_services(m.ServiceFailed(pending.for_service, "denied", msg.reason or "no reason given",
                                              msg.session_id or pending.session_id))

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
            self._show(m.LateChargeNews(msg, "denied"))
            return
        if late.for_service is None and self._live is None:
            self._show(m.LateChargeNews(msg, "adopted"))
            self._adopt(msg.session_id, msg.cp_id)
            self._live_changed()
            return
        # The service was already counted as failed: do not hold the CP for nothing.
        self._show(m.LateChargeNews(msg, "cancelled"))
        self._cancelled.add(msg.session_id)
        if self._live is not None and self._live.session_id == msg.session_id:
            self._drop_live()
        session_id = msg.session_id
        self._request(_Pending("stop", msg.cp_id, session_id),
                      lambda corr: protocol.StopChargingRequest(driver_id=self.driver_id, session_id=session_id,
                                                                correlation_id=corr), "stop request")

    def _on_event(self, ev: protocol.SupplyEvent) -> None:
        if ev.session_id in self._tickets:
            return  # late or replayed news about a supply already billed
        key = (ev.session_id, f"{ev.event}:{ev.detail or ''}")
        if key in self._events_seen:
            return  # redelivered
        self._events_seen.add(key)
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
        if ev.event == "authorized":
            self._announce(ev.session_id, ev.cp_id)
            if pending is not None and pending.session_id in (None, ev.session_id):
                # Central's answer to our pending request, told as an event: its charge_response may
                # never come (Central restarted after opening the session, then confirmed it with the CP)
                self._settle(self._corr_of(pending), "charge")
                self._adopt(ev.session_id, ev.cp_id)
                self._live_changed()
                if pending.for_service is not None:
                    self._to_services(m.ServiceAuthorised(pending.for_service, ev.session_id))
            return
        self._show(m.StepNews(ev))
        if ev.event == "denied" and pending is not None and pending.session_id == ev.session_id:
            # the denial of our pending request, told as an event: the request is over
            self._settle(self._corr_of(pending), "charge")
            if pending.for_service is not None:
                self._to_services(m.ServiceFailed(pending.for_service, "denied", ev.detail or "denied",
                                                  ev.session_id))
        elif ev.event == "denied" and live is not None:
            # authorised, then cancelled by Central before any supply: no ticket will come
            self._cancelled.add(ev.session_id)
            self._drop_live()
            self._live_changed()
            self._to_services(m.SessionCancelled(ev.session_id, ev.detail or "denied"))
        elif ev.event == "plugged_in":
            if live is None and ev.session_id not in self._cancelled:
                live = self._adopt(ev.session_id, ev.cp_id)
            if live is not None:
                live.plugged = True
                self._live_changed()

    def _is_stale(self, ev: protocol.SupplyEvent) -> bool:
        """An event about a request given up in file mode (Central was away): say it once."""
        if ev.session_id in self._cancelled:
            return True
        given_up = any(p.kind == "charge" and p.cp_id == ev.cp_id and p.for_service is not None
                       for p in self._expired.values())
        if not given_up or ev.event not in ("requested", "waiting_cp", "authorized"):
            return False
        self._cancelled.add(ev.session_id)
        self._show(m.StaleNews(ev))
        return True

    def _on_status_update(self, up: protocol.ChargingStatusUpdate) -> None:
        if up.session_id in self._tickets or up.session_id in self._cancelled:
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
        self._show(m.ConsumptionNews(up))

    def _on_ticket(self, t: protocol.Ticket | protocol.TicketInfo) -> None:
        """Show a ticket once, acknowledge it every time (an ack may have been lost)."""
        self._publish(protocol.TicketAck(driver_id=self.driver_id, session_id=t.session_id), "ticket ack")
        if t.session_id in self._tickets:
            return
        info = protocol.TicketInfo(session_id=t.session_id, cp_id=t.cp_id, price_eur_kwh=t.price_eur_kwh,
                                   energy_kwh=t.energy_kwh, cost_eur=t.cost_eur, started_at=t.started_at,
                                   ended_at=t.ended_at, end_reason=t.end_reason)
        self._tickets[t.session_id] = info
        self._show(m.TicketNews(info))
        if self._live is not None and self._live.session_id == t.session_id:
            self._drop_live()
        pending = self._pending_charge(t.cp_id)
        if pending is not None and pending.session_id == t.session_id and pending.for_service is not None:
            # the charge_response was lost but the supply happened: it is this service's ticket
            self._settle(self._corr_of(pending), "charge")
            self._to_services(m.ServiceAuthorised(pending.for_service, t.session_id))
        self._live_changed()
        self._to_services(m.TicketShown(info))

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
            self._show(m.StillWaitingNews(session_id))
            live.timer = self._later(self.ticket_notice_interval, _StillWaiting(session_id))
        else:
            live.timer = self._later(self.ticket_notice_interval - quiet, _StillWaiting(session_id))

    def _announce(self, session_id: str, cp_id: str) -> None:
        """Show an authorisation once, whichever of its two messages (event, response) comes first."""
        if (session_id, "shown:authorized") in self._events_seen:
            return
        self._events_seen.add((session_id, "shown:authorized"))
        self._show(m.AuthorisedNews(cp_id, session_id))

    def _corr_of(self, pending: _Pending) -> str:
        return next(c for c, p in self._pending.items() if p is pending)

    def _pending_charge(self, cp_id: str) -> _Pending | None:
        return next((p for p in self._pending.values() if p.kind == "charge" and p.cp_id == cp_id), None)

    def _finish(self, reason: str) -> None:
        if self._on_finish is not None:
            self._on_finish(reason)
        elif self.supervision is not None:
            self.supervision.supervisor.stop(block=False)
        else:
            self.actor_ref.stop(block=False)

    # --- commands from the console --------------------------------------------------
    def _on_command(self, command: m.Command) -> None:
        if isinstance(command, (m.ListCps, m.ChargeAt, m.StopSupply)) and not self._online:
            self._show(m.CommandNews("deferred", command))
            self._deferred.append(command)
            return
        live = self._live
        match command:
            case m.ListCps(more):
                after = self._cps_after if more else None  # "list more" after the last page: the first again
                self._request(_Pending("list"), lambda corr: protocol.AvailableCpsRequest(
                    driver_id=self.driver_id, correlation_id=corr, after=after), "list request")
                self._show(m.CommandNews("list_sent", command))
            case m.ChargeAt(cp_id):
                self._console_charge(command, cp_id)
            case m.StopSupply() if live is None:
                self._show(m.CommandNews("nothing_to_stop", command))
            case m.StopSupply():
                assert live is not None
                self._request(_Pending("stop", live.cp_id, live.session_id),
                              lambda corr: protocol.StopChargingRequest(
                                  driver_id=self.driver_id, session_id=live.session_id, correlation_id=corr),
                              "stop request")
                self._show(m.CommandNews("stop_sent", command, cp_id=live.cp_id, session_id=live.session_id))
            case m.ShowStatus():
                progress = self._progress
                self._show(m.StatusNews(
                    self.driver_id, self._online, self._hello_answered,
                    live.as_dict() if live is not None else None, len(self._tickets),
                    len(progress.results) if progress is not None else None,
                    progress.total if progress is not None else None))
            case m.Quit():
                self._show(m.CommandNews("leaving", command, cp_id=live.cp_id if live is not None else None))
                self._finish("quit")

    def _console_charge(self, command: m.ChargeAt, cp_id: str) -> None:
        if self._live is not None:
            self._show(m.CommandNews("already_supplying", command, cp_id=self._live.cp_id,
                                     session_id=self._live.session_id))
            return
        if any(p.kind == "charge" for p in self._pending.values()):
            self._show(m.CommandNews("charge_pending", command))
            return
        try:
            protocol.encode(protocol.ChargeRequest(driver_id=self.driver_id, cp_id=cp_id, correlation_id="x"))
        except protocol.ProtocolError as exc:
            self._show(m.CommandNews("bad_cp", command, cp_id=cp_id, detail=str(exc)))
            return
        self._request(_Pending("charge", cp_id), lambda corr: protocol.ChargeRequest(
            driver_id=self.driver_id, cp_id=cp_id, correlation_id=corr), f"charge request for {cp_id}")
        self._show(m.CommandNews("charge_sent", command, cp_id=cp_id))

    # --- the asks -------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        progress = self._progress
        return {
            "driver_id": self.driver_id,
            "services_total": progress.total if progress is not None else 0,
            "services_done": len(progress.results) if progress is not None else 0,
            "done": progress.finished if progress is not None else False,
            "active_session": self._live.as_dict() if self._live is not None else None,
            "tickets_seen": list(self._tickets),
        }
