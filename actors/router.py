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
once or returns the existing ticket.
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from actors.messages import BillOrphan, ProgressBatch, Ready, RouterStats, SessionBilled, SessionProgress, Telemetry
from actors.runtime import Directory, SupervisedActor, Supervision
from actors.session import ticket_message
from persistence import TicketRecord
from transport import protocol
from transport.kafka import Delivery, Inbound, Publish

log = logging.getLogger("evcharging.central.router")


class SessionRouter(SupervisedActor):
    """See the module docstring."""

    def __init__(self, directory: Directory, *, ask_timeout: float = 30.0,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.directory = directory
        self.ask_timeout = ask_timeout
        self._central_ready = False
        self.stats = {"data": 0, "completions": 0, "orphans": 0, "unrouted_data": 0, "bad": 0}

    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                self._route(items)
                return True
            case RouterStats():
                return dict(self.stats)
        return None

    def _route(self, items: tuple[Inbound, ...]) -> None:
        if not self._central_ready:
            central = self.directory.get("central")
            if central is None:
                raise RuntimeError("Central is not running yet; the records will be redelivered")
            central.ask(Ready(), timeout=self.ask_timeout)  # sessions reloaded before we route
            self._central_ready = True
        waiting: list[tuple[protocol.ChargeCompletion, pykka.Future[Any]]] = []
        telemetry: dict[str, list[protocol.ChargingData]] = {}
        for item in items:
            msg = item.message
            if msg is None:  # undecodable: item.error says why
                self.stats["bad"] += 1
                log.warning("Ignored a bad record on %s (key %s): %s", item.topic, item.key, item.error)
                continue
            if isinstance(msg, protocol.ChargingData):
                self.stats["data"] += 1
                telemetry.setdefault(msg.session_id, []).append(msg)
            elif isinstance(msg, protocol.ChargeCompletion):
                self._telemetry(telemetry.pop(msg.session_id, None))  # before its completion
                self.stats["completions"] += 1
                ref = self.directory.get(f"session:{msg.session_id}")
                if ref is not None:
                    try:
                        waiting.append((msg, ref.ask(msg, block=False)))
                        continue
                    except pykka.ActorDeadError:
                        pass
                self._orphan(msg)
            else:
                self.stats["bad"] += 1
                log.warning("Ignored a %s record on %s: not an Engine message", type(msg).__name__, item.topic)
        progress: list[SessionProgress] = []
        for records in telemetry.values():
            self._telemetry(records)
            d = max(records, key=lambda r: r.seq)
            progress.append(SessionProgress(d.session_id, d.cp_id, d.seq, d.energy_kwh, d.cost_eur, d.power_kw))
        if progress:
            self.directory.tell("central", ProgressBatch(tuple(progress)))
        for msg, future in waiting:
            try:
                future.get(timeout=self.ask_timeout)
            except pykka.ActorDeadError:
                self._orphan(msg)  # the session stopped right after billing: the ledger knows

    def _telemetry(self, records: list[protocol.ChargingData] | None) -> None:
        if records and not self.directory.tell(f"session:{records[0].session_id}",
                                               Telemetry(records[0].session_id, tuple(records))):
            self.stats["unrouted_data"] += len(records)

    def _orphan(self, c: protocol.ChargeCompletion) -> None:
        self.stats["orphans"] += 1
        ledger = self.directory.get("ledger")
        if ledger is None:
            raise RuntimeError("the ledger is not running; the completion will be redelivered")
        result: tuple[TicketRecord, bool] | None = ledger.ask(BillOrphan(c), block=True, timeout=self.ask_timeout)
        if result is None:
            return
        ticket, created = result
        self.directory.tell("publisher", Publish("driver_responses", ticket.driver_id, ticket_message(ticket)))
        self.directory.tell("central", SessionBilled(ticket.session_id, ticket.cp_id, ticket.driver_id,
                                                     ticket.energy_kwh, ticket.cost_eur,
                                                     ticket.end_reason or c.end_reason, created))
