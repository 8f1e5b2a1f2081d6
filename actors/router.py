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
envelope's CP) and its inner message is routed exactly as a plain one. The
sealed records of a poll are opened in one :meth:`~transport.security.Keyring.open_many`
call (the keyring's lock twice per poll rather than per record). One
that does not open, and with ``require_sealed`` any plain telemetry or
completion, is set aside as ``refused: <reason>``: it goes to the dead letters
(Central shows and audits it) and never reaches a session, the ledger or
Central's figures.
"""

from __future__ import annotations

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


def _seq(reading: protocol.ChargingData) -> int:
    return reading.seq


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
        opened = self._open_sealed(items)
        for i, item in enumerate(items):
            msg = item.message
            if msg is None:  # undecodable (the pump sets these aside itself): item.error says why
                self.stats["bad"] += 1
                set_aside.append(SetAside(item, f"cannot decode: {item.error}"))
                continue
            refused = self._why_not(item, msg, opened.get(i))
            if isinstance(refused, str):
                self._refuse(item, refused, set_aside)
                continue
            msg = refused
            if type(msg) is protocol.ChargingData and item.topic == "charging_session_data":
                self.stats["data"] += 1
                records = telemetry.get(msg.session_id)
                if records is None:
                    telemetry[msg.session_id] = [msg]
                else:
                    records.append(msg)
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
            d = max(records, key=_seq)
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

    def _open_sealed(self, items: tuple[Inbound, ...]) -> dict[int, protocol.Message | SecurityError]:
        """Open every sealed record of the poll that is keyed by its own CP, in one keyring call
        (the keyring's lock twice per poll, not per record): by position in ``items``."""
        if self.keyring is None:
            return {}
        where: list[int] = []
        batch: list[tuple[protocol.Sealed, str, int, int]] = []
        for i, item in enumerate(items):
            env = item.message
            if type(env) is protocol.Sealed and item.key == env.cp_id:
                where.append(i)
                batch.append((env, item.topic, item.partition, item.offset))
        if not batch:
            return {}
        return dict(zip(where, self.keyring.open_many(batch), strict=True))

    def _why_not(self, item: Inbound, env: protocol.Message,
                 opened: protocol.Message | SecurityError | None) -> protocol.Message | str:
        """The message to route (``opened`` when sealed, or the plain one when allowed), or why it is refused."""
        if not isinstance(env, protocol.Sealed):
            if self.require_sealed and isinstance(env, protocol.ChargingData | protocol.ChargeCompletion):
                return "not sealed (this Central requires sealed CP records)"
            return env
        if item.key != env.cp_id:
            return f"a record keyed {item.key!r} is sealed for CP {env.cp_id}"
        if self.keyring is None or opened is None:
            return f"a sealed record of CP {env.cp_id}, and this Central has no CP keys (--enroll open)"
        if isinstance(opened, SecurityError):
            return str(opened)
        self.stats["opened"] += 1
        return opened

    def _refuse(self, item: Inbound, reason: str, set_aside: list[SetAside]) -> None:
        """Set ``item`` aside as ``refused: <reason>`` (logged at most once a second)."""
        self.stats["refused"] += 1
        self.stats["rejected"] += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= 1.0:  # a flood of forgeries must not flood the log
            self._refused_logged_at = now
            log.warning("refused a record on %s (key %s, partition %d, offset %d): %s (%d refused so far)",
                        item.topic, item.key, item.partition, item.offset, reason, self.stats["refused"])
        set_aside.append(SetAside(item, f"refused: {reason}"))

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
