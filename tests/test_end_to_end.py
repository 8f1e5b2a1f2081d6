"""The whole network as real OS processes: broker, Central, 3 CPs, 2 drivers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from persistence import Repository, bill_cents
from supervisors.launcher import Network, NetworkSpec
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def test_three_cps_two_drivers_every_service_ends_in_a_ticket_or_a_denial(tmp_path, broker) -> None:
    spec = NetworkSpec(run_dir=tmp_path / "run", cps=3, drivers=2, services=4, broker=broker.bootstrap,
                       topic_prefix="e2e.", supply_seconds=2, plug_delay=0.3, pause=0.5, panel="off", tick=0.5)
    seen: set[str] = set()

    def drivers_done() -> bool:
        with Repository(net.db_path) as repo:  # Central writes each CP state change
            seen.update(c.state for c in repo.list_cps())
        return not net.drivers_running()

    with Network(spec) as net:
        wait_until(drivers_done, timeout=180, interval=0.3, what="both drivers done")
        summary = net.summary()
        with Repository(net.db_path) as repo:
            states = {c.cp_id: c.state for c in repo.list_cps()}
            audit = repo.recent_audit(1000)
        run_dir = net.run_dir
        central_cmd = net.procs["central"].cmd
    # security was on (the default): every CP logged in with its credential, nothing was refused,
    # and no secret reached a log file or a command line
    assert "--enroll" in central_cmd and central_cmd[central_cmd.index("--enroll") + 1] == "registry"
    events = {(a.event, a.subject) for a in audit}
    assert {("login_ok", cp) for cp in states} <= events, sorted(events)
    assert not {e for e, _ in events} & {"login_failed", "frame_rejected", "record_rejected", "request_denied"}
    secrets = [json.loads(p.read_text())["secret"] for p in (run_dir / "credentials").glob("*.json")]
    assert len(secrets) == 3 + 2
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in (run_dir / "credentials").glob("*.json"))
    logs = b"".join(p.read_bytes() for p in run_dir.glob("*.log"))
    assert not [s for s in secrets if s.encode() in logs], "a secret reached a log file"
    results = summary["drivers"]
    assert set(results) == {"driver1", "driver2"}
    outcomes = [s for d in results.values() for s in d["services"]]
    assert len(outcomes) == 8
    for s in outcomes:
        assert s["outcome"] in ("ticket", "denied"), s
        if s["outcome"] == "denied":
            assert (s["reason"] and "CP" in s["reason"]) or "driver" in s["reason"], s
    tickets = summary["tickets"]
    driver_tickets = sorted(s["session_id"] for s in outcomes if s["outcome"] == "ticket")
    assert sorted(t["session_id"] for t in tickets) == driver_tickets  # one to one, nothing extra
    assert sorted(summary["completed_sessions"]) == driver_tickets
    assert len(tickets) >= 4
    for t in tickets:
        assert round(t["cost_eur"] * 100) == bill_cents(t["energy_kwh"], t["price_eur_kwh"])  # Central's rule
        assert t["energy_kwh"] > 0 and t["end_reason"] == "unplugged"
    assert set(states.values()) == {"ACTIVE"}  # idle, connected, healthy once the drivers are done
    assert {"SUPPLYING", "ACTIVE"} <= seen and "BROKEN" not in seen


def test_evcharging_up_until_idle_writes_a_summary(tmp_path, broker) -> None:
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "supervisors.cli", "evcharging", "up", "--broker", broker.bootstrap, "--cps", "2",
         "--drivers", "1", "--services", "2", "--supply-seconds", "1", "--pause", "0.2", "--until-idle",
         "--panel", "off", "--topic-prefix", "up.", "--run-dir", str(tmp_path / "run"), "--summary-json", str(out)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads(out.read_text())
    assert summary["totals"]["tickets"] == 2
    assert "Run finished: 2 tickets" in proc.stderr
