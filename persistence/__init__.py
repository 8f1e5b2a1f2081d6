"""Persistence: the only package that writes SQL (stdlib ``sqlite3``).

Central's :class:`Repository` (sessions, tickets with the exactly-once
unique key, CP states, message dedupe, audit) and the Engine's
:class:`EngineJournal` (its live supply, so a restarted Engine can report
it). Each instance owns one connection used by one thread at a time.
"""

from persistence.db import MIGRATIONS, Migration, migrate, open_database, schema_version, transaction
from persistence.errors import (
    Conflict,
    NestedTransactionError,
    PersistenceError,
    SchemaTooNew,
    UnknownChargingPoint,
    UnknownSession,
)
from persistence.journal import JOURNAL_MIGRATIONS, EngineJournal
from persistence.records import (
    LIVE_STATUSES,
    AuditRecord,
    CpRecord,
    JournalEntry,
    SessionRecord,
    TicketRecord,
    cents_from_eur,
)
from persistence.repository import Checkpoint, Repository

__all__ = [
    "MIGRATIONS",
    "JOURNAL_MIGRATIONS",
    "LIVE_STATUSES",
    "Migration",
    "open_database",
    "migrate",
    "schema_version",
    "transaction",
    "PersistenceError",
    "SchemaTooNew",
    "NestedTransactionError",
    "Conflict",
    "UnknownSession",
    "UnknownChargingPoint",
    "Repository",
    "Checkpoint",
    "EngineJournal",
    "CpRecord",
    "SessionRecord",
    "TicketRecord",
    "AuditRecord",
    "JournalEntry",
    "cents_from_eur",
]
