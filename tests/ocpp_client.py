"""A charger for tests: the ``ocpp`` library's client ``ChargePoint`` over a real WebSocket, driven step by step.

:class:`TestCharger` runs the library's charge point in its own asyncio loop (a
thread) and exposes blocking calls a test can make one after the other
(``boot``, ``authorize``, ``start``, ``meter``, ``stop``…). Calls from the central
system (RemoteStartTransaction, RemoteStopTransaction, ChangeAvailability) are
answered by the library's handlers with what the test configured and recorded
in :attr:`TestCharger.received`. :class:`RawSocket` is a bare WebSocket for
frames the library would never send (malformed JSON, unknown actions).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import queue
import ssl
import threading
import time
from collections.abc import Coroutine
from typing import Any

from ocpp.routing import on
from ocpp.v16 import ChargePoint, call
from ocpp.v16.enums import Action
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "ocpp1.6"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def iso(at: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class _Loop:
    """An asyncio loop in a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-charger")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Client(ChargePoint):  # type: ignore[misc]
    """The library's charge point, answering the central system's calls as the owner says."""

    def __init__(self, cp_id: str, ws: ClientConnection, owner: TestCharger) -> None:
        super().__init__(cp_id, ws, response_timeout=20)
        self.owner = owner

    @on(Action.remote_start_transaction)
    def on_remote_start(self, id_tag: str, connector_id: int | None = None, **_: Any) -> Any:
        self.owner.received.put(("RemoteStartTransaction", {"id_tag": id_tag, "connector_id": connector_id}))
        return self.owner.result_of("RemoteStartTransaction")

    @on(Action.remote_stop_transaction)
    def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
        self.owner.received.put(("RemoteStopTransaction", {"transaction_id": transaction_id}))
        return self.owner.result_of("RemoteStopTransaction")

    @on(Action.change_availability)
    def on_change_availability(self, connector_id: int, type: str, **_: Any) -> Any:
        self.owner.received.put(("ChangeAvailability", {"connector_id": connector_id, "type": type}))
        return self.owner.result_of("ChangeAvailability")


class TestCharger:
    """One OCPP 1.6J charger (see the module docstring). ``connect()`` raises the handshake's refusal
    (websockets' ``InvalidStatus``, whose ``response.status_code`` is 401, 404…)."""

    __test__ = False  # not a pytest class

    def __init__(self, url: str, cp_id: str, password: str | None, *, ssl_context: ssl.SSLContext | None = None,
                 subprotocols: tuple[str, ...] = (SUBPROTOCOL,)) -> None:
        self.url, self.cp_id, self.password = url.rstrip("/") + "/" + cp_id, cp_id, password
        self.ssl_context = ssl_context
        self.subprotocols = subprotocols
        self.received: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.answers: dict[str, str] = {"RemoteStartTransaction": "Accepted", "RemoteStopTransaction": "Accepted",
                                        "ChangeAvailability": "Accepted"}
        self._io = _Loop()
        self.ws: ClientConnection | None = None
        self.cp: _Client | None = None
        self._task: asyncio.Task[Any] | None = None

    def result_of(self, action: str) -> Any:
        from ocpp.v16 import call_result

        return getattr(call_result, action)(status=self.answers[action])

    # --- connection ------------------------------------------------------------------------
    def connect(self) -> TestCharger:
        self._io.run(self._connect())
        return self

    async def _connect(self) -> None:
        headers = {"Authorization": basic(self.cp_id, self.password)} if self.password is not None else {}
        self.ws = await connect(self.url, subprotocols=list(self.subprotocols), additional_headers=headers,  # type: ignore[arg-type]
                                ssl=self.ssl_context, open_timeout=15)
        self.cp = _Client(self.cp_id, self.ws, self)
        self._task = asyncio.ensure_future(self._serve(self.cp))

    @staticmethod
    async def _serve(cp: _Client) -> None:
        try:
            await cp.start()
        except ConnectionClosed:
            pass

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if not self._io.loop.is_running():
            return
        if ws is not None:
            try:
                self._io.run(ws.close(), timeout=5)
            except Exception:
                pass
        self._io.stop()

    def drop(self) -> None:
        """Lose the connection without a goodbye (the TCP connection is cut), like a charger losing its network."""
        if self.ws is not None:
            self._io.loop.call_soon_threadsafe(self.ws.transport.abort)
            self.ws = None

    @property
    def closed(self) -> bool:
        return self.ws is None or self._task is None or self._task.done()

    # --- calls ---------------------------------------------------------------------------------
    def call(self, payload: Any, timeout: float = 25.0) -> Any:
        assert self.cp is not None, "connect() first"
        return self._io.run(self.cp.call(payload, suppress=False), timeout)

    def boot(self) -> Any:
        return self.call(call.BootNotification(charge_point_vendor="EVtest", charge_point_model="OCPP-sim-1"))

    def heartbeat(self) -> Any:
        return self.call(call.Heartbeat())

    def status(self, status: str, connector: int = 1, error_code: str = "NoError") -> Any:
        return self.call(call.StatusNotification(connector_id=connector, error_code=error_code, status=status))

    def authorize(self, tag: str) -> str:
        return str(self.call(call.Authorize(id_tag=tag)).id_tag_info["status"])

    def start(self, tag: str, meter_start: int, connector: int = 1, at: float | None = None) -> tuple[int, str]:
        r = self.call(call.StartTransaction(connector_id=connector, id_tag=tag, meter_start=meter_start,
                                            timestamp=iso(at)))
        return int(r.transaction_id), str(r.id_tag_info["status"])

    def meter(self, transaction_id: int, wh: float, connector: int = 1, at: float | None = None,
              unit: str = "Wh") -> Any:
        value = {"timestamp": iso(at), "sampledValue": [
            {"value": f"{wh:g}", "measurand": "Energy.Active.Import.Register", "unit": unit,
             "context": "Sample.Periodic"}]}
        return self.call(call.MeterValues(connector_id=connector, transaction_id=transaction_id, meter_value=[value]))

    def stop(self, transaction_id: int, meter_stop: int, reason: str | None = None, tag: str | None = None,
             at: float | None = None) -> Any:
        return self.call(call.StopTransaction(meter_stop=meter_stop, timestamp=iso(at), transaction_id=transaction_id,
                                              reason=reason, id_tag=tag))

    def expect(self, action: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next call the central system made of ``action`` (others before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.cp_id}: no {action} from the central system within {timeout} s")
            try:
                name, payload = self.received.get(timeout=left)
            except queue.Empty:
                continue
            if name == action:
                return payload


class RawSocket:
    """A bare OCPP WebSocket: send any text, read what comes back."""

    def __init__(self, url: str, cp_id: str, password: str | None) -> None:
        self._io = _Loop()
        headers = {"Authorization": basic(cp_id, password)} if password is not None else {}

        async def open_() -> ClientConnection:
            return await connect(url.rstrip("/") + "/" + cp_id, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                                 additional_headers=headers, open_timeout=15)

        self.ws: ClientConnection = self._io.run(open_())

    def send(self, text: str | bytes) -> None:
        self._io.run(self.ws.send(text))

    def recv(self, timeout: float = 10.0) -> Any:
        import json

        return json.loads(self._io.run(asyncio.wait_for(self.ws.recv(), timeout), timeout + 1))

    def exchange(self, text: str | bytes, timeout: float = 10.0) -> Any:
        self.send(text)
        return self.recv(timeout)

    @property
    def open(self) -> bool:
        from websockets.protocol import State

        return self.ws.protocol.state is State.OPEN

    def close(self) -> None:
        if not self._io.loop.is_running():
            return
        try:
            self._io.run(self.ws.close(), timeout=5)
        except Exception:
            pass
        self._io.stop()
