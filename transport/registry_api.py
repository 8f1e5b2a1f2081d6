"""EV_Registry's REST API (FastAPI) and the small stdlib client the launcher uses.

The API is an adapter: HTTP in, :class:`~persistence.trust.RegistryStore`
calls out. It issues a credential (an id and a random secret, shown once in
the answer) per CP and per driver, stores only its verifier (the slow hash,
:func:`transport.security.verifier`), deregisters, and lists. The registry
and Central share one SQLite file: the registry writes, Central reads, so
Central sees a registration or a deregistration without restarting.

Endpoints (``/docs`` has them with their schemas):

=========================  ======  =================================================
``POST /cps``              token   register (or re-register) a CP → 201 + its secret
``GET /cps``               token   registered CPs (never a secret or a verifier)
``GET /cps/{cp_id}``       token   one registered CP (404 when it is not)
``DELETE /cps/{cp_id}``    token   deregister → 204 (404 when it is not registered)
``POST /drivers`` …        token   the same for drivers
``GET /health``            public  ``{"status": "ok"}``
``/docs``, ``/openapi.json`` public the OpenAPI description
=========================  ======  =================================================

Re-registering an id issues a new secret: the old one stops working at once
(its verifier is replaced). Every protected route needs
``Authorization: Bearer <admin token>``: none → 401, a wrong one → 403 (audited,
counted per client address), 5 wrong ones within a minute → 429 with
``Retry-After`` for everything from that address. Bodies are validated at the
edge (ids by the protocol's rule, bounded location and price, unknown fields
refused) and bounded (:data:`MAX_BODY_BYTES`, else 413). Errors are JSON
``{"detail": "a sentence"}``; a 422 keeps FastAPI's ``detail`` list and adds
``message``, the same as one sentence.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from transport import protocol, security
from transport.http_common import MAX_BODY_BYTES, BodyLimit, TokenGate, error_list, read_refusal, sentence
from transport.http_common import client_address as _address

if TYPE_CHECKING:
    from persistence.trust import RegistryStore

__all__ = ["make_app", "RegistryClient", "RegistryError", "MAX_BODY_BYTES", "SECRET_NOTE"]

log = logging.getLogger("evcharging.registry")

#: Verifiers computed at once (Argon2id takes ~19 MiB and ~60 ms each); more requests wait.
HASH_SLOTS: Final = 4
SECRET_NOTE: Final = "shown once: store it now"
COMPONENT: Final = "registry"  # the audit trail's component

StoreFactory = Callable[[], "RegistryStore"]


# --- the API's models ---------------------------------------------------------------
def _checked_id(value: str, what: str) -> str:
    complaint = protocol.IdRule().complaint(value)
    if complaint:
        raise ValueError(f"{what} {complaint}")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CpIn(_Body):
    """A CP to register: its id, where it is, what a kWh costs there."""

    cp_id: str = Field(description="1-64 letters, digits, '.', '_' or '-'", examples=["MAD1"])
    location: str = Field(min_length=1, max_length=protocol.LOCATION_MAX_LEN, examples=["Madrid, Sol"])
    price_eur_kwh: float = Field(ge=0, le=protocol.MAX_PRICE_EUR_KWH, allow_inf_nan=False, examples=[0.35])

    @field_validator("cp_id")
    @classmethod
    def _cp_id(cls, value: str) -> str:
        return _checked_id(value, "the CP id")

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the location must not be blank")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("the location must not contain control characters (line breaks, tabs…)")
        return value


class DriverIn(_Body):
    """A driver to register."""

    driver_id: str = Field(description="1-64 letters, digits, '.', '_' or '-'", examples=["driver1"])

    @field_validator("driver_id")
    @classmethod
    def _driver_id(cls, value: str) -> str:
        return _checked_id(value, "the driver id")


class CredentialOut(BaseModel):
    """What a CP's or driver's credential file holds (``transport.security.write_credential``)."""

    kind: str
    id: str
    secret: str


class CpIssued(BaseModel):
    cp_id: str
    secret: str
    credential: CredentialOut
    note: str = SECRET_NOTE


class DriverIssued(BaseModel):
    driver_id: str
    secret: str
    credential: CredentialOut
    note: str = SECRET_NOTE


class CpOut(BaseModel):
    cp_id: str
    location: str
    price_eur_kwh: float
    registered_at: float = Field(description="when its current secret was issued (seconds since the epoch)")


class DriverOut(BaseModel):
    driver_id: str
    registered_at: float = Field(description="when its current secret was issued (seconds since the epoch)")


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    detail: str


_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no admin token"},
    403: {"model": Problem, "description": "a wrong admin token (audited)"},
    429: {"model": Problem, "description": "too many wrong tokens from this address; see Retry-After"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "not registered"}}


# --- the app ------------------------------------------------------------------------
def make_app(store_factory: StoreFactory, admin_token: str, *, limiter: security.FailureLimiter | None = None,
             max_body: int = MAX_BODY_BYTES, hash_slots: int = HASH_SLOTS) -> FastAPI:
    """The registry's ASGI app.

    ``store_factory()`` opens a :class:`~persistence.trust.RegistryStore` on the shared
    database; it is called once per request (in that request's thread) and closed at
    its end, so no SQLite connection is shared between threads. ``limiter`` counts wrong
    admin tokens per client address (default: 5 per minute).
    """
    def refused(address: str, what: str) -> None:
        method, _, path = what.partition(" ")
        with store_factory() as store:
            store.audit(COMPONENT, "anonymous", "admin_token_refused", what, address=address,
                        params={"method": method, "path": path})

    gate = TokenGate(admin_token, limiter or security.FailureLimiter(limit=5, window=60.0), what="admin token",
                     wrong_status=403, on_refused=refused, logger=log)
    hashing = threading.BoundedSemaphore(hash_slots)
    app = FastAPI(
        title="EV_Registry",
        version="1",
        description=(
            "Registers the charging points (CPs) and drivers of the EV charging network and issues their "
            "credentials. A credential's **secret is shown once**, in the answer to its registration; the "
            "registry stores only a slow hash of it. Re-registering an id issues a new secret and the old one "
            "stops working at once. Changes and lists need `Authorization: Bearer <admin token>`. The registry "
            "writes Central's own database file, so Central sees registrations and deregistrations without "
            "restarting."),
    )
    protected = [Depends(gate)]

    def verifier_of(kind: str, ident: str, secret: str) -> bytes:
        with hashing:
            return security.verifier(kind, ident, secret)

    def path_id(value: str, what: str) -> str:
        complaint = protocol.IdRule().complaint(value)
        if complaint:
            raise HTTPException(422, f"{what} {complaint}")
        return value

    # ---------------------------------------------------------------- CPs
    @app.post("/cps", status_code=201, response_model=CpIssued, dependencies=protected, responses=_REFUSALS,
              tags=["charging points"], summary="Register a CP (or issue it a new secret)")
    def register_cp(body: CpIn, request: Request, response: Response) -> CpIssued:
        """Register a CP with its location and price and return its credential. **The secret is shown only
        here**: store it now (the CP's credential file is the `credential` object). Registering an id that
        is already registered updates its location and price and issues a new secret: the old one stops
        working at once."""
        secret = security.new_secret()
        verifier = verifier_of("cp", body.cp_id, secret)
        with store_factory() as store:
            before = store.credential("cp", body.cp_id)
            store.register("cp", body.cp_id, verifier, location=body.location, price_eur_kwh=body.price_eur_kwh,
                           address=_address(request))
        renewed = before is not None and before.registered
        log.info("%s CP %s (%s, %.4g €/kWh) for %s", "Issued a new secret to" if renewed else "Registered",
                 body.cp_id, body.location, body.price_eur_kwh, _address(request))
        response.headers["Cache-Control"] = "no-store"
        return CpIssued(cp_id=body.cp_id, secret=secret, credential=CredentialOut(kind="cp", id=body.cp_id,
                                                                                   secret=secret))

    @app.get("/cps", response_model=list[CpOut], dependencies=protected, responses=_REFUSALS,
             tags=["charging points"], summary="The registered CPs")
    def list_cps() -> list[CpOut]:
        with store_factory() as store:
            rows = store.registered_cps()
        return [_cp_out(cred.id, cred.created_at, cp) for cred, cp in rows]

    @app.get("/cps/{cp_id}", response_model=CpOut, dependencies=protected, responses={**_REFUSALS, **_NOT_FOUND},
             tags=["charging points"], summary="One registered CP")
    def get_cp(cp_id: str) -> CpOut:
        path_id(cp_id, "the CP id")
        with store_factory() as store:
            row = next((r for r in store.registered_cps() if r[0].id == cp_id), None)
        if row is None:
            raise HTTPException(404, f"CP {cp_id} is not registered")
        return _cp_out(cp_id, row[0].created_at, row[1])

    @app.delete("/cps/{cp_id}", status_code=204, dependencies=protected, responses={**_REFUSALS, **_NOT_FOUND},
                tags=["charging points"], summary="Deregister a CP")
    def deregister_cp(cp_id: str, request: Request) -> Response:
        """Deregister a CP: its secret stops working; Central refuses its next login and takes it
        out of service."""
        path_id(cp_id, "the CP id")
        with store_factory() as store:
            done = store.deregister("cp", cp_id, address=_address(request))
        if not done:
            raise HTTPException(404, f"CP {cp_id} is not registered")
        log.info("Deregistered CP %s for %s", cp_id, _address(request))
        return Response(status_code=204)

    # ------------------------------------------------------------- drivers
    @app.post("/drivers", status_code=201, response_model=DriverIssued, dependencies=protected,
              responses=_REFUSALS, tags=["drivers"], summary="Register a driver (or issue it a new secret)")
    def register_driver(body: DriverIn, request: Request, response: Response) -> DriverIssued:
        """Register a driver and return its credential. **The secret is shown only here**: store it now.
        Registering an id that is already registered issues a new secret: the old one stops working."""
        secret = security.new_secret()
        verifier = verifier_of("driver", body.driver_id, secret)
        with store_factory() as store:
            store.register("driver", body.driver_id, verifier, address=_address(request))
        log.info("Registered driver %s for %s", body.driver_id, _address(request))
        response.headers["Cache-Control"] = "no-store"
        return DriverIssued(driver_id=body.driver_id, secret=secret,
                            credential=CredentialOut(kind="driver", id=body.driver_id, secret=secret))

    @app.get("/drivers", response_model=list[DriverOut], dependencies=protected, responses=_REFUSALS,
             tags=["drivers"], summary="The registered drivers")
    def list_drivers() -> list[DriverOut]:
        with store_factory() as store:
            creds = store.list_credentials("driver")
        return [DriverOut(driver_id=c.id, registered_at=c.created_at) for c in creds]

    @app.get("/drivers/{driver_id}", response_model=DriverOut, dependencies=protected,
             responses={**_REFUSALS, **_NOT_FOUND}, tags=["drivers"], summary="One registered driver")
    def get_driver(driver_id: str) -> DriverOut:
        path_id(driver_id, "the driver id")
        with store_factory() as store:
            cred = store.credential("driver", driver_id)
        if cred is None or not cred.registered:
            raise HTTPException(404, f"driver {driver_id} is not registered")
        return DriverOut(driver_id=cred.id, registered_at=cred.created_at)

    @app.delete("/drivers/{driver_id}", status_code=204, dependencies=protected,
                responses={**_REFUSALS, **_NOT_FOUND}, tags=["drivers"], summary="Deregister a driver")
    def deregister_driver(driver_id: str, request: Request) -> Response:
        path_id(driver_id, "the driver id")
        with store_factory() as store:
            done = store.deregister("driver", driver_id, address=_address(request))
        if not done:
            raise HTTPException(404, f"driver {driver_id} is not registered")
        log.info("Deregistered driver %s for %s", driver_id, _address(request))
        return Response(status_code=204)

    # -------------------------------------------------------------- public
    @app.get("/health", response_model=Health, tags=["service"], summary="Is the registry up (no token)")
    def health() -> Health:
        return Health(status="ok")

    # -------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        refused = await gate.refusal(request)  # no token, no word about the body
        if refused is not None:
            return refused
        errors = error_list(exc.errors())
        return JSONResponse({"detail": errors, "message": sentence(errors)}, status_code=422)

    @app.exception_handler(sqlite3.Error)
    async def database(request: Request, exc: sqlite3.Error) -> JSONResponse:
        log.error("The registry's database failed on %s %s: %s", request.method, request.url.path, exc,
                  exc_info=exc)
        return JSONResponse({"detail": f"the registry's database is unavailable ({exc}); try again"},
                            status_code=503)

    app.add_middleware(BodyLimit, limit=max_body)
    return app


def _cp_out(cp_id: str, registered_at: float, cp: Any) -> CpOut:
    if cp is None:  # not expected: register() writes both rows in one transaction
        return CpOut(cp_id=cp_id, location="unknown", price_eur_kwh=0.0, registered_at=registered_at)
    return CpOut(cp_id=cp_id, location=cp.location, price_eur_kwh=cp.price_eur_kwh, registered_at=registered_at)


# --- the client ---------------------------------------------------------------------
class RegistryError(Exception):
    """The registry refused (``status`` is the HTTP status) or could not be reached (``status`` None);
    ``str(exc)`` is the server's sentence or ours."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RegistryClient:
    """EV_Registry over HTTPS with the standard library only (the launcher provisions with it).

    ``ca_path`` is the certificate to trust (the registry's self-signed one, or its CA);
    None trusts the system's CAs. Verification is always on. Proxies from the
    environment are ignored: the admin token goes to the registry and nowhere else.
    """

    def __init__(self, url: str, token: str, ca_path: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout
        context = ssl.create_default_context(cafile=ca_path)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   urllib.request.HTTPSHandler(context=context))

    def __repr__(self) -> str:  # never the token
        return f"RegistryClient({self.url!r})"

    # the API
    def register_cp(self, cp_id: str, location: str, price_eur_kwh: float) -> str:
        """Register ``cp_id`` (or issue it a new secret); its secret."""
        answer = self._call("POST", "/cps", {"cp_id": cp_id, "location": location, "price_eur_kwh": price_eur_kwh})
        return str(answer["secret"])

    def register_driver(self, driver_id: str) -> str:
        """Register ``driver_id`` (or issue it a new secret); its secret."""
        return str(self._call("POST", "/drivers", {"driver_id": driver_id})["secret"])

    def deregister_cp(self, cp_id: str) -> None:
        self._call("DELETE", "/cps/" + urllib.parse.quote(cp_id, safe=""))

    def deregister_driver(self, driver_id: str) -> None:
        self._call("DELETE", "/drivers/" + urllib.parse.quote(driver_id, safe=""))

    def get_cp(self, cp_id: str) -> dict[str, Any]:
        return dict(self._call("GET", "/cps/" + urllib.parse.quote(cp_id, safe="")))

    def list_cps(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/cps"))

    def list_drivers(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/drivers"))

    def health(self) -> bool:
        return bool(self._call("GET", "/health", auth=False).get("status") == "ok")

    # the plumbing
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, auth: bool = True) -> Any:
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise _refusal(exc) from None
        except urllib.error.URLError as exc:
            raise RegistryError(f"cannot reach the registry at {self.url}: {exc.reason}") from exc
        except OSError as exc:  # a timeout or a reset while reading
            raise RegistryError(f"cannot reach the registry at {self.url}: {exc}") from exc
        return json.loads(raw) if raw else None


def _refusal(exc: urllib.error.HTTPError) -> RegistryError:
    message, _data, retry_after = read_refusal(exc, f"the registry answered {exc.code} {exc.reason}")
    return RegistryError(message, exc.code, retry_after)
