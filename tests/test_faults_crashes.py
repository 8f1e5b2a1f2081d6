"""Failure injection, part 1: components SIGKILLed mid-supply (SPEC §3), and a crash storm.

Every component is a real OS process started by supervisors.launcher.Network;
"killed" means SIGKILL (no cleanup at all). Each scenario records a row of
the fault matrix (tests/fault_matrix.py) printed at the end of the run.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from persistence import EngineJournal, Repository
from supervisors.launcher import Network, NetworkSpec, python_cmd
from tests import fault_matrix
from tests.fakes import KafkaPeer
from tests.waiting import wait_until
from transport import protocol
from transport.broker import free_port

pytestmark = pytest.mark.slow


# --- reading Central's database from outside ------------------------------------
def cp_state(net: Network, cp_id: str) -> str | None:
    with Repository(net.db_path) as repo:
        cp = repo.get_cp(cp_id)
    return cp.state if cp else None


def live_session(net: Network, cp_id: str):
    with Repository(net.db_path) as repo:
        return repo.live_session_for_cp(cp_id)


def tickets_of(net: Network, session_id: str) -> list:
    with Repository(net.db_path) as repo:
        return [t for t in repo.tickets() if t.session_id == session_id]


def supplied_sessions(net: Network) -> list[str]:
    """Every session that reached the plug-in (or completed): each must end in exactly one ticket."""
    with Repository(net.db_path) as repo:
        sessions = [repo.get_session(t.session_id) for t in repo.tickets()] + repo.live_sessions()
    return sorted({s.session_id for s in sessions if s and (s.started_at or s.status == "completed")})


def supplying(net: Network, cp_id: str, min_kwh: float = 0.0):
    """The live session of ``cp_id`` once Central saw it supply at least ``min_kwh``."""
    s = live_session(net, cp_id)
    supplying = s and s.status == "supplying" and s.energy_kwh > min_kwh and cp_state(net, cp_id) == "SUPPLYING"
    return s if supplying else None


def pid(net: Network, name: str) -> int:
    return net.procs[name].popen.pid


def assert_no_tracebacks(net: Network) -> None:
    """Users see sentences, never tracebacks, in every program's terminal output."""
    for proc in net.procs.values():
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        assert "Traceback" not in text, f"{proc.name} printed a traceback:\n{text[-3000:]}"


def spec(tmp_path: Path, broker, **kw) -> NetworkSpec:
    base = dict(run_dir=tmp_path / "run", cps=1, drivers=1, services=1, broker=broker.bootstrap,
                topic_prefix=f"f{uuid.uuid4().hex[:6]}.", supply_seconds=30, plug_delay=0.2, pause=0.5,
                panel="off", tick=0.5, power_kw=50.0)
    base.update(kw)
    return NetworkSpec(**base)


# --- scenarios ---------------------------------------------------------------------
def test_monitor_killed_mid_supply(tmp_path, broker) -> None:
    """Central shows DISCONNECTED within the life timeout; the supply ends with exactly one
    ticket; the CP takes nothing until its Monitor is back; the Monitor alone restores it."""
    with Network(spec(tmp_path, broker)) as net:
        s = wait_until(lambda: supplying(net, "MAD1", 0.001), timeout=40, what="MAD1 supplying")
        others = (pid(net, "central"), pid(net, "engine:MAD1"))
        killed = time.monotonic()
        net.kill("monitor:MAD1")
        wait_until(lambda: cp_state(net, "MAD1") == "DISCONNECTED", timeout=net.spec.life_timeout + 2)
        detected = time.monotonic() - killed
        assert detected <= net.spec.life_timeout + 1.5
        tickets = wait_until(lambda: tickets_of(net, s.session_id), timeout=20, what="the ticket")
        assert len(tickets) == 1 and tickets[0].end_reason == "monitor_lost" and tickets[0].energy_kwh > 0
        # no supply while the Monitor is away
        peer = KafkaPeer.of(net)
        try:
            corr = uuid.uuid4().hex
            peer.send("driver_requests", "probe", protocol.ChargeRequest(driver_id="probe", cp_id="MAD1",
                                                                         correlation_id=corr))
            r = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == corr)[0]
            assert r.status == "denied" and r.reason == "CP MAD1 is DISCONNECTED"
        finally:
            peer.close()
        restarted = time.monotonic()
        net.restart("monitor:MAD1")
        wait_until(lambda: cp_state(net, "MAD1") == "ACTIVE", timeout=15, what="ACTIVE after the Monitor's restart")
        recover = time.monotonic() - restarted
        assert (pid(net, "central"), pid(net, "engine:MAD1")) == others  # nothing else was restarted
        assert len(tickets_of(net, s.session_id)) == 1
        fault_matrix.billing_row("1 monitor killed mid-supply", str(net.db_path), supplied_sessions(net), recover)
        assert_no_tracebacks(net)


def test_engine_killed_mid_supply(tmp_path, broker) -> None:
    """BROKEN and the driver is told; the restarted Engine reports the supply from its
    journal; exactly one ticket with the energy supplied up to the crash."""
    with Network(spec(tmp_path, broker)) as net:
        s = wait_until(lambda: supplying(net, "MAD1", 0.005), timeout=40, what="MAD1 supplying")
        net.kill("engine:MAD1")
        seen_by_central = live_session(net, "MAD1").energy_kwh
        wait_until(lambda: cp_state(net, "MAD1") == "BROKEN", timeout=8, what="BROKEN after the Engine died")
        driver_log = net.procs["driver:driver1"].log_path
        wait_until(lambda: "fault" in driver_log.read_text(errors="replace").lower(), timeout=10,
                   what="the driver is told about the fault")
        with EngineJournal(net.run_dir / "engine-MAD1.journal.db") as journal:
            at_crash = journal.get(s.session_id)
        assert at_crash is not None and at_crash.status == "supplying"
        assert at_crash.energy_kwh >= seen_by_central  # the journal is never behind what Central saw
        restarted = time.monotonic()
        net.restart("engine:MAD1")
        tickets = wait_until(lambda: tickets_of(net, s.session_id), timeout=20, what="the recovered ticket")
        wait_until(lambda: cp_state(net, "MAD1") == "ACTIVE", timeout=15)
        recover = time.monotonic() - restarted
        t = tickets[0]
        assert len(tickets) == 1 and t.end_reason == "engine_recovered"
        assert t.energy_kwh == pytest.approx(at_crash.energy_kwh)
        one_tick_kwh = net.spec.power_kw * net.spec.tick / 3600
        assert at_crash.energy_kwh - seen_by_central <= 2 * one_tick_kwh + 1e-9
        wait_until(lambda: not net.alive("driver:driver1"), timeout=20, what="the driver got its ticket and finished")
        fault_matrix.billing_row("2 engine killed mid-supply", str(net.db_path), supplied_sessions(net), recover)
        assert_no_tracebacks(net)


def test_driver_killed_mid_supply(tmp_path, broker) -> None:
    """The supply goes on; the restarted driver shows its live supply, then its ticket."""
    with Network(spec(tmp_path, broker, supply_seconds=8)) as net:
        s = wait_until(lambda: supplying(net, "MAD1", 0.001), timeout=40, what="MAD1 supplying")
        net.kill("driver:driver1")
        before = live_session(net, "MAD1").energy_kwh
        wait_until(lambda: (x := live_session(net, "MAD1")) is None or x.energy_kwh > before, timeout=10,
                   what="telemetry continues without the driver")
        restarted = time.monotonic()
        # the driver comes back in interactive mode (no services file): it only says hello
        cmd = python_cmd("driver", net.bootstrap, "driver1", "--topic-prefix", net.spec.topic_prefix,
                         "--no-console", "--request-timeout", "5")
        proc = net._spawn("driver:driver1-again", cmd)
        log = proc.log_path

        def shown() -> bool:
            text = log.read_text(errors="replace")
            return "You are charging at MAD1" in text or f"Ticket for {s.session_id}" in text

        wait_until(shown, timeout=15, what="the restarted driver shows its supply or its ticket")
        recover = time.monotonic() - restarted
        wait_until(lambda: f"Ticket for {s.session_id}" in log.read_text(errors="replace"), timeout=30,
                   what="the ticket reaches the restarted driver")
        assert len(tickets_of(net, s.session_id)) == 1
        fault_matrix.billing_row("3 driver killed mid-supply", str(net.db_path), supplied_sessions(net), recover)
        assert_no_tracebacks(net)


def test_central_killed_mid_supply(tmp_path, broker) -> None:
    """CPs finish their supplies without Central and take nothing new; drivers asking meanwhile
    hear that Central is unavailable; on return every supply is billed exactly once."""
    sp = spec(tmp_path, broker, cps=3, drivers=3, services=2, supply_seconds=6,
              extra_driver=["--request-timeout", "3"])
    with Network(sp) as net:
        cps = [cp for cp, _, _ in net.cps]
        first: dict[str, str] = {}

        def all_seen_supplying() -> bool:  # polled together: a busy machine must not miss a short supply
            for cp in cps:
                if cp not in first and (s := supplying(net, cp)) is not None:
                    first[cp] = s.session_id
            return len(first) == len(cps)

        wait_until(all_seen_supplying, timeout=60, interval=0.1, what="every CP supplying")
        net.kill("central")
        killed = time.monotonic()
        # a driver asking now is told Central is unavailable
        probe = net._spawn("driver:probe", python_cmd(
            "driver", net.bootstrap, "probe", "--topic-prefix", net.spec.topic_prefix, "--no-console",
            "--request-timeout", "2", "--services", str(net.services_file("probe", 0)), "--exit-when-done",
            "--pause", "0.2"))
        wait_until(lambda: "Central is unavailable" in probe.log_path.read_text(errors="replace"), timeout=20,
                   what="the probe driver hears that Central is unavailable")
        # the CPs finish on their own: each Engine's completion is durable in Kafka
        for cp in cps:
            with EngineJournal(net.run_dir / f"engine-{cp}.journal.db") as j:
                wait_until(lambda j=j, cp=cp: (e := j.get(first[cp])) is not None and e.status == "published",
                           timeout=20, what=f"{cp} finished and published its completion")
        assert time.monotonic() - killed < 30
        restarted = time.monotonic()
        net.restart("central")
        for cp in cps:
            wait_until(lambda cp=cp: tickets_of(net, first[cp]), timeout=30, what=f"ticket of {first[cp]}")
        recover = time.monotonic() - restarted
        wait_until(lambda: not [d for d in net.drivers_running() if d != "driver:probe"], timeout=90,
                   what="every driver finished its services")
        summary = net.summary()
        for name in ("driver1", "driver2", "driver3"):
            results = summary["drivers"][name]["services"]
            assert results[0]["outcome"] == "ticket" and results[0]["session_id"] in first.values(), results
        for cp in cps:
            assert len(tickets_of(net, first[cp])) == 1
        wait_until(lambda: all(cp_state(net, cp) == "ACTIVE" for cp in cps), timeout=15)
        row = fault_matrix.billing_row("4 central killed mid-supply", str(net.db_path), supplied_sessions(net),
                                       recover)
        assert row.lost == 0 and row.double_billed == 0
        assert_no_tracebacks(net)


def test_crash_storm_escalates_with_a_readable_line(tmp_path, broker) -> None:
    """An Engine whose Monitor port is taken: its listener crashes at every start; the
    supervisor backs off, gives up after its restart intensity, and the program exits 1
    with one sentence saying why."""
    port = free_port()
    with __import__("socket").socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "supervisors.cli", "engine", broker.bootstrap, "--listen", f"127.0.0.1:{port}",
             "--journal", str(tmp_path / "j.db"), "--no-console", "--cp-id", "STORM1"],
            capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"Cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "so the supervisor gives up" in proc.stderr
    restarts = proc.stderr.count("; restarting it")
    assert restarts >= 3
    fault_matrix.record("8 crash storm (port taken)", 0, 0, 0, 0, 0, None)
    assert took < 90
