"""EV_W's weather office: every few seconds, each watched location's temperature, told to Central.

The :class:`WeatherActor` owns the poll and the menu; it never waits for the
network itself. Every call that can be slow (the weather provider, Central's
API) runs as a job on a small pool of worker threads, bounded by the
provider's and the API client's own timeouts, and each job *tells* its
outcome back to the actor as a message. So a slow provider or a Central
outage never stalls the menu, and a poll that has not finished when the next
one is due is not doubled: a location whose reading is still on its way is
skipped until it arrives.

One poll: ask Central which locations are watched (the list lives in
Central: the API, the panel and this menu all change it there); then, for
each, read the temperature and post ``{location, temperature_c, alert,
error}`` to Central, ``alert`` meaning at or below ``freeze_at``. Readings are
posted at every poll (Central acts only when ``alert`` changes), so a reading
lost to an outage is simply replaced by the next one. A provider failure is
posted as an ``error`` with the last alert state unchanged: no reading, no
change.

The watched list is cached in a :class:`WatchCache` that belongs to the
system, not to the actor: when Central cannot be reached the readings go on
for the cached locations (and are delivered once it is back), and a restart of
the actor keeps both the list and each location's alert state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.console import ConsoleLine
from actors.operations import OperatorResult
from actors.runtime import SupervisedActor, Supervision, Ticker
from transport.weather_providers import MAX_LOCATION, Provider, Reading, check_location

log = logging.getLogger("evcharging.weather")

__all__ = ["WeatherOptions", "WeatherActor", "WatchCache", "CentralPort", "CentralUnreachable", "Poll",
           "AddLocation", "RemoveLocation", "WeatherStatus", "LocationStatus", "WeatherSnapshot",
           "location_key", "HELP", "MAX_LOCATIONS"]

#: Locations EV_W polls at most (Central's list beyond that is ignored, with a warning).
MAX_LOCATIONS = 1000

HELP = (
    "Commands:\n"
    "  add CITY      watch CITY too (Central keeps the list; its CPs follow CITY's weather)\n"
    "  remove CITY   stop watching CITY (Central clears its alert)\n"
    "  list          the watched locations with their last reading\n"
    "  help          this text"
)


@dataclass(frozen=True, slots=True)
class WeatherOptions:
    """The weather actor's timings and rule."""

    interval: float = 4.0  # seconds between two polls
    freeze_at: float = 0.0  # °C: a reading at or below it is an alert
    workers: int = 4  # threads for provider and Central calls (readings of several locations at once)


#: Characters of a provider's error sent to Central (its API takes up to 300).
ERROR_MAX_LEN = 280


def _sentence(text: str) -> str:
    """An error fit to send: no control characters, at most :data:`ERROR_MAX_LEN` characters."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= ERROR_MAX_LEN else flat[:ERROR_MAX_LEN - 1] + "…"


def location_key(location: str) -> str:
    """How two spellings of a location are the same one: case and spacing do not matter."""
    return " ".join(location.split()).casefold()


class CentralUnreachable(Exception):
    """Central's API could not be reached (or did not answer in time); the text is a sentence."""


class CentralPort(Protocol):
    """What EV_W asks Central, over its HTTP API. Each call returns within the client's timeout:
    Central's answer (:class:`OperatorResult`, a refusal included), or :class:`CentralUnreachable`."""

    def weather_locations(self) -> list[str]:
        ...

    def watch_location(self, location: str) -> OperatorResult:
        ...

    def unwatch_location(self, location: str) -> OperatorResult:
        ...

    def post_weather(self, location: str, temperature_c: float | None, alert: bool,
                     error: str | None) -> OperatorResult:
        ...


class WatchCache:
    """The watched locations and each one's alert state; outlives a restart of the actor.

    ``pending`` are the locations given at start (``--watch``) that Central has not confirmed
    yet: they are polled meanwhile, and added at Central once it answers."""

    def __init__(self, initial: tuple[str, ...] | list[str] = ()) -> None:
        self.lock = threading.Lock()
        self.locations: dict[str, str] = {}  # key -> the name as Central spells it
        self.pending: dict[str, str] = {location_key(n): n.strip() for n in initial if n.strip()}
        self.alerts: dict[str, bool] = {}  # key -> the alert of the last reading
        self.acked: dict[str, bool] = {}  # key -> the alert state Central last accepted
        # key -> (watched, name, when): a change Central accepted moments ago. Central's list may
        # lag its answer by a panel refresh; until the grace passes, a list without it does not undo it.
        self.recent: dict[str, tuple[bool, str, float]] = {}

    def note_change(self, name: str, watched: bool) -> None:
        """Central accepted adding (``watched``) or removing ``name`` just now (call with the lock held)."""
        self.recent[location_key(name)] = (watched, name, time.monotonic())

    def settle(self, listed: dict[str, str], grace: float) -> dict[str, str]:
        """Central's list (key -> name) with the changes of the last ``grace`` seconds applied
        (call with the lock held)."""
        now = time.monotonic()
        out = dict(listed)
        for key, (watched, name, at) in list(self.recent.items()):
            if now - at > grace:
                del self.recent[key]
            elif watched:
                out.setdefault(key, name)
            else:
                out.pop(key, None)
        return out


# --- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Poll:
    """Time for a poll (the ticker's, or a nudge)."""


@dataclass(frozen=True, slots=True)
class AddLocation:
    """Watch one more location (through Central's API), as the menu's ``add``."""

    location: str


@dataclass(frozen=True, slots=True)
class RemoveLocation:
    """Stop watching a location (through Central's API), as the menu's ``remove``."""

    location: str


@dataclass(frozen=True, slots=True)
class WeatherStatus:
    """Ask: a :class:`WeatherSnapshot`."""


@dataclass(frozen=True, slots=True)
class LocationStatus:
    """One watched location as EV_W last saw it."""

    location: str
    temperature_c: float | None = None
    alert: bool = False
    error: str | None = None  # the provider's, for the last reading
    read_at: float | None = None  # wall clock of the last reading
    delivered: bool = False  # Central accepted the last reading
    central_text: str = ""  # Central's answer to the last reading (or why it did not get it)


@dataclass(frozen=True, slots=True)
class WeatherSnapshot:
    locations: tuple[LocationStatus, ...]
    central_reachable: bool | None  # None: not asked yet
    central_error: str | None
    polls: int  # polls whose list step is over
    readings: int  # readings taken (delivered or not)


@dataclass(frozen=True, slots=True)
class _Listed:
    locations: tuple[str, ...] | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Measured:
    location: str
    reading: Reading
    alert: bool
    answer: OperatorResult | None
    unreachable: str | None


@dataclass(frozen=True, slots=True)
class _Changed:
    location: str
    watch: bool
    answer: OperatorResult | None
    unreachable: str | None
    quiet: bool = False  # a --watch location added at start: no menu answer when Central cannot be reached


@dataclass(frozen=True, slots=True)
class _JobFailed:
    what: str
    location: str | None
    error: BaseException


@dataclass
class _Live:
    status: LocationStatus
    errors_logged: set[str] = field(default_factory=set)


class WeatherActor(SupervisedActor):
    """Polls the provider for each watched location and tells Central (see the module docstring)."""

    def __init__(self, provider: Provider, central: CentralPort, *, options: WeatherOptions = WeatherOptions(),
                 cache: WatchCache | None = None, central_name: str = "Central",
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.provider = provider
        self.central = central
        self.options = options
        self.cache = cache if cache is not None else WatchCache()
        self.central_name = central_name
        self._pool: ThreadPoolExecutor | None = None
        self._ticker: Ticker | None = None
        self._listing = False
        self._measuring: set[str] = set()
        self._changing: set[str] = set()
        self._removing: dict[str, str] = {}  # key -> name: a removal waiting for its reading in flight
        self._live: dict[str, _Live] = {}
        self._reachable: bool | None = None
        self._central_error: str | None = None
        self._polls = 0
        self._readings = 0
        self._grace = max(3 * options.interval, 5.0)  # see WatchCache.recent

    # --- life -----------------------------------------------------------------------------
    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.options.workers), thread_name_prefix="weather-io")
        self._ticker = Ticker(self.options.interval, self.actor_ref, Poll(), name="weather-poll")
        self.actor_ref.tell(Poll())  # the first poll now, not in one interval
        log.info("EV_W polling %s every %g s (alert at or below %g °C)", self.provider.description,
                 self.options.interval, self.options.freeze_at)

    def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # running calls end within their timeouts

    # --- messages ---------------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case Poll():
                self._on_poll()
            case _Listed():
                self._on_listed(message)
            case _Measured():
                self._on_measured(message)
            case _Changed():
                self._on_changed(message)
            case _JobFailed(what, location, error):
                self._on_job_failed(what, location, error)
            case ConsoleLine(text):
                self._on_line(text)
            case AddLocation(location):
                self._add(location)
            case RemoveLocation(location):
                self._remove(location)
            case WeatherStatus():
                return self._snapshot()
            case _:
                log.debug("weather: ignoring %s", type(message).__name__)
        return None

    # --- the poll ---------------------------------------------------------------------------
    def _on_poll(self) -> None:
        if self._listing:
            log.debug("weather: the previous poll is still asking Central; skipped one")
            return
        self._listing = True
        self._submit("ask Central for the watched locations", None, self._list_job)

    def _list_job(self) -> _Listed:
        try:
            return _Listed(tuple(self.central.weather_locations()), None)
        except CentralUnreachable as exc:
            return _Listed(None, str(exc))

    def _on_listed(self, msg: _Listed) -> None:
        self._listing = False
        self._polls += 1
        cache = self.cache
        if msg.locations is not None:
            self._central_up()
            names = [n for n in msg.locations if isinstance(n, str) and not check_location(n)]
            if len(names) > MAX_LOCATIONS:
                log.warning("Central watches %d locations; EV_W polls the first %d", len(names), MAX_LOCATIONS)
                names = names[:MAX_LOCATIONS]
            with cache.lock:
                fresh = cache.settle({location_key(n): n for n in names}, self._grace)
                for key in set(cache.locations) - set(fresh):
                    cache.alerts.pop(key, None)
                    cache.acked.pop(key, None)
                    self._live.pop(key, None)
                cache.locations = fresh
                confirm = [(k, n) for k, n in cache.pending.items() if k not in self._changing]
            for key, name in confirm:
                if key in fresh:
                    with cache.lock:
                        cache.pending.pop(key, None)
                else:
                    self._changing.add(key)
                    self._submit(f"ask {self.central_name} to watch {name}", name, self._change_job, name, True, True)
        else:
            self._central_down(msg.error or "no answer")
        for name in self._targets():
            self._measure(name)

    def _targets(self) -> list[str]:
        with self.cache.lock:
            merged = {**self.cache.pending, **self.cache.locations}
        return [n for k, n in merged.items() if k not in self._removing]

    def _measure(self, name: str) -> None:
        key = location_key(name)
        if key in self._measuring:
            log.debug("weather: %s's previous reading is still on its way; skipped", name)
            return
        self._measuring.add(key)
        with self.cache.lock:
            previous = self.cache.alerts.get(key, False)
        self._submit(f"read the weather of {name}", name, self._measure_job, name, previous)

    def _measure_job(self, name: str, previous: bool) -> _Measured:
        try:
            reading = self.provider.read(name)
        except Exception as exc:  # a provider must not raise; if one does, it is that reading's error
            log.debug("weather: the provider failed for %s", name, exc_info=exc)
            reading = Reading(name, None, f"the weather provider failed: {exc}")
        temp = reading.temperature_c
        ok = reading.error is None and temp is not None and math.isfinite(temp)
        alert = bool(temp is not None and temp <= self.options.freeze_at) if ok else previous
        error = None if ok else _sentence(reading.error or "no reading")
        try:
            answer = self.central.post_weather(name, temp if ok else None, alert, error)
            return _Measured(name, reading, alert, answer, None)
        except CentralUnreachable as exc:
            return _Measured(name, reading, alert, None, str(exc))

    def _on_measured(self, msg: _Measured) -> None:
        key = location_key(msg.location)
        self._measuring.discard(key)
        self._readings += 1
        if msg.unreachable is not None:
            self._central_down(msg.unreachable)
        else:
            self._central_up()
        with self.cache.lock:
            watched = key in self.cache.locations or key in self.cache.pending
            was_alert = self.cache.alerts.get(key)
            was_acked = self.cache.acked.get(key)
            if watched and msg.reading.ok:
                self.cache.alerts[key] = msg.alert
            if watched and msg.answer is not None and msg.answer.ok:
                self.cache.acked[key] = msg.alert
        if key in self._removing:
            self._start_removal(key, self._removing[key])
            return
        if not watched:  # removed while this reading was on its way
            return
        live = self._live.setdefault(key, _Live(LocationStatus(msg.location)))
        reading, answer = msg.reading, msg.answer
        delivered = answer is not None and answer.ok
        text = answer.text if answer is not None else f"not delivered: {msg.unreachable}"
        live.status = LocationStatus(msg.location, reading.temperature_c if reading.ok else None,
                                     msg.alert, reading.error, time.time(), delivered, text)
        self._log_reading(msg, live, was_alert, was_acked)

    def _log_reading(self, msg: _Measured, live: _Live, was_alert: bool | None, was_acked: bool | None) -> None:
        reading, answer, name = msg.reading, msg.answer, msg.location
        if reading.error is not None:
            if reading.error not in live.errors_logged:
                live.errors_logged.add(reading.error)
                log.warning("No reading for %s: %s (nothing changes; told %s)", name, reading.error,
                            self.central_name)
        elif live.errors_logged:
            live.errors_logged.clear()
            log.info("Readings for %s are back: %.1f °C", name, reading.temperature_c or 0.0)
        if reading.ok and msg.alert != bool(was_alert):
            if msg.alert:
                log.warning("%s: %.1f °C, at or below %g °C: weather alert (its CPs go out of service)", name,
                            reading.temperature_c or 0.0, self.options.freeze_at)
            elif was_alert is not None:
                log.info("%s: %.1f °C, above %g °C again: alert over (its CPs return to service)", name,
                         reading.temperature_c or 0.0, self.options.freeze_at)
        else:
            log.debug("%s: %s", name, reading.error or f"{reading.temperature_c:.1f} °C")
        if answer is not None and answer.ok and msg.alert != bool(was_acked) and reading.ok:
            log.info("%s: %s", self.central_name, answer.text)
        elif answer is not None and not answer.ok:
            key = "central:" + answer.status + answer.text
            if key not in live.errors_logged:
                live.errors_logged.add(key)
                log.warning("%s did not take %s's reading: %s", self.central_name, name, answer.text)

    # --- add and remove -------------------------------------------------------------------------
    def _add(self, location: str) -> None:
        name = location.strip()
        problem = check_location(name)
        if problem:
            log.warning("Cannot add %r: %s", name[:MAX_LOCATION], problem)
            return
        key = location_key(name)
        if key in self._changing:
            log.warning("%s is being changed already; wait for Central's answer", name)
            return
        self._changing.add(key)
        self._submit(f"ask {self.central_name} to watch {name}", name, self._change_job, name, True)

    def _remove(self, location: str) -> None:
        name = location.strip()
        problem = check_location(name)
        if problem:
            log.warning("Cannot remove %r: %s", name[:MAX_LOCATION], problem)
            return
        key = location_key(name)
        with self.cache.lock:
            name = self.cache.locations.get(key, self.cache.pending.get(key, name))
        if key in self._changing or key in self._removing:
            log.warning("%s is being changed already; wait for Central's answer", name)
            return
        self._removing[key] = name
        if key not in self._measuring:  # else: once its reading is in (Central must not hear it after)
            self._start_removal(key, name)

    def _start_removal(self, key: str, name: str) -> None:
        self._changing.add(key)
        self._submit(f"ask {self.central_name} to stop watching {name}", name, self._change_job, name, False)

    def _change_job(self, name: str, watch: bool, quiet: bool = False) -> _Changed:
        try:
            answer = self.central.watch_location(name) if watch else self.central.unwatch_location(name)
            return _Changed(name, watch, answer, None, quiet)
        except CentralUnreachable as exc:
            return _Changed(name, watch, None, str(exc), quiet)

    def _on_changed(self, msg: _Changed) -> None:
        key = location_key(msg.location)
        self._changing.discard(key)
        if not msg.watch:
            self._removing.pop(key, None)
        answer = msg.answer
        if answer is None:
            self._central_down(msg.unreachable or "no answer")
            if not msg.quiet:
                verb = "add" if msg.watch else "remove"
                log.warning("Cannot %s %s: %s; the watched list lives in %s, try again when it answers", verb,
                            msg.location, msg.unreachable, self.central_name)
            return
        self._central_up()
        gone = not msg.watch and answer.status in ("ok", "not_found")
        with self.cache.lock:
            if msg.watch and answer.ok:
                self.cache.locations[key] = msg.location
                self.cache.pending.pop(key, None)
                self.cache.note_change(msg.location, True)
            elif msg.watch and msg.quiet:
                self.cache.pending.pop(key, None)  # Central answered no: its list decides, stop polling it
            elif gone:
                self.cache.note_change(msg.location, False)
                self.cache.locations.pop(key, None)
                self.cache.pending.pop(key, None)
                self.cache.alerts.pop(key, None)
                self.cache.acked.pop(key, None)
                self._live.pop(key, None)
        if msg.watch and answer.ok:
            log.info("Watching %s: %s", msg.location, answer.text)
            self._measure(msg.location)  # its first reading now, not at the next poll
        elif gone:
            log.info("No longer watching %s: %s", msg.location, answer.text)
        else:
            verb = "watch" if msg.watch else "stop watching"
            log.warning("%s will not %s %s: %s", self.central_name, verb, msg.location, answer.text)

    # --- the menu ---------------------------------------------------------------------------------
    def _on_line(self, text: str) -> None:
        command, _, rest = text.strip().partition(" ")
        command, rest = command.lower(), rest.strip()
        if command in ("add", "watch") and rest:
            self._add(rest)
        elif command in ("remove", "rm", "unwatch") and rest:
            self._remove(rest)
        elif command in ("list", "ls", "status") and not rest:
            self._print_list()
        elif command in ("help", "?", "h"):
            log.info("%s", HELP)
        else:
            log.warning("Unknown command %r. %s", text[:80], HELP)

    def _print_list(self) -> None:
        snap = self._snapshot()
        if snap.central_reachable is False:
            log.warning("%s is unreachable (%s): these are the cached locations", self.central_name,
                        snap.central_error)
        if not snap.locations:
            log.info("No location is watched: add CITY")
            return
        lines = [f"{len(snap.locations)} watched location(s):"]
        now = time.time()
        for s in snap.locations:
            if s.read_at is None:
                what = "no reading yet"
            elif s.error:
                what = f"no reading: {s.error}"
            else:
                what = f"{s.temperature_c:.1f} °C" + (" ALERT (its CPs out of service)" if s.alert else "")
            age = f", {now - s.read_at:.0f} s ago" if s.read_at is not None else ""
            told = "" if s.delivered or s.read_at is None else f" [{s.central_text}]"
            lines.append(f"  {s.location}: {what}{age}{told}")
        log.info("%s", "\n".join(lines))

    def _snapshot(self) -> WeatherSnapshot:
        rows = []
        for name in self._targets():
            key = location_key(name)
            live = self._live.get(key)
            status = live.status if live is not None else LocationStatus(name)
            with self.cache.lock:
                alert = self.cache.alerts.get(key, status.alert)
            rows.append(LocationStatus(name, status.temperature_c, alert, status.error, status.read_at,
                                       status.delivered, status.central_text))
        return WeatherSnapshot(tuple(rows), self._reachable, self._central_error, self._polls, self._readings)

    # --- Central's reachability -------------------------------------------------------------------
    def _central_up(self) -> None:
        if self._reachable is False:
            log.info("%s answers again", self.central_name)
        self._reachable, self._central_error = True, None

    def _central_down(self, why: str) -> None:
        if self._reachable is not False:
            with self.cache.lock:
                n = len({**self.cache.pending, **self.cache.locations})
            log.warning("%s; readings go on for the %d cached location(s) and reach %s once it answers", why, n,
                        self.central_name)
        self._reachable, self._central_error = False, why

    # --- jobs ---------------------------------------------------------------------------------------
    def _submit(self, what: str, location: str | None, job: Callable[..., Any], *args: Any) -> None:
        """Run ``job(*args)`` on a worker; its result (a message) or its failure comes back to this actor."""
        ref = self.actor_ref
        pool = self._pool
        if pool is None:
            return

        def run() -> None:
            try:
                result = job(*args)
            except Exception as exc:
                result = _JobFailed(what, location, exc)
            try:
                ref.tell(result)
            except Exception:  # this actor stopped meanwhile: the outcome has nobody to go to
                pass

        try:
            pool.submit(run)
        except RuntimeError:  # shutting down
            pass

    def _on_job_failed(self, what: str, location: str | None, error: BaseException) -> None:
        """A job raised what it should have turned into an answer: a bug; say it, keep going."""
        log.error("Could not %s: %s", what, error, exc_info=error)
        if location is None:
            self._listing = False
            return
        key = location_key(location)
        self._measuring.discard(key)
        self._changing.discard(key)
        self._removing.pop(key, None)
