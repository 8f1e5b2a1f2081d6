"""EV_W, the weather office (issue #12): its actor system, its embedding API and its command.

Supervision tree (one_for_one)::

    EV_W
    ├─ weather   WeatherActor: the poll, the menu's commands, the calls (on worker threads)
    └─ console   ConsoleReader: typed lines → weather (EV_W without --no-console)

Every ``--interval`` seconds EV_W asks Central (API_Central, over HTTPS) which
locations are watched, reads each one's temperature from the provider and
posts it to ``POST /api/weather/alerts``; at or below ``--freeze-at`` that is an
alert, and Central puts the location's CPs out of service (see
:mod:`actors.weather`). The watched list lives in Central; EV_W caches it (a
:class:`~actors.weather.WatchCache` owned by this system, so it survives a
restart of the actor), so readings go on while Central cannot be reached.

What it needs:

* Central's API: ``--central-url`` and the certificate to trust,
  ``--central-ca`` (Central's self-signed ``api-cert.pem``; empty: the
  system's CAs); the operator token from ``--api-token-file`` or the
  environment variable ``EV_API_TOKEN`` (never an argument: argv is visible
  to every user of the host);
* a provider: ``--provider openweather`` (key from ``--openweather-key-file``
  or ``OPENWEATHER_API_KEY``; ``--openweather-url`` for a test server) or
  ``--provider file --weather-file FILE`` (offline; see
  :class:`~transport.weather_providers.FileProvider` for the format).

The menu: ``add CITY``, ``remove CITY``, ``list``, ``help``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from actors.console import ConsoleReader
from actors.operations import OperatorResult
from actors.runtime import Directory
from actors.weather import CentralPort, CentralUnreachable, WatchCache, WeatherActor, WeatherOptions
from supervisors.central_system import API_CERT_FILE, API_PORT, API_TOKEN_ENV
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, pick, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport.api_client import ApiError, ApiRefused, CentralApiClient
from transport.weather_providers import (
    KEY_ENV,
    OPENWEATHER_URL,
    FileProvider,
    OpenWeatherProvider,
    Provider,
    ProviderError,
    check_location,
    load_api_key,
)

log = logging.getLogger("evcharging.weather")

__all__ = ["WeatherSystemConfig", "start_weather", "make_provider", "make_central", "load_api_token",
           "build_parser", "config_from_args", "check_config", "main", "TOKEN_ENV", "watch_list"]

TOKEN_ENV: Final = API_TOKEN_ENV  #: Central's operator token itself, when no --api-token-file is given
TOKEN_MIN_LEN: Final = 16


@dataclass(frozen=True, slots=True)
class WeatherSystemConfig:
    """Everything EV_W needs; each field but ``name`` is a flag (env twin EV_<FLAG>).

    The poll's timings take their defaults from :class:`~actors.weather.WeatherOptions`.
    """

    central_url: str = setting(f"https://127.0.0.1:{API_PORT}", help="Central's API (API_Central), https://HOST:PORT")
    central_ca: str = setting("", help="certificate (PEM) to trust for Central's API: Central's self-signed one "
                                       f"({API_CERT_FILE} next to its database) or its CA; empty: the system's CAs")
    api_token_file: str = setting("", help=f"file holding Central's operator token (0600); without it, env "
                                           f"{TOKEN_ENV}")
    provider: str = setting("openweather", choices=("openweather", "file"),
                            help="where temperatures come from: OpenWeather, or --weather-file (offline)")
    weather_file: str = setting("weather.txt", help="the file provider's file: one 'City: 12' or 'City: 5, 2, -1' "
                                                    "(a sequence, one value per poll; end with '...' to repeat) "
                                                    "per line, # comments; re-read at every poll")
    openweather_url: str = setting(OPENWEATHER_URL, help="OpenWeather's current-weather endpoint")
    openweather_key_file: str = setting("", help=f"file holding the OpenWeather API key; without it, env {KEY_ENV}")
    interval: float = inherit(WeatherOptions, "interval", help="seconds between two polls of every location")
    freeze_at: float = inherit(WeatherOptions, "freeze_at",
                               help="°C: a reading at or below it is an alert (the location's CPs go out of service)")
    workers: int = inherit(WeatherOptions, "workers",
                           help="threads calling the provider and Central (locations read at the same time)")
    provider_timeout: float = setting(3.0, help="seconds one provider call may take, all of it")
    central_timeout: float = setting(3.0, help="seconds one call to Central's API may take")
    watch: str = setting("", help="locations to watch from the start, separated by ';' (added at Central, which "
                                  "keeps the list; polled meanwhile)")
    name: str = internal("EV_W")

    @property
    def weather_options(self) -> WeatherOptions:
        return pick(WeatherOptions, self)


def watch_list(text: str) -> list[str]:
    """The locations of ``--watch`` (';'-separated; a city name may contain commas)."""
    return [part.strip() for part in text.split(";") if part.strip()]


# --- what the system is made of -------------------------------------------------------------------
def load_api_token(config: WeatherSystemConfig) -> str:
    """Central's operator token: ``--api-token-file``, else ``EV_API_TOKEN``. Raises ValueError (a
    sentence naming where it looked, never the token)."""
    if config.api_token_file:
        path = Path(config.api_token_file)
        try:
            with open(path, "rb") as f:
                raw = f.read(4097)
        except OSError as exc:
            raise ValueError(f"cannot read the API token file {path}: {exc.strerror or exc}") from None
        token, source = raw.decode("utf-8", errors="replace").strip(), f"the API token file {path}"
        try:
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("The API token file %s can be read by other users: chmod 600 it", path)
        except OSError:
            pass
    else:
        token, source = os.environ.get(TOKEN_ENV, "").strip(), f"the environment variable {TOKEN_ENV}"
        if not token:
            raise ValueError(f"no operator token for Central's API: give --api-token-file FILE or set {TOKEN_ENV}")
    if len(token) < TOKEN_MIN_LEN or len(token) > 4096 or any(not 33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"the operator token in {source} is not a token (printable ASCII without spaces, "
                         f"at least {TOKEN_MIN_LEN} characters)")
    return token


def make_provider(config: WeatherSystemConfig) -> Provider:
    """The provider the config names. Raises ProviderError (a sentence)."""
    if config.provider == "file":
        return FileProvider(config.weather_file)
    key = load_api_key(config.openweather_key_file)
    return OpenWeatherProvider(key, config.openweather_url, timeout=config.provider_timeout)


class ApiCentral:
    """:class:`~actors.weather.CentralPort` over :class:`~transport.api_client.CentralApiClient`.

    Central's answer to a command, a refusal of that command included (404, 409, 422), is an
    :class:`OperatorResult`. Anything that means Central cannot be used right now is
    :class:`CentralUnreachable`: no connection or a timeout, an answer that is not Central's
    JSON, a refused token (401, 403) or a rate limit (429). After a 429, no call is made before
    its ``Retry-After`` has passed: hammering would only prolong the lock-out.
    """

    def __init__(self, client: CentralApiClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._paused_until = 0.0  # monotonic; after a 429

    def __repr__(self) -> str:  # never the token
        return f"ApiCentral({self._client!r})"

    def weather_locations(self) -> list[str]:
        try:
            return [str(name) for name in self._call(self._client.weather_locations)]
        except ApiRefused as exc:
            raise CentralUnreachable(f"Central refused to list the watched locations: {exc}") from None
        except (ValueError, TypeError):
            raise CentralUnreachable("Central's API answered the watched locations with something that is not "
                                     "a list") from None

    def watch_location(self, location: str) -> OperatorResult:
        return self._command(self._client.watch_location, location)

    def unwatch_location(self, location: str) -> OperatorResult:
        return self._command(self._client.unwatch_location, location)

    def post_weather(self, location: str, temperature_c: float | None, alert: bool,
                     error: str | None) -> OperatorResult:
        return self._command(self._client.weather_alert, location, temperature_c, alert, error)

    def _command(self, call: Callable[..., dict[str, Any]], *args: Any) -> OperatorResult:
        try:
            return _as_result(self._call(call, *args), "ok")
        except ApiRefused as exc:
            fallback = _STATUS_OF.get(exc.status or 0, "refused")
            return _as_result(exc.answer, fallback, str(exc))
        except (ValueError, TypeError):
            raise CentralUnreachable("Central's API answered with something that is not its JSON") from None

    def _call(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``; an ApiRefused that is Central's answer goes up as it is, the rest
        becomes :class:`CentralUnreachable`."""
        with self._lock:
            wait = self._paused_until - time.monotonic()
        if wait > 0:
            raise CentralUnreachable(f"Central asked EV_W to wait (429): the next call is in {math.ceil(wait)} s")
        try:
            return call(*args)
        except ApiRefused as exc:
            if exc.status in (401, 403):
                raise CentralUnreachable(f"Central refused EV_W's operator token ({exc.status}): check "
                                         f"--api-token-file or {TOKEN_ENV}") from None
            if exc.status == 429:
                pause = min(max(exc.retry_after or 5.0, 1.0), 600.0)
                with self._lock:
                    self._paused_until = time.monotonic() + pause
                raise CentralUnreachable(f"Central asked EV_W to wait (429): {exc}") from None
            raise
        except ApiError as exc:
            raise CentralUnreachable(str(exc)) from None


#: An HTTP refusal without Central's result body, as a result status (401, 413, 429...: "refused").
_STATUS_OF: Final = {404: "not_found", 409: "conflict", 422: "invalid", 503: "unavailable"}


def _as_result(answer: Any, fallback: str, text: str = "") -> OperatorResult:
    """Central's ``{"status", "detail", "cp_ids"}`` as an :class:`OperatorResult`."""
    if not isinstance(answer, dict):
        return OperatorResult(fallback, text or "Central gave no detail")
    status = answer.get("status")
    detail = answer.get("detail")
    ids = answer.get("cp_ids")
    return OperatorResult(status if isinstance(status, str) and status else fallback,
                          detail if isinstance(detail, str) and detail else text,
                          tuple(str(i) for i in ids) if isinstance(ids, list) else ())


def make_central(config: WeatherSystemConfig, token: str | None = None) -> CentralPort:
    """EV_W's port to Central's API (``token``: given, or :func:`load_api_token`)."""
    if token is None:
        token = load_api_token(config)
    client = CentralApiClient(config.central_url, token, config.central_ca or None, timeout=config.central_timeout)
    return ApiCentral(client)


def start_weather(config: WeatherSystemConfig = WeatherSystemConfig(), *, console: bool = False,
                  provider: Provider | None = None, central: CentralPort | None = None) -> RunningSystem:
    """Start EV_W in this process; ``provider`` and ``central`` default to what the config names.

    Raises ProviderError or ValueError (a sentence) for a provider or token it cannot set up."""
    problem = check_config(config)
    if problem:
        raise ValueError(problem)
    provider = provider if provider is not None else make_provider(config)
    central = central if central is not None else make_central(config)
    directory = Directory()
    cache = WatchCache(watch_list(config.watch))  # the system's: it outlives a restart of the actor
    children = [ChildSpec("weather", WeatherActor, (provider, central),
                          {"options": config.weather_options, "cache": cache,
                           "central_name": f"Central ({config.central_url})"})]
    if console:
        children.append(ChildSpec("console", ConsoleReader, ("weather", directory)))
    return start_system(config.name, children, directory=directory)


# --- the command -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """EV_W's parser: one argument per field of :class:`WeatherSystemConfig`, then the process's."""
    p = parser_for(WeatherSystemConfig, "EV_W",
                   "The weather office: every few seconds it reads the temperature of each location Central "
                   "watches and tells Central, which takes a location's CPs out of service at or below "
                   f"--freeze-at and back when it is warmer. Type add CITY, remove CITY, list or help. The "
                   f"operator token comes from --api-token-file or {TOKEN_ENV}, never from the command line.")
    add_process_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> WeatherSystemConfig:
    return from_args(WeatherSystemConfig, args)


def check_config(config: WeatherSystemConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    for name in ("interval", "provider_timeout", "central_timeout"):
        if not getattr(config, name) > 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    if not -100 <= config.freeze_at <= 70:
        return "--freeze-at must be a temperature between -100 and 70 °C"
    if not 1 <= config.workers <= 64:
        return "--workers must be between 1 and 64"
    if not config.central_url.startswith(("https://", "http://")):
        return "--central-url must be an https:// (or http://) URL"
    for location in watch_list(config.watch):
        why = check_location(location)
        if why:
            return f"--watch {location[:70]!r}: {why}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    problem = check_config(config)
    if problem:
        parser.error(problem)
    setup_logging("EV_W", "", log_file=args.log_file, level=args.log_level)
    try:
        provider = make_provider(config)
        central = make_central(config)
    except (ProviderError, ValueError, OSError) as exc:
        log.error("Cannot start EV_W: %s", exc)
        return 2
    console = not args.no_console

    def started(_system: RunningSystem) -> str:
        menu = " Type help for the commands." if console else ""
        return f"EV_W started: {provider.description} → Central at {config.central_url}.{menu}"

    return run_until_signal(lambda: start_weather(config, console=console, provider=provider, central=central),
                            RunningSystem.stop, "weather office", started, log)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
