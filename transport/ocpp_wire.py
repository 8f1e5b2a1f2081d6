"""OCPP-J 1.6 over one WebSocket: the message loop of one charger's connection, and its port.

The ``ocpp`` library (mobilityhouse, 2.x) gives the message model (``Call``,
``CallResult``, ``CallError``), the JSON schemas of OCPP 1.6 and their
validation, the error codes and the camelCase ↔ snake_case conversion. Its
``ChargePoint`` class is not used on the server side, because at the edge
of a network it falls short in four ways: a frame that is not OCPP-J is
logged and never answered (OCPP-J says: ``FormationViolation``); a
``CallResult`` nobody waits for goes into an unbounded queue (a charger can
grow our memory); a recognised action without a handler is answered
``NotImplemented`` and an unknown one ``NotSupported`` — the reverse of OCPP
1.6 §4.1.3, and the issue asks ``NotSupported`` for both; and every refused
message logs a traceback. :class:`OcppConnection` is the same loop with those
four fixed, and bounded everywhere:

* at most :attr:`OcppLimits.max_requests` calls from the charger wait to be
  handled (OCPP allows one in flight; more is answered ``InternalError``);
* at most :attr:`OcppLimits.max_calls` calls to the charger wait their turn
  (one in flight, as OCPP requires; more fail at once);
* ``max_bad`` malformed frames in a row close the connection (a few are
  answered and survived);
* a frame's size is bounded by the WebSocket server (``max_size``).

Requests go to the charger's actor as :class:`OcppRequest` (the payload
validated against the OCPP 1.6 schema, keys in snake_case) with a ``reply``
callable; the actor answers a dict (the response payload, snake_case) or an
:class:`OcppRefusal`. Calls to the charger come from the actor through the
:class:`ChargerPort` and their outcome goes back as :class:`CallDone`.
This module imports no actor and no ``websockets``: the server adapter
(:mod:`transport.ocpp_server`) owns the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import pykka
from ocpp.charge_point import camel_to_snake_case, remove_nones, snake_to_camel_case  # type: ignore[import-untyped]
from ocpp.exceptions import FormatViolationError, OCPPError  # type: ignore[import-untyped]
from ocpp.messages import Call, CallError, CallResult, MessageType, unpack  # type: ignore[import-untyped]
from ocpp.messages import _validate_payload as _validate

from actors.runtime import tell

log = logging.getLogger("evcharging.ocpp.wire")

__all__ = ["OcppRequest", "OcppRefusal", "CallDone", "WireUp", "OcppLimits", "OcppConnection", "ChargerPort",
           "Sink", "SUPPORTED_ACTIONS", "OCPP_VERSION", "SUBPROTOCOL", "UNIQUE_ID_MAX"]

OCPP_VERSION: Final = "1.6"
SUBPROTOCOL: Final = "ocpp1.6"
#: OCPP-J 1.6 §4.1.1: a message's unique id is at most 36 characters.
UNIQUE_ID_MAX: Final = 36
#: Actions a charger may send that this gateway handles (anything else: CallError NotSupported).
SUPPORTED_ACTIONS: Final = frozenset({
    "BootNotification", "Heartbeat", "StatusNotification", "Authorize", "StartTransaction", "StopTransaction",
    "MeterValues", "DataTransfer", "FirmwareStatusNotification", "DiagnosticsStatusNotification",
})
_DETAIL_MAX: Final = 300  # characters of a CallError description


# --- messages between the wire and the charger's actor ---------------------------------------
@dataclass(frozen=True, slots=True)
class OcppRefusal:
    """The actor's answer when a request cannot be handled: a CallError with an OCPP error code."""

    code: str
    description: str


Answer = dict[str, Any] | OcppRefusal
Reply = Callable[[Answer], None]


@dataclass(frozen=True, slots=True)
class OcppRequest:
    """A charger's call, validated: ``action`` (e.g. "StartTransaction"), ``payload`` in snake_case.

    The actor must call ``reply`` exactly once (from any thread; later calls are ignored), at once
    or later (a StartTransaction waits for Central's authorisation)."""

    action: str
    payload: Mapping[str, Any]
    reply: Reply = field(repr=False)
    unique_id: str = ""


@dataclass(frozen=True, slots=True)
class CallDone:
    """The outcome of a call the actor made to the charger (``ChargerPort.call``).

    ``ok``: a CallResult came (``payload`` is its snake_case payload); otherwise ``error`` says
    why in a sentence (a CallError, a timeout, the connection closed)."""

    token: Any
    ok: bool
    payload: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class WireUp:
    """Port → actor: the charger's WebSocket is open (the handshake accepted); calls can go out."""

    address: str


@dataclass(frozen=True, slots=True)
class OcppLimits:
    """Bounds of one connection; each is a flag of EV_OCPP."""

    answer_timeout: float = 20.0  # s the actor may take to answer a charger's call (then InternalError)
    call_timeout: float = 10.0  # s the charger may take to answer our call
    max_requests: int = 8  # charger's calls waiting to be handled
    max_calls: int = 16  # our calls waiting their turn
    max_bad: int = 50  # malformed frames in a row before the connection is closed


class Sink(Protocol):
    """Where a connection delivers its requests (the charger's actor, found by name): False if it is not running."""

    def __call__(self, request: OcppRequest) -> bool: ...


class Socket(Protocol):
    """What :class:`OcppConnection` needs of a WebSocket (websockets' ``ServerConnection`` has it)."""

    def send(self, message: str) -> Awaitable[None]: ...

    def close(self, code: int = 1000, reason: str = "") -> Awaitable[None]: ...

    def __aiter__(self) -> Any: ...


# --- the loop of one connection -----------------------------------------------------------------
class OcppConnection:
    """One charger's OCPP-J message loop (runs in the server's event loop); see the module docstring."""

    def __init__(self, ws: Socket, cp_id: str, sink: Sink, limits: OcppLimits = OcppLimits()) -> None:
        self.ws = ws
        self.cp_id = cp_id
        self.sink = sink
        self.limits = limits
        self._requests: asyncio.Queue[Any] = asyncio.Queue(limits.max_requests)
        self._waiting: dict[str, asyncio.Future[Any]] = {}  # unique id of our call in flight -> its answer
        self._call_lock = asyncio.Lock()
        self._calls_queued = 0
        self._bad = 0
        self.stats = {"calls_in": 0, "answered": 0, "refused": 0, "malformed": 0, "calls_out": 0}

    async def run(self) -> None:
        """Read frames until the connection closes (the caller catches websockets' ConnectionClosed)."""
        worker = asyncio.create_task(self._work(), name=f"ocpp-{self.cp_id}-requests")
        try:
            async for raw in self.ws:
                await self._route(raw)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the connection closed"))

    # inbound ---------------------------------------------------------------------------------
    async def _route(self, raw: str | bytes) -> None:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            msg = unpack(text)
            _check_shape(msg)
        except (OCPPError, UnicodeDecodeError, TypeError, ValueError, RecursionError) as exc:
            # RecursionError: some thousands of "[" fit in one frame; a malformed frame, not a crash
            await self._malformed(raw, exc if not isinstance(exc, RecursionError) else ValueError("nested too deeply"))
            return
        self._bad = 0
        if msg.message_type_id == MessageType.Call:
            self.stats["calls_in"] += 1
            if msg.action not in SUPPORTED_ACTIONS:
                await self._error(msg.unique_id, "NotSupported", f"{_clip(msg.action, 64)} is not supported by "
                                                                 "this central system")
                return
            try:
                self._requests.put_nowait(msg)
            except asyncio.QueueFull:
                await self._error(msg.unique_id, "InternalError", f"more than {self.limits.max_requests} requests "
                                                                  "are waiting: send one at a time (OCPP-J §4.1.1)")
            return
        fut = self._waiting.get(msg.unique_id)  # a CallResult or CallError: only an awaited one is kept
        if fut is not None and not fut.done():
            fut.set_result(msg)
        else:
            log.debug("%s: ignored an answer to a call we are not waiting for (%s)", self.cp_id,
                      _clip(str(msg.unique_id), 40))

    async def _malformed(self, raw: str | bytes, exc: BaseException) -> None:
        self._bad += 1
        self.stats["malformed"] += 1
        why = exc.description if isinstance(exc, OCPPError) else str(exc)
        cause = exc.details.get("cause") if isinstance(exc, OCPPError) and isinstance(exc.details, dict) else None
        reason = _clip(f"not an OCPP-J message: {cause or why}")
        log.warning("%s: refused a malformed frame (%d in a row): %s", self.cp_id, self._bad, reason)
        await self._error(_unique_id_of(raw), "FormationViolation", reason)
        if self._bad >= self.limits.max_bad:
            log.warning("%s: %d malformed frames in a row — closing the connection", self.cp_id, self._bad)
            await self.ws.close(1008, "too many malformed frames")

    async def _work(self) -> None:
        while True:
            msg = await self._requests.get()
            try:
                await self._handle(msg)
            except OCPPError as exc:
                self.stats["refused"] += 1
                code = "FormationViolation" if isinstance(exc, FormatViolationError) else exc.code
                cause = exc.details.get("cause") if isinstance(exc.details, dict) else None
                log.info("%s: refused a %s: %s", self.cp_id, msg.action, cause or exc.description)
                await self._error(msg.unique_id, code, _clip(str(cause or exc.description)))

    async def _handle(self, msg: Any) -> None:
        validate(msg, OCPP_VERSION)  # raises the OCPP error the frame deserves
        payload = snake(msg.payload)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()

        def settle(value: Answer) -> None:
            if not answer.done():
                answer.set_result(value)

        def reply(value: Answer) -> None:  # from the actor's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle, value)

        if not self.sink(OcppRequest(msg.action, payload, reply, msg.unique_id)):
            await self._error(msg.unique_id, "InternalError", "the gateway is restarting this charger's connection; "
                                                              "send it again")
            return
        try:
            result = await asyncio.wait_for(answer, self.limits.answer_timeout)
        except TimeoutError:
            log.warning("%s: no answer to its %s within %g s", self.cp_id, msg.action, self.limits.answer_timeout)
            await self._error(msg.unique_id, "InternalError", f"no answer within {self.limits.answer_timeout:g} s; "
                                                              "send it again")
            return
        if isinstance(result, OcppRefusal):
            self.stats["refused"] += 1
            await self._error(msg.unique_id, result.code, _clip(result.description))
            return
        response = msg.create_call_result(camel(remove_nones(result)))
        try:
            validate(response, OCPP_VERSION)
        except OCPPError as exc:  # our answer does not fit the schema: a bug here, not the charger's fault
            log.error("%s: our answer to its %s does not fit OCPP 1.6 (%s): %s", self.cp_id, msg.action,
                      exc.details.get("cause") if isinstance(exc.details, dict) else exc, response.payload)
            await self._error(msg.unique_id, "InternalError", "the central system could not form its answer")
            return
        self.stats["answered"] += 1
        await self.ws.send(response.to_json())

    async def _error(self, unique_id: str, code: str, description: str) -> None:
        await self.ws.send(CallError(unique_id, code, _clip(description), {}).to_json())

    # outbound --------------------------------------------------------------------------------
    def can_call(self) -> bool:
        return self._calls_queued < self.limits.max_calls

    async def call(self, action: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send one call and return the charger's answer (snake_case); raises ``ConnectionError``,
        ``TimeoutError`` or ``ValueError`` (a sentence) when there is none."""
        call = Call(unique_id=str(uuid.uuid4()), action=action,
                    payload=remove_nones(camel(dict(payload))))
        validate(call, OCPP_VERSION)
        self._calls_queued += 1
        try:
            async with self._call_lock:  # one call in flight at a time (OCPP-J §4.1.1)
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._waiting[call.unique_id] = fut
                try:
                    await self.ws.send(call.to_json())
                    self.stats["calls_out"] += 1
                    answer = await asyncio.wait_for(fut, self.limits.call_timeout)
                finally:
                    self._waiting.pop(call.unique_id, None)
        finally:
            self._calls_queued -= 1
        if answer.message_type_id == MessageType.CallError:
            raise ValueError(f"the charger answered {answer.error_code}: {_clip(str(answer.error_description))}")
        result = CallResult(answer.unique_id, answer.payload, action=action)
        try:
            validate(result, OCPP_VERSION)
        except OCPPError as exc:
            raise ValueError(f"the charger's answer to {action} is not valid OCPP 1.6: {exc.description}") from None
        out: dict[str, Any] = snake(result.payload)
        return out


# --- the port: the actor's handle on the connection ------------------------------------------------
class ChargerPort:
    """Thread-safe handle a charger's actor holds on its connection (made by the server per connection).

    The actor tells the handshake the verdict of Central's login (:meth:`login_result`), makes calls
    to the charger (:meth:`call`) and may close the connection (:meth:`close`). The server binds the
    connection once the WebSocket is open (:meth:`bind`) and marks the port ``superseded`` when a
    newer connection of the same charger logged in (this one must not log in again)."""

    def __init__(self, cp_id: str, address: str, loop: asyncio.AbstractEventLoop,
                 on_login: Callable[[bool, str], None]) -> None:
        self.cp_id = cp_id
        self.address = address  # the charger's host:port, for logs
        self._loop = loop
        self._on_login = on_login
        self._lock = threading.Lock()
        self._login_told = False
        self._conn: OcppConnection | None = None
        self._closing: str | None = None
        self._closer: Callable[[str], Awaitable[None]] | None = None
        self._notify: pykka.ActorRef[Any] | None = None
        self.superseded = False
        self._tasks: set[asyncio.Future[Any]] = set()  # strong references: asyncio keeps only weak ones

    # --- the actor's side (any thread) ---------------------------------------------------------
    def login_result(self, accepted: bool, reason: str = "") -> bool:
        """Tell the waiting handshake Central's verdict; only the first call counts (True if this one did)."""
        with self._lock:
            if self._login_told:
                return False
            self._login_told = True
        self._soon(self._on_login, accepted, reason)
        return True

    def attach(self, notify: pykka.ActorRef[Any]) -> None:
        """Who hears :class:`WireUp` (the actor; told at once when the connection is already open)."""
        with self._lock:
            self._notify = notify
            conn = self._conn
        if conn is not None:
            tell(notify, WireUp(self.address))

    @property
    def open(self) -> bool:
        return self._conn is not None and self._closing is None

    def call(self, action: str, payload: Mapping[str, Any], notify: pykka.ActorRef[Any], token: Any) -> bool:
        """Send ``action`` to the charger; :class:`CallDone` with ``token`` goes to ``notify``.
        False (nothing sent, nothing told) when the connection is not open or too many calls wait."""
        conn = self._conn
        if conn is None or self._closing is not None or not conn.can_call():
            return False

        async def run() -> None:
            try:
                answer = await conn.call(action, payload)
            except (ConnectionError, TimeoutError, ValueError, OCPPError) as exc:
                why = (f"no answer within {conn.limits.call_timeout:g} s" if isinstance(exc, TimeoutError)
                       else getattr(exc, "description", None) or str(exc) or type(exc).__name__)
                tell(notify, CallDone(token, False, error=str(why)))
                return
            except Exception as exc:  # the socket failed under us (websockets' ConnectionClosed is one)
                tell(notify, CallDone(token, False, error=f"the connection failed ({type(exc).__name__})"))
                return
            tell(notify, CallDone(token, True, payload=answer))

        self._soon(lambda: self._spawn(run()))
        return True

    def close(self, reason: str) -> None:
        """Close the charger's connection (it will reconnect); idempotent."""
        with self._lock:
            if self._closing is not None:
                return
            self._closing = reason
            closer = self._closer
        if closer is not None:
            self._soon(lambda: self._spawn(closer(reason)))  # the coroutine is made in the loop's thread

    # --- the server's side (the event loop) -------------------------------------------------------
    def bind(self, conn: OcppConnection, closer: Callable[[str], Awaitable[None]]) -> None:
        """The WebSocket is open: calls may go out; ``closer(reason)`` closes it."""
        with self._lock:
            self._conn, self._closer = conn, closer
            notify, closing = self._notify, self._closing
        if closing is not None:
            self._spawn(closer(closing))
        elif notify is not None:
            tell(notify, WireUp(self.address))

    def unbind(self) -> None:
        with self._lock:
            self._conn, self._closer = None, None
            if self._closing is None:
                self._closing = "the connection closed"

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task of the loop (called in the loop's thread), keeping it referenced until done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(fn, *args)


# --- helpers -----------------------------------------------------------------------------------
def validate(message: Any, version: str) -> None:
    """The library's schema validation, in the calling thread: it takes ~0.1 ms, less than the hop to a
    worker thread the library's ``validate_payload`` makes for every message (ocpp 2.1's ``_validate_payload``)."""
    _validate(message, version)


_KEYS: dict[tuple[bool, str], str] = {}  # (to snake?, key) -> converted: the schemas' keys, a few hundred
_KEYS_MAX: Final = 4096


def _key(key: str, to_snake: bool) -> str:
    done = _KEYS.get((to_snake, key))
    if done is None:
        done = next(iter((camel_to_snake_case if to_snake else snake_to_camel_case)({key: None})))
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[(to_snake, key)] = done
    return done


def _convert(data: Any, to_snake: bool) -> Any:
    if isinstance(data, dict):
        return {_key(k, to_snake): _convert(v, to_snake) for k, v in data.items()}
    if isinstance(data, list):
        return [_convert(v, to_snake) for v in data]
    return data


def snake(data: Any) -> Any:
    """camelCase keys → snake_case, as the library converts them, with each key converted once."""
    return _convert(data, True)


def camel(data: Any) -> Any:
    """snake_case keys → camelCase, as the library converts them, with each key converted once."""
    return _convert(data, False)


def _check_shape(msg: Any) -> None:
    """What ``unpack`` does not check: a string unique id of at most 36 characters, a string action,
    an object payload (OCPP-J §4.1 and §4.2)."""
    uid = msg.unique_id
    if not isinstance(uid, str) or not 0 < len(uid) <= UNIQUE_ID_MAX:
        raise ValueError(f"the unique id must be a string of 1 to {UNIQUE_ID_MAX} characters")
    if msg.message_type_id == MessageType.Call:
        if not isinstance(msg.action, str) or not 0 < len(msg.action) <= 64:
            raise ValueError("the action must be a string of 1 to 64 characters")
        if not isinstance(msg.payload, dict):
            raise ValueError("the payload must be a JSON object")


def _unique_id_of(raw: str | bytes) -> str:
    """The unique id of a malformed frame when one can be read from it (so the sender can match the error)."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return "-1"
    if isinstance(data, list) and len(data) > 1 and isinstance(data[1], str) and 0 < len(data[1]) <= UNIQUE_ID_MAX:
        return data[1]
    return "-1"


def _clip(text: str, limit: int = _DETAIL_MAX) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
