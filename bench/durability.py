"""What ``synchronous=FULL`` costs Central's money database (issue #10, item 7).

Central bills each completion in one SQLite transaction (session completed, CP
state, ticket, message id; ``Repository.complete_session``). With WAL and
``synchronous=NORMAL`` a commit reaches the OS page cache; with ``FULL``
(Central's setting since migration 2's change) every commit is also fsynced, so a
committed ticket survives an OS crash or power cut, not only a SIGKILL.

This bench opens ``--sessions`` sessions (not timed), then bills them one by
one, timing each ``complete_session`` call, on a database file under
``run/bench/`` (the real disk, not tmpfs), once with NORMAL and once with FULL,
in alternating rounds so both see the same machine load. Figures: completions
billed per second (one writer, back to back) and p50/p95 billing latency.
No broker is involved: this is the database's share of billing a completion.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Report, Row, summary
from persistence import Repository


def bill_round(path: Path, durable: bool, sessions: int) -> tuple[float, list[float]]:
    """(completions per second, per-completion latencies in ms) for one fresh database."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Repository(path, durable=durable) as repo:
        now = time.time()
        for i in range(sessions):
            repo.upsert_cp(f"CP{i:05d}", "bench", 0.30)
            repo.open_session(f"S{i:05d}", f"CP{i:05d}", f"D{i:05d}", 0.30, at=now - 600,
                              correlation_id=f"c{i}")
        latencies: list[float] = []
        started = time.perf_counter()
        for i in range(sessions):
            t0 = time.perf_counter()
            repo.complete_session(f"S{i:05d}", 1.25, 0.375, "unplugged", now, "ACTIVE", f"m{i}",
                                  "charging_session_complete", cp_id=f"CP{i:05d}", driver_id=f"D{i:05d}")
            latencies.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - started
    return sessions / elapsed, latencies


def run(args: argparse.Namespace) -> Report:
    report = Report("durability")
    work = ROOT / "run" / "bench" / f"{time.strftime('%Y%m%d-%H%M%S')}-durability"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {"NORMAL": {"rates": [], "lat": []}, "FULL": {"rates": [], "lat": []}}
    try:
        for _ in range(args.rounds):
            for mode in ("NORMAL", "FULL"):
                rate, lat = bill_round(work / f"{mode.lower()}.db", mode == "FULL", args.sessions)
                results[mode]["rates"].append(rate)
                results[mode]["lat"] += lat
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {mode: {"per_s": sorted(r["rates"])[len(r["rates"]) // 2], **summary(r["lat"])}
               for mode, r in results.items()}
    normal, full = figures["NORMAL"], figures["FULL"]
    report.details = {"sessions": args.sessions, "rounds": args.rounds, "figures": figures}
    note = (f"{args.sessions} completions x {args.rounds} rounds per mode, one writer, median round; "
            f"p50 NORMAL {normal['p50']:.2f} ms, FULL {full['p50']:.2f} ms")
    report.add(Row("billing: completions/s, FULL", full["per_s"], "/s", normal["per_s"],
                   full["per_s"] / normal["per_s"], "", None, note + " (baseline: NORMAL)"))
    report.add(Row("billing: p95 latency, FULL", full["p95"], "ms", normal["p95"], full["p95"] / normal["p95"],
                   "", None, "one complete_session transaction (baseline: NORMAL)"))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=500, help="completions billed per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating NORMAL, FULL)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
