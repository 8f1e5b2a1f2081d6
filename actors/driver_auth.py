"""DriverAuth: which driver requests Central may act on (issue #11, item 6).

A driver proves who it is by signing each request it publishes on
``driver_requests`` with the verifier of its secret (``signed`` envelope,
docs/protocol.md "Signed driver requests"; the cryptography is
:func:`transport.security.verify_signed`). Central's actor holds one
:class:`DriverAuth` and asks :meth:`DriverAuth.check` about every decoded
record before any handler sees it: the answer is the request to handle, or a
:class:`Denial` (already audited) that Central answers with the request's own
response type (:func:`denial_answers`). A denied request never reaches a
handler, so it never creates a session, a charge_requests row or a driver row.

Modes (``CentralConfig.enroll``):

* **registry** (anything but ``"open"``): only a ``signed`` record of a
  registered driver, correctly signed with its verifier, at most
  ``max_age`` seconds ago (and at most ``max_ahead`` in the future), whose
  request names the same driver, is accepted. Everything else is denied
  "not authenticated: …".
* **open** (development): unsigned requests are accepted; a signed one is
  verified when its driver is registered, and taken as it is otherwise.

Verifiers are cached by driver id; the cache is dropped when the registry's
revision (``registry_rev()``, one cheap query) changes, checked at most once
a second, so a deregistration takes effect within a second and a flood of
records costs no database read each.

Audit: every denial is audited (``request_denied``), but at most one line a
second per driver (the next line says how many were not written) and at most
``audit_per_second`` lines a second in all, so a flood cannot fill the disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from persistence.records import CredentialRecord
from transport import protocol, security

log = logging.getLogger("evcharging.central")

__all__ = ["Denial", "DriverAuth", "TrustStore", "denial_answers", "NOT_AUTHENTICATED", "UNSIGNED"]

NOT_AUTHENTICATED = "not authenticated"
UNSIGNED = "this Central requires signed requests"
AUDIT_EVENT = "request_denied"
_CACHE_MAX = 10_000  #: drivers whose credential (or its absence) is cached at once


class TrustStore(Protocol):
    """What DriverAuth reads and writes (Central's :class:`~persistence.Repository`)."""

    def credential(self, kind: str, ident: str) -> CredentialRecord | None: ...

    def registry_rev(self) -> int: ...

    def audit(self, component: str, subject: str, event: str, detail: str = "", *,
              address: str | None = None, params: dict[str, Any] | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Denial:
    """A request Central may not act on.

    ``driver_id``: who the record claims to be (the envelope's driver, else the
    request's), the one the denial is answered to; ``reason`` the sentence
    ("not authenticated: …"); ``request`` the request as it claims to be
    (never trusted: only its type and correlation id are used), None when
    there is none to read.
    """

    driver_id: str
    reason: str
    request: protocol.Message | None


@dataclass(slots=True)
class _Owed:
    """Denials of one driver not written to the audit log yet (throttled)."""

    count: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def denial_answers(denial: Denial) -> list[protocol.Message]:
    """What Central publishes to ``denial.driver_id`` for a denied request: the request's own
    response, status ``denied``. ``available_cps_response`` and ``driver_hello_response`` have
    no reason field, so an ``error`` with the request's correlation id and the reason comes
    first (a driver settles its request with it and shows the reason). A ``ticket_ack`` (or a
    record whose request cannot be read) gets no answer."""
    d, req, reason = denial.driver_id, denial.request, protocol.clip(denial.reason)
    if not protocol.is_id(d):
        return []
    match req:
        case protocol.ChargeRequest(cp_id=cp_id, correlation_id=corr):
            return [protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="denied", cp_id=cp_id,
                                            reason=reason)]
        case protocol.StopChargingRequest(session_id=sid, correlation_id=corr):
            return [protocol.StopChargingResponse(driver_id=d, correlation_id=corr, status="denied",
                                                  session_id=sid, reason=reason)]
        case protocol.AvailableCpsRequest(correlation_id=corr):
            return [protocol.ErrorMessage(reason=reason, correlation_id=corr),
                    protocol.AvailableCpsResponse(driver_id=d, correlation_id=corr, charging_points=(),
                                                  status="denied")]
        case protocol.DriverHello(correlation_id=corr):
            return [protocol.ErrorMessage(reason=reason, correlation_id=corr),
                    protocol.DriverHelloResponse(driver_id=d, correlation_id=corr, tickets=(), status="denied")]
    return []


class DriverAuth:
    """See the module docstring. Used by one actor (no lock)."""

    def __init__(self, store: Callable[[], TrustStore], *, registry: bool, max_age: float = 300.0,
                 max_ahead: float = 60.0, audit_per_second: int = 20,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        """``store()`` gives the repository (Central opens it in its ``setup``, after this is made)."""
        self._store = store
        self.registry = registry
        self.max_age = max_age
        self.max_ahead = max_ahead
        self.audit_per_second = audit_per_second
        self._clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, CredentialRecord | None] = {}
        self._rev: int | None = None
        self._rev_checked = -math.inf
        # audit throttle
        self._last_line: dict[str, float] = {}  # driver -> monotonic time of its last audit line
        self._owed: dict[str, _Owed] = {}
        self._window = -math.inf  # start of the current one-second window (all drivers)
        self._window_lines = 0
        self._dropped = 0  # denials not written because the window's budget was spent
        self._last_flush = -math.inf
        self.denied = 0  #: denials so far (for tests and the panel)

    # --- the question ------------------------------------------------------------
    def check(self, message: protocol.Message) -> protocol.Message | Denial:
        """The request to handle, or a :class:`Denial` (audited)."""
        self._flush()
        if isinstance(message, protocol.Signed):
            return self._check_signed(message)
        if self.registry:
            return self._deny(getattr(message, "driver_id", ""), message, UNSIGNED)
        return message

    def _check_signed(self, env: protocol.Signed) -> protocol.Message | Denial:
        claimed = _peek(env)
        rec = self._credential(env.driver_id)
        if rec is None or not rec.registered:
            if self.registry:
                state = "not registered" if rec is None else "deregistered"
                return self._deny(env.driver_id, claimed, f"driver {env.driver_id} is {state}")
            try:  # development: an unregistered driver's request is taken as it says
                return _unverified(env)
            except security.SecurityError as exc:
                return self._deny(env.driver_id, claimed, str(exc))
        try:
            return security.verify_signed(rec.verifier, env, now=self._clock(), max_age=self.max_age,
                                          max_ahead=self.max_ahead)
        except security.SecurityError as exc:
            return self._deny(env.driver_id, claimed, str(exc))

    # --- credentials ----------------------------------------------------------------
    def _credential(self, driver_id: str) -> CredentialRecord | None:
        now = self._monotonic()
        if now - self._rev_checked >= 1.0:
            self._rev_checked = now
            rev = self._store().registry_rev()
            if rev != self._rev:
                self._rev = rev
                self._cache.clear()
        if driver_id in self._cache:
            return self._cache[driver_id]
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        rec = self._cache[driver_id] = self._store().credential("driver", driver_id)
        return rec

    # --- denials and their audit -------------------------------------------------------
    def _deny(self, driver_id: str, request: protocol.Message | None, why: str) -> Denial:
        reason = f"{NOT_AUTHENTICATED}: {why}"
        self.denied += 1
        params: dict[str, Any] = {"type": request.TYPE if request is not None else None,
                                  "correlation_id": protocol.correlation_of(request), "reason": reason}
        self._audit(driver_id, reason, params)
        return Denial(driver_id, reason, request)

    def _audit(self, driver_id: str, reason: str, params: dict[str, Any]) -> None:
        now = self._monotonic()
        last = self._last_line.get(driver_id)
        if last is not None and now - last < 1.0:
            owed = self._owed.setdefault(driver_id, _Owed())
            owed.count, owed.params, owed.reason = owed.count + 1, params, reason
            return
        if not self._budget(now):
            self._dropped += 1
            return
        earlier = self._owed.pop(driver_id, None)
        if earlier is not None and earlier.count:
            params = {**params, "repeated": earlier.count}
        self._write(driver_id, reason, params, now)
        log.warning("Denied a request of driver %s: %s", driver_id, reason)

    def _budget(self, now: float) -> bool:
        if now - self._window >= 1.0:
            self._window, self._window_lines = now, 0
        if self._window_lines >= self.audit_per_second:
            return False
        self._window_lines += 1
        return True

    def _write(self, driver_id: str, reason: str, params: dict[str, Any], now: float) -> None:
        self._last_line[driver_id] = now
        try:
            self._store().audit("central", driver_id or "?", AUDIT_EVENT, reason, params=params)
        except Exception as exc:  # the audit must not stop the answer (the log still has it)
            log.error("Could not audit a denied request of driver %s: %s", driver_id, exc)

    def _flush(self) -> None:
        """Write what the throttle owes (once a second at most), and forget quiet drivers."""
        now = self._monotonic()
        if now - self._last_flush < 1.0:
            return
        self._last_flush = now
        for driver_id in [d for d, t in self._last_line.items() if now - t >= 1.0 and d in self._owed]:
            owed = self._owed.pop(driver_id)
            self._write(driver_id, owed.reason, {**owed.params, "repeated": owed.count}, now)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            self._write("*", f"{dropped} denied request(s) not audited one by one "
                             f"(more than {self.audit_per_second} a second)", {"count": dropped}, now)
        self._last_line = {d: t for d, t in self._last_line.items() if now - t < 1.0 or d in self._owed}


def _peek(env: protocol.Signed) -> protocol.Message | None:
    """The request inside ``env`` as it claims to be (unverified), or None when it is no request."""
    try:
        inner = protocol.decode(env.body)
    except protocol.ProtocolError:
        return None
    return None if isinstance(inner, protocol.Sealed | protocol.Signed) else inner


def _unverified(env: protocol.Signed) -> protocol.Message:
    """Open mode, unregistered driver: the inner request, checked for shape only."""
    inner = _peek(env)
    if inner is None:
        raise security.SecurityError(f"driver {env.driver_id}'s signed request is invalid")
    if getattr(inner, "driver_id", None) != env.driver_id:
        raise security.SecurityError(f"a request signed by driver {env.driver_id} speaks for "
                                     f"{getattr(inner, 'driver_id', None)!r}")
    return inner
