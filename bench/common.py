"""Shared helpers of the benchmarks: broker, result rows, percentiles, /proc, bounded waits.

Every figure a benchmark produces is a :class:`Row`; ``run_all`` collects the
rows of the four benchmarks (each one runs in its own process) and prints them
as one table. Nothing here is clever on purpose: the numbers must be easy to
check by reading the code that made them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python bench/x.py as well as python -m bench.x
    sys.path.insert(0, str(ROOT))

from transport.broker import KafkaSettings, LocalBroker, ensure_topics  # noqa: E402

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- result rows ---------------------------------------------------------------------
@dataclass
class Row:
    """One line of the summary table.

    ``ratio`` is value / baseline; ``met`` is True/False against ``target``, or
    None when the figure has no target (context only).
    """

    figure: str
    value: float | None
    unit: str = ""
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    bench: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What one benchmark module hands to run_all: rows plus free-form details."""

    bench: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def add(self, row: Row) -> Row:
        row.bench = self.bench
        self.rows.append(row)
        return row

    def dump(self, path: str | None) -> None:
        self.seconds = time.time() - self.started
        data = {"bench": self.bench, "seconds": round(self.seconds, 1), "rows": [r.to_json() for r in self.rows],
                "details": self.details}
        if path:
            Path(path).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        print(render_table(self.rows))
        print(f"[{self.bench}] {self.seconds:.1f} s")


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return f"{s} {unit}".strip()


def render_table(rows: Iterable[Row]) -> str:
    header = ("figure", "value", "baseline", "ratio", "target", "met?")
    lines = []
    for r in rows:
        met = "—" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.figure, fmt(r.value, r.unit), fmt(r.baseline, r.unit), fmt(r.ratio), r.target or "—", met))
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join(out)


# --- statistics ------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99),
            "min": min(values) if values else float("nan"), "max": max(values) if values else float("nan"),
            "mean": sum(values) / len(values) if values else float("nan")}


# --- /proc (no psutil) -----------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB and the thread count, from /proc/<pid>/status."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024.0
        elif key == "Threads":
            out[key] = int(rest.split()[0])
    return out


def thread_cpu(pid: int | None = None) -> dict[int, float]:
    """CPU seconds of every thread of a process (default: this one), by thread id."""
    base = f"/proc/{pid or 'self'}/task"
    out = {}
    for tid in os.listdir(base):
        try:
            raw = Path(f"{base}/{tid}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        out[int(tid)] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def thread_names() -> dict[int, str]:
    """Native thread id -> Python thread name, for this process."""
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def cpu_by_kind(before: dict[int, float], after: dict[int, float], names: dict[int, str],
                total: float | None = None) -> dict[str, float]:
    """CPU seconds between two thread_cpu() snapshots, summed by kind of thread (name without numbers).

    With ``total`` (the process's CPU over the same span), the rest is shown as
    "(unattributed)": threads that ended, and the per-thread counters of
    ``/proc/<pid>/task/*/stat`` lag behind the process total for threads that
    run in many tiny bursts (here: the three threads per CP).
    """
    kinds: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, "?")
        kind = re.sub(r"\[.*?\]", "", name)
        kind = re.sub(r"\d+", "", kind).strip("-_ ()") or "?"
        kinds[kind] = kinds.get(kind, 0.0) + cpu - before.get(tid, 0.0)
    if total is not None:
        kinds["(unattributed)"] = total - sum(kinds.values())
    return dict(sorted(((k, round(v, 2)) for k, v in kinds.items() if abs(v) > 0.005), key=lambda kv: -kv[1]))


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg()}


# --- waiting -----------------------------------------------------------------------------
def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """Poll ``cond`` until truthy (returned) or ``timeout`` s passed (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --- broker and run directory ------------------------------------------------------------
def run_dir(bench: str) -> Path:
    d = ROOT / "run" / "bench" / f"{time.strftime('%Y%m%d-%H%M%S')}-{bench}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_broker(where: Path) -> LocalBroker:
    """A fresh Tansu broker (memory storage) on a free loopback port."""
    return LocalBroker(host=LOOPBACK, log_path=where / "tansu.log").start()


def topics(broker: LocalBroker, prefix: str) -> KafkaSettings:
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=prefix)
    ensure_topics(settings)
    return settings


def quiet_logging(log_file: Path | None = None) -> None:
    """Warnings of our own loggers to a file; library chatter (kafka, pykka) muted."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("pykka").setLevel(logging.CRITICAL)


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def bench_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
