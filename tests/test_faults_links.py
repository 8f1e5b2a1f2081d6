"""Failure injection on the links (issue 4, scenarios 5-7): a cut broker link,
duplicated and reordered Kafka records, and garbage on every socket and topic.

Each scenario drives the real programs as OS processes (``Network``), checks
billing against the Engines' own journals (what was really supplied) and
records a row of the fault matrix. The toolkit is ``tests/faults.py``.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any

import pytest

from persistence import Repository, bill_cents
from supervisors.launcher import Network, NetworkSpec
from tests import fault_matrix, faults
from tests.waiting import wait_until
from transport import protocol

# --- the toolkit itself (fast) -------------------------------------------------------


class _EchoServer:
    """A loopback echo server for the proxy's own tests."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        import threading

        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            try:
                while data := c.recv(4096):
                    c.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _roundtrip(port: int, payload: bytes = b"ping", timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(100)


def test_proxy_forwards_cuts_and_restores() -> None:
    server = _EchoServer()
    try:
        with faults.TcpProxy("127.0.0.1", server.port) as proxy:
            assert _roundtrip(proxy.port) == b"ping"
            live = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
            live.sendall(b"a")
            assert live.recv(10) == b"a"
            proxy.cut()
            with pytest.raises(OSError):  # the live connection was reset
                live.sendall(b"b" * 100000)
                assert live.recv(10) == b""
                raise ConnectionResetError
            with pytest.raises(OSError):  # new ones are reset at once
                if _roundtrip(proxy.port) == b"":
                    raise ConnectionResetError
            proxy.restore()
            assert _roundtrip(proxy.port) == b"ping"
            proxy.cut("blackhole")
            with pytest.raises(TimeoutError):
                _roundtrip(proxy.port, timeout=0.5)
            proxy.restore()
            assert _roundtrip(proxy.port) == b"ping"
    finally:
        server.close()


def test_proxy_refuses_non_loopback_targets() -> None:
    with pytest.raises(ValueError):
        faults.TcpProxy("8.8.8.8", 53)


def test_rss_of_this_process_is_readable() -> None:
    import os

    assert 1 < faults.rss_mb(os.getpid()) < 4096


# --- helpers of the scenarios ----------------------------------------------------------


def _cp_states(db_path) -> dict[str, str]:
    with Repository(db_path) as repo:
        return {c.cp_id: c.state for c in repo.list_cps()}


def _assert_no_tracebacks(net: Network) -> None:
    bad = faults.terminal_tracebacks(net.run_dir)
    assert not bad, f"tracebacks in the programs' terminal logs: {bad}"


def _record(name: str, db_path, check: faults.BillingCheck, recover_s: float | None) -> None:
    fault_matrix.billing_row(name, str(db_path), list(check.supplies), recover_s)


def _billing(net: Network) -> faults.BillingCheck:
    return faults.billing_check(net.run_dir, net.db_path)


def _telemetry_gaps(tool: faults.TopicTool, supplies: dict, db_path: Any) -> dict[str, list[int]]:
    """Sequence numbers the Engines journaled but Kafka never got, per session (sealed records
    are opened with the keys in Central's database)."""
    seqs: dict[str, set[int]] = {}
    for m in tool.decoded("charging_session_data", protocol.ChargingData, db_path=db_path):
        seqs.setdefault(m.session_id, set()).add(m.seq)
    gaps = {}
    for sid, entry in supplies.items():
        missing = sorted(set(range(1, entry.last_seq + 1)) - seqs.get(sid, set()))
        if missing:
            gaps[sid] = missing
    return gaps


def _tickets_seen(summary: dict) -> set[str]:
    """Session ids whose ticket some driver showed (the drivers' results files)."""
    return {sid for d in summary["drivers"].values() if d for sid in d["tickets_seen"]}


def _completions(tool: faults.TopicTool, db_path: Any) -> dict[str, list[protocol.ChargeCompletion]]:
    out: dict[str, list[protocol.ChargeCompletion]] = {}
    for m in tool.decoded("charging_session_complete", protocol.ChargeCompletion, db_path=db_path):
        out.setdefault(m.session_id, []).append(m)
    return out


# --- scenario 5: the broker link is cut during supplies -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode,seconds", [("reset", 4.0), ("blackhole", 12.0), ("reset", 15.0)],
                         ids=["reset-4s", "blackhole-12s", "reset-15s"])
def test_broker_link_cut_during_supplies_loses_nothing_and_bills_once(tmp_path, mode: str, seconds: float) -> None:
    """Every Kafka client reaches the broker through a proxy (the broker advertises
    the proxy's port). While at least two CPs supply, the proxy either resets every
    connection and refuses new ones (4 s: within the clients' own retries; 15 s:
    longer than a producer's delivery timeout) or silently stops forwarding (12 s).
    Afterwards every supply the Engines journaled has all its telemetry and its
    completion in Kafka and exactly one ticket with the Engine's final figures,
    and every driver saw that ticket."""
    broker_port, proxy_port = faults.free_loopback_port(), faults.free_loopback_port()
    spec = NetworkSpec(run_dir=tmp_path / "run", cps=3, drivers=3, services=2, topic_prefix="cut.",
                       supply_seconds=4, plug_delay=0.3, pause=0.5, panel="off", tick=0.5,
                       broker_port=broker_port, broker_advertised_port=proxy_port)
    with faults.TcpProxy("127.0.0.1", broker_port, listen_port=proxy_port, name="broker-proxy") as proxy:
        with Network(spec) as net:
            assert net.bootstrap.endswith(f":{proxy_port}")
            supplying = wait_until(faults.wait_for_supplying(net.db_path, 2), timeout=45, interval=0.1,
                                   what="two CPs supplying")
            proxy.outage(seconds, mode)
            assert proxy.last_cut_connections > 0  # every client's Kafka connections went through it
            # Service is back when a supply that ended during or after the cut is billed.
            wait_until(lambda: not net.drivers_running(), timeout=90, interval=0.3, what="the drivers finish")
            wait_until(lambda: _billing(net).ok or None, timeout=30, interval=0.3,
                       what=f"every supply billed once ({_billing(net).explain()})")
            check = _billing(net)
            with Repository(net.db_path) as repo:
                tickets = repo.tickets()
            with faults.TopicTool(net.bootstrap, spec.topic_prefix) as tool:
                gaps = _telemetry_gaps(tool, check.supplies, net.db_path)
                completions = _completions(tool, net.db_path)
            summary = net.summary()
            assert all(net.alive(n) for n in net.procs if not n.startswith("driver:")), \
                {n: net.alive(n) for n in net.procs}
            _assert_no_tracebacks(net)
    _record(f"5 broker link {mode} {seconds:g} s", net.db_path, check, _recovery(proxy, tickets))
    assert set(supplying) <= {c for c, _, _ in net.cps}
    assert len(check.supplies) >= 3, check.explain()
    assert check.ok, check.explain()
    assert not gaps, f"telemetry journaled by the Engines but never in Kafka: {gaps}"
    for sid in check.supplies:
        assert completions.get(sid), f"no completion of {sid} in Kafka"
    # Drivers: each saw the ticket of each of its supplies, with Central's figures.
    assert _tickets_seen(summary) == set(check.supplies), (summary["drivers"], check.explain())
    shown = {s["session_id"]: s for d in summary["drivers"].values() if d for s in d["services"]
             if s["outcome"] == "ticket"}
    for sid, s in shown.items():
        t = check.tickets[sid][0]
        assert math.isclose(s["energy_kwh"], t.energy_kwh, rel_tol=1e-9), (sid, s, t)


def _recovery(proxy: faults.TcpProxy, tickets: list) -> float | None:
    """Seconds from the restore to the first ticket issued after it (wall clock)."""
    if proxy.restored_at is None:
        return None
    restored_wall = time.time() - (time.monotonic() - proxy.restored_at)
    after = sorted(t.issued_at for t in tickets if t.issued_at >= restored_wall)
    return after[0] - restored_wall if after else None


# --- scenario 6: duplicated and reordered records ---------------------------------------------


@pytest.mark.slow
def test_duplicate_and_reordered_engine_records_bill_each_session_once(tmp_path, broker) -> None:
    """While real supplies run, an echo re-injects every telemetry record (same
    message id twice, a new message id once, every third an older seq of the
    session after the newer ones) and every completion (same id twice, new ids
    with later timestamps twice, then stale telemetry after it). After the
    supplies: each session has one ticket whose energy is the legit completion's
    (= the Engine's journal), Central's session totals are the completion's, and
    replaying every completion of the topic once more changes nothing.

    Security is off here: this is the second line of defence (Central's own dedupe and billing
    rules) for duplicates that got past the first. With security on, the echo's copies are
    refused as replays before they reach a session (tests/test_security_engine.py)."""
    drivers = 3  # started once the echo is in place (the spec starts none)
    spec = NetworkSpec(run_dir=tmp_path / "run", cps=3, drivers=0, services=2, broker=broker.bootstrap,
                       security="off",
                       topic_prefix=f"dup{time.time_ns() % 10**8}.", supply_seconds=3, plug_delay=0.3, pause=0.5,
                       panel="off", tick=0.5)
    with Network(spec) as net:
        with faults.TopicTool(net.bootstrap, spec.topic_prefix) as tool:
            with faults.Echo(tool, copies=2, stale_every=3) as echo:
                for i in range(drivers):
                    net.start_driver(f"driver{i + 1}")
                wait_until(lambda: not net.drivers_running(), timeout=90, interval=0.3, what="the drivers finish")
                wait_until(lambda: _billing(net).ok or None, timeout=30, interval=0.3,
                           what=f"every supply billed once ({_billing(net).explain()})")
                # the echo has seen every legit completion and injected its copies
                wait_until(lambda: set(echo.completions) >= set(_billing(net).supplies) or None, timeout=15,
                           what="the echo saw every completion")
            assert echo.error is None, echo.error
            # a second, late wave: every completion in the topic again, under new ids
            legit = {sid: vals[0] for sid, vals in echo.completions.items()}
            for sid, value in legit.items():
                tool.raw("charging_session_complete", sid.encode(), faults.with_new_message_id(value))
                tool.raw("charging_session_complete", sid.encode(), value)
            tool.flush()
            first_check = _billing(net)
            before = {sid: [(t.ticket_id, t.energy_kwh) for t in ts] for sid, ts in first_check.tickets.items()}
            # every copy is in the topic (legit + the echo's + the late wave) before Central's group is
            # checked: an injection still being flushed would otherwise be neither counted nor consumed
            def all_copies() -> dict[str, list[protocol.ChargeCompletion]] | None:
                found = _completions(tool, net.db_path)
                return found if all(len(found.get(sid, [])) >= 1 + 2 * 2 + 2 for sid in first_check.supplies) else None

            completions = wait_until(all_copies, timeout=15, interval=0.3, what="every copy in the topic")
            # the late wave is consumed when Central's group has committed past it
            wait_until(lambda: tool.group_caught_up(spec.topic_prefix + "evcharging-central-sessions",
                                                    ("charging_session_data", "charging_session_complete")),
                       timeout=20, interval=0.3, what="Central consumed the late duplicates")
            check = _billing(net)
            with Repository(net.db_path) as repo:
                sessions = {sid: repo.get_session(sid) for sid in check.supplies}
                stats = repo.stats()
            summary = net.summary()
            _assert_no_tracebacks(net)
            alive = {n: net.alive(n) for n in net.procs if not n.startswith("driver:")}
    _record("6 duplicate/reordered records", net.db_path, check, None)
    shown = [s["session_id"] for d in summary["drivers"].values() if d for s in d["services"]
             if s["outcome"] == "ticket"]
    assert sorted(shown) == sorted(check.supplies), (shown, check.explain())  # each ticket shown once
    assert _tickets_seen(summary) == set(check.supplies)
    assert all(alive.values()), alive
    assert len(check.supplies) >= 3, check.explain()
    assert check.ok, check.explain()
    assert {sid: [(t.ticket_id, t.energy_kwh) for t in ts] for sid, ts in check.tickets.items()} == before
    assert echo.injected > 3 * len(check.supplies), echo.injected
    for sid, entry in check.supplies.items():
        copies = completions[sid]
        assert len(copies) >= 1 + 2 * 2 + 2, (sid, len(copies))  # legit + echo + late wave
        assert len({c.message_id for c in copies}) >= 4
        legit_c = protocol.decode(legit[sid])
        (ticket,) = check.tickets[sid]
        assert ticket.energy_kwh == legit_c.energy_kwh == entry.energy_kwh
        assert ticket.cost_cents == bill_cents(legit_c.energy_kwh, entry.price_eur_kwh)  # Central's figure
        s = sessions[sid]
        assert s is not None and s.status == "completed", s
        assert s.energy_kwh == legit_c.energy_kwh and s.cost_eur == ticket.cost_eur, s
    assert math.isclose(stats["energy_kwh"], sum(e.energy_kwh for e in check.supplies.values()), rel_tol=1e-9)


# --- scenario 7: garbage on every socket and topic ------------------------------------------------


@pytest.mark.slow
def test_garbage_on_every_socket_and_topic_leaves_real_traffic_unharmed(tmp_path, broker) -> None:
    """While real drivers charge, Central's Monitor port and an Engine's port get
    random bytes, bad LRC, oversized frames, bad JSON and unknown types, half
    frames left hanging for the whole run, and 2,000 connections opened and
    dropped; every topic gets bad JSON, unknown types and unknown ids. Every
    process stays up, memory stays bounded, every supply ends in exactly one
    ticket (and Central heard each one start), the garbage is answered (NACK /
    error frame) and logged as sentences, half frames are dropped after the frame
    timeout, and no terminal shows a traceback."""
    drivers = 2  # started once memory was measured (the spec starts none)
    spec = NetworkSpec(run_dir=tmp_path / "run", cps=2, drivers=0, services=4, broker=broker.bootstrap,
                       topic_prefix=f"junk{time.time_ns() % 10**8}.", supply_seconds=3, plug_delay=0.3, pause=0.5,
                       panel="off", tick=0.5)
    with Network(spec) as net:
        victim = net.cps[0][0]
        host, central_port, engine_port = spec.host, net.central_port, net.engine_ports[victim]
        wait_until(lambda: set(_cp_states(net.db_path).values()) == {"ACTIVE"}, timeout=20, interval=0.1,
                   what="every CP ACTIVE")
        watched = ["central", f"engine:{victim}", f"monitor:{victim}"]
        rss_before = {n: faults.rss_mb(net.pid(n)) for n in watched}
        with faults.TopicTool(net.bootstrap, spec.topic_prefix) as tool, \
                faults.HalfFrames(host, central_port, connections=5) as half_c, \
                faults.HalfFrames(host, engine_port, connections=2) as half_e:
            for i in range(drivers):
                net.start_driver(f"driver{i + 1}")
            wait_until(faults.wait_for_supplying(net.db_path, 1), timeout=30, interval=0.1, what="a supply")
            with faults.Hammer(host, {central_port: 1500, engine_port: 500}, tool=tool,
                               topic_keys=("garbage", "driver1", "driver2", victim)) as hammer:
                wait_until(lambda: not net.drivers_running(), timeout=120, interval=0.3, what="the drivers finish")
                wait_until(lambda: hammer.churn_done or hammer.error, timeout=120, interval=0.3,
                           what="2,000 connections opened and dropped")
            # half frames left hanging are dropped by the servers (LinkOptions.frame_timeout), not kept forever
            wait_until(lambda: half_c.held() + half_e.held() == 0, timeout=30, interval=0.5,
                       what="Central and the Engine dropped the half frames")
            wait_until(lambda: _billing(net).ok or None, timeout=30, interval=0.3,
                       what=f"every supply billed once ({_billing(net).explain()})")
        check = _billing(net)
        alive = {n: net.alive(n) for n in net.procs if not n.startswith("driver:")}
        rss_after = {n: faults.rss_mb(net.pid(n)) for n in watched if net.alive(n)}
        with Repository(net.db_path) as repo:
            tickets = {t.session_id: t for t in repo.tickets()}
            states = {c.cp_id: c.state for c in repo.list_cps()}
        summary = net.summary()
        logs = {p.name: p.read_text(errors="replace") for p in net.run_dir.glob("*.log")}
        _assert_no_tracebacks(net)
    _record("7 garbage on sockets+topics", net.db_path, check, None)
    print(f"\nscenario 7: {hammer.rounds} garbage rounds, {hammer.records} bad records, "
          f"{sum(hammer.churned.values())} connections dropped; RSS MB before/after: "
          + ", ".join(f"{n} {rss_before[n]:.0f}/{mb:.0f}" for n, mb in rss_after.items()))
    assert hammer.error is None, repr(hammer.error)
    assert all(alive.values()), alive
    for n, mb in rss_after.items():
        assert mb - rss_before[n] < 50, f"{n} grew from {rss_before[n]:.0f} MB to {mb:.0f} MB"
    assert check.ok, check.explain()
    assert len(check.supplies) >= 4, check.explain()
    # real traffic was unharmed: Central heard each supply start (supply_started, Engine -> Monitor -> Central)
    for sid in check.supplies:
        assert tickets[sid].started_at is not None, f"Central never heard that {sid} started"
    assert states == {c: "ACTIVE" for c, _, _ in net.cps}, states
    outcomes = [s["outcome"] for d in summary["drivers"].values() if d for s in d["services"]]
    assert outcomes.count("ticket") == len(check.supplies), (outcomes, check.explain())
    assert _tickets_seen(summary) == set(check.supplies)
    # the garbage was answered, not swallowed, and went on for the whole run
    total = hammer.total()
    assert hammer.churned == {central_port: 1500, engine_port: 500}
    assert total.nacks > 20 and total.error_replies > 5, total
    assert hammer.records > 50
    central_log = logs["central.log"]
    for sentence in ("bad frame from", "rejected a message from", "FAULT: a record on driver_requests"):
        assert sentence in central_log, f"Central's terminal does not say {sentence!r}"
    assert "bad frame from" in logs[f"engine-{victim}.log"]
    for name, text in logs.items():  # garbage is answered by the link, it never crashes a connection actor
        if not name.endswith(".detail.log"):
            assert "crashed (" not in text, f"{name}: " + text[text.find("crashed ("):][:300]
