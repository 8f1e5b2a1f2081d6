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

The trust boundary (issue #11): a record that is a ``sealed`` envelope is
opened with Central's :class:`~transport.security.Keyring` (the key it issued
to that CP, current or replaced within the grace, never revoked; the counter
above the highest opened for that key and topic; the record's Kafka key the
envelope's CP) and its inner message is routed exactly as a plain one. One
that does not open, and with ``require_sealed`` any plain telemetry or
completion, is set aside as ``refused: <reason>``: it goes to the dead letters
(Central shows and audits it) and never reaches a session, the ledger or
Central's figures.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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
from transport.security import Keyring, SecurityError

log = logging.getLogger("evcharging.central.router")


class SessionRouter(SupervisedActor):
    """See the module docstring."""

    def __init__(self, directory: Directory, *, ask_timeout: float = 30.0, keyring: Keyring | None = None,
                 require_sealed: bool = False, supervision: Supervision | None = None) -> None:
        """``keyring``: Central's CP keys, to open sealed records (None: a sealed record is refused);
        ``require_sealed``: refuse plain telemetry and completions (security on)."""
        super().__init__(supervision=supervision)
        self.directory = directory
        self.ask_timeout = ask_timeout
        self.keyring = keyring
        self.require_sealed = require_sealed
        self._central_ready = False
        # rejected: records set aside as not billable (a rejected completion, or refused at the trust
        # boundary); refused: those refused at the trust boundary (unsealed, wrong or revoked key, replayed)
        self.stats = {"data": 0, "completions": 0, "orphans": 0, "unrouted_data": 0, "bad": 0, "rejected": 0,
                      "refused": 0, "opened": 0}
        self._refused_logged_at = 0.0

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
        for raw_item in items:
            if raw_item.message is None:  # undecodable (the pump sets these aside itself): item.error says why
                self.stats["bad"] += 1
                set_aside.append(SetAside(raw_item, f"cannot decode: {raw_item.error}"))
                continue
            item = self._unseal(raw_item, set_aside)
            if item is None:
                continue
            msg = item.message
            assert msg is not None
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

    def _unseal(self, item: Inbound, set_aside: list[SetAside]) -> Inbound | None:
        """``item`` with its sealed message opened (or as it is, when plain and allowed); None when
        it was refused (then set aside as ``refused: <reason>``)."""
        reason = self._why_not(item)
        if isinstance(reason, Inbound):
            return reason
        self.stats["refused"] += 1
        self.stats["rejected"] += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= 1.0:  # a flood of forgeries must not flood the log
            self._refused_logged_at = now
            log.warning("refused a record on %s (key %s, partition %d, offset %d): %s (%d refused so far)",
                        item.topic, item.key, item.partition, item.offset, reason, self.stats["refused"])
        set_aside.append(SetAside(item, f"refused: {reason}"))
        return None

    def _why_not(self, item: Inbound) -> Inbound | str:
        """The item to route (opened when sealed), or why it is refused."""
        env = item.message
        if not isinstance(env, protocol.Sealed):
            if self.require_sealed and isinstance(env, protocol.ChargingData | protocol.ChargeCompletion):
                return "not sealed (this Central requires sealed CP records)"
            return item
        if item.key != env.cp_id:
            return f"a record keyed {item.key!r} is sealed for CP {env.cp_id}"
        if self.keyring is None:
            return f"a sealed record of CP {env.cp_id}, and this Central has no CP keys (--enroll open)"
        try:
            inner = self.keyring.open(env, topic=item.topic, partition=item.partition, offset=item.offset)
        except SecurityError as exc:
            return str(exc)
        self.stats["opened"] += 1
        return dataclasses.replace(item, message=inner)

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
