"""CP logins per second: authenticated (challenge, proof, key, sealed register) versus plain, same run.

1. A fresh Tansu broker; Central's database has ``--cps`` CPs registered with
   verifiers (Argon2id, computed once here, as a Monitor does once per process).
2. Baseline: Central with ``--enroll open``; ``--workers`` threads log in
   again and again, each over a fresh TCP connection: ENQ/ACK, plain
   ``register_request`` → ``register_response``, close. Rate = logins / window.
3. Central with security on (``--enroll registry``): the same workers do
   ``auth_request`` → ``auth_challenge`` → ``auth_proof`` → ``auth_result``
   (Central checks the HMAC, issues and stores a fresh AES-256 key, audits
   ``login_ok`` and ``key_issued``), then a sealed ``register_request`` →
   sealed ``register_response``, close. Every login writes the key and two
   audit lines durably (synchronous=FULL), which is what bounds the rate.

Latency per login (p50/p95) is reported for both. A login that is refused
fails the benchmark: the rate limit never triggers for correct proofs.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import LOOPBACK, Report, Row, machine, pct, quiet_logging, run_dir, start_broker, topics

TARGET_LOGINS_PER_S = 100.0


def register(db: Path, cps: int) -> dict[str, bytes]:
    from persistence import Repository
    from transport import security

    verifiers: dict[str, bytes] = {}
    with Repository(db) as repo:
        for i in range(cps):
            cp = f"AUTH{i:04d}"
            secret = security.new_secret()
            verifiers[cp] = security.verifier("cp", cp, secret)
            repo.register("cp", cp, verifiers[cp], location=f"Site {i}", price_eur_kwh=0.30)
    return verifiers


def _login_plain(port: int, cp: str) -> None:
    from tests.frame_client import FrameClient
    from transport import protocol

    with FrameClient.connect(LOOPBACK, port, name="CENTRAL") as c:
        c.send(protocol.encode(protocol.RegisterRequest(cp_id=cp, correlation_id=protocol.new_id())))
        answer = protocol.decode(c.recv(5.0))
        if not (isinstance(answer, protocol.RegisterResponse) and answer.status == "accepted"):
            raise RuntimeError(f"plain login of {cp} refused: {answer}")


def _login_secure(port: int, cp: str, verifier: bytes) -> None:
    from tests.frame_client import FrameClient
    from transport import protocol, security

    with FrameClient.connect(LOOPBACK, port, name="CENTRAL") as c:
        corr = protocol.new_id()
        c.send(protocol.encode(protocol.AuthRequest(cp_id=cp, correlation_id=corr)))
        challenge = protocol.decode(c.recv(5.0))
        if not isinstance(challenge, protocol.AuthChallenge):
            raise RuntimeError(f"no challenge for {cp}: {challenge}")
        proof = security.proof(verifier, security.PURPOSE_CENTRAL, cp, challenge.nonce)
        c.send(protocol.encode(protocol.AuthProof(correlation_id=corr, cp_id=cp, proof=proof)))
        result = protocol.decode(c.recv(5.0))
        if not (isinstance(result, protocol.AuthResult) and result.status == "accepted" and result.key_id
                and result.wrapped_key):
            raise RuntimeError(f"login of {cp} refused: {result}")
        key = security.unwrap_key(verifier, cp, challenge.nonce, result.key_id, result.wrapped_key)
        seal = security.LinkSeal(cp, result.key_id, key, me="monitor", peer="central")
        c.send(protocol.encode(seal.seal(protocol.RegisterRequest(cp_id=cp, correlation_id=protocol.new_id()))))
        answer = seal.open(protocol.decode(c.recv(5.0)))
        if not (isinstance(answer, protocol.RegisterResponse) and answer.status == "accepted"):
            raise RuntimeError(f"sealed register of {cp} refused: {answer}")


def measure(port: int, verifiers: dict[str, bytes], secure: bool, workers: int, window: float) -> dict[str, Any]:
    """Logins per second over ``window`` seconds with ``workers`` threads (each its own CPs)."""
    cps = sorted(verifiers)
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(workers)]
    errors: list[str] = []

    def work(w: int) -> None:
        mine = cps[w::workers]
        i = 0
        while not stop.is_set():
            cp = mine[i % len(mine)]
            i += 1
            t0 = time.perf_counter()
            try:
                if secure:
                    _login_secure(port, cp, verifiers[cp])
                else:
                    _login_plain(port, cp)
            except Exception as exc:
                errors.append(f"{cp}: {exc}")
                return
            lat[w].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    warm = 1.0
    for t in threads:
        t.start()
    time.sleep(warm)  # connections and the first keys: not counted
    counted0 = sum(len(x) for x in lat)
    t0 = time.perf_counter()
    time.sleep(window)
    counted = sum(len(x) for x in lat) - counted0
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(10)
    every = sorted(v for x in lat for v in x)
    if errors:
        raise RuntimeError(f"{len(errors)} login(s) failed, e.g. {errors[0]}")
    return {"logins": counted, "seconds": elapsed, "logins_per_s": counted / elapsed,
            "p50_ms": pct(every, 50) * 1000, "p95_ms": pct(every, 95) * 1000}


def central_run(settings: Any, db: Path, secure: bool, verifiers: dict[str, bytes], workers: int,
                window: float) -> dict[str, Any]:
    from supervisors.central_system import CentralSystemConfig, start_central
    from supervisors.system import tune_gc
    from transport.listener import ListenerPort

    config = CentralSystemConfig(port=0, host=LOOPBACK, broker=settings.bootstrap, db_path=str(db),
                                 topic_prefix=settings.topic_prefix, panel="off", console=False,
                                 enroll="registry" if secure else "open", auth_failures=1_000_000)
    system = start_central(config)
    tune_gc()  # as the program does (supervisors.system.run_until_signal)
    try:
        port = system.ask("monitor-listener", ListenerPort(), timeout=10)
        return measure(port, verifiers, secure, workers, window)
    finally:
        system.stop()


def run(args: argparse.Namespace) -> Report:
    report = Report("auth")
    rd = run_dir("auth")
    quiet_logging(rd / "bench.log")
    report.details["machine"] = machine()
    broker = start_broker(rd)
    try:
        settings = topics(broker, "auth.")
        t0 = time.perf_counter()
        verifiers = register(rd / "central.db", args.cps)
        report.details["verifier_ms"] = (time.perf_counter() - t0) / args.cps * 1000
        plain = central_run(settings, rd / "central.db", False, verifiers, args.workers, args.window)
        secure = central_run(settings, rd / "central.db", True, verifiers, args.workers, args.window)
    finally:
        broker.stop()
    report.details["plain"], report.details["secure"] = plain, secure
    ratio = secure["logins_per_s"] / plain["logins_per_s"]
    report.add(Row("auth: CP logins/s, authenticated + sealed (vs plain register)", secure["logins_per_s"],
                   "logins/s", plain["logins_per_s"], ratio, f">= {TARGET_LOGINS_PER_S:.0f}/s",
                   secure["logins_per_s"] >= TARGET_LOGINS_PER_S,
                   f"{args.workers} clients, fresh TCP per login; p95 {secure['p95_ms']:.1f} ms "
                   f"(plain {plain['p95_ms']:.1f} ms); each login stores a key and 2 audit lines durably"))
    report.add(Row("auth: verifier (Argon2id) per process start", report.details["verifier_ms"], "ms", None, None,
                   "", None, "t=2, m=19 MiB, p=1: computed once by a Monitor/Engine/driver, never by Central"))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cps", type=int, default=40)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--window", type=float, default=5.0, help="seconds counted per phase")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    run(args).dump(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
