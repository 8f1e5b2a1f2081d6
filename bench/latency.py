"""Driver request latency: Kafka round trips from a driver client to Central and back, p50/p95/p99.

* Central is the real program (``python -m supervisors.cli central``, panel
  off, ``--enroll open``: requests unsigned, as in the other Central benchmarks; ``bench.auth``
  measures what signatures and logins cost) in its own process, seeded with ``--cps`` CPs; ``--live`` of them have
  a simulated Monitor (``bench.simcp.Fleet``: real framed sockets,
  registration, a heartbeat a second, authorisations accepted at once).
* The driver client is a plain KafkaProducer/KafkaConsumer pair with the
  settings of the project's Driver (acks=all, linger 1 ms; its own
  ``driver_responses`` partition, ``fetch_max_wait_ms`` 10) that decodes
  answers with ``transport.protocol``. Requests are sequential: send, wait
  for the answer carrying the same ``correlation_id``, next.
* ``available_cps_request`` x ``--list`` (1,000): the answer lists every CP.
* ``charge_request`` x ``--charge`` (200), round-robin over the live CPs:
  the time until ``charge_response`` (Central checks, opens the session in
  SQLite, asks the CP over its socket, the CP accepts, Central answers).
  Between two requests, outside the timing, the bench plays the Engine:
  it publishes the ``charge_completion`` and waits for the ``ticket``, so
  the CP is free again.
* Baseline, same broker, same client, same run: an echo service with the
  consumer settings of Central's pump (group, ``fetch_max_wait_ms`` 10,
  commit after each poll) that answers each request with an
  ``available_cps_response`` of the same size, built with ``json`` only:
  the floor that two hops through this Kafka broker impose.

``--warmup`` requests of each kind are sent first and not counted.
"""

from __future__ import annotations

import argparse
import json
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

TARGET_LIST_P95_MS = 15.0  #: issue #14; and within TARGET_LIST_RATIO of the bare echo
TARGET_LIST_RATIO = 1.2
TARGET_CHARGE_P95_MS = 30.0  #: issue #14


class DriverClient:
    """A driver's Kafka ends, with the Driver's settings; sequential request/response."""

    def __init__(self, settings: Any, drivers: list[str]) -> None:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        from transport.broker import TOPICS
        from transport.kafka import partition_for

        self.settings = settings
        self.producer = KafkaProducer(bootstrap_servers=settings.bootstrap, client_id="bench-driver", acks="all",
                                      enable_idempotence=False, linger_ms=1)
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, client_id="bench-driver",
                                      enable_auto_commit=False, fetch_max_wait_ms=settings.fetch_max_wait_ms)
        topic = settings.topic("driver_responses")
        tps = sorted({TopicPartition(topic, partition_for(d, TOPICS["driver_responses"])) for d in drivers})
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)
        self.requests = settings.topic("driver_requests")
        self.pending: list[Any] = []

    def send(self, topic: str, key: str, msg: Any) -> None:
        from transport import protocol

        self.producer.send(topic, key=key.encode(), value=protocol.encode(msg))
        self.producer.flush(5)

    def wait(self, match: Callable[[Any], bool], timeout: float) -> Any | None:
        """The first answer matching ``match`` (earlier unmatched answers are kept)."""
        from transport import protocol

        for i, m in enumerate(self.pending):
            if match(m):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=50, max_records=500).values():
                for r in records:
                    try:
                        self.pending.append(protocol.decode(r.value))
                    except protocol.ProtocolError:
                        continue
            for i, m in enumerate(self.pending):
                if match(m):
                    return self.pending.pop(i)
            if len(self.pending) > 10_000:
                del self.pending[:5_000]
        return None

    def roundtrip(self, key: str, msg: Any, match: Callable[[Any], bool], timeout: float = 10.0) -> tuple[float | None, Any]:
        started = time.perf_counter()
        self.producer.send(self.requests, key=key.encode(), value=_encode(msg))
        answer = self.wait(match, timeout)
        return (time.perf_counter() - started if answer is not None else None), answer

    def close(self) -> None:
        self.producer.close(2)
        self.consumer.close()


def _encode(msg: Any) -> bytes:
    from transport import protocol

    return protocol.encode(msg)


def list_requests(client: DriverClient, driver: str, n: int, warmup: int) -> tuple[list[float], int]:
    from transport import protocol

    samples, failures = [], 0
    for i in range(warmup + n):
        corr = protocol.new_id()
        lat, _ = client.roundtrip(driver, protocol.AvailableCpsRequest(driver_id=driver, correlation_id=corr),
                                  lambda m, c=corr: getattr(m, "correlation_id", None) == c)
        if i < warmup:
            continue
        if lat is None:
            failures += 1
        else:
            samples.append(lat)
    return samples, failures


def charge_requests(client: DriverClient, settings: Any, live: list[str], n: int, warmup: int) -> dict[str, Any]:
    """Sequential charge round trips; the bench ends each supply (as the Engine would) between two."""
    from transport import protocol

    samples, denied, failures, tickets_missing = [], {}, 0, 0
    complete_topic = settings.topic("charging_session_complete")
    for i in range(warmup + n):
        cp = live[i % len(live)]
        driver = f"lat-{cp}"
        corr = protocol.new_id()
        lat, answer = client.roundtrip(
            driver, protocol.ChargeRequest(driver_id=driver, cp_id=cp, correlation_id=corr),
            lambda m, c=corr: isinstance(m, protocol.ChargeResponse) and m.correlation_id == c)
        if answer is None:
            failures += 1
            continue
        if answer.status != "authorized":
            denied[answer.reason] = denied.get(answer.reason, 0) + 1
            time.sleep(0.2)
            continue
        if i >= warmup:
            samples.append(lat)
        sid = answer.session_id
        client.send(complete_topic, cp, protocol.ChargeCompletion(
            cp_id=cp, session_id=sid, driver_id=driver, energy_kwh=0.5, cost_eur=0.15, end_reason="unplugged"))
        if client.wait(lambda m, s=sid: isinstance(m, protocol.Ticket) and m.session_id == s, 10) is None:
            tickets_missing += 1
        else:
            client.send(client.requests, driver, protocol.TicketAck(driver_id=driver, session_id=sid))
    return {"samples": samples, "denied": denied, "failures": failures, "tickets_missing": tickets_missing}


# --- the baseline: an echo service ------------------------------------------------------------
def echo_main(argv: list[str]) -> int:
    """A bare Kafka request/response service with the pump's consumer settings (runs as a child)."""
    from kafka import KafkaConsumer, KafkaProducer

    from transport.broker import KafkaSettings

    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--topic-prefix", required=True)
    p.add_argument("--cps", type=int, default=20)
    p.add_argument("--deadline", type=float, default=300.0)
    args = p.parse_args(argv)
    settings = KafkaSettings(bootstrap=args.broker, topic_prefix=args.topic_prefix)
    consumer = KafkaConsumer(bootstrap_servers=args.broker, group_id="bench-echo", client_id="bench-echo",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=settings.fetch_max_wait_ms, max_poll_records=500)
    consumer.subscribe([settings.topic("driver_requests")])
    producer = KafkaProducer(bootstrap_servers=args.broker, client_id="bench-echo", acks="all",
                             enable_idempotence=False, linger_ms=1)
    cps = [{"cp_id": f"CP{i:03d}", "location": f"Site {i}", "price_eur_kwh": 0.3, "state": "DISCONNECTED"}
           for i in range(args.cps)]
    out = settings.topic("driver_responses")
    deadline = time.monotonic() + args.deadline
    ready = False
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=100, max_records=500)
        if not ready and consumer.assignment():
            ready = True
            print("ready", flush=True)
        for records in batch.values():
            for r in records:
                req = json.loads(r.value)
                if req.get("type") == "quit":
                    return 0
                if req.get("type") != "available_cps_request":
                    continue
                answer = {"type": "available_cps_response", "driver_id": req["driver_id"],
                          "correlation_id": req["correlation_id"], "charging_points": cps, "status": "ok"}
                producer.send(out, key=r.key, value=json.dumps(answer, separators=(",", ":")).encode())
        if batch:
            consumer.commit()
    return 0


def run_echo(settings: Any, rd: Path, n: int, warmup: int, cps: int) -> tuple[list[float], int]:
    from bench.procs import Child

    child = Child("echo", python_module_cmd("bench.latency", "--echo", "--broker", settings.bootstrap,
                                            "--topic-prefix", settings.topic_prefix, "--cps", str(cps)),
                  rd / "echo.stderr")
    client = None
    try:
        if child.expect(lambda line: line == "ready", 60) is None:
            raise RuntimeError("the echo service did not join its group")
        client = DriverClient(settings, ["echo-d"])
        return list_requests(client, "echo-d", n, warmup)
    finally:
        if client is not None:
            client.producer.send(settings.topic("driver_requests"), key=b"echo-d", value=b'{"type":"quit"}')
            client.producer.flush(5)
            client.close()
        child.stop(10)


def run_central(settings: Any, rd: Path, args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    from bench.simcp import Fleet
    from persistence import Repository
    from transport.broker import free_port, wait_for_port

    db = rd / "central.db"
    with Repository(db) as repo:
        for i in range(args.cps):
            repo.upsert_cp(f"CP{i:03d}", f"Site {i}", 0.30)
    port = free_port(LOOPBACK)
    log = open(rd / "central.stderr", "ab")
    central = subprocess.Popen(
        python_module_cmd("supervisors.cli", "central", str(port), settings.bootstrap, "--db", str(db),
                          "--host", LOOPBACK, "--topic-prefix", settings.topic_prefix, "--panel", "off",
                          # unsigned requests and unauthenticated CPs, as the other Central benchmarks: this
                          # measures the round trip; bench.auth measures what signing and logins cost
                          "--enroll", "open",
                          "--no-console", "--log-file", str(rd / "central.log"), "--log-level", "WARNING"),
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=bench_env())
    fleet = client = None
    try:
        if not wait_for_port(LOOPBACK, port, 30):
            raise RuntimeError(f"Central did not listen on {port}; see {rd / 'central.log'}")
        live = [f"CP{i:03d}" for i in range(args.live)]
        fleet = Fleet((LOOPBACK, port), live).start()
        deadline = time.monotonic() + 20
        while fleet.counts()["registered"] < len(live) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # first heartbeats handled: the CPs are ACTIVE
        drivers = ["lat-list"] + [f"lat-{cp}" for cp in live]
        client = DriverClient(settings, drivers)
        list_samples, list_fail = list_requests(client, "lat-list", args.list, args.warmup)
        charge = charge_requests(client, settings, live, args.charge, args.warmup)
        return {"list": list_samples, "list_failures": list_fail, "charge": charge, "fleet": fleet.counts()}
    finally:
        if client is not None:
            client.close()
        if fleet is not None:
            fleet.stop()
        central.terminate()
        try:
            central.wait(15)
        except subprocess.TimeoutExpired:
            central.kill()
            central.wait(5)
        log.close()


def run(args: argparse.Namespace) -> Report:
    report = Report("latency")
    rd = run_dir("latency")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    broker = start_broker(rd)
    try:
        echo_samples, echo_fail = run_echo(topics(broker, "echo."), rd, args.list, args.warmup, args.cps)
        central = run_central(topics(broker, "lat."), rd, args)
    finally:
        broker.stop()
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    base, lst, chg = summary(ms(echo_samples)), summary(ms(central["list"])), summary(ms(central["charge"]["samples"]))
    report.details.update(echo=base, echo_failures=echo_fail, list=lst, list_failures=central["list_failures"],
                          charge=chg, charge_denied=central["charge"]["denied"],
                          charge_failures=central["charge"]["failures"],
                          tickets_missing=central["charge"]["tickets_missing"], fleet=central["fleet"])
    note_list = (f"{lst['n']} requests, {central['list_failures']} unanswered; {args.cps} CPs listed; "
                 f"baseline = bare Kafka echo, same client")
    for p in (50, 95, 99):
        key = f"p{p}"
        ratio = lst[key] / base[key]
        report.add(Row(f"latency: list request {key}", lst[key], "ms", base[key], ratio,
                       f"<= {TARGET_LIST_P95_MS:.0f} ms and <= {TARGET_LIST_RATIO}x echo" if p == 95 else "",
                       (lst[key] <= TARGET_LIST_P95_MS and ratio <= TARGET_LIST_RATIO) if p == 95 else None,
                       note_list if p == 95 else ""))
    denied = sum(central["charge"]["denied"].values())
    note_charge = (f"{chg['n']} authorised, {denied} denied, {central['charge']['failures']} unanswered; "
                   f"includes Central->CP->Central over the socket; baseline = bare Kafka echo")
    for p in (50, 95, 99):
        key = f"p{p}"
        report.add(Row(f"latency: charge request {key}", chg[key], "ms", base[key], chg[key] / base[key],
                       f"<= {TARGET_CHARGE_P95_MS:.0f} ms" if p == 95 else "",
                       (chg[key] <= TARGET_CHARGE_P95_MS and chg["n"] > 0) if p == 95 else None,
                       note_charge if p == 95 else ""))
    return report


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--echo"]:
        return echo_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", type=int, default=1000)
    p.add_argument("--charge", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cps", type=int, default=20, help="CPs in Central's registry (listed in every answer)")
    p.add_argument("--live", type=int, default=4, help="CPs with a simulated Monitor (charge targets)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
