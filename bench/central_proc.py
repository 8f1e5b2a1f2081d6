"""Central in its own process, with an instrumented panel, for benchmarks that measure it from outside.

This is ``start_central`` exactly as EV_Central runs it (panel ``off``, no
console), with one change: the panel actor is :class:`PanelProbe`, a
``PanelActor`` that also notes, for every snapshot Central hands it, when it
arrived and what it shows:

* telemetry-to-panel lag: for each SUPPLYING tile whose energy changed, the
  arrival time minus the time the simulated Engine sent that reading (read
  back from the meter value, see ``bench.simcp.sent_at``);
* missed life messages: a CP that had been seen connected and shows up
  DISCONNECTED (Central turns a CP DISCONNECTED on the first tick after
  ``--life-timeout`` without a heartbeat, and builds a snapshot in the same
  tick, so no such transition escapes the probe).

The parent measures CPU, RSS and threads from ``/proc/<pid>``. Commands on
stdin, one per line: ``lag`` (print the median lag of the last 2 s),
``mark`` (start the window), ``dump PATH`` (write the
window's figures and the names of the threads, so that the parent can sum
the per-thread CPU it reads from ``/proc/<pid>/task`` by kind), ``quit``. It prints ``ready PORT`` once Central listens.
With ``--api`` API_Central runs too (any free loopback port) and a line ``api URL CERT TOKEN_FILE`` follows.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from bench.common import LOOPBACK, pct, quiet_logging, thread_names
from bench.simcp import sent_at


@dataclass(frozen=True, slots=True)
class ProbeWindow:
    """Ask the probe: the figures of the window since the last :class:`ProbeMark`."""


@dataclass(frozen=True, slots=True)
class ProbeLag:
    """Ask the probe: the median telemetry-to-panel lag over the last 2 s."""


@dataclass(frozen=True, slots=True)
class ProbeMark:
    """Ask the probe: start a new window."""


def make_probe(t0: float) -> type:
    from actors.panel import PanelActor, PanelSnapshot

    class PanelProbe(PanelActor):
        """PanelActor plus lag and life-message bookkeeping (a few µs per tile)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.lock = threading.Lock()
            self.last_energy: dict[str, float] = {}
            self.last_state: dict[str, str] = {}
            self.missed_total = 0  # since start, never reset: the ramp's misses too
            # (arrival, lag) of the last 2 s; a deque trimmed from the old end, because this probe runs
            # in Central's process and its CPU counts as Central's (a list rebuilt per snapshot was
            # 1.5 % of the interpreter's time at 1,000 CPs in py-spy)
            self.recent: deque[tuple[float, float]] = deque()
            self.reset()

        def reset(self) -> None:
            self.lags: list[float] = []
            self.lag_times: list[float] = []
            self.snapshots = 0
            self.missed: list[tuple[float, str]] = []
            self.max_gap = 0.0
            self.last_at = 0.0

        def on_receive(self, message: Any) -> Any:
            if isinstance(message, PanelSnapshot):
                now = time.time()
                with self.lock:
                    self.snapshots += 1
                    if self.last_at:
                        self.max_gap = max(self.max_gap, now - self.last_at)
                    self.last_at = now
                    for tile in message.tiles:
                        before = self.last_state.get(tile.cp_id)
                        if tile.state == "DISCONNECTED" and before not in (None, "DISCONNECTED"):
                            self.missed.append((now, tile.cp_id))
                            self.missed_total += 1
                        self.last_state[tile.cp_id] = tile.state
                        if tile.state == "SUPPLYING" and tile.energy_kwh > 0 \
                                and tile.energy_kwh != self.last_energy.get(tile.cp_id):
                            self.last_energy[tile.cp_id] = tile.energy_kwh
                            lag = now - sent_at(tile.energy_kwh, t0)
                            self.lags.append(lag)
                            self.lag_times.append(now)
                            self.recent.append((now, lag))
                    while self.recent and now - self.recent[0][0] > 2.0:
                        self.recent.popleft()
            elif isinstance(message, ProbeWindow):
                with self.lock:
                    return self.window()
            elif isinstance(message, ProbeLag):  # median lag over the last 2 s (the parent waits for it to settle)
                with self.lock:
                    return pct([lag for t, lag in self.recent if time.time() - t <= 2.0], 50)
            elif isinstance(message, ProbeMark):
                with self.lock:
                    self.reset()
                return True
            return super().on_receive(message)

        def window(self) -> dict[str, Any]:
            states: dict[str, int] = {}
            for s in self.last_state.values():
                states[s] = states.get(s, 0) + 1
            # does Central keep up? the median lag of the first and of the last 5 s of the window
            first = [lag for lag, t in zip(self.lags, self.lag_times) if t - self.lag_times[0] <= 5] if self.lags else []
            last = [lag for lag, t in zip(self.lags, self.lag_times) if self.lag_times[-1] - t <= 5] if self.lags else []
            return {"lag_samples": len(self.lags), "lag_p50_first5_s": pct(first, 50), "lag_p50_last5_s": pct(last, 50), "lag_p50_s": pct(self.lags, 50), "lag_p95_s": pct(self.lags, 95),
                    "lag_p99_s": pct(self.lags, 99), "lag_max_s": max(self.lags) if self.lags else float("nan"),
                    "snapshots": self.snapshots, "snapshot_max_gap_s": self.max_gap,
                    "missed_life": len(self.missed), "missed_cps": sorted({c for _, c in self.missed})[:20],
                    "missed_life_since_start": self.missed_total,
                    "states_now": states}

    return PanelProbe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--group-id", default="evcharging-central")
    p.add_argument("--life-timeout", type=float, default=None, help="default: EV_Central's")
    p.add_argument("--t0", type=float, default=0.0, help="the simulated meters' zero (epoch seconds)")
    p.add_argument("--log-file", default=None)
    p.add_argument("--deadline", type=float, default=900.0, help="exit after this many seconds whatever happens")
    p.add_argument("--api", action="store_true", help="also run API_Central (HTTPS on a free loopback port)")
    args = p.parse_args(argv)

    from pathlib import Path

    import supervisors.central_system as central_system
    from supervisors.central_system import CentralSystemConfig, start_central
    from supervisors.system import tune_gc
    from transport.listener import ListenerPort

    quiet_logging(Path(args.log_file) if args.log_file else None)
    central_system.PanelActor = make_probe(args.t0)  # the one instrumented actor
    config = CentralSystemConfig(enroll="open", port=0, broker=args.broker, db_path=args.db, host=LOOPBACK,
                                 topic_prefix=args.topic_prefix, panel="off", console=False, group_id=args.group_id,
                                 **({} if args.life_timeout is None else {"life_timeout": args.life_timeout}),
                                 **({"api_port": 0, "api_host": LOOPBACK} if args.api else {}))
    system = start_central(config)
    tune_gc()  # as the program does (supervisors.system.run_until_signal)
    port = system.ask("monitor-listener", ListenerPort())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"ready {port}", flush=True)
    if args.api:
        info = central_system.api_info(system)
        assert info is not None and info.ca_path
        print(f"api {info.url} {info.ca_path} {info.token_source}", flush=True)


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
                with open(cmd.split(" ", 1)[1], "w", encoding="utf-8") as f:
                    json.dump(data, f)
                print("dumped", flush=True)
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    stop.wait(args.deadline)
    system.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
