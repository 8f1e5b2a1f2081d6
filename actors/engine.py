"""EngineActor: the charger itself (EV_CP_E's domain).

Why one actor: every decision of a charging point (may I accept this supply?
is a car plugged in? how much energy so far? how did it end?) depends on the
same few facts, so they live in one mailbox and never race (SPEC §5: the
seed's getter and setter of ``is_charging`` touched different fields).

What it talks to, all passed in by the wiring code:

* its Monitor, through framed socket actors: it learns the link from
  ``LinkUp``/``FrameIn`` and answers on the link a message came from; when
  several links are up (a Monitor restarted) the newest is the Monitor.
  With the CP's credential (issue #11) a link is the Monitor only once it
  paired (:mod:`actors.engine_pairing`): until then every frame on it is
  answered ``error`` and never acted on; a paired link is sealed both ways;
* Kafka, through the ``Publisher`` actor named ``publisher``: telemetry to
  ``charging_session_data`` and completions to ``charging_session_complete``,
  each sealed at publish time with the CP key the Monitor handed over in its
  ``hello`` (kept in memory only). With a credential and no key yet, records
  wait (the newest telemetry of a supply, every completion in the journal)
  until one arrives; without a credential and without a key they go plain
  (development);
* its journal (:class:`~persistence.journal.EngineJournal`), so a supply
  survives a crash: every tick is journaled before it is published, a
  completion is journaled before it is sent, and marked published only when
  the broker acknowledged it. On start-up the journal tells what to finish.

No sockets, no Kafka client, no sleeping: timers tell messages back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.console import ConsoleLine
from actors.engine_pairing import EngineCredential, EnginePairing
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, Ticker, backoff_strategy, schedule, tell
from persistence import EngineJournal, JournalEntry, PersistenceError
from transport import protocol
from transport.kafka import Publish, Published, PublishFailed
from transport.link import Admit, Close, FrameIn, FrameRejected, LinkDown, LinkUp, Send
from transport.security import KEY_BYTES, MicroCounter, SecurityError, b64d, seal

log = logging.getLogger("evcharging.engine")

__all__ = ["EngineActor", "EngineOptions", "EngineStatus", "ShutdownSupply", "HELP"]

DATA_TOPIC = "charging_session_data"
COMPLETE_TOPIC = "charging_session_complete"

HELP = (
    "Commands: p = plug in the vehicle · u = unplug · k = toggle KO (simulated fault) · "
    "s DRIVER_ID = start a supply for a driver · status · help"
)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Physics and timings of one Engine; each field is a flag of EV_CP_E."""

    power_kw: float = 7.4
    tick: float = 1.0
    auto_plug: bool = False
    plug_delay: float = 1.0
    plug_timeout: float = 60.0
    supply_seconds: float | None = None
    expected_cp_id: str | None = None
    completion_retry_base: float = 0.5
    completion_retry_max: float = 10.0
    completion_ack_timeout: float = 30.0
    monitor_grace: float = 2.0  # a supply outlives its Monitor link this long (a restarted Monitor is back sooner)
    billing_check: float = 5.0  # how often to ask Central about completions whose ticket was not seen
    republish_after: float = 15.0  # a completion without Central's ticket this long after sending is sent again


# --- messages ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EngineStatus:
    """Ask: a dict snapshot of the Engine (for tests, the launcher, ``status``)."""


@dataclass(frozen=True, slots=True)
class ShutdownSupply:
    """Ask, before a polite stop: end any live supply (``fault``) and set
    ``drained`` once every completion is acknowledged by Kafka. Returns the
    session id that was ended, or None."""

    drained: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class _AutoPlug:
    session_id: str


@dataclass(frozen=True, slots=True)
class _PlugTimeout:
    session_id: str


@dataclass(frozen=True, slots=True)
class _Tick:
    session_id: str


@dataclass(frozen=True, slots=True)
class _SupplyTimeUp:
    session_id: str


@dataclass(frozen=True, slots=True)
class _SendCompletion:
    session_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class _BillingCheck:
    """Time to ask Central about (and maybe republish) completions not yet billed."""


@dataclass(frozen=True, slots=True)
class _MonitorGone:
    """The grace period after losing the Monitor link is over (mid-supply)."""

    session_id: str


# --- state (not messages) ------------------------------------------------------
@dataclass(slots=True)
class _Supply:
    """The one supply the CP is busy with: authorised, then plugged in."""

    session_id: str
    cp_id: str
    driver_id: str
    price_eur_kwh: float
    plugged: bool = False
    seq: int = 0
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    timers: list[Scheduled] = field(default_factory=list)
    ticker: Ticker | None = None

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        if self.ticker is not None:
            self.ticker.stop()
            self.ticker = None


@dataclass(slots=True)
class _Pending:
    """A completion sent to Kafka and not yet acknowledged."""

    completion: protocol.ChargeCompletion
    attempt: int = 0
    timer: Scheduled | None = None
    held: bool = False  # waiting for a key to seal it with (a credential, and the Monitor has none yet)


@dataclass(frozen=True, slots=True)
class _Key:
    """The CP's current key from Central, as the Monitor handed it over (memory only)."""

    cp_id: str
    key_id: str
    key: bytes = field(repr=False)


#: Telemetry held while there is no key: the newest reading of at most this many sessions.
MAX_HELD_SESSIONS = 16


class EngineActor(SupervisedActor):
    """One charging point's engine; see the module docstring."""

    def __init__(
        self,
        journal_path: str,
        directory: Directory,
        *,
        options: EngineOptions = EngineOptions(),
        publisher: str = "publisher",
        credential: EngineCredential | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        """``credential``: the CP's id and verifier; with it the Engine obeys only a paired Monitor
        and publishes nothing unsealed (without it: development mode, today's behaviour)."""
        super().__init__(supervision=supervision)
        self.journal_path = journal_path
        self.directory = directory
        self.options = options
        self.publisher = publisher
        self.cp_id: str | None = None
        self.price_eur_kwh = 0.0
        self.ko = False
        self.stopped = False
        self.stop_reason = ""
        self._journal: EngineJournal | None = None
        self._links: list[pykka.ActorRef[Any]] = []  # in LinkUp order
        # Links that said hello: the newest of them is the Monitor. A connection that
        # never said hello (a stray client, garbage) must not receive the CP's reports.
        self._greeted: dict[str, str] = {}  # link urn -> peer
        self._peers: dict[str, str] = {}  # link urn -> peer, for every live link
        self._supply: _Supply | None = None
        self._pending: dict[str, _Pending] = {}
        self._drained: list[threading.Event] = []
        self._cp_requests: dict[str, str] = {}  # correlation id -> driver id, typed at the CP
        self._delay = backoff_strategy(options.completion_retry_base, options.completion_retry_max)
        self._republished: dict[str, float] = {}  # session id -> when its completion was last (re)sent
        self._billing_ticker: Ticker | None = None
        # The trust boundary (issue #11): pairing, and the key records are sealed with.
        self._pairing = EnginePairing(credential.cp_id, credential.verifier) if credential else None
        self._paired: set[str] = set()  # urns of links that paired (sealed; the Monitor's)
        self._key: _Key | None = None
        self._ctr = MicroCounter()
        self._held_data: dict[str, protocol.ChargingData] = {}  # session id -> newest unsent reading
        self._sealed_with: dict[str, str] = {}  # session id -> key id its completion last went out with

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        self._journal = EngineJournal.open(self.journal_path)
        # Here, not as a message to ourselves: frames may already wait in the mailbox (a
        # Monitor that reconnected while we started), and a hello handled before the
        # recovery would answer "no supply" for the supply we are about to resume.
        self._recover()
        self._billing_ticker = Ticker(self.options.billing_check, self.actor_ref, _BillingCheck(),
                                      name="engine-billing-check")

    def teardown(self) -> None:
        # A live supply stays 'supplying' in the journal on purpose: the next
        # start reports it (engine_recovered), or resumes it when the supervisor
        # restarts this actor in the same process; either way no energy is lost.
        if self._supply is not None:
            self._supply.cancel()
            log.warning(
                "%s stops with supply %s still open: it will be reported to Central when the Engine starts again",
                self._me, self._supply.session_id,
            )
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        for event in self._drained:
            event.set()
        if self._billing_ticker is not None:
            self._billing_ticker.stop()
        if self._journal is not None:
            self._journal.close()

    # --- messages ---------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case FrameIn(link, msg, principal) if self._pairing is not None and principal is None:
                self._on_unpaired(link, msg)
            case FrameIn(link, msg):
                self._on_frame(link, msg)
            case FrameRejected(_, peer, reason):
                log.debug("%s: the link from %s refused a frame: %s", self._me, peer, reason)
            case LinkUp(link, peer):
                self._on_link_up(link, peer)
            case LinkDown(link, peer, reason):
                self._on_link_down(link, peer, reason)
            case ConsoleLine(text):
                self._on_console(text)
            case _AutoPlug(sid) | _PlugTimeout(sid) | _Tick(sid) | _SupplyTimeUp(sid) | _MonitorGone(sid) \
                    if not self._is_live(sid):
                pass  # a timer of a supply that already ended
            case _AutoPlug(sid):
                log.info("%s: the vehicle of supply %s is plugged in automatically (unattended mode)", self._me, sid)
                self._plug()
            case _PlugTimeout(sid) if self._supply is not None and not self._supply.plugged:
                log.warning(
                    "%s: no vehicle was plugged in within %g s — ending supply %s with 0 kWh",
                    self._me, self.options.plug_timeout, sid,
                )
                self._end("unplugged")
            case _Tick():
                self._tick()
            case _SupplyTimeUp(sid):
                log.info("%s: %g s of supply elapsed — unplugging the vehicle of %s (unattended mode)",
                         self._me, self.options.supply_seconds, sid)
                self._end("unplugged")
            case Published(token):
                self._on_published(token)
            case PublishFailed(token, reason):
                self._on_publish_failed(token, reason)
            case _MonitorGone(sid) if self._monitor is None:
                log.warning("%s: the Monitor did not come back within %g s — ending supply %s",
                            self._me, self.options.monitor_grace, sid)
                self._end("monitor_lost")
            case _SendCompletion(sid, attempt):
                pending = self._pending.get(sid)
                if pending is not None and pending.attempt == attempt:
                    self._publish_completion(sid)
            case _BillingCheck():
                self._billing_check()
            case EngineStatus():
                return self._status()
            case ShutdownSupply(drained):
                return self._shutdown_supply(drained)
            case _:
                log.debug("%s: ignoring unexpected %s", self._me, type(message).__name__)
        return None

    # --- links -------------------------------------------------------------------
    @property
    def _monitor(self) -> pykka.ActorRef[Any] | None:
        for link in self._links[::-1]:  # the newest first
            if link.actor_urn in self._greeted:
                return link
        return None

    def _known(self, link: pykka.ActorRef[Any]) -> bool:
        return any(known.actor_urn == link.actor_urn for known in self._links)

    def _on_link_up(self, link: pykka.ActorRef[Any], peer: str) -> None:
        if not self._known(link):
            self._links.append(link)
        self._peers[link.actor_urn] = peer
        log.debug("%s: a connection from %s (a Monitor once it says hello)", self._me, peer)

    def _on_link_down(self, link: pykka.ActorRef[Any], peer: str, reason: str) -> None:
        was_monitor = self._monitor is not None and self._monitor.actor_urn == link.actor_urn
        self._links = [other for other in self._links if other.actor_urn != link.actor_urn]
        self._greeted.pop(link.actor_urn, None)
        self._peers.pop(link.actor_urn, None)
        self._paired.discard(link.actor_urn)
        if self._pairing is not None:
            self._pairing.forget(link.actor_urn)
        if not was_monitor:
            log.debug("%s: a connection from %s that is not the Monitor closed (%s)", self._me, peer, reason)
            return
        if self._monitor is not None:
            log.info("%s: the Monitor link from %s closed (%s); a newer one is still up", self._me, peer, reason)
            return
        log.warning("%s: lost its Monitor (%s) — accepting no new supply until it is back", self._me, reason)
        if self._supply is not None:
            # A Monitor restarted by its supervisor (or a blip of the local link) is
            # back within the grace period and the supply goes on; otherwise it ends.
            log.warning("%s: supply %s ends in %g s unless the Monitor is back", self._me,
                        self._supply.session_id, self.options.monitor_grace)
            self._supply.timers.append(schedule(self.options.monitor_grace, self.actor_ref,
                                                _MonitorGone(self._supply.session_id)))

    def _send(self, link: pykka.ActorRef[Any] | None, message: protocol.Message) -> bool:
        return tell(link, Send(message))

    def _on_unpaired(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        """A frame on a link that has not paired (with a credential): only the pairing is answered."""
        assert self._pairing is not None
        peer = self._peers.get(link.actor_urn, "?")
        verdict = self._pairing.handle(link.actor_urn, peer, msg)
        if verdict.answer is not None:
            self._send(link, verdict.answer)  # plain: the result before the link is sealed
        if verdict.seal is not None:
            tell(link, Admit("monitor", verdict.seal))
            self._on_paired(link, peer)
        if verdict.close is not None:
            tell(link, Close(verdict.close))

    def _on_paired(self, link: pykka.ActorRef[Any], peer: str) -> None:
        """``link`` proved the CP's credential: it is the Monitor now, and an older paired link is not."""
        for other in self._links:
            if other.actor_urn in self._paired and other.actor_urn != link.actor_urn:
                log.info("%s: a newly paired Monitor replaces the one from %s", self._me,
                         self._peers.get(other.actor_urn, "?"))
                self._greeted.pop(other.actor_urn, None)
                self._paired.discard(other.actor_urn)
                tell(other, Close("replaced by a newly paired Monitor"))
        self._links = [other for other in self._links if other.actor_urn != link.actor_urn] + [link]
        self._paired.add(link.actor_urn)
        self._greeted[link.actor_urn] = peer
        log.info("%s: its Monitor paired from %s (the link is sealed)", self._me, peer)

    def _on_frame(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        # Connections start after this actor (rest_for_one) and say LinkUp first, so
        # every link is known here; also after a restart of this actor.
        match msg:
            case protocol.HealthCheck(seq):
                self._send(link, protocol.HealthStatus(seq=seq, ok=not self.ko))
            case protocol.Hello(cp_id, price):
                if self._on_hello(link, cp_id, price):
                    self._take_key(msg)
            case protocol.AuthorizeSupply():
                self._on_authorize(link, msg)
            case protocol.StopSupply(session_id, reason):
                self._on_stop_supply(link, session_id, reason)
            case protocol.StopCp(reason):
                self._on_stop_cp(reason)
            case protocol.ResumeCp():
                self._on_resume_cp()
            case protocol.CpSupplyResponse():
                self._on_cp_supply_response(msg)
            case protocol.CancelSupply(session_id, reason):
                self._on_cancel_supply(link, session_id, reason)
            case protocol.SessionBilled(session_id):
                self._on_session_billed(session_id)
            case protocol.ErrorMessage(reason):
                log.warning("%s: the Monitor could not accept a message: %s", self._me, reason)
            case protocol.AuthRequest(_, correlation_id) if self._pairing is None:
                log.warning("%s: a Monitor asked to pair, but this Engine has no credential (development mode)",
                            self._me)
                self._send(link, protocol.AuthResult(
                    correlation_id=correlation_id, status="denied",
                    reason="this Engine runs without a credential (development mode): it cannot pair"))
            case _:
                log.warning("%s: ignoring a %s from the Monitor (not for an Engine)", self._me, msg.TYPE)
                self._send(link, protocol.ErrorMessage(
                    reason=f"an Engine does not handle {msg.TYPE}", correlation_id=protocol.correlation_of(msg)))

    # --- Monitor commands ----------------------------------------------------------
    def _on_hello(self, link: pykka.ActorRef[Any], cp_id: str, price: float) -> bool:
        # A new Monitor arriving mid-supply is not sent supply_started again:
        # Central would tell the driver "plugged in" a second time.
        expected = self.options.expected_cp_id
        if expected is not None and cp_id != expected:
            log.error("This Engine is %s but a Monitor introduced itself as %s — ignoring it", expected, cp_id)
            self._send(link, protocol.ErrorMessage(reason=f"this Engine is {expected}, not {cp_id}"))
            return False
        if self.cp_id is not None and cp_id != self.cp_id:
            if self._supply is not None:
                log.error("%s: a Monitor says this CP is %s while supply %s is running — ignoring it",
                          self._me, cp_id, self._supply.session_id)
                return False
            log.warning("%s: the Monitor now says this CP is %s", self._me, cp_id)
        changed = (cp_id, price) != (self.cp_id, self.price_eur_kwh)
        self.cp_id, self.price_eur_kwh = cp_id, price
        if link.actor_urn not in self._greeted:
            peer = self._peers.get(link.actor_urn, "")
            self._greeted[link.actor_urn] = peer
            log.info("%s: a Monitor connected%s", self._me, f" from {peer}" if peer else " (again, after a restart)")
        (log.info if changed else log.debug)(
            "%s: the Monitor confirmed the CP id; price %s", cp_id,
            f"{price:.2f} €/kWh" if price else "not known yet (Central has not answered)",
        )
        # Tell the (maybe restarted) Monitor which session this CP holds: its
        # heartbeat carries it to Central, which reconciles its sessions with it.
        s = self._supply
        self._send(link, protocol.SupplyState(cp_id=cp_id, session_id=s.session_id if s else None,
                                              plugged=bool(s and s.plugged)))
        return True

    def _take_key(self, hello: protocol.Hello) -> None:
        """The key the Monitor handed over (or its absence): seal with it from now on."""
        if hello.key_id is None or hello.key is None:
            if self._key is not None:
                log.info("%s: the Monitor has no key from Central now — %s until it hands one over", self._me,
                         "holding records" if self._pairing is not None else "publishing plain records")
            self._key = None
            return
        try:
            raw = b64d(hello.key, "key")
            if len(raw) != KEY_BYTES:
                raise SecurityError(f"a key must be {KEY_BYTES} bytes")
        except SecurityError as exc:
            log.error("%s: the Monitor handed over an unusable key %s: %s", self._me, hello.key_id, exc)
            return
        old, self._key = self._key, _Key(hello.cp_id, hello.key_id, raw)
        if old is not None and (old.key_id, old.key) == (hello.key_id, raw):
            return
        log.info("%s: sealing its Kafka records with key %s from now on", self._me, hello.key_id)
        self._release()

    def _release(self) -> None:
        """A new key: send what waited for one, and again the completions an older key sealed."""
        held, self._held_data = self._held_data, {}
        for data in held.values():
            self._publish_data(data)
        for sid, pending in list(self._pending.items()):
            if pending.held:
                self._publish_completion(sid)
        assert self._journal is not None and self._key is not None
        now = time.time()
        for entry in self._journal.unbilled():
            sid = entry.session_id
            old = self._sealed_with.get(sid)
            if sid not in self._pending and old is not None and old != self._key.key_id:
                log.info("%s: sending the completion of %s again, sealed with the new key (it went out with %s)",
                         self._me, sid, old)
                self._republished[sid] = now
                self._queue_completion(entry)

    def _outgoing(self, message: protocol.ChargingData | protocol.ChargeCompletion) -> protocol.Message | None:
        """``message`` as it goes to Kafka: sealed with the current key; plain without a key and
        without a credential (development); None when it must wait for a key."""
        key = self._key
        if key is not None:
            return seal(key.key, message.cp_id, key.key_id, "engine", self._ctr.next(), message)
        if self._pairing is not None:
            return None
        return message

    def _refusal(self, msg: protocol.AuthorizeSupply) -> str | None:
        """Why this CP cannot accept the supply now, as a sentence; None if it can."""
        if self.cp_id is None:
            return "CP has not been registered by its Monitor yet"
        if msg.cp_id != self.cp_id:
            return f"this is CP {self.cp_id}, not {msg.cp_id}"
        if self.stopped:
            return "CP was stopped by Central"
        if self.ko:
            return "CP is out of order"
        if self._supply is not None:
            return f"CP is busy with session {self._supply.session_id}"
        entry = self._journal_get(msg.session_id)
        if entry is not None:
            return f"session {msg.session_id} has already taken place at this CP"
        return None

    def _on_authorize(self, link: pykka.ActorRef[Any], msg: protocol.AuthorizeSupply) -> None:
        def answer(accepted: bool, reason: str | None = None) -> None:
            self._send(link, protocol.SupplyAuthorizationResponse(
                correlation_id=msg.correlation_id, session_id=msg.session_id, accepted=accepted, reason=reason))

        if self._supply is not None and self._supply.session_id == msg.session_id:
            answer(True)  # Central asked twice: same answer
            return
        reason = self._refusal(msg)
        if reason is not None:
            log.info("%s: refused supply %s for driver %s: %s", self._me, msg.session_id, msg.driver_id, reason)
            answer(False, reason)
            return
        assert self._journal is not None and self.cp_id is not None
        self._journal.begin(msg.session_id, self.cp_id, msg.driver_id, msg.price_eur_kwh, started_at=time.time())
        supply = _Supply(msg.session_id, self.cp_id, msg.driver_id, msg.price_eur_kwh)
        self._supply = supply
        answer(True)
        log.info("%s: supply %s authorised for driver %s at %.2f €/kWh — %s",
                 self._me, msg.session_id, msg.driver_id, msg.price_eur_kwh, self._await_plug(supply))

    def _await_plug(self, supply: _Supply) -> str:
        """Start the plug-in timers of an authorised supply; returns what happens next, as a hint."""
        me = self.actor_ref
        supply.timers.append(schedule(self.options.plug_timeout, me, _PlugTimeout(supply.session_id)))
        if self.options.auto_plug:
            supply.timers.append(schedule(self.options.plug_delay, me, _AutoPlug(supply.session_id)))
            return f"it plugs in by itself in {self.options.plug_delay:g} s"
        return "type p when the vehicle is plugged in"

    def _on_stop_supply(self, link: pykka.ActorRef[Any], session_id: str, reason: str) -> None:
        end_reason = reason if reason in protocol.END_REASONS else "central_stop"
        if self._supply is not None and self._supply.session_id == session_id:
            log.info("%s: Central asked to stop supply %s (%s)", self._me, session_id, end_reason.replace("_", " "))
            self._end(end_reason)
            return
        entry = self._journal_get(session_id)
        if entry is not None and entry.status != "supplying":
            # Already over: say so again, Central may have missed it.
            self._send(link, self._supply_ended(entry))
            return
        log.info("%s: asked to stop supply %s, which is not running here", self._me, session_id)

    def _on_cancel_supply(self, link: pykka.ActorRef[Any], session_id: str, reason: str) -> None:
        """Central cancelled the session: drop it if no energy flowed, else end it (billed).
        Always confirmed with ``supply_ended`` (Central repeats the order until then)."""
        supply = self._supply
        if supply is not None and supply.session_id == session_id:
            if supply.plugged:
                log.warning("%s: Central cancelled supply %s (%s) after the plug-in — ending it; "
                            "what was supplied is billed", self._me, session_id, reason)
                self._end("central_stop")
                return
            assert self._journal is not None
            supply.cancel()
            self._supply = None
            self._journal.discard(session_id)
            log.warning("%s: Central cancelled supply %s for driver %s before the plug-in (%s) — dropped, no bill",
                        self._me, session_id, supply.driver_id, reason)
            self._send(link, protocol.SupplyEnded(cp_id=supply.cp_id, session_id=session_id, end_reason="central_stop",
                                                  driver_id=supply.driver_id, energy_kwh=0.0, cost_eur=0.0))
            return
        entry = self._journal_get(session_id)
        if entry is not None and entry.status != "supplying":
            self._send(link, self._supply_ended(entry))
        elif self.cp_id is not None:
            log.info("%s: Central cancelled supply %s, which is not running here", self._me, session_id)
            self._send(link, protocol.SupplyEnded(cp_id=self.cp_id, session_id=session_id, end_reason="central_stop",
                                                  energy_kwh=0.0, cost_eur=0.0))

    def _on_session_billed(self, session_id: str) -> None:
        assert self._journal is not None
        self._republished.pop(session_id, None)
        self._sealed_with.pop(session_id, None)
        try:
            if self._journal.mark_billed(session_id):
                log.info("%s: Central issued the ticket of supply %s", self._me, session_id)
        except PersistenceError as exc:
            log.warning("%s: could not note the ticket of supply %s: %s", self._me, session_id, exc)

    def _billing_check(self) -> None:
        """Completions in Kafka whose ticket we have not seen: ask Central; republish
        those not billed ``republish_after`` s after they were (last) sent. Central
        bills a republished completion once (the ticket's unique key)."""
        assert self._journal is not None
        now = time.time()
        for entry in self._journal.unbilled():
            sid = entry.session_id
            if self.cp_id is not None:
                self._send(self._monitor, protocol.BillingQuery(cp_id=self.cp_id, session_id=sid))
            sent = self._republished.get(sid, entry.published_at or entry.ended_at or now)
            if sid not in self._pending and now - sent >= self.options.republish_after:
                log.warning("%s: no ticket from Central for supply %s %.0f s after sending it — sending it again",
                            self._me, sid, now - sent)
                self._republished[sid] = now
                self._queue_completion(entry)

    def _on_stop_cp(self, reason: str) -> None:
        if self._supply is not None:
            log.info("%s: Central stopped the CP — ending supply %s", self._me, self._supply.session_id)
            self._end("central_stop")
        if not self.stopped:
            log.warning("%s was stopped by Central (%s): out of order until Central resumes it", self._me, reason)
        self.stopped, self.stop_reason = True, reason

    def _on_resume_cp(self) -> None:
        if self.stopped:
            log.info("%s was resumed by Central: back in service", self._me)
        self.stopped, self.stop_reason = False, ""

    def _on_cp_supply_response(self, msg: protocol.CpSupplyResponse) -> None:
        driver = self._cp_requests.pop(msg.correlation_id, "?")
        if msg.status == "authorized":
            log.info("%s: Central authorised the supply for driver %s (session %s)", self._me, driver, msg.session_id)
        else:
            log.warning("%s: Central refused the supply for driver %s: %s", self._me, driver,
                        msg.reason or "no reason given")

    # --- the supply -----------------------------------------------------------------
    def _is_live(self, session_id: str) -> bool:
        return self._supply is not None and self._supply.session_id == session_id

    def _plug(self) -> None:
        supply = self._supply
        if supply is None:
            log.info("%s: no supply is authorised — nothing to plug in (ask Central or type s DRIVER_ID)", self._me)
            return
        if supply.plugged:
            log.info("%s: the vehicle of supply %s is already plugged in", self._me, supply.session_id)
            return
        supply.cancel()  # the plug-in timers
        self._run(supply)
        self._send(self._monitor, protocol.SupplyStarted(
            cp_id=supply.cp_id, session_id=supply.session_id, driver_id=supply.driver_id))
        log.info("%s: supplying %s for driver %s at %g kW", self._me, supply.session_id, supply.driver_id,
                 self.options.power_kw)

    def _run(self, supply: _Supply) -> None:
        """The vehicle is plugged in: meter every tick (and unplug after supply_seconds, unattended)."""
        supply.plugged = True
        me = self.actor_ref
        supply.ticker = Ticker(self.options.tick, me, _Tick(supply.session_id), name=f"engine-tick-{supply.session_id}")
        if self.options.supply_seconds is not None:
            supply.timers.append(schedule(self.options.supply_seconds, me, _SupplyTimeUp(supply.session_id)))

    def _tick(self) -> None:
        supply = self._supply
        assert supply is not None and self._journal is not None
        supply.seq += 1
        supply.energy_kwh += self.options.power_kw * self.options.tick / 3600.0
        supply.cost_eur = supply.energy_kwh * supply.price_eur_kwh
        now = time.time()
        self._journal.update(supply.session_id, supply.seq, supply.energy_kwh, supply.cost_eur, at=now)
        data = protocol.ChargingData(
            cp_id=supply.cp_id, session_id=supply.session_id, driver_id=supply.driver_id, seq=supply.seq,
            energy_kwh=supply.energy_kwh, cost_eur=supply.cost_eur, power_kw=self.options.power_kw, timestamp=now,
        )
        self._publish_data(data)
        log.info("%s: supplying %s — %.3f kWh, %.2f € (%g kW)", self._me, supply.session_id,
                 supply.energy_kwh, supply.cost_eur, self.options.power_kw)

    def _publish_data(self, data: protocol.ChargingData) -> None:
        out = self._outgoing(data)
        if out is None:  # no key yet: keep the newest reading only (the next one supersedes it)
            self._held_data.pop(data.session_id, None)
            if len(self._held_data) >= MAX_HELD_SESSIONS:
                self._held_data.pop(next(iter(self._held_data)))
            self._held_data[data.session_id] = data
            return
        if not self.directory.tell(self.publisher, Publish(DATA_TOPIC, data.cp_id, out)):
            log.debug("%s: no publisher running; telemetry %d of %s not sent", self._me, data.seq, data.session_id)

    def _end(self, end_reason: str) -> None:
        """Finish the live supply: journal, completion to Kafka, supply_ended to the Monitor."""
        supply, self._supply = self._supply, None
        assert supply is not None and self._journal is not None
        supply.cancel()
        entry = self._journal.finish(supply.session_id, end_reason, ended_at=time.time())
        self._queue_completion(entry)
        self._send(self._monitor, self._supply_ended(entry))
        log.info("%s: supply %s for driver %s ended (%s): %.3f kWh, %.2f € — sending it to Central",
                 self._me, entry.session_id, entry.driver_id, (entry.end_reason or end_reason).replace("_", " "),
                 entry.energy_kwh, entry.cost_eur)

    @staticmethod
    def _supply_ended(entry: JournalEntry) -> protocol.SupplyEnded:
        return protocol.SupplyEnded(
            cp_id=entry.cp_id, session_id=entry.session_id, end_reason=_end_reason(entry),
            driver_id=entry.driver_id, energy_kwh=entry.energy_kwh, cost_eur=entry.cost_eur,
        )

    # --- completions: journaled, published, acknowledged ------------------------------
    def _queue_completion(self, entry: JournalEntry) -> None:
        completion = protocol.ChargeCompletion(
            cp_id=entry.cp_id, session_id=entry.session_id, driver_id=entry.driver_id,
            energy_kwh=entry.energy_kwh, cost_eur=entry.cost_eur, end_reason=_end_reason(entry),
        )
        self._pending[entry.session_id] = _Pending(completion)
        self._publish_completion(entry.session_id)

    def _publish_completion(self, session_id: str) -> None:
        pending = self._pending[session_id]
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        out = self._outgoing(pending.completion)
        if out is None:  # journaled; sent when the Monitor hands over a key (_release)
            if not pending.held:
                log.info("%s: the completion of %s waits for the CP's key (the Monitor has not authenticated "
                         "to Central yet)", self._me, session_id)
            pending.held = True
            return
        pending.held = False
        pending.attempt += 1
        if isinstance(out, protocol.Sealed):
            self._sealed_with[session_id] = out.key_id
        me = self.actor_ref
        publish = Publish(COMPLETE_TOPIC, pending.completion.cp_id, out, notify=me, token=session_id)
        if self.directory.tell(self.publisher, publish):
            # The Publisher keeps records through a Kafka outage; this timer
            # only covers a Publisher restart that lost what it held.
            wait = self.options.completion_ack_timeout
        else:
            wait = self._delay(pending.attempt)
            log.debug("%s: no publisher running yet; completion of %s in %.1f s", self._me, session_id, wait)
        pending.timer = schedule(wait, me, _SendCompletion(session_id, pending.attempt))

    def _on_published(self, session_id: str) -> None:
        pending = self._pending.pop(session_id, None)
        if pending is None:
            return  # a second acknowledgement of a resent completion
        if pending.timer is not None:
            pending.timer.cancel()
        assert self._journal is not None
        try:
            self._journal.mark_published(session_id)
        except PersistenceError as exc:
            log.warning("%s: could not mark supply %s as sent: %s", self._me, session_id, exc)
        log.info("%s: Central will bill supply %s (the completion is safely in Kafka)",
                 pending.completion.cp_id, session_id)
        if not self._pending:
            for event in self._drained:
                event.set()
            self._drained.clear()

    def _on_publish_failed(self, session_id: str, reason: str) -> None:
        pending = self._pending.get(session_id)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        wait = self._delay(pending.attempt)
        log.warning("%s: could not send the completion of supply %s to Kafka (%s) — retrying in %.1f s",
                    self._me, session_id, reason, wait)
        pending.timer = schedule(wait, self.actor_ref, _SendCompletion(session_id, pending.attempt))

    def _recover(self) -> None:
        """Finish what a previous run left open, and resend what Kafka never acknowledged."""
        assert self._journal is not None
        recovered: set[str] = set()
        unfinished = self._journal.unfinished()
        if unfinished and self.supervision is not None and self.supervision.generation > 1:
            # Restarted by our supervisor inside a running process: the vehicle is
            # still plugged in, so the newest supply goes on from its journaled figures.
            self._resume(max(unfinished, key=lambda e: e.started_at))
            unfinished = [e for e in unfinished if self._supply is None or e.session_id != self._supply.session_id]
        for entry in unfinished:
            self._journal.finish(entry.session_id, "engine_recovered", ended_at=time.time())
            recovered.add(entry.session_id)
            log.warning(
                "Recovered supply %s at %s after a restart: %.3f kWh, %.2f € — sending it to Central",
                entry.session_id, entry.cp_id, entry.energy_kwh, entry.cost_eur,
            )
        for entry in self._journal.unpublished():
            if entry.session_id not in recovered:
                log.warning("Supply %s at %s ended before a restart but Kafka never confirmed it — sending it again",
                            entry.session_id, entry.cp_id)
            self._queue_completion(entry)

    def _resume(self, entry: JournalEntry) -> None:
        supply = _Supply(entry.session_id, entry.cp_id, entry.driver_id, entry.price_eur_kwh, seq=entry.last_seq,
                         energy_kwh=entry.energy_kwh, cost_eur=entry.cost_eur)
        self._supply = supply
        self.cp_id = self.cp_id or entry.cp_id
        if entry.last_seq > 0:
            self._run(supply)
            what = f"metering from {entry.energy_kwh:.3f} kWh"
        else:
            what = self._await_plug(supply)
        log.warning("%s restarted with supply %s for driver %s open — %s", self._me, entry.session_id,
                    entry.driver_id, what)
        # Until a Monitor says hello, the grace period runs as after losing one.
        supply.timers.append(schedule(self.options.monitor_grace, self.actor_ref, _MonitorGone(entry.session_id)))

    def _shutdown_supply(self, drained: threading.Event) -> str | None:
        ended = None
        if self._supply is not None:
            ended = self._supply.session_id
            log.warning("%s is shutting down — ending supply %s", self._me, ended)
            self._end("fault")
        if self._pending:
            self._drained.append(drained)
        else:
            drained.set()
        return ended

    # --- the console -----------------------------------------------------------------
    def _on_console(self, text: str) -> None:
        command, _, rest = text.partition(" ")
        match command.lower():
            case "p" | "plug":
                self._plug()
            case "u" | "unplug":
                if self._supply is not None and self._supply.plugged:
                    self._end("unplugged")
                elif self._supply is not None:
                    log.info("%s: no vehicle is plugged in yet (supply %s is waiting for it)",
                             self._me, self._supply.session_id)
                else:
                    log.info("%s: nothing to unplug", self._me)
            case "k" | "ko":
                self._toggle_ko()
            case "s" | "supply":
                self._cp_supply(rest.strip())
            case "status":
                log.info("%s", self._status_sentence())
            case "help" | "h" | "?":
                log.info("%s", HELP)
            case _:
                log.info("Unknown command %r — type help for the list of commands", text)

    def _toggle_ko(self) -> None:
        self.ko = not self.ko
        if self.ko:
            log.warning("%s is now KO (simulated fault)", self._me)
            if self.cp_id is not None:
                self._send(self._monitor,
                           protocol.FaultNotification(cp_id=self.cp_id, reason="simulated fault at the CP"))
            if self._supply is not None:
                self._end("fault")
        else:
            log.info("%s is OK again", self._me)
            if self.cp_id is not None:
                self._send(self._monitor, protocol.FaultCleared(cp_id=self.cp_id))

    def _cp_supply(self, driver_id: str) -> None:
        if not driver_id or len(driver_id) > protocol.ID_MAX_LEN or " " in driver_id:
            log.info("Usage: s DRIVER_ID (one word, at most %d characters)", protocol.ID_MAX_LEN)
            return
        if self._monitor is None or self.cp_id is None:
            log.warning("%s cannot start a supply for %s: its Monitor is not connected", self._me, driver_id)
            return
        local = "CP was stopped by Central" if self.stopped else "CP is out of order" if self.ko else (
            f"CP is busy with session {self._supply.session_id}" if self._supply is not None else None)
        if local is not None:
            log.warning("%s cannot start a supply for %s: %s", self._me, driver_id, local)
            return
        correlation = protocol.new_id()
        self._cp_requests[correlation] = driver_id
        self._send(self._monitor, protocol.CpSupplyRequest(cp_id=self.cp_id, driver_id=driver_id,
                                                           correlation_id=correlation))
        log.info("%s: asked Central to authorise a supply for driver %s", self._me, driver_id)

    # --- views -------------------------------------------------------------------------
    @property
    def _me(self) -> str:
        return self.cp_id or self.options.expected_cp_id or "Engine"

    @property
    def _state(self) -> str:
        if self._supply is None:
            return "idle"
        return "supplying" if self._supply.plugged else "authorized"

    def _status(self) -> dict[str, Any]:
        s = self._supply
        return {
            "cp_id": self.cp_id,
            "state": self._state,
            "ko": self.ko,
            "stopped": self.stopped,
            "session_id": s.session_id if s else None,
            "driver_id": s.driver_id if s else None,
            "seq": s.seq if s else 0,
            "energy_kwh": s.energy_kwh if s else 0.0,
            "cost_eur": s.cost_eur if s else 0.0,
            "monitor_connected": self._monitor is not None,
            "price_eur_kwh": self.price_eur_kwh,
            "pending_completions": len(self._pending),
            "held_completions": sum(1 for p in self._pending.values() if p.held),
            "held_data": len(self._held_data),
            "paired": len(self._paired),
            "key_id": self._key.key_id if self._key else None,
        }

    def _status_sentence(self) -> str:
        s = self._supply
        if s is None:
            what = "idle"
        elif s.plugged:
            what = f"supplying {s.session_id} for driver {s.driver_id}: {s.energy_kwh:.3f} kWh, {s.cost_eur:.2f} €"
        else:
            what = f"waiting for the vehicle of driver {s.driver_id} (supply {s.session_id})"
        health = "KO (simulated fault)" if self.ko else "OK"
        stopped = "; stopped by Central" if self.stopped else ""
        monitor = "Monitor connected" if self._monitor is not None else "no Monitor"
        return f"{self._me} is {what}; {health}{stopped}; {monitor}"

    def _journal_get(self, session_id: str) -> JournalEntry | None:
        assert self._journal is not None
        return self._journal.get(session_id)


def _end_reason(entry: JournalEntry) -> str:
    """The entry's end reason as a protocol value (old or odd rows: engine_recovered)."""
    reason = entry.end_reason or "engine_recovered"
    return reason if reason in protocol.END_REASONS else "engine_recovered"
