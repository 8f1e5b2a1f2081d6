"""API_Central: Central's HTTP adapter (FastAPI), its event stream and the server actor.

One more adapter of Central, like the Monitor listener and the Kafka pumps:
HTTP requests become asks to Central's actors, Central's panel snapshots
become a Server-Sent Events stream. The contract is docs/api.md; ``/docs``
has the OpenAPI description.

What the app reads and whom it asks, all given to :func:`make_app` (this
module imports no domain actor: ``supervisors/central_system.py`` wires them):

* ``live``, a :class:`LiveState` (the web hub, ``actors/web_hub.py``): the
  latest CP tiles, requests, messages and weather, and the event stream's
  subscriptions. A GET of live state never asks Central.
* ``commands``, a :class:`Commands` port: stop, resume, revoke, EV_W's reading
  and the watched locations, each an ask to Central with a bounded wait; its
  :class:`Result` status becomes the HTTP status (:data:`STATUS_CODES`).
* ``store_factory``: a read-only view of Central's database (tickets, drivers,
  the audit log, registrations, key states), opened per request in that
  request's thread and closed at its end.
* ``keyring``: the CPs' current keys (:class:`~transport.security.Keyring`).

The edge: every ``/api`` route needs the operator token (401 without it or
with a wrong one, 429 after repeated wrong ones from one address), bodies are
bounded (413) and validated (422, unknown fields refused), every error is
``{"detail": "<a sentence>"}``. :class:`ApiServer` is the supervised actor that
owns the uvicorn thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.runtime import SupervisedActor, Supervision, Ticker
from transport import protocol, security
from transport.central_api_models import (
    COMMAND,
    REFUSALS,
    AuditOut,
    CpOut,
    DriverOut,
    Health,
    LocationIn,
    MessageOut,
    Problem,
    RequestOut,
    ResultOut,
    RevokeIn,
    SessionOut,
    TicketOut,
    WeatherAlertIn,
    WeatherOut,
)
from transport.central_api_models import location as location_rule
from transport.http_common import (
    MAX_BODY_BYTES,
    BodyLimit,
    ServerThread,
    TokenGate,
    client_address,
    error_list,
    sentence,
)

if TYPE_CHECKING:
    from persistence.repository import Repository

__all__ = ["make_app", "LiveState", "Commands", "Result", "ApiServer", "ApiInfo", "GetApiInfo", "Streams",
           "STATUS_CODES", "KEEPALIVE", "MAX_STREAMS", "WEB_DIR", "COMPONENT", "TOKEN_EVENT"]

log = logging.getLogger("evcharging.api")

COMPONENT: Final = "api"  # the audit trail's component
TOKEN_EVENT: Final = "api_token_refused"  # the audit event of a wrong token
#: Seconds between two keepalive comments on an idle event stream.
KEEPALIVE: Final = 15.0
#: Event streams open at once; one more is answered 503.
MAX_STREAMS: Final = 64
#: Connections (and requests) served at once besides the event streams; past it, 503 at once.
MAX_CONNECTIONS: Final = 256
#: The web panel: ``/`` is its index.html, ``/static/...`` its other files.
WEB_DIR: Final = Path(__file__).resolve().parent / "web"
#: Central's answer to a command, as an HTTP status.
STATUS_CODES: Final = {"ok": 200, "not_found": 404, "conflict": 409, "unavailable": 503, "invalid": 422}
STATES: Final = ("ACTIVE", "SUPPLYING", "STOPPED", "BROKEN", "DISCONNECTED")
LIMIT_MAX: Final = 1000
#: The page's rules: its own scripts and styles only, no frames, no other origins.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

Json = dict[str, Any]
StoreFactory = Callable[[], "Repository"]


# --- what the app is given ----------------------------------------------------------------------
class Subscriber(Protocol):
    """One listener of the event stream (``actors.web_hub.Subscription``)."""

    closed: bool

    def take(self) -> list[Any]: ...  # events, each with ``wire`` bytes

    def wake(self) -> None: ...


class LiveState(Protocol):
    """The latest state Central published (``actors.web_hub.EventHub``)."""

    def cps(self) -> list[Json]: ...

    def cp(self, cp_id: str) -> Json | None: ...

    def cps_encoded(self) -> list[tuple[Json, str]]: ...  # (the CP, its JSON text)

    def cp_encoded(self, cp_id: str) -> tuple[Json, str] | None: ...

    def counts(self) -> dict[str, int]: ...

    def requests(self) -> list[Json]: ...

    def messages(self) -> list[Json]: ...

    def weather(self) -> list[Json]: ...

    def subscribe(self, wake: Callable[[], None], *, limit: int | None = None) -> Any: ...

    def unsubscribe(self, sub: Any) -> None: ...


class Result(Protocol):
    """Central's answer to a command (``actors.operations.OperatorResult``)."""

    @property
    def status(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def cp_ids(self) -> tuple[str, ...]: ...


class Commands(Protocol):
    """Asks to Central (``actors.web_hub.CentralCommands``); each returns Central's answer, or an
    ``unavailable`` one when Central does not answer in time."""

    def admin(self, action: str, cp_id: str | None, address: str | None = None) -> Result: ...

    def revoke(self, cp_id: str, reason: str, address: str | None = None) -> Result: ...

    def weather_alert(self, location: str, temperature_c: float | None, alert: bool, error: str | None) -> Result: ...

    def watch(self, location: str, watch: bool, address: str | None = None) -> Result: ...

    def weather_view(self) -> list[Json] | None: ...  # Central's weather rows now; None: no answer in time


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(data: Any) -> str:
    return _ENCODER.encode(data)


NO_KEY: Final = _dumps({"status": "none", "key_id": None, "issued_at": None})


def _text_response(text: str, status: int = 200) -> Response:
    return Response(text.encode(), status_code=status, media_type="application/json")


def _json_response(data: Any, status: int = 200) -> Response:
    """JSON encoded here, without a model pass (the response models are the documentation)."""
    return _text_response(_dumps(data), status)


def _result(answer: Result) -> Response:
    status = STATUS_CODES.get(answer.status, 503)
    return _json_response({"status": answer.status, "detail": answer.text, "cp_ids": list(answer.cp_ids)}, status)


def _checked_id(value: str, what: str) -> str:
    complaint = protocol.IdRule().complaint(value)
    if complaint:
        raise HTTPException(422, f"{what} {complaint}")
    return value


def _matches(cp: Json, state: str | None, location: str | None, q: str | None) -> bool:
    if state is not None and cp["state"] != state:
        return False
    if location is not None and cp["location"].casefold() != location:
        return False
    if q is not None:
        return any(q in str(cp[k] or "").casefold() for k in ("cp_id", "location", "driver_id"))
    return True


# --- the event stream ----------------------------------------------------------------------------
class Streams:
    """The app's open event streams: bounded in number, all ended at once when the server stops."""

    def __init__(self, live: LiveState, limit: int) -> None:
        self.live, self.limit = live, limit
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._closed = False

    def open(self, wake: Callable[[], None]) -> Any | None:
        """A new subscription (its first event is a snapshot), or None when too many are open."""
        with self._lock:
            if self._closed or len(self._open) >= self.limit:
                return None
            sub = self.live.subscribe(wake)
            self._open.add(sub)
            return sub

    def done(self, sub: Any) -> None:
        self.live.unsubscribe(sub)
        with self._lock:
            self._open.discard(sub)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        """End every stream (each wakes, sees it is closed and returns); refuse new ones."""
        with self._lock:
            self._closed = True
            subs = list(self._open)
        for sub in subs:
            self.live.unsubscribe(sub)
            sub.wake()


async def _events(streams: Streams, sub: Any, ready: asyncio.Event, keepalive: float) -> AsyncIterator[bytes]:
    """The stream of one client: what its subscription holds, as it comes; a comment when idle."""
    try:
        yield b"retry: 2000\n\n"
        while not sub.closed:
            events = sub.take()
            if not events:
                ready.clear()
                events = sub.take()  # a push between the take and the clear would be lost otherwise
            if events:
                yield b"".join(e.wire for e in events)
                continue
            try:
                await asyncio.wait_for(ready.wait(), keepalive)
            except TimeoutError:
                yield b": keepalive\n\n"
    finally:
        streams.done(sub)


class _Stores:
    """One read connection to Central's database per worker thread, opened at its first use (opening
    one costs more than most queries); all closed by :meth:`close` once the server stopped."""

    def __init__(self, factory: StoreFactory) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Repository] = []

    @contextmanager
    def use(self) -> Iterator[Repository]:
        repo: Repository | None = getattr(self._local, "repo", None)
        if repo is None:
            repo = self._local.repo = self._factory()
            with self._lock:
                self._open.append(repo)
        try:
            yield repo
        except sqlite3.Error:  # do not keep a connection that failed: the next use opens a new one
            self._local.repo = None
            with self._lock:
                self._open.remove(repo)
            repo.close()
            raise

    def close(self) -> None:
        with self._lock:
            repos, self._open = self._open, []
        for repo in repos:
            try:
                repo.close()
            except sqlite3.Error:
                pass


# --- the app -------------------------------------------------------------------------------------
def make_app(live: LiveState, commands: Commands, store_factory: StoreFactory, token: str, *,
             keyring: security.Keyring | None = None, limiter: security.FailureLimiter | None = None,
             max_body: int = MAX_BODY_BYTES, keepalive: float = KEEPALIVE, max_streams: int = MAX_STREAMS,
             web_dir: Path | None = WEB_DIR) -> FastAPI:
    """API_Central's ASGI app (see the module docstring); ``app.state.streams`` is its :class:`Streams`."""

    stores = _Stores(store_factory)
    store = stores.use

    def refused(address: str, what: str) -> None:
        method, _, path = what.partition(" ")
        with store() as repo:
            repo.audit(COMPONENT, "anonymous", TOKEN_EVENT, what, address=address,
                       params={"method": method, "path": path})

    gate = TokenGate(token, limiter or security.FailureLimiter(limit=5, window=60.0), what="operator token",
                     wrong_status=401, on_refused=refused, logger=log)
    streams = Streams(live, max_streams)
    app = FastAPI(
        title="API_Central",
        version="1",
        description=(
            "Central's HTTP API: the charging points with their live state, the live sessions, tickets, "
            "drivers, application messages, weather and the audit log; stop/resume/revoke commands and "
            "EV_W's weather readings; `GET /api/events`, a Server-Sent Events stream of the panel. Every "
            "`/api` route needs `Authorization: Bearer <operator token>`. Errors are "
            '`{"detail": "<a sentence>"}`. The contract is docs/api.md.'),
    )
    app.state.streams = streams
    app.state.stores = stores
    # Every route under /api needs the token: it is the router's, not each route's, so none can miss it.
    api = APIRouter(prefix="/api", dependencies=[Depends(gate)], responses=REFUSALS)

    def full(cps: list[tuple[Json, str]]) -> list[str]:
        """Each CP's JSON text with its registration (the database) and key status (the keyring, else the
        database) added: the live part is the hub's text, encoded once when the tile changed."""
        with store() as repo:
            registered = repo.registered_cp_ids()
            latest = repo.latest_keys()
        out = []
        for cp, text in cps:
            cp_id = cp["cp_id"]
            info = keyring.current(cp_id) if keyring is not None else None
            if info is not None:
                key = _dumps({"status": "current", "key_id": info.key_id, "issued_at": info.issued_at})
            elif (k := latest.get(cp_id)) is not None:
                key = _dumps({"status": k.state, "key_id": k.key_id, "issued_at": k.issued_at})
            else:
                key = NO_KEY
            out.append(f'{text[:-1]},"registered":{"true" if cp_id in registered else "false"},"key":{key}}}')
        return out

    # ------------------------------------------------------------------ CPs
    @api.get("/cps", response_model=list[CpOut], tags=["charging points"], summary="Every CP")
    async def list_cps(state: Annotated[str | None, Query(max_length=20, description="ACTIVE, SUPPLYING, …")] = None,
                 location: Annotated[str | None, Query(max_length=protocol.LOCATION_MAX_LEN,
                                                       description="exactly this location (any case)")] = None,
                 q: Annotated[str | None, Query(max_length=100, description="part of the id, location or "
                                                                           "driver (any case)")] = None,
                 ) -> Response:
        """Every CP Central knows, by id, with its live state and supply, registration and key status."""
        if state is not None and state.upper() not in STATES:
            raise HTTPException(422, f"the state must be one of {', '.join(STATES)}")
        wanted = state.upper() if state is not None else None
        where = location.casefold() if location is not None else None
        text = q.casefold() if q else None
        cps = [c for c in live.cps_encoded() if _matches(c[0], wanted, where, text)]
        return _text_response("[" + ",".join(full(cps)) + "]")

    @api.get("/cps/{cp_id}", response_model=CpOut, tags=["charging points"], summary="One CP",
             responses={404: {"model": Problem, "description": "no such CP"}})
    async def get_cp(cp_id: str) -> Response:
        _checked_id(cp_id, "the CP id")
        cp = live.cp_encoded(cp_id)
        if cp is None:
            raise HTTPException(404, f"there is no CP {cp_id}")
        return _text_response(full([cp])[0])

    def admin(action: str, cp_id: str | None, request: Request) -> Response:
        if cp_id is not None:
            _checked_id(cp_id, "the CP id")
        return _result(commands.admin(action, cp_id, client_address(request)))

    @api.post("/cps/stop", response_model=ResultOut, tags=["commands"], summary="Stop every CP",
              responses=COMMAND)
    def stop_all(request: Request) -> Response:
        """Every CP out of service (STOPPED, reason "operator"); a running supply is ended and billed."""
        return admin("stop", None, request)

    @api.post("/cps/resume", response_model=ResultOut, tags=["commands"], summary="Resume every CP",
              responses=COMMAND)
    def resume_all(request: Request) -> Response:
        """Every CP the operator stopped back in service (not those a weather alert holds)."""
        return admin("resume", None, request)

    @api.post("/cps/{cp_id}/stop", response_model=ResultOut, tags=["commands"], summary="Stop one CP",
              responses=COMMAND)
    def stop_cp(cp_id: str, request: Request) -> Response:
        return admin("stop", cp_id, request)

    @api.post("/cps/{cp_id}/resume", response_model=ResultOut, tags=["commands"], summary="Resume one CP",
              responses=COMMAND)
    def resume_cp(cp_id: str, request: Request) -> Response:
        """Back in service; 409 while a weather alert holds it."""
        return admin("resume", cp_id, request)

    @api.post("/cps/{cp_id}/revoke", response_model=ResultOut, tags=["commands"],
              summary="Revoke a CP's keys", responses=COMMAND)
    def revoke_cp(cp_id: str, request: Request, body: RevokeIn | None = None) -> Response:
        """Revoke every key of the CP and close its link: it is out of service until its Monitor
        authenticates again."""
        _checked_id(cp_id, "the CP id")
        return _result(commands.revoke(cp_id, body.reason if body else "", client_address(request)))

    # ------------------------------------------------------------- live lists
    @api.get("/sessions", response_model=list[SessionOut], tags=["live"], summary="Live sessions")
    async def sessions() -> Response:
        """The supplies that are authorised or running, with their meters."""
        rows = {r["cp_id"]: r for r in live.requests()}
        out = []
        for cp in live.cps():
            if not cp["session_id"]:
                continue
            row = rows.get(cp["cp_id"], {})
            out.append({"session_id": cp["session_id"], "cp_id": cp["cp_id"],
                        "driver_id": cp["driver_id"] or row.get("driver_id"),
                        "state": row.get("status") or ("supplying" if cp["state"] == "SUPPLYING" else "authorised"),
                        "started_at": row.get("started_at"), "energy_kwh": cp["energy_kwh"],
                        "cost_eur": cp["cost_eur"], "power_kw": cp["power_kw"]})
        return _json_response(out)

    @api.get("/requests", response_model=list[RequestOut], tags=["live"], summary="Ongoing requests")
    async def requests() -> Response:
        return _json_response(live.requests())

    @api.get("/messages", response_model=list[MessageOut], tags=["live"],
             summary="Application messages and errors")
    async def messages() -> Response:
        """The messages of every module Central noted (the newest last); ``fault``: something failed."""
        return _json_response(live.messages())

    # ------------------------------------------------------------- records
    @api.get("/tickets", response_model=list[TicketOut], tags=["records"], summary="Tickets")
    def tickets(driver_id: Annotated[str | None, Query(max_length=protocol.ID_MAX_LEN)] = None,
                cp_id: Annotated[str | None, Query(max_length=protocol.ID_MAX_LEN)] = None,
                since: Annotated[float | None, Query(ge=0, le=1e11, allow_inf_nan=False,
                                                     description="Unix seconds")] = None,
                until: Annotated[float | None, Query(ge=0, le=1e11, allow_inf_nan=False,
                                                     description="Unix seconds")] = None,
                limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 100) -> Response:
        """The bills, newest first (by the end of their supply)."""
        if driver_id is not None:
            _checked_id(driver_id, "the driver id")
        if cp_id is not None:
            _checked_id(cp_id, "the CP id")
        if since is not None and until is not None and since > until:
            raise HTTPException(422, "since must not be later than until")
        with store() as repo:
            rows = repo.find_tickets(driver_id=driver_id, cp_id=cp_id, since=since, until=until, limit=limit)
        return _json_response([
            {"session_id": t.session_id, "cp_id": t.cp_id, "driver_id": t.driver_id, "energy_kwh": t.energy_kwh,
             "amount_eur": t.cost_cents / 100, "price_eur_kwh": t.price_eur_kwh, "started_at": t.started_at,
             "ended_at": t.ended_at, "end_reason": t.end_reason, "review": t.review} for t in rows])

    @api.get("/drivers", response_model=list[DriverOut], tags=["records"], summary="Drivers")
    def drivers(limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_MAX) -> Response:
        """The drivers Central knows: registered in the registry, or seen asking for something."""
        with store() as repo:
            rows = repo.drivers_overview(limit)
        return _json_response([{"driver_id": d.driver_id, "registered": d.registered, "first_seen": d.first_seen,
                                "live_session_id": d.live_session_id} for d in rows])

    @api.get("/audit", response_model=list[AuditOut], tags=["records"], summary="The audit log")
    def audit(limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 50,
              event: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_]+$")] = None) -> Response:
        """The newest audit lines first: who, from where, what, with which parameters."""
        with store() as repo:
            rows = repo.recent_audit(limit, event=event)
        return _json_response([
            {"id": a.id, "at": a.at, "component": a.component, "subject": a.subject, "address": a.address,
             "event": a.event, "detail": a.detail, "params": _params(a.params)} for a in rows])

    # ------------------------------------------------------------- weather
    @api.get("/weather", response_model=list[WeatherOut], tags=["weather"], summary="Weather per location",
             )
    def weather() -> Response:
        """Every location EV_W reported on or watches, from Central itself (so a reading or a watch just
        made is in it; from the latest snapshot while Central does not answer)."""
        return _json_response(weather_rows())

    def weather_rows() -> list[Json]:
        rows = commands.weather_view()
        return rows if rows is not None else live.weather()

    @api.post("/weather/alerts", response_model=ResultOut, tags=["weather"], summary="EV_W's reading",
              responses=COMMAND)
    def weather_alert(body: WeatherAlertIn) -> Response:
        """At or below 0 °C (``alert`` true) the location's CPs go out of service (STOPPED, reason "weather");
        ``alert`` false restores those the operator did not stop. Sent every poll: only a change acts."""
        return _result(commands.weather_alert(body.location, body.temperature_c, body.alert, body.error))

    @api.get("/weather/locations", response_model=list[str], tags=["weather"], summary="Watched locations",
             )
    def locations() -> Response:
        return _json_response([w["location"] for w in weather_rows() if w["watched"]])

    @api.post("/weather/locations", response_model=ResultOut, tags=["weather"], summary="Watch a location",
              responses=COMMAND)
    def watch(body: LocationIn, request: Request) -> Response:
        return _result(commands.watch(body.location, True, client_address(request)))

    @api.delete("/weather/locations/{location}", response_model=ResultOut, tags=["weather"],
                summary="Stop watching a location", responses=COMMAND)
    def unwatch(location: Annotated[str, PathParam(max_length=protocol.LOCATION_MAX_LEN)],
                request: Request) -> Response:
        """Stop watching it (its alert, if any, is cleared)."""
        try:
            where = location_rule(location)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return _result(commands.watch(where, False, client_address(request)))

    # ------------------------------------------------------------- stream
    @api.get("/events", tags=["live"], summary="Server-Sent Events of the panel",
             responses={200: {"content": {"text/event-stream": {}}, "description": "the stream"},
                        503: {"model": Problem, "description": "too many streams are open"}})
    async def events() -> Response:
        """`snapshot` first (and whenever this client fell behind), then `cps` (the changed CPs only),
        `requests`, `message` and `weather` as they happen; a `: keepalive` comment when idle."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        sub = streams.open(wake)
        if sub is None:
            raise HTTPException(503, f"too many event streams are open ({streams.limit}); close one or try later")
        return StreamingResponse(_events(streams, sub, ready, keepalive), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------- public
    @app.get("/health", response_model=Health, tags=["service"], summary="Is Central up (no token)")
    async def health() -> Health:
        return Health(status="ok")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> Response:
        index = web_dir / "index.html" if web_dir is not None else None
        if index is None or not index.is_file():
            return HTMLResponse("<!doctype html><title>API_Central</title><p>The web panel is not installed; "
                                "the API is at <a href=\"/docs\">/docs</a>.</p>", headers=PAGE_HEADERS)
        return HTMLResponse(index.read_bytes(), headers=PAGE_HEADERS)

    app.include_router(api)
    if web_dir is not None:
        app.mount("/static", StaticFiles(directory=web_dir, check_dir=False), name="static")

    # ------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        refused = await gate.refusal(request)  # no token, no word about the body
        if refused is not None:
            return refused
        errors = error_list(exc.errors())
        return JSONResponse({"detail": sentence(errors), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def refused_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else ""
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"there is nothing at {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        elif len(detail.split()) < 3:
            detail = f"the request was refused ({exc.status_code} {detail or 'error'})"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(sqlite3.Error)
    async def database(request: Request, exc: sqlite3.Error) -> JSONResponse:
        log.error("API_Central: Central's database failed on %s %s: %s", request.method, request.url.path, exc,
                  exc_info=exc)
        return JSONResponse({"detail": f"Central's database is unavailable ({exc}); try again"}, status_code=503)

    app.add_middleware(BodyLimit, limit=max_body)
    return app


def _params(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"raw": raw}
    return value if isinstance(value, dict) else {"value": value}


# --- the server actor ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ApiInfo:
    """Where API_Central is and what a client needs: its URL, the certificate to trust, the token."""

    url: str
    port: int
    tls: bool
    ca_path: str | None  # the certificate to trust (None: plain HTTP)
    fingerprint: str | None
    token: str = field(repr=False)
    token_source: str = ""  # a path or an environment variable's name: never the token
    generated_cert: bool = False

    @property
    def panel_url(self) -> str:
        return self.url + "/"


@dataclass(frozen=True, slots=True)
class GetApiInfo:
    """Ask the :class:`ApiServer`: its :class:`ApiInfo`."""


@dataclass(frozen=True, slots=True)
class _Check:
    """Tick: is the server thread still serving?"""


class ApiServer(SupervisedActor):
    """Owns API_Central's uvicorn thread: started in ``setup``, stopped in ``teardown``.

    The listening socket belongs to the system (bound once, so the port never changes):
    each generation serves on a duplicate of it, which uvicorn closes when it stops.
    The actor checks every ``check_interval`` seconds that the server still runs; a
    server that stopped by itself crashes the actor, and its supervisor restarts it.
    ``app_factory()`` makes a fresh app per generation (its open streams end with it).
    """

    def __init__(self, app_factory: Callable[[], FastAPI], sock: socket.socket, info: ApiInfo, *,
                 cert: Path | None = None, key: Path | None = None, check_interval: float = 1.0,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.app_factory = app_factory
        self.sock = sock
        self.info = info
        self.cert, self.key = cert, key
        self.check_interval = check_interval
        self._server: ServerThread | None = None
        self._streams: Streams | None = None
        self._stores: _Stores | None = None
        self._ticker: Ticker | None = None

    def setup(self) -> None:
        app = self.app_factory()
        self._streams = app.state.streams
        self._stores = app.state.stores
        dup = self.sock.dup()
        try:
            self._server = ServerThread(app, dup, name="central-api", cert=self.cert, key=self.key,
                                        what="API_Central server",
                                        max_connections=MAX_CONNECTIONS + app.state.streams.limit)
            self._server.start()
        except BaseException:
            dup.close()
            raise
        self._ticker = Ticker(self.check_interval, self.actor_ref, _Check(), name="central-api-check")
        log.info("API_Central serving on %s", self.info.url)

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._streams is not None:
            self._streams.close()  # the streams never end by themselves: end them, or the stop waits
        if self._server is not None:
            self._server.stop(timeout=3.0)
        if self._stores is not None:
            self._stores.close()

    def on_receive(self, message: Any) -> Any:
        match message:
            case GetApiInfo():
                return self.info
            case _Check():
                if self._server is not None and not self._server.alive:
                    raise RuntimeError(f"API_Central's server stopped: {self._server.failure or 'unknown reason'}")
        return None
