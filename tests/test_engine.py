"""The Engine (EV_CP_E) against a scripted Monitor socket, a real broker and a real journal.

The test plays the Monitor with a FrameClient (ENQ/ACK, frames, ACKs) and
reads what the Engine publishes straight from Kafka with a plain consumer.
Helpers here are shared with tests/test_monitor.py.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.console import ConsoleLine, ConsoleReader
from actors.engine import EngineStatus
from actors.runtime import Directory, SupervisedActor, Supervision
from persistence import EngineJournal
from supervisors.engine_system import EngineConfig, engine_port, start_engine, stop_engine
from supervisors.supervisor import ChildSpec, GetRestartLog, start_tree
from supervisors.system import RunningSystem
from tests.frame_client import FrameClient, PeerClosed
from tests.waiting import wait_until
from transport import protocol
from transport.broker import TOPICS, KafkaSettings, free_port

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
POWER_KW = 7.4
TICK = 0.1
STEP_KWH = POWER_KW * TICK / 3600


# --------------------------------------------------------------------------- helpers
class ScriptedPeer:
    """One framed connection driven by a test: sends what it is told, keeps all it receives.

    FrameClient ACKs frames only while it reads, so one thread owns it and
    reads all the time (an unread frame would be resent, then the link dropped).
    """

    def __init__(self, host: str, port: int, name: str = "ENGINE") -> None:
        self.client = FrameClient.connect(host, port, name=name)
        self.received: list[dict[str, Any]] = []
        self.closed = threading.Event()
        self._outbox: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"scripted-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    self.client.send(self._outbox.get_nowait())
                except queue.Empty:
                    pass
                try:
                    frame = self.client.recv_json(timeout=0.02)
                except TimeoutError:
                    continue
                with self._lock:
                    self.received.append(frame)
        except (PeerClosed, OSError):
            pass
        finally:
            self.closed.set()

    def send(self, message: Any) -> None:
        self._outbox.put(protocol.encode(message))

    def messages(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.received if kind is None or m["type"] == kind]

    def wait_for(self, kind: str, where: Callable[[dict[str, Any]], bool] = lambda m: True,
                 timeout: float = 10.0) -> dict[str, Any]:
        return wait_until(lambda: next((m for m in self.messages(kind) if where(m)), None),
                          timeout=timeout, what=f"a {kind} frame")

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)
        self.client.close()


def connect_when_listening(host: str, port: int, timeout: float = 10.0) -> ScriptedPeer:
    """A ScriptedPeer as soon as something accepts the framed session."""
    holder: list[ScriptedPeer] = []

    def attempt() -> bool:
        try:
            holder.append(ScriptedPeer(host, port))
            return True
        except (ConnectionError, TimeoutError, OSError):
            return False

    wait_until(attempt, timeout=timeout, interval=0.1, what=f"a listener on {host}:{port}")
    return holder[0]


class TopicReader:
    """Reads every partition of one logical topic from the beginning (plain kafka-python)."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=10,
        )
        tps = [TopicPartition(settings.topic(topic), p) for p in range(TOPICS[topic])]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list[tuple[str | None, Any]] = []

    def poll(self) -> list[Any]:
        batch = self.consumer.poll(timeout_ms=50)
        for records in batch.values():
            for r in records:
                self.records.append((r.key.decode() if r.key else None, protocol.decode(r.value)))
        return [m for _, m in self.records]

    def wait_for(self, condition: Callable[[list[Any]], Any], timeout: float = 15.0, what: str = "") -> Any:
        return wait_until(lambda: condition(self.poll()), timeout=timeout, interval=0.01, what=what)

    def close(self) -> None:
        self.consumer.close()


class ConsolePipe:
    """A real pipe standing in for stdin: ``type('k')`` is a key press plus Enter."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.stream = os.fdopen(r, "r", encoding="utf-8")
        self._writer = os.fdopen(w, "w", encoding="utf-8", buffering=1)

    def type(self, line: str) -> None:
        self._writer.write(line + "\n")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()  # EOF: the reader thread ends by itself


def engine_config(settings: KafkaSettings, journal: Path, console: ConsolePipe | None = None,
                  **overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = dict(
        broker=settings.bootstrap, topic_prefix=settings.topic_prefix, listen_host="127.0.0.1", listen_port=0,
        journal=str(journal), power_kw=POWER_KW, tick=TICK, auto_plug=True, plug_delay=0.05,
        console=console is not None, console_stream=console.stream if console else None,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def status(system: RunningSystem) -> dict[str, Any]:
    return system.ask("engine", EngineStatus())


def authorize(session_id: str, driver_id: str = "D1", cp_id: str = "CP1", price: float = 0.30,
              correlation_id: str | None = None) -> protocol.AuthorizeSupply:
    return protocol.AuthorizeSupply(correlation_id=correlation_id or f"c-{session_id}", session_id=session_id,
                                    driver_id=driver_id, price_eur_kwh=price, cp_id=cp_id)


def auth_answer(peer: ScriptedPeer, session_id: str) -> dict[str, Any]:
    return peer.wait_for("supply_authorization_response", lambda m: m["session_id"] == session_id)


def completions(reader: TopicReader, session_id: str) -> list[protocol.ChargeCompletion]:
    return [m for m in reader.poll() if isinstance(m, protocol.ChargeCompletion) and m.session_id == session_id]


@pytest.fixture
def console() -> Any:
    pipe = ConsolePipe()
    yield pipe
    pipe.close()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "engine.journal"


@pytest.fixture
def engine(kafka_settings: KafkaSettings, journal_path: Path, console: ConsolePipe) -> Any:
    """A started Engine (auto-plug, 0.1 s ticks) and a Monitor stand-in that said hello as CP1."""
    system = start_engine(engine_config(kafka_settings, journal_path, console))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
    wait_until(lambda: status(system)["cp_id"] == "CP1", what="hello handled")
    yield system, peer
    peer.close()
    system.stop()


@pytest.fixture
def data_reader(kafka_settings: KafkaSettings) -> Any:
    reader = TopicReader(kafka_settings, "charging_session_data")
    yield reader
    reader.close()


@pytest.fixture
def done_reader(kafka_settings: KafkaSettings) -> Any:
    reader = TopicReader(kafka_settings, "charging_session_complete")
    yield reader
    reader.close()


# --------------------------------------------------------------------------- tests
def test_answers_health_checks_and_the_ko_key_flips_ok(kafka_settings, journal_path, console, caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    system = start_engine(engine_config(kafka_settings, journal_path, console))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(protocol.HealthCheck(seq=1))  # answered even before hello
        assert peer.wait_for("health_status", lambda m: m["seq"] == 1)["ok"] is True
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.0))
        wait_until(lambda: status(system)["cp_id"] == "CP1", what="hello handled")
        console.type("k")
        wait_until(lambda: status(system)["ko"], what="KO after the k key")
        peer.wait_for("fault_notification")
        assert any(r.getMessage() == "CP1 is now KO (simulated fault)" for r in caplog.records)
        peer.send(protocol.HealthCheck(seq=2))
        assert peer.wait_for("health_status", lambda m: m["seq"] == 2)["ok"] is False
        console.type("k")
        peer.wait_for("fault_cleared")
        peer.send(protocol.HealthCheck(seq=3))
        assert peer.wait_for("health_status", lambda m: m["seq"] == 3)["ok"] is True
        assert status(system)["monitor_connected"] is True
    finally:
        peer.close()
        system.stop()


def test_a_supply_publishes_telemetry_then_one_completion(engine, data_reader, done_reader, journal_path,
                                                          console) -> None:
    system, peer = engine
    peer.send(authorize("S1"))
    assert auth_answer(peer, "S1")["accepted"] is True
    started = peer.wait_for("supply_started")
    assert (started["cp_id"], started["session_id"], started["driver_id"]) == ("CP1", "S1", "D1")

    data = data_reader.wait_for(lambda ms: [m for m in ms if m.session_id == "S1"][:3]
                                if len([m for m in ms if m.session_id == "S1"]) >= 3 else None,
                                what="three telemetry records")
    assert [d.seq for d in data] == [1, 2, 3]
    for d in data:
        assert (d.cp_id, d.driver_id, d.power_kw) == ("CP1", "D1", POWER_KW)
        assert d.energy_kwh == pytest.approx(d.seq * STEP_KWH)
        assert d.cost_eur == pytest.approx(d.energy_kwh * 0.30)
    assert all(key == "CP1" for key, _ in data_reader.records)

    console.type("u")
    ended = peer.wait_for("supply_ended")
    assert (ended["session_id"], ended["end_reason"], ended["driver_id"]) == ("S1", "unplugged", "D1")
    [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the completion")
    assert (done.cp_id, done.driver_id, done.end_reason) == ("CP1", "D1", "unplugged")
    assert done.energy_kwh == pytest.approx(ended["energy_kwh"]) and done.energy_kwh >= 3 * STEP_KWH * 0.999
    assert done.cost_eur == pytest.approx(done.energy_kwh * 0.30)
    last_seq = max(d.seq for d in data_reader.poll() if d.session_id == "S1")
    assert done.energy_kwh == pytest.approx(last_seq * STEP_KWH)  # the completion has the last telemetry's total

    with EngineJournal(journal_path) as journal:
        wait_until(lambda: journal.get("S1").status == "published", what="journal marked published")
    assert status(system)["state"] == "idle" and status(system)["pending_completions"] == 0
    assert len(completions(done_reader, "S1")) == 1


def test_stop_supply_ends_with_its_reason_or_central_stop(engine, done_reader) -> None:
    _system, peer = engine
    peer.send(authorize("S1"))
    peer.wait_for("supply_started", lambda m: m["session_id"] == "S1")
    peer.send(protocol.StopSupply(session_id="S1", reason="driver_stop"))
    assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S1")["end_reason"] == "driver_stop"
    [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="completion of S1")
    assert done.end_reason == "driver_stop"

    peer.send(authorize("S2"))
    peer.wait_for("supply_started", lambda m: m["session_id"] == "S2")
    peer.send(protocol.StopSupply(session_id="S2", reason="the operator said so"))  # not an END_REASON
    assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S2")["end_reason"] == "central_stop"
    [done] = done_reader.wait_for(lambda _: completions(done_reader, "S2"), what="completion of S2")
    assert done.end_reason == "central_stop"


def test_denials_when_unregistered_busy_ko_or_stopped(kafka_settings, journal_path, console, done_reader) -> None:
    system = start_engine(engine_config(kafka_settings, journal_path, console, auto_plug=False))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(authorize("S0"))
        denied = auth_answer(peer, "S0")
        assert denied["accepted"] is False and "registered" in denied["reason"]

        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        peer.send(authorize("S1"))
        assert auth_answer(peer, "S1")["accepted"] is True
        peer.send(authorize("S1"))  # Central asking twice gets the same answer
        wait_until(lambda: len(peer.messages("supply_authorization_response")) == 3)
        assert peer.messages("supply_authorization_response")[-1]["accepted"] is True
        peer.send(authorize("S2"))
        busy = auth_answer(peer, "S2")
        assert (busy["accepted"], busy["reason"]) == (False, "CP is busy with session S1")
        peer.send(authorize("S9", cp_id="CP7"))
        assert "not CP7" in auth_answer(peer, "S9")["reason"]

        console.type("k")  # KO while authorised: the waiting supply ends as a fault
        assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S1")["end_reason"] == "fault"
        peer.send(authorize("S3"))
        assert auth_answer(peer, "S3")["reason"] == "CP is out of order"
        console.type("k")
        wait_until(lambda: not status(system)["ko"])

        peer.send(protocol.StopCp(reason="maintenance"))
        wait_until(lambda: status(system)["stopped"])
        peer.send(authorize("S4"))
        assert auth_answer(peer, "S4")["reason"] == "CP was stopped by Central"
        peer.send(protocol.ResumeCp())
        peer.send(authorize("S5"))
        assert auth_answer(peer, "S5")["accepted"] is True
        peer.send(protocol.StopCp(reason="maintenance"))  # ends the waiting supply
        assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S5")["end_reason"] == "central_stop"
        peer.send(protocol.ResumeCp())
        peer.send(authorize("S1"))  # an old session never runs twice
        again = peer.wait_for("supply_authorization_response",
                              lambda m: m["session_id"] == "S1" and m["accepted"] is False)
        assert again["reason"] == "session S1 has already taken place at this CP"
        done = done_reader.wait_for(
            lambda _: len(both := completions(done_reader, "S1") + completions(done_reader, "S5")) == 2 and both,
            what="two completions")
        assert sorted(c.end_reason for c in done) == ["central_stop", "fault"]
        assert all(c.energy_kwh == 0 for c in done)
    finally:
        peer.close()
        system.stop()


def test_no_plug_in_before_the_timeout_gives_a_zero_kwh_completion(kafka_settings, journal_path, done_reader) -> None:
    system = start_engine(engine_config(kafka_settings, journal_path, auto_plug=False, plug_timeout=0.3))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        peer.send(authorize("S1"))
        assert auth_answer(peer, "S1")["accepted"] is True
        ended = peer.wait_for("supply_ended")
        assert (ended["end_reason"], ended["energy_kwh"], ended["cost_eur"]) == ("unplugged", 0, 0)
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the completion")
        assert (done.end_reason, done.energy_kwh, done.cost_eur) == ("unplugged", 0.0, 0.0)
        assert not peer.messages("supply_started")
    finally:
        peer.close()
        system.stop()


def test_losing_the_monitor_ends_the_supply_with_monitor_lost(engine, done_reader) -> None:
    system, peer = engine
    peer.send(authorize("S1"))
    peer.wait_for("supply_started")
    wait_until(lambda: status(system)["seq"] >= 2, what="a few ticks")
    peer.close()
    [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the completion")
    assert done.end_reason == "monitor_lost" and done.energy_kwh > 0
    wait_until(lambda: status(system)["state"] == "idle" and not status(system)["monitor_connected"])


def test_a_connection_that_never_said_hello_is_not_the_monitor(engine, done_reader) -> None:
    """A stray client (garbage, a port scanner) that did the ENQ handshake must not receive the
    CP's reports, and its leaving must not end the supply: the Monitor is the newest link that said hello."""
    system, peer = engine
    stray = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        stray.send(protocol.HealthCheck(seq=7))  # a stray may talk, but it never said hello
        stray.wait_for("health_status", lambda m: m["seq"] == 7)
        peer.send(authorize("S1"))
        assert peer.wait_for("supply_started")["session_id"] == "S1"
        wait_until(lambda: status(system)["seq"] >= 2, what="a few ticks")
    finally:
        stray.close()
    wait_until(lambda: status(system)["seq"] >= 4, what="more ticks after the stray left")
    assert status(system)["state"] == "supplying"  # not ended with monitor_lost
    peer.send(protocol.StopSupply(session_id="S1", reason="driver_stop"))
    assert peer.wait_for("supply_ended")["end_reason"] == "driver_stop"
    assert not stray.messages("supply_started") and not stray.messages("supply_ended")


def test_a_restarted_engine_actor_resumes_its_supply_and_the_monitor_says_hello_again(engine, done_reader) -> None:
    """rest_for_one: the Monitor connections restart after the engine, so the old link closes; the new
    EngineActor resumes the journaled supply, and a Monitor back within the grace period keeps it going."""
    system, peer = engine
    peer.send(authorize("S1"))
    wait_until(lambda: status(system)["seq"] >= 2, what="a few ticks")
    old = system.get("engine")
    old.stop()  # the supervisor starts a fresh EngineActor, and the connections after it
    wait_until(lambda: system.get("engine") not in (None, old), what="a new Engine actor")
    assert peer.closed.wait(10), "the Monitor connection restarts after the engine"
    again = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        again.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        resumed = status(system)["seq"]
        wait_until(lambda: status(system)["state"] == "supplying" and status(system)["seq"] >= resumed + 2,
                   what="the supply metering on after the restart")
        again.send(protocol.StopSupply(session_id="S1", reason="driver_stop"))
        assert again.wait_for("supply_ended")["end_reason"] == "driver_stop"
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the one completion")
        assert done.end_reason == "driver_stop" and done.energy_kwh > 0
        again.send(authorize("S2"))
        assert auth_answer(again, "S2")["accepted"] is True
    finally:
        again.close()


def test_supply_seconds_unplugs_by_itself(kafka_settings, journal_path, done_reader) -> None:
    system = start_engine(engine_config(kafka_settings, journal_path, supply_seconds=0.35))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        peer.send(authorize("S1"))
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the completion")
        assert done.end_reason == "unplugged" and done.energy_kwh >= 2 * STEP_KWH * 0.999
    finally:
        peer.close()
        system.stop()


def test_supply_typed_at_the_cp_goes_to_the_monitor_or_is_refused_without_one(
        kafka_settings, journal_path, console, caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    system = start_engine(engine_config(kafka_settings, journal_path, console))
    try:
        console.type("s D7")
        wait_until(lambda: any("Monitor is not connected" in r.getMessage() for r in caplog.records),
                   what="a local refusal")
        peer = connect_when_listening("127.0.0.1", engine_port(system))
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        wait_until(lambda: status(system)["cp_id"] == "CP1")
        console.type("s D7")
        request = peer.wait_for("cp_supply_request")
        assert (request["cp_id"], request["driver_id"]) == ("CP1", "D7")
        peer.send(protocol.CpSupplyResponse(correlation_id=request["correlation_id"], cp_id="CP1",
                                            status="denied", reason="driver already supplying at ALC1"))
        wait_until(lambda: any("refused the supply for driver D7: driver already supplying at ALC1" in r.getMessage()
                               for r in caplog.records), what="the answer shown")
        console.type("bogus")
        console.type("help")
        console.type("status")
        wait_until(lambda: any("Unknown command 'bogus'" in r.getMessage() for r in caplog.records))
        wait_until(lambda: any("CP1 is idle" in r.getMessage() for r in caplog.records))
        peer.close()
    finally:
        system.stop()


def test_a_polite_stop_ends_the_supply_and_waits_for_kafka(kafka_settings, journal_path, done_reader) -> None:
    system = start_engine(engine_config(kafka_settings, journal_path))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        peer.send(authorize("S1"))
        wait_until(lambda: status(system)["seq"] >= 2, what="a few ticks")
        stop_engine(system, grace=10)
        assert not system.alive
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the completion")
        assert done.end_reason == "fault"
        with EngineJournal(journal_path) as journal:
            assert journal.get("S1").status == "published"
    finally:
        peer.close()
        system.stop()


def test_an_unacknowledged_completion_is_sent_again_at_start(kafka_settings, journal_path, done_reader) -> None:
    with EngineJournal(journal_path) as journal:
        journal.begin("S0", "CP1", "D1", 0.30, started_at=1.0)
        journal.update("S0", 4, 0.5, 0.15, at=2.0)
        journal.finish("S0", "driver_stop", ended_at=3.0)
    system = start_engine(engine_config(kafka_settings, journal_path))
    try:
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S0"), what="the resent completion")
        assert (done.end_reason, done.energy_kwh, done.cost_eur) == ("driver_stop", 0.5, 0.15)
        with EngineJournal(journal_path) as journal:
            wait_until(lambda: journal.get("S0").status == "published", what="marked published")
    finally:
        system.stop()


@pytest.mark.slow
def test_an_engine_killed_mid_supply_reports_it_when_it_comes_back(kafka_settings, journal_path, data_reader,
                                                                   done_reader, caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    port = free_port()
    cmd = [
        sys.executable, "-m", "supervisors.engine_system", kafka_settings.bootstrap,
        "--listen", f"127.0.0.1:{port}", "--journal", str(journal_path), "--tick", str(TICK),
        "--auto-plug", "--plug-delay", "0.05", "--topic-prefix", kafka_settings.topic_prefix,
        "--no-console", "--log-level", "WARNING",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peer = None
    try:
        peer = connect_when_listening("127.0.0.1", port, timeout=20)
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        peer.send(authorize("S1"))
        data_reader.wait_for(lambda ms: sum(m.session_id == "S1" for m in ms) >= 3, what="three telemetry records")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        if peer is not None:
            peer.close()
    assert proc.returncode == -signal.SIGKILL

    with EngineJournal(journal_path) as journal:
        [left] = journal.unfinished()
    assert left.session_id == "S1" and left.last_seq >= 3 and left.energy_kwh > 0
    assert not completions(done_reader, "S1")

    system = start_engine(engine_config(kafka_settings, journal_path))
    try:
        [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="the recovered completion")
        assert (done.cp_id, done.driver_id, done.end_reason) == ("CP1", "D1", "engine_recovered")
        assert (done.energy_kwh, done.cost_eur) == (left.energy_kwh, left.cost_eur)
        assert any(r.getMessage().startswith("Recovered supply S1 at CP1 after a restart: ") for r in caplog.records)
        with EngineJournal(journal_path) as journal:
            wait_until(lambda: journal.get("S1").status == "published", what="marked published")
        assert status(system)["state"] == "idle"
    finally:
        system.stop()


def run_program(module: str, args: list[str]) -> subprocess.Popen[str]:
    """Start ``python -m module args`` from the repository, stdout/stderr captured."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=str(ROOT),
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ev_cp_e_stops_on_sigterm_with_exit_0_and_gives_up_with_exit_1(kafka_settings, tmp_path) -> None:
    port = free_port()
    log_file = tmp_path / "engine.log"
    common = [kafka_settings.bootstrap, "--journal", str(tmp_path / "e.journal"), "--no-console",
              "--log-file", str(log_file)]
    proc = run_program("supervisors.engine_system", [*common, "--listen", f"127.0.0.1:{port}"])
    try:
        wait_until(lambda: log_file.exists() and "Engine started: listening" in log_file.read_text(),
                   timeout=20, what="the Engine started")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Engine stopped" in err and "Traceback" not in err

    with socket.socket() as taken:  # the port is taken: the listener cannot start, the Engine gives up
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = run_program("supervisors.engine_system", [*common, "--listen", f"127.0.0.1:{busy}"])
        _, err = proc.communicate(timeout=40)
    assert proc.returncode == 1
    assert "The Engine gives up" in err and "Address already in use" in err and "Traceback" not in err


class LineSink(SupervisedActor):
    def __init__(self, lines: list[str], *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.lines = lines

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ConsoleLine):
            self.lines.append(message.text)


def test_console_reader_strips_skips_blanks_and_outlives_the_end_of_input() -> None:
    lines: list[str] = []
    directory = Directory()
    tree = start_tree("t", [
        ChildSpec("sink", LineSink, (lines,)),
        ChildSpec("console", ConsoleReader, ("sink", directory), {"stream": io.StringIO("p\n\n   \n  s D1  \nu")}),
    ], directory=directory)
    try:
        wait_until(lambda: lines == ["p", "s D1", "u"], what="three lines")
        assert directory.get("console") is not None  # EOF ended the thread, not the actor
        assert tree.ask(GetRestartLog()) == []
    finally:
        tree.stop()
    pipe = ConsolePipe()  # a reader blocked on a pipe that never ends still stops at once
    reader = ConsoleReader.start("nobody", Directory(), stream=pipe.stream)
    pipe.type("k")
    reader.stop(timeout=5)
    pipe.close()


# --------------------------------------------------------------------------- issue #10: cancel, billed, republish
def test_cancel_supply_drops_an_unplugged_supply_and_hello_reports_the_held_session(
        kafka_settings, journal_path, done_reader) -> None:
    system = start_engine(engine_config(kafka_settings, journal_path, auto_plug=False))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    try:
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
        assert peer.wait_for("supply_state", lambda m: True)["session_id"] is None
        peer.send(authorize("S1"))
        assert auth_answer(peer, "S1")["accepted"] is True
        peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))  # a restarted Monitor learns the session
        state = peer.wait_for("supply_state", lambda m: m["session_id"] == "S1")
        assert state["plugged"] is False
        peer.send(protocol.CancelSupply(session_id="S1", reason="authorisation timed out"))
        ended = peer.wait_for("supply_ended", lambda m: m["session_id"] == "S1")
        assert (ended["end_reason"], ended["energy_kwh"]) == ("central_stop", 0.0)
        assert status(system)["state"] == "idle"
        time.sleep(1.0)
        assert completions(done_reader, "S1") == []  # nothing supplied: no completion, no bill
        peer.send(protocol.CancelSupply(session_id="S9"))  # unknown: confirmed all the same
        assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S9")["end_reason"] == "central_stop"
    finally:
        peer.close()
        system.stop()


@pytest.fixture
def quick_billing_engine(kafka_settings: KafkaSettings, journal_path: Path) -> Any:
    """As ``engine``, asking Central about unbilled completions every 1 s and republishing after 4 s."""
    system = start_engine(engine_config(kafka_settings, journal_path, billing_check=1.0, republish_after=4.0))
    peer = connect_when_listening("127.0.0.1", engine_port(system))
    peer.send(protocol.Hello(cp_id="CP1", price_eur_kwh=0.30))
    wait_until(lambda: status(system)["cp_id"] == "CP1", what="hello handled")
    yield system, peer
    peer.close()
    system.stop()


def test_cancel_after_the_plug_in_ends_and_bills_and_the_ticket_stops_republishing(
        quick_billing_engine, done_reader, journal_path) -> None:
    _system, peer = quick_billing_engine
    peer.send(authorize("S1"))
    peer.wait_for("supply_started", lambda m: m["session_id"] == "S1")
    time.sleep(0.3)
    peer.send(protocol.CancelSupply(session_id="S1", reason="late answer"))
    assert peer.wait_for("supply_ended", lambda m: m["session_id"] == "S1")["end_reason"] == "central_stop"
    [done] = done_reader.wait_for(lambda _: completions(done_reader, "S1"), what="completion of S1")
    assert done.energy_kwh > 0
    # not billed yet: the Engine asks Central (billing_check, 1 s here) ...
    assert peer.wait_for("billing_query", lambda m: m["session_id"] == "S1", timeout=10)["cp_id"] == "CP1"
    # ... and republishes after republish_after (4 s here): Central's ticket key makes it a replay
    seen: dict[str, protocol.ChargeCompletion] = {}

    def republished() -> bool:
        seen.update((c.message_id, c) for c in completions(done_reader, "S1"))
        return len(seen) >= 2

    wait_until(republished, timeout=15, what="the republished completion")
    assert {c.energy_kwh for c in seen.values()} == {done.energy_kwh}
    peer.send(protocol.SessionBilled(session_id="S1", cp_id="CP1"))
    def billed() -> bool:
        with EngineJournal(journal_path) as j:
            return j.billed_at("S1") is not None

    wait_until(billed, what="billed in the journal")
