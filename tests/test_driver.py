"""The driver app against a real broker and a fake Central written here.

The fake Central is what docs/flows.md says Central does towards drivers,
and nothing more: a pump (consumer group) on driver_requests, a publisher on
driver_responses, and a tiny actor that answers hello / list / charge / stop,
keeps unacknowledged tickets for the next hello, and can be told to publish
any record (another driver's, a duplicate) or to end a supply.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from actors.console import ConsoleLine
from actors.driver import DriverResults, DriverStatus
from actors.runtime import Directory, SupervisedActor, Supervision
from supervisors.driver_system import DriverConfig, main, read_services, start_driver
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, start_system
from tests.waiting import wait_until
from transport import protocol
from transport.kafka import ConsumerPump, Delivery, Publish, Publisher, partition_for, wait_ready

pytestmark = pytest.mark.broker

DRIVER_LOG = "evcharging.driver"


# --- the fake Central ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Test -> fake Central: publish ``message`` on driver_responses under ``key``."""

    key: str
    message: Any


@dataclass(frozen=True, slots=True)
class EndSupply:
    """Test -> fake Central: the CP unplugged; bill the driver's live supply."""

    driver_id: str
    reason: str = "unplugged"


class FakeCentral(SupervisedActor):
    """``plan`` maps a CP id to 'authorize' (whole supply and ticket at once),
    'hold' (authorised, supplying until EndSupply or stop), 'ticket-first' (the ticket, then
    the request's answer), 'cancel-after-authorize', 'deny' or 'ignore'."""

    def __init__(self, directory: Directory, *, plan: dict[str, str] | None = None,
                 cps: tuple[protocol.CpInfo, ...] = (), live: dict[str, protocol.ActiveSessionInfo] | None = None,
                 unacked: dict[str, dict[str, protocol.TicketInfo]] | None = None,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.directory = directory
        self.plan = plan or {}
        self.cps = cps
        self.live = dict(live or {})
        self.unacked = {d: dict(t) for d, t in (unacked or {}).items()}
        self.requests: list[tuple[float, Any]] = []
        self.sent: list[tuple[float, Any]] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                for item in items:
                    if item.error is None:
                        self.requests.append((time.monotonic(), item.message))
                        self._answer(item.message)
            case Send(key, msg):
                self._send(key, msg)
            case EndSupply(driver, reason):
                self._end(driver, reason)
            case "requests":
                return list(self.requests)
            case "sent":
                return list(self.sent)
        return None

    def _send(self, key: str, msg: Any) -> None:
        self.sent.append((time.monotonic(), msg))
        self.directory.tell("publisher", Publish("driver_responses", key, msg))

    def _answer(self, msg: Any) -> None:
        match msg:
            case protocol.DriverHello(driver_id=d, correlation_id=corr):
                self._send(d, protocol.DriverHelloResponse(
                    driver_id=d, correlation_id=corr, tickets=tuple(self.unacked.get(d, {}).values()),
                    active_session=self.live.get(d)))
            case protocol.AvailableCpsRequest(driver_id=d, correlation_id=corr):
                self._send(d, protocol.AvailableCpsResponse(driver_id=d, correlation_id=corr,
                                                            charging_points=self.cps))
            case protocol.ChargeRequest(driver_id=d, cp_id=cp, correlation_id=corr):
                plan = self.plan.get(cp, "deny")
                if plan == "deny":
                    self._send(d, protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="denied",
                                                          cp_id=cp, reason=f"CP {cp} is BROKEN"))
                elif plan in ("authorize", "hold"):
                    self._authorize(d, cp, corr, end=plan == "authorize")
                elif plan == "cancel-after-authorize":  # the CP never ran it: Central cancels it
                    self._authorize(d, cp, corr, end=False)
                    self.live.pop(d, None)
                    self._send(d, protocol.SupplyEvent(driver_id=d, session_id=f"S-{cp}", cp_id=cp, event="denied",
                                                       detail="session cancelled: CP is not running it"))
                elif plan == "ticket-first":  # Central restarted before answering; the supply went on
                    sid = f"S-{cp}"
                    self.live[d] = protocol.ActiveSessionInfo(session_id=sid, cp_id=cp, energy_kwh=0.05,
                                                              cost_eur=0.02, state="SUPPLYING")
                    self._end(d, "unplugged")
                    self._send(d, protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="authorized",
                                                          cp_id=cp, session_id=sid))
            case protocol.StopChargingRequest(driver_id=d, session_id=sid, correlation_id=corr):
                self._send(d, protocol.StopChargingResponse(driver_id=d, correlation_id=corr, status="ok",
                                                            session_id=sid))
                self._end(d, "driver_stop")
            case protocol.TicketAck(driver_id=d, session_id=sid):
                self.unacked.get(d, {}).pop(sid, None)

    def _authorize(self, d: str, cp: str, corr: str, end: bool) -> None:
        sid = f"S-{cp}"
        for event in ("requested", "waiting_cp", "authorized"):
            self._send(d, protocol.SupplyEvent(driver_id=d, session_id=sid, cp_id=cp, event=event))
        self._send(d, protocol.ChargeResponse(driver_id=d, correlation_id=corr, status="authorized",
                                              cp_id=cp, session_id=sid))
        self.live[d] = protocol.ActiveSessionInfo(session_id=sid, cp_id=cp, energy_kwh=0.0, cost_eur=0.0,
                                                  state="ACTIVE")
        if end:
            self._send(d, protocol.SupplyEvent(driver_id=d, session_id=sid, cp_id=cp, event="plugged_in"))
            for seq in (1, 2, 3):
                self._send(d, protocol.ChargingStatusUpdate(driver_id=d, session_id=sid, cp_id=cp, seq=seq,
                                                            energy_kwh=0.002 * seq, cost_eur=0.0006 * seq,
                                                            power_kw=7.4))
            self.live[d] = protocol.ActiveSessionInfo(session_id=sid, cp_id=cp, energy_kwh=0.006,
                                                      cost_eur=0.0018, state="SUPPLYING")
            self._end(d, "unplugged")

    def _end(self, d: str, reason: str) -> None:
        live = self.live.pop(d, None)
        if live is None:
            return
        now = time.time()
        info = protocol.TicketInfo(session_id=live.session_id, cp_id=live.cp_id, price_eur_kwh=0.30,
                                   energy_kwh=live.energy_kwh, cost_eur=live.cost_eur, started_at=now - 5,
                                   ended_at=now, end_reason=reason)
        self.unacked.setdefault(d, {})[live.session_id] = info
        self._send(d, protocol.Ticket(driver_id=d, session_id=info.session_id, cp_id=info.cp_id,
                                      price_eur_kwh=info.price_eur_kwh, energy_kwh=info.energy_kwh,
                                      cost_eur=info.cost_eur, started_at=info.started_at,
                                      ended_at=info.ended_at, end_reason=reason))


# --- fixtures and helpers ------------------------------------------------------------
@pytest.fixture
def systems() -> Iterator[list[RunningSystem]]:
    """Every system a test starts goes here and is stopped at the end, whatever happened."""
    started: list[RunningSystem] = []
    yield started
    for system in reversed(started):
        system.stop()


@pytest.fixture
def driver_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=DRIVER_LOG)
    return caplog


def start_fake_central(settings: Any, systems: list[RunningSystem], **kwargs: Any) -> RunningSystem:
    directory = Directory()
    system = start_system("fake-central", [
        ChildSpec("central", FakeCentral, (directory,), kwargs),
        ChildSpec("publisher", Publisher, (settings,)),
        ChildSpec("requests", ConsumerPump, (settings, ("driver_requests",), "central", directory),
                  {"group_id": f"fake-central-{uuid.uuid4().hex[:6]}"}),
    ], directory=directory)
    systems.append(system)
    assert wait_ready(system.get("requests"))
    return system


def start(settings: Any, systems: list[RunningSystem], driver_id: str, **kwargs: Any) -> RunningSystem:
    kwargs.setdefault("console", False)
    config = DriverConfig(broker=settings.bootstrap, driver_id=driver_id, topic_prefix=settings.topic_prefix,
                          request_timeout=kwargs.pop("request_timeout", 3.0), **kwargs)
    system = start_driver(config)
    systems.append(system)
    return system


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.name == DRIVER_LOG]


def wait_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10.0) -> str:
    return wait_until(lambda: next((m for m in messages(caplog) if text in m), None), timeout=timeout,
                      what=f"a driver log line with {text!r}")


def requests_of(central: RunningSystem, kind: type) -> list[tuple[float, Any]]:
    return [(t, m) for t, m in central.ask("central", "requests") if isinstance(m, kind)]


def ticket_info(sid: str, cp: str) -> protocol.TicketInfo:
    return protocol.TicketInfo(session_id=sid, cp_id=cp, price_eur_kwh=0.30, energy_kwh=1.234, cost_eur=0.37,
                               started_at=time.time() - 60, ended_at=time.time() - 1, end_reason="unplugged")


# --- tests -----------------------------------------------------------------------
def test_comeback_shows_live_supply_and_missed_tickets_and_acks_them(kafka_settings, systems, driver_log) -> None:
    """§3: a driver that dies mid-supply comes back and sees its supply, then the ticket it missed."""
    live = protocol.ActiveSessionInfo(session_id="S-LIVE", cp_id="CP7", energy_kwh=2.31, cost_eur=0.69,
                                      state="SUPPLYING")
    central = start_fake_central(kafka_settings, systems, live={"d1": live},
                                 unacked={"d1": {"S-OLD": ticket_info("S-OLD", "CP3")}})
    first = start(kafka_settings, systems, "d1")
    wait_log(driver_log, "You are charging at CP7: 2.31 kWh, 0.69 €")
    wait_log(driver_log, "Ticket for S-OLD at CP3: 1.234 kWh × 0.30 €/kWh = 0.37 € (unplugged)")
    acks = wait_until(lambda: requests_of(central, protocol.TicketAck), what="ticket_ack")
    assert [m.session_id for _, m in acks] == ["S-OLD"]
    status = first.ask("driver", DriverStatus())
    assert status["active_session"]["session_id"] == "S-LIVE" and status["tickets_seen"] == ["S-OLD"]

    first.stop()  # the driver goes away; the supply ends while nobody listens
    central.get("central").tell(EndSupply("d1"))
    wait_until(lambda: any(isinstance(m, protocol.Ticket) for _, m in central.ask("central", "sent")), what="ticket")
    driver_log.clear()

    again = start(kafka_settings, systems, "d1")
    wait_log(driver_log, "Ticket for S-LIVE at CP7: 2.310 kWh × 0.30 €/kWh = 0.69 € (unplugged)")
    wait_until(lambda: len(requests_of(central, protocol.TicketAck)) == 2, what="second ticket_ack")
    assert [m.session_id for _, m in requests_of(central, protocol.TicketAck)] == ["S-OLD", "S-LIVE"]
    assert not any("S-OLD" in m for m in messages(driver_log))  # acknowledged: not shown again
    status = again.ask("driver", DriverStatus())
    assert status["active_session"] is None and status["tickets_seen"] == ["S-LIVE"]


def test_services_file_ticket_denied_unavailable_with_pause(kafka_settings, systems, driver_log, tmp_path) -> None:
    services = tmp_path / "services.txt"
    services.write_text("# three services\nCP1\n\n  CP2  \nCP3  # Central never answers this one\n")
    assert read_services(services) == ("CP1", "CP2", "CP3")
    central = start_fake_central(kafka_settings, systems, plan={"CP1": "authorize", "CP2": "deny", "CP3": "ignore"})
    pause = 0.3
    driver = start(kafka_settings, systems, "d2", services_file=str(services), pause=pause, request_timeout=1.0)

    wait_until(lambda: driver.ask("driver", DriverStatus())["done"], timeout=20, what="all services done")
    results = driver.ask("driver", DriverResults())
    assert [r["outcome"] for r in results] == ["ticket", "denied", "unavailable"]
    assert [r["cp_id"] for r in results] == ["CP1", "CP2", "CP3"]
    assert results[0]["session_id"] == "S-CP1" and results[0]["ticket"]["energy_kwh"] == pytest.approx(0.006)
    assert results[1]["reason"] == "CP CP2 is BROKEN" and results[1]["ticket"] is None
    assert "Central is unavailable" in results[2]["reason"]
    wait_log(driver_log, "All 3 services done: 1 tickets, 1 denied, 1 unavailable")

    # the pause: each next request comes at least `pause` after the previous service ended
    sent = central.ask("central", "sent")
    ticket_at = next(t for t, m in sent if isinstance(m, protocol.Ticket))
    denied_at = next(t for t, m in sent if isinstance(m, protocol.ChargeResponse) and m.status == "denied")
    charges = {m.cp_id: t for t, m in requests_of(central, protocol.ChargeRequest)}
    assert charges["CP2"] - ticket_at >= pause
    assert charges["CP3"] - denied_at >= pause
    # every step was shown, live consumption on one line each
    lines = messages(driver_log)
    assert any("Authorised at CP1 (session S-CP1)" in m for m in lines)
    assert sum("Authorised at CP1" in m for m in lines) == 1  # event and response: shown once
    assert "CP1: 0.006 kWh · 0.00 € · 7.4 kW" in lines
    assert any("Denied at CP2: CP CP2 is BROKEN" in m for m in lines)
    assert any("Central is unavailable" in m and "CP3" in m for m in lines)
    assert [m.session_id for _, m in requests_of(central, protocol.TicketAck)] == ["S-CP1"]


def test_a_ticket_before_its_requests_answer_ends_that_service_with_the_ticket(kafka_settings, systems, driver_log,
                                                                             tmp_path) -> None:
    """Central died while the CP was being asked, the supply happened meanwhile, and the restarted
    Central answers the charge request only when it bills: the ticket may reach the driver first.
    The service still ends in that ticket (not 'unavailable' after the request timeout)."""
    services = tmp_path / "services.txt"
    services.write_text("CP1\n")
    central = start_fake_central(kafka_settings, systems, plan={"CP1": "ticket-first"})
    driver = start(kafka_settings, systems, "d7", services_file=str(services), request_timeout=30.0)
    wait_until(lambda: driver.ask("driver", DriverStatus())["done"], timeout=20, what="the service done")
    (result,) = driver.ask("driver", DriverResults())
    assert (result["outcome"], result["session_id"]) == ("ticket", "S-CP1"), result
    assert result["ticket"]["energy_kwh"] == pytest.approx(0.05)
    wait_until(lambda: [m.session_id for _, m in requests_of(central, protocol.TicketAck)] == ["S-CP1"],
               what="the ticket acknowledged")


def test_a_session_cancelled_after_its_authorisation_ends_the_service_denied(kafka_settings, systems, driver_log,
                                                                             tmp_path) -> None:
    """Authorised, then Central cancels the session (the CP never ran it): no ticket will come, so
    the service ends 'denied' with Central's reason instead of waiting for a ticket forever."""
    services = tmp_path / "services.txt"
    services.write_text("CP1\n")
    start_fake_central(kafka_settings, systems, plan={"CP1": "cancel-after-authorize"})
    driver = start(kafka_settings, systems, "d8", services_file=str(services), request_timeout=30.0)
    wait_until(lambda: driver.ask("driver", DriverStatus())["done"], timeout=20, what="the service done")
    (result,) = driver.ask("driver", DriverResults())
    assert (result["outcome"], result["session_id"]) == ("denied", "S-CP1"), result
    assert "not running it" in result["reason"]
    assert driver.ask("driver", DriverStatus())["active_session"] is None


def test_other_drivers_records_ignored_and_duplicate_ticket_shown_once(kafka_settings, systems, driver_log) -> None:
    me = "driver-me"
    other = next(f"other-{i}" for i in range(1000) if partition_for(f"other-{i}", 8) == partition_for(me, 8))
    central = start_fake_central(kafka_settings, systems)
    driver = start(kafka_settings, systems, me)
    wait_log(driver_log, "no supply in progress, no missed tickets")
    tell = central.get("central").tell

    def ticket(driver_id: str, sid: str) -> protocol.Ticket:
        return protocol.Ticket(driver_id=driver_id, session_id=sid, cp_id="CP9", price_eur_kwh=0.3, energy_kwh=1.0,
                               cost_eur=0.3, started_at=time.time() - 9, ended_at=time.time(), end_reason="fault")

    tell(Send(other, ticket(other, "S-THEIRS")))  # another driver's, on our partition
    tell(Send(me, ticket(other, "S-MISKEYED")))  # our key, someone else's driver_id
    tell(Send(other, protocol.ChargingStatusUpdate(driver_id=other, session_id="S-THEIRS", cp_id="CP9", seq=1,
                                                   energy_kwh=0.1, cost_eur=0.03, power_kw=7.0)))
    tell(Send(me, ticket(me, "S-MINE")))
    tell(Send(me, ticket(me, "S-MINE")))  # redelivered
    # two acks prove both copies (and everything before them on the partition) were handled
    wait_until(lambda: len(requests_of(central, protocol.TicketAck)) == 2, what="two acks")
    lines = messages(driver_log)
    assert sum("Ticket for S-MINE at CP9" in m for m in lines) == 1
    assert "Ticket for S-MINE at CP9: 1.000 kWh × 0.30 €/kWh = 0.30 € (fault)" in lines
    assert not any("S-THEIRS" in m or "S-MISKEYED" in m or "CP9: 0.100" in m for m in lines)
    assert driver.ask("driver", DriverStatus())["tickets_seen"] == ["S-MINE"]
    assert {m.session_id for _, m in requests_of(central, protocol.TicketAck)} == {"S-MINE"}


def test_console_list_charge_stop(kafka_settings, systems, driver_log) -> None:
    cps = (protocol.CpInfo(cp_id="CP1", location="Madrid", price_eur_kwh=0.3, state="ACTIVE"),
           protocol.CpInfo(cp_id="ALC2", location="Alicante Centro", price_eur_kwh=0.25, state="BROKEN"))
    central = start_fake_central(kafka_settings, systems, plan={"CP1": "hold"}, cps=cps)
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as stream, os.fdopen(write_fd, "w", buffering=1) as keyboard:
        driver = start(kafka_settings, systems, "d4", console=True, console_stream=stream,
                       ticket_notice_interval=0.3)
        keyboard.write("list\n")
        table = wait_log(driver_log, "2 charging point(s), 1 available")
        rows = table.splitlines()[1:]
        assert rows[0].split() == ["CP", "LOCATION", "PRICE", "STATE"]
        assert "Alicante Centro" in rows[2] and rows[2].split()[-1] == "BROKEN" and "0.25 €/kWh" in rows[2]
        assert "0.30 €/kWh" in rows[1] and rows[1].startswith("CP1 ")

        keyboard.write("fly me to the moon\n")
        wait_log(driver_log, "Unknown command 'fly' — type 'help'")
        keyboard.write("charge CP1\n")
        charges = wait_until(lambda: requests_of(central, protocol.ChargeRequest), what="charge_request")
        assert [(m.driver_id, m.cp_id) for _, m in charges] == [("d4", "CP1")]
        wait_log(driver_log, "Authorised at CP1 (session S-CP1)")
        wait_log(driver_log, "still waiting for the ticket of S-CP1")  # nothing happens at the CP
        assert driver.ask("driver", DriverStatus())["active_session"]["session_id"] == "S-CP1"

        keyboard.write("stop\n")
        stops = wait_until(lambda: requests_of(central, protocol.StopChargingRequest), what="stop request")
        assert stops[0][1].session_id == "S-CP1"
        wait_log(driver_log, "Ticket for S-CP1 at CP1: 0.000 kWh × 0.30 €/kWh = 0.00 € (driver stop)")
        assert driver.ask("driver", DriverStatus())["active_session"] is None

        keyboard.write("quit\n")  # stops the whole driver system
        wait_until(lambda: not driver.alive, what="the driver system stopped after quit")


def test_central_down_at_start_then_back(kafka_settings, systems, driver_log) -> None:
    """No Central: the hello times out, the driver says so and retries until answered."""
    driver = start(kafka_settings, systems, "d5", request_timeout=0.5, hello_retry_max=0.5)
    wait_log(driver_log, "Central is unavailable")
    wait_log(driver_log, "will retry")
    assert driver.alive
    start_fake_central(kafka_settings, systems)  # reads every hello sent meanwhile (consumer group, earliest)
    wait_log(driver_log, "Central answered: no supply in progress", timeout=15)


def test_services_while_central_is_down_then_a_late_authorisation_is_cancelled(
        kafka_settings, systems, driver_log, tmp_path) -> None:
    """Central away: each service fails as unavailable and the file goes on. When Central
    comes back it reads the old requests; an authorisation nobody waits for is stopped."""
    services = tmp_path / "services.txt"
    services.write_text("CP1\nCP2\n")
    driver = start(kafka_settings, systems, "d8", services_file=str(services), pause=0.2, request_timeout=0.8)
    wait_until(lambda: driver.ask("driver", DriverStatus())["done"], timeout=15, what="both services failed")
    assert [r["outcome"] for r in driver.ask("driver", DriverResults())] == ["unavailable", "unavailable"]
    assert driver.alive

    central = start_fake_central(kafka_settings, systems, plan={"CP1": "hold", "CP2": "deny"})
    stops = wait_until(lambda: requests_of(central, protocol.StopChargingRequest), what="the late session stopped")
    assert stops[0][1].session_id == "S-CP1"
    wait_log(driver_log, "but that request was given up; cancelling it")
    wait_log(driver_log, "Ticket for S-CP1 at CP1")  # every session ends in a ticket, shown and acknowledged
    wait_until(lambda: requests_of(central, protocol.TicketAck), what="ticket_ack")
    status = driver.ask("driver", DriverStatus())
    assert status["active_session"] is None and status["services_done"] == 2


def test_restarted_pump_means_a_new_hello(kafka_settings, systems, driver_log) -> None:
    """A restarted pump starts at the end of the partition: the driver asks Central again."""
    central = start_fake_central(kafka_settings, systems, plan={"CP1": "hold"})
    driver = start(kafka_settings, systems, "d7")
    wait_log(driver_log, "no supply in progress")
    driver.get("output").tell(ConsoleLine("charge CP1"))  # what the console reader tells
    wait_log(driver_log, "Authorised at CP1")
    old_pump = driver.get("pump")
    old_pump.stop()  # its supervisor restarts it; the supply ends meanwhile
    central.get("central").tell(EndSupply("d7"))
    wait_until(lambda: driver.get("pump") not in (None, old_pump), what="a new pump")
    wait_until(lambda: len(requests_of(central, protocol.DriverHello)) == 2, what="a second hello")
    wait_log(driver_log, "Ticket for S-CP1 at CP1")  # live, or from the hello: either way once
    wait_until(lambda: driver.ask("driver", DriverStatus())["active_session"] is None, what="no live supply")
    assert sum("Ticket for S-CP1" in m for m in messages(driver_log)) == 1


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """main() configures the root logger for a program; give the next tests theirs back."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
            h.close()
    for h in saved[0]:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(saved[1])


def test_main_runs_a_services_file_and_exits_when_done(kafka_settings, systems, tmp_path, restore_logging) -> None:
    start_fake_central(kafka_settings, systems, plan={"CP1": "authorize"})
    services = tmp_path / "s.txt"
    services.write_text("CP1\nCP2\n")
    log_file, results = tmp_path / "driver.log", tmp_path / "results.json"
    code = main([kafka_settings.bootstrap, "d6", "--services", str(services), "--pause", "0.1",
                 "--request-timeout", "2", "--topic-prefix", kafka_settings.topic_prefix, "--no-console",
                 "--exit-when-done", "--log-file", str(log_file), "--results-json", str(results)])
    assert code == 0
    assert "All 2 services done: 1 tickets, 1 denied, 0 unavailable" in log_file.read_text()
    saved = json.loads(results.read_text())
    assert saved["driver_id"] == "d6" and saved["done"] is True
    assert [(s["cp_id"], s["outcome"]) for s in saved["services"]] == [("CP1", "ticket"), ("CP2", "denied")]
    assert main([kafka_settings.bootstrap, "d6", "--services", str(tmp_path / "missing.txt"), "--no-console"]) == 2
