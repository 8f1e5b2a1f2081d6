"""Issue #10 item 4: sessions that cannot get stuck (in-process Central, FakeMonitor, real broker).

Central's default reconcile grace (5 s) and completion wait (10 s) apply.
"""

from __future__ import annotations

import time

import pytest

from actors.central import CentralStatus, CloseSession
from persistence import Repository
from tests.test_central import active_monitor, charge, response
from tests.test_central import central as _central_system
from tests.waiting import wait_until
from transport import protocol


@pytest.fixture
def central(kafka_settings, tmp_path, request):
    """The same in-process Central as tests/test_central.py."""
    yield from _central_system.__wrapped__(kafka_settings, tmp_path, request)


def _beat_until(m, cond, held=None, timeout=20.0, what="condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m.send(protocol.Heartbeat(cp_id=m.cp_id, engine_ok=True, supplying_session_id=held))
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _session(central, sid):
    with Repository(central.db) as repo:
        return repo.get_session(sid), repo.get_ticket(sid)


def _accepted(central, m, driver="d1"):
    corr = charge(central, driver, m.cp_id)
    auth = m.expect(protocol.AuthorizeSupply)
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=True))
    assert response(central, corr).status == "authorized"
    return auth.session_id


def test_timeout_cancels_at_the_cp_and_a_late_accept_gets_cancelled_again(central) -> None:
    m = active_monitor(central, "MAD1")
    corr = charge(central, "d1", "MAD1")
    auth = m.expect(protocol.AuthorizeSupply)
    assert "did not answer" in response(central, corr).reason
    cancel = m.expect(protocol.CancelSupply, lambda c: c.session_id == auth.session_id)
    assert cancel.session_id == auth.session_id
    m.send(protocol.SupplyAuthorizationResponse(correlation_id=auth.correlation_id, session_id=auth.session_id,
                                                accepted=True))  # the late answer
    m.expect(protocol.CancelSupply, lambda c: c.session_id == auth.session_id)
    # repeated while the CP's heartbeat still shows it; confirmed by supply_ended
    for _ in range(6):  # ~3 s of heartbeats still holding it: Central repeats (stop_retry 2 s)
        m.send(protocol.Heartbeat(cp_id="MAD1", engine_ok=True, supplying_session_id=auth.session_id))
        time.sleep(0.5)
    m.expect(protocol.CancelSupply, lambda c: c.session_id == auth.session_id)
    m.send(protocol.SupplyEnded(cp_id="MAD1", session_id=auth.session_id, end_reason="central_stop",
                                energy_kwh=0.0, cost_eur=0.0))
    rec, ticket = _session(central, auth.session_id)
    assert rec.status == "cancelled" and ticket is None


def test_zombie_never_supplied_is_cancelled_after_the_grace(central) -> None:
    """(c) Central-live session whose CP reports idle: ended after the grace, no bill, CP free."""
    m = active_monitor(central, "MAD1")
    sid = _accepted(central, m)
    _beat_until(m, lambda: _session(central, sid)[0].status == "cancelled", held=None, what="the zombie cancelled")
    assert _session(central, sid)[1] is None
    assert central.ask("central", CentralStatus())["MAD1"]["session_id"] is None
    m.expect(protocol.CancelSupply, lambda c: c.session_id == sid)


def test_zombie_that_supplied_is_billed_from_the_cps_figures_when_no_completion_comes(central) -> None:
    m = active_monitor(central, "MAD1")
    sid = _accepted(central, m)
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=sid, driver_id="d1"))
    m.send(protocol.SupplyEnded(cp_id="MAD1", session_id=sid, end_reason="unplugged", driver_id="d1",
                                energy_kwh=1.25, cost_eur=0.5))
    # the completion record is lost: Central closes it with the supply_ended figures after completion_wait
    _beat_until(m, lambda: _session(central, sid)[1] is not None, held=None, timeout=30, what="the ticket")
    rec, ticket = _session(central, sid)
    assert rec.status == "completed" and (ticket.energy_kwh, ticket.cost_eur) == (1.25, 0.5)
    m.expect(protocol.SessionBilled, lambda b: b.session_id == sid)
    # the Engine's completion arriving later is a replay: still one ticket
    central.peer.send("charging_session_complete", "MAD1", protocol.ChargeCompletion(
        cp_id="MAD1", session_id=sid, driver_id="d1", energy_kwh=1.25, cost_eur=0.5, end_reason="unplugged"))
    time.sleep(2)
    with Repository(central.db) as repo:
        assert [t.session_id for t in repo.tickets()].count(sid) == 1


def test_stray_session_at_the_cp_is_stopped_and_flagged(central) -> None:
    m = active_monitor(central, "MAD1")
    for _ in range(14):  # 7 s > the 5 s reconcile grace
        m.send(protocol.Heartbeat(cp_id="MAD1", engine_ok=True, supplying_session_id="SGHOST"))
        time.sleep(0.5)
    assert m.expect(protocol.CancelSupply).session_id == "SGHOST"
    with Repository(central.db) as repo:
        assert any(a.event == "stray_session" for a in repo.recent_audit())


def test_operator_close_and_billing_query(central) -> None:
    """(e) ``close SESSION_ID``: audited; a session that supplied is billed (flagged for review)."""
    m = active_monitor(central, "MAD1")
    sid = _accepted(central, m)
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=sid, driver_id="d1"))
    central.peer.send("charging_session_data", "MAD1", protocol.ChargingData(
        cp_id="MAD1", session_id=sid, driver_id="d1", seq=1, energy_kwh=0.5, cost_eur=0.2, power_kw=7.4))
    wait_until(lambda: central.ask("central", CentralStatus())["MAD1"]["energy_kwh"] == 0.5)
    answer = central.ask("central", CloseSession(sid, who="test"))
    assert "closed and billed" in answer, answer
    m.expect(protocol.StopSupply, lambda s: s.session_id == sid)
    wait_until(lambda: _session(central, sid)[1] is not None, what="the ticket")
    assert _session(central, sid)[1].energy_kwh == 0.5
    with Repository(central.db) as repo:
        events = {a.event for a in repo.recent_audit()}
    assert {"operator_close", "session_review"} <= events
    m.send(protocol.BillingQuery(cp_id="MAD1", session_id=sid))
    m.expect(protocol.SessionBilled, lambda b: b.session_id == sid)
    assert central.ask("central", CloseSession("SNOPE")) == "no live session SNOPE"


def test_the_previous_sessions_final_figures_never_bill_the_next_one(central) -> None:
    """Review finding: S1's supply_ended figures stayed on the CP and closed S2 with them."""
    m = active_monitor(central, "MAD1")
    s1 = _accepted(central, m)
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=s1, driver_id="d1"))
    m.send(protocol.SupplyEnded(cp_id="MAD1", session_id=s1, end_reason="unplugged", driver_id="d1",
                                energy_kwh=0.5, cost_eur=0.2))
    central.peer.send("charging_session_complete", "MAD1", protocol.ChargeCompletion(
        cp_id="MAD1", session_id=s1, driver_id="d1", energy_kwh=0.5, cost_eur=0.2, end_reason="unplugged"))
    wait_until(lambda: _session(central, s1)[1] is not None, what="S1 billed")
    s2 = _accepted(central, m, driver="d2")
    m.send(protocol.SupplyStarted(cp_id="MAD1", session_id=s2, driver_id="d2"))
    # the CP holds S2 for longer than Central's completion wait (10 s): nothing closes it
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        m.send(protocol.Heartbeat(cp_id="MAD1", engine_ok=True, supplying_session_id=s2))
        time.sleep(0.5)
    rec, ticket = _session(central, s2)
    assert rec.status == "supplying" and ticket is None
    assert central.ask("central", CentralStatus())["MAD1"]["session_id"] == s2


def test_a_session_central_gave_up_on_but_the_cp_supplied_is_billed_for_review(central) -> None:
    """Central cancels on its own (the CP's answer came too late); the CP had accepted and
    supplied: what it supplied is billed once, flagged for review (not dead-lettered)."""
    m = active_monitor(central, "MAD1")
    corr = charge(central, "d1", "MAD1")
    auth = m.expect(protocol.AuthorizeSupply)
    assert "did not answer" in response(central, corr).reason  # authorize timeout (2 s here)
    late = protocol.ChargeCompletion(cp_id="MAD1", session_id=auth.session_id, driver_id="d1", energy_kwh=0.2,
                                     cost_eur=0.08, end_reason="central_stop")
    central.peer.send("charging_session_complete", "MAD1", late)
    wait_until(lambda: _session(central, auth.session_id)[1] is not None, what="the ticket")
    rec, ticket = _session(central, auth.session_id)
    assert rec.status == "completed" and ticket.energy_kwh == 0.2 and ticket.cost_cents == 8
    assert ticket.review and "supplied after Central cancelled it" in ticket.review
