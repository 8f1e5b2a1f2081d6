"""A small network for the OCPP gateway's tests: a real Central (security on) and EV_OCPP, in-process.

Central runs in registry mode against the real broker and a real SQLite file;
the chargers are registered in its database as the registry does
(``Repository.register`` with ``security.verifier``). The gateway is started
with :func:`supervisors.ocpp_system.start_ocpp` on a free port and its own
journal file; :meth:`OcppNet.restart_gateway` stops it and starts another on
the same port and journal (a gateway restart). Chargers are
:class:`tests.ocpp_client.TestCharger` (the ``ocpp`` library's client).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

from actors.central import CentralStatus
from persistence import Repository
from supervisors.central_system import CentralSystemConfig, start_central
from supervisors.ocpp_system import OcppSystemConfig, gateway_port, start_ocpp
from supervisors.system import RunningSystem
from tests.fakes import KafkaPeer
from tests.ocpp_client import RawSocket, TestCharger
from tests.waiting import wait_until
from transport import security
from transport.listener import ListenerPort

PRICE = 0.40


class OcppNet:
    """Central + the gateway (see the module docstring); ``close()`` stops everything it started."""

    def __init__(self, kafka_settings: Any, tmp: Path, *, chargers: tuple[str, ...] = ("OC1",),
                 drivers: tuple[str, ...] = (), central: dict[str, Any] | None = None,
                 gateway: dict[str, Any] | None = None) -> None:
        self.settings = kafka_settings
        self.db = str(tmp / "central.db")
        self.journal = str(tmp / "ocpp.journal")
        self.secrets: dict[str, str] = {}
        self.driver_verifiers: dict[str, bytes] = {}
        self._things: list[Any] = []
        with Repository(self.db) as repo:
            for cp in chargers:
                # 3,600 kW: a test's quick supplies stay plausible for Central (see test_billing.py)
                repo.upsert_cp(cp, f"Bilbao {cp}", PRICE, max_power_kw=3600)
                self.secrets[cp] = security.new_secret()
                repo.register("cp", cp, security.verifier("cp", cp, self.secrets[cp]))
            for d in drivers:
                self.driver_verifiers[d] = security.verifier("driver", d, secret := security.new_secret())
                del secret
                repo.register("driver", d, self.driver_verifiers[d])
        self.central = start_central(CentralSystemConfig(
            port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=self.db,
            topic_prefix=kafka_settings.topic_prefix, group_id=f"central-{uuid.uuid4().hex[:6]}",
            **{"enroll": "registry", "authorize_timeout": 5.0, **(central or {})}))
        self._things.append(self.central)
        self.peer = KafkaPeer(kafka_settings, sign_as=self.driver_verifiers.get)
        self._things.append(self.peer)
        self.central_port = int(self.central.ask("monitor-listener", ListenerPort()))
        self.gateway_config = OcppSystemConfig(
            central_host="127.0.0.1", central_port=self.central_port, broker=kafka_settings.bootstrap,
            listen_host="127.0.0.1", listen_port=0, journal=self.journal, topic_prefix=kafka_settings.topic_prefix,
            **{"login_timeout": 8.0, "ping_interval": 5.0, "ping_timeout": 5.0, "billing_check": 1.0,
               "republish_after": 3.0, **(gateway or {})})
        self.gateway: RunningSystem | None = None
        self.start_gateway()
        assert self.central.wait_ready(30), "Central's Kafka consumers did not join within 30 s"

    # --- the gateway ---------------------------------------------------------------------------
    def start_gateway(self) -> RunningSystem:
        self.gateway = start_ocpp(self.gateway_config)
        port = gateway_port(self.gateway)
        self.gateway_config = dataclasses.replace(self.gateway_config, listen_port=port)
        self.url = f"ws://127.0.0.1:{port}/ocpp"
        return self.gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def restart_gateway(self) -> RunningSystem:
        self.stop_gateway()
        return self.start_gateway()

    def charger_status(self, cp_id: str) -> dict[str, Any] | None:
        """The gateway's view of a connected charger (None when it has no live connection)."""
        from actors.ocpp_charger import ChargerStatus

        assert self.gateway is not None
        for name in self.gateway.directory.names():
            if name.startswith(f"ocpp:{cp_id}#"):
                try:
                    status: dict[str, Any] = self.gateway.ask(name, ChargerStatus(), timeout=5)
                    if status["connected"]:
                        return status
                except Exception:
                    continue
        return None

    # --- chargers -----------------------------------------------------------------------------
    def charger(self, cp_id: str = "OC1", password: str | None = "", **kwargs: Any) -> TestCharger:
        """A connected charger; ``password`` "": its registry secret; None: no credentials."""
        c = TestCharger(self.url, cp_id, self.secrets.get(cp_id, "x") if password == "" else password, **kwargs)
        self._things.append(c)
        return c.connect()

    def raw(self, cp_id: str = "OC1") -> RawSocket:
        r = RawSocket(self.url, cp_id, self.secrets[cp_id])
        self._things.append(r)
        return r

    # --- Central ------------------------------------------------------------------------------
    def cp(self, cp_id: str = "OC1") -> dict[str, Any]:
        status: dict[str, Any] = self.central.ask("central", CentralStatus())[cp_id]
        return status

    def wait_state(self, state: str, cp_id: str = "OC1", timeout: float = 15.0) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(lambda: (s := self.cp(cp_id))["state"] == state and s, timeout=timeout,
                                            what=f"{cp_id} {state} at Central (last: {self.cp(cp_id)['state']})")
        return result

    def tickets(self, session_id: str | None = None) -> list[Any]:
        with Repository(self.db) as repo:
            return [t for t in repo.tickets() if session_id is None or t.session_id == session_id]

    def audit(self, event: str) -> list[Any]:
        with Repository(self.db) as repo:
            return repo.recent_audit(200, event=event)

    def close(self) -> None:
        """Chargers first, then the gateway, then the driver's peer and Central."""
        chargers = [t for t in self._things if isinstance(t, TestCharger | RawSocket)]
        rest = [t for t in self._things if t not in chargers]
        for thing in reversed(chargers):
            thing.close()
        self.stop_gateway()
        for thing in reversed(rest):
            thing.stop() if isinstance(thing, RunningSystem) else thing.close()
