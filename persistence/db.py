"""SQLite connections, explicit transactions and versioned migrations.

Everything that touches ``sqlite3`` directly goes through this module so the
durability and locking settings are chosen once, on purpose:

* WAL journal: readers never block the single writer and a commit is one
  sequential append to the ``-wal`` file.
* ``isolation_level=None``: the ``sqlite3`` module never opens transactions
  behind our back; :func:`transaction` opens them explicitly.
* ``BEGIN IMMEDIATE``: the write lock is taken at the start, so two writers
  (two processes, or two repositories on the same file) serialise at BEGIN,
  waiting up to ``busy_timeout``, instead of failing later with
  "database is locked" half-way through a transaction.

Thread-safety: a connection is opened with ``check_same_thread=False`` so an
actor created in one thread and run in another may use it, but it must only
ever be used by one thread at a time (the actor that owns it).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, NamedTuple, Self

from persistence.errors import NestedTransactionError, PersistenceError, SchemaTooNew

__all__ = [
    "BUSY_TIMEOUT_MS",
    "Migration",
    "MIGRATIONS",
    "open_database",
    "transaction",
    "migrate",
    "schema_version",
    "split_sql",
]

#: How long a connection waits for another writer's lock before failing.
BUSY_TIMEOUT_MS: Final = 5000


class Migration(NamedTuple):
    """One schema step: applied once, in order, in its own transaction."""

    version: int
    description: str
    sql: str


_SCHEMA_V1: Final = """
CREATE TABLE charging_points (
    cp_id          TEXT PRIMARY KEY,
    location       TEXT NOT NULL,
    price_eur_kwh  REAL NOT NULL CHECK (price_eur_kwh >= 0),
    state          TEXT NOT NULL DEFAULT 'DISCONNECTED',
    updated_at     REAL
);

CREATE TABLE drivers (
    driver_id   TEXT PRIMARY KEY,
    first_seen  REAL
);

CREATE TABLE sessions (
    session_id     TEXT PRIMARY KEY,
    cp_id          TEXT NOT NULL REFERENCES charging_points (cp_id),
    driver_id      TEXT NOT NULL,
    price_eur_kwh  REAL NOT NULL,
    status         TEXT NOT NULL
                   CHECK (status IN ('authorized', 'supplying', 'completed', 'cancelled')),
    created_at     REAL NOT NULL,
    started_at     REAL,
    ended_at       REAL,
    last_seq       INTEGER NOT NULL DEFAULT 0,
    energy_kwh     REAL NOT NULL DEFAULT 0,
    cost_eur       REAL NOT NULL DEFAULT 0,
    end_reason     TEXT
);

-- At most one live session per driver and per CP, enforced by the database
-- itself so that no race between actors can ever authorise two supplies.
CREATE UNIQUE INDEX sessions_one_live_per_driver
    ON sessions (driver_id) WHERE status IN ('authorized', 'supplying');
CREATE UNIQUE INDEX sessions_one_live_per_cp
    ON sessions (cp_id) WHERE status IN ('authorized', 'supplying');
CREATE INDEX sessions_by_status ON sessions (status);

-- UNIQUE (session_id) is the exactly-once billing guarantee: a replayed
-- completion can never produce a second ticket for the same supply.
CREATE TABLE tickets (
    ticket_id      INTEGER PRIMARY KEY,
    session_id     TEXT NOT NULL UNIQUE REFERENCES sessions (session_id),
    driver_id      TEXT NOT NULL,
    cp_id          TEXT NOT NULL,
    price_eur_kwh  REAL NOT NULL,
    energy_kwh     REAL NOT NULL,
    cost_eur       REAL NOT NULL,
    cost_cents     INTEGER NOT NULL,
    started_at     REAL,
    ended_at       REAL,
    end_reason     TEXT,
    issued_at      REAL NOT NULL,
    acked_at       REAL
);
CREATE INDEX tickets_unacked_by_driver ON tickets (driver_id) WHERE acked_at IS NULL;

CREATE TABLE processed_messages (
    message_id    TEXT PRIMARY KEY,
    topic         TEXT,
    processed_at  REAL
);
CREATE INDEX processed_messages_by_time ON processed_messages (processed_at);

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    component  TEXT NOT NULL,
    subject    TEXT NOT NULL,
    event      TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
"""

# Issue #10: Central computes the bill (and flags implausible energy), answers a
# redelivered charge_request with its first answer, and remembers operator stops.
_SCHEMA_V2: Final = """
-- The most a CP can deliver: energy above max_power_kw over a session's duration
-- is flagged for review and not billed (see Repository.complete_session).
ALTER TABLE charging_points ADD COLUMN max_power_kw REAL NOT NULL DEFAULT 350
    CHECK (max_power_kw > 0);
-- The operator's stop/resume decision (1 = stopped), kept across Central restarts.
ALTER TABLE charging_points ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0 CHECK (stopped IN (0, 1));

-- Why a bill needs an operator's look (NULL: nothing to look at).
ALTER TABLE sessions ADD COLUMN review TEXT;
ALTER TABLE tickets ADD COLUMN review TEXT;
-- What the Engine reported; the ticket's energy/cost are Central's own figures.
ALTER TABLE tickets ADD COLUMN reported_energy_kwh REAL;
ALTER TABLE tickets ADD COLUMN reported_cost_eur REAL;

-- The first answer to each charge_request, written in the transaction that
-- opens its session (status 'pending' until the CP answers) or records its
-- denial: a redelivered request gets this answer again, never a new one.
CREATE TABLE charge_requests (
    driver_id       TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    cp_id           TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'authorized', 'denied')),
    session_id      TEXT REFERENCES sessions (session_id),
    reason          TEXT,
    at              REAL NOT NULL,
    PRIMARY KEY (driver_id, correlation_id)
);
CREATE INDEX charge_requests_by_session ON charge_requests (session_id) WHERE session_id IS NOT NULL;
"""

# Issue #10 (sessions that cannot get stuck): Central's own record of when it
# was up, so a charge request appended while it was down is recognised without
# trusting the producer's clock (see CentralActor._request_expired).
_SCHEMA_V3: Final = """
CREATE TABLE central_runs (
    run_id    INTEGER PRIMARY KEY,
    up_since  REAL NOT NULL,
    alive_at  REAL NOT NULL
);
"""

# Who cancelled a session: the CP itself (it refused: any completion for it is
# not the CP's) or Central on its own (timeout, link loss, operator: the CP may
# have accepted and supplied it, which is then billed, flagged for review).
_SCHEMA_V4: Final = """
ALTER TABLE sessions ADD COLUMN cancelled_by TEXT CHECK (cancelled_by IN ('cp', 'central'));
"""

# Issue #11 (trust boundary): the registry's credentials (only a slow hash of each
# secret), its change feed (how Central sees registrations without restarting),
# the CP keys Central issued, and who/from where/with what in the audit log.
_SCHEMA_V5: Final = """
CREATE TABLE credentials (
    kind             TEXT NOT NULL CHECK (kind IN ('cp', 'driver')),
    id               TEXT NOT NULL,
    verifier         BLOB NOT NULL,       -- Argon2id of the secret (transport/security.py)
    created_at       REAL NOT NULL,
    deregistered_at  REAL,                -- NULL: registered
    PRIMARY KEY (kind, id)
);

-- Append-only feed of registry changes; Central polls MAX(rev).
CREATE TABLE registry_changes (
    rev     INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    kind    TEXT NOT NULL,
    id      TEXT NOT NULL,
    change  TEXT NOT NULL CHECK (change IN ('registered', 'deregistered'))
);

-- Keys Central issued to CPs at each authentication (AES-256-GCM).
CREATE TABLE cp_keys (
    key_id     TEXT PRIMARY KEY,
    cp_id      TEXT NOT NULL,
    key        BLOB NOT NULL,
    issued_at  REAL NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('current', 'replaced', 'revoked')),
    ended_at   REAL,
    reason     TEXT
);
CREATE UNIQUE INDEX cp_keys_one_current ON cp_keys (cp_id) WHERE state = 'current';

ALTER TABLE audit_log ADD COLUMN address TEXT;   -- where it came from (host:port), when known
ALTER TABLE audit_log ADD COLUMN params TEXT;    -- JSON object of the event's parameters
"""

# Issue #12 (EV_W, the weather office): the locations EV_W watches and the last
# alert state of each, so a Central restart keeps an active weather alert (its
# CPs stay out of service). Temperatures between alert changes are not stored:
# EV_W reports them every few seconds.
_SCHEMA_V6: Final = """
CREATE TABLE weather_locations (
    key            TEXT PRIMARY KEY,     -- the location case-folded, trimmed (actors/weather_state.py)
    location       TEXT NOT NULL,        -- as first given, shown to people
    watched        INTEGER NOT NULL DEFAULT 0 CHECK (watched IN (0, 1)),
    alert          INTEGER NOT NULL DEFAULT 0 CHECK (alert IN (0, 1)),
    temperature_c  REAL,                 -- the reading that set the alert state
    updated_at     REAL                  -- when the alert state or the watch last changed
);
"""

#: Central's schema history. Append only: never edit an applied step.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "charging points, drivers, sessions, tickets, dedupe, audit", _SCHEMA_V1),
    Migration(2, "central bills (max power, review flags), charge request answers, durable stops", _SCHEMA_V2),
    Migration(3, "central runs: up since / alive at (Central's own record of its downtime)", _SCHEMA_V3),
    Migration(4, "who cancelled a session (the CP, or Central on its own)", _SCHEMA_V4),
    Migration(5, "trust boundary: credentials, registry changes, CP keys, audit address and params", _SCHEMA_V5),
    Migration(6, "weather: watched locations and the last alert state of each", _SCHEMA_V6),
)

_SCHEMA_VERSION_DDL: Final = """
CREATE TABLE IF NOT EXISTS schema_version (
    version      INTEGER PRIMARY KEY,
    description  TEXT NOT NULL,
    applied_at   REAL NOT NULL
)
"""


def open_database(path: str | Path, *, durable: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) an SQLite database configured for this project.

    Durability: in WAL mode with ``synchronous=NORMAL`` a committed
    transaction is in the WAL file (the OS page cache) when COMMIT returns,
    so it survives a crash of *our process* (SIGKILL, closed terminal) --
    the failures SPEC §3 is about. Only a crash of the operating system or
    a power cut may lose the last few commits (never corrupt the file),
    because the WAL is fsynced at checkpoints rather than at every commit.
    That trade buys an order of magnitude in commit latency. Pass
    ``durable=True`` for ``synchronous=FULL`` (fsync at every commit) when
    that last window matters too.

    The connection is in autocommit mode (``isolation_level=None``): use
    :func:`transaction` for anything that writes more than one statement.
    Parent directories are created. ``":memory:"`` is accepted (no WAL).
    """
    target = str(path)
    in_memory = target == ":memory:"
    if not in_memory:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        # Created private: Central's database holds the registry's verifiers (enough to log in
        # as any CP or driver) and the CP keys. An existing file keeps the mode its owner gave it
        # and is never opened here: closing any descriptor of a database file drops every POSIX
        # lock this process holds on it (SQLite's own connections' too), which lets another
        # process checkpoint and delete the WAL under them.
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
    conn = sqlite3.connect(
        target,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not in_memory:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise PersistenceError(
                    f"Cannot use write-ahead logging for {target} (SQLite answered "
                    f"journal_mode={mode}); put the database on a local file system."
                )
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open; never mask the real error."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block as one ``BEGIN IMMEDIATE`` transaction.

    Commits when the block ends normally; rolls back on *any* exception
    (including KeyboardInterrupt) and re-raises it, so a failure half-way
    leaves nothing behind. Nesting raises :class:`NestedTransactionError`
    because SQLite cannot nest transactions.
    """
    if conn.in_transaction:
        raise NestedTransactionError(
            "A transaction is already open on this connection; SQLite cannot "
            "nest transactions, so do the whole unit of work in one block."
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        _rollback_quietly(conn)
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise


def split_sql(script: str) -> list[str]:
    """Split an SQL script into complete statements.

    Needed because ``Connection.executescript`` commits any open transaction
    first, which would break "one migration, one transaction". Semicolons
    inside strings, comments and trigger bodies are handled by SQLite's own
    :func:`sqlite3.complete_statement`.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if _has_code(buffer):
                statements.append(buffer.strip())
            buffer = ""
    leftover = buffer[:-1]  # drop the ';' appended after the last piece
    if _has_code(leftover):
        raise ValueError(f"Incomplete SQL statement at the end of the script: {leftover.strip()!r}")
    return statements


def _has_code(sql: str) -> bool:
    """True when ``sql`` holds more than whitespace, semicolons and comments."""
    lines = (line.split("--", 1)[0] for line in sql.splitlines())
    return any(line.strip(" \t;") for line in lines)


def _validate(migrations: Sequence[Migration]) -> None:
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise ValueError(f"Migration versions must be 1..{len(migrations)} in order")


def schema_version(conn: sqlite3.Connection) -> int:
    """Highest applied migration version (0 for a fresh database)."""
    conn.execute(_SCHEMA_VERSION_DDL)
    (version,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(version)


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    clock: Callable[[], float] = time.time,
) -> int:
    """Apply the missing migrations in order, each in its own transaction.

    Idempotent: applied versions are recorded in ``schema_version`` and
    skipped, and each step re-checks the version under the write lock, so
    two processes migrating the same file at once apply each step once.
    Raises :class:`SchemaTooNew` when the database is ahead of the code.
    Returns the resulting schema version.
    """
    _validate(migrations)
    latest = len(migrations)
    current = schema_version(conn)
    if current > latest:
        raise SchemaTooNew(current, latest, _db_name(conn))
    for step in migrations[current:]:
        with transaction(conn):
            current = schema_version(conn)
            if current >= step.version:
                continue  # another process applied it meanwhile
            for statement in split_sql(step.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (step.version, step.description, clock()),
            )
    current = schema_version(conn)
    if current > latest:
        raise SchemaTooNew(current, latest, _db_name(conn))
    return current


def _db_name(conn: sqlite3.Connection) -> str:
    """File name of the main database, for error messages."""
    for _seq, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return str(file) if file else ":memory:"
    return ""


class SqliteStore:
    """One SQLite file opened and migrated, closed once: what Repository and
    EngineJournal share (a context manager; ``open`` is an alias of the constructor).

    ``durable`` (default :attr:`DURABLE`, True): ``synchronous=FULL``, an fsync at
    every commit, so a ticket, a charge-request answer or an operator's stop that
    was committed survives an OS crash or power cut too, not only a SIGKILL; the
    Engine's journal likewise, so after a power cut it is never behind the
    telemetry Central already saw (Central rejects a completion below that).
    Its cost is measured in ``bench/durability.py``. ``durable=False`` is NORMAL.
    """

    MIGRATIONS: Sequence[Migration] = ()
    DURABLE: bool = True

    def __init__(self, path: str | Path, *, durable: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = str(path)
        self._clock = clock
        self._closed = False
        self._conn = open_database(path, durable=self.DURABLE if durable is None else durable)
        try:
            migrate(self._conn, self.MIGRATIONS)
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, path: str | Path, *, durable: bool | None = None,
             clock: Callable[[], float] = time.time) -> Self:
        """Open (creating and migrating if needed) the database at ``path``."""
        return cls(path, durable=durable, clock=clock)

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    def close(self) -> None:
        """Close the connection; idempotent. Committed data is already durable."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        self._conn.close()  # later use raises sqlite3.ProgrammingError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
