"""The Monitor (EV_CP_M) between a fake Central and a real Engine.

Central is played by a real Listener plus a small owner actor that answers
register_request as told and records everything; the Engine is a real
EV_CP_E system (real broker, real journal) driven through its console pipe.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.monitor import MonitorStatus
from actors.runtime import Directory, SupervisedActor, Supervision
from supervisors.engine_system import start_engine
from supervisors.monitor_system import MonitorConfig, start_monitor
from supervisors.supervisor import ChildSpec, StartChild, Supervisor, spawner, start_tree
from supervisors.system import RunningSystem
from tests.test_engine import ConsolePipe, engine_config, run_program
from tests.test_engine import status as engine_status
from tests.waiting import wait_until
from transport import protocol
from transport.broker import KafkaSettings, free_port
from transport.link import Close, FrameIn, LinkDown, LinkUp, Send
from transport.listener import Listener, ListenerPort

pytestmark = pytest.mark.broker


# --------------------------------------------------------------------------- a fake Central
@dataclass(frozen=True, slots=True)
class SetMode:
    """accept | deny: how to answer register_request."""

    mode: str


@dataclass(frozen=True, slots=True)
class SetStopped:
    """Whether to repeat stop_cp after accepting a registration (as Central does for a stopped CP)."""

    stopped: bool


@dataclass(frozen=True, slots=True)
class ToCp:
    message: Any


@dataclass(frozen=True, slots=True)
class DropCp:
    pass


@dataclass(frozen=True, slots=True)
class Received:
    """Ask: [(monotonic time, message)] of everything the CP sent."""


class FakeCentral(SupervisedActor):
    """Answers register_request (accepted with price 0.30, or denied) and records frames."""

    def __init__(self, mode: str = "accept", *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.mode = mode
        self.stopped = False
        self.link: Any = None
        self.received: list[tuple[float, Any]] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case LinkUp(link):
                self.link = link
            case LinkDown(link) if self.link is not None and link.actor_urn == self.link.actor_urn:
                self.link = None
            case FrameIn(link, msg):
                self.link = link
                self.received.append((time.monotonic(), msg))
                if isinstance(msg, protocol.RegisterRequest):
                    answer = (protocol.RegisterResponse(correlation_id=msg.correlation_id, status="accepted",
                                                        price_eur_kwh=0.30, location="Calle Mayor 1")
                              if self.mode == "accept" else
                              protocol.RegisterResponse(correlation_id=msg.correlation_id, status="denied",
                                                        reason="unknown CP"))
                    link.tell(Send(answer))
                    if self.mode == "accept" and self.stopped:
                        link.tell(Send(protocol.StopCp(reason="stopped by Central")))
            case SetMode(mode):
                self.mode = mode
            case SetStopped(stopped):
                self.stopped = stopped
            case ToCp(msg):
                if self.link is None:
                    return False
                self.link.tell(Send(msg))
                return True
            case DropCp():
                if self.link is not None:
                    self.link.tell(Close("test drops the CP"))
            case Received():
                return list(self.received)
        return None


class Central:
    """Handle on the fake Central's tree."""

    def __init__(self, port: int = 0, mode: str = "accept") -> None:
        self.directory = Directory()
        self.tree = start_tree("central", [
            ChildSpec("central", FakeCentral, (mode,)),
            ChildSpec("conns", Supervisor, ("conns",), {"directory": self.directory}),
        ], directory=self.directory)
        self.tree.ask(StartChild(ChildSpec(
            "listener", Listener, ("127.0.0.1", port, "central", self.directory, spawner(self.directory.get("conns"))),
        )))
        self.port = self.directory.get("listener").ask(ListenerPort())

    def ask(self, message: Any) -> Any:
        return self.directory.get("central").ask(message, timeout=5)

    def messages(self, kind: type | None = None) -> list[Any]:
        return [m for _, m in self.ask(Received()) if kind is None or isinstance(m, kind)]

    def timed(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, m) for t, m in self.ask(Received()) if isinstance(m, kind)]

    def wait_for(self, kind: type, where: Any = lambda m: True, count: int = 1, timeout: float = 10.0) -> list[Any]:
        return wait_until(lambda: len(found := [m for m in self.messages(kind) if where(m)]) >= count and found,
                          timeout=timeout, what=f"{count} {kind.__name__} at Central")

    def stop(self) -> None:
        self.tree.stop()


# --------------------------------------------------------------------------- fixtures
def monitor_config(central_port: int, engine_port: int, **overrides: Any) -> MonitorConfig:
    fields: dict[str, Any] = dict(
        engine_host="127.0.0.1", engine_port=engine_port, central_host="127.0.0.1", central_port=central_port,
        cp_id="CP1", location="Calle Mayor 1", heartbeat_interval=0.2, health_interval=0.1, health_timeout=0.5,
        register_retry=0.3, retry_base=0.05, retry_max=0.2, stop_confirm=0.4,
    )
    fields.update(overrides)
    return MonitorConfig(**fields)


def mstatus(monitor: RunningSystem) -> dict[str, Any]:
    return monitor.ask("monitor", MonitorStatus())


@pytest.fixture
def console() -> Any:
    pipe = ConsolePipe()
    yield pipe
    pipe.close()


@pytest.fixture
def engine_port_free() -> int:
    return free_port()


@pytest.fixture
def engine(kafka_settings: KafkaSettings, tmp_path: Path, console: ConsolePipe, engine_port_free: int) -> Any:
    system = start_engine(engine_config(kafka_settings, tmp_path / "engine.journal", console,
                                        listen_port=engine_port_free))
    yield system
    system.stop()


@pytest.fixture
def central() -> Any:
    c = Central()
    yield c
    c.stop()


# --------------------------------------------------------------------------- tests
def test_not_active_before_central_accepted(engine, engine_port_free, caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    central = Central(mode="deny")
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["engine_ok"], what="engine OK")
        central.wait_for(protocol.RegisterRequest, count=2)  # denied, then asked again after the backoff
        first = central.messages(protocol.RegisterRequest)[0]
        assert (first.cp_id, first.location) == ("CP1", "Calle Mayor 1")
        snap = mstatus(monitor)
        assert (snap["state"], snap["registered"]) == ("DISCONNECTED", False)
        assert not central.messages(protocol.Heartbeat)
        assert any("Central refused to register CP1: unknown CP" in r.getMessage() for r in caplog.records)

        central.ask(SetMode("accept"))
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE", what="ACTIVE once accepted")
        snap = mstatus(monitor)
        assert snap["registered"] and snap["price_eur_kwh"] == 0.30
        beat = central.wait_for(protocol.Heartbeat)[0]
        assert (beat.cp_id, beat.engine_ok, beat.state) == ("CP1", True, "ACTIVE")
        wait_until(lambda: engine_status(engine)["price_eur_kwh"] == 0.30, what="hello with Central's price")
        assert engine_status(engine)["cp_id"] == "CP1"
    finally:
        monitor.stop()
        central.stop()


def test_accepted_but_no_engine_is_broken_not_active(kafka_settings, tmp_path, central, caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging.monitor")
    port = free_port()
    monitor = start_monitor(monitor_config(central.port, port))
    engine = None
    try:
        wait_until(lambda: mstatus(monitor)["registered"], what="registered")
        wait_until(lambda: mstatus(monitor)["state"] == "BROKEN", what="BROKEN without an Engine")
        [fault] = central.wait_for(protocol.FaultNotification)
        assert "not connected" in fault.reason
        assert not any(r.getMessage() == "CP1 is now ACTIVE" for r in caplog.records)
        beats = central.wait_for(protocol.Heartbeat)
        assert all((m.engine_ok, m.state) == (False, "BROKEN") for m in beats)
        refusal = "the Engine of CP1 is not connected"
        central.ask(ToCp(protocol.AuthorizeSupply(correlation_id="c1", session_id="S1", driver_id="D1",
                                                  price_eur_kwh=0.3, cp_id="CP1")))
        [answer] = central.wait_for(protocol.SupplyAuthorizationResponse)
        assert (answer.correlation_id, answer.accepted, answer.reason) == ("c1", False, refusal)

        engine = start_engine(engine_config(kafka_settings, tmp_path / "engine.journal", listen_port=port))
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE", what="ACTIVE once the Engine answers")
        central.wait_for(protocol.FaultCleared)
    finally:
        monitor.stop()
        if engine is not None:
            engine.stop()


def test_heartbeats_arrive_every_second(engine, engine_port_free, central) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free, heartbeat_interval=1.0))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        central.wait_for(protocol.Heartbeat, count=4, timeout=8)
        times = [t for t, _ in central.timed(protocol.Heartbeat)]
        gaps = [b - a for a, b in itertools.pairwise(times[1:])]  # the first follows the acceptance at once
        assert gaps and all(0.7 <= g <= 1.3 for g in gaps), gaps
        assert all(m.engine_ok and m.state == "ACTIVE" for m in central.messages(protocol.Heartbeat)[1:])
    finally:
        monitor.stop()


def test_engine_ko_is_reported_once_and_so_is_the_recovery(engine, engine_port_free, central, console) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        console.type("k")
        [fault] = central.wait_for(protocol.FaultNotification)
        assert fault.cp_id == "CP1"
        wait_until(lambda: mstatus(monitor)["state"] == "BROKEN")
        central.wait_for(protocol.Heartbeat, lambda m: not m.engine_ok and m.state == "BROKEN")
        central.ask(ToCp(protocol.AuthorizeSupply(correlation_id="c1", session_id="S1", driver_id="D1",
                                                  price_eur_kwh=0.3, cp_id="CP1")))
        [answer] = central.wait_for(protocol.SupplyAuthorizationResponse)
        assert (answer.accepted, answer.reason) == (False, "CP1 is out of order (its Engine is KO)")

        console.type("k")
        central.wait_for(protocol.FaultCleared)
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        central.wait_for(protocol.Heartbeat, lambda m: m.engine_ok and m.state == "ACTIVE", count=2)
        assert len(central.messages(protocol.FaultNotification)) == 1
        assert len(central.messages(protocol.FaultCleared)) == 1

        engine.stop()  # the Engine vanishes: no answers
        [_, gone] = central.wait_for(protocol.FaultNotification, count=2)
        assert "not connected" in gone.reason or "did not answer" in gone.reason
        wait_until(lambda: mstatus(monitor)["state"] == "BROKEN")
    finally:
        monitor.stop()


def test_a_closed_engine_socket_is_ko_at_once(engine, engine_port_free, central) -> None:
    """A dead Engine closes its socket: that is KO now, not after the health timeout."""
    monitor = start_monitor(monitor_config(central.port, engine_port_free, health_timeout=30.0))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        stopped = time.monotonic()
        engine.stop()
        [gone] = central.wait_for(protocol.FaultNotification, timeout=5)
        assert time.monotonic() - stopped < 2.0  # the 30 s health timeout played no part
        assert gone.reason.startswith("the Engine is not connected"), gone.reason
        wait_until(lambda: mstatus(monitor)["state"] == "BROKEN")
    finally:
        monitor.stop()


def test_relays_a_supply_both_ways(engine, engine_port_free, central) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        central.ask(ToCp(protocol.AuthorizeSupply(correlation_id="c1", session_id="S1", driver_id="D1",
                                                  price_eur_kwh=0.3, cp_id="CP1")))
        [answer] = central.wait_for(protocol.SupplyAuthorizationResponse)
        assert (answer.correlation_id, answer.session_id, answer.accepted) == ("c1", "S1", True)
        [started] = central.wait_for(protocol.SupplyStarted)
        assert (started.cp_id, started.session_id, started.driver_id) == ("CP1", "S1", "D1")
        wait_until(lambda: mstatus(monitor)["state"] == "SUPPLYING")
        central.wait_for(protocol.Heartbeat, lambda m: m.state == "SUPPLYING" and m.supplying_session_id == "S1")
        wait_until(lambda: engine_status(engine)["seq"] >= 1, what="a first metered tick")

        central.ask(ToCp(protocol.StopSupply(session_id="S1", reason="driver_stop")))
        [ended] = central.wait_for(protocol.SupplyEnded)
        assert (ended.session_id, ended.end_reason, ended.driver_id) == ("S1", "driver_stop", "D1")
        assert ended.energy_kwh is not None and ended.energy_kwh > 0
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")

        central.ask(ToCp(protocol.StopCp(reason="maintenance")))
        wait_until(lambda: mstatus(monitor)["state"] == "STOPPED" and engine_status(engine)["stopped"])
        central.ask(ToCp(protocol.AuthorizeSupply(correlation_id="c2", session_id="S2", driver_id="D1",
                                                  price_eur_kwh=0.3, cp_id="CP1")))
        [denied] = central.wait_for(protocol.SupplyAuthorizationResponse, lambda m: m.session_id == "S2")
        assert (denied.accepted, denied.reason) == (False, "CP was stopped by Central")
        central.ask(ToCp(protocol.ResumeCp()))
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE" and not engine_status(engine)["stopped"])
    finally:
        monitor.stop()


def test_central_link_drop_means_reconnect_and_register_again(engine, engine_port_free, central) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        central.ask(DropCp())
        central.wait_for(protocol.RegisterRequest, count=2)
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE" and mstatus(monitor)["central_connected"])
        beats = len(central.messages(protocol.Heartbeat))
        central.wait_for(protocol.Heartbeat, count=beats + 2)
    finally:
        monitor.stop()


def test_a_restarted_monitor_actor_takes_over_its_links_and_registers_again(engine, engine_port_free,
                                                                            central) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        old = monitor.get("monitor")
        old.stop()  # the supervisor starts a fresh MonitorActor; both sockets stay up
        wait_until(lambda: monitor.get("monitor") not in (None, old), what="a new Monitor actor")
        central.wait_for(protocol.RegisterRequest, count=2)
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE" and mstatus(monitor)["engine_connected"],
                   what="ACTIVE again without reconnecting")
        assert central.messages(protocol.FaultNotification) == []
    finally:
        monitor.stop()


def test_after_reconnecting_central_decides_whether_the_cp_stays_stopped(engine, engine_port_free, central) -> None:
    monitor = start_monitor(monitor_config(central.port, engine_port_free))
    try:
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE")
        central.ask(SetStopped(True))
        central.ask(ToCp(protocol.StopCp(reason="maintenance")))
        wait_until(lambda: mstatus(monitor)["state"] == "STOPPED" and engine_status(engine)["stopped"])

        central.ask(DropCp())  # Central still has it stopped and says so again
        central.wait_for(protocol.RegisterRequest, count=2)
        wait_until(lambda: mstatus(monitor)["registered"])
        central.wait_for(protocol.Heartbeat, lambda m: m.state == "STOPPED", count=len(
            [m for m in central.messages(protocol.Heartbeat) if m.state == "STOPPED"]) + 4)  # well past stop_confirm
        assert mstatus(monitor)["state"] == "STOPPED" and engine_status(engine)["stopped"]

        central.ask(SetStopped(False))  # resumed while the CP was away: not repeated on registration
        central.ask(DropCp())
        central.wait_for(protocol.RegisterRequest, count=3)
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE" and not engine_status(engine)["stopped"],
                   what="back in service")
    finally:
        monitor.stop()


def test_a_supply_typed_at_the_cp_is_denied_while_central_is_down(engine, engine_port_free, console,
                                                                   caplog) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    central_port = free_port()
    monitor = start_monitor(monitor_config(central_port, engine_port_free))
    central = None
    try:
        wait_until(lambda: mstatus(monitor)["engine_ok"] and engine_status(engine)["cp_id"] == "CP1")
        console.type("s D1")
        wait_until(lambda: any("refused the supply for driver D1: Central is unavailable" in r.getMessage()
                               for r in caplog.records), what="the denial shown at the CP")

        central = Central(port=central_port)
        wait_until(lambda: mstatus(monitor)["state"] == "ACTIVE", what="registered once Central is up")
        console.type("s D2")
        [request] = central.wait_for(protocol.CpSupplyRequest)
        assert (request.cp_id, request.driver_id) == ("CP1", "D2")
        central.ask(ToCp(protocol.CpSupplyResponse(correlation_id=request.correlation_id, cp_id="CP1",
                                                   status="authorized", session_id="S7")))
        wait_until(lambda: any("Central authorised the supply for driver D2 (session S7)" in r.getMessage()
                               for r in caplog.records), what="the authorisation shown at the CP")
    finally:
        monitor.stop()
        if central is not None:
            central.stop()


@pytest.mark.slow
def test_ev_cp_m_runs_until_sigint_and_exits_0(tmp_path) -> None:
    log_file = tmp_path / "monitor.log"
    proc = run_program("supervisors.monitor_system", [
        f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", "CP9", "--log-file", str(log_file),
    ])
    try:
        wait_until(lambda: log_file.exists() and "Cannot reach CENTRAL" in log_file.read_text(),
                   timeout=20, what="the Monitor trying to reach Central")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Monitor of CP9 started" in err and "Monitor stopped" in err and "Traceback" not in err
