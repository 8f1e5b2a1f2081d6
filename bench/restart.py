"""Restart and detection times: a supervised connection actor killed 100 times, Engine KO, lost Monitor.

Central is the real program in its own process (``python -m supervisors.cli
central``, default timings: life timeout 3 s; ``--enroll open``, the Monitors hold no credential). What Central believes is read
from its own database, where it writes the CP states that changed at the end of
each tick (every 0.1 s; polled every 5 ms, read-only), so a figure can include
up to 0.1 s of that.

1. Restart of a supervised connection actor. ``--monitors`` real Monitor
   systems (``start_monitor``, default timings) run in this process, each
   against a stand-in Engine that answers health checks (``bench.simcp.
   FakeEngine``). A kill is a crash of the Monitor's ``central-link``
   (a ``ClientLink``, a permanent child of the Monitor's supervisor): it is
   told to send something that is not a protocol message, raises
   ``TypeError`` in its own thread and dies as from any bug. Restart time =
   from the kill to the Monitor being registered with Central again through
   the replacement (new actor started after the supervisor's backoff, TCP
   connect, ENQ/ACK, ``register_request``/``register_response``). The 100
   kills go round-robin over the Monitors and the same Monitor is killed at
   most once per 10.5 s: the default restart intensity (5 restarts in 10 s)
   doubles the backoff for each restart inside its window, which the
   separate "storm" figure shows (one actor killed 5 times in a row).
2. Engine KO: ``--engines`` real Engines and Monitors (``start_engine`` /
   ``start_monitor``, default timings). KO reported: the ``k`` key of the
   Engine's console (``ConsoleLine("k")``) -> Central shows BROKEN. Engine
   gone: the Engine system is stopped (its socket closes; it answers no
   more health checks) -> Central shows BROKEN.
3. Lost Monitor: ``--engines`` EV_CP_M processes. Silent: SIGSTOP (a hung
   Monitor or a cut cable: no FIN, the life messages just stop) -> Central
   shows DISCONNECTED; then SIGCONT and back to ACTIVE, ``--rounds`` times.
   Killed: SIGKILL (the kernel closes the socket) -> DISCONNECTED.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Report,
    Row,
    bench_env,
    machine,
    python_module_cmd,
    quiet_logging,
    run_dir,
    start_broker,
    summary,
    topics,
)

TARGET_RESTART_P95_MS = 250.0
TARGET_KO_S = 2.0
TARGET_LOST_S = 3.0


class CentralDb:
    """Read-only view of Central's CP states."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def states(self) -> dict[str, str]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2)
        try:
            return dict(conn.execute("SELECT cp_id, state FROM charging_points").fetchall())
        except sqlite3.Error:
            return {}
        finally:
            conn.close()

    def wait(self, cps: list[str], cond: Callable[[str], bool], timeout: float,
             since: dict[str, float] | None = None) -> dict[str, float]:
        """Poll every 5 ms; for each CP the first time (perf_counter) ``cond(state)`` held."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(cps) and time.monotonic() < deadline:
            now = time.perf_counter()
            states = self.states()
            for cp in cps:
                if cp not in seen and cond(states.get(cp, "")):
                    seen[cp] = now
            time.sleep(0.005)
        if since is not None:
            return {cp: t - since[cp] for cp, t in seen.items()}
        return seen


def start_central(rd: Path, settings: Any, cps: list[str]) -> tuple[subprocess.Popen[bytes], int, CentralDb]:
    from persistence import Repository
    from transport.broker import free_port, wait_for_port

    db = rd / "central.db"
    with Repository(db) as repo:
        for cp in cps:
            repo.upsert_cp(cp, f"Site {cp}", 0.30)
    port = free_port(LOOPBACK)
    log = open(rd / "central.stderr", "ab")
    proc = subprocess.Popen(
        python_module_cmd("supervisors.cli", "central", str(port), settings.bootstrap, "--db", str(db), "--host",
                          LOOPBACK, "--topic-prefix", settings.topic_prefix, "--panel", "off", "--no-console",
                          # the Monitors here hold no credential: open enrolment, as in the other Central
                          # benchmarks (since #11 the default refused them, and every kill timed out)
                          "--enroll", "open",
                          "--log-file", str(rd / "central.log"), "--log-level", "WARNING"),
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=bench_env())
    if not wait_for_port(LOOPBACK, port, 30):
        proc.kill()
        raise RuntimeError(f"Central did not listen; see {rd / 'central.log'}")
    return proc, port, CentralDb(db)


# --- 1. restart of a supervised connection actor ---------------------------------------------
def registered(system: Any) -> bool:
    from actors.monitor import MonitorStatus

    try:
        return bool(system.ask("monitor", MonitorStatus(), timeout=2)["registered"])
    except Exception:
        return False


def kill_link(system: Any) -> Any:
    """Crash the Monitor's central-link: it is told to send a non-message and raises TypeError."""
    from transport.link import Send

    link = system.get("central-link")
    link.tell(Send(object()))
    return link


def time_restart(system: Any, timeout: float = 10.0) -> float | None:
    """Kill, then the time until the Monitor is registered again through a new link."""
    started = time.perf_counter()
    old = kill_link(system)
    deadline = time.monotonic() + timeout
    went_down = False
    while time.monotonic() < deadline:
        if not went_down:
            went_down = not registered(system)
        elif registered(system):
            new = system.get("central-link")
            if new is not None and new.actor_urn != old.actor_urn:
                return time.perf_counter() - started
        time.sleep(0.002)
    return None


def restarts(port: int, engine_port: int, n_monitors: int, kills: int) -> dict[str, Any]:
    from supervisors.monitor_system import MonitorConfig, start_monitor
    from supervisors.supervisor import GetRestartLog

    systems = [start_monitor(MonitorConfig(engine_host=LOOPBACK, engine_port=engine_port, central_host=LOOPBACK,
                                           central_port=port, cp_id=f"RST{i:03d}", name=f"bench-monitor-{i}"))
               for i in range(n_monitors + 1)]
    try:
        deadline = time.monotonic() + 30
        while not all(registered(s) for s in systems) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        samples, failures = [], 0
        last_kill: dict[int, float] = {}
        for k in range(kills):
            i = k % n_monitors
            wait = last_kill.get(i, -1e9) + 10.5 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last_kill[i] = time.monotonic()
            took = time_restart(systems[i])
            if took is None:
                failures += 1
            else:
                samples.append(took)
            time.sleep(0.05)
        # the supervisor's own account: delay from the crash to the new actor (backoff + start)
        supervisor_delays = []
        for s in systems[:n_monitors]:
            supervisor_delays += [d for name, d, _ in s.supervisor.ask(GetRestartLog(), timeout=5)
                                  if name == "central-link"]
        # storm: the spare Monitor's link killed 5 times in a row (the intensity allows 5 in 10 s)
        storm = [time_restart(systems[n_monitors]) for _ in range(5)]
        return {"samples": samples, "failures": failures, "supervisor_delays": supervisor_delays, "storm": storm}
    finally:
        for s in systems:
            s.stop()


# --- 2. Engine KO ------------------------------------------------------------------------------
def engine_ko(rd: Path, settings: Any, port: int, db: CentralDb, n: int, rounds: int) -> dict[str, Any]:
    from actors.console import ConsoleLine
    from supervisors.engine_system import EngineConfig, engine_port, start_engine
    from supervisors.monitor_system import MonitorConfig, start_monitor

    cps = [f"KO{i:02d}" for i in range(n)]
    engines, monitors = [], []
    try:
        for cp in cps:
            e = start_engine(EngineConfig(broker=settings.bootstrap, listen_host=LOOPBACK, listen_port=0,
                                          journal=str(rd / f"engine-{cp}.journal"), topic_prefix=settings.topic_prefix,
                                          console=False, cp_id=cp, name=f"bench-engine-{cp}"))
            engines.append(e)
            monitors.append(start_monitor(MonitorConfig(engine_host=LOOPBACK, engine_port=engine_port(e),
                                                        central_host=LOOPBACK, central_port=port, cp_id=cp,
                                                        name=f"bench-monitor-{cp}")))
        if len(db.wait(cps, lambda s: s == "ACTIVE", 30)) < n:
            raise RuntimeError("the Engine/Monitor pairs did not become ACTIVE")
        reported, failures = [], 0
        for _ in range(rounds):
            time.sleep(random.uniform(0.2, 1.0))  # not in step with the Monitors' 1 s health ticks
            t0 = {}
            for cp, e in zip(cps, engines):
                t0[cp] = time.perf_counter()
                e.get("engine").tell(ConsoleLine("k"))
            got = db.wait(cps, lambda s: s == "BROKEN", 10, since=t0)
            failures += n - len(got)
            reported += list(got.values())
            for e in engines:
                e.get("engine").tell(ConsoleLine("k"))
            db.wait(cps, lambda s: s == "ACTIVE", 10)
        # Engine gone: stop each Engine system (its socket closes, no more health answers)
        time.sleep(random.uniform(0.2, 1.0))
        t0, gone = {}, []
        for cp, e in zip(cps, engines):
            t0[cp] = time.perf_counter()
            e.stop()
        got = db.wait(cps, lambda s: s == "BROKEN", 15, since=t0)
        gone = list(got.values())
        return {"reported": reported, "reported_failures": failures, "gone": gone, "gone_failures": n - len(got)}
    finally:
        for m in monitors:
            m.stop()
        for e in engines:
            e.stop()


# --- 3. lost Monitor -------------------------------------------------------------------------------
def lost_monitor(rd: Path, port: int, engine_port: int, db: CentralDb, n: int, rounds: int) -> dict[str, Any]:
    cps = [f"LOST{i:02d}" for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for cp in cps:
            log = open(rd / f"monitor-{cp}.stderr", "ab")
            logs.append(log)
            procs.append(subprocess.Popen(
                python_module_cmd("supervisors.cli", "monitor", f"{LOOPBACK}:{engine_port}", f"{LOOPBACK}:{port}", cp,
                                  "--log-file", str(rd / f"monitor-{cp}.log"), "--log-level", "WARNING"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=bench_env()))
        if len(db.wait(cps, lambda s: s == "ACTIVE", 40)) < n:
            raise RuntimeError("the Monitor processes did not become ACTIVE")
        silent, failures = [], 0
        for _ in range(rounds):
            time.sleep(random.uniform(0.2, 1.0))  # not in step with the 1 s life messages
            t0 = {}
            for cp, p in zip(cps, procs):
                t0[cp] = time.perf_counter()
                os.kill(p.pid, signal.SIGSTOP)
            got = db.wait(cps, lambda s: s == "DISCONNECTED", 10, since=t0)
            failures += n - len(got)
            silent += list(got.values())
            for p in procs:
                os.kill(p.pid, signal.SIGCONT)
            db.wait(cps, lambda s: s == "ACTIVE", 15)
        time.sleep(random.uniform(0.2, 1.0))
        t0 = {}
        for cp, p in zip(cps, procs):
            t0[cp] = time.perf_counter()
            p.kill()
        got = db.wait(cps, lambda s: s == "DISCONNECTED", 10, since=t0)
        return {"silent": silent, "silent_failures": failures, "killed": list(got.values()),
                "killed_failures": n - len(got)}
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in logs:
            log.close()


def run(args: argparse.Namespace) -> Report:
    from bench.simcp import FakeEngine

    report = Report("restart")
    rd = run_dir("restart")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    broker = start_broker(rd)
    fake_engine = FakeEngine().start()
    cps = ([f"RST{i:03d}" for i in range(args.monitors + 1)] + [f"KO{i:02d}" for i in range(args.engines)]
           + [f"LOST{i:02d}" for i in range(args.engines)])
    central = None
    try:
        settings = topics(broker, "rst.")
        central, port, db = start_central(rd, settings, cps)
        rs = restarts(port, fake_engine.port, args.monitors, args.kills)
        ko = engine_ko(rd, settings, port, db, args.engines, args.rounds)
        lost = lost_monitor(rd, port, fake_engine.port, db, args.engines, args.rounds)
    finally:
        fake_engine.stop()
        if central is not None:
            central.terminate()
            try:
                central.wait(15)
            except subprocess.TimeoutExpired:
                central.kill()
                central.wait(5)
        broker.stop()
    ms = lambda xs: [x * 1000 for x in xs if x is not None]  # noqa: E731
    r, sup = summary(ms(rs["samples"])), summary(ms(rs["supervisor_delays"]))
    report.details.update(restart=r, restart_failures=rs["failures"], supervisor_delay=sup,
                          storm_ms=ms(rs["storm"]) + [None] * sum(x is None for x in rs["storm"]))
    note = (f"{r['n']} kills over {args.monitors} Monitors, {rs['failures']} not back in 10 s; "
            f"supervisor backoff+start p50 {sup['p50']:.0f} ms, p95 {sup['p95']:.0f} ms (baseline)")
    report.add(Row("restart: connection actor p50", r["p50"], "ms", sup["p50"], r["p50"] / sup["p50"], "", None, ""))
    report.add(Row("restart: connection actor p95", r["p95"], "ms", sup["p95"], r["p95"] / sup["p95"],
                   f"<= {TARGET_RESTART_P95_MS:.0f} ms", r["p95"] <= TARGET_RESTART_P95_MS and rs["failures"] == 0,
                   note))
    storm = ", ".join(f"{x:.0f}" for x in ms(rs["storm"]))
    report.add(Row("restart: same actor 5x in a row (last)", ms(rs["storm"])[-1] if ms(rs["storm"]) else None, "ms",
                   target="", met=None, note=f"each restart in ms: {storm} (backoff doubles inside the 10 s window)"))
    k, g = summary(ms(ko["reported"])), summary(ms(ko["gone"]))
    report.details.update(ko_reported=k, ko_gone=g, ko_failures=ko["reported_failures"] + ko["gone_failures"])
    report.add(Row("detect: Engine KO (reported) p95", k["p95"] / 1000, "s", target=f"<= {TARGET_KO_S:g} s",
                   met=k["p95"] / 1000 <= TARGET_KO_S and ko["reported_failures"] == 0,
                   note=f"{k['n']} KOs, p50 {k['p50']:.0f} ms, max {k['max']:.0f} ms"))
    from actors.central import CentralConfig
    from actors.monitor import MonitorOptions

    health, life = MonitorOptions().health_timeout, CentralConfig(db_path="").life_timeout
    report.add(Row("detect: Engine gone (no answers) p95", g["p95"] / 1000, "s", health, g["p95"] / 1000 / health,
                   target=f"<= {TARGET_KO_S:g} s",
                   met=g["p95"] / 1000 <= TARGET_KO_S and ko["gone_failures"] == 0,
                   note=f"{g['n']} Engines stopped, p50 {g['p50'] / 1000:.2f} s, max {g['max'] / 1000:.2f} s; "
                        f"baseline: --health-timeout {health:g} s; the closed socket says it first"))
    s, kl = summary(ms(lost["silent"])), summary(ms(lost["killed"]))
    report.details.update(lost_silent=s, lost_killed=kl,
                          lost_failures=lost["silent_failures"] + lost["killed_failures"])
    report.add(Row("detect: lost Monitor, silent p95", s["p95"] / 1000, "s", life, s["p95"] / 1000 / life,
                   target=f"<= {TARGET_LOST_S:g} s",
                   met=s["p95"] / 1000 <= TARGET_LOST_S and lost["silent_failures"] == 0,
                   note=f"{s['n']} SIGSTOPs, p50 {s['p50'] / 1000:.2f} s, max {s['max'] / 1000:.2f} s; "
                        f"baseline: --life-timeout {life:g} s, deadlines checked every 0.1 s"))
    report.add(Row("detect: lost Monitor, killed p95", kl["p95"] / 1000, "s", target=f"<= {TARGET_LOST_S:g} s",
                   met=kl["p95"] / 1000 <= TARGET_LOST_S and lost["killed_failures"] == 0,
                   note=f"{kl['n']} SIGKILLs, p50 {kl['p50']:.0f} ms; the socket closes"))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--monitors", type=int, default=40, help="Monitors the kills rotate over")
    p.add_argument("--engines", type=int, default=5, help="Engine/Monitor pairs for the detection times")
    p.add_argument("--rounds", type=int, default=3, help="KO and SIGSTOP rounds (x --engines samples)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
