"""LedgerActor: the single writer of Central's money — sessions and tickets.

It owns one :class:`persistence.Repository` connection. Billing asks come
from session actors; the database's unique ticket key makes a replayed
completion a no-op that returns the existing ticket. The bill is Central's
(``persistence.bill_cents``: energy × the session's price); a completion the
repository rejects (another CP or driver, a cancelled session, energy below
what Central metered) is audited here and answered :class:`BillRejected`. Telemetry checkpoints
are batched and flushed once per ``flush_interval`` in one transaction: they
only speed up a restart (the completion carries the final figures), so
writing each of thousands of records per second would buy nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from actors.messages import (
    Bill,
    BillOrphan,
    BillRejected,
    Checkpoint,
    LoadSession,
    MarkSupplying,
    Ready,
    VetCompletion,
)
from actors.runtime import Drain, FanIn, SupervisedActor, Supervision, Ticker
from persistence import BillingRejected, Repository, TicketRecord, UnknownSession
from transport import protocol

log = logging.getLogger("evcharging.central.ledger")


@dataclass(frozen=True, slots=True)
class _Flush:
    pass


class LedgerActor(SupervisedActor):
    """See the module docstring."""

    def __init__(self, db_path: str, *, flush_interval: float = 1.0, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.db_path = db_path
        self.flush_interval = flush_interval
        self._repo: Repository | None = None
        self._pending: dict[str, tuple[str, int, float, float]] = {}
        self._ticker: Ticker | None = None
        self._fan_in: FanIn | None = None  # where the session actors' checkpoints wait (known from a Drain)

    def setup(self) -> None:
        self._repo = Repository(self.db_path)
        self._ticker = Ticker(self.flush_interval, self.actor_ref, _Flush(), name="ledger-flush")

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._repo is not None:
            self._flush()
            self._repo.close()

    @property
    def repo(self) -> Repository:
        assert self._repo is not None
        return self._repo

    def on_receive(self, message: Any) -> Any:
        match message:
            case Checkpoint(sid, seq, kwh, eur):
                self._pending[sid] = (sid, seq, kwh, eur)
            case Drain(box):  # the session actors' checkpoints, many at once
                self._fan_in = box
                self._take_checkpoints()
            case _Flush():
                self._flush()
            case MarkSupplying(sid, at):
                self.repo.mark_supplying(sid, at)
            case VetCompletion(completion, metered):
                self._take_checkpoints()
                return self._vet(completion, metered)
            case Bill(completion, cp_state, metered):
                self._take_checkpoints()
                return self._bill(completion, cp_state, metered)
            case BillOrphan(completion):
                try:
                    return self._bill(completion, None, 0.0)
                except UnknownSession:
                    log.error("Completion for unknown session %s from CP %s ignored (no such session in the database)",
                              completion.session_id, completion.cp_id)
                    self.repo.audit("central", completion.cp_id, "unknown_completion", completion.session_id)
                    return None
            case LoadSession(sid):
                self._take_checkpoints()
                self._flush()  # the newest checkpoint first
                return self.repo.get_session(sid)
            case Ready():
                return True
        return None

    def _take_checkpoints(self) -> None:
        """Checkpoints still waiting in the fan-in count before a bill or a reload."""
        if self._fan_in is not None:
            for item in self._fan_in.take():
                self.on_receive(item)

    def _metered(self, session_id: str, metered_kwh: float) -> float:
        """The newest energy Central saw for the session (a checkpoint not flushed yet counts)."""
        pending = self._pending.get(session_id)
        return max(metered_kwh, pending[2] if pending else 0.0)

    def _vet(self, c: protocol.ChargeCompletion, metered_kwh: float) -> BillRejected | None:
        try:
            self.repo.check_completion(c.session_id, c.energy_kwh, cp_id=c.cp_id, driver_id=c.driver_id,
                                       metered_kwh=self._metered(c.session_id, metered_kwh))
        except BillingRejected as exc:
            return self._rejected(c, exc)
        return None

    def _rejected(self, c: protocol.ChargeCompletion, exc: BillingRejected) -> BillRejected:
        """Audit a completion Central does not bill; the router dead-letters its record."""
        log.warning("Completion %s of session %s (CP %s, driver %s, %.3f kWh, %.2f EUR) rejected: %s",
                    c.message_id, c.session_id, c.cp_id, c.driver_id, c.energy_kwh, c.cost_eur, exc.reason)
        self.repo.audit("central", c.cp_id, "completion_rejected",
                        f"{c.session_id} {exc.kind}: {exc.reason}; reported {c.energy_kwh:.6f} kWh "
                        f"{c.cost_eur:.4f} EUR, driver {c.driver_id}, message {c.message_id}")
        return BillRejected(c.session_id, exc.kind, exc.reason)

    def _bill(self, c: protocol.ChargeCompletion, cp_state: str | None,
              metered_kwh: float) -> tuple[TicketRecord, bool] | BillRejected:
        try:
            ticket, created = self.repo.complete_session(
                c.session_id, c.energy_kwh, c.cost_eur, c.end_reason, c.timestamp,
                cp_state=cp_state, message_id=c.message_id, topic="charging_session_complete",
                cp_id=c.cp_id, driver_id=c.driver_id, metered_kwh=self._metered(c.session_id, metered_kwh),
            )
        except BillingRejected as exc:
            return self._rejected(c, exc)
        self._pending.pop(c.session_id, None)
        if created:
            self.repo.audit("central", c.cp_id, "ticket",
                            f"{c.session_id} {ticket.energy_kwh:.3f} kWh {ticket.cost_eur:.2f} EUR")
        return ticket, created

    def _flush(self) -> None:
        if self._pending and self._repo is not None:
            batch, self._pending = list(self._pending.values()), {}
            started = time.perf_counter()
            self._repo.checkpoint_many(batch)
            log.debug("checkpointed %d sessions in %.1f ms", len(batch), (time.perf_counter() - started) * 1000)
