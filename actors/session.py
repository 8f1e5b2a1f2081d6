"""SessionActor: owns one supply — its meter and its exactly-once bill.

Kafka delivers at least once, so the same telemetry or completion can come
twice (a redelivery after a crash, a producer retry, an Engine replaying its
journal). The session drops telemetry whose ``seq`` it has already applied,
and bills through the ledger, whose unique ticket key turns a second
completion into a lookup of the first ticket. Either way the driver gets
the same ticket again, which is harmless: drivers dedupe by session id.
"""

from __future__ import annotations

import logging
from typing import Any

from actors.messages import (
    Bill,
    BillRejected,
    Checkpoint,
    LoadSession,
    SessionBilled,
    SessionStats,
    SupplyFinished,
    Telemetry,
    VetCompletion,
)
from actors.pooled import Pooled
from actors.runtime import Directory, SupervisedActor, Supervision
from persistence import LIVE_STATUSES, SessionRecord, TicketRecord
from transport import protocol
from transport.kafka import Publish, TargetUnavailable

log = logging.getLogger("evcharging.central.session")


def ticket_message(t: TicketRecord) -> protocol.Ticket:
    """The wire ticket of a ledger row."""
    return protocol.Ticket(
        driver_id=t.driver_id, session_id=t.session_id, cp_id=t.cp_id, price_eur_kwh=t.price_eur_kwh,
        energy_kwh=t.energy_kwh, cost_eur=t.cost_eur, started_at=t.started_at or t.issued_at,
        ended_at=t.ended_at or t.issued_at, end_reason=t.end_reason or "unplugged",
    )


class SessionActor(Pooled, SupervisedActor):
    """One per live session, named ``session:<id>`` in Central's directory.

    Pooled (``actors/pooled.py``), in a pool of its own: there is one per supply, and billing asks
    the ledger and Central and waits for them, which must never hold up the connections' pool.
    """

    pool = "sessions"

    def __init__(self, record: SessionRecord, directory: Directory, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.record = record
        self.directory = directory
        self.last_seq = record.last_seq
        self.energy_kwh = record.energy_kwh
        self.cost_eur = record.cost_eur
        self.power_kw = 0.0
        self.duplicates = 0
        self.rejected = 0
        self.foreign = 0  # readings naming this session from another CP (ignored)
        self.billed: TicketRecord | None = None

    def setup(self) -> None:
        """After a crash (a transient child, restarted by the sessions supervisor), re-learn
        the figures the ledger has; a session that ended meanwhile has nothing left to do."""
        if self.supervision is None or self.supervision.generation == 1:
            return
        ledger = self.directory.get("ledger")
        try:
            record: SessionRecord | None = (ledger.ask(LoadSession(self.record.session_id), block=True, timeout=10)
                                            if ledger else None)
        except Exception as exc:  # the ledger is restarting: keep the figures we were started with
            log.warning("Session %s restarted without its stored figures: %s", self.record.session_id, exc)
            return
        if record is None or record.status not in LIVE_STATUSES:
            log.info("Session %s is over (%s); its restarted actor stops", self.record.session_id,
                     record.status if record else "not found")
            self.actor_ref.stop(block=False)
            return
        self.record = record
        self.last_seq, self.energy_kwh, self.cost_eur = record.last_seq, record.energy_kwh, record.cost_eur
        log.info("Session %s restarted at seq %d (%.3f kWh)", record.session_id, record.last_seq, record.energy_kwh)

    def on_receive(self, message: Any) -> Any:
        match message:
            case Telemetry(_, records):
                self._meter(records)
            case protocol.ChargeCompletion():
                return self._complete(message)
            case SessionStats():
                return {"session_id": self.record.session_id, "last_seq": self.last_seq, "energy_kwh": self.energy_kwh,
                        "cost_eur": self.cost_eur, "duplicates": self.duplicates, "billed": self.billed is not None,
                        "rejected": self.rejected, "foreign": self.foreign}
        return None

    def _meter(self, records: tuple[protocol.ChargingData, ...]) -> None:
        """Apply new readings (by ``seq``); tell the driver and the ledger the newest once.

        (Central's panel gets its figures from the router, in one message per poll.)
        """
        newest: protocol.ChargingData | None = None
        for data in records:
            if data.cp_id != self.record.cp_id:
                # Another CP's reading (sealed with that CP's own key, so genuine as far as the
                # keyring knows) naming this session: never this session's meter.
                self.foreign += 1
                if self.foreign == 1 or self.foreign % 100 == 0:
                    log.warning("Session %s at CP %s ignored %d reading(s) from CP %s", self.record.session_id,
                                self.record.cp_id, self.foreign, data.cp_id)
                continue
            if data.seq <= self.last_seq or self.billed is not None:
                self.duplicates += 1
                continue
            newest = data
            self.last_seq, self.energy_kwh, self.cost_eur = data.seq, data.energy_kwh, data.cost_eur
            self.power_kw = data.power_kw
        if newest is None:
            return
        r, data = self.record, newest
        update = protocol.ChargingStatusUpdate(
            driver_id=r.driver_id, session_id=r.session_id, cp_id=r.cp_id, seq=data.seq,
            energy_kwh=data.energy_kwh, cost_eur=data.cost_eur, power_kw=data.power_kw,
        )
        # through the fan-ins: a thousand session actors telling the same two mailboxes queue on their locks
        self.directory.fan_in("publisher").tell(Publish("driver_responses", r.driver_id, update))
        self.directory.fan_in("ledger").tell(Checkpoint(r.session_id, data.seq, data.energy_kwh, data.cost_eur))

    def _complete(self, c: protocol.ChargeCompletion) -> TicketRecord | BillRejected:
        """Bill once (durably, Central's figure) and send the ticket; returns the ticket.

        A completion the ledger rejects (another CP or driver, a cancelled session,
        energy below what we metered) changes nothing here: the supply goes on in
        Central's view and the genuine completion is still awaited. The rejection
        (audited by the ledger) is returned, and the router dead-letters the record.
        """
        r = self.record
        if self.billed is not None and (c.cp_id, c.driver_id) == (r.cp_id, r.driver_id):
            self.duplicates += 1  # a replay in the moment before this actor stops
            self.directory.fan_in("publisher").tell(Publish("driver_responses", r.driver_id,
                                                            ticket_message(self.billed)))
            return self.billed
        ledger = self.directory.get("ledger")
        if ledger is None:  # restarting: not the record's fault, so it must not count as an attempt
            raise TargetUnavailable("the ledger is not running; the completion will be redelivered")
        verdict: BillRejected | None = ledger.ask(VetCompletion(c, self.energy_kwh), block=True, timeout=30)
        if verdict is not None or self.billed is not None:
            self.rejected += 1
            return verdict or BillRejected(r.session_id, "mismatch", "it does not match the billed session")
        central = self.directory.get("central")
        cp_state: str | None = (central.ask(SupplyFinished(r.cp_id, r.session_id), block=True, timeout=10)
                                if central else None)
        answer: tuple[TicketRecord, bool] | BillRejected = ledger.ask(Bill(c, cp_state, self.energy_kwh),
                                                                      block=True, timeout=30)
        if isinstance(answer, BillRejected):  # vetted a moment ago: only if the session changed meanwhile
            self.rejected += 1
            return answer
        ticket, created = answer
        self.billed = ticket
        if created:
            log.info("Ticket for %s at %s: %.3f kWh, %.2f € (%s), driver %s",
                     r.session_id, r.cp_id, ticket.energy_kwh, ticket.cost_eur, ticket.end_reason, r.driver_id)
        self.directory.tell("central", SessionBilled(r.session_id, r.cp_id, r.driver_id, ticket.energy_kwh,
                                                     ticket.cost_eur, ticket.end_reason or c.end_reason, created))
        self.actor_ref.stop(block=False)  # after this message; late duplicates go to the ledger directly
        self.directory.fan_in("publisher").tell(Publish("driver_responses", r.driver_id, ticket_message(ticket)))
        return ticket
