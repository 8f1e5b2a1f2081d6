"""EV_OCPP_SIM: simulated OCPP 1.6J chargers, for the launcher (``--ocpp-chargers N``) and the bench.

Each simulated charger is the ``ocpp`` library's client ``ChargePoint`` over a
real WebSocket to EV_OCPP (``URL/<charger id>``, HTTP Basic auth with the
charger's registry secret from ``--credential-dir``), all of them in one
asyncio loop. What one does, like a real charger:

* boots (BootNotification), says its connectors are Available
  (StatusNotification) and sends a Heartbeat at the interval it was given;
* a RemoteStartTransaction (a driver's ``charge_request`` at Central) starts a
  transaction: StartTransaction, Charging, a MeterValues every
  ``--meter-interval`` s at ``--power-kw``; it ends after ``--supply-seconds``
  (unplugged) or on RemoteStopTransaction (a driver's or Central's stop);
* ChangeAvailability makes it Unavailable or Available;
* ``--auto-start PREFIX`` starts charges by itself (Authorize and StartTransaction
  for driver ``PREFIX<charger id>``), one after the other, ``--auto-pause`` s apart;
* it keeps its transaction messages (MeterValues, StopTransaction) until they are
  answered: when the connection drops it reconnects (with a growing delay) and
  sends them then, in order, as OCPP requires of a real charger.

Every ``--stats-every`` seconds it prints one JSON line of counters (for the
bench). ``--t0 T`` makes each register read ``(now - T) × power`` from a
transaction that starts at 0 Wh, so the time a reading was sent can be read
back from the energy Central shows (bench/ocpp.py measures the panel lag so).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import random
import signal
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ocpp.routing import after, on  # type: ignore[import-untyped]
from ocpp.v16 import ChargePoint, call, call_result  # type: ignore[import-untyped]
from ocpp.v16.enums import Action  # type: ignore[import-untyped]

from actors.ocpp_meter import ocpp_now
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, internal, setting
from supervisors.settings import build_parser as parser_for
from transport.security import SecurityError, load_credential

log = logging.getLogger("evcharging.ocpp.sim")

__all__ = ["SimConfig", "SimFleet", "main"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything EV_OCPP_SIM needs; each field but ``name`` is an argument (env twin EV_<FLAG>)."""

    url: str = setting("ws://127.0.0.1:9000/ocpp", positional=True, env="EV_OCPP_URL",
                       help="the gateway's URL before the charger id (ws:// or wss://)")
    chargers: str = setting("", help="comma-separated charger ids (or --count with --prefix)")
    count: int = setting(0, help="this many chargers PREFIX0001, PREFIX0002, … (with --prefix)")
    prefix: str = setting("OCPP", help="charger id prefix for --count")
    credential_dir: str = setting("", help="directory of the chargers' credential files cp-<ID>.json (what "
                                           "supervisors.provision writes); empty: no Basic auth (a gateway "
                                           "with --security none)")
    ca: str = setting("", help="certificate (PEM) to trust for wss:// (the gateway's self-signed one)")
    power_kw: float = setting(11.0, help="charging power of every charger")
    meter_interval: float = setting(1.0, help="seconds between two MeterValues while charging")
    supply_seconds: float = setting(0.0, help="a charge ends by itself (unplugged) after this long; 0: only "
                                              "when asked (RemoteStopTransaction)")
    auto_start: str = setting("", help="start charges by themselves for driver <auto-start><charger id> "
                                       "(empty: only remote starts)")
    auto_pause: float = setting(4.0, help="seconds between the end of an automatic charge and the next")
    ramp: float = setting(50.0, help="chargers connecting per second at the start")
    t0: float = setting(0.0, help="bench: registers read (now - t0) × power, transactions start at 0 Wh")
    stats_every: float = setting(0.0, help="print a JSON line of counters this often (0: never)")
    name: str = internal("EV_OCPP_SIM")

    def ids(self) -> list[str]:
        listed = [c.strip() for c in self.chargers.split(",") if c.strip()]
        return listed + [f"{self.prefix}{i:04d}" for i in range(1, self.count + 1)]


class _Counters:
    def __init__(self) -> None:
        self.values: dict[str, int] = {"connected": 0, "connects": 0, "refused": 0, "charging": 0, "charges": 0,
                                       "meter_values": 0, "calls_failed": 0, "remote_starts": 0, "remote_stops": 0}

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n


def _charge_point_class() -> type:
    """The library's client ChargePoint with the handlers a charger needs."""
    class SimChargePoint(ChargePoint):  # type: ignore[misc]
        def __init__(self, cp_id: str, ws: Any, owner: SimCharger) -> None:
            super().__init__(cp_id, ws, response_timeout=30)
            self.owner = owner

        @on(Action.remote_start_transaction)  # type: ignore[untyped-decorator]
        def on_remote_start(self, id_tag: str, **_: Any) -> Any:
            busy = self.owner.tx is not None or self.owner.starting or not self.owner.operative
            return call_result.RemoteStartTransaction(status="Rejected" if busy else "Accepted")

        @after(Action.remote_start_transaction)  # type: ignore[untyped-decorator]
        def after_remote_start(self, id_tag: str, **_: Any) -> None:
            if self.owner.tx is None and not self.owner.starting and self.owner.operative:
                self.owner.counters.add("remote_starts")
                self.owner.begin(id_tag)

        @on(Action.remote_stop_transaction)  # type: ignore[untyped-decorator]
        def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
            ok = self.owner.tx == transaction_id
            if ok:
                self.owner.counters.add("remote_stops")
                self.owner.stop_reason = "Remote"
                self.owner.stop_now.set()
            return call_result.RemoteStopTransaction(status="Accepted" if ok else "Rejected")

        @on(Action.change_availability)  # type: ignore[untyped-decorator]
        def on_change_availability(self, connector_id: int, type: str, **_: Any) -> Any:
            self.owner.operative = type == "Operative"
            return call_result.ChangeAvailability(status="Accepted")

        @after(Action.change_availability)  # type: ignore[untyped-decorator]
        def after_change_availability(self, connector_id: int, type: str, **_: Any) -> None:
            if self.owner.tx is None:
                self.owner.send_soon(self.owner.status_call("Available" if type == "Operative" else "Unavailable",
                                                            connector_id))

    return SimChargePoint


class SimCharger:
    """One simulated charger: its connection (replaced on reconnect), its meter and its transaction."""

    def __init__(self, cp_id: str, secret: str | None, config: SimConfig, counters: _Counters,
                 context: ssl.SSLContext | None) -> None:
        self.cp_id, self.secret, self.config, self.counters, self.context = cp_id, secret, config, counters, context
        self.cp: Any = None
        self.connected = asyncio.Event()
        self.outbox: deque[Any] = deque()  # transaction messages, kept until answered (offline-safe)
        self.wake = asyncio.Event()
        self.interval = 60.0
        self.tx: int | None = None
        self.starting = False
        self.operative = True
        self.stop_now = asyncio.Event()
        self.stop_reason = "EVDisconnected"
        self.register_wh = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- helpers ---------------------------------------------------------------------------
    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def meter_wh(self) -> float:
        if self.config.t0:
            return max(0.0, (time.time() - self.config.t0) * self.config.power_kw / 3.6)
        return self.register_wh

    @staticmethod
    def status_call(status: str, connector: int = 1) -> Any:
        return call.StatusNotification(connector_id=connector, error_code="NoError", status=status)

    def send_soon(self, payload: Any) -> None:
        self.outbox.append(payload)
        self.wake.set()

    async def call(self, payload: Any) -> Any:
        """One call now (not queued); None when it failed."""
        try:
            return await self.cp.call(payload, suppress=False)
        except Exception as exc:
            self.counters.add("calls_failed")
            log.debug("%s: %s failed: %s", self.cp_id, type(payload).__name__, exc)
            return None

    # --- the connection ----------------------------------------------------------------------
    async def run(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        delay = 1.0
        headers = {}
        if self.secret is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.cp_id}:{self.secret}".encode()).decode()
        url = self.config.url.rstrip("/") + "/" + self.cp_id
        cls = _charge_point_class()
        booted = False
        while True:
            try:
                ws = await connect(url, subprotocols=["ocpp1.6"], additional_headers=headers,  # type: ignore[list-item]
                                   ssl=self.context, open_timeout=20)
            except InvalidStatus as exc:
                self.counters.add("refused")
                log.warning("%s: the gateway refused the connection (%d): %s", self.cp_id, exc.response.status_code,
                            bytes(exc.response.body or b"").decode("utf-8", "replace").strip()[:200])
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 60.0)
                continue
            except Exception as exc:  # unreachable, a timeout, a handshake cut short (the gateway is busy)
                log.info("%s: cannot reach the gateway (%s: %s) — retrying in %.0f s", self.cp_id,
                         type(exc).__name__, exc, delay)
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            self.counters.add("connects")
            self.counters.add("connected")
            self.cp = cls(self.cp_id, ws, self)
            serving = asyncio.ensure_future(self.cp.start())
            try:
                if not booted:
                    booted = await self.boot()
                self.connected.set()
                self.wake.set()
                await serving
            except Exception as exc:
                log.info("%s: connection lost (%s) — reconnecting", self.cp_id, type(exc).__name__)
            finally:
                self.connected.clear()
                self.counters.add("connected", -1)
                serving.cancel()
                with contextlib.suppress(Exception):
                    await ws.close()
            await asyncio.sleep(delay * random.random())

    async def boot(self) -> bool:
        answer = await self.call(call.BootNotification(charge_point_vendor="EVcharging", charge_point_model="sim"))
        if answer is None or answer.status != "Accepted":
            return False
        self.interval = float(answer.interval or 60)
        for connector in (0, 1):
            await self.call(self.status_call("Available", connector))
        return True

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.connected.is_set():
                await self.call(call.Heartbeat())

    async def sender(self) -> None:
        """Sends the outbox in order, each until answered (waiting for the connection when it is down)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.outbox:
                await self.connected.wait()
                payload = self.outbox[0]
                answer = await self.call(payload)
                if answer is None:
                    await asyncio.sleep(1.0)  # the connection is down or the gateway busy: the same again
                    continue
                self.outbox.popleft()
                if type(payload).__name__ == "StartTransaction":
                    self.tx = int(answer.transaction_id)
                    self.starting = False
                    if answer.id_tag_info.get("status") != "Accepted":
                        self.stop_reason = "DeAuthorized"
                        self.stop_now.set()

    # --- charges -----------------------------------------------------------------------------
    def begin(self, tag: str) -> None:
        self.starting = True
        self.spawn(self.charge(tag))

    async def charge(self, tag: str) -> None:
        self.stop_now.clear()
        self.stop_reason = "EVDisconnected"
        start_wh = 0 if self.config.t0 else int(self.meter_wh())
        self.send_soon(call.StartTransaction(connector_id=1, id_tag=tag, meter_start=start_wh, timestamp=ocpp_now()))
        self.send_soon(self.status_call("Charging"))
        while self.tx is None and self.starting:
            await asyncio.sleep(0.05)
        tx = self.tx
        if tx is None:
            return
        self.counters.add("charging")
        self.counters.add("charges")
        began = last = time.monotonic()
        try:
            while not self.stop_now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_now.wait(), self.config.meter_interval)
                now = time.monotonic()
                if not self.config.t0:
                    self.register_wh += self.config.power_kw * (now - last) / 3.6
                last = now
                self.send_soon(call.MeterValues(connector_id=1, transaction_id=tx, meter_value=[{
                    "timestamp": ocpp_now(), "sampledValue": [{"value": f"{self.meter_wh():.3f}",
                                                               "measurand": "Energy.Active.Import.Register",
                                                               "unit": "Wh", "context": "Sample.Periodic"}]}]))
                self.counters.add("meter_values")
                if self.config.supply_seconds and now - began >= self.config.supply_seconds:
                    break
        finally:
            self.counters.add("charging", -1)
        self.send_soon(call.StopTransaction(meter_stop=int(self.meter_wh()), timestamp=ocpp_now(), transaction_id=tx,
                                            reason=self.stop_reason))
        self.send_soon(self.status_call("Available" if self.operative else "Unavailable"))
        self.tx = None

    async def auto(self) -> None:
        tag = f"{self.config.auto_start}{self.cp_id}"[:20]
        while True:
            await self.connected.wait()
            if self.tx is None and not self.starting and self.operative:
                answer = await self.call(call.Authorize(id_tag=tag))
                if answer is not None and answer.id_tag_info.get("status") == "Accepted":
                    self.begin(tag)
                    while self.starting or self.tx is not None:
                        await asyncio.sleep(0.5)
            await asyncio.sleep(self.config.auto_pause)


class SimFleet:
    """The simulated chargers of one process (see the module docstring)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.counters = _Counters()
        self.chargers: list[SimCharger] = []

    def _secret(self, cp_id: str) -> str | None:
        if not self.config.credential_dir:
            return None
        path = Path(self.config.credential_dir) / f"cp-{cp_id}.json"
        credential = load_credential("cp", cp_id, file=path)
        if credential is None:
            raise SecurityError(f"no credential for {cp_id} in {path}")
        return credential.secret

    async def run(self, stop: asyncio.Event) -> None:
        context = ssl.create_default_context(cafile=self.config.ca) if self.config.ca else None
        for cp_id in self.config.ids():
            charger = SimCharger(cp_id, self._secret(cp_id), self.config, self.counters, context)
            self.chargers.append(charger)
            charger.spawn(charger.run())
            charger.spawn(charger.sender())
            charger.spawn(charger.heartbeats())
            if self.config.auto_start:
                charger.spawn(charger.auto())
            await asyncio.sleep(1.0 / max(self.config.ramp, 0.1))
        every = self.config.stats_every
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every or 3600.0)
            if every:
                print(json.dumps({"t": round(time.time(), 3), **self.counters.values}), flush=True)
        tasks = [task for charger in self.chargers for task in charger.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each connection closes properly


def build_parser() -> argparse.ArgumentParser:
    p = parser_for(SimConfig, "EV_OCPP_SIM", "Simulated OCPP 1.6J chargers (the ocpp library's client) for EV_OCPP.")
    add_process_flags(p, console=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config: SimConfig = from_args(SimConfig, args)
    setup_logging("EV_OCPP_SIM", "", log_file=args.log_file, level=args.log_level)
    logging.getLogger("ocpp").setLevel(logging.WARNING)
    if not config.ids():
        log.error("No chargers: give --chargers ID,ID or --count N")
        return 2
    try:
        fleet = SimFleet(config)
        for cp_id in config.ids():
            fleet._secret(cp_id)  # every credential readable before anything connects
    except SecurityError as exc:
        log.error("Cannot start the simulated chargers: %s", exc)
        return 2
    log.info("%d simulated OCPP charger(s) → %s", len(config.ids()), config.url)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await fleet.run(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
