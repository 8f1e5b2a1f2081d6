"""GatekeeperActor: Central's CP authentication and the CP keys (issue #11).

It is the *gate* of every Monitor connection of Central (see
:class:`~transport.connection.ServerConnection`): until a connection is
admitted, its frames come here, not to Central. The protocol is
docs/protocol.md, "A Monitor authenticates to Central":

* ``auth_request`` → ``auth_challenge`` with a fresh nonce (one per connection);
* ``auth_proof`` checked against the CP's verifier, read from the registry
  tables at each login (so a registration or a deregistration is seen
  without restarting) → on success a fresh key: stored, added to the
  :class:`~transport.security.Keyring` the router opens Kafka records with
  (the CP's previous key becomes *replaced*), sent wrapped in ``auth_result``,
  and the connection is told :class:`~transport.link.Admit` with a
  :class:`~transport.security.LinkSeal`: every later frame both ways is sealed
  and goes to Central with the CP id as its principal;
* anything else is refused with a reason (unknown or deregistered CP, wrong
  proof, too many failed attempts from the address, a plain
  ``register_request``), audited (``login_failed``), counted against the
  address (:class:`~transport.security.FailureLimiter`) and the connection is
  closed. In ``--enroll open`` (development) a plain ``register_request`` is
  let through to Central unsealed, as before the trust boundary.

It also owns revocation: :class:`RevokeCp` (the operator's ``revoke``) and
deregistrations it sees by polling ``registry_rev()`` every second revoke
every key of the CP (database and keyring) and tell Central
:class:`KeysRevoked`, which closes the CP's link: the Monitor authenticates
again by itself (a revoked CP gets a new key; a deregistered one is refused).

A crash of this actor loses only the challenges in flight (those Monitors
time out and reconnect); admitted links do not pass through it, so live CPs
stay connected. Its keyring belongs to the Central system, not to it.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pykka

from actors.runtime import Directory, SupervisedActor, Supervision, Ticker, tell
from persistence import Repository
from transport import protocol, security
from transport.link import Admit, Close, FrameIn, LinkDown, LinkUp, Send
from transport.security import FailureLimiter, KeyInfo, Keyring, LinkSeal, address_of

if TYPE_CHECKING:
    from actors.central import CentralConfig

log = logging.getLogger("evcharging.central.gatekeeper")

__all__ = ["GatekeeperActor", "RevokeCp", "KeysRevoked", "CpRegistered", "GatekeeperStatus", "prepare_keyring",
           "retry_after_of", "AUTH_FIRST"]

AUTH_FIRST = "authenticate first (auth_request): this Central requires CP credentials"
MAX_PENDING = 10_000  # challenges in flight (the listener's connection limit bounds them too)
BLOCKED_AUDIT_EVERY = 10.0  # s: refusals of a blocked address are audited at most this often (with a count)
POLL_INTERVAL = 1.0  # s: how often the registry's changes are looked at
FORGET_EVERY = 60.0  # s: how often ended keys are dropped from the keyring
FORWARD_FOR = 10.0  # s: how long frames of a link let through unsealed may still arrive here


# --- messages ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RevokeCp:
    """Ask or tell: revoke every key of ``cp_id`` (the operator's ``revoke``); returns a sentence."""

    cp_id: str
    reason: str = ""
    who: str = "operator"


@dataclass(frozen=True, slots=True)
class KeysRevoked:
    """Gatekeeper → Central: ``cp_id``'s keys are revoked; close its link (``reason``: a sentence)."""

    cp_id: str
    key_ids: tuple[str, ...]
    reason: str
    deregistered: bool = False


@dataclass(frozen=True, slots=True)
class CpRegistered:
    """Gatekeeper → Central: the registry registered (or re-registered) ``cp_id``."""

    cp_id: str


@dataclass(frozen=True, slots=True)
class GatekeeperStatus:
    """Ask: a dict (challenges in flight, current key id per CP, counters) for tests and tools."""


@dataclass(frozen=True, slots=True)
class _Poll:
    pass


@dataclass(slots=True)
class _Challenge:
    cp_id: str
    correlation_id: str
    nonce: str
    since: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Peer:
    link: pykka.ActorRef[Any]
    peer: str
    challenge: _Challenge | None = None
    asked: bool = False  # one authentication per connection


def prepare_keyring(repo: Repository, keyring: Keyring, now: float | None = None) -> int:
    """At Central's start: every current key becomes *replaced* (the CPs authenticate
    again and get new ones) and the keys that may still open records (current, or
    replaced within the keyring's grace) are loaded; how many. Done once per Central
    system, not at each restart of the gatekeeper (whose keyring survives it)."""
    t = time.time() if now is None else now
    repo.retire_current_keys(t)
    keys = repo.usable_keys(t, keyring.grace)
    for k in keys:
        keyring.add(KeyInfo(k.key_id, k.cp_id, k.key, k.issued_at, state=k.state, ended_at=k.ended_at))
    return len(keys)


class GatekeeperActor(SupervisedActor):
    """See the module docstring."""

    def __init__(
        self,
        config: CentralConfig,
        keyring: Keyring,
        directory: Directory,
        *,
        central: str = "central",
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.config = config
        self.keyring = keyring
        self.directory = directory
        self.central = central
        self.open_mode = config.enroll == "open"
        self.limiter = FailureLimiter(config.auth_failures, config.auth_window)
        self._repo: Repository | None = None
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # link urn -> peer (not admitted yet)
        self._admitted: dict[str, pykka.ActorRef[Any]] = {}  # cp_id -> its latest admitted link
        self._forward: dict[str, float] = {}  # link urn admitted unsealed (open mode) -> when; late frames go on
        self._blocked_audit: dict[str, tuple[float, int]] = {}  # address -> (last audit, refusals not audited)
        self._rev = 0
        self._ticker: Ticker | None = None
        self._forgot_at = time.monotonic()
        self.stats = {"challenges": 0, "logins": 0, "refused": 0, "revoked": 0}

    # --- lifecycle -------------------------------------------------------------------
    def setup(self) -> None:
        self._repo = Repository(self.config.db_path)
        self._rev = self.repo.registry_rev()
        self._revoke_deregistered_keys()  # a deregistration this actor missed while it restarted
        self._ticker = Ticker(POLL_INTERVAL, self.actor_ref, _Poll(), name="gatekeeper-poll")

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._repo is not None:
            self._repo.close()

    @property
    def repo(self) -> Repository:
        assert self._repo is not None
        return self._repo

    # --- dispatch --------------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case LinkUp(link, peer, _name):
                self._peers[link.actor_urn] = _Peer(link, peer)
                while len(self._peers) > MAX_PENDING:
                    _urn, oldest = self._peers.popitem(last=False)
                    tell(oldest.link, Close("too many connections waiting to authenticate"))
            case LinkDown(link, _peer, _reason):
                self._peers.pop(link.actor_urn, None)
                self._forward.pop(link.actor_urn, None)
            case FrameIn(link, msg):
                self._on_frame(link, msg)
            case RevokeCp(cp_id, reason, who):
                return self._revoke(cp_id, reason or "revoked by the operator", who)
            case _Poll():
                self._poll()
            case GatekeeperStatus():
                return self._status()
            case _:
                log.debug("Gatekeeper: ignoring %s", type(message).__name__)
        return None

    # --- authentication ---------------------------------------------------------------------
    def _on_frame(self, link: pykka.ActorRef[Any], msg: protocol.Message) -> None:
        urn = link.actor_urn
        if urn in self._forward:  # admitted unsealed; this frame was sent before the link knew
            self.directory.tell(self.central, FrameIn(link, msg))
            return
        peer = self._peers.get(urn)
        if peer is None:
            # We restarted since this connection came (its challenge is lost): start over.
            tell(link, Send(protocol.ErrorMessage(reason="Central's authentication restarted: connect again",
                                                  correlation_id=protocol.correlation_of(msg))))
            tell(link, Close("the gatekeeper does not know this connection (it restarted)"))
            return
        match msg:
            case protocol.AuthRequest(cp_id, corr):
                self._on_auth_request(peer, cp_id, corr)
            case protocol.AuthProof(corr, cp_id, given):
                self._on_auth_proof(peer, corr, cp_id, given)
            case protocol.RegisterRequest() if self.open_mode:
                self._let_through(peer, msg)
            case protocol.RegisterRequest(cp_id=cp_id, correlation_id=corr):
                self._refuse(peer, cp_id, "a plain register_request without authenticating", answer=AUTH_FIRST,
                             result=protocol.RegisterResponse(correlation_id=corr, status="denied",
                                                              reason=AUTH_FIRST))
            case _ if self.open_mode and not isinstance(msg, protocol.AuthChallenge | protocol.AuthResult):
                self._let_through(peer, msg)
            case _:
                claimed = getattr(msg, "cp_id", None)
                reason = f"a {msg.TYPE} before authenticating"
                self._refuse(peer, claimed if isinstance(claimed, str) else None, reason,
                             result=protocol.ErrorMessage(reason=f"{AUTH_FIRST} (got a {msg.TYPE})",
                                                          correlation_id=protocol.correlation_of(msg)))

    def _on_auth_request(self, peer: _Peer, cp_id: str, corr: str) -> None:
        if peer.asked:
            self._refuse(peer, cp_id, "a second auth_request on the same connection", correlation_id=corr)
            return
        peer.asked = True
        if self._blocked(peer, cp_id, corr):
            return
        cred = self.repo.credential("cp", cp_id)
        problem = self._credential_problem(cp_id, cred)
        if problem is not None:
            self._refuse(peer, cp_id, problem, correlation_id=corr)
            return
        peer.challenge = _Challenge(cp_id, corr, security.new_nonce())
        self.stats["challenges"] += 1
        tell(peer.link, Send(protocol.AuthChallenge(correlation_id=corr, nonce=peer.challenge.nonce)))

    def _on_auth_proof(self, peer: _Peer, corr: str, cp_id: str, given: str) -> None:
        challenge, peer.challenge = peer.challenge, None
        if challenge is None or challenge.correlation_id != corr or challenge.cp_id != cp_id:
            self._refuse(peer, cp_id, "an auth_proof that answers no challenge of this connection",
                         correlation_id=corr)
            return
        if self._blocked(peer, cp_id, corr):
            return
        cred = self.repo.credential("cp", cp_id)  # again: it may have been deregistered meanwhile
        problem = self._credential_problem(cp_id, cred)
        if problem is None and cred is not None and \
                not security.check_proof(cred.verifier, security.PURPOSE_CENTRAL, cp_id, challenge.nonce, given):
            problem = f"wrong proof for CP {cp_id}"
        if problem is not None or cred is None:
            self._refuse(peer, cp_id, problem or f"unknown CP {cp_id}", correlation_id=corr)
            return
        self._admit(peer, cp_id, corr, cred.verifier, challenge.nonce)

    def _credential_problem(self, cp_id: str, cred: Any) -> str | None:
        if cred is None:
            return f"unknown CP {cp_id}"
        if not cred.registered:
            return f"CP {cp_id} is deregistered"
        return None

    def _admit(self, peer: _Peer, cp_id: str, corr: str, verifier: bytes, nonce: str) -> None:
        """A valid login: a fresh key, stored and in the keyring, sent wrapped; then the link seals."""
        now = time.time()
        key, key_id = security.new_key(), security.new_key_id()
        address = address_of(peer.peer)
        self.repo.store_key(key_id, cp_id, key, now, address=address)  # with login_ok and key_issued
        replaced = self.keyring.add(KeyInfo(key_id, cp_id, key, now))
        wrapped = security.wrap_key(verifier, cp_id, nonce, key_id, key)
        link = peer.link
        self._peers.pop(link.actor_urn, None)
        # Order matters: the result goes out in clear, then the link seals everything.
        tell(link, Send(protocol.AuthResult(correlation_id=corr, status="accepted", key_id=key_id,
                                            wrapped_key=wrapped)))
        tell(link, Admit(cp_id, LinkSeal(cp_id, key_id, key, me="central", peer="monitor")))
        previous = self._admitted.get(cp_id)
        if previous is not None and previous.actor_urn != link.actor_urn:
            # One admitted connection per CP: the newest login wins, so an older one (the CP's
            # previous connection, or a spare someone holding the credential kept open) can
            # never come back later under a key that has since been replaced or revoked.
            tell(previous, Close(f"replaced by a newer login of CP {cp_id}"))
        self._admitted[cp_id] = link
        self.stats["logins"] += 1
        log.info("CP %s authenticated from %s: issued key %s%s", cp_id, address, key_id,
                 f" (replaces {replaced.key_id})" if replaced else "")

    def _blocked(self, peer: _Peer, cp_id: str, corr: str) -> bool:
        """Refuse (and say when to try again) if the peer's address failed too often."""
        address = address_of(peer.peer)
        # Counted per address and CP id: a Monitor with a wrong secret behind a NAT must not lock
        # its neighbours out (guessing a 256-bit secret is hopeless anyway; this bounds floods).
        if not self.limiter.blocked(_limit_key(address, cp_id)):
            return False
        wait = max(1, round(self.limiter.retry_after(_limit_key(address, cp_id))))
        reason = f"too many failed attempts from {address} for CP {cp_id}; try again in {wait} s"
        last, quiet = self._blocked_audit.get(address, (0.0, 0))
        now = time.monotonic()
        audit = now - last >= BLOCKED_AUDIT_EVERY
        if audit:
            if len(self._blocked_audit) >= MAX_PENDING:
                self._blocked_audit.pop(next(iter(self._blocked_audit)))
            self._blocked_audit[address] = (now, 0)
        else:
            self._blocked_audit[address] = (last, quiet + 1)
        self._refuse(peer, cp_id, reason, correlation_id=corr, count=False, audit=audit,
                     params={"not_audited_since_last": quiet} if audit and quiet else None)
        return True

    def _refuse(self, peer: _Peer, cp_id: str | None, reason: str, *, correlation_id: str | None = None,
                answer: str | None = None, result: protocol.Message | None = None, count: bool = True,
                audit: bool = True, params: dict[str, Any] | None = None) -> None:
        """Answer a refusal, audit it (``login_failed``), count it against the address, close."""
        address = address_of(peer.peer)
        if result is None:
            result = protocol.AuthResult(correlation_id=correlation_id or protocol.new_id(), status="denied",
                                         reason=protocol.clip(answer or reason))
        self._peers.pop(peer.link.actor_urn, None)
        tell(peer.link, Send(result))
        tell(peer.link, Close(f"authentication refused: {reason}"))
        if count:
            self.limiter.failed(_limit_key(address, cp_id))
        if audit:
            self.repo.audit("central", cp_id or "unknown", "login_failed", reason, address=address,
                            params={"cp_id": cp_id, "reason": reason, **(params or {})})
        self.stats["refused"] += 1
        log.warning("Refused a login%s from %s: %s", f" as CP {cp_id}" if cp_id else "", address, reason)

    def _let_through(self, peer: _Peer, msg: protocol.Message) -> None:
        """Open enrolment: the connection goes to Central unsealed and unauthenticated."""
        link = peer.link
        self._peers.pop(link.actor_urn, None)
        self._forward[link.actor_urn] = time.monotonic()
        self.directory.tell(self.central, FrameIn(link, msg))
        tell(link, Admit(None))

    # --- revocation and the registry ---------------------------------------------------------
    def _revoke(self, cp_id: str, reason: str, who: str, *, deregistered: bool = False) -> str:
        now = time.time()
        ids = self.repo.revoke_keys(cp_id, now, reason)
        ids += [k for k in self.keyring.revoke(cp_id, now) if k not in ids]
        self.repo.audit("central", who, "key_revoked", f"keys of CP {cp_id} revoked: {reason}",
                        params={"cp_id": cp_id, "key_ids": ids, "reason": reason})
        self.stats["revoked"] += len(ids)
        link = self._admitted.pop(cp_id, None)
        if link is not None:
            tell(link, Close(reason))
        self.directory.tell(self.central, KeysRevoked(cp_id, tuple(ids), reason, deregistered))
        log.warning("Revoked %d key(s) of CP %s (%s)", len(ids), cp_id, reason)
        return f"revoked {len(ids)} key(s) of CP {cp_id}"

    def _poll(self) -> None:
        rev = self.repo.registry_rev()
        if rev != self._rev:
            for change_rev, kind, ident, change in self.repo.registry_changes(self._rev):
                self._rev = max(self._rev, change_rev)
                if kind != "cp":
                    continue
                if change == "deregistered":
                    self._revoke(ident, f"CP {ident} was deregistered", "registry", deregistered=True)
                elif change == "registered":
                    if self.keyring.current(ident) is not None or ident in self._admitted:
                        # Registered again: a new secret was issued, so whoever logged in with the
                        # old one (stolen, say) is out, and its keys open nothing any more.
                        self._revoke(ident, f"CP {ident} was issued a new secret", "registry")
                    self.directory.tell(self.central, CpRegistered(ident))
        now = time.monotonic()
        for urn, p in list(self._peers.items()):  # open mode has no connection deadline: bound the wait
            if p.challenge is not None and now - p.challenge.since > self.config.auth_timeout * 2:
                self._peers.pop(urn, None)
                tell(p.link, Close("the authentication took too long"))
        # A frame sent before its link learnt it was admitted comes here within moments; after that, not at all.
        self._forward = {urn: at for urn, at in self._forward.items() if now - at < FORWARD_FOR}
        if now - self._forgot_at >= FORGET_EVERY:
            self._forgot_at = now
            self.keyring.forget_ended()
            self.repo.prune_keys(time.time() - KEEP_ENDED_KEYS)  # they open nothing any more

    def _revoke_deregistered_keys(self) -> None:
        for k in self.repo.usable_keys(time.time(), 0.0):
            cred = self.repo.credential("cp", k.cp_id)
            if k.state == "current" and (cred is None or not cred.registered):
                self._revoke(k.cp_id, f"CP {k.cp_id} was deregistered", "registry", deregistered=True)

    def _status(self) -> dict[str, Any]:
        current = {}
        for cp_id in self._admitted:
            info = self.keyring.current(cp_id)
            if info is not None:
                current[cp_id] = info.key_id
        return {"waiting": len(self._peers), "current_keys": current, **self.stats}


KEEP_ENDED_KEYS = 86_400.0
"""Seconds a replaced or revoked key stays in the database (for the audit's sake) before it is deleted."""


def _limit_key(address: str, cp_id: str | None) -> str:
    """What failed attempts are counted by: the peer's host and the CP id it claimed."""
    return f"{address}|{cp_id or '?'}"


def retry_after_of(reason: str) -> float | None:
    """The seconds a "too many failed attempts …; try again in N s" refusal asks to wait."""
    found = re.search(r"try again in (\d+) s", reason)
    return float(found.group(1)) if found else None
