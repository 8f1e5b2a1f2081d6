"""API_Central at 1,000 CPs: ``GET /api/cps`` latency and the event stream's delay.

On a fresh topic prefix and database, as the scale benchmark does:

1. Central runs as its own process (``bench.central_proc --api``: EV_Central's
   ``start_central`` with API_Central on a free loopback port, HTTPS with its
   self-signed certificate, and the instrumented panel that measures
   telemetry-to-panel lag);
2. every CP supplies (a live session per CP in the database when Central
   starts) and the load generator (``bench.simcp``) keeps 1,000 simulated
   Monitors connected (a heartbeat per second each) and sends one
   ``charging_data`` per second per CP, whose meter value says when it was sent;
3. once every CP supplies and the panel lag settled, for ``--window`` s one
   client reads ``GET /api/events`` (the token header, the certificate
   verified): for every SUPPLYING tile of a ``cps`` event whose energy changed,
   the delay is its arrival minus the time the reading was sent — the figure
   an operator's page sees. Its baseline is the panel's own lag over the same
   window (Central's snapshot every 0.5 s is most of both);
4. then, the stream still open, ``--gets`` sequential ``GET /api/cps`` (1,000
   CPs with their registration and key status) over one keep-alive HTTPS
   connection, and a few more each on a new connection (a TLS handshake
   each), timed at the client. Baseline: the same GETs served by API_Central
   alone in this process (a hub holding 1,000 supplying CPs, no Central).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Report,
    Row,
    machine,
    proc_cpu_seconds,
    python_module_cmd,
    quiet_logging,
    run_dir,
    start_broker,
    summary,
    topics,
)
from bench.procs import Child
from bench.simcp import seeded_session, sent_at

TARGET_GET_MS = 100.0
TARGET_DELAY_MS = 1000.0


class StreamProbe:
    """Reads the event stream in a thread; keeps the delay of every fresh reading it shows."""

    def __init__(self, url: str, token: str, ca: str, t0: float) -> None:
        from transport.api_client import CentralApiClient

        self.client = CentralApiClient(url, token, ca, timeout=30)
        self.t0 = t0
        self.lock = threading.Lock()
        self.energy: dict[str, float] = {}
        self.delays: list[float] = []
        self.events: dict[str, int] = {}
        self.bytes = 0
        self.recording = False
        self.error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sse-probe", daemon=True)

    def start(self) -> StreamProbe:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for event in self.client.events(timeout=30, comments=True):
                now = time.time()
                if self.stop.is_set():
                    return
                tiles = event.data["cps"] if event.event == "snapshot" else \
                    event.data["changed"] if event.event == "cps" else []
                with self.lock:
                    self.events[event.event] = self.events.get(event.event, 0) + 1
                    self.bytes += len(json.dumps(event.data)) if self.recording else 0
                    for tile in tiles:
                        energy = tile["energy_kwh"]
                        if tile["state"] != "SUPPLYING" or energy <= 0 or energy == self.energy.get(tile["cp_id"]):
                            continue
                        self.energy[tile["cp_id"]] = energy
                        if self.recording and event.event == "cps":
                            self.delays.append(now - sent_at(energy, self.t0))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def record(self, on: bool) -> None:
        with self.lock:
            self.recording = on
            if on:
                self.delays, self.events, self.bytes = [], {}, 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(3)


def get_latencies(url: str, token: str, ca: str, n: int, path: str = "/api/cps") -> tuple[list[float], int]:
    """``n`` sequential GETs over one keep-alive HTTPS connection: their times (s) and the body size."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or LOOPBACK, parts.port,
                                       context=ssl.create_default_context(cafile=ca), timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    times, size = [], 0
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            times.append(time.perf_counter() - started)
            if resp.status != 200:
                raise RuntimeError(f"GET {path} answered {resp.status}: {body[:200]!r}")
            size = len(body)
    finally:
        conn.close()
    return times, size


def isolated_get(rd: Path, n: int, gets: int) -> dict[str, float]:
    """The baseline: the same GETs served by API_Central alone — a hub holding ``n`` supplying CPs, no
    Central, no load — in this process, over HTTPS with a certificate of its own."""
    from actors.panel import CpTile, PanelSnapshot
    from actors.runtime import Directory
    from actors.web_hub import CentralCommands, EventHub
    from persistence import Repository
    from transport import http_common
    from transport.central_api import make_app

    db = rd / "isolated.db"
    Repository(db).close()
    hub = EventHub()
    hub.publish(PanelSnapshot(tuple(CpTile(f"SIM{i:04d}", f"Simulated SIM{i:04d}", 0.30, "SUPPLYING",
                                           f"drv-SIM{i:04d}", 7.4, 1.234, 0.37, None, (), f"S{i:04d}")
                                    for i in range(n)), (), (), time.time()))
    token = "b" * 32
    app = make_app(hub, CentralCommands(Directory(), timeout=0.5), lambda: Repository(db), token)
    cert, key = rd / "isolated-cert.pem", rd / "isolated-key.pem"
    http_common.make_self_signed(cert, key, [LOOPBACK], title="bench")
    sock = http_common.bind(LOOPBACK, 0)
    server = http_common.ServerThread(app, sock, name="bench-api", cert=cert, key=key)
    server.start()
    try:
        times, _ = get_latencies(http_common.client_url(LOOPBACK, server.port), token, str(cert), gets)
    finally:
        server.stop()
        sock.close()
        app.state.stores.close()
    return summary(times)


def fresh_connection_latencies(url: str, token: str, ca: str, n: int) -> list[float]:
    """``n`` GETs each on a new connection (the TLS handshake included), as a page reload would."""
    from transport.api_client import CentralApiClient

    client = CentralApiClient(url, token, ca, timeout=30)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.cps()
        times.append(time.perf_counter() - started)
    return times


def run(args: argparse.Namespace) -> Report:
    from persistence import Repository

    report = Report("api")
    rd = run_dir("api")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    broker = start_broker(rd)
    t0 = time.time()
    n = args.cps
    out: dict[str, Any] = {"cps": n}
    central = sim = None
    probe: StreamProbe | None = None
    try:
        settings = topics(broker, "api.")
        db = rd / "central.db"
        with Repository(db) as repo:
            now = time.time()
            for i in range(n):
                cp = f"SIM{i:04d}"
                repo.upsert_cp(cp, f"Simulated {cp}", 0.30)
                sid, driver, price = seeded_session(cp)
                repo.open_session(sid, cp, driver, price, now)
                repo.mark_supplying(sid, now)
        central = Child("central", python_module_cmd(
            "bench.central_proc", "--broker", settings.bootstrap, "--db", str(db), "--topic-prefix", "api.",
            "--t0", repr(t0), "--log-file", str(rd / "central.log"), "--api"), rd / "central.stderr")
        ready = central.expect(lambda line: line.startswith("ready "), 60)
        api = central.expect(lambda line: line.startswith("api "), 30)
        if ready is None or api is None:
            raise RuntimeError(f"Central did not start (see {rd / 'central.log'})")
        port = int(ready.split()[1])
        _, url, ca, source = api.split(" ", 3)
        token = Path(source).read_text().strip() if Path(source).is_file() else os.environ["EV_API_TOKEN"]
        sim = Child("sim", python_module_cmd(
            "bench.simcp", "--central", f"{LOOPBACK}:{port}", "--broker", settings.bootstrap, "--topic-prefix",
            "api.", "--cps", str(n), "--t0", repr(t0), "--sessions", "seeded"), rd / "sim.stderr")
        began = time.monotonic()
        if sim.wait_status(lambda s: s.get("supplying") == n, args.ramp_timeout) is None:
            raise RuntimeError(f"only {sim.last.get('supplying', 0)}/{n} CPs supply after {args.ramp_timeout:g} s")
        out["supplying_after_s"] = time.monotonic() - began
        probe = StreamProbe(url, token, ca, t0).start()
        settle_start, calm = time.monotonic(), 0  # as the scale benchmark: the panel lag under 0.6 s twice
        time.sleep(3.0)
        while time.monotonic() - settle_start < args.settle_max and calm < 2:
            central.send("lag")
            line = central.expect(lambda line: line.startswith("lag "), 10)
            calm = calm + 1 if line and float(line.split()[1]) < 0.6 else 0
            time.sleep(1.0)
        out["settled"] = calm >= 2
        # the stream
        central.send("mark")
        central.expect(lambda line: line == "marked", 10)
        cpu0 = proc_cpu_seconds(central.pid)
        probe.record(True)
        w0 = time.monotonic()
        time.sleep(args.window)
        with probe.lock:
            delays, events, volume = list(probe.delays), dict(probe.events), probe.bytes
            probe.recording = False
        elapsed = time.monotonic() - w0
        out["central_cpu_pct"] = 100 * (proc_cpu_seconds(central.pid) - cpu0) / elapsed
        central.send(f"dump {rd / 'panel.json'}")
        central.expect(lambda line: line == "dumped", 15)
        panel = json.loads((rd / "panel.json").read_text())
        panel.pop("thread_names", None)
        out.update(window_s=elapsed, delay=summary(delays), events=events, stream_kb_s=volume / 1024 / elapsed,
                   panel_lag_p50_s=panel["lag_p50_s"], panel_lag_p95_s=panel["lag_p95_s"],
                   stream_error=probe.error)
        # the reads, the stream still open
        times, size = get_latencies(url, token, ca, args.gets)
        out.update(get=summary(times), get_bytes=size)
        out["get_filtered"] = summary(get_latencies(url, token, ca, max(10, args.gets // 4),
                                                    "/api/cps?state=SUPPLYING&q=SIM09")[0])
        out["get_new_connection"] = summary(fresh_connection_latencies(url, token, ca, 10))
        out["get_isolated"] = isolated_get(rd, n, args.gets)
    except Exception as exc:
        out["error"] = str(exc)
    finally:
        if probe is not None:
            probe.close()
        if sim is not None:
            sim.stop()
        if central is not None:
            central.stop()
        broker.stop()
    report.details["run"] = out
    add_rows(report, out)
    return report


def add_rows(report: Report, out: dict[str, Any]) -> None:
    n = out["cps"]
    if "error" in out:
        report.add(Row(f"api {n} CPs", None, target="runs", met=False, note=out["error"]))
        return
    g, d = out["get"], out["delay"]
    iso = out["get_isolated"]
    report.add(Row(f"api {n} CPs: GET /api/cps p95", g["p95"] * 1000, "ms", iso["p95"] * 1000,
                   g["p95"] / iso["p95"], target=f"<= {TARGET_GET_MS:.0f} ms", met=g["p95"] * 1000 <= TARGET_GET_MS,
                   note=f"p50 {g['p50'] * 1000:.1f} ms, max {g['max'] * 1000:.0f} ms, {g['n']} requests on one "
                        f"keep-alive HTTPS connection, {out['get_bytes'] / 1024:.0f} KiB each (every CP with its "
                        f"registration and key status), while {n} CPs supply and the event stream is read; "
                        f"filtered (?state=SUPPLYING&q=SIM09) p50 {out['get_filtered']['p50'] * 1000:.1f} ms; on a new "
                        f"connection each (TLS handshake) p50 {out['get_new_connection']['p50'] * 1000:.0f} ms; "
                        f"baseline: the same GETs from API_Central alone (a hub holding {n} supplying CPs, no "
                        f"Central, no load; p50 {iso['p50'] * 1000:.1f} ms)"))
    ev = out["events"]
    report.add(Row(f"api {n} CPs: event stream delay p95", d["p95"] * 1000, "ms", out["panel_lag_p95_s"] * 1000,
                   d["p95"] / out["panel_lag_p95_s"] if out["panel_lag_p95_s"] else None,
                   f"<= {TARGET_DELAY_MS:.0f} ms", d["p95"] * 1000 <= TARGET_DELAY_MS,
                   note=f"telemetry sent -> `cps` event read by an HTTPS client: p50 {d['p50'] * 1000:.0f} ms, "
                        f"max {d['max'] * 1000:.0f} ms, {d['n']} readings in {out['window_s']:.0f} s; baseline: "
                        f"the panel's own lag (p50 {out['panel_lag_p50_s'] * 1000:.0f} ms), whose 0.5 s snapshot "
                        f"is most of both; {ev.get('cps', 0)} `cps` events, {out['stream_kb_s']:.0f} KiB/s of "
                        f"JSON; Central {out['central_cpu_pct']:.0f} % CPU"
                        + ("" if out["settled"] else "; the panel lag had NOT settled before the window")
                        + (f"; stream error: {out['stream_error']}" if out.get("stream_error") else "")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cps", type=int, default=1000)
    p.add_argument("--window", type=float, default=15.0, help="seconds the event stream is measured")
    p.add_argument("--gets", type=int, default=200, help="sequential GET /api/cps timed")
    p.add_argument("--ramp-timeout", type=float, default=60.0)
    p.add_argument("--settle-max", type=float, default=30.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
