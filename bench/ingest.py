"""Telemetry ingest: Central versus a bare kafka-python consumer, same records, same broker, same run.

1. A fresh Tansu broker; Central's database is seeded with ``--sessions`` CPs,
   each with a live (supplying) session, exactly what Central reloads after a
   restart.
2. ``--records`` ``charging_data`` records (default 50,000) are produced to
   ``charging_session_data`` (key = CP id, ``seq`` 1, 2, ... per session),
   before anything consumes them.
3. Baseline: a plain ``KafkaConsumer`` with the settings of Central's pump
   (fresh group, earliest, ``max_poll_records`` as Central's telemetry pump, ``fetch_max_wait_ms`` 10,
   a synchronous commit after each poll, i.e. the same at-least-once
   contract) reads all of them. Rate = records / (last record - first record).
4. Central (``start_central`` in this process, panel off) starts with its own
   fresh group and reads the same records: the pump decodes and validates
   each record, the router hands it to its session actor, which dedupes by
   ``seq``, updates Central's CP view, queues a ledger checkpoint and
   publishes a ``charging_status_update`` to the driver (acks=all) — the
   newest of each session per poll, so a backlog is not replayed to drivers
   reading by reading. Rate = records / (first record routed -> every
   session applied its last record and every driver update it published was
   acknowledged by the broker). Afterwards the bench checks what "durable as designed" means:
   the ledger's batched checkpoints reached the last ``seq`` of every
   session in SQLite and the pump committed every offset.
   The process's garbage collector is tuned as Central's program tunes it
   (``supervisors.system.tune_gc``) before anything runs, so the baseline
   and Central read under the same collector.
5. Sealed (issue #11): the same number of records, each sealed as an Engine
   seals it (AES-256-GCM with its CP's key, ``sealed`` envelope), on topics of
   their own; a bare consumer reads them (baseline: the bigger records), then
   Central with security on (``--enroll registry``) opens every one with its
   keyring (key check, replay counter, decryption, inner decode) before routing.
   Rows: sealed ingest versus its bare consumer and versus Central's plain
   ingest (the price of the trust boundary).
6. Targets: issue #14's (>= 15,000 rec/s and >= 0.8x the bare consumer, plain and
   sealed); the sealed row's note says whether issue #11's 10,000 rec/s is met.
   Each Central phase also reports its CPU per record (process user+sys, all
   threads; CPU-seconds per 100k records), its time in the garbage collector,
   and the details say which CRC-32C kafka-python checks fetched batches with
   (the ``crc32c`` package's C one or its pure-Python loop: every figure moves
   with it, see bench/README.md section 6).
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
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
    quiet_logging,
    run_dir,
    start_broker,
    thread_cpu,
    thread_names,
    topics,
    wait_until,
)

#: Issue #14, item 2: plain and sealed, each against the bare consumer of the same records in the same run.
TARGET_RATE = 15_000.0
TARGET_RATIO = 0.8
#: Issue #11's target for sealed ingest (said in the sealed row's note).
TARGET_RATE_SEALED_11 = 10_000.0


def kafka_crc() -> str:
    """Which CRC-32C kafka-python checks each fetched batch with: the C one of the optional ``crc32c``
    package, or its own pure-Python loop (most of a bare consumer's CPU: every figure here moves with it)."""
    try:
        from kafka.record import util
    except ImportError:
        return "unknown"
    return "C (crc32c package)" if getattr(util, "crc32c_c", None) is not None else "pure Python (no crc32c package)"


class GcClock:
    """Seconds this process spent in the cyclic garbage collector, and collections per generation,
    while ``running`` (gc.callbacks; the collector runs in whichever thread allocates)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self.running = False
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.running:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1
            self._started = 0.0


def seed(db: Path, sessions: int, keys: dict[str, tuple[str, bytes]] | None = None) -> list[tuple[str, str, str]]:
    """CPs with one supplying session each: [(cp_id, session_id, driver_id)]; with ``keys``
    (filled in here) each CP also gets a key as Central's gatekeeper stores it."""
    from persistence import Repository
    from transport import security

    out = []
    now = time.time()
    with Repository(db) as repo:
        for i in range(sessions):
            cp, sid, drv = f"CP{i:04d}", f"S{i:010d}", f"drv{i:04d}"
            repo.upsert_cp(cp, f"Site {i}", 0.30)
            repo.open_session(sid, cp, drv, 0.30, now)
            repo.mark_supplying(sid, now)
            if keys is not None:
                keys[cp] = (security.new_key_id(), security.new_key())
                repo.store_key(keys[cp][0], cp, keys[cp][1], now)
            out.append((cp, sid, drv))
    return out


def produce(settings: Any, live: list[tuple[str, str, str]], records: int,
            keys: dict[str, tuple[str, bytes]] | None = None) -> dict[str, float]:
    """Write the telemetry (round-robin over sessions), sealed with ``keys`` when given; returns the rate."""
    from kafka import KafkaProducer

    from transport import protocol, security

    counter = security.MicroCounter()
    boxes = {cp: security._Aead(key) for cp, (_kid, key) in (keys or {}).items()}

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, enable_idempotence=False, acks="all",
                             linger_ms=20, batch_size=512 * 1024, max_request_size=4 * 1024 * 1024)
    topic = settings.topic("charging_session_data")
    started = time.perf_counter()
    for i in range(records):
        cp, sid, drv = live[i % len(live)]
        seq = i // len(live) + 1
        msg: protocol.Message = protocol.ChargingData(cp_id=cp, session_id=sid, driver_id=drv, seq=seq,
                                                      energy_kwh=seq * 0.002, cost_eur=seq * 0.0006, power_kw=7.4)
        if keys is not None:
            msg = security.seal(boxes[cp], cp, keys[cp][0], "engine", counter.next(), msg)
        producer.send(topic, key=cp.encode(), value=protocol.encode(msg))
    producer.flush(120)
    producer.close(5)
    return {"records_per_s": records / (time.perf_counter() - started)}


def bare_consumer(settings: Any, records: int, timeout: float, group: str = "bench-bare") -> dict[str, float]:
    """The baseline: read every record with a plain consumer, commit after each poll."""
    from kafka import KafkaConsumer

    from supervisors.central_system import SESSIONS_POLL_RECORDS

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, client_id=group,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=settings.fetch_max_wait_ms, max_poll_records=SESSIONS_POLL_RECORDS)
    consumer.subscribe([settings.topic("charging_session_data")])
    seen, first, last = 0, None, None
    deadline = time.monotonic() + timeout
    cpu0 = 0.0
    while seen < records and time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=100, max_records=SESSIONS_POLL_RECORDS)
        if not batch:
            continue
        now = time.perf_counter()
        if first is None:
            first, cpu0 = now, proc_cpu_seconds_self()
        seen += sum(len(r) for r in batch.values())
        consumer.commit()
        last = time.perf_counter()
    cpu = proc_cpu_seconds_self() - cpu0
    consumer.close()
    if seen < records or first is None or last is None or last <= first:
        raise RuntimeError(f"the bare consumer read only {seen} of {records} records in {timeout:g} s")
    return {"records": seen, "seconds": last - first, "records_per_s": seen / (last - first), "cpu_s": cpu,
            "cpu_s_per_100k": cpu / seen * 1e5}


def proc_cpu_seconds_self() -> float:
    import os

    return proc_cpu_seconds(os.getpid())


def central_ingest(settings: Any, db: Path, live: list[tuple[str, str, str]], records: int,
                   timeout: float, sealed: bool = False) -> dict[str, Any]:
    from actors.messages import RouterStats, SessionStats
    from supervisors.central_system import CentralSystemConfig, start_central
    from transport.kafka import GetPublisherStats

    # sealed: security on; the keys were stored before this start, so they are "replaced" keys
    # to Central (it retires every key at start) and open records within key_grace: long here.
    config = CentralSystemConfig(enroll="registry" if sealed else "open", key_grace=3600.0, port=0, host=LOOPBACK,
                                 broker=settings.bootstrap, db_path=str(db), topic_prefix=settings.topic_prefix,
                                 panel="off", console=False, group_id="bench-central")
    system = start_central(config)
    gc_clock = GcClock()
    try:
        deadline = time.monotonic() + timeout

        def routed() -> int:
            try:
                return int(system.ask("router", RouterStats(), timeout=5)["data"])
            except Exception:
                return 0

        first = None
        gc.callbacks.append(gc_clock)
        while time.monotonic() < deadline:
            if routed() > 0:
                first = time.perf_counter()
                threads0, cpu0 = thread_cpu(), proc_cpu_seconds_self()
                gc_clock.running = True
                break
            time.sleep(0.002)
        if first is None:
            raise RuntimeError(f"Central routed no record within {timeout:g} s")
        all_routed = wait_until(lambda: routed() >= records, deadline - time.monotonic(), 0.02)
        routed_at = time.perf_counter()

        final_seq = {sid: len(range(i, records, len(live))) for i, (_, sid, _) in enumerate(live)}

        def acked() -> bool:
            for _, sid, _ in live:  # each session applied its last record (and so published it) ...
                if system.ask(f"session:{sid}", SessionStats(), timeout=10)["last_seq"] < final_seq[sid]:
                    return False
            s = system.ask("publisher", GetPublisherStats(), timeout=10)
            return bool(s["pending"] == 0)  # ... and the broker acknowledged every update

        done = wait_until(acked, max(0.0, deadline - time.monotonic()), 0.02)
        done_at = time.perf_counter()
        cpu = proc_cpu_seconds_self() - cpu0
        gc_clock.running = False
        by_kind = cpu_by_kind(threads0, thread_cpu(), thread_names())
        if not (all_routed and done):
            raise RuntimeError(f"Central did not finish {records} records within {timeout:g} s")
        applied = {sid: system.ask(f"session:{sid}", SessionStats(), timeout=10)["last_seq"] for _, sid, _ in live}
        stats = system.ask("router", RouterStats(), timeout=10)
        pub = system.ask("publisher", GetPublisherStats(), timeout=10)
        # durable as designed: checkpoints flushed by the ledger (batched, once a second) ...
        durable = wait_until(lambda: checkpoints(db) == final_seq, 10, 0.05)
        durable_at = time.perf_counter()
        # ... and the pump's committed offsets cover every record
        committed = wait_until(lambda: committed_offsets(settings, settings.topic_prefix + "bench-central-sessions") >= records, 10, 0.1)
        return {
            "records": records, "seconds": done_at - first, "records_per_s": records / (done_at - first),
            "route_seconds": routed_at - first, "cpu_s": cpu, "cpu_s_per_100k": cpu / records * 1e5,
            "gc_seconds": round(gc_clock.seconds, 3), "gc_collections_by_generation": gc_clock.collections,
            "cpu_us_per_record_by_thread_kind": {k: round(v / records * 1e6, 1) for k, v in by_kind.items()},
            "sessions_applied_all": applied == final_seq,
            "router": stats, "publisher": pub,
            "checkpoints_durable": bool(durable), "checkpoints_durable_after_s": durable_at - done_at,
            "offsets_committed": bool(committed),
        }
    finally:
        if gc_clock in gc.callbacks:
            gc.callbacks.remove(gc_clock)
        system.stop()


def checkpoints(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT session_id, last_seq FROM sessions").fetchall())
    finally:
        conn.close()


def committed_offsets(settings: Any, group: str) -> int:
    """Sum of the offsets ``group`` committed on charging_session_data (-1 if unknown)."""
    from kafka import KafkaConsumer, TopicPartition

    from transport.broker import TOPICS

    topic = settings.topic("charging_session_data")
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, client_id="bench-offsets",
                             enable_auto_commit=False)
    try:
        total = 0
        for p in range(TOPICS["charging_session_data"]):
            total += consumer.committed(TopicPartition(topic, p)) or 0
        return total
    except Exception:
        return -1
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> Report:
    report = Report("ingest")
    rd = run_dir("ingest")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    report.details["kafka_crc32c"] = kafka_crc()
    broker = start_broker(rd)
    try:
        settings = topics(broker, "ingest.")
        db = rd / "central.db"
        live = seed(db, args.sessions)
        report.details["produce"] = produce(settings, live, args.records)
        base = bare_consumer(settings, args.records, args.timeout)
        report.details["bare"] = base
        central = central_ingest(settings, db, live, args.records, args.timeout)
        report.details["central"] = central
        if args.sealed:
            ssettings = topics(broker, "ingest-sealed.")
            sdb = rd / "central-sealed.db"
            keys: dict[str, tuple[str, bytes]] = {}
            slive = seed(sdb, args.sessions, keys)
            report.details["produce_sealed"] = produce(ssettings, slive, args.records, keys)
            report.details["bare_sealed"] = bare_consumer(ssettings, args.records, args.timeout, "bench-bare-sealed")
            report.details["central_sealed"] = central_ingest(ssettings, sdb, slive, args.records, args.timeout,
                                                              sealed=True)
    finally:
        broker.stop()
    ratio = central["records_per_s"] / base["records_per_s"]
    ok = central["sessions_applied_all"] and central["checkpoints_durable"] and central["offsets_committed"]
    updates = central["publisher"].get("acked", 0)
    crc = report.details["kafka_crc32c"]
    note = (f"{args.records} records, {args.sessions} live sessions; all applied, checkpoints and offsets durable; "
            f"{updates:,} driver updates (newest per session per poll); kafka-python's CRC-32C: {crc}"
            if ok else "NOT all applied/durable: see details")
    report.add(Row("ingest: Central records/s (vs bare consumer)", central["records_per_s"], "rec/s",
                   base["records_per_s"], ratio, f">= {TARGET_RATE:,.0f}/s and ratio >= {TARGET_RATIO}",
                   central["records_per_s"] >= TARGET_RATE and ratio >= TARGET_RATIO and ok, note))
    report.add(cpu_row("ingest: Central CPU per record", central, base, args.records))
    if args.sealed:
        sealed, sbase = report.details["central_sealed"], report.details["bare_sealed"]
        opened = sealed["router"].get("opened", 0)
        sok = (sealed["sessions_applied_all"] and sealed["checkpoints_durable"] and sealed["offsets_committed"]
               and opened >= args.records and sealed["router"].get("refused", 0) == 0)
        sratio = sealed["records_per_s"] / sbase["records_per_s"]
        report.add(Row("ingest sealed: Central records/s (vs bare consumer of the sealed records)",
                       sealed["records_per_s"], "rec/s", sbase["records_per_s"], sratio,
                       f">= {TARGET_RATE:,.0f}/s and ratio >= {TARGET_RATIO}",
                       sealed["records_per_s"] >= TARGET_RATE and sratio >= TARGET_RATIO and sok,
                       f"security on: {opened:,} records opened (AES-256-GCM, replay counters), 0 refused; "
                       f"issue #11's >= {TARGET_RATE_SEALED_11:,.0f}/s "
                       + ("met" if sealed["records_per_s"] >= TARGET_RATE_SEALED_11 else "NOT met")
                       if sok else "NOT all opened/applied/durable: see details"))
        report.add(cpu_row("ingest sealed: Central CPU per record", sealed, sbase, args.records))
        report.add(Row("ingest sealed vs plain: Central records/s", sealed["records_per_s"], "rec/s",
                       central["records_per_s"], sealed["records_per_s"] / central["records_per_s"], "", None,
                       "the price of the trust boundary on Central's ingest"))
    return report


def cpu_row(figure: str, central: dict[str, Any], bare: dict[str, Any], records: int) -> Row:
    """Central's CPU per record (all its threads) against the bare consumer's, over the same records."""
    return Row(figure, central["cpu_s"] / records * 1e6, "µs", bare["cpu_s"] / records * 1e6,
               central["cpu_s"] / bare["cpu_s"] if bare["cpu_s"] else None, "", None,
               f"process CPU (user+sys, all threads) / records = {central['cpu_s_per_100k']:.2f} CPU-s per 100k "
               f"records (of which {central['gc_seconds'] / records * 1e6:.1f} µs in the garbage collector); "
               "baseline = bare consumer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--timeout", type=float, default=120.0, help="bound on each consuming phase")
    p.add_argument("--no-sealed", dest="sealed", action="store_false", help="skip the sealed (security on) phase")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    from supervisors.system import tune_gc
    # Central's program tunes its collector once started (supervisors.system.run_until_signal); Central
    # runs in this process here, so this process does, before the baseline too: both read alike.
    tune_gc()
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
