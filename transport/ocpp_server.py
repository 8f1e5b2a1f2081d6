"""The gateway's WebSocket server: chargers connect here with OCPP 1.6J (issue #13).

:class:`OcppListener` is an actor that owns one asyncio event loop in its own
thread, running a ``websockets`` server. For each connection:

1. the **handshake** (``process_request``), before anything is accepted:
   the path must be ``<path-prefix><cp_id>`` with a valid CP id (else 404), the
   client must offer the ``ocpp1.6`` subprotocol (else 400), the gateway must
   have room (``max_chargers``, else 503); with security on (profiles 1 and 2)
   the HTTP Basic credentials must name the same id and carry a password (else
   401). Too many refused logins for one charger id from one address get 429.
   Then the charger's verifier is computed from the password (Argon2id, on a
   worker thread, a bounded number at once) and a supervisor tree for this
   connection is started (``open_charger``, given by the wiring): the charger's
   actor logs in to Central with that verifier, as a Monitor would. Central's
   refusal is a 401 (Central audits it as ``login_failed``), no answer in
   ``login_timeout`` a 503; in both cases the tree is stopped again. Nothing
   about the password is kept: the verifier lives in the actor's memory only;
   the password is dropped with the request.
2. the **connection**: an :class:`~transport.ocpp_wire.OcppConnection` reads
   frames and hands validated requests to the charger's actor by name; the
   actor's :class:`~transport.ocpp_wire.ChargerPort` sends calls back.
3. the **end**: when the WebSocket closes (the charger left, a ping went
   unanswered, the actor closed it), the connection's tree is stopped (``close_charger``);
   Central sees the CP disconnected at once. A newer connection of the same
   charger that logs in replaces the older one (which is closed).

Profile 2 is the same over TLS (``tls=(cert, key)``); the wiring makes a
self-signed pair when none is given. The server, its executor and its loop are
this actor's; a crash of the listener closes every charger connection (they
reconnect) and its restart binds the same port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic, parse_subprotocol
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from actors.runtime import Directory, SupervisedActor, Supervision
from transport import protocol, security
from transport.ocpp_wire import SUBPROTOCOL, ChargerPort, OcppConnection, OcppLimits

log = logging.getLogger("evcharging.ocpp.server")

__all__ = ["OcppListener", "OcppServerOptions", "OcppPort", "OcppServerStats", "OpenCharger", "CloseCharger",
           "Opened", "PASSWORD_MAX"]

#: Longest Basic-auth password accepted (the registry's secrets are 43 characters).
PASSWORD_MAX: Final = 128
REALM: Final = "EV_OCPP"
START_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Opened:
    """What ``open_charger`` started: the tree's name (to stop it) and the actor's (to deliver to)."""

    tree: str
    actor: str


#: ``open_charger(cp_id, n, port, verifier)``: start the supervisor tree of connection ``n`` (blocks; raises).
OpenCharger = Callable[[str, int, ChargerPort, bytes | None], Opened]
#: ``close_charger(tree)``: stop it (blocks; idempotent).
CloseCharger = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class OcppServerOptions:
    """The listener's settings; each is a flag of EV_OCPP."""

    host: str = "0.0.0.0"
    port: int = 9000
    path_prefix: str = "/ocpp/"
    security: bool = True  # HTTP Basic auth with the charger's registry secret (profile 1; with tls: profile 2)
    tls: tuple[str, str] | None = None  # (certificate, key) PEM files
    max_chargers: int = 1000
    max_size: int = 65_536  # bytes of one WebSocket message
    open_timeout: float = 10.0  # the whole opening handshake, Central's login included
    login_timeout: float = 8.0  # Central's verdict on a charger's login
    ping_interval: float = 20.0  # WebSocket pings: a dead TCP connection is noticed within interval + timeout
    ping_timeout: float = 20.0  # (tolerant of a busy gateway: a missed pong closes the charger's connection)
    handshakes: int = 4  # verifiers (Argon2id, ~19 MiB, ~50 ms each) computed at once
    failures: int = 3  # refused logins per address and charger id within failure_window, then 429
    failure_window: float = 60.0
    limits: OcppLimits = field(default_factory=OcppLimits)


@dataclass(frozen=True, slots=True)
class OcppPort:
    """Ask: the port the listener is bound to (useful with port 0)."""


@dataclass(frozen=True, slots=True)
class OcppServerStats:
    """Ask: counters (connected, refused by reason, handshakes) as a dict."""


@dataclass(slots=True)
class _Entry:
    """One accepted (or accepting) connection of a charger."""

    n: int
    cp_id: str
    opened: Opened
    port: ChargerPort
    claimed: bool = False


class OcppListener(SupervisedActor):
    """See the module docstring."""

    def __init__(self, options: OcppServerOptions, directory: Directory, open_charger: OpenCharger,
                 close_charger: CloseCharger, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.options = options
        self.directory = directory
        self.open_charger = open_charger
        self.close_charger = close_charger
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._quit: asyncio.Event | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, options.handshakes + 2),
                                                           thread_name_prefix="ocpp-handshake")
        self._bound = 0
        self._failure: BaseException | None = None
        # event-loop state (touched only in the loop's thread)
        self._serial = 0
        self._current: dict[str, _Entry] = {}  # cp_id -> its live connection
        self._accepting: dict[int, _Entry] = {}  # n -> logged in, handler not started yet
        self._in_handshake = 0
        self._handshakes: asyncio.Semaphore | None = None
        self._limiter = security.FailureLimiter(options.failures, options.failure_window)
        self.stats: dict[str, int] = {"accepted": 0, "refused_path": 0, "refused_subprotocol": 0, "refused_auth": 0,
                                      "refused_central": 0, "refused_full": 0, "refused_rate": 0, "refused_busy": 0,
                                      "central_timeout": 0, "closed": 0}

    # --- lifecycle ---------------------------------------------------------------------------------
    def setup(self) -> None:
        _keep_big_allocations_returnable()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="ocpp-server", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError(f"the OCPP server did not start within {START_TIMEOUT:g} s")
        if self._failure is not None:
            raise RuntimeError(f"cannot serve OCPP on {self.options.host}:{self.options.port}: {self._failure}")
        scheme = "wss" if self.options.tls else "ws"
        log.info("EV_OCPP: listening on %s://%s:%d%s<charger id> (OCPP 1.6J, %s)", scheme, self.options.host,
                 self._bound, self.options.path_prefix,
                 ("security profile 2: Basic auth over TLS" if self.options.tls else "security profile 1: Basic auth")
                 if self.options.security else "NO authentication (development)")

    def teardown(self) -> None:
        loop, stop = self._loop, self._quit
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10.0)
        self._pool.shutdown(wait=True)  # the trees of the closed connections are stopped first

    def on_receive(self, message: Any) -> Any:
        match message:
            case OcppPort():
                return self._bound
            case OcppServerStats():
                return dict(self.stats, connected=len(self._current), handshakes=self._in_handshake)
        return None

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            self._failure = exc
            ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._quit = asyncio.Event()
        self._handshakes = asyncio.Semaphore(self.options.handshakes)
        context: ssl.SSLContext | None = None
        if self.options.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2  # OCPP security profile 2
            context.load_cert_chain(*self.options.tls)
        o = self.options
        chatter = logging.getLogger("evcharging.ocpp.websockets")  # "connection open/closed" for each charger
        if chatter.level == logging.NOTSET:
            chatter.setLevel(logging.WARNING)
        server = await serve(self._handler, o.host, o.port, process_request=self._process_request,
                             subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=o.max_size, open_timeout=o.open_timeout,
                             ping_interval=o.ping_interval, ping_timeout=o.ping_timeout, close_timeout=2.0, ssl=context,
                             compression=None,  # OCPP messages are small: deflating them costs more than it saves
                             server_header="EV_OCPP", logger=chatter)
        self._server = server
        self._bound = next(iter(server.sockets)).getsockname()[1]
        ready.set()
        try:
            await self._quit.wait()
        finally:
            server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # --- the handshake ----------------------------------------------------------------------------
    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        peer = _peer(connection)
        path = request.path.split("?", 1)[0]
        prefix = self.options.path_prefix
        cp_id = path[len(prefix):] if path.startswith(prefix) else ""
        if not protocol.is_id(cp_id):
            self.stats["refused_path"] += 1
            log.info("Refused a connection from %s to %r: not %s<charger id>", peer, path[:80], prefix)
            return _text(connection, http.HTTPStatus.NOT_FOUND,
                         f"Connect to {prefix}<charger id> (1 to 64 letters, digits, '.', '_', '-').")
        offered = _subprotocols(request.headers)
        if SUBPROTOCOL not in offered:
            self.stats["refused_subprotocol"] += 1
            log.info("Refused charger %s from %s: it offers no %s subprotocol (%s)", cp_id, peer, SUBPROTOCOL,
                     ", ".join(offered)[:80] or "none")
            return _text(connection, http.HTTPStatus.BAD_REQUEST,
                         f"This central system speaks OCPP 1.6J: offer the subprotocol {SUBPROTOCOL}.")
        connected = len(self._current) - (1 if cp_id in self._current else 0)  # a reconnect replaces its own
        if connected + self._in_handshake >= self.options.max_chargers:
            self.stats["refused_full"] += 1
            log.warning("Refused charger %s from %s: %d chargers are connected (--max-chargers)", cp_id, peer,
                        self.options.max_chargers)
            return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                         "The gateway serves as many chargers as it may; try again later.")
        password: str | None = None
        if self.options.security:
            password, problem = _basic(request.headers, cp_id)
            if problem is not None:
                self.stats["refused_auth"] += 1
                log.info("Refused charger %s from %s: %s", cp_id, peer, problem)
                return _unauthorized(connection, problem)
        limit_key = f"{_host(peer)}|{cp_id}"
        if self._limiter.blocked(limit_key):
            self.stats["refused_rate"] += 1
            wait = max(1, round(self._limiter.retry_after(limit_key)))
            log.warning("Refused charger %s from %s: too many refused logins; try again in %d s", cp_id, peer, wait)
            response = _text(connection, http.HTTPStatus.TOO_MANY_REQUESTS,
                             f"Too many refused logins for {cp_id} from your address; try again in {wait} s.")
            response.headers["Retry-After"] = str(wait)
            return response
        self._in_handshake += 1
        try:
            return await self._login(connection, cp_id, peer, password, limit_key)
        finally:
            self._in_handshake -= 1

    async def _login(self, connection: ServerConnection, cp_id: str, peer: str, password: str | None,
                     limit_key: str) -> Response | None:
        loop = asyncio.get_running_loop()
        verifier: bytes | None = None
        deadline = loop.time() + self.options.open_timeout - 0.5  # answer before websockets gives up on us
        if password is not None:
            assert self._handshakes is not None
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time() - self.options.login_timeout)):
                    async with self._handshakes:
                        verifier = await loop.run_in_executor(self._pool, security.verifier, "cp", cp_id, password)
            except TimeoutError:
                self.stats["refused_busy"] += 1
                log.warning("Refused charger %s from %s: too many logins at once; it will try again", cp_id, peer)
                return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                             "The gateway is busy with other logins; try again in a few seconds.")
        del password
        self._serial += 1
        n = self._serial
        verdict: asyncio.Future[tuple[bool, str]] = loop.create_future()

        def on_login(accepted: bool, reason: str) -> None:
            if not verdict.done():
                verdict.set_result((accepted, reason))

        port = ChargerPort(cp_id, peer, loop, on_login)
        try:
            opened = await loop.run_in_executor(self._pool, self.open_charger, cp_id, n, port, verifier)
        except Exception as exc:
            log.error("Cannot serve charger %s from %s: %s", cp_id, peer, exc)
            return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                         "The gateway cannot serve this charger right now; try again later.")
        try:
            accepted, reason = await asyncio.wait_for(
                verdict, max(0.1, min(self.options.login_timeout, deadline - loop.time())))
        except TimeoutError:
            accepted, reason = False, ""
        if not accepted:
            await loop.run_in_executor(self._pool, self.close_charger, opened.tree)
            if not reason:
                self.stats["central_timeout"] += 1
                log.warning("Refused charger %s from %s: Central did not answer its login within %g s", cp_id, peer,
                            self.options.login_timeout)
                return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                             "Central cannot be reached right now; try again later.")
            self.stats["refused_central"] += 1
            if not reason.startswith("lost Central"):
                self._limiter.failed(limit_key)
            log.warning("Refused charger %s from %s: Central refused its login: %s", cp_id, peer, reason)
            return _unauthorized(connection, f"Central refused charger {cp_id}: {reason}")
        entry = _Entry(n, cp_id, opened, port)
        previous = self._current.get(cp_id)
        self._current[cp_id] = entry
        self._accepting[n] = entry
        connection.ocpp_entry = n  # type: ignore[attr-defined]
        if previous is not None:
            previous.port.superseded = True
            previous.port.close("replaced by a newer connection of the same charger")
            if not previous.claimed:
                self._forget(previous)
        loop.call_later(self.options.open_timeout, self._reap, n)
        self.stats["accepted"] += 1
        log.info("Charger %s connected from %s (connection %d)", cp_id, peer, n)
        return None

    def _reap(self, n: int) -> None:
        """A login whose WebSocket never opened (the client left during the handshake): stop its tree."""
        entry = self._accepting.pop(n, None)
        if entry is not None and not entry.claimed:
            log.info("Charger %s: the connection closed during the handshake", entry.cp_id)
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        if self._current.get(entry.cp_id) is entry:
            del self._current[entry.cp_id]
        entry.port.unbind()
        assert self._loop is not None
        self._loop.run_in_executor(self._pool, self.close_charger, entry.opened.tree)

    # --- the connection -----------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        entry = self._accepting.pop(getattr(ws, "ocpp_entry", -1), None)
        if entry is None:  # reaped or replaced meanwhile
            await ws.close(1001, "the connection was replaced")
            return
        entry.claimed = True
        actor = entry.opened.actor
        conn = OcppConnection(ws, entry.cp_id, lambda request: self.directory.tell(actor, request),
                              self.options.limits)

        async def closer(reason: str) -> None:
            await ws.close(1000, reason.encode("utf-8")[:120].decode("utf-8", "ignore"))

        entry.port.bind(conn, closer)
        started = time.monotonic()
        why = "closed"
        try:
            await conn.run()
        except ConnectionClosed as exc:
            why = f"closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        except Exception as exc:  # a bug in the loop: logged, the connection ends, the charger reconnects
            why = f"failed: {exc}"
            log.exception("Charger %s: the connection failed: %s", entry.cp_id, exc)
        finally:
            self.stats["closed"] += 1
            log.info("Charger %s disconnected after %.0f s (%s)", entry.cp_id, time.monotonic() - started, why)
            self._forget(entry)


# --- helpers ------------------------------------------------------------------------------------
def _keep_big_allocations_returnable() -> None:
    """Every login hashes a password with Argon2id, which allocates 19 MiB. glibc serves a large block
    with mmap and returns it when freed, but after the first such free it raises its threshold, and from
    then on the 19 MiB come from the worker thread's heap and stay there: some 20 MiB per handshake thread
    for the life of the process (measured: 21 → 138 MB after 40 logins on 6 threads; 22 MB with this).
    A fixed threshold (1 MiB) keeps them returnable. Best effort: other C libraries are left alone."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _host(peer: str) -> str:
    return security.address_of(peer)


def _subprotocols(headers: Headers) -> list[str]:
    offered: list[Any] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        try:
            offered.extend(parse_subprotocol(value))
        except InvalidHeader:
            continue
    return offered


def _basic(headers: Headers, cp_id: str) -> tuple[str | None, str | None]:
    """(password, None) from valid Basic credentials naming ``cp_id``; (None, why not) otherwise."""
    try:
        value = headers["Authorization"]
    except KeyError:
        return None, "no credentials (HTTP Basic: the charger id and its secret)"
    except Exception:  # several Authorization headers
        return None, "more than one Authorization header"
    try:
        user, password = parse_authorization_basic(value)
    except InvalidHeader:
        return None, "credentials that are not HTTP Basic"
    if user != cp_id:
        return None, "the user name must be the charger id of the URL"
    if not 0 < len(password) <= PASSWORD_MAX:
        return None, f"a password of 1 to {PASSWORD_MAX} characters is required"
    return password, None


def _text(connection: ServerConnection, status: http.HTTPStatus, text: str) -> Response:
    return connection.respond(status, text + "\n")


def _unauthorized(connection: ServerConnection, text: str) -> Response:
    response = _text(connection, http.HTTPStatus.UNAUTHORIZED, protocol.clip(text, 300))
    response.headers["WWW-Authenticate"] = build_www_authenticate_basic(REALM)
    return response
