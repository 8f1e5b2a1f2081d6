"""The trust boundary's tables (migration 5): credentials, registry changes, CP keys, audit.

:class:`TrustMixin` is shared by Central's :class:`~persistence.repository.Repository`
and the registry's :class:`RegistryStore` (the same database file: the
registry writes, Central reads, so Central sees a registration at the next
login and a deregistration within a second, without restarting).

Only a verifier (a slow hash, transport/security.py) of each secret is stored.
CP keys are stored as issued (so records already in Kafka still open after
Central restarts); the database file is Central's to protect (0600).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import IO, Any

from persistence.db import MIGRATIONS, SqliteStore, transaction
from persistence.records import AuditRecord, CpRecord, CredentialRecord, KeyRecord, columns

__all__ = ["TrustMixin", "RegistryStore"]

_CRED_COLS = columns(CredentialRecord)
_KEY_COLS = columns(KeyRecord)
_AUDIT_COLS = columns(AuditRecord)


class TrustMixin:
    """Methods over ``self._conn`` (an open, migrated connection) and ``self._clock``."""

    _conn: sqlite3.Connection
    _clock: Callable[[], float]  # both set by SqliteStore

    # ---------------------------------------------------------------- audit
    def audit(self, component: str, subject: str, event: str, detail: str = "", *,
              address: str | None = None, params: dict[str, Any] | None = None) -> None:
        """Append a line to the audit trail: who (``subject``), from where, what, with what."""
        with transaction(self._conn):
            self._audit(self._clock(), component, subject, event, detail, address=address, params=params)

    def _audit(self, at: float, component: str, subject: str, event: str, detail: str, *,
               address: str | None = None, params: dict[str, Any] | None = None) -> None:
        """Inside a caller's transaction: the audit line commits (or not) with its cause."""
        self._conn.execute(
            "INSERT INTO audit_log (at, component, subject, event, detail, address, params) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (at, component, subject, event, detail, address,
             json.dumps(params, sort_keys=True, default=str) if params else None),
        )

    def recent_audit(self, limit: int = 50, *, event: str | None = None) -> list[AuditRecord]:
        """The latest ``limit`` audit lines (of one ``event`` when given), newest first."""
        where, args = ("WHERE event = ?", (event,)) if event else ("", ())
        rows = self._conn.execute(
            f"SELECT {_AUDIT_COLS} FROM audit_log {where} ORDER BY id DESC LIMIT ?", (*args, int(limit)))
        return [AuditRecord(*row) for row in rows]

    def iter_audit(self, after_id: int = 0, batch: int = 1000) -> Iterator[AuditRecord]:
        """Every audit line after ``after_id``, oldest first (read in batches)."""
        last = after_id
        while True:
            rows = self._conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                rec = AuditRecord(*row)
                last = rec.id
                yield rec

    def export_audit(self, out: IO[str], after_id: int = 0) -> int:
        """Write the audit log as JSON lines (one object per line, oldest first); how many."""
        n = 0
        for rec in self.iter_audit(after_id):
            line = {"id": rec.id, "at": rec.at, "component": rec.component, "who": rec.subject,
                    "event": rec.event, "detail": rec.detail, "address": rec.address,
                    "params": json.loads(rec.params) if rec.params else {}}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
        return n

    # ---------------------------------------------------------- credentials
    def register(self, kind: str, ident: str, verifier: bytes, *, location: str | None = None,
                 price_eur_kwh: float | None = None, address: str | None = None,
                 who: str = "admin") -> CredentialRecord:
        """Register (or re-register with a new secret) a CP or driver; a CP also gets its
        charging_points row (location, price). One transaction with its change and audit line."""
        now = self._clock()
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO credentials (kind, id, verifier, created_at, deregistered_at) VALUES (?, ?, ?, ?, NULL) "
                "ON CONFLICT (kind, id) DO UPDATE SET verifier = excluded.verifier, "
                "created_at = excluded.created_at, deregistered_at = NULL",
                (kind, ident, verifier, now))
            if kind == "cp":
                self._conn.execute(
                    "INSERT INTO charging_points (cp_id, location, price_eur_kwh, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (cp_id) DO UPDATE SET location = COALESCE(?, location), "
                    "price_eur_kwh = COALESCE(?, price_eur_kwh), updated_at = excluded.updated_at",
                    (ident, location or "unknown", 0.30 if price_eur_kwh is None else price_eur_kwh, now,
                     location, price_eur_kwh))
            elif kind == "driver":
                self._conn.execute("INSERT INTO drivers (driver_id, first_seen) VALUES (?, ?) "
                                   "ON CONFLICT (driver_id) DO NOTHING", (ident, now))
            self._conn.execute("INSERT INTO registry_changes (at, kind, id, change) VALUES (?, ?, ?, 'registered')",
                               (now, kind, ident))
            self._audit(now, "registry", who, "registered", f"{kind} {ident}", address=address,
                        params={"kind": kind, "id": ident, "location": location, "price_eur_kwh": price_eur_kwh})
            rec = self.credential(kind, ident)
        assert rec is not None
        return rec

    def deregister(self, kind: str, ident: str, *, address: str | None = None, who: str = "admin") -> bool:
        """Mark a credential deregistered (False when it was not registered)."""
        now = self._clock()
        with transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE credentials SET deregistered_at = ? WHERE kind = ? AND id = ? AND deregistered_at IS NULL",
                (now, kind, ident))
            if cur.rowcount != 1:
                return False
            self._conn.execute(
                "INSERT INTO registry_changes (at, kind, id, change) VALUES (?, ?, ?, 'deregistered')",
                (now, kind, ident))
            self._audit(now, "registry", who, "deregistered", f"{kind} {ident}", address=address,
                        params={"kind": kind, "id": ident})
        return True

    def credential(self, kind: str, ident: str) -> CredentialRecord | None:
        row = self._conn.execute(f"SELECT {_CRED_COLS} FROM credentials WHERE kind = ? AND id = ?",
                                 (kind, ident)).fetchone()
        return CredentialRecord(*row) if row else None

    def list_credentials(self, kind: str, *, include_deregistered: bool = False) -> list[CredentialRecord]:
        extra = "" if include_deregistered else " AND deregistered_at IS NULL"
        rows = self._conn.execute(f"SELECT {_CRED_COLS} FROM credentials WHERE kind = ?{extra} ORDER BY id",
                                  (kind,))
        return [CredentialRecord(*row) for row in rows]

    def registered_cps(self) -> list[tuple[CredentialRecord, CpRecord | None]]:
        """Registered CPs with their charging_points row (location, price, state)."""
        from persistence.records import columns as cols

        cp_cols = ", ".join(f"p.{c.strip()}" for c in cols(CpRecord).split(","))
        cred_cols = ", ".join(f"c.{c.strip()}" for c in _CRED_COLS.split(","))
        rows = self._conn.execute(
            f"SELECT {cred_cols}, {cp_cols} FROM credentials c LEFT JOIN charging_points p ON p.cp_id = c.id "
            "WHERE c.kind = 'cp' AND c.deregistered_at IS NULL ORDER BY c.id").fetchall()
        n = len(_CRED_COLS.split(","))
        out: list[tuple[CredentialRecord, CpRecord | None]] = []
        for row in rows:
            cp = CpRecord(*row[n:]) if row[n] is not None else None
            if cp is not None:
                cp = CpRecord(cp.cp_id, cp.location, cp.price_eur_kwh, cp.state, cp.max_power_kw, bool(cp.stopped))
            out.append((CredentialRecord(*row[:n]), cp))
        return out

    def registry_rev(self) -> int:
        (rev,) = self._conn.execute("SELECT COALESCE(MAX(rev), 0) FROM registry_changes").fetchone()
        return int(rev)

    def registry_changes(self, after_rev: int, limit: int = 1000) -> list[tuple[int, str, str, str]]:
        """(rev, kind, id, change) after ``after_rev``, oldest first."""
        rows = self._conn.execute("SELECT rev, kind, id, change FROM registry_changes WHERE rev > ? "
                                  "ORDER BY rev LIMIT ?", (after_rev, limit))
        return [(int(r), k, i, c) for r, k, i, c in rows]

    # ----------------------------------------------------------------- keys
    def store_key(self, key_id: str, cp_id: str, key: bytes, issued_at: float, *,
                  address: str | None = None) -> None:
        """A new current key for ``cp_id``; its previous current key becomes replaced. With
        ``address`` (a login), the ``login_ok`` and ``key_issued`` audit lines commit with it:
        one durable commit per login."""
        with transaction(self._conn):
            previous = self._conn.execute("SELECT key_id FROM cp_keys WHERE cp_id = ? AND state = 'current'",
                                          (cp_id,)).fetchone()
            self._conn.execute("UPDATE cp_keys SET state = 'replaced', ended_at = ?, reason = 'replaced' "
                               "WHERE cp_id = ? AND state = 'current'", (issued_at, cp_id))
            self._conn.execute("INSERT INTO cp_keys (key_id, cp_id, key, issued_at, state) "
                               "VALUES (?, ?, ?, ?, 'current')", (key_id, cp_id, key, issued_at))
            if address is not None:
                self._audit(issued_at, "central", cp_id, "login_ok", f"CP {cp_id} authenticated from {address}",
                            address=address)
                self._audit(issued_at, "central", cp_id, "key_issued", f"key {key_id} issued to CP {cp_id}",
                            address=address, params={"key_id": key_id,
                                                     "replaces": previous[0] if previous else None})

    def revoke_keys(self, cp_id: str, at: float, reason: str) -> list[str]:
        """Revoke every key of ``cp_id`` that is not revoked yet; their ids."""
        with transaction(self._conn):
            ids = [r[0] for r in self._conn.execute(
                "SELECT key_id FROM cp_keys WHERE cp_id = ? AND state != 'revoked'", (cp_id,))]
            self._conn.execute("UPDATE cp_keys SET state = 'revoked', ended_at = ?, reason = ? "
                               "WHERE cp_id = ? AND state != 'revoked'", (at, reason, cp_id))
        return ids

    def usable_keys(self, now: float, grace: float) -> list[KeyRecord]:
        """Current keys and keys replaced within ``grace`` seconds (what may still open records)."""
        rows = self._conn.execute(
            f"SELECT {_KEY_COLS} FROM cp_keys WHERE state = 'current' "
            "OR (state = 'replaced' AND ended_at >= ?) ORDER BY issued_at", (now - grace,))
        return [KeyRecord(*row) for row in rows]

    def retire_current_keys(self, at: float) -> int:
        """At Central's start: every current key becomes replaced (records sealed with it
        still open for the grace period; the CPs authenticate again and get new ones)."""
        with transaction(self._conn):
            cur = self._conn.execute("UPDATE cp_keys SET state = 'replaced', ended_at = ?, "
                                     "reason = 'Central restarted' WHERE state = 'current'", (at,))
        return cur.rowcount

    def prune_keys(self, before: float) -> int:
        """Delete keys that ended before ``before`` (they open nothing any more)."""
        with transaction(self._conn):
            cur = self._conn.execute("DELETE FROM cp_keys WHERE state != 'current' AND ended_at < ?", (before,))
        return cur.rowcount


class RegistryStore(TrustMixin, SqliteStore):
    """The registry's view of Central's database (same file, same migrations)."""

    MIGRATIONS = MIGRATIONS
