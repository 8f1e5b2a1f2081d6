"""Central's persistence: migrations, transactions, the exactly-once ticket
key, one live session per driver/CP, and survival of SIGKILL.

Every test uses a real SQLite file under tmp_path (WAL needs a file).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from persistence import (
    MIGRATIONS,
    BillingRejected,
    Conflict,
    Migration,
    NestedTransactionError,
    PersistenceError,
    Repository,
    SchemaTooNew,
    UnknownChargingPoint,
    UnknownSession,
    cents_from_eur,
    migrate,
    open_database,
    schema_version,
    transaction,
)
from persistence.db import split_sql

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Deterministic timestamps: 1000.0, 1001.0, ..."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def processed(db_path: Path, message_id: str) -> bool:
    """Whether ``complete_session`` recorded the message id (read through its own connection)."""
    conn = open_database(db_path)
    try:
        row = conn.execute("SELECT 1 FROM processed_messages WHERE message_id = ?", (message_id,)).fetchone()
        return row is not None
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "central.db"


@pytest.fixture
def repo(db_path: Path):
    r = Repository(db_path, clock=FakeClock())
    r.upsert_cp("CP1", "Alicante", 0.30)
    r.upsert_cp("CP2", "Elche", 0.25)
    yield r
    r.close()


# ----------------------------------------------------------------- database


def test_open_database_settings(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert conn.isolation_level is None
    finally:
        conn.close()
    durable = open_database(db_path, durable=True)
    try:
        assert durable.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        durable.close()


def test_open_database_creates_parent_directories(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "run" / "deep" / "x.db")
    conn.close()
    assert (tmp_path / "run" / "deep" / "x.db").exists()


def test_migrations_are_idempotent_and_recorded(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        assert schema_version(conn) == 0
        latest = len(MIGRATIONS)
        assert migrate(conn) == latest >= 2
        assert migrate(conn) == latest
        rows = conn.execute("SELECT version, description, applied_at FROM schema_version").fetchall()
        assert [(v, d) for v, d, _ in rows] == [(m.version, m.description) for m in MIGRATIONS]
        assert rows[0][2] > 0
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"charging_points", "drivers", "sessions", "tickets", "processed_messages",
                "audit_log", "schema_version"} <= tables
    finally:
        conn.close()
    # Reopening through the repository applies nothing new.
    Repository(db_path).close()
    Repository(db_path).close()
    conn = open_database(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_newer_migration_is_applied_in_order(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        migrate(conn)
        n = len(MIGRATIONS) + 1
        extra = (*MIGRATIONS, Migration(n, "extra", "CREATE TABLE extra (x INTEGER); INSERT INTO extra VALUES (7);"))
        assert migrate(conn, extra) == n
        assert migrate(conn, extra) == n
        assert conn.execute("SELECT x FROM extra").fetchall() == [(7,)]
    finally:
        conn.close()


def test_failed_migration_leaves_nothing_behind(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        migrate(conn)
        bad = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "bad",
                                      "CREATE TABLE half (x); INSERT INTO missing VALUES (1);"))
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, bad)
        assert schema_version(conn) == len(MIGRATIONS)
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
        assert not conn.in_transaction
    finally:
        conn.close()


def test_schema_too_new_is_refused(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        n = len(MIGRATIONS)
        future = (*MIGRATIONS, Migration(n + 1, "from the future", "CREATE TABLE future (x);"))
        migrate(conn, future)
        with pytest.raises(SchemaTooNew) as info:
            migrate(conn)
        assert info.value.db_version == n + 1 and info.value.code_version == n
        assert f"schema version {n + 1}" in str(info.value) and f"up to {n}" in str(info.value)
        assert isinstance(info.value, PersistenceError)
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew):
        Repository(db_path)


def test_migration_versions_must_be_contiguous(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        with pytest.raises(ValueError):
            migrate(conn, (Migration(1, "a", "CREATE TABLE a (x);"), Migration(3, "c", "SELECT 1;")))
    finally:
        conn.close()


def test_split_sql_respects_strings_comments_and_triggers() -> None:
    script = """
        -- a comment; with a semicolon
        CREATE TABLE a (x TEXT DEFAULT ';');
        CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; SELECT 2; END;
        -- trailing comment
    """
    statements = split_sql(script)
    assert len(statements) == 2
    assert statements[0].endswith("DEFAULT ';');")
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    assert split_sql("SELECT 1; SELECT 2") == ["SELECT 1;", "SELECT 2;"]  # last ';' optional
    with pytest.raises(ValueError, match="Incomplete"):
        split_sql("CREATE TABLE a (x); INSERT INTO a VALUES ('unterminated")


def test_transaction_failing_half_way_leaves_nothing(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        migrate(conn)
        with pytest.raises(RuntimeError, match="half-way"):
            with transaction(conn):
                conn.execute("INSERT INTO charging_points (cp_id, location, price_eur_kwh) VALUES ('X', 'here', 1)")
                assert conn.execute("SELECT COUNT(*) FROM charging_points").fetchone()[0] == 1
                raise RuntimeError("failed half-way")
        assert not conn.in_transaction
        assert conn.execute("SELECT COUNT(*) FROM charging_points").fetchone()[0] == 0
        # A second connection (another process, say) never saw it either.
        other = open_database(db_path)
        assert other.execute("SELECT COUNT(*) FROM charging_points").fetchone()[0] == 0
        other.close()
        # And a successful one commits.
        with transaction(conn):
            conn.execute("INSERT INTO charging_points (cp_id, location, price_eur_kwh) VALUES ('Y', 'here', 1)")
        assert conn.execute("SELECT cp_id FROM charging_points").fetchall() == [("Y",)]
    finally:
        conn.close()


def test_nested_transaction_is_refused(db_path: Path) -> None:
    conn = open_database(db_path)
    try:
        migrate(conn)
        with transaction(conn):
            conn.execute("INSERT INTO drivers (driver_id) VALUES ('D1')")
            with pytest.raises(NestedTransactionError, match="nest"):
                with transaction(conn):
                    pass
        assert conn.execute("SELECT driver_id FROM drivers").fetchall() == [("D1",)]
    finally:
        conn.close()


# ------------------------------------------------------------ charging points


def test_cp_upsert_enroll_list_and_states(repo: Repository) -> None:
    assert repo.get_cp("CP1").price_eur_kwh == 0.30
    assert repo.get_cp("CP1").state == "DISCONNECTED"
    assert repo.get_cp("nope") is None

    repo.set_cp_state("CP1", "ACTIVE")
    updated = repo.upsert_cp("CP1", "Alicante centre", 0.35)
    assert updated.location == "Alicante centre" and updated.price_eur_kwh == 0.35
    assert updated.state == "ACTIVE"  # upsert keeps the state

    enrolled = repo.enroll_cp("CP0", "Murcia", 0.40)
    assert (enrolled.cp_id, enrolled.location, enrolled.price_eur_kwh) == ("CP0", "Murcia", 0.40)
    again = repo.enroll_cp("CP0", "somewhere else", 9.99)
    assert again == enrolled  # existing returned unchanged

    assert [cp.cp_id for cp in repo.list_cps()] == ["CP0", "CP1", "CP2"]
    assert repo.set_all_cp_states("DISCONNECTED") == 3
    assert {cp.state for cp in repo.list_cps()} == {"DISCONNECTED"}

    with pytest.raises(UnknownChargingPoint, match="CP9"):
        repo.set_cp_state("CP9", "ACTIVE")
    # Central's tick stores the states that changed, all in one commit; an id deleted meanwhile is skipped
    repo.set_cp_states({"CP0": "ACTIVE", "CP2": "SUPPLYING", "CP9": "BROKEN"})
    assert {cp.cp_id: cp.state for cp in repo.list_cps()} == {"CP0": "ACTIVE", "CP1": "DISCONNECTED",
                                                              "CP2": "SUPPLYING"}
    repo.set_cp_states({})
    with pytest.raises(ValueError):
        repo.upsert_cp("CP3", "x", -0.1)
    with pytest.raises(ValueError):
        repo.enroll_cp("CP3", "x", float("nan"))


# --------------------------------------------------------------- sessions


def test_open_session_and_lookups(repo: Repository) -> None:
    s = repo.open_session("S1", "CP1", "D1", 0.30, at=5.0)
    assert (s.status, s.created_at, s.last_seq, s.energy_kwh, s.cost_eur) == ("authorized", 5.0, 0, 0.0, 0.0)
    assert repo.get_session("S1") == s
    assert repo.live_session_for_driver("D1") == s
    assert repo.live_session_for_cp("CP1") == s
    assert repo.live_session_for_driver("D2") is None
    assert repo.get_session("nope") is None
    assert repo.stats()["drivers"] == 1  # open_session remembers the driver

    with pytest.raises(UnknownChargingPoint):
        repo.open_session("S2", "CP9", "D2", 0.30, at=6.0)


def test_driver_has_at_most_one_live_session(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    with pytest.raises(Conflict) as info:
        repo.open_session("S2", "CP2", "D1", 0.25, at=2.0)
    message = str(info.value)
    assert "Driver D1" in message and "S1" in message and "CP1" in message
    assert info.value.kind == "driver" and info.value.existing.session_id == "S1"
    assert repo.get_session("S2") is None


def test_cp_has_at_most_one_live_session(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.mark_supplying("S1", at=2.0)
    with pytest.raises(Conflict) as info:
        repo.open_session("S2", "CP1", "D2", 0.30, at=3.0)
    message = str(info.value)
    assert "Charging point CP1" in message and "S1" in message and "D1" in message
    assert "supplying" in message
    assert info.value.kind == "cp" and info.value.existing.driver_id == "D1"
    # A session id cannot be reused either.
    with pytest.raises(Conflict, match="Session id S1 is already used"):
        repo.open_session("S1", "CP2", "D3", 0.25, at=4.0)


def test_slot_is_free_again_after_the_session_ends(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    assert repo.cancel_session("S1", "denied by CP", at=2.0)
    repo.open_session("S2", "CP1", "D1", 0.30, at=3.0)
    repo.mark_supplying("S2", at=4.0)
    repo.complete_session("S2", 1.0, 0.30, "unplugged", 9.0, "ACTIVE")
    s3 = repo.open_session("S3", "CP1", "D1", 0.30, at=10.0)
    assert s3.status == "authorized"


def test_mark_supplying_transitions(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    assert repo.mark_supplying("S1", at=2.0) is True
    assert repo.mark_supplying("S1", at=3.0) is True  # replay: keeps first start
    s = repo.get_session("S1")
    assert (s.status, s.started_at) == ("supplying", 2.0)
    repo.complete_session("S1", 1.0, 0.3, "unplugged", 4.0)
    assert repo.mark_supplying("S1", at=5.0) is False
    assert repo.get_session("S1").status == "completed"
    with pytest.raises(UnknownSession):
        repo.mark_supplying("nope", at=1.0)


def test_checkpoint_only_moves_forward(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.mark_supplying("S1", at=2.0)
    assert repo.checkpoint_many([("S1", 5, 0.5, 0.15)]) == 1
    assert repo.checkpoint_many([("S1", 3, 0.3, 0.09)]) == 0  # lower seq: ignored
    assert repo.checkpoint_many([("S1", 5, 9.9, 9.9)]) == 0  # same seq: duplicate
    s = repo.get_session("S1")
    assert (s.last_seq, s.energy_kwh, s.cost_eur) == (5, 0.5, 0.15)
    assert repo.checkpoint_many([("S1", 6, 0.6, 0.18)]) == 1
    assert repo.get_session("S1").last_seq == 6
    assert repo.checkpoint_many([("nope", 1, 0.1, 0.1)]) == 0  # unknown: skipped

    # After completion the final figures are never overwritten.
    repo.complete_session("S1", 1.0, 0.30, "unplugged", 9.0)
    assert repo.checkpoint_many([("S1", 99, 50.0, 15.0)]) == 0
    s = repo.get_session("S1")
    assert (s.energy_kwh, s.cost_eur, s.last_seq) == (1.0, 0.30, 6)


def test_checkpoint_many_in_one_transaction(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.open_session("S2", "CP2", "D2", 0.25, at=1.0)
    applied = repo.checkpoint_many(
        [
            ("S1", 1, 0.1, 0.03),
            ("S2", 1, 0.2, 0.05),
            ("S1", 2, 0.2, 0.06),
            ("S1", 1, 0.1, 0.03),  # replay inside the batch: ignored
            ("stale", 4, 1.0, 1.0),  # unknown: skipped, batch survives
        ]
    )
    assert applied == 3
    assert (repo.get_session("S1").last_seq, repo.get_session("S1").energy_kwh) == (2, 0.2)
    assert repo.get_session("S2").last_seq == 1
    assert repo.checkpoint_many([]) == 0


def test_cancel_session(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    assert repo.cancel_session("S1", "CP vanished", at=2.0) is True
    s = repo.get_session("S1")
    assert (s.status, s.end_reason, s.ended_at) == ("cancelled", "CP vanished", 2.0)
    assert repo.cancel_session("S1", "again", at=3.0) is False
    assert repo.get_ticket("S1") is None

    # A supplying session is never cancelled: it must be billed.
    repo.open_session("S2", "CP1", "D1", 0.30, at=4.0)
    repo.mark_supplying("S2", at=5.0)
    assert repo.cancel_session("S2", "oops", at=6.0) is False
    assert repo.get_session("S2").status == "supplying"
    with pytest.raises(UnknownSession):
        repo.cancel_session("nope", "x", at=1.0)


def test_live_sessions_survive_a_restart(db_path: Path) -> None:
    repo = Repository(db_path)
    repo.upsert_cp("CP1", "a", 0.3)
    repo.upsert_cp("CP2", "b", 0.3)
    repo.upsert_cp("CP3", "c", 0.3)
    repo.open_session("S1", "CP1", "D1", 0.3, at=1.0)
    repo.open_session("S2", "CP2", "D2", 0.3, at=2.0)
    repo.mark_supplying("S2", at=3.0)
    repo.checkpoint_many([("S2", 7, 0.7, 0.21)])
    repo.open_session("S3", "CP3", "D3", 0.3, at=4.0)
    repo.complete_session("S3", 1.0, 0.3, "unplugged", 5.0, "ACTIVE")
    repo.close()
    repo.close()  # idempotent

    reopened = Repository.open(db_path)
    try:
        live = reopened.live_sessions()
        assert [(s.session_id, s.status) for s in live] == [("S1", "authorized"), ("S2", "supplying")]
        assert (live[1].last_seq, live[1].energy_kwh, live[1].cost_eur) == (7, 0.7, 0.21)
        assert reopened.get_ticket("S3").cost_cents == 30
        # Central start: everything DISCONNECTED until Monitors connect.
        reopened.set_all_cp_states("DISCONNECTED")
        assert {cp.state for cp in reopened.list_cps()} == {"DISCONNECTED"}
    finally:
        reopened.close()


# ------------------------------------------------------- exactly-once billing


def test_complete_session_is_exactly_once(repo: Repository, db_path: Path) -> None:
    repo.set_cp_state("CP1", "SUPPLYING")
    repo.open_session("S1", "CP1", "D1", 0.30, at=10.0)
    repo.mark_supplying("S1", at=11.0)
    ticket, created = repo.complete_session(
        "S1", 2.5, 0.75, "unplugged", 20.0, cp_state="ACTIVE", message_id="m-1", topic="charging_session_complete"
    )
    assert created is True
    assert (ticket.session_id, ticket.driver_id, ticket.cp_id) == ("S1", "D1", "CP1")
    assert (ticket.energy_kwh, ticket.cost_eur, ticket.cost_cents) == (2.5, 0.75, 75)
    assert (ticket.price_eur_kwh, ticket.started_at, ticket.ended_at) == (0.30, 11.0, 20.0)
    assert ticket.end_reason == "unplugged" and ticket.acked_at is None
    s = repo.get_session("S1")
    assert (s.status, s.energy_kwh, s.cost_eur, s.ended_at) == ("completed", 2.5, 0.75, 20.0)
    assert repo.get_cp("CP1").state == "ACTIVE"
    assert processed(db_path, "m-1")

    # The replay (Kafka delivers at least once) changes nothing.
    repo.set_cp_state("CP1", "BROKEN")
    again, created_again = repo.complete_session(
        "S1", 9.9, 9.99, "fault", 30.0, cp_state="ACTIVE", message_id="m-2", topic="t"
    )
    assert created_again is False
    assert again == ticket
    assert len(repo.tickets()) == 1
    assert repo.get_session("S1").energy_kwh == 2.5
    assert repo.get_cp("CP1").state == "BROKEN"
    assert not processed(db_path, "m-2")

    # The database itself refuses a second ticket for the same session.
    conn = open_database(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match=r"UNIQUE constraint failed: tickets\.session_id"):
            conn.execute(
                "INSERT INTO tickets (session_id, driver_id, cp_id, price_eur_kwh, energy_kwh, cost_eur, "
                "cost_cents, started_at, ended_at, end_reason, issued_at) "
                "VALUES ('S1', 'D1', 'CP1', 0.3, 2.5, 0.75, 75, 11.0, 20.0, 'unplugged', 21.0)"
            )
    finally:
        conn.close()
    assert len(repo.tickets()) == 1


def test_complete_session_is_one_transaction(repo: Repository, db_path: Path) -> None:
    """If the ticket insert fails, the session and CP state are untouched too."""
    repo.set_cp_state("CP1", "SUPPLYING")
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.mark_supplying("S1", at=2.0)
    conn = open_database(db_path)
    conn.execute("CREATE TRIGGER no_tickets BEFORE INSERT ON tickets BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    try:
        with pytest.raises(sqlite3.Error, match="disk says no"):
            repo.complete_session("S1", 1.0, 0.3, "unplugged", 3.0, "ACTIVE", "m-1", "t")
        s = repo.get_session("S1")
        assert (s.status, s.energy_kwh, s.ended_at) == ("supplying", 0.0, None)
        assert repo.get_cp("CP1").state == "SUPPLYING"
        assert not processed(db_path, "m-1")
        assert repo.tickets() == []
    finally:
        conn.execute("DROP TRIGGER no_tickets")
        conn.close()
    ticket, created = repo.complete_session("S1", 1.0, 0.3, "unplugged", 3.0, "ACTIVE", "m-1", "t")
    assert created and ticket.cost_cents == 30


def test_complete_unknown_session(repo: Repository, db_path: Path) -> None:
    with pytest.raises(UnknownSession, match="S404"):
        repo.complete_session("S404", 1.0, 0.3, "unplugged", 3.0, "ACTIVE", "m-1", "t")
    assert repo.tickets() == []
    assert not processed(db_path, "m-1")


def test_a_cancelled_session_is_never_billed(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.cancel_session("S1", "CP vanished before plug-in", at=2.0)
    with pytest.raises(BillingRejected) as info:
        repo.complete_session("S1", 0.4, 0.12, "engine recovered", 9.0, "ACTIVE")
    assert info.value.kind == "cancelled" and "CP vanished" in info.value.reason
    s = repo.get_session("S1")
    assert (s.status, s.end_reason) == ("cancelled", "CP vanished before plug-in")
    assert repo.tickets() == []


def test_concurrent_completions_bill_once(db_path: Path) -> None:
    """Two repositories (two actors or processes) race to bill one supply."""
    setup = Repository(db_path)
    setup.upsert_cp("CP1", "a", 0.3)
    setup.open_session("S1", "CP1", "D1", 0.3, at=1.0)
    setup.close()

    barrier = threading.Barrier(4)
    results: list[bool] = []
    errors: list[BaseException] = []

    def bill() -> None:
        r = Repository(db_path)
        try:
            barrier.wait()
            _, created = r.complete_session("S1", 1.0, 0.3, "unplugged", 5.0, "ACTIVE")
            results.append(created)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=bill) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [False, False, False, True]
    check = Repository(db_path)
    assert len(check.tickets()) == 1
    check.close()


def test_cents_rounding_half_up() -> None:
    assert cents_from_eur(0.125) == 13
    assert cents_from_eur(1.005) == 101  # round(1.005 * 100) would give 100
    assert cents_from_eur(2.675) == 268
    assert cents_from_eur(0.0) == 0
    assert cents_from_eur(12.3449) == 1234


def test_complete_session_rejects_non_finite_figures(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    with pytest.raises(ValueError):
        repo.complete_session("S1", float("nan"), 0.3, "unplugged", 3.0)
    assert repo.get_session("S1").status == "authorized"


# ----------------------------------------------------------------- tickets


def test_unacked_tickets_and_ack(db_path: Path, repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.complete_session("S1", 1.0, 0.30, "unplugged", 2.0)
    repo.open_session("S2", "CP2", "D2", 0.25, at=3.0)
    repo.complete_session("S2", 2.0, 0.50, "unplugged", 4.0)
    repo.open_session("S3", "CP1", "D1", 0.30, at=5.0)
    repo.complete_session("S3", 3.0, 0.90, "driver stop", 6.0)

    assert [t.session_id for t in repo.unacked_tickets("D1")] == ["S1", "S3"]
    assert repo.ack_ticket("D2", "S1") is False  # not D2's ticket
    assert repo.ack_ticket("D1", "S1") is True
    assert repo.ack_ticket("D1", "S1") is False  # already acknowledged
    assert repo.ack_ticket("D1", "nope") is False
    assert [t.session_id for t in repo.unacked_tickets("D1")] == ["S3"]
    assert repo.get_ticket("S1").acked_at is not None
    assert [t.session_id for t in repo.tickets()] == ["S1", "S2", "S3"]
    assert repo.get_ticket("nope") is None
    repo.close()

    # A driver coming back after a restart still gets what it missed.
    reopened = Repository(db_path)
    try:
        assert [t.session_id for t in reopened.unacked_tickets("D1")] == ["S3"]
        assert [t.session_id for t in reopened.unacked_tickets("D2")] == ["S2"]
    finally:
        reopened.close()


# ------------------------------------------------------------- audit, stats


def test_audit_log(repo: Repository) -> None:
    for i in range(5):
        repo.audit("central", f"CP{i}", "registered", detail=f"#{i}")
    repo.audit("central", "CP9", "denied")
    recent = repo.recent_audit(limit=3)
    assert [(a.subject, a.event, a.detail) for a in recent] == [
        ("CP9", "denied", ""),
        ("CP4", "registered", "#4"),
        ("CP3", "registered", "#3"),
    ]
    assert recent[0].at > recent[1].at
    assert len(repo.recent_audit()) == 6


def test_stats(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0)
    repo.complete_session("S1", 1.5, 0.45, "unplugged", 2.0)
    repo.open_session("S2", "CP1", "D2", 0.30, at=3.0)
    repo.cancel_session("S2", "denied", at=4.0)
    repo.open_session("S3", "CP2", "D3", 0.25, at=5.0)
    repo.mark_supplying("S3", at=6.0)
    repo.open_session("S4", "CP1", "D4", 0.30, at=7.0)
    stats = repo.stats()
    assert stats["charging_points"] == 2
    assert stats["drivers"] == 4
    assert stats["sessions"] == {"authorized": 1, "supplying": 1, "completed": 1, "cancelled": 1}
    assert stats["sessions_total"] == 4
    assert stats["tickets"] == 1 and stats["unacked_tickets"] == 1
    assert stats["energy_kwh"] == pytest.approx(1.5)
    assert stats["cost_eur"] == pytest.approx(0.45)
    assert stats["cost_cents"] == 45


def test_repository_created_in_one_thread_used_in_another(db_path: Path) -> None:
    repo = Repository(db_path)
    outcome: list[object] = []

    def actor_thread() -> None:
        try:
            repo.upsert_cp("CP1", "a", 0.3)
            outcome.append(repo.get_cp("CP1").cp_id)
        except BaseException as exc:  # pragma: no cover - reported below
            outcome.append(exc)

    t = threading.Thread(target=actor_thread)
    t.start()
    t.join(10)
    repo.close()
    assert outcome == ["CP1"]


# -------------------------------------------------------------- SIGKILL


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )


def _wait_for(proc: subprocess.Popen[str], marker: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if marker not in line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"child did not reach {marker!r}: stdout={line!r} stderr={err}")


def _sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_committed_ticket_survives_sigkill(db_path: Path) -> None:
    proc = _spawn(
        """
        import sys
        from persistence import Repository
        repo = Repository(sys.argv[1])
        repo.upsert_cp("CP1", "Alicante", 0.5)
        repo.open_session("S1", "CP1", "D1", 0.5, at=1.0)
        repo.mark_supplying("S1", at=2.0)
        repo.checkpoint_many([("S1", 3, 1.5, 0.75)])
        ticket, created = repo.complete_session(
            "S1", 2.0, 1.0, "unplugged", 10.0, "ACTIVE", "msg-1", "charging_session_complete")
        print("committed", ticket.ticket_id, created, flush=True)
        sys.stdin.readline()  # never returns: the parent kills us
        """,
        str(db_path),
    )
    _wait_for(proc, "committed 1 True")
    _sigkill(proc)
    # The commit sits in the WAL (never checkpointed into the main file).
    assert Path(f"{db_path}-wal").stat().st_size > 0

    repo = Repository(db_path)
    try:
        ticket = repo.get_ticket("S1")
        assert ticket is not None
        assert (ticket.energy_kwh, ticket.cost_eur, ticket.cost_cents) == (2.0, 1.0, 100)
        assert repo.get_session("S1").status == "completed"
        assert repo.get_cp("CP1").state == "ACTIVE"
        assert processed(db_path, "msg-1")
        # A replay after the restart is recognised by the ticket key.
        _, created = repo.complete_session("S1", 2.0, 1.0, "unplugged", 10.0, "ACTIVE", "msg-1", "t")
        assert created is False
        assert len(repo.tickets()) == 1
    finally:
        repo.close()


def test_transaction_in_progress_at_sigkill_leaves_nothing(db_path: Path) -> None:
    setup = Repository(db_path)
    setup.upsert_cp("CP1", "Alicante", 0.5)
    setup.set_cp_state("CP1", "ACTIVE")
    setup.audit("test", "CP1", "before")
    setup.close()

    proc = _spawn(
        """
        import sys
        from persistence import open_database, transaction
        conn = open_database(sys.argv[1])
        with transaction(conn):
            conn.execute("INSERT INTO charging_points (cp_id, location, price_eur_kwh) VALUES ('GHOST', 'x', 1)")
            conn.execute("UPDATE charging_points SET state = 'BROKEN' WHERE cp_id = 'CP1'")
            # Enough data to spill uncommitted pages into the WAL file.
            conn.executemany(
                "INSERT INTO audit_log (at, component, subject, event, detail) VALUES (?, 'c', 's', 'e', ?)",
                ((float(i), "x" * 1000) for i in range(5000)),
            )
            print("in flight", flush=True)
            sys.stdin.readline()  # never returns: the parent kills us
        """,
        str(db_path),
    )
    _wait_for(proc, "in flight")
    _sigkill(proc)

    repo = Repository(db_path)
    try:
        assert repo.get_cp("GHOST") is None
        assert repo.get_cp("CP1").state == "ACTIVE"
        assert [a.event for a in repo.recent_audit(limit=100)] == ["before"]
        # The dead writer's lock is gone: we can write at once.
        repo.set_cp_state("CP1", "DISCONNECTED")
        assert repo.get_cp("CP1").state == "DISCONNECTED"
    finally:
        repo.close()
