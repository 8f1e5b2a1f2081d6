"""The driver survives a crash of its own DriverActor (an exception inside the actor, not a kill).

Central, an Engine (auto-plug), its Monitor and a Driver run in this process
against the real broker, real sockets and a real SQLite file. Mid-supply the
DriverActor crashes; its supervisor (rest_for_one) restarts it together with
what was started after it (output, pump); the restarted actor re-learns the
live supply from Central's answer to its hello, the supply goes on, the
driver's next requests are answered, and the supply is billed exactly once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from actors.central import CentralStatus
from actors.console import ConsoleLine
from actors.driver import DriverStatus
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.driver_system import DriverConfig, start_driver
from supervisors.engine_system import EngineConfig, engine_port, start_engine
from supervisors.monitor_system import MonitorConfig, start_monitor
from supervisors.supervisor import WhichChildren
from supervisors.system import RunningSystem
from tests import fault_matrix
from tests.waiting import wait_until
from transport.kafka import Delivery
from transport.listener import ListenerPort

pytestmark = pytest.mark.broker

DRIVER_LOG = "evcharging.driver"


@pytest.fixture
def systems() -> Iterator[list[RunningSystem]]:
    started: list[RunningSystem] = []
    yield started
    for system in reversed(started):
        system.stop()


def driver_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.name == DRIVER_LOG]


def generations(system: RunningSystem) -> dict[str, tuple[int, bool]]:
    return system.supervisor.ask(WhichChildren(), timeout=5)


def status(driver: RunningSystem) -> dict[str, Any] | None:
    try:
        return driver.ask("driver", DriverStatus(), timeout=2)
    except LookupError:  # between the crash and the restart
        return None


def test_driver_actor_crash_mid_supply(kafka_settings, systems, tmp_path, caplog) -> None:
    """How the crash is caused: the test tells the running DriverActor a ``Delivery`` whose
    ``items`` is ``None`` instead of a tuple of records — a malformed batch, the message
    type its pump sends. Iterating it raises TypeError inside ``on_receive``, outside the
    per-record guard that keeps one odd record from stalling the pump, so the actor dies
    with an exception exactly as a bug in its own code would make it die. No test-only
    hook exists in the production code.
    """
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    db = str(tmp_path / "central.db")
    prefix = kafka_settings.topic_prefix
    central = start_central(CentralSystemConfig(enroll="open", port=0, host="127.0.0.1",
                                                broker=kafka_settings.bootstrap, db_path=db, topic_prefix=prefix,
                                                group_id=f"central-{uuid.uuid4().hex[:6]}"))
    systems.append(central)
    assert central.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
    central_port = central.ask("monitor-listener", ListenerPort())
    engine = start_engine(EngineConfig(broker=kafka_settings.bootstrap, topic_prefix=prefix, listen_host="127.0.0.1",
                                       listen_port=0, journal=str(tmp_path / "engine.journal"), power_kw=50.0,
                                       tick=0.2, auto_plug=True, plug_delay=0.1, supply_seconds=None,
                                       console=False))
    systems.append(engine)
    monitor = start_monitor(MonitorConfig(engine_host="127.0.0.1", engine_port=engine_port(engine),
                                          central_host="127.0.0.1", central_port=central_port, cp_id="MAD1",
                                          location="Madrid, Sol", heartbeat_interval=0.2, health_interval=0.2))
    systems.append(monitor)
    wait_until(lambda: central.ask("central", CentralStatus()).get("MAD1", {}).get("state") == "ACTIVE",
               timeout=20, what="MAD1 ACTIVE at Central")

    driver = start_driver(DriverConfig(broker=kafka_settings.bootstrap, driver_id="dcrash", topic_prefix=prefix,
                                       console=False, request_timeout=5.0))
    systems.append(driver)
    wait_until(lambda: any("no supply in progress" in m for m in driver_lines(caplog)), timeout=20,
               what="Central answered the driver's hello")
    driver.get("output").tell(ConsoleLine("charge MAD1"))  # what the console reader tells
    live = wait_until(lambda: (s := status(driver)) and (a := s["active_session"]) and a["state"] == "supplying"
                      and a["energy_kwh"] > 0 and a, timeout=30, what="the driver sees its supply")
    session_id = live["session_id"]

    # --- the crash ------------------------------------------------------------------
    before = generations(driver)
    old_driver = driver.get("driver")
    assert old_driver is not None
    crashed_at = time.monotonic()
    old_driver.tell(Delivery(None))  # type: ignore[arg-type]  # see the docstring

    after = wait_until(lambda: (g := generations(driver))["driver"][0] > before["driver"][0] and g["driver"][1]
                       and g["pump"][1] and g, timeout=10, what="the supervisor restarted the driver")
    assert not old_driver.is_alive()
    # rest_for_one: what was started after the driver restarted after it; the publisher did not
    assert after["output"][0] > before["output"][0] and after["pump"][0] > before["pump"][0]
    assert after["publisher"][0] == before["publisher"][0]

    # the restarted actor re-learns the live supply from Central's answer to its hello
    relearnt = wait_until(lambda: (s := status(driver)) and (a := s["active_session"])
                          and a["session_id"] == session_id and a, timeout=20,
                          what="the restarted driver knows its live supply again")
    recover_s = time.monotonic() - crashed_at
    assert driver.get("driver") is not old_driver
    wait_until(lambda: any("You are charging at MAD1" in m and session_id in m for m in driver_lines(caplog)),
               timeout=10, what="the restarted driver's hello answered with the live supply")
    # the supply goes on: telemetry keeps coming to the new generation
    wait_until(lambda: (s := status(driver)) and s["active_session"]
               and s["active_session"]["energy_kwh"] > max(relearnt["energy_kwh"], live["energy_kwh"]),
               timeout=15, what="telemetry reaches the restarted driver")

    # a new request is answered
    caplog.clear()
    driver.get("output").tell(ConsoleLine("list"))
    wait_until(lambda: any("charging point(s)" in m and "MAD1" in m for m in driver_lines(caplog)), timeout=15,
               what="the list of CPs after the crash")

    # the driver stops its supply (it knows the session again): one ticket, shown once
    driver.get("output").tell(ConsoleLine("stop"))
    wait_until(lambda: (s := status(driver)) and s["tickets_seen"] == [session_id] and s["active_session"] is None,
               timeout=20, what="the ticket reaches the restarted driver")
    with Repository(db) as repo:
        wait_until(lambda: repo.live_session_for_cp("MAD1") is None, timeout=10, what="the session completed")
        tickets = [t for t in repo.tickets() if t.session_id == session_id]
    assert len(tickets) == 1 and tickets[0].driver_id == "dcrash" and tickets[0].energy_kwh > 0
    assert sum(f"Ticket for {session_id}" in m for m in driver_lines(caplog)) == 1
    row = fault_matrix.billing_row("crash DriverActor mid-supply", db, [session_id], recover_s)
    assert row.lost == 0 and row.double_billed == 0


def test_driver_actor_crash_mid_services_file_goes_on_where_it_was(kafka_settings, systems, tmp_path, caplog) -> None:
    """File mode: the runner restarts with the driver (rest_for_one) but keeps its progress, so the
    service in progress is neither repeated nor lost, and the file goes on. Crashed the same way
    as above (a Delivery whose items is None); Central is the fake one of tests/test_driver.py."""
    from actors.driver import DriverResults
    from tests.test_driver import EndSupply, requests_of, start_fake_central
    from transport import protocol

    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    central = start_fake_central(kafka_settings, systems, plan={"CP1": "authorize", "CP2": "hold", "CP3": "deny"})
    services = tmp_path / "services.txt"
    services.write_text("CP1\nCP2\nCP3\n")
    driver = start_driver(DriverConfig(broker=kafka_settings.bootstrap, driver_id="dfile",
                                       topic_prefix=kafka_settings.topic_prefix, console=False, request_timeout=3.0,
                                       services_file=str(services), pause=0.2))
    systems.append(driver)
    wait_until(lambda: (s := status(driver)) and (a := s["active_session"]) and a["session_id"] == "S-CP2",
               timeout=20, what="service 2 authorised and held")
    before = generations(driver)
    driver.get("driver").tell(Delivery(None))  # type: ignore[arg-type]
    wait_until(lambda: (g := generations(driver))["services"][0] > before["services"][0] and g["services"][1],
               timeout=10, what="the runner restarted after the driver")
    wait_until(lambda: (s := status(driver)) and s["services_done"] == 1 and s["active_session"]
               and s["active_session"]["session_id"] == "S-CP2", timeout=20,
               what="the restarted driver knows service 2's supply and service 1's result")
    central.get("central").tell(EndSupply("dfile"))
    wait_until(lambda: (s := status(driver)) and s["done"], timeout=20, what="every service done")
    results = driver.ask("driver", DriverResults())
    assert [(r["cp_id"], r["outcome"]) for r in results] == [("CP1", "ticket"), ("CP2", "ticket"), ("CP3", "denied")]
    assert results[1]["session_id"] == "S-CP2"
    assert sorted(m.cp_id for _, m in requests_of(central, protocol.ChargeRequest)) == ["CP1", "CP2", "CP3"]
