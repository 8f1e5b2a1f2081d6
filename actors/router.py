"""SessionRouter: hands Engine telemetry and completions to their session actors.

It is the target of Central's Kafka pump for ``charging_session_data`` and
``charging_session_complete``. It answers the pump's ask only when every
completion in the delivery is billed (so the offsets are committed only
after the database commit); telemetry is handed over with a ``tell``, since
the completion carries the final figures anyway, and grouped: one
``Telemetry`` per session per poll, so a backlog costs one actor hop per
session rather than per record. Central's panel figures take one
``ProgressBatch`` per poll (Central keeps only readings newer than the
last). A completion nobody owns (a replay after the session ended, or a
supply Central lost track of) goes straight to the ledger, which bills it
once or returns the existing ticket. A record it can never handle (one that
could not be decoded, or of the wrong type for its topic) is answered as
``SetAside``: the pump writes it to ``<topic>.dead`` and Central, told
``DeadLettered``, shows it as a fault. Central not running yet is
``TargetUnavailable`` (waited for, never dead-lettered).
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from actors.messages import (
    BillOrphan,
    BillRejected,
    ProgressBatch,
    Ready,
    RouterStats,
    SessionBilled,
    SessionProgress,
    Telemetry,
)
from actors.runtime import Directory, SupervisedActor, Supervision
from actors.session import ticket_message
from persistence import TicketRecord
from transport import protocol
from transport.kafka import DeadLettered, Delivery, Handled, Inbound, Publish, SetAside, TargetUnavailable

log = logging.getLogger("evcharging.central.router")


class SessionRouter(SupervisedActor):
    """See the module docstring."""

    def __init__(self, directory: Directory, *, ask_timeout: float = 30.0,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.directory = directory
        self.ask_timeout = ask_timeout
        self._central_ready = False
        self.stats = {"data": 0, "completions": 0, "orphans": 0, "unrouted_data": 0, "bad": 0, "rejected": 0}

    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                return self._route(items)
            case DeadLettered():
                self.directory.tell("central", message)  # Central shows it as a fault
            case RouterStats():
                return dict(self.stats)
        return None

    def _route(self, items: tuple[Inbound, ...]) -> Handled:
        """Route one poll; set aside (for the pump's dead-letter topic) what can never be handled."""
        if not self._central_ready:
            central = self.directory.get("central")
            if central is None:
                raise TargetUnavailable("Central is not running yet; the records will be redelivered")
            central.ask(Ready(), timeout=self.ask_timeout)  # sessions reloaded before we route
            self._central_ready = True
        waiting: list[tuple[Inbound, protocol.ChargeCompletion, pykka.Future[Any]]] = []
        telemetry: dict[str, list[protocol.ChargingData]] = {}
        set_aside: list[SetAside] = []
        for item in items:
            msg = item.message
            if msg is None:  # undecodable (the pump sets these aside itself): item.error says why
                self.stats["bad"] += 1
                set_aside.append(SetAside(item, f"cannot decode: {item.error}"))
                continue
            if isinstance(msg, protocol.ChargingData) and item.topic == "charging_session_data":
                self.stats["data"] += 1
                telemetry.setdefault(msg.session_id, []).append(msg)
            elif isinstance(msg, protocol.ChargeCompletion) and item.topic == "charging_session_complete":
                self._telemetry(telemetry.pop(msg.session_id, None))  # before its completion
                self.stats["completions"] += 1
                ref = self.directory.get(f"session:{msg.session_id}")
                if ref is not None:
                    try:
                        waiting.append((item, msg, ref.ask(msg, block=False)))
                        continue
                    except pykka.ActorDeadError:
                        pass
                self._orphan(item, msg, set_aside)
            else:
                self.stats["bad"] += 1
                set_aside.append(SetAside(item, f"a {msg.TYPE} record does not belong on {item.topic}"))
        progress: list[SessionProgress] = []
        for records in telemetry.values():
            self._telemetry(records)
            d = max(records, key=lambda r: r.seq)
            progress.append(SessionProgress(d.session_id, d.cp_id, d.seq, d.energy_kwh, d.cost_eur, d.power_kw))
        if progress:
            self.directory.tell("central", ProgressBatch(tuple(progress)))
        for item, msg, future in waiting:
            try:
                answer = future.get(timeout=self.ask_timeout)
            except pykka.ActorDeadError:
                self._orphan(item, msg, set_aside)  # the session stopped right after billing: the ledger knows
                continue
            if isinstance(answer, BillRejected):
                self._reject(item, answer, set_aside)
        return Handled(tuple(set_aside))

    def _telemetry(self, records: list[protocol.ChargingData] | None) -> None:
        if records and not self.directory.tell(f"session:{records[0].session_id}",
                                               Telemetry(records[0].session_id, tuple(records))):
            self.stats["unrouted_data"] += len(records)

    def _reject(self, item: Inbound, r: BillRejected, set_aside: list[SetAside]) -> None:
        """A completion Central does not bill (the ledger audited it): its record goes to the dead letters."""
        self.stats["rejected"] += 1
        set_aside.append(SetAside(item, f"completion of session {r.session_id} rejected ({r.kind}): {r.reason}"))

    def _orphan(self, item: Inbound, c: protocol.ChargeCompletion, set_aside: list[SetAside]) -> None:
        self.stats["orphans"] += 1
        ledger = self.directory.get("ledger")
        if ledger is None:  # restarting: not the record's fault, so it does not count as an attempt
            raise TargetUnavailable("the ledger is not running; the completion will be redelivered")
        result: tuple[TicketRecord, bool] | BillRejected | None = ledger.ask(BillOrphan(c), block=True,
                                                                             timeout=self.ask_timeout)
        if result is None:  # no such session in the database: no retry can cure that
            self.stats["rejected"] += 1
            set_aside.append(SetAside(item, f"completion for unknown session {c.session_id} (CP {c.cp_id})"))
            return
        if isinstance(result, BillRejected):
            self._reject(item, result, set_aside)
            return
        ticket, created = result
        self.directory.tell("publisher", Publish("driver_responses", ticket.driver_id, ticket_message(ticket)))
        self.directory.tell("central", SessionBilled(ticket.session_id, ticket.cp_id, ticket.driver_id,
                                                     ticket.energy_kwh, ticket.cost_eur,
                                                     ticket.end_reason or c.end_reason, created))
