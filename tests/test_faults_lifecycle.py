"""Issue #10, session lifecycle, through real OS processes (supervisors.launcher.Network) and a
real broker: a slow CP link, Central SIGKILLed before the CP answered, ``stop all`` kept across
a Central restart, a completion the Engine republishes because it never saw its ticket.

Each scenario records a row of the fault matrix (tests/fault_matrix.py): 0 lost, 0 double-billed,
and nothing stuck (every CP free again, every driver with a definite answer, within a bound).
The slow link is ``faults.TcpProxy.slow_frames``: Central's frames reach the CP 3 s late (the
link's control bytes are not held, so the link stays up; see its docstring).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from persistence import EngineJournal, Repository
from supervisors.launcher import Network, NetworkSpec
from tests import fault_matrix, faults
from tests.fakes import KafkaPeer
from tests.test_faults_crashes import assert_no_tracebacks, cp_state, spec, supplied_sessions, tickets_of
from tests.waiting import wait_until
from transport import protocol

pytestmark = pytest.mark.slow

SLOW_S = 3.0  # how late Central's frames reach the CP on the slow link


# --- helpers -------------------------------------------------------------------------------
@contextmanager
def network(sp: NetworkSpec, slow_link: bool = False) -> Iterator[tuple[Network, faults.TcpProxy]]:
    """A started network (drivers not started) whose Monitors reach Central through a proxy."""
    net = Network(sp)
    proxy = faults.TcpProxy(sp.host, net.central_port, name="central-proxy").start()
    for cp, _, _ in net.cps:
        net.spec.monitor_central[cp] = proxy.address
    try:
        net.start(with_drivers=False)
        assert net.wait_central_ready(), "Central's consumers did not join"
        wait_until(lambda: all(cp_state(net, cp) == "ACTIVE" for cp, _, _ in net.cps), timeout=20,
                   what="every CP ACTIVE")
        if slow_link:
            proxy.slow_frames(SLOW_S, "down")
        yield net, proxy
    finally:
        try:
            net.stop()
        finally:
            proxy.close()


def sessions(net: Network) -> list[dict[str, Any]]:
    """Every session row of Central's database (cancelled ones included)."""
    with sqlite3.connect(f"file:{net.db_path}?mode=ro", uri=True, timeout=5) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM sessions ORDER BY created_at")]


def journal(net: Network, cp: str, sid: str):
    with EngineJournal(net.run_dir / f"engine-{cp}.journal.db") as j:
        return j.get(sid), j.billed_at(sid)


def cp_free(net: Network, cp: str) -> bool:
    """ACTIVE at Central, no live session there, and the Engine supplies nothing (its journal)."""
    with Repository(net.db_path) as repo:
        live = repo.live_session_for_cp(cp)
    with EngineJournal(net.run_dir / f"engine-{cp}.journal.db") as j:
        supplying = j.unfinished()
    return cp_state(net, cp) == "ACTIVE" and live is None and not supplying


def driver_results(net: Network, driver: str) -> dict[str, Any] | None:
    path = net.run_dir / f"{driver}.results.json"
    return json.loads(path.read_text()) if path.exists() else None


def log_text(net: Network, name: str) -> str:
    path = net.run_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_consistent(net: Network, cp: str, driver: str) -> str:
    """The driver's final answer, the CP and the bill agree; returns what happened.

    Either the supply happened (authorised, a ticket, exactly one, with the energy the Engine
    journaled, the journal marked billed) or nothing was supplied (denied, no ticket, the CP free).
    """
    rows = [s for s in sessions(net) if s["driver_id"] == driver and s["cp_id"] == cp]
    assert rows, "Central opened no session"
    results = driver_results(net, driver)
    assert results is not None, "the driver wrote no results"
    (service,) = results["services"]
    supplied = [s for s in rows if s["started_at"] is not None or s["status"] == "completed"]
    if supplied:
        (s,) = supplied
        sid = s["session_id"]
        (t,) = tickets_of(net, sid)
        entry, billed_at = journal(net, cp, sid)
        assert entry is not None and t.energy_kwh == pytest.approx(entry.energy_kwh), (t, entry)
        assert billed_at is not None, "the Engine never saw the ticket"
        assert (service["outcome"], service["session_id"]) == ("ticket", sid), service
        assert service["energy_kwh"] == pytest.approx(t.energy_kwh)
        for other in rows:
            if other["session_id"] != sid:
                assert other["status"] == "cancelled" and not tickets_of(net, other["session_id"]), other
        outcome = "supplied"
    else:
        assert all(s["status"] == "cancelled" for s in rows), rows
        assert not any(tickets_of(net, s["session_id"]) for s in rows)
        assert service["outcome"] == "denied", service
        outcome = "denied"
    assert cp_free(net, cp)
    return outcome


# --- (a) a slow CP link -----------------------------------------------------------------
def test_slow_cp_link_answer_cp_state_and_bill_agree(tmp_path, broker) -> None:
    """Central's frames reach the CP 3 s late (its authorize_supply, cancel_supply, session_billed),
    the Engine plugs in by itself, Central's authorize timeout is its default (5 s). A driver asks
    for a supply: its final answer, the CP's state and the bill agree (supplied and billed once,
    or denied with the CP free and no ticket), and the CP is free again within a bound."""
    sp = spec(tmp_path, broker, supply_seconds=4)
    with network(sp, slow_link=True) as (net, proxy):
        asked = time.monotonic()
        net.start_driver("driver1")
        wait_until(lambda: not net.alive("driver:driver1"), timeout=45, interval=0.1,
                   what="the driver's final answer")
        wait_until(lambda: cp_free(net, "MAD1") and all(journal(net, "MAD1", s)[1] for s in supplied_sessions(net)),
                   timeout=30, interval=0.2, what="MAD1 free and every supply's ticket seen by the Engine")
        recover = time.monotonic() - asked
        outcome = assert_consistent(net, "MAD1", "driver1")
        assert proxy.stats["bytes_down"] > 0
        if outcome == "supplied":  # the CP heard the order only after the slow link's delay
            assert "authorised for driver driver1" in log_text(net, "engine-MAD1")
        row = fault_matrix.billing_row(f"10 slow CP link {SLOW_S:g} s ({outcome})", str(net.db_path),
                                       supplied_sessions(net), recover)
        assert row.lost == 0 and row.double_billed == 0
        assert_no_tracebacks(net)


# --- (b) Central killed before the CP answered ----------------------------------------------
def test_central_killed_before_the_cp_answered(tmp_path, broker) -> None:
    """Central opens the session and sends authorize_supply, which the slow link holds 3 s;
    Central is SIGKILLed while it waits for the answer (session row 'authorized', never
    supplied), then restarted. The CP gets the order after Central died. After the restart the
    reloaded session is resolved: the CP's heartbeat shows it (confirmed, supplied, billed once)
    or not (cancelled, no bill); the CP is free within the deadline and the driver has a
    definite answer (a ticket, or denied)."""
    sp = spec(tmp_path, broker, supply_seconds=4, extra_driver=["--request-timeout", "60"])
    with network(sp, slow_link=True) as (net, _proxy):
        net.start_driver("driver1")

        def opened() -> dict[str, Any] | None:
            rows = sessions(net)
            return rows[0] if rows and rows[0]["status"] == "authorized" and rows[0]["started_at"] is None else None

        s = wait_until(opened, timeout=30, interval=0.01, what="the session row, before the CP answered")
        net.kill("central")
        with Repository(net.db_path) as repo:
            at_kill = repo.get_session(s["session_id"])
        assert at_kill is not None and at_kill.status == "authorized" and at_kill.started_at is None
        restarted = time.monotonic()
        net.restart("central")
        wait_until(lambda: not net.alive("driver:driver1"), timeout=60, interval=0.1,
                   what="the driver's final answer")
        wait_until(lambda: cp_free(net, "MAD1") and all(journal(net, "MAD1", x)[1] for x in supplied_sessions(net)),
                   timeout=30, interval=0.2, what="MAD1 free and every supply's ticket seen by the Engine")
        recover = time.monotonic() - restarted
        outcome = assert_consistent(net, "MAD1", "driver1")
        row = fault_matrix.billing_row(f"10 central killed before CP answer ({outcome})", str(net.db_path),
                                       supplied_sessions(net), recover)
        assert row.lost == 0 and row.double_billed == 0
        assert_no_tracebacks(net)


# --- (c) stop all, then a Central restart ----------------------------------------------------
def test_stop_all_is_kept_across_a_central_restart(tmp_path, broker) -> None:
    """``stop all`` typed at Central's console while one CP supplies: that supply ends and is
    billed once, every CP is STOPPED. Central is SIGKILLed and restarted: every CP registers
    again and stays STOPPED (past the Monitor's stop_confirm), a charge request is denied, and
    ``resume all`` on the new Central's console makes them ACTIVE again."""
    sp = spec(tmp_path, broker, cps=2, supply_seconds=30, central_console=True)
    with network(sp) as (net, _proxy):
        cps = [cp for cp, _, _ in net.cps]
        net.start_driver("driver1")
        s = wait_until(lambda: next((x for x in sessions(net) if x["started_at"] is not None), None), timeout=30,
                       interval=0.05, what="a supply")
        net.central_command("stop all")
        wait_until(lambda: tickets_of(net, s["session_id"]), timeout=20, what="the stopped supply billed")
        wait_until(lambda: all(cp_state(net, cp) == "STOPPED" for cp in cps), timeout=15, what="every CP STOPPED")
        net.kill("central")
        restarted = time.monotonic()
        net.restart("central")
        assert net.wait_central_ready(), "the restarted Central's consumers did not join"
        wait_until(lambda: all(cp_state(net, cp) == "STOPPED" for cp in cps), timeout=20,
                   what="every CP registered again, STOPPED")
        recover = time.monotonic() - restarted
        # the Monitor resumes by itself if Central does not repeat the stop within stop_confirm (2 s)
        until = time.monotonic() + 5
        while time.monotonic() < until:
            states = {cp: cp_state(net, cp) for cp in cps}
            assert set(states.values()) == {"STOPPED"}, states
            time.sleep(0.2)
        peer = KafkaPeer.of(net)
        try:
            corr = uuid.uuid4().hex
            peer.send("driver_requests", "probe", protocol.ChargeRequest(driver_id="probe", cp_id=cps[1],
                                                                         correlation_id=corr))
            r = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr, timeout=20)[0]
            assert (r.status, r.reason) == ("denied", f"CP {cps[1]} is STOPPED"), r
        finally:
            peer.close()
        for cp in cps:
            with EngineJournal(net.run_dir / f"engine-{cp}.journal.db") as j:
                assert not j.unfinished(), f"{cp} still supplies"
        (t,) = tickets_of(net, s["session_id"])
        assert t.end_reason == "central_stop", t
        net.central_command("resume all")
        wait_until(lambda: all(cp_state(net, cp) == "ACTIVE" for cp in cps), timeout=15, what="every CP resumed")
        row = fault_matrix.billing_row("10 stop all + central restart", str(net.db_path), supplied_sessions(net),
                                       recover)
        assert row.lost == 0 and row.double_billed == 0
        assert_no_tracebacks(net)


# --- (d) a completion republished because the Engine never saw its ticket ----------------------
def test_completion_republished_when_the_ticket_never_reached_the_engine_is_billed_once(tmp_path, broker) -> None:
    """The Monitor↔Central link is cut mid-supply: the supply ends, its completion (Kafka) is
    billed, but ``session_billed`` cannot reach the Engine. The Engine republishes the
    completion (republish_after 4 s here); Central replays it: still one ticket. Once the link
    is back the Engine learns the ticket (billing_query) and its journal ends billed."""
    sp = spec(tmp_path, broker, supply_seconds=5,
              extra_engine=["--billing-check", "1", "--republish-after", "4"])
    with network(sp) as (net, proxy):
        net.start_driver("driver1")
        s = wait_until(lambda: next((x for x in sessions(net) if x["started_at"] is not None), None), timeout=30,
                       interval=0.05, what="a supply")
        sid = s["session_id"]
        proxy.cut("reset")
        cut = time.monotonic()
        try:
            (t,) = wait_until(lambda: tickets_of(net, sid), timeout=30, what="the ticket, from the completion")
            assert journal(net, "MAD1", sid)[1] is None  # the Engine has not seen it
            engine_log = net.run_dir / "engine-MAD1.log"
            wait_until(lambda: f"no ticket from Central for supply {sid}" in engine_log.read_text(errors="replace"),
                       timeout=20, what="the Engine republishes its completion")
            with faults.TopicTool(net.bootstrap, net.spec.topic_prefix) as tool:
                wait_until(lambda: len([c for c in tool.decoded("charging_session_complete", protocol.ChargeCompletion,
                                                                        db_path=net.db_path)
                                        if c.session_id == sid]) >= 2, timeout=15, what="the completion twice in Kafka")
                wait_until(lambda: tool.group_caught_up(net.spec.topic_prefix + "evcharging-central-sessions",
                                                        ("charging_session_data", "charging_session_complete")),
                           timeout=20, interval=0.3, what="Central consumed the republished completion")
            assert [x.ticket_id for x in tickets_of(net, sid)] == [t.ticket_id]
            assert journal(net, "MAD1", sid)[1] is None  # still cut: the Engine could not hear about it
        finally:
            proxy.restore()
        restored = time.monotonic()
        wait_until(lambda: journal(net, "MAD1", sid)[1] is not None, timeout=20,
                   what="the Engine's journal marks the supply billed")
        wait_until(lambda: cp_free(net, "MAD1"), timeout=15, what="MAD1 free")
        recover = time.monotonic() - restored
        entry, _ = journal(net, "MAD1", sid)
        assert entry.status == "published" and entry.energy_kwh == pytest.approx(t.energy_kwh)
        (t2,) = tickets_of(net, sid)
        assert (t2.ticket_id, t2.energy_kwh, t2.cost_cents) == (t.ticket_id, t.energy_kwh, t.cost_cents)
        wait_until(lambda: not net.alive("driver:driver1"), timeout=30, what="the driver got its ticket")
        results = driver_results(net, "driver1")
        assert results is not None and results["services"][0]["outcome"] == "ticket", results
        assert time.monotonic() - cut < 60
        row = fault_matrix.billing_row("10 completion republished", str(net.db_path), supplied_sessions(net), recover)
        assert row.lost == 0 and row.double_billed == 0
        assert_no_tracebacks(net)


def test_slow_frames_proxy_holds_frames_not_control_bytes() -> None:
    """The toolkit: frames are held, control bytes pass at once (fast, no network)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got: list[tuple[float, bytes]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(bytes([0x06]) + bytes([0x02]) + b'{"x":1}' + bytes([0x03, 0x7A]))

    threading.Thread(target=serve, daemon=True).start()
    with faults.TcpProxy("127.0.0.1", server.getsockname()[1]) as proxy:
        proxy.slow_frames(0.6, "down")
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            while sum(len(b) for _, b in got) < 11:
                data = c.recv(100)
                if not data:
                    break
                got.append((time.monotonic() - start, data))
    server.close()
    assert got[0][1][:1] == bytes([0x06]) and got[0][0] < 0.4
    assert b"".join(b for _, b in got) == bytes([0x06, 0x02]) + b'{"x":1}' + bytes([0x03, 0x7A])
    assert got[-1][0] >= 0.55

