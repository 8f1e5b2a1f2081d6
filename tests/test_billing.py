"""Issue #10 (items 3, 5, 6, 7) at the repository: Central's own bill, rejected
completions, stored charge-request answers, durable operator stops, migration 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from persistence import (
    MIGRATIONS,
    BillingRejected,
    Repository,
    UnknownChargingPoint,
    bill_cents,
    migrate,
    open_database,
)


class Clock:
    """A settable clock: billing time is Central's, so tests choose it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(tmp_path: Path, clock: Clock):
    r = Repository(tmp_path / "central.db", clock=clock)
    r.upsert_cp("CP1", "Alicante", 0.30)
    r.upsert_cp("CP2", "Elche", 0.45, max_power_kw=11)
    yield r
    r.close()


def audit_events(repo: Repository) -> list[tuple[str, str, str]]:
    return [(a.subject, a.event, a.detail) for a in reversed(repo.recent_audit(100))]


# ------------------------------------------------------------------ rounding
@pytest.mark.parametrize(("kwh", "price", "cents"), [
    (1.005, 1.0, 101),      # 100.5 cents: half up, binary noise ignored (1.005 * 100 == 100.4999...)
    (0.125, 1.0, 13),       # half up, not half to even (12.5 → 13)
    (0.0125, 1.0, 1),       # 1.25 cents → 1
    (0.035, 1.0, 4),        # 3.5 cents → 4 (half to even would give 4 too; 0.045 checks the other side)
    (0.045, 1.0, 5),        # 4.5 cents → 5 (half to even: 4)
    (2.5, 0.30, 75),
    (1.6, 0.40, 64),
    (0.001, 0.40, 0),       # 0.04 cents
    (3.3333333, 0.15, 50),  # 49.999999 cents → 50: the product is rounded once
    (1.75, 0.33, 58),       # 57.75 → 58
    (0.0, 0.50, 0),
])
def test_bill_cents_rounds_the_product_once_half_up(kwh: float, price: float, cents: int) -> None:
    assert bill_cents(kwh, price) == cents


def test_rounding_once_differs_from_rounding_the_energy_first() -> None:
    # 0.0125 kWh × 0.40 €/kWh = 0.5 cent → 1 cent; rounding the energy to 0.01 kWh first would bill 0
    assert bill_cents(0.0125, 0.40) == 1
    assert bill_cents(0.0123456, 40.5) == 50  # 49.99968 cents → 50


# ------------------------------------------------------------- central's bill
def test_central_bills_energy_times_the_price_agreed_at_open(repo: Repository, clock: Clock) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=900.0)
    repo.upsert_cp("CP1", "Alicante", 0.99)  # a price change after authorisation does not apply
    ticket, created = repo.complete_session("S1", 2.5, 9999.0, "unplugged", 990.0, "ACTIVE",
                                            cp_id="CP1", driver_id="D1")
    assert created
    assert (ticket.energy_kwh, ticket.cost_eur, ticket.cost_cents, ticket.price_eur_kwh) == (2.5, 0.75, 75, 0.30)
    assert (ticket.reported_energy_kwh, ticket.reported_cost_eur, ticket.review) == (2.5, 9999.0, None)
    (subject, event, detail), = audit_events(repo)
    assert (subject, event) == ("CP1", "cost_mismatch") and "9999.0000 EUR" in detail and "0.75 EUR" in detail
    s = repo.get_session("S1")
    assert (s.status, s.energy_kwh, s.cost_eur, s.review) == ("completed", 2.5, 0.75, None)


def test_a_cost_within_a_cent_of_rounding_is_not_audited(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=900.0)
    ticket, _ = repo.complete_session("S1", 1.001, 0.3003, "unplugged", 990.0)  # the Engine did not round
    assert ticket.cost_cents == 30
    assert audit_events(repo) == []


@pytest.mark.parametrize(("cp_id", "driver_id", "kind"), [("CP2", "D1", "cp_mismatch"),
                                                          ("CP1", "D9", "driver_mismatch")])
def test_a_completion_naming_another_cp_or_driver_is_rejected(repo: Repository, cp_id: str, driver_id: str,
                                                              kind: str) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=900.0)
    with pytest.raises(BillingRejected) as info:
        repo.complete_session("S1", 1.0, 0.30, "unplugged", 990.0, "ACTIVE", "m-1", "t",
                              cp_id=cp_id, driver_id=driver_id)
    assert info.value.kind == kind
    assert repo.get_session("S1").status == "authorized" and repo.tickets() == []
    # ... also once the session is billed (it is still not that CP's or driver's)
    repo.complete_session("S1", 1.0, 0.30, "unplugged", 990.0, cp_id="CP1", driver_id="D1")
    with pytest.raises(BillingRejected):
        repo.complete_session("S1", 1.0, 0.30, "unplugged", 990.0, cp_id=cp_id, driver_id=driver_id)


def test_a_completion_below_the_metered_energy_is_rejected(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=900.0)
    repo.checkpoint_many([("S1", 3, 1.5, 0.45)])
    with pytest.raises(BillingRejected) as info:  # a forgery: 0.001 kWh after 1.5 kWh metered
        repo.complete_session("S1", 0.001, 9999.0, "unplugged", 990.0, cp_id="CP1", driver_id="D1")
    assert info.value.kind == "below_metered"
    with pytest.raises(BillingRejected):  # the session actor's newer figure counts too
        repo.complete_session("S1", 1.6, 0.48, "unplugged", 990.0, metered_kwh=1.7)
    ticket, created = repo.complete_session("S1", 1.6, 0.48, "unplugged", 990.0, metered_kwh=1.6)
    assert created and ticket.cost_cents == 48


def test_energy_beyond_the_cps_power_is_flagged_and_not_billed(repo: Repository, clock: Clock) -> None:
    # CP2: 11 kW. Opened at 900, billed at 1000: at most 11 kW × 110 s (with 10 s slack) = 0.3361 kWh
    repo.open_session("S1", "CP2", "D1", 0.45, at=900.0)
    ticket, _ = repo.complete_session("S1", 50.0, 22.5, "unplugged", 1000.0)
    plausible = 11 * 110 / 3600
    assert ticket.energy_kwh == pytest.approx(plausible) and ticket.cost_cents == bill_cents(plausible, 0.45) == 15
    assert ticket.reported_energy_kwh == 50.0 and "exceeds" in (ticket.review or "")
    assert repo.get_session("S1").review == ticket.review
    assert [e for _, e, _ in audit_events(repo)] == ["energy_review"]  # the cost matched the reported energy
    # a plausible one is billed as reported, no flag
    repo.open_session("S2", "CP1", "D2", 0.30, at=900.0)
    t2, _ = repo.complete_session("S2", 9.0, 2.70, "unplugged", 1000.0)  # 350 kW default
    assert (t2.energy_kwh, t2.review) == (9.0, None)


def test_charge_request_answers_are_stored_with_the_session_or_denial(repo: Repository) -> None:
    repo.open_session("S1", "CP1", "D1", 0.30, at=1.0, correlation_id="c-1")
    r = repo.charge_request("D1", "c-1")
    assert (r.status, r.session_id, r.cp_id) == ("pending", "S1", "CP1")
    assert repo.request_authorized("S1") is True
    assert repo.charge_request("D1", "c-1").status == "authorized"
    # cancelled later (the CP vanished before plug-in): the first answer stays 'authorized'
    repo.cancel_session("S1", "CP vanished", at=2.0)
    assert repo.charge_request("D1", "c-1").status == "authorized"
    # cancelled before the CP answered: denied, with the reason the driver is told
    repo.open_session("S2", "CP1", "D1", 0.30, at=3.0, correlation_id="c-2")
    repo.cancel_session("S2", "CP CP1 did not answer within 5 s", at=4.0)
    r2 = repo.charge_request("D1", "c-2")
    assert (r2.status, r2.reason) == ("denied", "CP CP1 did not answer within 5 s")
    # a denial is stored once; recording another answer returns the first
    first = repo.record_denial("D2", "c-3", "CP1", "CP CP1 is busy", at=5.0)
    again = repo.record_denial("D2", "c-3", "CP1", "something else", at=6.0)
    assert first == again and again.reason == "CP CP1 is busy"
    assert repo.charge_request("D2", "other") is None
    # the same correlation id of another driver is another request
    repo.open_session("S3", "CP2", "D3", 0.45, at=7.0, correlation_id="c-3")
    assert repo.charge_request("D3", "c-3").status == "pending"


def test_a_session_and_its_request_are_one_transaction(repo: Repository) -> None:
    repo.record_denial("D1", "c-1", "CP1", "CP CP1 is busy", at=1.0)
    with pytest.raises(sqlite3.IntegrityError):  # the request exists: the session is not opened either
        repo.open_session("S1", "CP1", "D1", 0.30, at=2.0, correlation_id="c-1")
    assert repo.get_session("S1") is None


def test_operator_stops_are_durable(tmp_path: Path, repo: Repository) -> None:
    assert repo.set_cp_stopped(None, True) == 2
    assert repo.set_cp_stopped(["CP2"], False) == 1
    with pytest.raises(UnknownChargingPoint):
        repo.set_cp_stopped(["NOPE"], True)
    repo.upsert_cp("CP1", "Alicante", 0.31)  # an operator's price change keeps the stop
    repo.close()
    with Repository(tmp_path / "central.db") as again:
        assert {c.cp_id: c.stopped for c in again.list_cps()} == {"CP1": True, "CP2": False}
        assert again.get_cp("CP2").max_power_kw == 11 and again.get_cp("CP1").max_power_kw == 350
        assert again.enroll_cp("CP3", "x", 0.3).stopped is False


def test_central_database_commits_with_synchronous_full(repo: Repository, tmp_path: Path) -> None:
    assert repo._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Repository(tmp_path / "normal.db", durable=False) as normal:
        assert normal._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_migration_2_upgrades_a_version_1_database_with_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = open_database(path)
    try:
        migrate(conn, MIGRATIONS[:1])
        conn.execute("INSERT INTO charging_points (cp_id, location, price_eur_kwh) VALUES ('OLD1', 'x', 0.3)")
        conn.execute("INSERT INTO sessions (session_id, cp_id, driver_id, price_eur_kwh, status, created_at) "
                     "VALUES ('S0', 'OLD1', 'D0', 0.3, 'supplying', 1.0)")
    finally:
        conn.close()
    with Repository(path) as repo:
        cp = repo.get_cp("OLD1")
        assert (cp.max_power_kw, cp.stopped) == (350.0, False)
        assert repo.get_session("S0").review is None
        ticket, _ = repo.complete_session("S0", 1.0, 0.3, "unplugged", 2.0)
        assert ticket.cost_cents == 30
