"""ServicesRunner: walks the driver's services file, one supply per CP id.

It asks ``driver`` for each supply (``RequestCharge``) and learns how each
ended from the facts the driver tells (authorised, failed, ticket shown); the
next service is requested ``pause`` seconds after the last one ended. It
keeps the results, tells them to ``driver`` (which answers the
DriverStatus/DriverResults asks) and hands a snapshot to ``report`` when the
last service ended and when it stops.

Its progress lives in a :class:`ServicesProgressStore` that whoever starts
the driver creates once and passes to every generation: a restarted runner
(e.g. after the driver it depends on crashed) goes on with the service it
was at instead of starting the file again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors import driver_messages as m
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, schedule
from transport import protocol

log = logging.getLogger("evcharging.driver")


@dataclass(slots=True)
class ServicesProgressStore:
    """The runner's progress, kept across its restarts (touched only by the live runner)."""

    index: int = 0  # the service in progress (or next)
    started: bool = False
    finished: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    current_session: str | None = None  # the session of the service in progress, once authorised
    waiting_session: str | None = None  # a supply from before the start: the services begin after its ticket
    active_session: dict[str, Any] | None = None  # for the report
    tickets_seen: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _NextService:
    index: int


class ServicesRunner(SupervisedActor):
    """Runs ``services`` (CP ids) one by one; see the module docstring."""

    def __init__(
        self,
        driver_id: str,
        directory: Directory,
        services: Sequence[str],
        *,
        pause: float = 4.0,
        progress: ServicesProgressStore | None = None,
        exit_when_done: bool = False,
        on_finish: Callable[[str], None] | None = None,
        report: Callable[[dict[str, Any]], None] | None = None,
        driver: str = "driver",
        output: str = "output",
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.driver_id = driver_id
        self.directory = directory
        self.services = tuple(services)
        self.pause = pause
        self.exit_when_done = exit_when_done
        self._on_finish = on_finish
        self._on_report = report
        self._driver = driver
        self._output = output
        self.p = progress if progress is not None else ServicesProgressStore()
        # a runner that starts again in the middle of the file must first learn
        # whether the driver still waits for the service in progress
        self._resume = self.p.started and not self.p.finished
        self._timer: Scheduled | None = None

    # --- lifecycle -------------------------------------------------------------
    def setup(self) -> None:
        self._tell_progress()
        self.directory.tell(self._driver, m.RunnerStarted())

    def teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._send_report()

    def on_receive(self, message: Any) -> Any:
        match message:
            case m.CentralAnswered():
                self._on_central(message)
            case m.DriverStarted():
                # the driver lost its pending requests: resync on its next CentralAnswered
                self._resume = self.p.started and not self.p.finished
            case m.ServiceAuthorised(service, session_id) if service == self.p.index and not self.p.finished:
                self.p.current_session = session_id
            case m.ServiceFailed(service, outcome, reason, session_id) if service == self.p.index:
                if self.p.started and not self.p.finished:
                    self._ended(outcome, session_id=session_id, reason=reason)
            case m.SessionCancelled(session_id, reason):
                if self.p.started and not self.p.finished and self.p.current_session == session_id:
                    self._ended("denied", session_id=session_id, reason=reason)
            case m.TicketShown(ticket):
                self._on_ticket(ticket)
            case m.LiveChanged(active, tickets_seen):
                self.p.active_session, self.p.tickets_seen = active, tickets_seen
            case _NextService(index):
                if index == self.p.index and not self.p.finished:
                    self._request()
            case _:
                log.debug("services: ignoring %s", type(message).__name__)
        return None

    # --- the file -----------------------------------------------------------------
    def _on_central(self, msg: m.CentralAnswered) -> None:
        p = self.p
        if p.finished:
            return
        if p.started:
            if not self._resume:
                return
            self._resume = False
            if msg.pending_service == p.index:
                return  # the driver still waits for its answer
            if msg.live_session_id is not None and p.current_session in (None, msg.live_session_id):
                p.current_session = msg.live_session_id  # it was authorised meanwhile: wait for its ticket
                return
            if p.current_session is None and self._timer is None:
                self._request()  # its request was lost with the driver: ask again
            return
        if msg.live_session_id is not None and not msg.hello_failed:
            if p.waiting_session != msg.live_session_id:
                p.waiting_session = msg.live_session_id
                self._say(m.ServiceNews("after_ticket", session_id=msg.live_session_id))
            return
        self._begin()

    def _begin(self) -> None:
        self.p.started = True
        self.p.waiting_session = None
        if not self.services:
            self._finish_services()
            return
        self._request()

    def _on_ticket(self, ticket: protocol.TicketInfo) -> None:
        p = self.p
        if p.finished:
            return
        if p.started and p.current_session == ticket.session_id:
            self._ended("ticket", session_id=ticket.session_id, energy_kwh=ticket.energy_kwh,
                        cost_eur=ticket.cost_eur, ticket={
                            "session_id": ticket.session_id, "cp_id": ticket.cp_id,
                            "price_eur_kwh": ticket.price_eur_kwh, "energy_kwh": ticket.energy_kwh,
                            "cost_eur": ticket.cost_eur, "started_at": ticket.started_at,
                            "ended_at": ticket.ended_at, "end_reason": ticket.end_reason,
                        })
        elif not p.started and p.waiting_session == ticket.session_id:
            self._begin()  # a supply from before a restart: the services begin after its ticket

    def _request(self) -> None:
        self._timer = None
        p = self.p
        p.current_session = None
        cp_id = self.services[p.index]
        self._say(m.ServiceNews("requesting", number=p.index + 1, total=len(self.services), cp_id=cp_id))
        if not self.directory.tell(self._driver, m.RequestCharge(cp_id, p.index)):
            log.warning("Could not request service %d: the driver is restarting", p.index + 1)

    def _ended(self, outcome: str, *, session_id: str | None = None, energy_kwh: float = 0.0,
               cost_eur: float = 0.0, reason: str | None = None, ticket: dict[str, Any] | None = None) -> None:
        p = self.p
        p.results.append({
            "cp_id": self.services[p.index], "outcome": outcome, "session_id": session_id,
            "energy_kwh": energy_kwh, "cost_eur": cost_eur, "reason": reason, "ticket": ticket,
        })
        p.index += 1
        p.current_session = None
        if p.index >= len(self.services):
            self._finish_services()
            return
        self._tell_progress()
        self._say(m.ServiceNews("next", pause=self.pause))
        self._timer = schedule(self.pause, self.actor_ref, _NextService(p.index))

    def _finish_services(self) -> None:
        self.p.finished = True
        self._tell_progress()
        self._say(m.ServiceNews("done", outcomes=tuple(r["outcome"] for r in self.p.results)))
        self._send_report()
        if self.exit_when_done:
            self._finish("all services done")

    # --- telling others -------------------------------------------------------------
    def _say(self, news: m.ServiceNews) -> None:
        self.directory.tell(self._output, news)

    def _tell_progress(self) -> None:
        self.directory.tell(self._driver, m.ServicesProgress(
            len(self.services), tuple(dict(r) for r in self.p.results), self.p.finished))

    def _send_report(self) -> None:
        if self._on_report is None:
            return
        p = self.p
        snapshot = {
            "driver_id": self.driver_id, "services_total": len(self.services), "services_done": len(p.results),
            "done": p.finished, "active_session": p.active_session, "tickets_seen": list(p.tickets_seen),
            "services": [dict(r) for r in p.results],
        }
        try:
            self._on_report(snapshot)
        except Exception as exc:  # a full disk must not take the driver down
            log.warning("Could not save the results: %s", exc)

    def _finish(self, reason: str) -> None:
        if self._on_finish is not None:
            self._on_finish(reason)
        elif self.supervision is not None:
            self.supervision.supervisor.stop(block=False)
        else:
            self.actor_ref.stop(block=False)
