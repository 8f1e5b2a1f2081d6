"""OcppChargerActor: one OCPP 1.6J charger, seen by Central as one CP (EV_OCPP's domain, issue #13).

Central knows nothing of OCPP. For each connected charger this actor plays the
two halves of a native CP towards it:

* the **Monitor**: over a socket link to Central (``ocpp-central:<id>``, a
  :class:`~transport.client_link.ClientLink`) it authenticates with the
  charger's credential (the verifier the handshake computed from its Basic-auth
  password: docs/protocol.md, "A Monitor authenticates to Central"), seals every
  frame with the key Central issues, registers, sends a life message every
  ``heartbeat_interval`` while the charger's WebSocket is open, reports faults,
  relays Central's orders;
* the **Engine**: telemetry (``charging_session_data``) from MeterValues and one
  completion (``charging_session_complete``) per StopTransaction, sealed with
  the same key, through the gateway's Kafka ``publisher``; a completion is
  journaled before it is sent and sent again until Central's ``session_billed``
  (:mod:`actors.ocpp_records`).

The OCPP side (docs/ocpp.md has the table) is one handler per action,
:attr:`OcppChargerActor.ACTIONS`; each answers at once or, when Central must
decide first (an Authorize, a StartTransaction nobody authorised), keeps the
request's ``reply`` and answers when Central did. Orders from Central become
calls to the charger: ``authorize_supply`` for a driver's ``charge_request`` →
RemoteStartTransaction, ``stop_supply`` → RemoteStopTransaction, ``stop_cp`` /
``resume_cp`` → ChangeAvailability.

What survives a crash of this actor, of the gateway, or of the charger's link:
the journal (:class:`~persistence.ocpp_journal.OcppJournal`) — transaction id ↔
Central session, the highest meter reading and telemetry sequence, the stops
already turned into completions, the charger's last status and whether Central
stopped it. The connection itself does not: when the charger's WebSocket closes,
its supervisor tree (this actor and its Central link) is stopped, Central sees
the CP disconnected at once, and the charger's next connection starts a new tree
that re-reads the journal. No sockets and no Kafka client here: the wire is a
:class:`~transport.ocpp_wire.ChargerPort`, Kafka the ``publisher`` actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import pykka

from actors.cp_state import CpState, derive_state
from actors.ocpp_clock import SharedClock
from actors.ocpp_meter import (
    MAX_CONNECTOR,
    MAX_WH,
    Reading,
    end_reason,
    energy_readings,
    ocpp_now,
    parse_time,
    power_between,
)
from actors.ocpp_records import Records, SendCompletion
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, Ticker, schedule, tell
from persistence.ocpp_journal import AUTHORIZED, CHARGING, DROPPED, LIVE, REFUSED, STOPPED, OcppJournal, TxRow
from transport import protocol, security
from transport.kafka import Published, PublishFailed
from transport.link import Admit, Close, FrameIn, FrameRejected, LinkDown, LinkUp, Send
from transport.ocpp_wire import Answer, CallDone, ChargerPort, OcppRefusal, OcppRequest, Reply, WireUp
from transport.security import LinkSeal, SecurityError

log = logging.getLogger("evcharging.ocpp")

__all__ = ["OcppChargerActor", "OcppOptions", "ChargerStatus"]

ACCEPTED, INVALID, CONCURRENT = "Accepted", "Invalid", "ConcurrentTx"
#: Connector states in which a remote start is refused (the connector is not free).
BUSY_STATES: Final = frozenset({"Charging", "SuspendedEV", "SuspendedEVSE", "Finishing", "Reserved", "Unavailable",
                                "Faulted"})
ID_TAG_MAX: Final = 20  # OCPP 1.6 idTag: CiString20
REJECTED_BOOT_RETRY: Final = 30  # s a charger waits before booting again when it is not registered
#: After a restart, a charging transaction's telemetry sequence goes on this far above the stored one (more
#: readings than a charger can send in the second the journal may not have written yet).
SEQ_MARGIN: Final = 10_000


@dataclass(frozen=True, slots=True)
class OcppOptions:
    """Timings of one charger's actor; each field is a flag of EV_OCPP."""

    heartbeat_interval: float = 1.0  # life messages to Central
    boot_interval: int = 60  # the Heartbeat interval a charger is told in BootNotification.conf
    silence_timeout: float = 0.0  # no OCPP message for this long: the connection is closed (0: 2 × interval + 30)
    register_timeout: float = 5.0  # each step of the login with Central
    relogin_delay: float = 0.5  # after losing Central: wait before logging in again
    local_timeout: float = 8.0  # Central's answer to an Authorize/StartTransaction asked at the charger
    remote_timeout: float = 4.0  # the charger's answer to a RemoteStartTransaction (under Central's 5 s)
    plug_timeout: float = 60.0  # an authorised supply without StartTransaction ends (0 kWh) after this
    stop_confirm: float = 2.0  # after re-registering while stopped: Central repeats stop_cp within this, or resumed
    connector: int = 1  # the connector a remote start names (0: let the charger choose)
    completion_ack_timeout: float = 30.0
    completion_retry_base: float = 0.5
    completion_retry_max: float = 10.0
    billing_check: float = 5.0  # how often to ask Central about completions whose ticket was not seen
    republish_after: float = 15.0  # a completion without Central's ticket this long after sending is sent again

    @property
    def silence(self) -> float:
        return self.silence_timeout or 2.0 * self.boot_interval + 30.0


# --- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChargerStatus:
    """Ask: a dict snapshot of the charger as the gateway sees it (tests, the bench, the launcher)."""


@dataclass(frozen=True, slots=True)
class _Tick:
    pass


@dataclass(frozen=True, slots=True)
class _Login:
    link_urn: str


@dataclass(frozen=True, slots=True)
class _AuthTimeout:
    correlation_id: str
    step: int


@dataclass(frozen=True, slots=True)
class _RegisterTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _LocalTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _RemoteTimeout:
    session_id: str


@dataclass(frozen=True, slots=True)
class _PlugTimeout:
    session_id: str


@dataclass(frozen=True, slots=True)
class _StopUnconfirmed:
    registration: int


# --- state (not messages) -------------------------------------------------------------------------
@dataclass(slots=True)
class _Local:
    """An authorisation asked at the charger (Authorize, or a StartTransaction nobody authorised)."""

    id_tag: str
    kind: str  # "authorize" | "start"
    reply: Reply
    start: tuple[int, float, str, float] | None = None  # connector, meter start (Wh), start key, started at
    timer: Scheduled | None = None


def _tag(status: str) -> dict[str, Any]:
    return {"id_tag_info": {"status": status}}


def _int(payload: Mapping[str, Any], name: str, lo: int, hi: float) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi:.0f}")
    return value


class OcppChargerActor(SupervisedActor):
    """See the module docstring."""

    def __init__(self, cp_id: str, directory: Directory, port: ChargerPort, verifier: bytes | None,
                 journal: OcppJournal, *, options: OcppOptions = OcppOptions(), central_link: str = "",
                 publisher: str = "publisher", clock: SharedClock | None = None,
                 supervision: Supervision | None = None) -> None:
        """``verifier``: the charger's, computed from its Basic-auth password (None: Central runs with
        ``--enroll open`` and nobody authenticates). Kept in memory only, like a Monitor's.
        ``clock``: the gateway's one clock (ticks every ``heartbeat_interval``); None: a Ticker of its own."""
        super().__init__(supervision=supervision)
        self.cp_id = cp_id
        self.directory = directory
        self.port = port
        self.verifier = verifier
        self._journal = journal  # the gateway's (shared by every charger actor; it outlives this one)
        self.options = options
        self.central_link = central_link
        self.publisher = publisher
        self.clock = clock
        # Central (the Monitor half)
        self._link: pykka.ActorRef[Any] | None = None
        self._ready = False  # authenticated (or no verifier): the link may carry the session
        self.registered = False
        self._auth: tuple[str, str | None] | None = None  # (correlation id, nonce)
        self._register_id: str | None = None
        self._key: tuple[str, bytes] | None = None
        self._logins = 0
        self._registrations = 0
        self.price_eur_kwh = 0.0
        self.location: str | None = None
        self.stopped = False
        self._stop_confirmed = False
        # the charger (the OCPP half)
        self._wire_up = False
        self._last_seen = time.monotonic()
        self.booted: dict[str, Any] = {}
        self.connectors: dict[int, tuple[str, str]] = {}  # connector id -> (status, error code)
        self.fault: str | None = None  # why the charger cannot supply (None: it can)
        self._out_of_service_said: str | None = None  # what the last heartbeat said of it (see _out_of_service)
        self._fault_reported = False
        self._row: TxRow | None = None  # the charger's live supply (authorised or charging), as journaled
        self._local: dict[str, _Local] = {}
        self._remote: dict[str, str] = {}  # session id -> Central's correlation id, while the charger decides
        self._plug: dict[str, Scheduled] = {}
        self.records: Records | None = None  # the Engine half (Kafka): made in setup (it needs our ref)
        self._timers: list[Scheduled] = []
        self._ticker: Ticker | None = None
        self._ticks = 0
        self.stats = {"meter_values": 0, "lower_readings": 0, "skipped_values": 0, "duplicate_stops": 0}

    # --- lifecycle -----------------------------------------------------------------------------
    def setup(self) -> None:
        journal = self._journal
        o = self.options
        self.records = Records(self.cp_id, journal, self.directory, self.publisher, self.actor_ref,
                               sealed=self.verifier is not None, ack_timeout=o.completion_ack_timeout,
                               retry=(o.completion_retry_base, o.completion_retry_max),
                               republish_after=o.republish_after, to_central=self._to_central)
        known = journal.charger(self.cp_id)
        if known is not None:
            self.stopped = known.stopped
            if known.status:
                self.connectors[0] = (known.status, known.error_code or "NoError")
        self.fault = self._fault_reason()
        live = journal.live(self.cp_id)
        self._row = live[-1] if live else None
        if self._row is not None and self._row.status == CHARGING:
            # Readings of the last second may not have reached the file (a SIGKILL): go on from well above the
            # stored sequence, so no telemetry Central already applied is ever numbered again.
            self._row = dataclasses.replace(self._row, seq=self._row.seq + SEQ_MARGIN)
        for row in live:
            if row.status == AUTHORIZED and row.session_id:
                self._arm_plug(row.session_id)
        for row in journal.unpublished(self.cp_id):
            self.records.completion(row)
        self.records.unbilled |= {r.session_id for r in journal.unbilled(self.cp_id) if r.session_id}
        if live or self.records.pending:
            log.info("%s: from the journal: %s%s", self.cp_id,
                     ", ".join(f"transaction {r.transaction_id} ({r.status}, session {r.session_id})" for r in live)
                     or "no live transaction",
                     f"; {self.records.pending} completion(s) to send" if self.records.pending else "")
        if self.clock is not None:
            self.clock.add(self.actor_ref, _Tick())
        else:
            self._ticker = Ticker(self.options.heartbeat_interval, self.actor_ref, _Tick(), name=f"ocpp-{self.cp_id}")
        self.port.attach(self.actor_ref)

    def teardown(self) -> None:
        if self.clock is not None:
            self.clock.remove(self.actor_ref)
        if self._ticker is not None:
            self._ticker.stop()
        for timer in [*self._timers, *self._plug.values()]:
            timer.cancel()
        for local in self._local.values():
            if local.timer is not None:
                local.timer.cancel()
        if self.records is not None:
            self.records.stop()
        # The connection is not closed here: a restarted actor goes on with it. The charger's
        # supervisor closes it when the tree stops (supervisors/ocpp_system.py, ChargerTree).

    def _later(self, delay: float, message: Any) -> Scheduled:
        self._timers = [t for t in self._timers if t.active()]
        timer = schedule(delay, self.actor_ref, message)
        self._timers.append(timer)
        return timer

    @property
    def journal(self) -> OcppJournal:
        return self._journal

    @property
    def kafka(self) -> Records:
        assert self.records is not None
        return self.records

    # --- messages ----------------------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case OcppRequest():
                self._on_request(message)
            case CallDone(token, ok, payload, error):
                self._on_call_done(token, ok, payload, error)
            case FrameIn(link, msg) if self._current(link):
                if self._ready:
                    self._from_central(link, msg)
                else:
                    self._authenticating(link, msg)
            case LinkUp(link, peer):
                self._on_link_up(link, peer)
            case LinkDown(link, _peer, reason) if self._current(link):
                self._on_link_down(reason)
            case FrameRejected(_link, peer, reason):
                log.warning("%s: the link to Central refused a frame from %s: %s", self.cp_id, peer, reason)
            case WireUp(address):
                self._wire_up = True
                self._last_seen = time.monotonic()
                log.info("%s: charger connected from %s", self.cp_id, address)
                self._heartbeat()
            case _Tick():
                self._tick()
            case _Login(urn) if self._link is not None and self._link.actor_urn == urn and not self._ready:
                self._login(self._link)
            case _AuthTimeout(corr, step):
                self._on_auth_timeout(corr, step)
            case _RegisterTimeout(corr) if corr == self._register_id and not self.registered:
                log.warning("%s: Central did not answer the registration within %g s — asking again", self.cp_id,
                            self.options.register_timeout)
                if self._link is not None:
                    self._register(self._link)
            case _LocalTimeout(corr):
                self._on_local_timeout(corr)
            case _RemoteTimeout(sid):
                self._on_remote_timeout(sid)
            case _PlugTimeout(sid):
                self._on_plug_timeout(sid)
            case _StopUnconfirmed(n) if n == self._registrations and self.stopped and not self._stop_confirmed:
                log.info("%s: Central did not repeat its stop order after re-registering — back in service",
                         self.cp_id)
                self._set_stopped(False)
                self._availability("Operative")
            case Published(token):
                self.kafka.published(token)
            case PublishFailed(token, reason):
                self.kafka.failed(token, reason)
            case SendCompletion(sid, attempt):
                self.kafka.resend(sid, attempt)
            case ChargerStatus():
                return self._status()
            case _:
                log.debug("%s: ignoring %s", self.cp_id, type(message).__name__)
        return None

    # --- the charger's requests ------------------------------------------------------------------
    def _on_request(self, req: OcppRequest) -> None:
        self._last_seen = time.monotonic()
        handler = self.ACTIONS.get(req.action)
        if handler is None:
            req.reply(OcppRefusal("NotSupported", f"{req.action} is not supported by this central system"))
            return
        try:
            answer = handler(self, req.payload, req.reply)
        except ValueError as exc:  # a value the schema lets through but a bill cannot use
            log.warning("%s: refused a %s: %s", self.cp_id, req.action, exc)
            req.reply(OcppRefusal("PropertyConstraintViolation", str(exc)))
            return
        except BaseException:
            req.reply(OcppRefusal("InternalError", "the central system failed to handle it; send it again"))
            raise  # a bug: the supervisor restarts this actor (the journal keeps every fact)
        if answer is not None:
            req.reply(answer)

    def _on_boot(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        self.booted = {k: p.get(k) for k in ("charge_point_vendor", "charge_point_model", "firmware_version")}
        if not self.registered:
            log.warning("%s: BootNotification rejected: not registered with Central right now", self.cp_id)
            return {"status": "Rejected", "current_time": ocpp_now(), "interval": REJECTED_BOOT_RETRY}
        log.info("%s: booted (%s %s, firmware %s)", self.cp_id, p.get("charge_point_vendor"),
                 p.get("charge_point_model"), p.get("firmware_version") or "?")
        return {"status": "Accepted", "current_time": ocpp_now(), "interval": int(self.options.boot_interval)}

    def _on_heartbeat_req(self, _p: Mapping[str, Any], _reply: Reply) -> Answer:
        return {"current_time": ocpp_now()}

    def _on_status(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        connector = _int(p, "connector_id", 0, MAX_CONNECTOR)
        status, error = str(p.get("status")), str(p.get("error_code") or "NoError")
        before = self.connectors.get(connector)
        self.connectors[connector] = (status, error)
        if before != (status, error):
            info = p.get("info")
            log.info("%s: connector %d is %s%s%s", self.cp_id, connector, status,
                     f" ({error})" if error != "NoError" else "", f": {str(info)[:50]}" if info else "")
            self.journal.save_charger(self.cp_id, status=status, error_code=error, stopped=self.stopped)
        self._update_fault()
        return {}

    def _on_authorize(self, p: Mapping[str, Any], reply: Reply) -> Answer | None:
        tag = str(p.get("id_tag"))
        if not protocol.is_id(tag):
            log.warning("%s: idTag %r is not a driver id (letters, digits, '.', '_', '-'): Invalid", self.cp_id,
                        tag[:20])
            return _tag(INVALID)
        row = self._live_row()
        if row is not None:
            if row.driver_id == tag:
                return _tag(ACCEPTED if row.status == AUTHORIZED else CONCURRENT)
            log.info("%s: Authorize of %s refused: busy with session %s", self.cp_id, tag, row.session_id)
            return _tag(INVALID)
        refusal = self._local_refusal()
        if refusal is not None:
            log.info("%s: Authorize of %s refused: %s", self.cp_id, tag, refusal)
            return _tag(INVALID)
        self._ask_central(_Local(tag, "authorize", reply))
        return None

    def _on_start(self, p: Mapping[str, Any], reply: Reply) -> Answer | None:
        connector = _int(p, "connector_id", 1, MAX_CONNECTOR)
        meter_start = float(_int(p, "meter_start", 0, MAX_WH))
        tag, stamp = str(p.get("id_tag")), str(p.get("timestamp"))
        started = parse_time(stamp) or time.time()
        key = f"{connector}|{tag}|{int(meter_start)}|{stamp[:40]}"
        again = self.journal.by_start_key(self.cp_id, key)
        if again is not None:  # the charger repeats a StartTransaction whose answer it lost
            ok = again.status in (CHARGING, STOPPED) and again.session_id is not None
            return {"transaction_id": again.transaction_id, **_tag(ACCEPTED if ok else INVALID)}
        row = self._live_row()
        if row is not None and row.status == AUTHORIZED and row.driver_id == tag:
            return self._begin(row, connector, meter_start, key, started)
        why = ("not a driver id" if not protocol.is_id(tag) else
               f"busy with session {row.session_id}" if row is not None else self._local_refusal())
        if why is not None:
            status = CONCURRENT if row is not None and row.driver_id == tag else INVALID
            refused = self.journal.refuse(self.cp_id, tag, connector, meter_start, key)
            log.warning("%s: StartTransaction for %s refused (%s): transaction %d is not billed", self.cp_id, tag[:20],
                        why, refused.transaction_id)
            return {"transaction_id": refused.transaction_id, **_tag(status)}
        self._ask_central(_Local(tag, "start", reply, (connector, meter_start, key, started)))
        return None

    def _on_meter_values(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        connector = _int(p, "connector_id", 0, MAX_CONNECTOR)
        self.stats["meter_values"] += 1
        tx = p.get("transaction_id")
        row: TxRow | None
        if tx is not None:
            row = self._row_of(_int(p, "transaction_id", 1, 2**62))
        else:  # values outside a transaction, or of the connector's running one
            live = self._row
            row = live if live is not None and live.status == CHARGING and live.connector_id == connector else None
        if row is None or row.status != CHARGING:
            log.debug("%s: meter values of %s ignored (no charging transaction)", self.cp_id,
                      f"transaction {tx}" if tx is not None else f"connector {connector}")
            return {}
        readings, skipped = energy_readings(p.get("meter_value") or ())
        self._note_skipped(row, skipped)
        self._apply(row, readings, publish=True)
        return {}

    def _on_stop(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        tx = _int(p, "transaction_id", 1, 2**62)
        meter_stop = float(_int(p, "meter_stop", 0, MAX_WH))
        answer: dict[str, Any] = _tag(ACCEPTED) if p.get("id_tag") else {}
        row = self._row_of(tx)
        if row is None:
            log.warning("%s: StopTransaction of unknown transaction %d acknowledged, nothing billed", self.cp_id, tx)
            return answer
        if row.status in (STOPPED, DROPPED, REFUSED):
            if row.status == STOPPED:
                self.stats["duplicate_stops"] += 1
                log.info("%s: StopTransaction of transaction %d again: already billed once (session %s)",
                         self.cp_id, tx, row.session_id)
                if row.published_at is None and row.session_id and not self.kafka.is_pending(row.session_id):
                    self.kafka.completion(row)
            return answer
        if row.status != CHARGING:
            log.warning("%s: StopTransaction of transaction %d, which never started: ignored", self.cp_id, tx)
            return answer
        readings, skipped = energy_readings(p.get("transaction_data") or ())
        self._note_skipped(row, skipped)
        row = self._apply(row, readings, publish=False)
        start = row.meter_start_wh or 0.0
        last = row.last_meter_wh if row.last_meter_wh is not None else start
        final = meter_stop
        if meter_stop < last:
            self._flag_lower(row, 1, f"its meterStop {meter_stop:.0f} Wh is below the last reading {last:.0f} Wh")
            final = last
        energy = min(max(0.0, final - start) / 1000.0, protocol.MAX_ENERGY_KWH)
        now = time.time()
        ended = min(max(parse_time(p.get("timestamp")) or now, row.started_at or 0.0), now)
        why = end_reason(p.get("reason"), row.requested_end)
        row, newly = self.journal.stop(self.cp_id, tx, energy_kwh=energy, end_reason=why, ended_at=ended,
                                       meter_stop_wh=meter_stop)
        if newly:
            self._finished(row)
        return answer

    def _on_data_transfer(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        log.info("%s: DataTransfer from vendor %s ignored", self.cp_id, str(p.get("vendor_id"))[:40])
        return {"status": "UnknownVendorId"}

    def _on_notification(self, p: Mapping[str, Any], _reply: Reply) -> Answer:
        log.info("%s: firmware/diagnostics status %s", self.cp_id, str(p.get("status"))[:40])
        return {}

    ACTIONS: ClassVar[dict[str, Callable[[OcppChargerActor, Mapping[str, Any], Reply], Answer | None]]] = {
        "BootNotification": _on_boot,
        "Heartbeat": _on_heartbeat_req,
        "StatusNotification": _on_status,
        "Authorize": _on_authorize,
        "StartTransaction": _on_start,
        "MeterValues": _on_meter_values,
        "StopTransaction": _on_stop,
        "DataTransfer": _on_data_transfer,
        "FirmwareStatusNotification": _on_notification,
        "DiagnosticsStatusNotification": _on_notification,
    }

    # --- transactions ------------------------------------------------------------------------------
    def _live_row(self) -> TxRow | None:
        return self._row

    @property
    def _held(self) -> str | None:
        """The session the charger holds (authorised or charging): what the life message carries."""
        return self._row.session_id if self._row is not None else None

    def _row_of(self, transaction_id: int) -> TxRow | None:
        """The transaction of this charger (the live one from memory, another from the journal)."""
        if self._row is not None and self._row.transaction_id == transaction_id:
            return self._row
        return self.journal.get(self.cp_id, transaction_id)

    def _forget(self, row: TxRow) -> None:
        """``row`` is not live any more (stopped, dropped)."""
        if self._row is not None and self._row.transaction_id == row.transaction_id:
            self._row = None

    def _local_refusal(self) -> str | None:
        """Why no supply can start at this charger now (None: one can), as a sentence."""
        if not self.registered:
            return "Central is unavailable" if self._link is None else f"{self.cp_id} is not registered with Central"
        if self.stopped:
            return "CP was stopped by Central"
        if self.fault is not None:
            return f"CP is out of order ({self.fault})"
        return None

    def _ask_central(self, local: _Local) -> None:
        corr = protocol.new_id()
        local.timer = self._later(self.options.local_timeout, _LocalTimeout(corr))
        self._local[corr] = local
        self._to_central(protocol.CpSupplyRequest(cp_id=self.cp_id, driver_id=local.id_tag, correlation_id=corr))
        log.info("%s: asked Central to authorise driver %s (%s at the charger)", self.cp_id, local.id_tag,
                 "Authorize" if local.kind == "authorize" else "StartTransaction")

    def _begin(self, row: TxRow, connector: int, meter_start: float, key: str, started: float) -> Answer:
        """The charger started the authorised supply ``row``."""
        row = self.journal.start(self.cp_id, row.transaction_id, connector, meter_start, key, started)
        assert row.session_id is not None
        self._row = row
        timer = self._plug.pop(row.session_id, None)
        if timer is not None:
            timer.cancel()
        self._to_central(protocol.SupplyStarted(cp_id=self.cp_id, session_id=row.session_id, driver_id=row.driver_id))
        log.info("%s: transaction %d started for driver %s (session %s, meter %.0f Wh)", self.cp_id,
                 row.transaction_id, row.driver_id, row.session_id, meter_start)
        self._heartbeat()
        return {"transaction_id": row.transaction_id, **_tag(ACCEPTED)}

    def _apply(self, row: TxRow, readings: list[Reading], *, publish: bool) -> TxRow:
        """Apply readings in order: only a reading above the last one moves the meter (a lower one is
        flagged, never billed); the newest becomes telemetry (when ``publish``)."""
        start = row.meter_start_wh or 0.0
        last = row.last_meter_wh if row.last_meter_wh is not None else start
        last_at, seq, lower = row.last_meter_at, row.seq, 0
        newest: tuple[float, float] | None = None  # (wh, kW)
        for r in readings:
            if r.wh < last:
                lower += 1
                continue
            if r.wh == last:
                continue
            kw = power_between(last, last_at, r)
            last, last_at, seq = r.wh, r.at if r.at is not None else last_at, seq + 1
            newest = (r.wh, kw)
        if lower:
            self._flag_lower(row, lower, f"{lower} reading(s) below the last one ({last:.0f} Wh)")
        if newest is None:
            return row
        energy = min((last - start) / 1000.0, protocol.MAX_ENERGY_KWH)
        self.journal.reading(self.cp_id, row.transaction_id, last, last_at, seq, energy)
        fresh = dataclasses.replace(row, last_meter_wh=last, last_meter_at=last_at, seq=seq, energy_kwh=energy)
        if self._row is not None and self._row.transaction_id == row.transaction_id:
            self._row = fresh
        if publish and row.session_id is not None:
            data = protocol.ChargingData(cp_id=self.cp_id, session_id=row.session_id, driver_id=row.driver_id,
                                         seq=seq, energy_kwh=energy, cost_eur=energy * row.price_eur_kwh,
                                         power_kw=newest[1], timestamp=time.time())
            self.kafka.telemetry(data)
        return fresh

    def _flag_lower(self, row: TxRow, n: int, what: str) -> None:
        self.journal.flag_lower(self.cp_id, row.transaction_id, n)
        self.stats["lower_readings"] += n
        log.warning("%s: transaction %d (session %s): %s — flagged, not billed", self.cp_id, row.transaction_id,
                    row.session_id, what)

    def _note_skipped(self, row: TxRow, skipped: list[str]) -> None:
        if skipped:
            self.stats["skipped_values"] += len(skipped)
            log.warning("%s: transaction %d: skipped %d meter value(s): %s", self.cp_id, row.transaction_id,
                        len(skipped), "; ".join(skipped[:3]))

    def _finished(self, row: TxRow) -> None:
        """``row`` was just stopped: its completion to Kafka, its figures to Central."""
        assert row.session_id is not None
        self._forget(row)
        timer = self._plug.pop(row.session_id, None)
        if timer is not None:
            timer.cancel()
        self.kafka.completion(row)
        why = row.end_reason or "unplugged"
        self._to_central(protocol.SupplyEnded(cp_id=self.cp_id, session_id=row.session_id, end_reason=why,
                                              driver_id=row.driver_id, energy_kwh=row.energy_kwh,
                                              cost_eur=row.cost_eur))
        log.info("%s: transaction %d (session %s, driver %s) ended (%s): %.3f kWh, %.2f € — sending it to Central",
                 self.cp_id, row.transaction_id, row.session_id, row.driver_id, why.replace("_", " "),
                 row.energy_kwh, row.cost_eur)
        self._heartbeat()

    def _end_unstarted(self, session_id: str, why: str) -> None:
        """An authorised supply the charger never started ends with 0 kWh (billed 0 €, as a native Engine's)."""
        row = self.journal.by_session(self.cp_id, session_id)
        if row is None or row.status != AUTHORIZED:
            return
        row, newly = self.journal.stop(self.cp_id, row.transaction_id, energy_kwh=0.0, end_reason=why,
                                       ended_at=time.time())
        if newly:
            self._finished(row)

    def _arm_plug(self, session_id: str) -> None:
        old = self._plug.pop(session_id, None)
        if old is not None:
            old.cancel()
        self._plug[session_id] = schedule(self.options.plug_timeout, self.actor_ref, _PlugTimeout(session_id))

    def _on_plug_timeout(self, session_id: str) -> None:
        self._plug.pop(session_id, None)
        row = self.journal.by_session(self.cp_id, session_id)
        if row is not None and row.status == AUTHORIZED and session_id not in self._remote:
            log.warning("%s: no StartTransaction for session %s within %g s — ending it with 0 kWh", self.cp_id,
                        session_id, self.options.plug_timeout)
            self._end_unstarted(session_id, "unplugged")

    def _on_local_timeout(self, corr: str) -> None:
        local = self._local.pop(corr, None)
        if local is None:
            return
        log.warning("%s: Central did not authorise driver %s within %g s", self.cp_id, local.id_tag,
                    self.options.local_timeout)
        self._answer_local(local, INVALID)

    def _answer_local(self, local: _Local, status: str, row: TxRow | None = None) -> None:
        """Answer the charger's Authorize or StartTransaction with Central's verdict."""
        if local.kind == "authorize":
            local.reply(_tag(status))
            return
        assert local.start is not None
        connector, meter_start, key, started = local.start
        if status == ACCEPTED and row is not None and row.status == AUTHORIZED:
            local.reply(self._begin(row, connector, meter_start, key, started))
            return
        refused = self.journal.refuse(self.cp_id, local.id_tag, connector, meter_start, key)
        local.reply({"transaction_id": refused.transaction_id, **_tag(status if status != ACCEPTED else INVALID)})

    # --- Central (the Monitor half) -------------------------------------------------------------------
    def _current(self, link: pykka.ActorRef[Any]) -> bool:
        return self._link is not None and self._link.actor_urn == link.actor_urn

    def _on_link_up(self, link: pykka.ActorRef[Any], peer: str) -> None:
        self._link, self._ready, self.registered, self._auth = link, False, False, None
        if self.port.superseded:
            log.info("%s: a newer connection of this charger logged in; this one does not", self.cp_id)
            return
        if self._logins:  # Central came back (or restarted): not at once, a newer login may be under way
            self._later(self.options.relogin_delay, _Login(link.actor_urn))
            return
        log.info("%s: connected to Central (%s) — %s", self.cp_id, peer,
                 "authenticating" if self.verifier is not None else "registering (no credential: open enrolment)")
        self._login(link)

    def _on_link_down(self, reason: str) -> None:
        was = self.registered
        self._link, self._ready, self.registered, self._auth, self._register_id = None, False, False, None, None
        self._fault_reported = False
        if self.port.login_result(False, f"lost Central during the login ({reason})") or not was:
            return
        if self.port.open:
            log.warning("%s: lost Central (%s) — the charger accepts no new supply until it is back", self.cp_id,
                        reason)
        else:
            log.info("%s: the charger's connection closed; so did its link to Central", self.cp_id)

    def _login(self, link: pykka.ActorRef[Any]) -> None:
        if self.port.superseded:
            return
        if self.verifier is None:
            self._ready = True
            self._register(link)
            return
        corr = protocol.new_id()
        self._auth = (corr, None)
        tell(link, Send(protocol.AuthRequest(cp_id=self.cp_id, correlation_id=corr)))
        self._later(self.options.register_timeout, _AuthTimeout(corr, 0))

    def _authenticating(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        pending = self._auth
        match msg:
            case protocol.AuthChallenge(corr, nonce) if pending == (corr, None) and self.verifier is not None:
                self._auth = (corr, nonce)
                proof = security.proof(self.verifier, security.PURPOSE_CENTRAL, self.cp_id, nonce)
                tell(link, Send(protocol.AuthProof(correlation_id=corr, cp_id=self.cp_id, proof=proof)))
                self._later(self.options.register_timeout, _AuthTimeout(corr, 1))
            case protocol.AuthResult(corr, status) if pending is not None and pending[0] == corr:
                self._auth = None
                if status != "accepted":  # at once (unknown CP, too many failures) or after the proof
                    self._refused(msg.reason or "no reason given")
                    return
                try:
                    if not msg.key_id or not msg.wrapped_key or self.verifier is None or not pending[1]:
                        raise SecurityError("Central accepted the login but sent no key")
                    key = security.unwrap_key(self.verifier, self.cp_id, pending[1], msg.key_id, msg.wrapped_key)
                except SecurityError as exc:
                    log.error("%s: %s — closing the link to Central", self.cp_id, exc)
                    tell(link, Close(str(exc)))
                    return
                tell(link, Admit(self.cp_id, LinkSeal(self.cp_id, msg.key_id, key, me="monitor", peer="central")))
                old, self._key = self._key, (msg.key_id, key)
                self._ready = True
                self._logins += 1
                log.info("%s: authenticated with Central (key %s) — registering", self.cp_id, msg.key_id)
                self._register(link)
                if old is None or old[0] != msg.key_id:
                    self.kafka.use_key(msg.key_id, key)
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: Central did not accept the login: %s", self.cp_id, reason)
            case protocol.RegisterResponse(status="denied", reason=reason):
                self._refused(reason or "no reason given")
            case _:
                log.debug("%s: ignored a %s from Central before the login", self.cp_id, msg.TYPE)

    def _refused(self, reason: str) -> None:
        log.error("%s: Central refused this charger: %s", self.cp_id, reason)
        if not self.port.login_result(False, reason):
            # Connected already (a re-login after Central came back): a charger Central no longer admits
            # (deregistered, its secret changed) is disconnected; it must log in again with valid credentials.
            self.port.close(f"Central refused this charger: {reason}")

    def _on_auth_timeout(self, corr: str, step: int) -> None:
        pending = self._auth
        if pending is None or pending[0] != corr or (pending[1] is not None) != (step == 1) or self._link is None:
            return
        log.warning("%s: Central did not answer the %s within %g s — reconnecting", self.cp_id,
                    "proof" if step else "login", self.options.register_timeout)
        self._auth = None
        tell(self._link, Close("Central did not finish the login"))

    def _register(self, link: pykka.ActorRef[Any]) -> None:
        self._register_id = protocol.new_id()
        tell(link, Send(protocol.RegisterRequest(cp_id=self.cp_id, correlation_id=self._register_id)))
        self._later(self.options.register_timeout, _RegisterTimeout(self._register_id))

    def _on_register_response(self, msg: protocol.RegisterResponse) -> None:
        if msg.correlation_id != self._register_id:
            return
        self._register_id = None
        if msg.status != "accepted":
            self._refused(msg.reason or "no reason given")
            return
        self.registered = True
        self._registrations += 1
        if msg.price_eur_kwh is not None:
            self.price_eur_kwh = msg.price_eur_kwh
        self.location = msg.location or self.location
        if self.port.login_result(True):
            log.info("Central accepted charger %s (%s, %.2f €/kWh)", self.cp_id, self.location or "no location",
                     self.price_eur_kwh)
        else:
            log.info("%s: registered with Central again", self.cp_id)
        if self.stopped:
            self._stop_confirmed = False
            self._later(self.options.stop_confirm, _StopUnconfirmed(self._registrations))
        if self.fault is not None:
            self._report_fault()
        self._heartbeat()

    def _from_central(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        match msg:
            case protocol.RegisterResponse():
                self._on_register_response(msg)
            case protocol.AuthorizeSupply():
                self._on_authorize_supply(link, msg)
            case protocol.CpSupplyResponse():
                self._on_cp_supply_response(msg)
            case protocol.StopSupply(session_id, reason):
                self._on_stop_supply(session_id, reason if reason in protocol.END_REASONS else "central_stop")
            case protocol.CancelSupply(session_id, reason):
                self._on_cancel(session_id, reason)
            case protocol.StopCp(reason):
                self._on_stop_cp(reason)
            case protocol.ResumeCp():
                if self.stopped:
                    log.info("%s: resumed by Central", self.cp_id)
                self._set_stopped(False)
                self._availability("Operative")
            case protocol.SessionBilled(session_id):
                self._on_billed(session_id)
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: Central could not accept a message: %s", self.cp_id, reason)
            case _:
                log.warning("%s: ignoring a %s from Central", self.cp_id, msg.TYPE)

    def _to_central(self, msg: protocol.Message) -> bool:
        if self._link is None or not self._ready or not self.registered:
            log.info("%s: Central is unavailable; %s not sent", self.cp_id, msg.TYPE)
            return False
        return tell(self._link, Send(msg))

    # Central's orders
    def _on_authorize_supply(self, link: pykka.ActorRef[Any], msg: protocol.AuthorizeSupply) -> None:
        def answer(accepted: bool, reason: str | None = None) -> None:
            tell(link, Send(protocol.SupplyAuthorizationResponse(
                correlation_id=msg.correlation_id, session_id=msg.session_id, accepted=accepted,
                reason=None if reason is None else protocol.clip(reason))))

        known = self.journal.by_session(self.cp_id, msg.session_id)
        if known is not None:
            if known.status in LIVE and msg.session_id not in self._remote:
                answer(True)  # Central asked again: the same answer
            elif known.status not in LIVE:
                answer(False, f"session {msg.session_id} has already taken place at this CP")
            return  # a remote start still being decided answers when the charger did
        local = next((x for x in self._local.values() if x.id_tag == msg.driver_id), None)
        refusal = self._supply_refusal(msg, remote=local is None)
        if refusal is not None:
            log.info("%s: refused supply %s for driver %s: %s", self.cp_id, msg.session_id, msg.driver_id, refusal)
            answer(False, refusal)
            return
        row = self.journal.hold(self.cp_id, msg.session_id, msg.driver_id, msg.price_eur_kwh,
                                "local" if local is not None else "remote")
        self._row = row
        if local is not None:  # the charger asked (Authorize / StartTransaction): it starts by itself
            self._arm_plug(msg.session_id)
            answer(True)
            return
        payload: dict[str, Any] = {"id_tag": msg.driver_id}
        if self.options.connector:
            payload["connector_id"] = self.options.connector
        if not self.port.call("RemoteStartTransaction", payload, self.actor_ref, ("remote_start", msg.session_id)):
            self.journal.drop(self.cp_id, msg.session_id)
            self._forget(row)
            answer(False, f"charger {self.cp_id} cannot be reached right now")
            return
        self._remote[msg.session_id] = msg.correlation_id
        self._later(self.options.remote_timeout, _RemoteTimeout(msg.session_id))
        log.info("%s: asked the charger to start a charge for driver %s (session %s, transaction id %d)",
                 self.cp_id, msg.driver_id, msg.session_id, row.transaction_id)

    def _supply_refusal(self, msg: protocol.AuthorizeSupply, *, remote: bool) -> str | None:
        if msg.cp_id != self.cp_id:
            return f"this is CP {self.cp_id}, not {msg.cp_id}"
        if not self._wire_up or not self.port.open:
            return f"charger {self.cp_id} is not connected"
        if self.stopped:
            return "CP was stopped by Central"
        if self.fault is not None:
            return f"CP is out of order ({self.fault})"
        row = self._live_row()
        if row is not None:
            return f"CP is busy with session {row.session_id}"
        if remote and len(msg.driver_id) > ID_TAG_MAX:
            return f"driver ids over {ID_TAG_MAX} characters cannot be sent to an OCPP 1.6 charger (idTag)"
        if remote:
            status = self.connectors.get(self.options.connector or 1, ("Available", ""))[0]
            if status in BUSY_STATES:
                return f"the charger's connector is {status}"
        return None

    def _on_remote_answer(self, session_id: str, ok: bool, payload: Mapping[str, Any], error: str) -> None:
        corr = self._remote.pop(session_id, None)
        accepted = ok and payload.get("status") == "Accepted"
        if corr is None:  # timed out already: Central was told no; the charger's late yes starts nothing billed
            log.warning("%s: the charger answered the remote start of %s too late (%s)", self.cp_id, session_id,
                        "accepted" if accepted else error or payload.get("status"))
            return
        link = self._link
        if accepted:
            self._arm_plug(session_id)
            log.info("%s: the charger accepted the remote start of session %s", self.cp_id, session_id)
        else:
            self.journal.drop(self.cp_id, session_id)
            if self._row is not None and self._row.session_id == session_id:
                self._row = None
        reason = None if accepted else (f"the charger rejected the remote start ({error})" if error
                                        else "the charger rejected the remote start")
        if link is not None and self._ready:
            tell(link, Send(protocol.SupplyAuthorizationResponse(correlation_id=corr, session_id=session_id,
                                                                 accepted=accepted, reason=reason)))

    def _on_remote_timeout(self, session_id: str) -> None:
        if session_id not in self._remote:
            return
        self._on_remote_answer(session_id, False, {}, f"no answer within {self.options.remote_timeout:g} s")

    def _on_cp_supply_response(self, msg: protocol.CpSupplyResponse) -> None:
        local = self._local.pop(msg.correlation_id, None)
        if local is None:
            return
        if local.timer is not None:
            local.timer.cancel()
        if msg.status == "authorized" and msg.session_id:
            row = self.journal.by_session(self.cp_id, msg.session_id)
            log.info("%s: Central authorised driver %s (session %s)", self.cp_id, local.id_tag, msg.session_id)
            self._answer_local(local, ACCEPTED, row)
            return
        reason = msg.reason or "no reason given"
        log.warning("%s: Central refused driver %s: %s", self.cp_id, local.id_tag, reason)
        self._answer_local(local, CONCURRENT if "already supplying" in reason else INVALID)

    def _on_stop_supply(self, session_id: str, why: str) -> None:
        row = self.journal.by_session(self.cp_id, session_id)
        if row is None:
            log.info("%s: asked to stop session %s, which is not at this charger", self.cp_id, session_id)
        elif row.status == CHARGING:
            self._remote_stop(row, why)
        elif row.status == AUTHORIZED:
            self._end_unstarted(session_id, why)
        elif row.status == STOPPED:  # over already: say so again, Central may have missed it
            self._to_central(protocol.SupplyEnded(cp_id=self.cp_id, session_id=session_id,
                                                  end_reason=row.end_reason or "unplugged", driver_id=row.driver_id,
                                                  energy_kwh=row.energy_kwh, cost_eur=row.cost_eur))

    def _remote_stop(self, row: TxRow, why: str) -> None:
        self.journal.request_end(self.cp_id, row.transaction_id, why)
        if self._row is not None and self._row.transaction_id == row.transaction_id and not self._row.requested_end:
            self._row = dataclasses.replace(self._row, requested_end=why)
        sent = self.port.call("RemoteStopTransaction", {"transaction_id": row.transaction_id}, self.actor_ref,
                              ("remote_stop", row.session_id))
        log.info("%s: asked the charger to stop transaction %d (session %s, %s)%s", self.cp_id, row.transaction_id,
                 row.session_id, why.replace("_", " "), "" if sent else " — but it is not connected")

    def _on_cancel(self, session_id: str, reason: str) -> None:
        row = self.journal.by_session(self.cp_id, session_id)
        if row is not None and row.status == CHARGING:
            log.warning("%s: Central cancelled session %s after it started (%s) — stopping it; what was supplied "
                        "is billed", self.cp_id, session_id, reason)
            self._remote_stop(row, "central_stop")
            return
        if row is not None and row.status == STOPPED:
            self._to_central(protocol.SupplyEnded(cp_id=self.cp_id, session_id=session_id,
                                                  end_reason=row.end_reason or "unplugged", driver_id=row.driver_id,
                                                  energy_kwh=row.energy_kwh, cost_eur=row.cost_eur))
            return
        if row is not None and row.status == AUTHORIZED:
            self.journal.drop(self.cp_id, session_id)
            self._forget(row)
            self._remote.pop(session_id, None)
            timer = self._plug.pop(session_id, None)
            if timer is not None:
                timer.cancel()
            log.warning("%s: Central cancelled session %s before it started (%s) — dropped, no bill", self.cp_id,
                        session_id, reason)
        self._to_central(protocol.SupplyEnded(cp_id=self.cp_id, session_id=session_id, end_reason="central_stop",
                                              energy_kwh=0.0, cost_eur=0.0))

    def _on_stop_cp(self, reason: str) -> None:
        self._stop_confirmed = True
        if not self.stopped:
            log.warning("%s: stopped by Central (%s)", self.cp_id, reason)
        self._set_stopped(True)
        row = self._live_row()
        if row is not None and row.status == CHARGING:
            self._remote_stop(row, "central_stop")
        elif row is not None and row.session_id is not None:
            self._end_unstarted(row.session_id, "central_stop")
        self._availability("Inoperative")

    def _set_stopped(self, stopped: bool) -> None:
        if stopped != self.stopped:
            self.stopped = stopped
            status = self.connectors.get(0, (None, None))
            self.journal.save_charger(self.cp_id, status=status[0], error_code=status[1], stopped=stopped)
        self._update_fault()

    def _availability(self, kind: str) -> None:
        self.port.call("ChangeAvailability", {"connector_id": 0, "type": kind}, self.actor_ref, ("availability", kind))

    def _on_call_done(self, token: Any, ok: bool, payload: Mapping[str, Any], error: str) -> None:
        match token:
            case ("remote_start", str(sid)):
                self._on_remote_answer(sid, ok, payload, error)
            case ("remote_stop", sid):
                if not ok or payload.get("status") != "Accepted":
                    log.warning("%s: the charger did not accept to stop session %s: %s", self.cp_id, sid,
                                error or payload.get("status"))
            case ("availability", kind):
                (log.info if ok and payload.get("status") in ("Accepted", "Scheduled") else log.warning)(
                    "%s: ChangeAvailability %s: %s", self.cp_id, kind, payload.get("status") if ok else error)

    def _on_billed(self, session_id: str) -> None:
        if self.kafka.billed(session_id):
            log.info("%s: Central issued the ticket of session %s", self.cp_id, session_id)

    # --- faults and life ---------------------------------------------------------------------------------
    def _fault_reason(self) -> str | None:
        """Why the charger cannot supply now, from its last StatusNotifications (None: it can)."""
        faulted = [(c, e) for c, (s, e) in sorted(self.connectors.items()) if s == "Faulted"]
        if faulted:
            connector, error = faulted[0]
            return f"the charger reports Faulted ({error}{'' if connector == 0 else f', connector {connector}'})"
        return None

    def _out_of_service(self) -> str | None:
        """Why the charger took itself out of service (None: it did not): every connector, or the whole
        charger, Unavailable without Central having asked (its heartbeat says so; Central shows STOPPED)."""
        whole = self.connectors.get(0, ("", ""))[0]
        each = [s for c, (s, _e) in self.connectors.items() if c > 0]
        if not self.stopped and (whole == "Unavailable" or (each and all(s == "Unavailable" for s in each))):
            return "the charger reports itself Unavailable"
        return None

    def _update_fault(self) -> None:
        """After a StatusNotification or Central's stop/resume: report a fault that began or ended, and
        send a heartbeat at once when that or the charger's own out-of-service changed."""
        fault, out = self._fault_reason(), self._out_of_service()
        if fault == self.fault and out == self._out_of_service_said:
            return
        if out != self._out_of_service_said:
            self._out_of_service_said = out
            log.info("%s: %s", self.cp_id, f"out of service by itself: {out}" if out else "in service")
        before, self.fault = self.fault, fault
        if fault is not None and fault != before:
            log.warning("%s: out of order: %s", self.cp_id, fault)
            self._fault_reported = False
            self._report_fault()
        elif fault is None and before is not None:
            log.info("%s: works again (%s is over)", self.cp_id, before)
            if self._fault_reported:
                self._to_central(protocol.FaultCleared(cp_id=self.cp_id))
            self._fault_reported = False
        self._heartbeat()

    def _report_fault(self) -> None:
        if self.fault is not None and self.registered and not self._fault_reported:
            self._fault_reported = self._to_central(
                protocol.FaultNotification(cp_id=self.cp_id, reason=protocol.clip(self.fault)))

    def _state(self) -> CpState:
        row = self._live_row()
        supplying = row is not None and row.status == CHARGING
        return derive_state(connected=self.registered, engine_ok=self.fault is None, supplying=supplying,
                            stopped=self.stopped or self._out_of_service() is not None)

    def _heartbeat(self) -> None:
        if not self.registered or not self._wire_up or not self.port.open:
            return
        self._to_central(protocol.Heartbeat(cp_id=self.cp_id, engine_ok=self.fault is None, state=self._state(),
                                            supplying_session_id=self._held,
                                            out_of_service=self._out_of_service()))

    def _tick(self) -> None:
        self._ticks += 1
        self._heartbeat()
        silent = time.monotonic() - self._last_seen
        if self._wire_up and silent > self.options.silence:
            log.warning("%s: no message from the charger for %.0f s — closing its connection", self.cp_id, silent)
            self.port.close(f"no message for {silent:.0f} s")
        every = max(1, round(self.options.billing_check / self.options.heartbeat_interval))
        if self._ticks % every == 0:
            self.kafka.check(self.registered)

    # --- views ------------------------------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        live = self._live_row()
        return {
            "cp_id": self.cp_id,
            "state": str(self._state()),
            "registered": self.registered,
            "authenticated": self.verifier is not None and self._ready,
            "key_id": self._key[0] if self._key else None,
            "logins": self._logins,
            "connected": self._wire_up and self.port.open,
            "booted": bool(self.booted),
            "connectors": {c: s for c, (s, _e) in self.connectors.items()},
            "fault": self.fault,
            "stopped": self.stopped,
            "session_id": self._held,
            "transaction_id": live.transaction_id if live else None,
            "pending_completions": self.kafka.pending,
            "price_eur_kwh": self.price_eur_kwh,
            **self.stats,
            **self.kafka.stats,
        }
