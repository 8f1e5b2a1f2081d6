"""The Engine's journal: life cycle, restart recovery, SIGKILL, speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from persistence import EngineJournal, JournalEntry, UnknownSession, open_database

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "engine-CP1.journal"


@pytest.fixture
def journal(journal_path: Path):
    j = EngineJournal(journal_path, clock=lambda: 500.0)
    yield j
    j.close()


def test_life_cycle(journal: EngineJournal) -> None:
    entry = journal.begin("S1", "CP1", "D1", 0.30, started_at=100.0)
    assert entry == JournalEntry(
        session_id="S1", cp_id="CP1", driver_id="D1", price_eur_kwh=0.30, status="supplying",
        started_at=100.0, last_seq=0, energy_kwh=0.0, cost_eur=0.0, updated_at=100.0,
        end_reason=None, ended_at=None, published_at=None,
    )  # fmt: skip
    assert journal.unfinished() == [entry]
    assert journal.unpublished() == []

    assert journal.update("S1", 1, 0.1, 0.03, at=101.0) is True
    assert journal.update("S1", 2, 0.2, 0.06, at=102.0) is True
    assert journal.update("S1", 2, 9.9, 9.9, at=103.0) is False  # duplicate seq
    assert journal.update("S1", 1, 0.1, 0.03, at=104.0) is False  # older seq
    e = journal.get("S1")
    assert (e.last_seq, e.energy_kwh, e.cost_eur, e.updated_at) == (2, 0.2, 0.06, 102.0)

    # begin again (a replayed start) never resets the totals
    assert journal.begin("S1", "CP1", "D1", 0.30, started_at=999.0).last_seq == 2

    finished = journal.finish("S1", "unplugged", ended_at=110.0)
    assert (finished.status, finished.end_reason, finished.ended_at) == ("ended", "unplugged", 110.0)
    assert (finished.energy_kwh, finished.cost_eur) == (0.2, 0.06)
    assert journal.unfinished() == []
    assert journal.unpublished() == [finished]
    assert journal.update("S1", 3, 0.3, 0.09, at=111.0) is False  # ended: frozen
    assert journal.finish("S1", "other", ended_at=120.0) == finished  # idempotent

    assert journal.mark_published("S1") is True
    assert journal.mark_published("S1") is False
    published = journal.get("S1")
    assert (published.status, published.published_at) == ("published", 500.0)
    assert journal.unpublished() == []
    assert journal.unfinished() == []


def test_unknown_sessions(journal: EngineJournal) -> None:
    assert journal.get("nope") is None
    assert journal.update("nope", 1, 0.1, 0.1, at=1.0) is False
    with pytest.raises(UnknownSession):
        journal.finish("nope", "x", ended_at=1.0)
    with pytest.raises(UnknownSession):
        journal.mark_published("nope")
    journal.begin("S1", "CP1", "D1", 0.3, started_at=1.0)
    assert journal.mark_published("S1") is False  # still supplying: not publishable


def test_unfinished_after_reopen(journal_path: Path) -> None:
    j = EngineJournal(journal_path)
    j.begin("S1", "CP1", "D1", 0.30, started_at=100.0)
    for seq in range(1, 11):
        j.update("S1", seq, seq * 0.01, seq * 0.003, at=100.0 + seq)
    j.begin("S0", "CP1", "D0", 0.30, started_at=50.0)
    j.finish("S0", "unplugged", ended_at=60.0)
    j.close()
    j.close()  # idempotent

    reopened = EngineJournal.open(journal_path)
    try:
        [unfinished] = reopened.unfinished()
        assert (unfinished.session_id, unfinished.last_seq) == ("S1", 10)
        assert unfinished.energy_kwh == pytest.approx(0.10)
        assert [e.session_id for e in reopened.unpublished()] == ["S0"]
        # The restarted Engine ends the interrupted supply and publishes it.
        ended = reopened.finish("S1", "engine restarted", ended_at=200.0)
        assert ended.status == "ended" and ended.last_seq == 10
        assert [e.session_id for e in reopened.unpublished()] == ["S0", "S1"]
    finally:
        reopened.close()


def test_journal_survives_sigkill_mid_supply(journal_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from persistence import EngineJournal
        j = EngineJournal(sys.argv[1])
        j.begin("S1", "CP1", "D1", 0.5, started_at=1.0)
        for seq in range(1, 51):
            j.update("S1", seq, seq * 0.1, seq * 0.05, at=1.0 + seq)
        print("supplying", flush=True)
        sys.stdin.readline()  # never returns: the parent kills us
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(journal_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=str(REPO_ROOT),
    )  # fmt: skip
    line = proc.stdout.readline()
    if "supplying" not in line:
        proc.kill()
        pytest.fail(f"child failed: {proc.communicate(timeout=10)[1]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    j = EngineJournal(journal_path)
    try:
        [entry] = j.unfinished()
        assert (entry.session_id, entry.last_seq) == ("S1", 50)
        assert entry.energy_kwh == pytest.approx(5.0) and entry.cost_eur == pytest.approx(2.5)
    finally:
        j.close()


def test_update_speed(journal: EngineJournal) -> None:
    journal.begin("S1", "CP1", "D1", 0.30, started_at=0.0)
    start = time.perf_counter()
    for seq in range(1, 1001):
        assert journal.update("S1", seq, seq * 0.001, seq * 0.0003, at=float(seq))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"1,000 journal updates took {elapsed:.2f} s"
    assert journal.get("S1").last_seq == 1000


def test_prune_published(journal: EngineJournal) -> None:
    journal.begin("S1", "CP1", "D1", 0.30, started_at=1.0)
    journal.finish("S1", "unplugged", ended_at=2.0)
    journal.mark_published("S1")  # published_at = 500.0 (fake clock)
    journal.begin("S2", "CP1", "D2", 0.30, started_at=3.0)
    assert journal.prune_published(before=400.0) == 0
    assert journal.prune_published(before=600.0) == 1
    assert journal.get("S1") is None
    assert journal.get("S2") is not None


def test_journal_file_settings(journal_path: Path, journal: EngineJournal) -> None:
    conn = open_database(journal_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,), (2,)]
    finally:
        conn.close()


def test_billed_life_cycle(journal: EngineJournal) -> None:
    """Version 2: a published completion stays unbilled until Central's session_billed."""
    journal.begin("S1", "CP1", "D1", 0.3, started_at=1.0)
    assert journal.mark_billed("S1") is False  # still supplying
    journal.update("S1", 1, 0.1, 0.03, at=2.0)
    journal.finish("S1", "unplugged", ended_at=3.0)
    assert journal.unbilled() == []  # not yet in Kafka: unpublished() covers it
    journal.mark_published("S1")
    assert [e.session_id for e in journal.unbilled()] == ["S1"]
    assert journal.billed_at("S1") is None
    assert journal.mark_billed("S1") is True
    assert journal.mark_billed("S1") is False
    assert journal.billed_at("S1") == 500.0
    assert journal.unbilled() == []
    # a ticket seen before the broker's ack: billed and nothing left to publish
    journal.begin("S2", "CP1", "D1", 0.3, started_at=4.0)
    journal.finish("S2", "unplugged", ended_at=5.0)
    assert journal.mark_billed("S2") is True
    assert journal.unpublished() == [] and journal.unbilled() == []
    assert journal.mark_billed("nope") is False


def test_discard_only_what_never_supplied(journal: EngineJournal) -> None:
    journal.begin("S1", "CP1", "D1", 0.3, started_at=1.0)
    assert journal.discard("S1") is True
    assert journal.get("S1") is None
    journal.begin("S2", "CP1", "D1", 0.3, started_at=1.0)
    journal.update("S2", 1, 0.1, 0.03, at=2.0)
    assert journal.discard("S2") is False  # energy flowed: it must be billed
    journal.finish("S2", "central_stop", ended_at=3.0)
    assert journal.discard("S2") is False
    assert journal.discard("nope") is False


def test_migrates_a_version_1_journal(journal_path: Path) -> None:
    """A journal written before version 2 keeps its rows; published ones count as unbilled."""
    import sqlite3

    from persistence.journal import _JOURNAL_V1
    conn = sqlite3.connect(journal_path)
    conn.executescript(_JOURNAL_V1 + """
        CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL);
        INSERT INTO schema_version VALUES (1, 'engine supply journal', 0);
        INSERT INTO supplies (session_id, cp_id, driver_id, price_eur_kwh, status, started_at, updated_at,
                              published_at) VALUES ('S0', 'CP1', 'D1', 0.3, 'published', 1, 1, 2);
    """)
    conn.close()
    with EngineJournal(journal_path) as j:
        assert [e.session_id for e in j.unbilled()] == ["S0"]
