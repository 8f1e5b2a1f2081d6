"""Scale: 100, 500 and 1,000 simulated CPs with supplies running against one Central process.

For each level, on a fresh topic prefix and a fresh database:

1. Central runs as its own process (``bench.central_proc``: ``start_central``
   with an instrumented panel), so its CPU, RSS and threads can be read from
   ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.
2. Every CP has a supply running: by default (``--sessions seeded``) the
   database holds a live supplying session per CP when Central starts, which
   is what Central finds after a restart in a busy hour (it reloads them and
   starts a session actor for each); ``--sessions charge`` asks for each
   supply over Kafka instead (``charge_request``, 50 a second), which also
   exercises authorisation, but at 1,000 CPs that burst alone overloads
   Central (see bench/README.md); ``--charged N`` adds such a level after
   the others.
3. The load generator (``bench.simcp``, another process) opens one framed
   socket per CP (ENQ/ACK, ``register_request``, paced at 500 connections a
   second), sends a ``heartbeat`` every second per CP, says
   ``supply_started`` and sends one ``charging_data`` per second per CP over
   Kafka (one producer, the Engine's settings).
4. Once every CP supplies, at least 3 s and at most ``--settle-max`` s (10 s
   below the top level) for the panel lag to settle (median of the last 2 s under 0.6 s twice in a
   row; the ramp row says how long it took, or that it did not), then a
   window of ``--window`` s:
   Central CPU (utime+stime over the window / wall time, 100 % = one core),
   peak RSS and thread count (sampled every second), telemetry-to-panel lag
   (PanelProbe), heartbeat ACK time at the simulator, and missed life
   messages (CPs Central showed DISCONNECTED although their simulated
   Monitor was connected).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Report,
    Row,
    cpu_by_kind,
    machine,
    proc_cpu_seconds,
    proc_status,
    python_module_cmd,
    quiet_logging,
    run_dir,
    start_broker,
    thread_cpu,
    topics,
)
from bench.procs import Child
from bench.simcp import seeded_session

TARGET_LAG = 1.0
TARGET_IDLE_CPU = 5.0  #: issue #14: Central with nothing to do, % of one core
#: after "ready": its consumers' group joins and first polls are start-up, not idle; then 2 s without
#: records before both consumers take their idle fetch waits (measured: ~10 s in all on Tansu)
IDLE_SETTLE = 12.0
IDLE_WINDOW = 5.0
TARGET_RSS = 200.0  #: at the top level unless TARGETS says otherwise
#: issue #14: per level, the figures with a target (met only in the worst of `make bench REPEAT=3`)
TARGETS: dict[int, dict[str, float]] = {1000: {"cpu": 50.0, "ack": 100.0, "rss": 150.0},
                                        2000: {"rss": 250.0}}


def one_level(n: int, broker: Any, rd: Path, window: float, t0: float, ramp_timeout: float,
              sessions: str, settle_max: float, measure_idle: bool = False) -> dict[str, Any]:
    from persistence import Repository

    rd.mkdir(parents=True, exist_ok=True)
    prefix = f"scale{n}{sessions[0]}."
    settings = topics(broker, prefix)
    out: dict[str, Any] = {"cps": n}
    with Repository(rd / f"central-{n}.db") as repo:  # the operator's CP list (EV_Central --seed)
        now = time.time()
        for i in range(n):
            cp = f"SIM{i:04d}"
            repo.upsert_cp(cp, f"Simulated {cp}", 0.30)
            if sessions == "seeded":  # a supply running at every CP, as Central finds it after a restart
                sid, driver, price = seeded_session(cp)
                repo.open_session(sid, cp, driver, price, now)
                repo.mark_supplying(sid, now)
    central = Child(f"central-{n}", python_module_cmd(
        "bench.central_proc", "--broker", settings.bootstrap, "--db", str(rd / f"central-{n}.db"),
        "--topic-prefix", prefix, "--t0", repr(t0), "--log-file", str(rd / f"central-{n}.log")),
        rd / f"central-{n}.stderr")
    sim = None
    try:
        ready = central.expect(lambda line: line.startswith("ready "), 60)
        if ready is None:
            raise RuntimeError(f"Central did not start (see {rd / f'central-{n}.log'})")
        port = int(ready.split()[1])
        idle = proc_status(central.pid)
        out["idle_rss_mb"], out["idle_threads"] = idle["VmRSS"], idle["Threads"]
        if measure_idle:  # no CP connected yet: what Central costs doing nothing, once it has settled
            time.sleep(IDLE_SETTLE)
            cpu0, w0 = proc_cpu_seconds(central.pid), time.monotonic()
            time.sleep(IDLE_WINDOW)
            out["idle_cpu_pct"] = 100 * (proc_cpu_seconds(central.pid) - cpu0) / (time.monotonic() - w0)
        began = time.monotonic()
        sim = Child(f"sim-{n}", python_module_cmd(
            "bench.simcp", "--central", f"{LOOPBACK}:{port}", "--broker", settings.bootstrap,
            "--topic-prefix", prefix, "--cps", str(n), "--t0", repr(t0), "--sessions", sessions),
            rd / f"sim-{n}.stderr")
        reg = sim.wait_status(lambda s: s.get("registered") == n, ramp_timeout)
        out["registered_after_s"] = time.monotonic() - began if reg else None
        sup = sim.wait_status(lambda s: s.get("supplying") == n, ramp_timeout)
        out["supplying_after_s"] = time.monotonic() - began if sup else None
        out["ramp_status"] = dict(sim.last)
        out["supplying"] = int(sim.last.get("supplying", 0))
        # settle: until the median lag of the last 2 s is under 0.6 s twice in a row (normal: 0.2-0.4 s,
        # half of it the panel's 0.5 s refresh), at least 3 s, at most settle_max
        settle_start, calm = time.monotonic(), 0
        time.sleep(3.0)
        while time.monotonic() - settle_start < settle_max:
            central.send("lag")
            line = central.expect(lambda line: line.startswith("lag "), 10)
            lag = float(line.split()[1]) if line else float("nan")
            calm = calm + 1 if lag < 0.6 else 0
            if calm >= 2:
                break
            time.sleep(1.0)
        out["settled_after_s"] = time.monotonic() - settle_start
        out["settled"] = calm >= 2
        central.send("mark")
        sim.send("mark")
        central.expect(lambda line: line == "marked", 10)
        sim.expect(lambda line: '"marked"' in line, 10)
        threads0 = thread_cpu(central.pid)
        cpu0, sim_cpu0, broker_cpu0 = (proc_cpu_seconds(central.pid), proc_cpu_seconds(sim.pid),
                                       proc_cpu_seconds(broker.pid))
        t_start = time.monotonic()
        rss, threads = [], []
        while time.monotonic() - t_start < window:
            st = proc_status(central.pid)
            rss.append(st["VmRSS"])
            threads.append(st["Threads"])
            time.sleep(1.0)
        elapsed = time.monotonic() - t_start
        cpu = proc_cpu_seconds(central.pid) - cpu0
        sim_cpu = proc_cpu_seconds(sim.pid) - sim_cpu0
        broker_cpu = proc_cpu_seconds(broker.pid) - broker_cpu0
        threads1 = thread_cpu(central.pid)
        central.send(f"dump {rd / f'panel-{n}.json'}")
        sim.send(f"dump {rd / f'sim-{n}.json'}")
        central.expect(lambda line: line == "dumped", 15)
        sim.expect(lambda line: '"dumped"' in line, 15)
        panel = json.loads((rd / f"panel-{n}.json").read_text())
        names = {int(k): v for k, v in panel.pop("thread_names").items()}
        by_kind = cpu_by_kind(threads0, threads1, names, cpu)
        simw = json.loads((rd / f"sim-{n}.json").read_text())
        final = proc_status(central.pid)
        out.update(
            window_s=elapsed, central_cpu_pct=100 * cpu / elapsed, sim_cpu_pct=100 * sim_cpu / elapsed,
            broker_cpu_pct=100 * broker_cpu / elapsed, rss_mb_max=max(rss), rss_hwm_mb=final["VmHWM"],
            threads_max=max(threads), panel=panel, sim=simw,
            central_cpu_pct_by_thread_kind={k: round(100 * v / elapsed, 1) for k, v in by_kind.items()},
            telemetry_rate=simw["telemetry_sent"] / elapsed, heartbeat_rate=simw["hb_sent"] / elapsed,
        )
        return out
    finally:
        if sim is not None:
            sim.stop()
        central.stop()


def render_cost(n: int, live: bool = True) -> float:
    """CPU seconds of one rich drawing of the panel with ``n`` supplying CPs and ``n`` request rows.

    ``live``: what ``--panel rich`` draws on a 200×60 terminal (the tiles that fit, the
    newest requests); otherwise every tile and row (what ``--panel text`` prints).
    """
    import io

    from rich.console import Console

    from actors.panel import CpTile, MessageRow, PanelSnapshot, RequestRow, render, tiles_that_fit

    tiles = tuple(CpTile(f"SIM{i:04d}", f"Simulated SIM{i:04d}", 0.30, "SUPPLYING", f"drv-SIM{i:04d}", 7.4, 1.234, 0.37)
                  for i in range(n))
    rows = tuple(RequestRow(time.time(), f"drv-SIM{i:04d}", f"SIM{i:04d}", "supplying") for i in range(n))
    snapshot = PanelSnapshot(tiles, rows, tuple(MessageRow(i, time.time(), "a message") for i in range(12)), time.time())
    console = Console(file=io.StringIO(), width=200, height=60, color_system=None)
    started = time.process_time()
    console.print(render(snapshot, tiles_that_fit(200, 60) if live else None))
    return time.process_time() - started


def run(args: argparse.Namespace) -> Report:
    report = Report("scale")
    rd = run_dir("scale")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    broker = start_broker(rd)
    t0 = time.time()
    top = max(args.cps)
    plan = [(n, args.sessions, args.window if n == top else args.small_window) for n in args.cps]
    if args.charged:  # the same top level once more, every supply asked for over Kafka
        plan.append((args.charged, "charge", args.small_window))
    levels: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for n, sessions, window in plan:
            need = 20 + window + n / 20 + (args.settle_max if n == top else 10)
            if args.budget and time.monotonic() - started + need > args.budget:
                levels.append({"cps": n, "sessions": sessions,
                               "error": f"not run: {need:.0f} s needed, the time budget is spent"})
                continue
            try:
                level = one_level(n, broker, rd / sessions, window, t0, args.ramp_timeout, sessions,
                                  args.settle_max if n == top else 10.0, measure_idle=not levels)
            except Exception as exc:  # one level failing must not hide the others
                level = {"cps": n, "error": str(exc)}
            level["sessions"] = sessions
            levels.append(level)
    finally:
        broker.stop()
    report.details["levels"] = levels
    idle = [lv["idle_cpu_pct"] for lv in levels if "idle_cpu_pct" in lv]
    if idle:
        report.add(Row("scale: Central idle CPU", max(idle), "%", target=f"<= {TARGET_IDLE_CPU:.0f} %",
                       met=max(idle) <= TARGET_IDLE_CPU,
                       note=f"{IDLE_WINDOW:.0f} s, {IDLE_SETTLE:.0f} s after it is ready, before the first level's CPs "
                            "connect (its consumers polling an idle broker, its tickers)"))
    for lv in levels:
        add_rows(report, lv, lv["cps"] == top)
    return report


def add_rows(report: Report, lv: dict[str, Any], top: bool) -> None:
    n, sessions = lv["cps"], lv["sessions"]
    name = f"scale {n} CPs" + (" (supplies asked over Kafka)" if sessions == "charge" else "")
    if "error" in lv:
        report.add(Row(name, None, target="runs", met=False, note=lv["error"]))
        return
    p, s = lv["panel"], lv["sim"]
    want = TARGETS.get(n, {})
    denied = {k: v for k, v in lv["ramp_status"].get("answers", {}).items() if k.startswith("denied")}
    report.add(Row(f"{name}: ramp until all supply", lv["supplying_after_s"], "s", target="all supply" if top else "",
                   met=(lv["supplying"] == n) if top else None,
                   note=f"{lv['supplying']}/{n} supplying; all registered after "
                        f"{lv['registered_after_s'] or float('nan'):.1f} s"
                        + (f"; charge requests 50/s, denied on the way: {denied or 'none'}" if sessions == "charge"
                           else "; supplies reloaded from the database")
                        + f"; lag {'settled' if lv['settled'] else 'NOT settled'} {lv['settled_after_s']:.0f} s later; "
                          f"{p['missed_life_since_start'] - p['missed_life']} CP(s) shown DISCONNECTED before the window"))
    report.add(Row(f"{name}: telemetry->panel lag p95", p["lag_p95_s"] * 1000, "ms",
                   target=f"<= {TARGET_LAG * 1000:.0f} ms" if top or want else "",
                   met=(p["lag_p95_s"] <= TARGET_LAG) if top or want else None,
                   note=f"p50 {p['lag_p50_s'] * 1000:.0f} ms, p99 {p['lag_p99_s'] * 1000:.0f} ms, "
                        f"{p['lag_samples']} readings; median {p['lag_p50_first5_s']:.2f} s in the first 5 s of the "
                        f"window, {p['lag_p50_last5_s']:.2f} s in the last 5 s; a panel snapshot every 0.5 s is part of it"))
    rss = want.get("rss", TARGET_RSS if top else None)
    report.add(Row(f"{name}: Central RSS (peak)", lv["rss_mb_max"], "MB", lv["idle_rss_mb"],
                   lv["rss_mb_max"] / lv["idle_rss_mb"], f"<= {rss:.0f} MB" if rss else "",
                   (lv["rss_mb_max"] <= rss) if rss else None, "baseline: the same Central idle, before any CP"))
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in list(lv["central_cpu_pct_by_thread_kind"].items())[:5])
    cpu = want.get("cpu")
    report.add(Row(f"{name}: Central CPU", lv["central_cpu_pct"], "%", target=f"<= {cpu:.0f} %" if cpu else "",
                   met=(lv["central_cpu_pct"] <= cpu) if cpu else None,
                   note=f"100 % = one core; {lv['telemetry_rate']:.0f} telemetry/s + {lv['heartbeat_rate']:.0f} "
                        f"heartbeats/s; top threads (%): {kinds}; sim {lv['sim_cpu_pct']:.0f} %, "
                        f"broker {lv['broker_cpu_pct']:.0f} %"))
    report.add(Row(f"{name}: Central threads", lv["threads_max"], "", lv["idle_threads"],
                   lv["threads_max"] / lv["idle_threads"], "", None, "baseline: Central idle"))
    ack = want.get("ack")
    report.add(Row(f"{name}: heartbeat ACK p95", s["hb_ack_p95_ms"], "ms", target=f"<= {ack:.0f} ms" if ack else "",
                   met=(s["hb_ack_p95_ms"] <= ack) if ack else None,
                   note=f"p50 {s['hb_ack_p50_ms']:.1f} ms, max {s['hb_ack_max_ms']:.0f} ms, "
                        f"{s['hb_acked']}/{s['hb_sent']} acked"))
    missed = p["missed_life"] + s["disconnects"]
    report.add(Row(f"{name}: missed life messages", missed, "", target="0" if top or want else "",
                   met=(missed == 0) if top or want else None,
                   note=f"Central showed {p['missed_life']} CP(s) DISCONNECTED, {s['disconnects']} socket(s) "
                        f"dropped, {s['hb_skipped']} heartbeat(s) still unACKed when the next was due"))
    if sessions != "charge":
        lv["panel_render_s"], lv["panel_render_all_s"] = render_cost(n), render_cost(n, live=False)
        report.add(Row(f"{name}: rich panel draw (not in the run)", lv["panel_render_s"] * 1000, "ms",
                       lv["panel_render_all_s"] * 1000, lv["panel_render_s"] / lv["panel_render_all_s"], "", None,
                       "CPU of one live-panel draw on a 200x60 terminal (the tiles that fit, faults first; at most "
                       "once per snapshot and per 3x its own cost); baseline: drawing every tile and request "
                       "row; the runs use --panel off"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cps", type=int, nargs="+", default=[100, 500, 1000])
    p.add_argument("--window", type=float, default=20.0, help="measurement window at the largest level (s)")
    p.add_argument("--small-window", type=float, default=15.0, help="window at the other levels (s)")
    p.add_argument("--ramp-timeout", type=float, default=60.0)
    p.add_argument("--settle-max", type=float, default=60.0,
                   help="after the ramp, wait at most this long for the panel lag to settle before the window "
                        "(the smaller levels wait at most 10 s)")
    p.add_argument("--budget", type=float, default=0.0, help="skip levels that would not end within this many s")
    p.add_argument("--sessions", choices=("seeded", "charge"), default="seeded",
                   help="seeded: Central starts with a live supply per CP in its database (as after a restart "
                        "in a busy hour); charge: every supply is asked for over Kafka (50 requests/s)")
    p.add_argument("--charged", type=int, default=0,
                   help="then this many CPs once more with --sessions charge (0: skip; see bench/README.md)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
