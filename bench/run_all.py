"""``make bench``: the benchmarks, each in its own process, then one summary table.

With ``--repeat N`` (``make bench REPEAT=N``) it runs all of it N times and prints min / median / max per
figure; a target counts as met only if every run met it.

Order: ingest (plain and sealed), latency, restart, scale, durability, auth, api.
Each benchmark gets a time budget (its cap, or what is left of the total, 740 s by default); one that overruns is
stopped and reported as not finished, the others still run. Results (the
table, every row's note and each benchmark's details) are written to
``run/bench/<time>-summary.json`` and ``.md`` (each run's logs and databases
are under ``run/bench/<time>-<benchmark>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import ROOT, Row, bench_env, fmt, machine, python_module_cmd, render_table

#: module, its own arguments, time cap (s), seconds to keep for the benchmarks after it
BENCHES = [
    ("bench.ingest", [], 170, 550),
    ("bench.latency", [], 140, 410),
    ("bench.restart", [], 100, 310),
    ("bench.scale", [], 300, 170),
    ("bench.durability", [], 40, 130),
    ("bench.auth", [], 40, 90),
    ("bench.api", [], 90, 0),
]
QUICK = {
    "bench.ingest": ["--records", "10000"],
    "bench.latency": ["--list", "200", "--charge", "40"],
    "bench.restart": ["--kills", "20", "--monitors", "10", "--rounds", "1"],
    "bench.scale": ["--cps", "50", "200", "--window", "10", "--small-window", "8", "--settle-max", "10"],
    "bench.durability": ["--sessions", "100", "--rounds", "1"],
    "bench.auth": ["--cps", "10", "--window", "2"],
    "bench.api": ["--cps", "200", "--window", "8", "--gets", "50"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=740.0, help="total seconds for all of them")
    p.add_argument("--quick", action="store_true", help="small sizes, for trying the harness (figures not comparable)")
    p.add_argument("--only", nargs="*", default=None, help="run only these (ingest latency restart scale durability auth api)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run everything this many times; the table shows min / median / max and a target is met "
                        "only if the worst run meets it")
    args = p.parse_args(argv)
    if args.repeat > 1:
        return repeat(args)
    return one_run(args)


def repeat(args: argparse.Namespace) -> int:
    """``make bench REPEAT=N``: N whole runs one after the other, then one table over them."""
    out_dir = ROOT / "run" / "bench"
    runs: list[dict[str, object]] = []
    for n in range(1, args.repeat + 1):
        print(f"\n##### run {n} of {args.repeat} #####", flush=True)
        before = set(out_dir.glob("*-summary.json")) if out_dir.exists() else set()
        one_run(argparse.Namespace(**{**vars(args), "repeat": 1}))
        (made,) = set(out_dir.glob("*-summary.json")) - before
        runs.append(json.loads(made.read_text()))
    table, rows = combine(runs)
    met = [r for r in rows if r["met"] is not None]
    print(f"\n=== {args.repeat} runs, {time.strftime('%Y-%m-%d')}: min / median / max; met = met in every run ===")
    print(table)
    print(f"\n{sum(bool(r['met']) for r in met)} of {len(met)} targets met in the worst of {args.repeat} runs.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{stamp}-repeat{args.repeat}.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs, "rows": rows}, indent=2, default=str),
        encoding="utf-8")
    (out_dir / f"{stamp}-repeat{args.repeat}.md").write_text(table + "\n", encoding="utf-8")
    return 0


def combine(runs: list[dict[str, object]]) -> tuple[str, list[dict[str, object]]]:
    """One row per figure over the runs: min / median / max of its value, met only if met in every run."""
    order: list[str] = []
    by_figure: dict[str, list[dict[str, object]]] = {}
    for run in runs:
        for r in run["rows"]:
            if r["figure"] not in by_figure:
                order.append(r["figure"])
            by_figure.setdefault(r["figure"], []).append(r)
    rows: list[dict[str, object]] = []
    lines = [("figure", "min", "median", "max", "target", "met (worst run)")]
    for figure in order:
        got = by_figure[figure]
        values = sorted(float(r["value"]) for r in got if r["value"] is not None)
        unit = str(got[0].get("unit") or "")
        mets = [r["met"] for r in got]
        met = None if all(m is None for m in mets) else (len(got) == len(runs) and all(bool(m) for m in mets))
        mid = values[len(values) // 2] if values else None
        rows.append({"figure": figure, "unit": unit, "values": values, "runs": len(got), "target": got[0]["target"],
                     "met": met})
        lines.append((figure, fmt(values[0] if values else None, unit), fmt(mid, unit),
                      fmt(values[-1] if values else None, unit), str(got[0]["target"] or "—"),
                      "—" if met is None else ("yes" if met else f"NO ({sum(bool(m) for m in mets)}/{len(runs)})")))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out), rows


def one_run(args: argparse.Namespace) -> int:
    out_dir = ROOT / "run" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    info = machine()
    print(f"EV charging benchmarks — {time.strftime('%Y-%m-%d %H:%M')} — {info['cpus']} CPUs "
          f"({info['cpu_model']}), Python {info['python']}, load average {info['loadavg_at_start'][0]:.2f}",
          flush=True)
    rows: list[Row] = []
    details: dict[str, object] = {}
    for module, extra, cap, keep in BENCHES:
        name = module.split(".")[1]
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.monotonic() - started)
        budget = min(cap, left - (0 if args.only else keep))
        if budget < 20:
            rows.append(Row(f"{name}: not run", None, target="runs", met=False, note="no time left in the budget",
                            bench=name))
            continue
        path = out_dir / f"{stamp}-{name}.json"
        if module == "bench.scale":  # it skips levels rather than overrun
            extra = [*extra, "--budget", f"{budget - 15:.0f}"]
        cmd = python_module_cmd(module, "--json", str(path), *extra, *(QUICK[module] if args.quick else []))
        print(f"\n=== {name} (up to {budget:.0f} s, load average {os.getloadavg()[0]:.2f}) ===", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=bench_env(), cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # the benchmark and the children it started, by its process group
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
            code = None
        took = time.monotonic() - t0
        if path.exists():
            data = json.loads(path.read_text())
            rows += [Row(**r) for r in data["rows"]]
            details[name] = dict(data["details"], seconds=round(took, 1))
        else:
            why = "timed out" if code is None else f"exited with code {code}"
            rows.append(Row(f"{name}: did not finish", None, target="runs", met=False, note=f"{why} after {took:.0f} s",
                            bench=name))
            details[name] = {"seconds": round(took, 1), "error": why}
    total = time.monotonic() - started
    table = render_table(rows)
    notes = "\n".join(f"- {r.figure}: {r.note}" for r in rows if r.note)
    print(f"\n=== summary ({total:.0f} s in all; {time.strftime('%Y-%m-%d')}) ===\n{table}\n\nnotes:\n{notes}")
    met = [r for r in rows if r.met is not None]
    print(f"\n{sum(bool(r.met) for r in met)} of {len(met)} targets met. Details: {out_dir / (stamp + '-summary.json')}")
    (out_dir / f"{stamp}-summary.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": info, "seconds": round(total, 1), "quick": args.quick,
         "rows": [r.to_json() for r in rows], "details": details}, indent=2, default=str), encoding="utf-8")
    md = ["| figure | value | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = "—" if r.met is None else ("yes" if r.met else "**no**")
        md.append(f"| {r.figure} | {fmt(r.value, r.unit)} | {fmt(r.baseline, r.unit)} | {fmt(r.ratio)} | "
                  f"{r.target or '—'} | {m} |")
    (out_dir / f"{stamp}-summary.md").write_text("\n".join(md) + "\n\n" + notes + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
