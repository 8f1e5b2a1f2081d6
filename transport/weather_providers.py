"""Where EV_W gets temperatures: OpenWeather (the real service) or a text file (offline, the demo).

A provider answers :meth:`Provider.read` with a :class:`Reading` for one
location, in bounded time, and never raises for anything the network or the
file does: a refusal, a timeout, garbage or an absurd value becomes the
reading's ``error`` (one sentence for a person), with no temperature. EV_W
then reports the error to Central and changes nothing.

* :class:`OpenWeatherProvider` calls OpenWeather's current-weather endpoint
  (``GET {base}?q=CITY&appid=KEY&units=metric``) with the standard library.
  The base URL is a setting, so tests point it at a local fake server. The
  API key travels only in that query string: it is never logged and never
  part of an error sentence. Every call has one deadline for all of it
  (connect, TLS, headers, body): a watchdog shuts the socket when it
  passes, so a server that drips a byte at a time cannot hold a poll. The
  body is bounded, and ``main.temp`` must be a finite number within
  :data:`TEMPERATURE_BOUNDS`. 429 (rate limit) makes it wait ``Retry-After``
  (bounded) before calling again, instead of hammering a quota.
* :class:`FileProvider` re-reads a text file at each read, one line per city:
  ``Madrid: 12`` or a scripted sequence ``Madrid: 5, 2, -1, -3, 4`` that
  advances one value per read of that city (a poll reads each city once) and
  then holds its last value; ending it with ``...`` (``Oslo: 1, -2, ...``)
  repeats it instead. ``#`` starts a comment. Editing a city's line restarts
  its sequence. Garbled lines are logged once (line number and why) and make
  that city's reading an error; they never stop the other cities.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

log = logging.getLogger("evcharging.weather")

__all__ = ["Reading", "Provider", "OpenWeatherProvider", "FileProvider", "ProviderError", "load_api_key",
           "check_location", "OPENWEATHER_URL", "KEY_ENV", "TEMPERATURE_BOUNDS", "MAX_BODY", "MAX_FILE"]

OPENWEATHER_URL: Final = "https://api.openweathermap.org/data/2.5/weather"
KEY_ENV: Final = "OPENWEATHER_API_KEY"  #: the API key itself, when no key file is given
TEMPERATURE_BOUNDS: Final = (-100.0, 70.0)  #: °C; Earth's records are -89.2 and 56.7: outside is a broken answer
MAX_BODY: Final = 64 * 1024  #: bytes of an OpenWeather answer (a real one is under 1 KiB)
MAX_FILE: Final = 64 * 1024  #: bytes of a weather file
MAX_LINE: Final = 1024  #: characters of one line of a weather file
MAX_VALUES: Final = 1000  #: values of one scripted sequence
MAX_LOCATION: Final = 64  #: characters of a location's name (Central keeps at most as many)
MAX_RETRY_AFTER: Final = 3600.0  #: the longest 429 pause honoured (s)
DEFAULT_RETRY_AFTER: Final = 60.0  #: a 429 without a usable Retry-After


class ProviderError(ValueError):
    """A provider cannot be set up (no key, a bad URL, an unreadable key file): a sentence."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One location's temperature (°C), or why there is none (``error``, a sentence)."""

    location: str
    temperature_c: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.temperature_c is not None


class Provider(Protocol):
    """A source of temperatures. ``read`` is called from worker threads, one location at a time
    (several at once for different locations), and returns within its timeout."""

    @property
    def description(self) -> str:
        """What it reads, for a log line (never a secret)."""
        ...

    def read(self, location: str) -> Reading:
        ...


def check_location(text: str) -> str | None:
    """A sentence saying why ``text`` is not a usable location name, or None.

    Printable, 1 to :data:`MAX_LOCATION` characters, no control characters: it ends up
    in a URL, in Central's database, on a web page and in log lines."""
    if not text or not text.strip():
        return "a location needs a name"
    if len(text) > MAX_LOCATION:
        return f"a location's name has at most {MAX_LOCATION} characters"
    if any(not ch.isprintable() for ch in text):
        return "a location's name must not contain control characters"
    return None


def _in_bounds(value: float) -> bool:
    return math.isfinite(value) and TEMPERATURE_BOUNDS[0] <= value <= TEMPERATURE_BOUNDS[1]


def _bounds_text() -> str:
    return f"{TEMPERATURE_BOUNDS[0]:g} to {TEMPERATURE_BOUNDS[1]:g} °C"


# --- OpenWeather ---------------------------------------------------------------------------------
def load_api_key(key_file: str = "", env: str = KEY_ENV) -> str:
    """The OpenWeather API key: the file's first line, else the environment variable ``env``.

    Raises :class:`ProviderError` (a sentence naming where it looked, never the key)."""
    if key_file:
        try:
            with open(key_file, "rb") as f:
                raw = f.read(4097)
        except OSError as exc:
            raise ProviderError(f"cannot read the OpenWeather key file {key_file}: {exc.strerror or exc}") from None
        if len(raw) > 4096:
            raise ProviderError(f"the OpenWeather key file {key_file} is too large to hold a key")
        text = raw.decode("utf-8", errors="replace").strip().splitlines()
        key, source = (text[0].strip() if text else ""), f"the key file {key_file}"
        try:
            if os.stat(key_file).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("The OpenWeather key file %s can be read by other users: chmod 600 it", key_file)
        except OSError:
            pass
    else:
        key, source = os.environ.get(env, "").strip(), f"the environment variable {env}"
    if not key:
        raise ProviderError(f"no OpenWeather API key: give --openweather-key-file FILE or set {env} "
                            "(or use --provider file for offline readings)")
    if len(key) > 128 or any(not 33 <= ord(ch) <= 126 for ch in key):
        raise ProviderError(f"the OpenWeather API key in {source} is not a key (printable ASCII without spaces, "
                            "at most 128 characters)")
    return key


class OpenWeatherProvider:
    """OpenWeather's current weather, by city name (see the module docstring).

    ``ca_file``: a certificate to trust instead of the system's (a test's or a proxy's).
    """

    def __init__(self, api_key: str, base_url: str = OPENWEATHER_URL, *, timeout: float = 3.0,
                 max_body: int = MAX_BODY, ca_file: str | None = None) -> None:
        if not api_key:
            raise ProviderError("no OpenWeather API key")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProviderError(f"the OpenWeather URL {base_url!r} is not an http(s) URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ProviderError("the OpenWeather URL must not carry a query, a fragment or credentials "
                                "(the key comes from --openweather-key-file or the environment)")
        if timeout <= 0:
            raise ProviderError("the provider's timeout must be greater than 0")
        try:
            port = parts.port
        except ValueError:
            raise ProviderError(f"the OpenWeather URL {base_url!r} has a bad port") from None
        self._key = api_key
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._https else 80)
        self._path = parts.path or "/"
        self._shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self.timeout = timeout
        self.max_body = max_body
        self._context = ssl.create_default_context(cafile=ca_file) if self._https else None
        self._lock = threading.Lock()
        self._paused_until = 0.0  # after a 429: no call before this (monotonic)
        if not self._https and not _is_loopback(self._host):
            log.warning("OpenWeather at %s over plain HTTP: the API key travels in clear text", self._shown)

    def __repr__(self) -> str:  # never the key
        return f"OpenWeatherProvider({self._shown!r})"

    @property
    def description(self) -> str:
        return f"OpenWeather at {self._shown}"

    def read(self, location: str) -> Reading:
        problem = check_location(location)
        if problem:
            return Reading(location, None, problem)
        with self._lock:
            wait = self._paused_until - time.monotonic()
        if wait > 0:
            return Reading(location, None, f"OpenWeather asked us to slow down (429): the next call is in "
                                           f"{math.ceil(wait)} s")
        try:
            status, headers, body = self._get(location)
        except TimeoutError:
            return Reading(location, None, f"OpenWeather did not answer within {self.timeout:g} s")
        except _TooLarge:
            return Reading(location, None, f"OpenWeather's answer was larger than {self.max_body} bytes: ignored")
        except ssl.SSLCertVerificationError as exc:
            return Reading(location, None, f"cannot verify OpenWeather's certificate at {self._host}: "
                                           f"{exc.verify_message or exc.reason}")
        except (OSError, http.client.HTTPException) as exc:
            return Reading(location, None, f"cannot reach OpenWeather at {self._host}:{self._port}: "
                                           f"{_exc_text(exc)}")
        if status != 200:
            return Reading(location, None, self._refusal(location, status, headers))
        return _parse_answer(location, body)

    # --- the call --------------------------------------------------------------------------
    def _get(self, location: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        query = urllib.parse.urlencode({"q": location, "appid": self._key, "units": "metric"})
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        expired = threading.Event()
        held: list[socket.socket] = []  # the connected socket: http.client lets go of it once the answer began

        def abort() -> None:  # the one deadline for the whole call: shut the socket under a slow reader
            expired.set()
            for sock in (conn.sock, *held):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        watchdog = threading.Timer(self.timeout, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if conn.sock is not None:
                held.append(conn.sock)
            conn.request("GET", f"{self._path}?{query}", headers={"Accept": "application/json",
                                                                   "User-Agent": "EV_W (evcharging)"})
            answer = conn.getresponse()
            length = answer.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_body:
                raise _TooLarge()
            body = answer.read(self.max_body + 1)
            if expired.is_set():  # the watchdog cut the body short: what came is not the answer
                raise TimeoutError()
            if len(body) > self.max_body:
                raise _TooLarge()
            return answer.status, answer.headers, body
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError() from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def _refusal(self, location: str, status: int, headers: http.client.HTTPMessage) -> str:
        if status == 401:
            return "OpenWeather refused the API key (401): check --openweather-key-file or " + KEY_ENV
        if status == 404:
            return f"OpenWeather does not know the city {location!r} (404)"
        if status == 429:
            pause = _retry_after(headers.get("Retry-After"))
            with self._lock:
                self._paused_until = max(self._paused_until, time.monotonic() + pause)
            return f"OpenWeather's rate limit was reached (429): no calls for {pause:g} s"
        if status >= 500:
            return f"OpenWeather is failing ({status}); the next poll tries again"
        return f"OpenWeather answered {status} instead of a reading"


class _TooLarge(Exception):
    pass


def _retry_after(value: str | None) -> float:
    """Seconds of a ``Retry-After`` header (a number; an HTTP date is not worth parsing here), bounded."""
    try:
        seconds = float(value) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER
    if not math.isfinite(seconds) or seconds < 0:
        seconds = DEFAULT_RETRY_AFTER
    return min(seconds, MAX_RETRY_AFTER)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _parse_answer(location: str, body: bytes) -> Reading:
    """``main.temp`` of OpenWeather's JSON, checked (see the module docstring)."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Reading(location, None, "OpenWeather's answer is not valid JSON: ignored")
    main = data.get("main") if isinstance(data, dict) else None
    temp = main.get("temp") if isinstance(main, dict) else None
    if isinstance(temp, bool) or not isinstance(temp, (int, float)):
        return Reading(location, None, "OpenWeather's answer has no temperature (main.temp): ignored")
    value = float(temp)
    if not _in_bounds(value):
        return Reading(location, None, f"OpenWeather's temperature {value:g} °C is outside {_bounds_text()}: "
                                       "ignored")
    return Reading(location, value)


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the file ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Line:
    """One city's line of a weather file: its values, or why it is unusable."""

    number: int
    values: tuple[float, ...] = ()
    repeat: bool = False
    problem: str | None = None


def _key(location: str) -> str:
    """How a location is matched in the file: case and spacing do not matter."""
    return " ".join(location.split()).casefold()


class FileProvider:
    """Temperatures from a text file, re-read at every read (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._position: dict[str, tuple[tuple[float, ...], int]] = {}  # city -> (its sequence, next index)
        self._reported: set[tuple[int, str]] = set()  # (line, problem) already logged for this content
        self._content: bytes | None = None

    def __repr__(self) -> str:
        return f"FileProvider({str(self.path)!r})"

    @property
    def description(self) -> str:
        return f"the weather file {self.path}"

    def read(self, location: str) -> Reading:
        problem = check_location(location)
        if problem:
            return Reading(location, None, problem)
        with self._lock:
            lines, error = self._load()
            if error is not None:
                return Reading(location, None, error)
            key = _key(location)
            line = lines.get(key)
            if line is None:
                return Reading(location, None, f"no line for {location!r} in the weather file {self.path}")
            if line.problem is not None:
                return Reading(location, None, f"{line.problem} (line {line.number} of the weather file "
                                               f"{self.path})")
            seq, index = self._position.get(key, ((), 0))
            if seq != line.values:  # new, or edited: the sequence starts again
                seq, index = line.values, 0
            value = seq[index]
            if index + 1 < len(seq):
                index += 1
            elif line.repeat:
                index = 0
            self._position[key] = (seq, index)
            return Reading(location, value)

    def _load(self) -> tuple[dict[str, _Line], str | None]:
        """The file's lines by city, or a sentence saying why the file cannot be read."""
        try:
            raw = _read_bounded(self.path, MAX_FILE)
        except _TooLarge:
            return {}, f"the weather file is larger than {MAX_FILE} bytes, not read: {self.path}"
        except OSError as exc:
            return {}, f"cannot read the weather file ({exc.strerror or exc}): {self.path}"
        if raw != self._content:
            self._content = raw
            self._reported.clear()
        lines, problems = parse_weather_file(raw.decode("utf-8", errors="replace"))
        for number, problem in problems:
            if (number, problem) not in self._reported:
                self._reported.add((number, problem))
                log.warning("Weather file %s, line %d: %s (ignored)", self.path, number, problem)
        return lines, None


def _read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file; never blocks on a FIFO or a device."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise _TooLarge()
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_weather_file(text: str) -> tuple[dict[str, _Line], list[tuple[int, str]]]:
    """The cities of a weather file (by :func:`_key`), and the problems found: (line number, sentence).

    A line whose city can be told keeps its problem (that city's reading is then an error);
    a line without one is only reported."""
    lines: dict[str, _Line] = {}
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        if len(raw) > MAX_LINE:
            problems.append((number, f"longer than {MAX_LINE} characters"))
            continue
        city, sep, values = body.rpartition(":")
        city = city.strip()
        if not sep or not city:
            problems.append((number, "not 'City: temperature' or 'City: t1, t2, ...'"))
            continue
        bad_name = check_location(city) or ("the name is not valid text" if "\ufffd" in city else None)
        if bad_name:
            problems.append((number, bad_name))
            continue
        line = _parse_values(number, values)
        if line.problem is not None:
            problems.append((number, f"{city}: {line.problem}"))
        key = _key(city)
        if key in lines:
            problems.append((number, f"{city} already has line {lines[key].number}; this one is ignored"))
            continue
        lines[key] = line
    return lines, problems


def _parse_values(number: int, text: str) -> _Line:
    tokens = [t.strip() for t in text.split(",")]
    repeat = bool(tokens) and tokens[-1] == "..."
    if repeat:
        tokens = tokens[:-1]
    if not tokens or any(not t for t in tokens):
        return _Line(number, problem="no temperature (or an empty one between commas)")
    if len(tokens) > MAX_VALUES:
        return _Line(number, problem=f"more than {MAX_VALUES} values")
    values: list[float] = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            return _Line(number, problem=f"{token[:20]!r} is not a number")
        if not _in_bounds(value):
            return _Line(number, problem=f"{token[:20]} is not a temperature within {_bounds_text()}")
        values.append(value)
    return _Line(number, tuple(values), repeat)
