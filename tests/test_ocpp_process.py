"""EV_OCPP as its own process, killed with SIGKILL mid-transaction (issue #13, fault matrix).

Central runs in-process (security on, real broker, real SQLite); the gateway is the EV_OCPP program
(``python -m supervisors.ocpp_system``), started, SIGKILLed while a charge runs, and started again on the
same port and journal. The charger (the ``ocpp`` library's client) loses its connection with the kill,
reconnects to the new process, replays its queued MeterValues and its StopTransaction: one ticket with
all the energy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fault_matrix
from tests.ocpp_client import TestCharger
from tests.ocpp_net import PRICE, OcppNet
from tests.waiting import wait_until
from transport import protocol

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """EV_OCPP as an OS process (its log in ``tmp``)."""

    def __init__(self, net: OcppNet, tmp: Path) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "supervisors.ocpp_system", f"127.0.0.1:{net.central_port}",
                     net.settings.bootstrap, "--listen", f"127.0.0.1:{self.port}", "--journal", net.journal,
                     "--topic-prefix", net.settings.topic_prefix, "--billing-check", "1", "--republish-after", "3",
                     "--log-file", str(tmp / "ocpp.log")]
        self.url = f"ws://127.0.0.1:{self.port}/ocpp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until(self._listening, timeout=20, what="EV_OCPP listening")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"EV_OCPP exited with {self.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def net(kafka_settings: Any, tmp_path: Path) -> Iterator[OcppNet]:
    n = OcppNet(kafka_settings, tmp_path)
    n.stop_gateway()  # the gateway of this test is a process
    try:
        yield n
    finally:
        n.close()


def test_the_gateway_killed_mid_transaction_bills_the_charge_once(net: OcppNet, tmp_path: Path) -> None:
    gateway = GatewayProcess(net, tmp_path)
    chargers: list[TestCharger] = []
    try:
        gateway.start()
        charger = TestCharger(gateway.url, "OC1", net.secrets["OC1"]).connect()
        chargers.append(charger)
        charger.boot()
        charger.status("Available")
        net.wait_state("ACTIVE")
        assert charger.authorize("drv-p") == "Accepted"
        t0 = time.time()
        tx, _ = charger.start("drv-p", meter_start=20_000, at=t0)
        sid = net.wait_state("SUPPLYING")["session_id"]
        charger.meter(tx, 20_700, at=t0 + 30)
        gateway.kill()
        net.wait_state("DISCONNECTED", timeout=10)
        wait_until(lambda: charger.closed, what="the charger noticed the gateway is gone")
        gateway.start()
        began = time.monotonic()
        charger = TestCharger(gateway.url, "OC1", net.secrets["OC1"]).connect()
        chargers.append(charger)
        net.wait_state("SUPPLYING")
        recovered = time.monotonic() - began
        assert net.cp()["session_id"] == sid
        charger.meter(tx, 21_100, at=t0 + 60)
        charger.stop(tx, 21_500, reason="EVDisconnected", at=t0 + 90)
        charger.stop(tx, 21_500, reason="EVDisconnected", at=t0 + 90)
        (ticket,) = net.peer.wait_for(protocol.Ticket, lambda m: m.session_id == sid, timeout=30)
        assert ticket.energy_kwh == pytest.approx(1.5) and ticket.cost_eur == pytest.approx(1.5 * PRICE)
        net.wait_state("ACTIVE")
        assert len(net.tickets(sid)) == 1
        fault_matrix.billing_row("OCPP gateway killed (SIGKILL) mid-transaction", net.db, [sid], recovered)
    finally:
        for c in chargers:
            c.close()
        gateway.stop()
