"""Persistence: the only package that writes SQL (stdlib ``sqlite3``).

Central's :class:`Repository` (sessions, tickets with the exactly-once
unique key, CP states, message dedupe, audit) and the Engine's
:class:`EngineJournal` (its live supply, so a restarted Engine can report
it). Each instance owns one connection used by one thread at a time.
"""

from persistence.db import MIGRATIONS, Migration, migrate, open_database, schema_version, transaction
from persistence.errors import (
    BillingRejected,
    Conflict,
    NestedTransactionError,
    PersistenceError,
    SchemaTooNew,
    UnknownChargingPoint,
    UnknownSession,
)
from persistence.journal import JOURNAL_MIGRATIONS, EngineJournal
from persistence.records import (
    DEFAULT_MAX_POWER_KW,
    LIVE_STATUSES,
    AuditRecord,
    ChargeRequestRecord,
    CpRecord,
    CredentialRecord,
    JournalEntry,
    KeyRecord,
    SessionRecord,
    TicketRecord,
    bill_cents,
    cents_from_eur,
)
from persistence.repository import Checkpoint, Repository
from persistence.trust import RegistryStore, TrustMixin

__all__ = [
    "RegistryStore",
    "TrustMixin",
    "CredentialRecord",
    "KeyRecord",
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
    "BillingRejected",
    "UnknownSession",
    "UnknownChargingPoint",
    "Repository",
    "Checkpoint",
    "EngineJournal",
    "CpRecord",
    "SessionRecord",
    "TicketRecord",
    "AuditRecord",
    "ChargeRequestRecord",
    "DEFAULT_MAX_POWER_KW",
    "JournalEntry",
    "cents_from_eur",
    "bill_cents",
]
