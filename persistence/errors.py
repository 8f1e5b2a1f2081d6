"""Exceptions of the persistence layer.

They carry sentences an operator can read (the actors show them to users
as they are) and, where useful, the data a caller needs to react, so no
caller ever has to parse an ``sqlite3`` error message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only
    from persistence.records import SessionRecord

__all__ = [
    "PersistenceError",
    "SchemaTooNew",
    "NestedTransactionError",
    "Conflict",
    "UnknownSession",
    "UnknownChargingPoint",
    "BillingRejected",
]


class PersistenceError(Exception):
    """Base of every error this package raises on purpose."""


class SchemaTooNew(PersistenceError):
    """The database was migrated by a newer version of the code.

    Running older code on it could corrupt data it does not understand,
    so we refuse instead of guessing.
    """

    def __init__(self, db_version: int, code_version: int, where: str = "") -> None:
        self.db_version = db_version
        self.code_version = code_version
        place = f" {where}" if where else ""
        super().__init__(
            f"The database{place} is at schema version {db_version}, but this "
            f"program only knows versions up to {code_version}; upgrade the "
            "program (or use a database it created)."
        )


class NestedTransactionError(PersistenceError):
    """``transaction()`` was entered while a transaction was already open.

    SQLite has no nested transactions; silently joining the outer one would
    make the inner block's commit/rollback promise a lie.
    """


class Conflict(PersistenceError):
    """A write would break a uniqueness rule (one live session per driver
    and per CP, unique session ids).

    ``kind`` says which rule ("driver", "cp" or "session_id") and
    ``existing`` is the session already holding the slot, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: Literal["driver", "cp", "session_id"],
        existing: SessionRecord | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.existing = existing


class UnknownSession(PersistenceError, LookupError):
    """No session (or journal entry) with this id exists."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"There is no session with id {session_id!r}.")


class UnknownChargingPoint(PersistenceError, LookupError):
    """No charging point with this id is registered in the database."""

    def __init__(self, cp_id: str) -> None:
        self.cp_id = cp_id
        super().__init__(f"There is no charging point with id {cp_id!r}.")


class BillingRejected(PersistenceError):
    """A completion Central will not bill (nothing was written): it names another
    CP or driver than the session, the session was cancelled, or its energy is
    below what Central already metered. ``kind`` says which, for the audit."""

    def __init__(self, session_id: str, kind: Literal["cp_mismatch", "driver_mismatch", "cancelled", "below_metered"],
                 reason: str) -> None:
        self.session_id = session_id
        self.kind = kind
        self.reason = reason
        super().__init__(f"Completion of session {session_id} rejected: {reason}")
