"""The Engine's side of the Monitor-Engine pairing (issue #11, docs/protocol.md).

An Engine started with its CP's credential obeys only a Monitor that proved
it holds the same credential: the Monitor sends ``auth_request`` with the CP
id, the Engine answers ``auth_challenge`` with a fresh nonce, the Monitor
``auth_proof`` = HMAC(verifier, "evcharging/auth/v1|engine|cp_id|nonce"),
the Engine ``auth_result``; then both ends seal every frame with the link key
derived from the same nonce.

:class:`EnginePairing` is the bookkeeping only (no actor, no socket): the
EngineActor hands it every frame of a link that has not paired yet and
carries out the :class:`Verdict` (send the answer, admit the link with its
seal, or close it). Failed attempts are counted per address
(:class:`~transport.security.FailureLimiter`); a blocked address is refused
before any proof is checked.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Final

from transport import protocol
from transport.security import (
    PURPOSE_ENGINE,
    FailureLimiter,
    LinkSeal,
    address_of,
    check_proof,
    link_key,
    new_nonce,
)

log = logging.getLogger("evcharging.engine.pairing")

__all__ = ["EngineCredential", "EnginePairing", "Verdict", "PAIR_FIRST", "LINK_KEY_ID"]

#: The answer to any frame other than auth_request / auth_proof on an unpaired link.
PAIR_FIRST: Final = "pair first (auth_request): this Engine obeys only its Monitor"
LINK_KEY_ID: Final = "link"
#: How many challenges may wait for their proof at once (one per connection; bounded).
MAX_OPEN_CHALLENGES: Final = 64


@dataclass(frozen=True, slots=True)
class EngineCredential:
    """The CP this Engine is, and the verifier of its secret (computed once per process; never logged)."""

    cp_id: str
    verifier: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the Engine does with one frame of an unpaired link.

    ``answer`` is sent first (plain); then, when ``seal`` is given, the link is
    admitted as the Monitor with it; when ``close`` is a reason, the link is closed.
    """

    answer: protocol.Message | None = None
    seal: LinkSeal | None = None
    close: str | None = None
    refused: str | None = None  # the sentence that was logged, when the frame was refused


@dataclass(slots=True)
class _Challenge:
    correlation_id: str
    cp_id: str
    nonce: str


@dataclass(slots=True)
class EnginePairing:
    """Challenges in flight per link, and failed attempts per address (see the module docstring)."""

    cp_id: str
    verifier: bytes = field(repr=False)
    limiter: FailureLimiter = field(default_factory=lambda: FailureLimiter(limit=5, window=60.0))
    _open: dict[str, _Challenge] = field(default_factory=dict)
    refused: int = 0
    paired: int = 0

    def forget(self, link_urn: str) -> None:
        """The link closed: its challenge, if any, is void."""
        self._open.pop(link_urn, None)

    def handle(self, link_urn: str, peer: str, msg: protocol.Message) -> Verdict:
        """The answer to ``msg``, sent on an unpaired link from ``peer`` (HOST:PORT)."""
        match msg:
            case protocol.AuthRequest(cp_id, correlation_id):
                return self._on_request(link_urn, peer, cp_id, correlation_id)
            case protocol.AuthProof(correlation_id, cp_id, given):
                return self._on_proof(link_urn, peer, correlation_id, cp_id, given)
            case _:
                self.refused += 1
                sentence = f"a {msg.TYPE} from {peer}, which has not paired: refused, not acted on"
                log.warning("engine %s: %s", self.cp_id, sentence)
                return Verdict(protocol.ErrorMessage(reason=PAIR_FIRST,
                                                     correlation_id=protocol.correlation_of(msg)),
                               refused=sentence)

    def _on_request(self, link_urn: str, peer: str, cp_id: str, correlation_id: str) -> Verdict:
        address = address_of(peer)
        if self._limited(address):
            wait = self.limiter.retry_after(address)
            return self._deny(link_urn, peer, cp_id, correlation_id,
                              f"too many failed attempts from {address}; try again in {wait:.0f} s", count=False)
        if cp_id != self.cp_id:
            return self._deny(link_urn, peer, cp_id, correlation_id, f"this Engine is CP {self.cp_id}, not {cp_id}")
        if len(self._open) >= MAX_OPEN_CHALLENGES and link_urn not in self._open:
            self._open.pop(next(iter(self._open)))  # the oldest unanswered challenge gives way
        nonce = new_nonce()
        self._open[link_urn] = _Challenge(correlation_id, cp_id, nonce)
        log.debug("engine %s: challenged %s", self.cp_id, peer)
        return Verdict(protocol.AuthChallenge(correlation_id=correlation_id, nonce=nonce))

    def _on_proof(self, link_urn: str, peer: str, correlation_id: str, cp_id: str, given: str) -> Verdict:
        challenge = self._open.pop(link_urn, None)
        address = address_of(peer)
        if self._limited(address):
            wait = self.limiter.retry_after(address)
            return self._deny(link_urn, peer, cp_id, correlation_id,
                              f"too many failed attempts from {address}; try again in {wait:.0f} s", count=False)
        if challenge is None or challenge.correlation_id != correlation_id:
            return self._deny(link_urn, peer, cp_id, correlation_id,
                              "no challenge is waiting for this proof (send auth_request first)")
        if cp_id != challenge.cp_id:
            return self._deny(link_urn, peer, cp_id, correlation_id,
                              f"the proof names CP {cp_id}, the request named {challenge.cp_id}")
        if not check_proof(self.verifier, PURPOSE_ENGINE, cp_id, challenge.nonce, given):
            return self._deny(link_urn, peer, cp_id, correlation_id, f"wrong proof for CP {cp_id}")
        self.paired += 1
        seal = LinkSeal(cp_id, LINK_KEY_ID, link_key(self.verifier, PURPOSE_ENGINE, cp_id, challenge.nonce),
                        me="engine", peer="monitor")
        log.info("engine %s: the Monitor at %s paired (proved the CP's credential)", self.cp_id, peer)
        return Verdict(protocol.AuthResult(correlation_id=correlation_id, status="accepted"), seal=seal)

    def _limited(self, address: str) -> bool:
        """Failed pairings are limited per address, except from this host itself: the Monitor and
        anything else local share 127.0.0.1, and a local process failing on purpose must not lock
        the real Monitor out (whoever runs code on the CP's host owns the CP anyway)."""
        return not _is_loopback(address) and self.limiter.blocked(address)

    def _deny(self, link_urn: str, peer: str, cp_id: str, correlation_id: str, reason: str, *,
              count: bool = True) -> Verdict:
        self._open.pop(link_urn, None)
        self.refused += 1
        if count:
            self.limiter.failed(address_of(peer))
        log.warning("engine %s: refused the pairing of %s (claimed CP %s): %s", self.cp_id, peer, cp_id, reason)
        return Verdict(protocol.AuthResult(correlation_id=correlation_id, status="denied",
                                           reason=protocol.clip(reason)),
                       close=f"pairing refused: {reason}", refused=reason)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
