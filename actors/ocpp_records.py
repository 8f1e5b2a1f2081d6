"""The Engine half of an OCPP charger's actor: its Kafka records (telemetry, completions), sealed and kept.

Not an actor: :class:`Records` lives inside :class:`~actors.ocpp_charger.OcppChargerActor`
(one mailbox, no locks) and does for it what a native Engine does for its CP:

* **sealing**: every record is sealed with the key Central issued at the charger's
  login (:meth:`Records.use_key`; sender ``engine``, a microsecond counter), so
  Central's router opens it like an Engine's; without a credential (Central with
  ``--enroll open``) records go plain; with a credential and no key yet they wait;
* **telemetry**: fire and forget (the next reading supersedes a lost one);
* **completions**: a stopped transaction's completion is sent until Kafka confirms
  it (``Published``, then the journal's ``published_at``), retried with a backoff,
  sent again when a new key replaced the one it went out with, and sent again
  every ``republish_after`` until Central's ``session_billed`` (Central asked with
  ``billing_query`` meanwhile). Central bills a session once, whatever comes twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pykka

from actors.runtime import Directory, Scheduled, backoff_strategy, schedule
from persistence.ocpp_journal import OcppJournal, TxRow
from transport import protocol
from transport.kafka import Publish
from transport.security import LinkSeal

log = logging.getLogger("evcharging.ocpp")

__all__ = ["Records", "SendCompletion", "DATA_TOPIC", "COMPLETE_TOPIC"]

DATA_TOPIC: Final = "charging_session_data"
COMPLETE_TOPIC: Final = "charging_session_complete"


@dataclass(frozen=True, slots=True)
class SendCompletion:
    """Timer → the actor: send the completion of ``session_id`` again (attempt ``attempt`` got no answer)."""

    session_id: str
    attempt: int


@dataclass(slots=True)
class _Pending:
    """A completion sent to Kafka and not yet acknowledged."""

    completion: protocol.ChargeCompletion
    attempt: int = 0
    timer: Scheduled | None = None
    held: bool = False  # waiting for a key to seal it with


class Records:
    """See the module docstring. ``owner``: the actor (Published/PublishFailed and timers go to it);
    ``to_central``: how billing queries reach Central (False when it is not reachable)."""

    def __init__(self, cp_id: str, journal: OcppJournal, directory: Directory, publisher: str,
                 owner: pykka.ActorRef[Any], *, sealed: bool, ack_timeout: float, retry: tuple[float, float],
                 republish_after: float, to_central: Callable[[protocol.Message], bool]) -> None:
        self.cp_id, self.journal, self.directory = cp_id, journal, directory
        self.publisher, self.owner = publisher, owner
        self.sealed = sealed  # a credential: nothing goes out plain
        self.ack_timeout, self.republish_after, self.to_central = ack_timeout, republish_after, to_central
        self._delay = backoff_strategy(*retry)
        self._seal: LinkSeal | None = None
        self._pending: dict[str, _Pending] = {}
        self._republished: dict[str, float] = {}  # session id -> when its completion was last sent
        self._sealed_with: dict[str, str] = {}  # session id -> the key id its completion last went out with
        self.unbilled: set[str] = set()  # sessions whose ticket was not seen
        self.stats = {"telemetry": 0, "completions": 0}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()

    # --- sealing ---------------------------------------------------------------------------
    def use_key(self, key_id: str, key: bytes) -> None:
        """Central issued a key (a login): seal with it; send what waited, and again what an older key sealed."""
        self._seal = LinkSeal(self.cp_id, key_id, key, me="engine", peer="central")
        for sid, pending in list(self._pending.items()):
            if pending.held:
                self._send(sid)
        for row in self.journal.unbilled(self.cp_id):
            old = self._sealed_with.get(row.session_id or "")
            if row.session_id and row.session_id not in self._pending and old is not None and old != key_id:
                self._republished[row.session_id] = time.time()
                self.completion(row)

    def _out(self, message: protocol.ChargingData | protocol.ChargeCompletion) -> protocol.Message | None:
        if self._seal is not None:
            return self._seal.seal(message)
        return None if self.sealed else message

    # --- telemetry -----------------------------------------------------------------------------
    def telemetry(self, data: protocol.ChargingData) -> None:
        out = self._out(data)
        if out is None:
            log.debug("%s: telemetry %d of %s not sent (no key yet; the completion carries the total)", self.cp_id,
                      data.seq, data.session_id)
        elif self.directory.tell(self.publisher, Publish(DATA_TOPIC, self.cp_id, out)):
            self.stats["telemetry"] += 1

    # --- completions -----------------------------------------------------------------------------
    def completion(self, row: TxRow) -> None:
        """The completion of the stopped ``row``: sent until Kafka confirms it (journaled already)."""
        assert row.session_id is not None
        completion = protocol.ChargeCompletion(
            cp_id=self.cp_id, session_id=row.session_id, driver_id=row.driver_id, energy_kwh=row.energy_kwh,
            cost_eur=min(row.cost_eur, protocol.MAX_COST_EUR), end_reason=row.end_reason or "unplugged",
            timestamp=row.ended_at or time.time())
        old = self._pending.get(row.session_id)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        self._pending[row.session_id] = _Pending(completion)
        self.unbilled.add(row.session_id)
        self.stats["completions"] += 1
        self._send(row.session_id)

    def resend(self, session_id: str, attempt: int) -> None:
        """A :class:`SendCompletion` timer fired."""
        pending = self._pending.get(session_id)
        if pending is not None and pending.attempt == attempt:
            self._send(session_id)

    def is_pending(self, session_id: str) -> bool:
        return session_id in self._pending

    def _send(self, session_id: str) -> None:
        pending = self._pending[session_id]
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        out = self._out(pending.completion)
        if out is None:
            pending.held = True  # journaled; sent when a login brings a key (use_key)
            return
        pending.held = False
        pending.attempt += 1
        if isinstance(out, protocol.Sealed):
            self._sealed_with[session_id] = out.key_id
        publish = Publish(COMPLETE_TOPIC, self.cp_id, out, notify=self.owner, token=session_id)
        wait = self.ack_timeout if self.directory.tell(self.publisher, publish) else self._delay(pending.attempt)
        pending.timer = schedule(wait, self.owner, SendCompletion(session_id, pending.attempt))

    def published(self, session_id: str) -> None:
        """Kafka confirmed the completion (acks=all)."""
        pending = self._pending.pop(session_id, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._republished.setdefault(session_id, time.time())
        if self.journal.mark_published(self.cp_id, session_id):
            log.info("%s: the completion of session %s is safely in Kafka: Central bills it", self.cp_id, session_id)

    def failed(self, session_id: str, reason: str) -> None:
        pending = self._pending.get(session_id)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        wait = self._delay(pending.attempt)
        log.warning("%s: could not send the completion of session %s to Kafka (%s) — retrying in %.1f s", self.cp_id,
                    session_id, reason, wait)
        pending.timer = schedule(wait, self.owner, SendCompletion(session_id, pending.attempt))

    def billed(self, session_id: str) -> bool:
        """Central issued the ticket: nothing left to send. True when this was news."""
        self.unbilled.discard(session_id)
        self._republished.pop(session_id, None)
        self._sealed_with.pop(session_id, None)
        return self.journal.mark_billed(self.cp_id, session_id)

    def check(self, registered: bool) -> None:
        """Completions in Kafka whose ticket was not seen: ask Central; send again those unbilled for
        ``republish_after``."""
        if not self.unbilled:
            return  # nothing on its way: the journal is not read every few seconds for nothing
        now = time.time()
        for row in self.journal.unbilled(self.cp_id):
            sid = row.session_id
            assert sid is not None
            if registered:
                self.to_central(protocol.BillingQuery(cp_id=self.cp_id, session_id=sid))
            sent = self._republished.setdefault(sid, row.published_at or now)
            if sid not in self._pending and now - sent >= self.republish_after:
                log.warning("%s: no ticket from Central for session %s %.0f s after sending it — sending it again",
                            self.cp_id, sid, now - sent)
                self._republished[sid] = now
                self.completion(row)
