"""OCPP gateway at scale (issue #13): N simulated OCPP 1.6J chargers (default 200) charging through EV_OCPP.

Four processes on loopback, each measured from outside:

1. a Tansu broker (memory storage);
2. Central (this module run as ``python -m bench.ocpp central``): ``start_central`` with security on
   (``--enroll registry``: the chargers are registered in its database with their verifiers, as the
   registry does) and the instrumented panel of ``bench.central_proc`` (``PanelProbe``);
3. the gateway, the EV_OCPP program itself (``python -m supervisors.ocpp_system``), security profile 1:
   each charger logs in to Central with its secret, its records are sealed;
4. the chargers: ``python -m supervisors.ocpp_sim`` (the ``ocpp`` library's client, one asyncio loop),
   each with a charge of its own running (Authorize + StartTransaction, then one MeterValues a second).

Each register reads ``(now - t0) × 7.4 kW`` from a transaction started at 0 Wh, so the energy Central's
panel shows tells when the charger sent that reading (``bench.simcp.sent_at``): the **meter-value-to-panel
lag** is the time the panel received a snapshot minus the time the charger sent the MeterValues it shows
(through the gateway, sealed telemetry on Kafka, Central's pump, router, session and panel; the panel
refreshes every 0.5 s, which is half of the median). Once every charger charges and Central shows all of
them SUPPLYING, a window of ``--window`` s: the **gateway's CPU** (utime + stime over the window / wall
time; 100 % = one core), its **RSS** and threads (sampled every second), the lag (p50/p95/p99), and the
time all N chargers took to be admitted (each one's login: an Argon2id verifier from its password at the
gateway, Central's challenge, a fresh key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Report,
    Row,
    machine,
    proc_cpu_seconds,
    proc_status,
    python_module_cmd,
    quiet_logging,
    run_dir,
    start_broker,
    thread_names,
    topics,
)
from bench.procs import Child
from bench.simcp import POWER_KW

TARGET_LAG = 1.0


def central_role(argv: list[str]) -> int:
    """Central with security on and the instrumented panel; prints ``ready PORT``; commands on stdin
    like bench.central_proc (``mark``, ``dump PATH``, ``quit``)."""
    from bench.central_proc import ProbeLag, ProbeMark, ProbeWindow, make_probe

    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--t0", type=float, required=True)
    p.add_argument("--log-file", default=None)
    p.add_argument("--deadline", type=float, default=900.0)
    args = p.parse_args(argv)

    import supervisors.central_system as central_system
    from supervisors.central_system import CentralSystemConfig, start_central
    from transport.listener import ListenerPort

    quiet_logging(Path(args.log_file) if args.log_file else None)
    central_system.PanelActor = make_probe(args.t0)  # type: ignore[attr-defined]
    system = start_central(CentralSystemConfig(
        enroll="registry", port=0, broker=args.broker, db_path=args.db, host=LOOPBACK, topic_prefix=args.topic_prefix,
        panel="off", console=False, group_id="bench-ocpp-central", auth_failures=1000))
    print(f"ready {system.ask('monitor-listener', ListenerPort())}", flush=True)
    done = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd == "lag":
                print(f"lag {system.ask('panel', ProbeLag(), timeout=10)}", flush=True)
            elif cmd == "mark":
                system.ask("panel", ProbeMark(), timeout=10)
                print("marked", flush=True)
            elif cmd.startswith("dump "):
                data = system.ask("panel", ProbeWindow(), timeout=10)
                data["thread_names"] = thread_names()
                Path(cmd.split(" ", 1)[1]).write_text(json.dumps(data), encoding="utf-8")
                print("dumped", flush=True)
            elif cmd == "states":
                data = system.ask("panel", ProbeWindow(), timeout=10)
                print(f"states {json.dumps(data['states_now'])}", flush=True)
        done.set()

    threading.Thread(target=commands, daemon=True).start()
    done.wait(args.deadline)
    system.stop()
    return 0


def register(db: Path, creds: Path, ids: list[str]) -> None:
    """The chargers in Central's database (with their verifiers) and their credential files (0600)."""
    from persistence import Repository
    from transport import security

    creds.mkdir(parents=True, exist_ok=True)
    with Repository(db) as repo:
        for cp in ids:
            secret = security.new_secret()
            repo.upsert_cp(cp, f"OCPP bench {cp}", 0.30, max_power_kw=350)
            repo.register("cp", cp, security.verifier("cp", cp, secret))
            path = creds / f"cp-{cp}.json"
            path.write_text(json.dumps({"kind": "cp", "id": cp, "secret": secret}), encoding="utf-8")
            path.chmod(0o600)


def latest(child: Child) -> dict[str, Any]:
    """The child's newest JSON status line (the older ones, unread, are skipped)."""
    while child.expect(lambda line: line.startswith("{"), 0.05) is not None:
        pass
    return child.last


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> Report:
    report = Report("ocpp")
    rd = run_dir("ocpp")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    n = args.chargers
    ids = [f"OCB{i:04d}" for i in range(1, n + 1)]
    broker = start_broker(rd)
    prefix = "ocpp."
    settings = topics(broker, prefix)
    t0 = time.time()
    register(rd / "central.db", rd / "credentials", ids)
    central = Child("central", python_module_cmd(
        "bench.ocpp", "central", "--broker", settings.bootstrap, "--db", str(rd / "central.db"), "--topic-prefix",
        prefix, "--t0", repr(t0), "--log-file", str(rd / "central.log")), rd / "central.stderr")
    gateway = sim = None
    out: dict[str, Any] = {"chargers": n}
    try:
        ready = central.expect(lambda line: line.startswith("ready "), 90)
        if ready is None:
            raise RuntimeError(f"Central did not start (see {rd / 'central.log'})")
        gw_port = free_port()
        gateway = Child("gateway", python_module_cmd(
            "supervisors.ocpp_system", f"{LOOPBACK}:{ready.split()[1]}", settings.bootstrap, "--listen",
            f"{LOOPBACK}:{gw_port}", "--journal", str(rd / "ocpp.journal"), "--topic-prefix", prefix,
            "--max-chargers", str(n + 10), "--log-file", str(rd / "gateway.log"), "--log-level", "WARNING"),
            rd / "gateway.stderr")
        time.sleep(2.0)
        idle = proc_status(gateway.pid)
        out["gateway_idle_rss_mb"], out["gateway_idle_threads"] = idle["VmRSS"], idle["Threads"]
        began = time.monotonic()
        sim = Child("sim", python_module_cmd(
            "supervisors.ocpp_sim", f"ws://{LOOPBACK}:{gw_port}/ocpp", "--count", str(n), "--prefix", "OCB",
            "--credential-dir", str(rd / "credentials"), "--auto-start", "d", "--t0", repr(t0), "--power-kw",
            str(POWER_KW), "--meter-interval", "1", "--stats-every", "1", "--ramp", str(args.ramp),
            "--log-file", str(rd / "sim.log"), "--log-level", "WARNING"), rd / "sim.stderr")
        connected = sim.wait_status(lambda s: s.get("connected", 0) >= n, args.ramp_timeout)
        out["all_connected_after_s"] = time.monotonic() - began if connected else None
        charging = sim.wait_status(lambda s: s.get("charging", 0) >= n, args.ramp_timeout)
        out["all_charging_after_s"] = time.monotonic() - began if charging else None
        out["ramp_status"] = dict(sim.last)
        # settle: the ramp leaves a backlog behind (chargers queue their messages while the gateway is busy
        # with logins); the window starts once the median lag of the last 2 s is under 1 s twice in a row
        settle_start, calm = time.monotonic(), 0
        time.sleep(args.settle)
        while time.monotonic() - settle_start < args.settle_max and calm < 2:
            central.send("lag")
            line = central.expect(lambda line: line.startswith("lag "), 10)
            calm = calm + 1 if line and float(line.split()[1]) < 1.0 else 0
            time.sleep(1.0)
        out["settled_after_s"], out["settled"] = time.monotonic() - settle_start, calm >= 2
        central.send("mark")
        central.expect(lambda line: line == "marked", 10)
        latest(sim)
        cpu0, sim0, central0 = (proc_cpu_seconds(gateway.pid), proc_cpu_seconds(sim.pid),
                                proc_cpu_seconds(central.pid))
        meters0 = int(sim.last.get("meter_values", 0))
        start = time.monotonic()
        rss, threads = [], []
        while time.monotonic() - start < args.window:
            st = proc_status(gateway.pid)
            rss.append(st["VmRSS"])
            threads.append(st["Threads"])
            time.sleep(1.0)
        elapsed = time.monotonic() - start
        cpu = proc_cpu_seconds(gateway.pid) - cpu0
        sim_cpu, central_cpu = proc_cpu_seconds(sim.pid) - sim0, proc_cpu_seconds(central.pid) - central0
        latest(sim)
        meters = int(sim.last.get("meter_values", 0)) - meters0
        central.send(f"dump {rd / 'panel.json'}")
        central.expect(lambda line: line == "dumped", 15)
        panel = json.loads((rd / "panel.json").read_text(encoding="utf-8"))
        panel.pop("thread_names", None)
        out.update(window_s=elapsed, gateway_cpu_pct=100 * cpu / elapsed, gateway_rss_mb_max=max(rss),
                   gateway_threads_max=max(threads), sim_cpu_pct=100 * sim_cpu / elapsed,
                   central_cpu_pct=100 * central_cpu / elapsed, meter_values_per_s=meters / elapsed, panel=panel,
                   sim_status=dict(sim.last))
    finally:
        for child in (sim, gateway):
            if child is not None:
                child.stop()
        central.stop()
        broker.stop()
    report.details["run"] = out
    report.details["run"].get("panel", {}).pop("thread_names", None)
    lag95 = out.get("panel", {}).get("lag_p95_s")
    report.details["loadavg_at_end"] = os.getloadavg()
    report.add(Row(f"OCPP gateway CPU, {n} chargers charging", out.get("gateway_cpu_pct"), "%",
                   note="one core = 100 %; utime+stime of EV_OCPP over the window"
                        + ("" if out.get("settled", True) else "; the lag had NOT settled when the window began")))
    report.add(Row(f"OCPP gateway RSS, {n} chargers", out.get("gateway_rss_mb_max"), "MB",
                   baseline=out.get("gateway_idle_rss_mb"), note="baseline: the gateway idle, before any charger"))
    report.add(Row(f"OCPP meter-value-to-panel lag p95, {n} chargers", lag95, "s", target=f"≤ {TARGET_LAG:g} s",
                   met=None if lag95 is None else lag95 <= TARGET_LAG,
                   note="charger sends MeterValues → Central's panel shows it (0.5 s panel refresh included)"))
    report.add(Row(f"OCPP {n} chargers admitted (login + boot)", out.get("all_connected_after_s"), "s",
                   note=f"paced at {args.ramp:g} connections/s; each login: Argon2id verifier + challenge + key"))
    report.add(Row("OCPP meter values through the gateway", out.get("meter_values_per_s"), "/s"))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "central":
        return central_role(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--chargers", type=int, default=200)
    p.add_argument("--window", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after every charger charges, before the window")
    p.add_argument("--settle-max", type=float, default=90.0, help="at most this long for the lag to settle")
    p.add_argument("--ramp", type=float, default=20.0, help="chargers connecting per second")
    p.add_argument("--ramp-timeout", type=float, default=180.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = run(args)
    report.dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
