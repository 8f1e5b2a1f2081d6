"""DriverConsole: what the driver app shows the person, and what the person types.

Every sentence the driver app prints is worded here, from the typed news the
``driver`` and ``services`` actors tell (``actors/driver_messages.py``); the
lines typed at the console (``ConsoleLine`` from the ConsoleReader) are
parsed here into commands told to ``driver``. It keeps no state of its own
beyond its settings, so a restart loses nothing. It logs on the
``evcharging.driver`` logger: that is the app's terminal and log file.
"""

from __future__ import annotations

import logging
from typing import Any

from actors import driver_messages as m
from actors.console import ConsoleLine
from actors.runtime import Directory, SupervisedActor, Supervision
from transport import protocol

log = logging.getLogger("evcharging.driver")

CENTRAL_UNAVAILABLE = "Central is unavailable"
NOT_AUTHENTICATED = "not authenticated"  # how Central's denials of an unsigned or wrongly signed request begin
AUTH_HINT = ("Central does not accept this driver's requests as {driver}'s: start the app with the driver's "
             "secret (--secret-file FILE or EV_DRIVER_SECRET) once the driver is registered")
HELP = (
    "Commands:\n"
    "  list          show the charging points (id, location, price, state), a page at a time\n"
    "  list more     the next page of charging points\n"
    "  charge CP_ID  ask Central for a supply at CP_ID\n"
    "  stop          stop your live supply (the ticket follows)\n"
    "  status        what this app knows right now\n"
    "  help          this text\n"
    "  quit          leave the app (a live supply goes on; come back for the ticket)"
)


class DriverConsole(SupervisedActor):
    """Shows the news of one driver; turns typed lines into commands for ``driver``.

    ``services_total`` None means interactive mode (``charge`` is typed by the
    person); a number means a services file runs the supplies.
    """

    def __init__(self, driver_id: str, directory: Directory, *, services_total: int | None = None,
                 driver: str = "driver", supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.driver_id = driver_id
        self.directory = directory
        self.services_total = services_total
        self._driver = driver
        self._hinted = False

    def setup(self) -> None:
        mode = f"{self.services_total} service(s) from a file" if self.services_total is not None else "interactive"
        log.info("Driver %s starting (%s); connecting to Kafka", self.driver_id, mode)

    def on_receive(self, message: Any) -> Any:
        match message:
            case ConsoleLine(text):
                self._on_line(text)
            case m.LinkNews(event):
                if event == "connected":
                    log.info("Connected to Kafka; saying hello to Central")
                else:
                    log.warning("The Kafka link restarted; asking Central again what was missed")
            case m.HelloNews():
                self._on_hello(message)
            case m.TicketNews(t):
                log.info("Ticket for %s at %s: %.3f kWh × %.2f €/kWh = %.2f € (%s)", t.session_id, t.cp_id,
                         t.energy_kwh, t.price_eur_kwh, t.cost_eur, t.end_reason.replace("_", " "))
            case m.ConsumptionNews(up):
                log.info("%s: %.3f kWh · %.2f € · %.1f kW", up.cp_id, up.energy_kwh, up.cost_eur, up.power_kw)
            case m.StepNews(ev):
                self._on_step(ev)
            case m.AuthorisedNews(cp_id, session_id):
                log.info("Authorised at %s (session %s) — plug in your vehicle", cp_id, session_id)
            case m.DeniedNews(resp):
                log.warning("Denied at %s: %s", resp.cp_id, resp.reason or "no reason given")
                self._auth_hint(resp.reason)
            case m.CpsNews(resp):
                self._show_cps(resp)
            case m.StopNews(resp):
                if resp.status == "ok":
                    log.info("Central is stopping your supply%s; the ticket follows",
                             f" (session {resp.session_id})" if resp.session_id else "")
                else:
                    log.warning("Central could not stop the supply: %s", resp.reason or resp.status)
                    self._auth_hint(resp.reason)
            case m.UnansweredNews():
                self._on_unanswered(message)
            case m.RefusedNews(reason, kind):
                if kind is None:
                    log.warning("Central reported an error: %s", reason)
                else:
                    log.warning("Central refused the %s request: %s", kind, reason)
                self._auth_hint(reason)
            case m.LateChargeNews(resp, action):
                self._on_late(resp, action)
            case m.StaleNews(ev):
                log.info("Central is now handling the request for %s it did not answer in time (session %s); "
                         "if authorised, it will be cancelled", ev.cp_id, ev.session_id)
            case m.StillWaitingNews(session_id):
                log.info("still waiting for the ticket of %s", session_id)
            case m.CommandNews():
                self._on_command_news(message)
            case m.StatusNews():
                self._on_status(message)
            case m.ServiceNews():
                self._on_service(message)
            case _:
                log.debug("driver console: ignoring %s", type(message).__name__)
        return None

    # --- what the person types -------------------------------------------------------
    def _on_line(self, text: str) -> None:
        words = text.split()
        if not words:
            return
        cmd, args = words[0].lower(), words[1:]
        command: m.Command | None = None
        match cmd:
            case "list":
                command = m.ListCps(more=bool(args) and args[0].lower() == "more")
            case "charge" if self.services_total is not None:
                log.info("This app runs a services file; it requests the supplies itself")
            case "charge" if len(args) == 1:
                command = m.ChargeAt(args[0])
            case "charge":
                log.info("Usage: charge CP_ID")
            case "stop":
                command = m.StopSupply()
            case "status":
                command = m.ShowStatus()
            case "help" | "?":
                log.info(HELP)
            case "quit" | "exit":
                command = m.Quit()
            case _:
                log.info("Unknown command %r — type 'help' for the commands", cmd)
        if command is not None and not self.directory.tell(self._driver, command):
            log.info("The app is restarting; type '%s' again in a moment", text)

    # --- news ---------------------------------------------------------------------------
    def _auth_hint(self, reason: str | None) -> None:
        """After the first "not authenticated" denial: say once what to do about it."""
        if not self._hinted and reason is not None and reason.startswith(NOT_AUTHENTICATED):
            self._hinted = True
            log.warning(AUTH_HINT.format(driver=self.driver_id))

    def _on_hello(self, news: m.HelloNews) -> None:
        msg = news.response
        if msg.status != "ok":
            log.warning("Central answered the hello with status %s", msg.status)
        active = news.adopted
        if active is not None:
            if news.plugged:
                log.info("You are charging at %s: %.2f kWh, %.2f € (session %s)",
                         active.cp_id, active.energy_kwh, active.cost_eur, active.session_id)
            else:
                log.info("Your supply at %s (session %s) is authorised, waiting for the plug-in",
                         active.cp_id, active.session_id)
        if news.fresh_tickets:
            log.info("You have %d ticket(s) you had not seen:", news.fresh_tickets)
        elif msg.active_session is None:
            log.info("Central answered: no supply in progress, no missed tickets")

    def _on_step(self, ev: protocol.SupplyEvent) -> None:
        detail = f" ({ev.detail})" if ev.detail else ""
        match ev.event:
            case "requested":
                log.info("Central received the request for %s (session %s)", ev.cp_id, ev.session_id)
            case "waiting_cp":
                log.info("Waiting for %s to answer", ev.cp_id)
            case "denied":
                log.warning("Denied at %s%s", ev.cp_id, detail)
            case "plugged_in":
                log.info("Plugged in at %s — the supply has started", ev.cp_id)
            case "fault":
                log.warning("Fault at %s%s — the supply ends; the ticket follows", ev.cp_id, detail)
            case "stopped":
                log.info("Supply at %s stopped%s; the ticket follows", ev.cp_id, detail)
            case "central_unavailable":
                log.warning("%s%s", CENTRAL_UNAVAILABLE, detail)

    def _on_unanswered(self, news: m.UnansweredNews) -> None:
        wait = f"no answer within {news.wait_s:g} s"
        match news.kind:
            case "hello":
                log.warning("%s (%s) — will retry in %.1f s", CENTRAL_UNAVAILABLE, wait, news.retry_in or 0.0)
            case "list":
                log.warning("%s — %s to the list request", CENTRAL_UNAVAILABLE, wait)
            case "stop":
                log.warning("%s — %s to the stop request; try again", CENTRAL_UNAVAILABLE, wait)
            case "charge":
                log.warning("%s — %s to the charge request for %s", CENTRAL_UNAVAILABLE, wait, news.cp_id)

    def _on_late(self, msg: protocol.ChargeResponse, action: str) -> None:
        match action:
            case "denied":
                log.info("Late answer from Central: %s denied (%s)", msg.cp_id, msg.reason or "no reason given")
            case "adopted":
                log.info("Late answer from Central: authorised at %s (session %s) — plug in your vehicle",
                         msg.cp_id, msg.session_id)
            case "cancelled":
                log.info("Late answer from Central: authorised at %s (session %s), but that request was given up; "
                         "cancelling it", msg.cp_id, msg.session_id)

    def _on_command_news(self, news: m.CommandNews) -> None:
        match news.outcome:
            case "deferred":
                log.info("Not connected to Kafka yet; '%s' will be sent once connected", _typed(news.command))
            case "already_supplying":
                log.info("You are already supplying at %s (session %s); type 'stop' first",
                         news.cp_id, news.session_id)
            case "charge_pending":
                log.info("A charge request is already waiting for Central's answer")
            case "bad_cp":
                log.info("Cannot request %r: %s", news.cp_id, news.detail)
            case "charge_sent":
                log.info("Requested a supply at %s; waiting for Central", news.cp_id)
            case "list_sent":
                log.info("Asking Central for the charging points")
            case "nothing_to_stop":
                log.info("You have no supply to stop")
            case "stop_sent":
                log.info("Asking Central to stop your supply at %s", news.cp_id)
            case "leaving":
                if news.cp_id is not None:
                    log.info("Leaving; your supply at %s goes on — start the app again to see it and its ticket",
                             news.cp_id)
                else:
                    log.info("Bye")

    def _show_cps(self, resp: protocol.AvailableCpsResponse) -> None:
        """One page of CPs; when Central has more, say how many in all and how to see the next page."""
        cps = resp.charging_points
        if not cps:
            log.info("Central knows no charging points yet" if not resp.total else "No more charging points")
            return
        rows = [("CP", "LOCATION", "PRICE", "STATE")] + [
            (c.cp_id, c.location, f"{c.price_eur_kwh:.2f} €/kWh", c.state) for c in cps]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        available = sum(1 for c in cps if c.state == "ACTIVE")
        if resp.more:
            log.info("%d charging point(s) of %s, %d of these available (type 'list more' for the next page):\n%s",
                     len(cps), resp.total if resp.total is not None else "more", available, "\n".join(lines))
        else:
            log.info("%d charging point(s), %d available:\n%s", len(cps), available, "\n".join(lines))

    def _on_status(self, s: m.StatusNews) -> None:
        link = "connected to Kafka" if s.online else "connecting to Kafka"
        central = "Central answered" if s.hello_answered else "waiting for Central"
        live = s.active_session
        supply = (f"supply at {live['cp_id']} (session {live['session_id']}): {live['energy_kwh']:.3f} kWh, "
                  f"{live['cost_eur']:.2f} €" if live is not None else "no supply in progress")
        parts = [f"Driver {s.driver_id}: {link}, {central}", supply, f"{s.tickets_seen} ticket(s) seen"]
        if s.services_total is not None:
            parts.append(f"services {s.services_done}/{s.services_total} done")
        log.info("; ".join(parts))

    def _on_service(self, news: m.ServiceNews) -> None:
        match news.event:
            case "requesting":
                log.info("Service %d/%d: requesting a supply at %s", news.number, news.total, news.cp_id)
            case "next":
                log.info("Next service in %g s", news.pause)
            case "after_ticket":
                log.info("The services begin after the ticket of %s", news.session_id)
            case "done":
                outcomes = list(news.outcomes)
                log.info("All %d services done: %d tickets, %d denied, %d unavailable", len(outcomes),
                         outcomes.count("ticket"), outcomes.count("denied"), outcomes.count("unavailable"))


def _typed(command: m.Command) -> str:
    """The console line a command came from (for 'will be sent once connected')."""
    match command:
        case m.ListCps():
            return "list"
        case m.ChargeAt(cp_id):
            return f"charge {cp_id}"
        case m.StopSupply():
            return "stop"
        case m.ShowStatus():
            return "status"
        case m.Quit():
            return "quit"
    return type(command).__name__
