"""A small client of API_Central (docs/api.md) with the standard library only: EV_W, the tests, the bench.

Like :class:`~transport.registry_api.RegistryClient`: the certificate is
always verified (``ca_path``: the file to trust, e.g. Central's self-signed
``api-cert.pem``; None: the system's CAs), proxies from the environment are
ignored (the token goes to Central and nowhere else), the token is never in
``repr`` nor in an error, and every failure is an :class:`ApiError` whose text
is a sentence: Central's own ``detail`` when it answered, ours when it could
not be reached.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transport.http_common import read_refusal

__all__ = ["CentralApiClient", "ApiError", "ApiRefused", "ServerEvent"]


class ApiError(Exception):
    """API_Central could not be reached (``status`` None), or refused (:class:`ApiRefused`);
    ``str(exc)`` is Central's sentence or ours."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 answer: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.answer = answer


class ApiRefused(ApiError):
    """API_Central answered, with an error: ``status`` is the HTTP status, ``answer`` its JSON body
    (for a command, Central's ``{"status", "detail", "cp_ids"}``), ``str(exc)`` its sentence."""


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One event of ``GET /api/events``: its ``id``, its name and its JSON ``data``
    (a ``: keepalive`` comment is ``ServerEvent(None, "comment", "keepalive")`` when asked for)."""

    id: int | None
    event: str
    data: Any


class CentralApiClient:
    """API_Central over HTTPS (or HTTP for ``http://`` URLs); see the module docstring."""

    def __init__(self, url: str, token: str, ca_path: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https:"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_path)))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # never the token
        return f"CentralApiClient({self.url!r})"

    # --- reads --------------------------------------------------------------------------------
    def health(self) -> bool:
        return bool(self.call("GET", "/health", auth=False).get("status") == "ok")

    def cps(self, *, state: str | None = None, location: str | None = None, q: str | None = None) -> list[Any]:
        return list(self.call("GET", "/api/cps" + _query(state=state, location=location, q=q)))

    def cp(self, cp_id: str) -> dict[str, Any]:
        return dict(self.call("GET", "/api/cps/" + _seg(cp_id)))

    def sessions(self) -> list[Any]:
        return list(self.call("GET", "/api/sessions"))

    def requests(self) -> list[Any]:
        return list(self.call("GET", "/api/requests"))

    def tickets(self, *, driver_id: str | None = None, cp_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None) -> list[Any]:
        query = _query(driver_id=driver_id, cp_id=cp_id, since=since, until=until, limit=limit)
        return list(self.call("GET", "/api/tickets" + query))

    def drivers(self) -> list[Any]:
        return list(self.call("GET", "/api/drivers"))

    def messages(self) -> list[Any]:
        return list(self.call("GET", "/api/messages"))

    def weather(self) -> list[Any]:
        return list(self.call("GET", "/api/weather"))

    def weather_locations(self) -> list[str]:
        return [str(x) for x in self.call("GET", "/api/weather/locations")]

    def audit(self, *, limit: int | None = None, event: str | None = None) -> list[Any]:
        return list(self.call("GET", "/api/audit" + _query(limit=limit, event=event)))

    # --- commands (each returns Central's answer: {"status", "detail", "cp_ids"}) -------------------
    def stop(self, cp_id: str | None = None) -> dict[str, Any]:
        return dict(self.call("POST", "/api/cps/" + (_seg(cp_id) + "/stop" if cp_id else "stop")))

    def resume(self, cp_id: str | None = None) -> dict[str, Any]:
        return dict(self.call("POST", "/api/cps/" + (_seg(cp_id) + "/resume" if cp_id else "resume")))

    def revoke(self, cp_id: str, reason: str = "") -> dict[str, Any]:
        return dict(self.call("POST", f"/api/cps/{_seg(cp_id)}/revoke", {"reason": reason}))

    def weather_alert(self, location: str, temperature_c: float | None, alert: bool,
                      error: str | None = None) -> dict[str, Any]:
        """EV_W's reading of ``location`` (sent every poll; only a change of ``alert`` acts)."""
        body = {"location": location, "temperature_c": temperature_c, "alert": alert, "error": error}
        return dict(self.call("POST", "/api/weather/alerts", body))

    def watch_location(self, location: str) -> dict[str, Any]:
        return dict(self.call("POST", "/api/weather/locations", {"location": location}))

    def unwatch_location(self, location: str) -> dict[str, Any]:
        return dict(self.call("DELETE", "/api/weather/locations/" + _seg(location)))

    # --- the event stream ----------------------------------------------------------------------
    def events(self, *, timeout: float | None = None, comments: bool = False) -> Iterator[ServerEvent]:
        """``GET /api/events`` as it comes: a snapshot first, then the changes. ``timeout``: seconds
        the stream may stay silent (keepalives count) before :class:`ApiError`. Close the iterator
        (``.close()``, or leave a ``for`` loop) to hang up."""
        request = self._request("GET", "/api/events", None, auth=True, accept="text/event-stream")
        answer = self._open(request, timeout if timeout is not None else self.timeout)
        with answer:
            ident: int | None = None
            name, data = "message", list[str]()
            try:
                for raw in answer:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if not line:
                        if data:
                            yield ServerEvent(ident, name, json.loads("\n".join(data)))
                        name, data = "message", []
                        continue
                    if line.startswith(":"):
                        if comments:
                            yield ServerEvent(None, "comment", line[1:].strip())
                        continue
                    key, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if key == "id":
                        ident = int(value) if value.isdigit() else None
                    elif key == "event":
                        name = value
                    elif key == "data":
                        data.append(value)
            except OSError as exc:  # a timeout or a reset while reading
                raise ApiError(f"the event stream of {self.url} broke off: {exc}") from exc

    # --- the plumbing ----------------------------------------------------------------------------
    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        """One request; its JSON answer (None when empty); :class:`ApiRefused` when Central answers
        with an error, :class:`ApiError` when it cannot be reached."""
        with self._open(self._request(method, path, body, auth=auth), self.timeout) as answer:
            try:
                raw = answer.read()
            except OSError as exc:
                raise ApiError(f"cannot reach API_Central at {self.url}: {exc}") from exc
        return json.loads(raw) if raw else None

    def _request(self, method: str, path: str, body: Any, *, auth: bool,
                 accept: str = "application/json") -> urllib.request.Request:
        headers = {"Accept": accept}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.url + path, data=data, method=method, headers=headers)

    def _open(self, request: urllib.request.Request, timeout: float) -> Any:
        try:
            return self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise _refusal(exc) from None
        except urllib.error.URLError as exc:
            raise ApiError(f"cannot reach API_Central at {self.url}: {exc.reason}") from exc
        except OSError as exc:  # a timeout or a reset
            raise ApiError(f"cannot reach API_Central at {self.url}: {exc}") from exc


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _query(**params: Any) -> str:
    given = {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in params.items()
             if v is not None}
    return "?" + urllib.parse.urlencode(given) if given else ""


def _refusal(exc: urllib.error.HTTPError) -> ApiRefused:
    message, data, retry_after = read_refusal(exc, f"API_Central answered {exc.code} {exc.reason}")
    return ApiRefused(message, exc.code, retry_after, data)
