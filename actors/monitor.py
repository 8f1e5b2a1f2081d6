"""MonitorActor: a charging point's watchman and go-between (EV_CP_M's domain).

Why a separate actor from its links: the links (``engine-link`` and
``central-link``, both :class:`~transport.client_link.ClientLink`) crash and
reconnect; what the Monitor knows (registered? engine OK? stopped? which
supply runs?) must survive that, so it lives here and the links only carry
frames. Both links tell this actor ``LinkUp``/``FrameIn``/``LinkDown``; it
tells them ``Send``.

The rules (docs/flows.md): register with Central on every connect and count
as registered only once Central *accepted* (SPEC §5: the seed went ACTIVE
before that); health-check the Engine every ``health_interval`` and call it
KO after ``health_timeout`` without an answer, on ``ok=false``, or at once
when the Engine's socket closes (a dead Engine need not wait for a timeout);
report KO and recovery to Central once each; send the life message while registered;
relay commands both ways, answering for the Engine when it cannot.

Authentication (issue #11, docs/protocol.md "Authentication and sealing"):
with a CP credential, the verifier is computed once at start; on every
connect to Central the Monitor answers Central's challenge, unwraps the key
Central issues (which also proves it is the real Central), tells the link to
seal every frame with it (:class:`~transport.link.Admit`), and only then
registers. A refusal is logged as a sentence and tried again with a growing
delay (never faster than Central's rate limit). The Engine link is paired the
same way (purpose "engine", the key derived from the nonce), and the Engine
gets Central's key in ``hello`` after every authentication. Without a
credential the Monitor works as before (a Central with ``--enroll open``).
The console command ``re-authenticate`` (or :class:`ReAuthenticate`) drops the
link to Central: the Monitor reconnects, authenticates and gets a new key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pykka

from actors.console import ConsoleLine
from actors.cp_state import CpState, derive_state
from actors.gatekeeper import retry_after_of
from actors.runtime import Directory, Scheduled, SupervisedActor, Supervision, Ticker, schedule, tell
from transport import protocol, security
from transport.link import Admit, Close, FrameIn, FrameRejected, LinkDown, LinkUp, Send
from transport.security import Credential, LinkSeal, SecurityError

log = logging.getLogger("evcharging.monitor")

__all__ = ["MonitorActor", "MonitorOptions", "MonitorStatus", "ReAuthenticate"]

ENGINE, CENTRAL = "engine", "central"
AUTH_RETRY_MAX = 120.0
"""Longest wait (s) before authenticating again after refusals (they double from --register-retry)."""

MONITOR_HELP = "Commands: re-authenticate (a new login and key with Central) | status"


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """Timings of one Monitor; each field is a flag of EV_CP_M."""

    location: str | None = None
    heartbeat_interval: float = 1.0
    health_interval: float = 1.0
    health_timeout: float = 1.5
    register_retry: float = 5.0
    register_timeout: float = 5.0
    stop_confirm: float = 2.0


# --- messages ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MonitorStatus:
    """Ask: a dict snapshot of the Monitor (for tests and the launcher)."""


@dataclass(frozen=True, slots=True)
class ReAuthenticate:
    """Ask (the Monitor's menu option): drop the link to Central; the Monitor reconnects,
    authenticates again and gets a new key (and gives it to its Engine). Returns a sentence."""


@dataclass(frozen=True, slots=True)
class _HealthTick:
    pass


@dataclass(frozen=True, slots=True)
class _Authenticate:
    """Time to authenticate on this Central link (after a refusal's delay)."""

    link_urn: str


@dataclass(frozen=True, slots=True)
class _AuthTimeout:
    """Central (or the Engine) did not answer a step of the authentication ``correlation_id`` in time.

    Each answer gets the full ``register_timeout`` (``step`` 0: the challenge, 1: the verdict), so a
    slow but working link is not mistaken for a dead one."""

    side: str
    correlation_id: str
    step: int = 0


@dataclass(frozen=True, slots=True)
class _HeartbeatTick:
    pass


@dataclass(frozen=True, slots=True)
class _Register:
    """Time to (re)send register_request, if still unregistered on the same link."""

    link_urn: str


@dataclass(frozen=True, slots=True)
class _RegisterTimeout:
    correlation_id: str


@dataclass(frozen=True, slots=True)
class _StopUnconfirmed:
    """After a re-registration: did Central repeat its stop_cp? If not, it resumed us meanwhile."""

    registration: int


class MonitorActor(SupervisedActor):
    """See the module docstring."""

    def __init__(
        self,
        cp_id: str,
        directory: Directory,
        *,
        options: MonitorOptions = MonitorOptions(),
        engine_link: str = "engine-link",
        central_link: str = "central-link",
        credential: Credential | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        """``credential``: this CP's secret (None: no authentication, for an ``--enroll open`` Central)."""
        super().__init__(supervision=supervision)
        if credential is not None and credential.ident != cp_id:
            raise ValueError(f"the credential is for {credential.ident}, not {cp_id}")
        self.credential = credential
        self.cp_id = cp_id
        self.directory = directory
        self.options = options
        self.link_names = {ENGINE: engine_link, CENTRAL: central_link}
        self.location = options.location
        self.price_eur_kwh = 0.0
        self.registered = False
        self.stopped = False
        self.stop_reason = ""
        self.supplying: str | None = None  # the session whose vehicle is plugged in
        # The session the Engine holds (authorised or supplying): the heartbeat's
        # supplying_session_id, which Central reconciles its live sessions with.
        self.session: str | None = None
        # engine health: None = not known yet (no answer, no timeout so far)
        self.engine_ok: bool | None = None
        self._fault_reported = False
        self._last_answer = time.monotonic()
        self._health_seq = 0
        self._last_check = 0.0  # when the last health_check was sent
        self._links: dict[str, pykka.ActorRef[Any] | None] = {ENGINE: None, CENTRAL: None}
        self._register_id: str | None = None
        self._registrations = 0
        self._stop_confirmed = False
        self._timers: list[Scheduled] = []
        self._tickers: list[Ticker] = []
        self._state = CpState.DISCONNECTED
        # Authentication (with a credential): per side, the challenge in flight and whether the link is admitted
        self._verifier: bytes | None = None
        self._auth: dict[str, tuple[str, str | None] | None] = {ENGINE: None, CENTRAL: None}  # (corr, nonce)
        self._ready: dict[str, bool] = {ENGINE: False, CENTRAL: False}  # authenticated (or no credential)
        self._engine_sealed = False
        self._key: tuple[str, bytes] | None = None  # Central's current key for this CP (id, 32 bytes)
        self._auth_delay = 0.0  # grows after each refusal, back to 0 after a login
        self._auth_not_before = 0.0  # monotonic
        self._logins = 0

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        if self.credential is not None:
            self._verifier = self.credential.verifier()  # Argon2id, ~60 ms: once per start, not per connect
        else:
            log.warning("%s: no credential (--credential-file or EV_CP_SECRET): this Monitor does not authenticate "
                        "and its messages are not sealed; only a Central started with --enroll open accepts it",
                        self.cp_id)
        me = self.actor_ref
        self._tickers = [
            # Ticks four times per check so a silent Engine is called KO within
            # a quarter interval of its timeout; a check is sent once per interval.
            Ticker(self.options.health_interval / 4, me, _HealthTick(), name=f"monitor-health-{self.cp_id}"),
            Ticker(self.options.heartbeat_interval, me, _HeartbeatTick(), name=f"monitor-heartbeat-{self.cp_id}"),
        ]

    def teardown(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        for timer in self._timers:
            timer.cancel()

    def _later(self, delay: float, message: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(schedule(delay, self.actor_ref, message))

    # --- messages ---------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case FrameIn(link, msg):
                side = self._side_of(link)
                if side is not None and not self._ready[side]:
                    self._authenticating(side, link, msg)
                elif side == ENGINE:
                    self._from_engine(link, msg)
                elif side == CENTRAL:
                    self._from_central(link, msg)
            case FrameRejected(_link, peer, reason, _principal):
                log.warning("%s: refused a frame from %s: %s", self.cp_id, peer, reason)
            case _Authenticate(urn):
                central = self._links[CENTRAL]
                if central is not None and central.actor_urn == urn and not self._ready[CENTRAL]:
                    self._login(central)
            case _AuthTimeout(side, corr, step):
                self._on_auth_timeout(side, corr, step)
            case ReAuthenticate():
                return self._reauthenticate("asked at the Monitor")
            case ConsoleLine(text):
                self._on_console(text)
            case LinkUp(link, peer, name):
                self._on_link_up(link, peer, name)
            case LinkDown(link, peer, reason):
                self._on_link_down(link, peer, reason)
            case _HealthTick():
                self._health_tick()
            case _HeartbeatTick():
                self._heartbeat()
            case _Register(urn):
                central = self._links[CENTRAL]
                if central is not None and central.actor_urn == urn and not self.registered:
                    self._register(central)
            case _RegisterTimeout(correlation_id) if correlation_id == self._register_id and not self.registered:
                log.warning("%s: Central did not answer the registration within %g s — asking again",
                            self.cp_id, self.options.register_timeout)
                central = self._links[CENTRAL]
                if central is not None:
                    self._register(central)
            case _StopUnconfirmed(n) if n == self._registrations and self.registered and self.stopped:
                if not self._stop_confirmed:
                    log.info("%s: Central did not repeat its stop order after re-registering — back in service",
                             self.cp_id)
                    self.stopped, self.stop_reason = False, ""
                    self._to_engine(protocol.ResumeCp())
            case MonitorStatus():
                return self._status()
            case _:
                log.debug("%s: ignoring %s", self.cp_id, type(message).__name__)
        self._update_state()
        return None

    # --- links -------------------------------------------------------------------
    def _side_of(self, link: pykka.ActorRef[Any]) -> str | None:
        """Which of our current links ``link`` is; None for an old link's late message."""
        for side in (ENGINE, CENTRAL):
            current = self._links[side]
            if current is not None and current.actor_urn == link.actor_urn:
                return side
        return None

    def _on_link_up(self, link: pykka.ActorRef[Any], peer: str, name: str) -> None:
        """A link connected. The links start after this actor (rest_for_one), so every
        link of ours, also after a restart of either side, introduces itself here."""
        side = next((s for s, n in self.link_names.items() if n == name), None)
        if side is None:
            log.warning("%s: a link to %s came up that is neither the Engine nor Central", self.cp_id, peer)
            return
        self._attach(side, link, peer)

    def _attach(self, side: str, link: pykka.ActorRef[Any], peer: str) -> None:
        """A link is up: authenticate on it (with a credential), then greet the Engine or register with Central."""
        self._links[side] = link
        self._ready[side] = False
        self._auth[side] = None
        if side == ENGINE:
            self._engine_sealed = False
            self._last_answer = time.monotonic()  # a fresh link gets a full timeout (pairing included)
            if self._verifier is None:
                log.info("%s: connected to its Engine (%s)", self.cp_id, peer)
                self._engine_ready()
            else:
                log.info("%s: connected to its Engine (%s) — pairing", self.cp_id, peer)
                self._start_auth(ENGINE, link)
        else:
            self.registered = False
            wait = self._auth_not_before - time.monotonic()
            if wait > 0:
                log.info("%s: connected to Central (%s) — trying again in %.0f s (Central refused the last "
                         "attempt)", self.cp_id, peer, wait)
                self._later(wait, _Authenticate(link.actor_urn))
            else:
                self._login(link, peer)

    def _login(self, link: pykka.ActorRef[Any], peer: str | None = None) -> None:
        """Authenticate on a fresh Central link (or, without a credential, just register)."""
        what = "registering" if self._verifier is None else "authenticating"
        if peer is None:
            log.info("%s: the wait is over — %s with Central", self.cp_id, what)
        else:
            log.info("%s: connected to Central (%s) — %s", self.cp_id, peer, what)
        if self._verifier is None:
            self._ready[CENTRAL] = True
            self._register(link)
        else:
            self._start_auth(CENTRAL, link)

    def _engine_ready(self) -> None:
        """The Engine link may carry the session (paired, or an Engine without credential): greet it."""
        self._ready[ENGINE] = True
        self._hello()
        if self.stopped:  # a restarted Engine forgot Central's order
            self._send(ENGINE, protocol.StopCp(reason=self.stop_reason or "stopped by Central"))
        self._last_answer = time.monotonic()
        self._last_check = 0.0
        self._health_tick()  # know the Engine's health now, not in a second

    def _hello(self) -> None:
        """hello to the Engine; on a paired (sealed) link with Central's current key for its records."""
        key_id, key = (self._key[0], security.b64e(self._key[1])) if self._key and self._engine_sealed else (None, None)
        self._send(ENGINE, protocol.Hello(cp_id=self.cp_id, price_eur_kwh=self.price_eur_kwh, key_id=key_id, key=key))

    # --- authentication -------------------------------------------------------------------
    def _start_auth(self, side: str, link: pykka.ActorRef[Any]) -> None:
        corr = protocol.new_id()
        self._auth[side] = (corr, None)
        tell(link, Send(protocol.AuthRequest(cp_id=self.cp_id, correlation_id=corr)))
        self._later(self.options.register_timeout, _AuthTimeout(side, corr))

    def _authenticating(self, side: str, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        """A frame on a link that has not authenticated yet: only the challenge and the verdict count."""
        pending = self._auth[side]
        who = "Central" if side == CENTRAL else "the Engine"
        match msg:
            case protocol.AuthChallenge(corr, nonce) if pending is not None and pending[0] == corr \
                    and pending[1] is None and self._verifier is not None:
                self._auth[side] = (corr, nonce)
                self._later(self.options.register_timeout, _AuthTimeout(side, corr, 1))
                purpose = security.PURPOSE_CENTRAL if side == CENTRAL else security.PURPOSE_ENGINE
                tell(link, Send(protocol.AuthProof(correlation_id=corr, cp_id=self.cp_id,
                                                   proof=security.proof(self._verifier, purpose, self.cp_id, nonce))))
            case protocol.AuthResult(corr, status) if pending is not None and pending[0] == corr \
                    and pending[1] is not None:
                self._auth[side] = None
                if status == "accepted":
                    self._accepted(side, link, msg, pending[1])
                else:
                    self._refused(side, link, msg.reason or "no reason given")
            case protocol.RegisterResponse(status="denied", reason=reason) if side == CENTRAL:
                self._refused(side, link, reason or "no reason given")
            case protocol.ErrorMessage(reason=reason) if side == CENTRAL:
                log.warning("%s: Central did not accept our authentication: %s", self.cp_id, reason)
            case _ if side == ENGINE and not isinstance(msg, protocol.AuthChallenge) \
                    and (pending is None or pending[1] is None):
                # The Engine answered without challenging us: it has no credential, or it is not
                # our Engine at all (anything listening on its address). A Monitor with a
                # credential never trusts such a peer: no relaying its frames to Central under
                # the CP's key, no commands to it. It says why and tries again later.
                detail = msg.reason if isinstance(msg, protocol.AuthResult | protocol.ErrorMessage) else msg.TYPE
                log.error("%s: the Engine did not ask for proof of the CP's credential (%s): it runs without it "
                          "(give it --credential-file or EV_CP_SECRET) or it is not this CP's Engine; not "
                          "trusting it", self.cp_id, protocol.clip(str(detail), 160))
                self._auth[side] = None
                tell(link, Close("the Engine did not pair"))
            case _:
                log.warning("%s: ignored a %s from %s before it proved itself", self.cp_id, msg.TYPE, who)

    def _accepted(self, side: str, link: pykka.ActorRef[Any], msg: protocol.AuthResult, nonce: str) -> None:
        assert self._verifier is not None
        if side == ENGINE:
            key = security.link_key(self._verifier, security.PURPOSE_ENGINE, self.cp_id, nonce)
            tell(link, Admit("engine", LinkSeal(self.cp_id, "link", key, me="monitor", peer="engine")))
            self._engine_sealed = True
            log.info("%s: paired with its Engine (the link is sealed)", self.cp_id)
            self._engine_ready()
            return
        try:
            if not msg.key_id or not msg.wrapped_key:
                raise SecurityError("Central accepted us but sent no key")
            key = security.unwrap_key(self._verifier, self.cp_id, nonce, msg.key_id, msg.wrapped_key)
        except SecurityError as exc:
            log.error("%s: %s — closing the link and trying again", self.cp_id, exc)
            self._back_off(None)
            tell(link, Close(str(exc)))
            return
        self._key = (msg.key_id, key)
        tell(link, Admit("central", LinkSeal(self.cp_id, msg.key_id, key, me="monitor", peer="central")))
        self._ready[CENTRAL] = True
        self._auth_delay, self._auth_not_before = 0.0, 0.0
        self._logins += 1
        log.info("%s: authenticated with Central (key %s) — registering", self.cp_id, msg.key_id)
        self._register(link)  # sealed by the link from now on

    def _refused(self, side: str, link: pykka.ActorRef[Any], reason: str) -> None:
        if side == ENGINE:
            log.error("%s: the Engine refused to pair with this Monitor: %s — trying again", self.cp_id, reason)
            tell(link, Close(f"the Engine refused to pair: {reason}"))
            return
        delay = self._back_off(retry_after_of(reason))
        log.error("%s: Central refused our authentication: %s — trying again in %.0f s", self.cp_id, reason, delay)
        # Central closes the connection; the next one authenticates after the delay.

    def _back_off(self, at_least: float | None) -> float:
        base = self.options.register_retry
        self._auth_delay = min(AUTH_RETRY_MAX, base if self._auth_delay == 0 else self._auth_delay * 2)
        delay = max(self._auth_delay, at_least or 0.0)
        self._auth_not_before = time.monotonic() + delay
        return delay

    def _on_auth_timeout(self, side: str, corr: str, step: int) -> None:
        pending = self._auth[side]
        link = self._links[side]
        if pending is None or pending[0] != corr or link is None or (pending[1] is not None) != (step == 1):
            return
        who = "Central" if side == CENTRAL else "the Engine"
        log.warning("%s: %s did not answer the %s within %g s — reconnecting", self.cp_id, who,
                    "proof" if step else "authentication request", self.options.register_timeout)
        self._auth[side] = None
        tell(link, Close(f"{who} did not finish the authentication"))

    def _reauthenticate(self, why: str) -> str:
        central = self._links[CENTRAL]
        self._auth_delay, self._auth_not_before = 0.0, 0.0
        if central is None:
            return "not connected to Central; the Monitor authenticates when it reconnects"
        log.info("%s: re-authenticating with Central (%s)", self.cp_id, why)
        tell(central, Close(f"re-authenticating ({why})"))
        return ("reconnecting to Central to authenticate again (a new key)" if self._verifier is not None
                else "reconnecting to Central (this Monitor has no credential: it only registers again)")

    def _on_console(self, text: str) -> None:
        command = text.strip().lower()
        if command in ("re-authenticate", "reauthenticate", "reauth", "r"):
            log.info("%s: %s", self.cp_id, self._reauthenticate("asked at the console"))
        elif command == "status":
            log.info("%s: %s", self.cp_id, ", ".join(f"{k}={v}" for k, v in self._status().items()))
        else:
            log.info("%s", MONITOR_HELP)

    def _on_link_down(self, link: pykka.ActorRef[Any], peer: str, reason: str) -> None:
        side = self._side_of(link)
        if side is None:  # _side_of matched it against our current links
            return  # an old link's late goodbye
        self._links[side] = None
        self._ready[side] = False
        self._auth[side] = None
        if side == ENGINE:
            log.warning("%s: lost its Engine (%s)", self.cp_id, reason)
            if self.supplying is not None:
                # The Engine ends it (monitor_lost) and reports it over Kafka.
                log.warning("%s: supply %s ends with the Engine link", self.cp_id, self.supplying)
                self.supplying = None
            self.session = None  # learnt again from the Engine's supply_state
            # A closed socket is an answer: the Engine is gone (or unreachable)
            # now, not after the health timeout. Reconnecting clears it.
            self._set_engine_ok(False, f"the Engine is not connected ({reason})")
        else:
            was = self.registered
            self.registered = False
            self._register_id = None
            self._fault_reported = False  # Central forgets; re-reported after re-registration
            log.warning("%s: lost Central (%s) — %s", self.cp_id, reason,
                        "the CP accepts no new supply until it is back" if was else "not registered")

    def _send(self, side: str, message: protocol.Message) -> bool:
        if not self._ready[side]:  # not authenticated yet: nothing but the authentication on it
            return False
        return tell(self._links[side], Send(message))

    # --- registration ---------------------------------------------------------------
    def _register(self, link: pykka.ActorRef[Any]) -> None:
        self._register_id = protocol.new_id()
        tell(link, Send(protocol.RegisterRequest(cp_id=self.cp_id, correlation_id=self._register_id,
                                                 location=self.location)))
        self._later(self.options.register_timeout, _RegisterTimeout(self._register_id))

    def _on_register_response(self, link: pykka.ActorRef[Any], msg: protocol.RegisterResponse) -> None:
        if msg.correlation_id != self._register_id:
            log.debug("%s: ignoring an old register_response", self.cp_id)
            return
        self._register_id = None
        if msg.status != "accepted":
            # Without a credential a refusal may come with a closed link (a Central that requires
            # credentials): the next connection waits too, longer after each refusal.
            retry = self._back_off(None) if self._verifier is None else self.options.register_retry
            log.error("Central refused to register %s: %s — trying again in %g s%s", self.cp_id,
                      msg.reason or "no reason given", round(retry, 1),
                      " (this Monitor has no credential: give it --credential-file or EV_CP_SECRET)"
                      if self._verifier is None and msg.reason and "auth" in msg.reason else "")
            self._later(retry, _Register(link.actor_urn))
            return
        self._auth_delay, self._auth_not_before = 0.0, 0.0
        self.registered = True
        self._registrations += 1
        if self.stopped:
            # Central is the judge of stop/resume and repeats stop_cp after
            # accepting a stopped CP; a resume given while we were away is not
            # repeated, so an unconfirmed stop is dropped after a moment.
            self._stop_confirmed = False
            self._later(self.options.stop_confirm, _StopUnconfirmed(self._registrations))
        if msg.price_eur_kwh is not None:
            self.price_eur_kwh = msg.price_eur_kwh
        if msg.location:
            self.location = msg.location
        log.info("Central accepted %s (%s, %.2f €/kWh)", self.cp_id, self.location or "no location", self.price_eur_kwh)
        self._hello()  # the price, and after each authentication Central's new key
        if self.engine_ok is False:
            self._report_fault(self._ko_reason())
        self._update_state()
        self._heartbeat()

    # --- engine health ------------------------------------------------------------------
    def _health_tick(self) -> None:
        now = time.monotonic()
        if self._ready[ENGINE] and now - self._last_check >= self.options.health_interval * 0.99:
            self._last_check = now
            self._health_seq += 1
            self._send(ENGINE, protocol.HealthCheck(seq=self._health_seq))
        self._check_engine()

    def _check_engine(self) -> None:
        silent = time.monotonic() - self._last_answer
        if silent > self.options.health_timeout and self.engine_ok is not False:
            self._set_engine_ok(False, self._ko_reason())

    def _ko_reason(self) -> str:
        if self._links[ENGINE] is None:
            return "the Engine is not connected"
        if self.engine_ok is False and time.monotonic() - self._last_answer <= self.options.health_timeout:
            return "the Engine reports a fault (KO)"
        return f"the Engine did not answer a health check for {self.options.health_timeout:g} s"

    def _set_engine_ok(self, ok: bool, reason: str = "") -> None:
        if ok == self.engine_ok:
            return
        before, self.engine_ok = self.engine_ok, ok
        if ok:
            if before is False:
                log.info("%s: the Engine is OK again", self.cp_id)
            else:
                log.info("%s: the Engine answers OK", self.cp_id)
            if self._fault_reported and self.registered:
                self._send(CENTRAL, protocol.FaultCleared(cp_id=self.cp_id))
            self._fault_reported = False
        else:
            log.warning("%s: the Engine is KO: %s", self.cp_id, reason)
            if self.supplying is not None:
                self.supplying = None  # the Engine ends a supply when it goes KO
            self.session = None
            self._report_fault(reason)
        if before is None:
            self._heartbeat()  # the first life message waited for this

    def _report_fault(self, reason: str) -> None:
        if (self.registered and not self._fault_reported
                and self._send(CENTRAL, protocol.FaultNotification(cp_id=self.cp_id, reason=reason))):
            self._fault_reported = True

    # --- life message --------------------------------------------------------------------
    def _heartbeat(self) -> None:
        # Not before the Engine's health is known (at most health_timeout after
        # start): an engine_ok=false meaning "not asked yet" would show BROKEN.
        if not self.registered or self.engine_ok is None:
            return
        self._update_state()
        self._send(CENTRAL, protocol.Heartbeat(
            cp_id=self.cp_id, engine_ok=bool(self.engine_ok), state=self._state,
            supplying_session_id=self.session or self.supplying,
        ))

    # --- relaying ---------------------------------------------------------------------------
    def _from_engine(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        match msg:
            case protocol.HealthStatus(ok=ok):
                self._last_answer = time.monotonic()
                self._set_engine_ok(ok, "the Engine reports a fault (KO)")
            case protocol.FaultNotification(reason=reason):
                self._last_answer = time.monotonic()
                self._set_engine_ok(False, f"the Engine reports a fault ({reason})")
            case protocol.FaultCleared():
                self._last_answer = time.monotonic()
                self._set_engine_ok(True)
            case protocol.SupplyStarted(session_id=sid):
                self.supplying = self.session = sid
                log.info("%s: supplying %s", self.cp_id, sid)
                self._to_central(msg)
            case protocol.SupplyEnded(session_id=sid, end_reason=why):
                if self.supplying == sid:
                    self.supplying = None
                if self.session == sid:
                    self.session = None
                log.info("%s: supply %s ended (%s)", self.cp_id, sid, why.replace("_", " "))
                self._to_central(msg)
            case protocol.SupplyAuthorizationResponse(session_id=sid, accepted=accepted):
                if accepted:
                    self.session = sid
                self._to_central(msg)
            case protocol.SupplyState(session_id=sid, plugged=plugged):
                # The Engine's answer to hello: what it holds (also after our restart).
                self.session = sid
                self.supplying = sid if plugged else None
            case protocol.BillingQuery():
                self._to_central(msg)
            case protocol.CpSupplyRequest(cp_id, driver_id, correlation_id):
                if self.registered:
                    self._to_central(msg)
                else:
                    reason = "Central is unavailable" if self._links[CENTRAL] is None else \
                        f"{self.cp_id} is not registered with Central yet"
                    log.warning("%s: cannot ask Central for a supply for driver %s: %s", self.cp_id, driver_id, reason)
                    tell(link, Send(protocol.CpSupplyResponse(
                        correlation_id=correlation_id, cp_id=cp_id, status="denied", reason=reason)))
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: the Engine could not accept a message: %s", self.cp_id, reason)
            case _:
                log.warning("%s: ignoring a %s from the Engine", self.cp_id, msg.TYPE)

    def _from_central(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        match msg:
            case protocol.RegisterResponse():
                self._on_register_response(link, msg)
            case protocol.AuthorizeSupply():
                refusal = self._engine_refusal()
                if refusal is not None:
                    log.info("%s: refused supply %s for driver %s: %s", self.cp_id, msg.session_id, msg.driver_id,
                             refusal)
                    tell(link, Send(protocol.SupplyAuthorizationResponse(
                        correlation_id=msg.correlation_id, session_id=msg.session_id, accepted=False, reason=refusal)))
                else:
                    self._send(ENGINE, msg)
            case protocol.StopCp(reason):
                self.stopped, self.stop_reason, self._stop_confirmed = True, reason, True
                log.warning("%s: stopped by Central (%s)", self.cp_id, reason)
                self._to_engine(msg)
            case protocol.ResumeCp():
                self.stopped, self.stop_reason = False, ""
                log.info("%s: resumed by Central", self.cp_id)
                self._to_engine(msg)
            case protocol.StopSupply() | protocol.CpSupplyResponse() | protocol.CancelSupply() \
                    | protocol.SessionBilled():
                self._to_engine(msg)
            case protocol.ErrorMessage(reason=reason):
                log.warning("%s: Central could not accept a message: %s", self.cp_id, reason)
            case _:
                log.warning("%s: ignoring a %s from Central", self.cp_id, msg.TYPE)

    def _engine_refusal(self) -> str | None:
        if self._links[ENGINE] is None:
            return f"the Engine of {self.cp_id} is not connected"
        if not self._ready[ENGINE]:
            return f"the Engine of {self.cp_id} has not paired with its Monitor yet"
        if not self.engine_ok:
            return f"{self.cp_id} is out of order (its Engine is KO)"
        return None

    def _to_central(self, msg: protocol.Message) -> None:
        if not self.registered or not self._send(CENTRAL, msg):
            log.info("%s: Central is unavailable; %s not relayed", self.cp_id, msg.TYPE)

    def _to_engine(self, msg: protocol.Message) -> None:
        if not self._send(ENGINE, msg):
            log.warning("%s: the Engine is not connected; %s not relayed", self.cp_id, msg.TYPE)

    # --- state --------------------------------------------------------------------------------
    def _compute_state(self) -> CpState:
        # Connected, for the Monitor, means registered with Central.
        return derive_state(connected=self.registered, engine_ok=self.engine_ok,
                            supplying=self.supplying is not None, stopped=self.stopped)

    def _update_state(self) -> None:
        state = self._compute_state()
        if state != self._state:
            self._state = state
            log.info("%s is now %s", self.cp_id, state)

    def _status(self) -> dict[str, Any]:
        self._update_state()
        return {
            "cp_id": self.cp_id,
            "state": self._state,
            "registered": self.registered,
            "engine_ok": bool(self.engine_ok),
            "central_connected": self._links[CENTRAL] is not None,
            "engine_connected": self._links[ENGINE] is not None,
            "price_eur_kwh": self.price_eur_kwh,
            "location": self.location,
            "stopped": self.stopped,
            "supplying_session_id": self.supplying,
            "session_id": self.session or self.supplying,
            "authenticated": self._verifier is not None and self._ready[CENTRAL],
            "key_id": self._key[0] if self._key else None,
            "logins": self._logins,
            "engine_paired": self._ready[ENGINE],
            "engine_sealed": self._engine_sealed,
        }
