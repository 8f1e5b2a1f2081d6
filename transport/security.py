"""The trust boundary's cryptography, in one place (issue #11).

Who holds what:

* A **secret** (32 random bytes, base64url) is issued once per CP or driver by
  the registry and shown once. Only its owner keeps it (a file or an
  environment variable, never argv).
* A **verifier** is the slow hash of a secret: Argon2id with a salt derived
  from the identity (:func:`verifier`). The registry stores only this. The
  owner computes it from its secret once per process (≈50 ms), Central
  never needs the secret. Proofs and signatures are HMACs keyed with the
  verifier, so the secret itself never crosses a network.
* A **CP key** (AES-256-GCM) is issued by Central at each successful CP
  authentication (:class:`Keyring`), sent to the Monitor wrapped under a key
  derived from the verifier and Central's nonce (:func:`wrap_key`), and
  handed by the Monitor to its Engine over their sealed local link.

What is sealed: a :class:`~transport.protocol.Sealed` envelope carries any
message encrypted and authenticated with a key; the associated data binds
the CP id, the key id, the sender's role and its counter, so a sealed record
cannot be moved to another CP, role or position (docs/protocol.md,
"Authentication and sealing", has the exact byte strings).

Replays: a socket link (:class:`LinkSeal`) requires each direction's counter
to grow by at least one (TCP keeps order; the very last frame again is a
retransmission, dropped quietly). Kafka records (:meth:`Keyring.open`) must
carry a counter above the highest seen for that key, sender and topic, unless
the record is one this keyring opened before at that very position (partition
and offset): a redelivery after a restart is not a replay.
The Engine's counter is a microsecond clock, so it still grows after the
Engine restarts with the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from transport import protocol

__all__ = [
    "SecurityError", "DuplicateFrame", "Credential", "new_secret", "verifier", "load_credential", "new_nonce", "proof",
    "check_proof", "wrap_key", "unwrap_key", "new_key", "new_key_id", "link_key", "seal", "LinkSeal",
    "Keyring", "KeyInfo", "sign", "verify_signed", "FailureLimiter", "b64e", "b64d", "open_sealed",
]

# --- parameters: each written once -----------------------------------------------
SECRET_BYTES: Final = 32
KEY_BYTES: Final = 32  #: AES-256
NONCE_BYTES: Final = 32  #: challenge nonces
GCM_NONCE_BYTES: Final = 12
#: Argon2id cost of a verifier: OWASP's minimum (19 MiB, 2 passes, 1 lane): ~50 ms here.
ARGON2_TIME_COST: Final = 2
ARGON2_MEMORY_KIB: Final = 19_456
ARGON2_PARALLELISM: Final = 1
VERIFIER_BYTES: Final = 32

PURPOSE_CENTRAL: Final = "central"  #: a Monitor authenticating to Central
PURPOSE_ENGINE: Final = "engine"  #: a Monitor pairing with its Engine
KINDS: Final = ("cp", "driver")
#: Positions of opened records remembered per key, sender and topic, to recognise a redelivery.
REDELIVERY_MEMORY: Final = 4096


class SecurityError(ValueError):
    """Refused: ``str(exc)`` is the sentence to log, audit and (when safe) answer."""


class DuplicateFrame(SecurityError):
    """The link's previous frame again (a retransmission after a lost ACK): dropped, not an attack."""


# --- encoding -----------------------------------------------------------------------
def b64e(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: base64url's two letters as base64's (what ``base64.urlsafe_b64decode`` does).
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def b64d(text: str, what: str = "value") -> bytes:
    """Inverse of :func:`b64e`; a :class:`SecurityError` naming ``what`` when it is not base64url.

    The same verdicts as ``base64.urlsafe_b64decode`` (non-ASCII text is refused, characters
    outside the alphabet are skipped), in two C calls instead of four Python ones: Central
    decodes two of these per sealed record."""
    try:
        return binascii.a2b_base64((text + "=" * (-len(text) % 4)).encode("ascii").translate(_FROM_URLSAFE))
    except (binascii.Error, ValueError) as exc:
        raise SecurityError(f"{what} is not base64url") from exc


# --- secrets and verifiers ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Credential:
    """An identity and its secret (never logged: ``repr`` hides the secret)."""

    kind: str  # "cp" or "driver"
    ident: str
    secret: str = field(repr=False)

    def verifier(self) -> bytes:
        return verifier(self.kind, self.ident, self.secret)


def new_secret() -> str:
    """A fresh secret: 32 random bytes, base64url (43 characters)."""
    return b64e(secrets.token_bytes(SECRET_BYTES))


def _salt(kind: str, ident: str) -> bytes:
    return hashlib.sha256(f"evcharging/v1/{kind}/{ident}".encode()).digest()[:16]


def verifier(kind: str, ident: str, secret: str) -> bytes:
    """The slow hash of ``secret`` (Argon2id, salt from kind and id): what the registry stores."""
    from argon2.low_level import Type, hash_secret_raw

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return hash_secret_raw(secret.encode(), _salt(kind, ident), time_cost=ARGON2_TIME_COST,
                           memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM,
                           hash_len=VERIFIER_BYTES, type=Type.ID)


def load_credential(kind: str, ident: str, *, file: str | os.PathLike[str] | None = None,
                    env: str | None = None) -> Credential | None:
    """The secret of ``ident`` from ``file`` (either the bare secret, or JSON ``{"id", "secret"}``)
    or else from the environment variable ``env``; None when neither has one.

    A file naming another id is refused (a CP started with another CP's credential).
    """
    text: str | None = None
    if file:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecurityError(f"cannot read the credential file {path}: {exc.strerror or exc}") from exc
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise SecurityError(f"the credential file {path} is not valid JSON") from exc
            named = data.get("id")
            if named is not None and named != ident:
                raise SecurityError(f"the credential file {path} is for {named!r}, not {ident!r}")
            text = data.get("secret")
            if not isinstance(text, str):
                raise SecurityError(f"the credential file {path} has no \"secret\"")
    elif env:
        text = os.environ.get(env) or None
    if text is None:
        return None
    if not 16 <= len(text) <= 256:
        raise SecurityError(f"the secret of {ident} must be 16-256 characters long")
    return Credential(kind, ident, text)


def write_credential(path: str | os.PathLike[str], kind: str, ident: str, secret: str) -> Path:
    """Write a credential file only its owner can read (0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"kind": kind, "id": ident, "secret": secret}, out)
        out.write("\n")
    os.chmod(target, 0o600)
    return target


# --- challenge and response ---------------------------------------------------------
def new_nonce() -> str:
    return b64e(secrets.token_bytes(NONCE_BYTES))


def _mac(key: bytes, *parts: str) -> bytes:
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).digest()


def proof(verifier_: bytes, purpose: str, cp_id: str, nonce: str) -> str:
    """The answer to a challenge: HMAC-SHA256(verifier, "evcharging/auth/v1|purpose|cp_id|nonce")."""
    return b64e(_mac(verifier_, "evcharging/auth/v1", purpose, cp_id, nonce))


def check_proof(verifier_: bytes, purpose: str, cp_id: str, nonce: str, given: str) -> bool:
    """Constant-time comparison of ``given`` with the expected proof."""
    return hmac.compare_digest(proof(verifier_, purpose, cp_id, nonce).encode(), given.encode())


def link_key(verifier_: bytes, purpose: str, cp_id: str, nonce: str) -> bytes:
    """The key of a link both ends derive after a successful challenge (Monitor-Engine pairing)."""
    return _mac(verifier_, "evcharging/link/v1", purpose, cp_id, nonce)


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_key_id() -> str:
    return "k" + secrets.token_hex(8)


def wrap_key(verifier_: bytes, cp_id: str, nonce: str, key_id: str, key: bytes) -> str:
    """``key`` encrypted for the holder of ``verifier_`` (who also learns Central knows it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    wrapping = _mac(verifier_, "evcharging/wrap/v1", cp_id, nonce)
    iv = secrets.token_bytes(GCM_NONCE_BYTES)
    return b64e(iv + AESGCM(wrapping).encrypt(iv, key, f"{cp_id}|{key_id}".encode()))


def unwrap_key(verifier_: bytes, cp_id: str, nonce: str, key_id: str, wrapped: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = b64d(wrapped, "wrapped_key")
    wrapping = _mac(verifier_, "evcharging/wrap/v1", cp_id, nonce)
    try:
        key = AESGCM(wrapping).decrypt(raw[:GCM_NONCE_BYTES], raw[GCM_NONCE_BYTES:], f"{cp_id}|{key_id}".encode())
    except (InvalidTag, ValueError) as exc:
        raise SecurityError("the key from Central does not open with our secret (not the real Central?)") from exc
    if len(key) != KEY_BYTES:
        raise SecurityError("the key from Central has the wrong length")
    return key


# --- sealing ---------------------------------------------------------------------------
def _aad(cp_id: str, key_id: str, sender: str, ctr: int) -> bytes:
    return f"evcharging/sealed/v1|{cp_id}|{key_id}|{sender}|{ctr}".encode()


class _Aead:
    """One AESGCM object per key (its construction is the costly part)."""

    __slots__ = ("aead",)

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != KEY_BYTES:
            raise SecurityError(f"a key must be {KEY_BYTES} bytes")
        self.aead = AESGCM(key)


def seal(aead: _Aead | bytes, cp_id: str, key_id: str, sender: str, ctr: int,
         message: protocol.Message) -> protocol.Sealed:
    """``message`` sealed under the key (a random 96-bit GCM nonce per message)."""
    box = aead if isinstance(aead, _Aead) else _Aead(aead)
    iv = secrets.token_bytes(GCM_NONCE_BYTES)
    data = box.aead.encrypt(iv, protocol.encode(message), _aad(cp_id, key_id, sender, ctr))
    return protocol.Sealed(cp_id=cp_id, key_id=key_id, sender=sender, ctr=ctr, nonce=b64e(iv), data=b64e(data))


_ENVELOPES: Final = (protocol.Sealed, protocol.Signed)


def _open(box: _Aead, env: protocol.Sealed) -> protocol.Message:
    from cryptography.exceptions import InvalidTag

    try:
        plain = box.aead.decrypt(b64d(env.nonce, "nonce"), b64d(env.data, "data"),
                                 _aad(env.cp_id, env.key_id, env.sender, env.ctr))
    except (InvalidTag, ValueError) as exc:
        raise SecurityError(f"a message for CP {env.cp_id} does not open with key {env.key_id} "
                            "(wrong key or altered)") from exc
    try:
        inner = protocol.decode(plain)
    except protocol.ProtocolError as exc:
        raise SecurityError(f"the sealed message of CP {env.cp_id} is invalid: {exc}") from exc
    if isinstance(inner, _ENVELOPES):
        raise SecurityError("a sealed message may not contain another envelope")
    claimed = getattr(inner, "cp_id", None)
    if claimed is not None and claimed != env.cp_id:
        raise SecurityError(f"a message sealed for CP {env.cp_id} claims to be from CP {claimed}")
    return inner


def open_sealed(key: bytes, env: protocol.Sealed) -> protocol.Message:
    """The inner message of ``env`` under ``key``: authenticity only, no key state and no replay
    check. For tools that inspect records (dead letters, tests), never for accepting them."""
    return _open(_Aead(key), env)


class MicroCounter:
    """Strictly increasing counters that keep growing across restarts (a microsecond clock)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


class LinkSeal:
    """Both directions of one sealed socket link (one actor uses it: no lock).

    ``me`` and ``peer`` are the two roles ("monitor"/"central", "monitor"/"engine").
    """

    def __init__(self, cp_id: str, key_id: str, key: bytes, me: str, peer: str) -> None:
        self.cp_id, self.key_id, self.me, self.peer = cp_id, key_id, me, peer
        self._box = _Aead(key)
        self._out = MicroCounter()
        self._in = 0

    def seal(self, message: protocol.Message) -> protocol.Sealed:
        return seal(self._box, self.cp_id, self.key_id, self.me, self._out.next(), message)

    def open(self, env: protocol.Message) -> protocol.Message:
        """The inner message of a sealed frame from the peer, or :class:`SecurityError`."""
        if not isinstance(env, protocol.Sealed):
            raise SecurityError(f"a {env.TYPE} that is not sealed on an authenticated link")
        if env.cp_id != self.cp_id or env.key_id != self.key_id or env.sender != self.peer:
            raise SecurityError(f"a frame sealed as {env.sender} of CP {env.cp_id} with key {env.key_id} "
                                f"on the link of CP {self.cp_id} ({self.key_id})")
        inner = _open(self._box, env)
        if env.ctr == self._in:
            raise DuplicateFrame(f"the previous frame again (counter {env.ctr})")
        if env.ctr < self._in:
            raise SecurityError(f"a replayed frame (counter {env.ctr}, already at {self._in})")
        self._in = env.ctr
        return inner


# --- Central's keys -------------------------------------------------------------------
class _Positions:
    """The positions (partition, offset) of the Kafka records a keyring opened for one key, sender
    and topic, with their counters: at least the newest :data:`REDELIVERY_MEMORY` of them (at most
    twice as many: the oldest half is dropped at once).

    Why arrays: 24 bytes a position instead of ~200 in a dict of tuples. With a key per CP and a
    record a second, a dict would hold ~0.8 MB per CP after an hour (1,000 CPs: ~0.8 GB). Looking a
    position up scans the offsets (in C); only a record at or below the counter's high-water mark
    (a redelivery, or a replay) is looked up.
    """

    __slots__ = ("counters", "offsets", "partitions")

    def __init__(self) -> None:
        self.partitions = array("q")
        self.offsets = array("q")
        self.counters = array("q")

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, partition: int, offset: int, ctr: int) -> None:
        """Remember that the record at (partition, offset) had counter ``ctr``."""
        self.partitions.append(partition)
        self.offsets.append(offset)
        self.counters.append(ctr)
        if len(self.offsets) >= 2 * REDELIVERY_MEMORY:
            del self.partitions[:REDELIVERY_MEMORY]
            del self.offsets[:REDELIVERY_MEMORY]
            del self.counters[:REDELIVERY_MEMORY]

    def counter_at(self, partition: int, offset: int) -> int | None:
        """The counter of the record opened at (partition, offset), or None if none is remembered."""
        offsets, start = self.offsets, 0
        while True:
            try:
                i = offsets.index(offset, start)
            except ValueError:
                return None
            if self.partitions[i] == partition:
                return self.counters[i]
            start = i + 1


@dataclass(slots=True)
class KeyInfo:
    """One issued key, as the keyring knows it."""

    key_id: str
    cp_id: str
    key: bytes = field(repr=False)
    issued_at: float
    state: str = "current"  # current | replaced | revoked
    ended_at: float | None = None
    box: _Aead | None = field(default=None, repr=False)


class Keyring:
    """Central's keys of every CP (thread-safe: Central's actors issue, its pumps' routers open).

    ``grace`` seconds: how long a key that was *replaced* (the CP authenticated
    again) still opens Kafka records already on their way. A *revoked* key
    opens nothing, at once.
    """

    def __init__(self, *, grace: float = 60.0) -> None:
        self.grace = grace
        self._lock = threading.Lock()
        self._keys: dict[str, KeyInfo] = {}
        self._current: dict[str, str] = {}  # cp_id -> key_id
        self._high: dict[tuple[str, str, str], tuple[int, int, int]] = {}  # (key, sender, topic) -> ctr, part, off
        # (key, sender, topic) -> the positions (partition, offset) of records opened, with their counter
        self._seen: dict[tuple[str, str, str], _Positions] = {}
        self.opened = 0
        self.rejected = 0

    # issue, revoke, load
    def add(self, info: KeyInfo) -> KeyInfo | None:
        """Add ``info``; when it is current, the CP's previous current key becomes replaced (returned)."""
        with self._lock:
            self._keys[info.key_id] = info
            old: KeyInfo | None = None
            if info.state == "current":
                previous = self._current.get(info.cp_id)
                if previous is not None and previous != info.key_id and previous in self._keys:
                    old = self._keys[previous]
                    old.state, old.ended_at = "replaced", info.issued_at
                self._current[info.cp_id] = info.key_id
            return old

    def revoke(self, cp_id: str, at: float | None = None) -> list[str]:
        """Revoke every key of ``cp_id`` that still opens anything; their ids."""
        now = time.time() if at is None else at
        with self._lock:
            ids = [k.key_id for k in self._keys.values() if k.cp_id == cp_id and k.state != "revoked"]
            for key_id in ids:
                info = self._keys[key_id]
                info.state, info.ended_at = "revoked", now
            self._current.pop(cp_id, None)
            return ids

    def current(self, cp_id: str) -> KeyInfo | None:
        with self._lock:
            key_id = self._current.get(cp_id)
            return self._keys.get(key_id) if key_id else None

    def get(self, key_id: str) -> KeyInfo | None:
        with self._lock:
            return self._keys.get(key_id)

    def forget_ended(self, now: float | None = None) -> int:
        """Drop replaced keys past their grace and revoked ones older than an hour (bounded memory)."""
        t = time.time() if now is None else now
        with self._lock:
            gone = [k for k, i in self._keys.items()
                    if i.ended_at is not None and t - i.ended_at > max(self.grace, 3600.0 if i.state == "revoked"
                                                                       else self.grace)]
            for key_id in gone:
                del self._keys[key_id]
            self._high = {k: v for k, v in self._high.items() if k[0] in self._keys}
            self._seen = {k: v for k, v in self._seen.items() if k[0] in self._keys}
            return len(gone)

    # opening
    def open(self, env: protocol.Sealed, *, topic: str, partition: int = -1, offset: int = -1,
             now: float | None = None) -> protocol.Message:
        """The inner message of a sealed Kafka record, or :class:`SecurityError` saying why not."""
        result = self.open_many(((env, topic, partition, offset),), now=now)[0]
        if isinstance(result, SecurityError):
            raise result
        return result

    def open_many(self, records: Sequence[tuple[protocol.Sealed, str, int, int]], *,
                  now: float | None = None) -> list[protocol.Message | SecurityError]:
        """Open the sealed Kafka records ``(envelope, topic, partition, offset)`` of one poll, in order:
        for each, its inner message or the :class:`SecurityError` saying why not (not raised).

        Exactly what :meth:`open` of each record in turn would say: the key checks, then the
        decryption and the inner message's validation, then the replay counter and the position
        (a later record of the batch is a replay of an earlier one as it would be one by one).
        Why a batch: Central opens thousands of records a second; the lock is taken twice per
        poll instead of twice per record, and the clock read once. A key revoked while the batch
        was being decrypted opens none of its records.
        """
        t = time.time() if now is None else now
        out: list[protocol.Message | SecurityError] = []
        infos: list[KeyInfo | None] = []
        with self._lock:  # 1. the key of each record: known, the CP's, not revoked, within its grace
            for env, _topic, _partition, _offset in records:
                info = self._keys.get(env.key_id)
                problem = self._key_problem(env, info, t)
                if problem is not None or info is None:
                    out.append(SecurityError(problem))
                    infos.append(None)
                    continue
                if info.box is None:
                    info.box = _Aead(info.key)
                out.append(_UNOPENED)
                infos.append(info)
        for i, (env, _topic, _partition, _offset) in enumerate(records):  # 2. outside the lock: the costly part
            info = infos[i]
            if info is not None:
                assert info.box is not None
                try:
                    out[i] = _open(info.box, env)
                except SecurityError as exc:
                    out[i] = exc
                    infos[i] = None
        with self._lock:  # 3. the replay counter of each opened record, in order
            for i, (env, topic, partition, offset) in enumerate(records):
                info = infos[i]
                if info is None:
                    self.rejected += 1
                    continue
                if info.state == "revoked":  # revoked while we decrypted
                    out[i] = SecurityError(f"a record of CP {env.cp_id} sealed with revoked key {env.key_id}")
                    self.rejected += 1
                    continue
                slot = (env.key_id, env.sender, topic)
                high = self._high.get(slot)
                if high is not None and env.ctr <= high[0]:
                    # Only a record this keyring opened before, at this very position, is a
                    # redelivery (the pump restarted, or the batch was handed over again).
                    seen = self._seen.get(slot)
                    if offset < 0 or seen is None or seen.counter_at(partition, offset) != env.ctr:
                        out[i] = SecurityError(f"a replayed record of CP {env.cp_id} (counter {env.ctr} "
                                               f"is not above {high[0]})")
                        self.rejected += 1
                        continue
                else:
                    self._high[slot] = (env.ctr, partition, offset)
                    if offset >= 0:
                        seen = self._seen.get(slot)
                        if seen is None:
                            seen = self._seen[slot] = _Positions()
                        seen.add(partition, offset, env.ctr)
                self.opened += 1
        return out

    def _key_problem(self, env: protocol.Sealed, info: KeyInfo | None, t: float) -> str | None:
        """Why ``info`` (the key ``env`` names) may not open ``env`` at time ``t``; None when it may."""
        if info is None:
            return f"a record of CP {env.cp_id} sealed with an unknown key {env.key_id}"
        if info.cp_id != env.cp_id:
            return f"a record of CP {env.cp_id} sealed with the key of CP {info.cp_id}"
        if info.state == "revoked":
            return f"a record of CP {env.cp_id} sealed with revoked key {env.key_id}"
        if info.state == "replaced" and info.ended_at is not None and t - info.ended_at > self.grace:
            return (f"a record of CP {env.cp_id} sealed with key {env.key_id}, replaced "
                    f"{t - info.ended_at:.0f} s ago (more than {self.grace:g} s)")
        if env.sender != "engine":
            return f"a Kafka record of CP {env.cp_id} sealed as {env.sender}, not engine"
        return None


#: Placeholder of a record whose key checks passed and that is not decrypted yet (Keyring.open_many).
_UNOPENED: Final = SecurityError("not opened")


# --- drivers ---------------------------------------------------------------------------
def _signing_input(driver_id: str, ts: float, body: str) -> bytes:
    return f"evcharging/signed/v1|{driver_id}|{ts!r}|{body}".encode()


def sign(verifier_: bytes, driver_id: str, message: protocol.Message, ts: float | None = None) -> protocol.Signed:
    """``message`` (a driver request) signed with the driver's verifier."""
    stamp = round(time.time() if ts is None else ts, 3)
    body = protocol.encode(message).decode("utf-8")
    mac = hmac.new(verifier_, _signing_input(driver_id, stamp, body), hashlib.sha256).digest()
    return protocol.Signed(driver_id=driver_id, ts=stamp, body=body, sig=b64e(mac))


def verify_signed(verifier_: bytes, env: protocol.Signed, *, now: float | None = None,
                  max_age: float = 300.0, max_ahead: float = 60.0) -> protocol.Message:
    """The inner request of a signed driver message, or :class:`SecurityError`."""
    mac = hmac.new(verifier_, _signing_input(env.driver_id, env.ts, env.body), hashlib.sha256).digest()
    if not hmac.compare_digest(b64e(mac).encode(), env.sig.encode()):
        raise SecurityError(f"the signature of driver {env.driver_id}'s request is wrong")
    t = time.time() if now is None else now
    if env.ts < t - max_age:
        raise SecurityError(f"driver {env.driver_id}'s request was signed {t - env.ts:.0f} s ago "
                            f"(more than {max_age:g} s)")
    if env.ts > t + max_ahead:
        raise SecurityError(f"driver {env.driver_id}'s request is signed {env.ts - t:.0f} s in the future")
    try:
        inner = protocol.decode(env.body)
    except protocol.ProtocolError as exc:
        raise SecurityError(f"driver {env.driver_id}'s signed request is invalid: {exc}") from exc
    if isinstance(inner, protocol.Sealed | protocol.Signed):
        raise SecurityError("a signed request may not contain another envelope")
    if getattr(inner, "driver_id", None) != env.driver_id:
        raise SecurityError(f"a request signed by driver {env.driver_id} speaks for "
                            f"{getattr(inner, 'driver_id', None)!r}")
    return inner


# --- failed attempts ------------------------------------------------------------------
class FailureLimiter:
    """At most ``limit`` failed attempts per address within ``window`` seconds (then refuse)."""

    def __init__(self, limit: int = 5, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit, self.window, self.max_addresses = limit, window, max_addresses
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        q = self._fails.get(address)
        if q is None:
            if len(self._fails) >= self.max_addresses:  # bounded: forget the quietest address
                self._fails.pop(next(iter(self._fails)))
            q = self._fails[address] = deque()
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, address: str, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        return len(self._recent(address, t)) >= self.limit

    def failed(self, address: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self._recent(address, t).append(t)

    def retry_after(self, address: str, now: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        q = self._recent(address, t)
        return max(0.0, self.window - (t - q[0])) if q else 0.0


def address_of(peer: str) -> str:
    """The host part of a "host:port" peer (failed attempts count per host)."""
    host, _, port = peer.rpartition(":")
    return host.strip("[]") if host and port.isdigit() else peer
