"""The web hub: Central's panel snapshots as a live event stream for API_Central.

Central tells every :class:`~actors.panel.PanelSnapshot` to the directory name
"web" (as well as "panel"); the :class:`WebHubActor` registered there hands it
to an :class:`EventHub`, which

* keeps the latest state as JSON-ready dicts (what ``GET /api/cps`` and the
  other live reads serve: no ask to Central per request);
* diffs it against the previous snapshot — the tiles that changed (compared as
  frozen dataclasses, so 1,000 CPs cost one pass of equality checks), the
  requests table, the new messages (by ``seq``), the locations whose weather
  changed — into a few events, each encoded once, whatever the number of
  listeners;
* fans them out to its subscribers through bounded, thread-safe queues. A
  subscriber that falls behind (its queue is full: it reads slower than
  Central changes, or not at all) is never waited for: its queue is dropped and
  its next read is a fresh ``snapshot`` event. Publishing never blocks.

The :class:`EventHub` belongs to the Central system (like the keyring), not to
the actor: a crash of the actor loses nothing but the snapshot it was handling,
the subscribers stay connected, and the next snapshot is diffed against the
last one that was published. Event shapes: docs/api.md, "Event stream".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import pykka

from actors.operations import (
    UNAVAILABLE,
    AdminCommand,
    OperatorResult,
    RevokeKey,
    WatchLocation,
    WeatherAlert,
    WeatherView,
)
from actors.panel import CpTile, MessageRow, PanelSnapshot, RequestRow, WeatherRow
from actors.runtime import Directory, SupervisedActor, Supervision

__all__ = ["EventHub", "StreamEvent", "Subscription", "WebHubActor", "HubStats", "CentralCommands", "cp_dict",
           "request_dict", "message_dict", "weather_dict", "QUEUE_LIMIT", "MESSAGE_HISTORY"]

log = logging.getLogger("evcharging.web")

#: Events a subscriber may have waiting before it is reset to a fresh snapshot.
QUEUE_LIMIT: Final = 256
#: Messages the hub remembers (Central's snapshot carries only its newest few).
MESSAGE_HISTORY: Final = 200

Json = dict[str, Any]
Encoded = tuple[Json, str]  # a CP as a dict and as its JSON text (encoded once, when its tile changed)


# --- the shapes (docs/api.md) ----------------------------------------------------------------------
def cp_dict(t: CpTile) -> Json:
    """A tile as the API's **Cp** (without ``registered`` and ``key``, which GET adds)."""
    return {"cp_id": t.cp_id, "location": t.location, "price_eur_kwh": t.price_eur_kwh, "state": t.state,
            "stop_reasons": list(t.stop_reasons), "fault": t.fault, "session_id": t.session_id,
            "driver_id": t.driver_id, "power_kw": t.power_kw, "energy_kwh": t.energy_kwh, "cost_eur": t.cost_eur}


def request_dict(r: RequestRow) -> Json:
    return {"driver_id": r.driver_id, "cp_id": r.cp_id, "status": r.status, "started_at": r.started_at}


def message_dict(m: MessageRow) -> Json:
    return {"seq": m.seq, "at": m.at, "text": m.text, "fault": m.fault}


def weather_dict(w: WeatherRow) -> Json:
    return {"location": w.location, "temperature_c": w.temperature_c, "alert": w.alert, "error": w.error,
            "updated_at": w.updated_at, "watched": w.watched, "cp_ids": list(w.cp_ids)}


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _json(data: Any) -> str:
    """Compact JSON on one line (one encoder for all: ``json.dumps`` with options makes one per call)."""
    return _ENCODER.encode(data)


def _encoded(data: Json) -> Encoded:
    return data, _json(data)


def _array(texts: Iterable[str]) -> str:
    return "[" + ",".join(texts) + "]"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One Server-Sent Event, encoded once: ``wire`` is what goes on every subscriber's stream."""

    id: int
    name: str
    wire: bytes

    @classmethod
    def of(cls, ident: int, name: str, data: Any) -> StreamEvent:
        return cls.encoded(ident, name, _json(data))

    @classmethod
    def encoded(cls, ident: int, name: str, text: str) -> StreamEvent:
        """``text``: the data, already JSON on one line."""
        return cls(ident, name, f"id: {ident}\nevent: {name}\ndata: {text}\n\n".encode())


class Subscription:
    """One listener's bounded queue. The hub pushes (never waiting); the listener :meth:`take` s.

    ``wake`` is called (from the publishing thread) after each push; it must not block
    (an event loop's ``call_soon_threadsafe``, a ``threading.Event.set``).
    """

    def __init__(self, hub: EventHub, limit: int, wake: Callable[[], None]) -> None:
        self._hub = hub
        self._limit = limit
        self._wake = wake
        self._lock = threading.Lock()
        self._items: deque[StreamEvent] = deque()
        self._stale = False  # it fell behind: its next take() is a fresh snapshot
        self.closed = False
        self.resets = 0  # how often it fell behind

    def push(self, events: Iterable[StreamEvent]) -> None:
        """Queue ``events`` (called with the hub's lock held)."""
        with self._lock:
            if self.closed or self._stale:
                return
            for event in events:
                if len(self._items) >= self._limit:
                    self._items.clear()  # not waited for: a fresh snapshot replaces what it missed
                    self._stale = True
                    self.resets += 1
                    break
                self._items.append(event)
        self.wake()

    def wake(self) -> None:
        try:
            self._wake()
        except Exception as exc:  # its event loop is gone: it will not read again
            log.debug("web hub: a subscriber cannot be woken (%s); dropping it", exc)
            self.closed = True

    def take(self) -> list[StreamEvent]:
        """The events waiting (oldest first; [] when none), or a fresh snapshot after falling behind."""
        with self._lock:
            if not self._stale:
                items = list(self._items)
                self._items.clear()
                return items
        return self._hub._refresh(self)

    def _reset_to(self, snapshot: StreamEvent) -> list[StreamEvent]:
        with self._lock:  # the hub's lock is held: no push can come in between
            self._items.clear()
            self._stale = False
            return [snapshot]

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._items)


class EventHub:
    """The latest panel state and its listeners (thread-safe; see the module docstring)."""

    def __init__(self, *, queue_limit: int = QUEUE_LIMIT, message_history: int = MESSAGE_HISTORY) -> None:
        if queue_limit < 2:
            raise ValueError("a subscriber's queue must hold at least 2 events")
        self.queue_limit = queue_limit
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()
        self._version = 0  # the id of the last event published
        self._received = 0  # snapshots handled
        self.at: float | None = None  # Central's time of the latest snapshot
        # the latest state: replaced, never mutated, so a reader may hold on to what it got
        self._tiles: dict[str, CpTile] = {}
        self._cps: dict[str, Encoded] = {}
        self._counts: dict[str, int] = {}
        self._requests: tuple[RequestRow, ...] = ()
        self._request_dicts: list[Json] = []
        self._messages: deque[Json] = deque(maxlen=message_history)
        self._last_seq = 0
        self._weather: dict[str, WeatherRow] = {}
        self._weather_dicts: dict[str, Json] = {}
        self._snapshot_cache: StreamEvent | None = None

    # --- what the API reads ------------------------------------------------------------------
    def cps(self) -> list[Json]:
        """Every CP (by id)."""
        with self._lock:
            return [d for d, _ in self._cps.values()]

    def cp(self, cp_id: str) -> Json | None:
        with self._lock:
            entry = self._cps.get(cp_id)
        return entry[0] if entry is not None else None

    def cps_encoded(self) -> list[Encoded]:
        """Every CP (by id) as a dict and as its JSON text (a GET serves the text, filtering on the dict)."""
        with self._lock:
            return list(self._cps.values())

    def cp_encoded(self, cp_id: str) -> Encoded | None:
        with self._lock:
            return self._cps.get(cp_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def requests(self) -> list[Json]:
        with self._lock:
            return list(self._request_dicts)

    def messages(self) -> list[Json]:
        """The messages the hub remembers, oldest first."""
        with self._lock:
            return list(self._messages)

    def weather(self) -> list[Json]:
        with self._lock:
            return list(self._weather_dicts.values())

    @property
    def version(self) -> int:
        """The id of the last event published."""
        with self._lock:
            return self._version

    @property
    def ready(self) -> bool:
        """Central sent at least one snapshot."""
        with self._lock:
            return self._received > 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"subscribers": len(self._subs), "snapshots": self._received, "last_event_id": self._version,
                    "resets": sum(s.resets for s in self._subs)}

    # --- listeners -------------------------------------------------------------------------------
    def subscribe(self, wake: Callable[[], None], *, limit: int | None = None) -> Subscription:
        """A new listener whose first event is the current snapshot."""
        sub = Subscription(self, limit or self.queue_limit, wake)
        with self._lock:
            self._subs.add(sub)
            sub.push([self._snapshot_event()])
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def _refresh(self, sub: Subscription) -> list[StreamEvent]:
        with self._lock:
            return sub._reset_to(self._snapshot_event())

    def _snapshot_event(self) -> StreamEvent:
        """The current state as one ``snapshot`` event (built once per version; the lock is held)."""
        cached = self._snapshot_cache
        if cached is None or cached.id != self._version:
            text = (f'{{"cps":{_array(t for _, t in self._cps.values())},"requests":{_json(self._request_dicts)},'
                    f'"messages":{_json(list(self._messages))},'
                    f'"weather":{_json(list(self._weather_dicts.values()))},"counts":{_json(self._counts)}}}')
            cached = self._snapshot_cache = StreamEvent.encoded(self._version, "snapshot", text)
        return cached

    # --- what Central sends ----------------------------------------------------------------------
    def publish(self, snap: PanelSnapshot) -> int:
        """Take ``snap`` as the latest state and send what changed to every listener; how many events."""
        # The diff is computed without the lock (the hub has one publisher: its actor).
        tiles = {t.cp_id: t for t in snap.tiles}
        changed = [t for cp_id, t in tiles.items() if self._tiles.get(cp_id) != t]
        removed = [cp_id for cp_id in self._tiles if cp_id not in tiles]
        counts = dict(sorted(Counter(t.state for t in snap.tiles).items()))
        cps = dict(self._cps) if changed or removed else self._cps
        for cp_id in removed:
            del cps[cp_id]
        for t in changed:
            cps[t.cp_id] = _encoded(cp_dict(t))
        if changed and list(cps) != list(tiles):  # a CP appeared among others: keep them by id
            cps = {cp_id: cps[cp_id] for cp_id in sorted(tiles)}
        requests = snap.requests != self._requests
        request_dicts = [request_dict(r) for r in snap.requests] if requests else self._request_dicts
        newest = max((m.seq for m in snap.messages), default=self._last_seq)
        restarted = newest < self._last_seq  # a new Central counts its messages from 1 again
        new_messages = [m for m in snap.messages if m.seq > self._last_seq or restarted]
        weather = {w.location: w for w in snap.weather}
        changed_weather = [w for loc, w in weather.items() if self._weather.get(loc) != w]
        gone_weather = [loc for loc in self._weather if loc not in weather]
        weather_dicts = dict(self._weather_dicts)
        for loc in gone_weather:
            del weather_dicts[loc]
        for w in changed_weather:
            weather_dicts[w.location] = weather_dict(w)

        with self._lock:
            self._received += 1
            self.at = snap.at
            self._tiles, self._cps, self._requests, self._request_dicts = tiles, cps, snap.requests, request_dicts
            if restarted:
                self._messages.clear()
            self._messages.extend(message_dict(m) for m in new_messages)
            self._last_seq = newest
            self._weather, self._weather_dicts = weather, weather_dicts
            events: list[StreamEvent] = []
            if restarted or gone_weather:
                # Nothing in the diff events says "forget this": everyone starts again from the whole state.
                self._version += 1
                self._counts = counts
                events.append(self._snapshot_event())
            else:
                if changed or removed or counts != self._counts:
                    self._counts = counts
                    self._version += 1
                    text = (f'{{"changed":{_array(cps[t.cp_id][1] for t in changed)},"removed":{_json(removed)},'
                            f'"counts":{_json(counts)}}}')
                    events.append(StreamEvent.encoded(self._version, "cps", text))
                if requests:
                    events.append(self._next("requests", {"requests": request_dicts}))
                events += [self._next("message", message_dict(m)) for m in new_messages]
                events += [self._next("weather", weather_dicts[w.location]) for w in changed_weather]
            if events:
                for sub in list(self._subs):
                    if sub.closed:
                        self._subs.discard(sub)
                    else:
                        sub.push(events)
            return len(events)

    def _next(self, name: str, data: Any) -> StreamEvent:
        self._version += 1
        return StreamEvent.of(self._version, name, data)


class CentralCommands:
    """API_Central's commands as asks to Central, found by name at each call (it may be restarting).

    Each waits at most ``timeout`` seconds in all; Central restarting or not answering in time is
    an ``unavailable`` :class:`~actors.operations.OperatorResult` (HTTP 503), never an exception.
    Called from the HTTP server's worker threads (never from an actor: it blocks).
    """

    def __init__(self, directory: Directory, *, timeout: float = 5.0, central: str = "central",
                 who: str = "api") -> None:
        self.directory, self.timeout, self.central, self.who = directory, timeout, central, who

    def admin(self, action: str, cp_id: str | None, address: str | None = None) -> OperatorResult:
        return self._ask(AdminCommand(action, cp_id, self.who, address))

    def revoke(self, cp_id: str, reason: str, address: str | None = None) -> OperatorResult:
        return self._ask(RevokeKey(cp_id, reason, self.who, address))

    def weather_alert(self, location: str, temperature_c: float | None, alert: bool,
                      error: str | None) -> OperatorResult:
        return self._ask(WeatherAlert(location, temperature_c, alert, error))

    def watch(self, location: str, watch: bool, address: str | None = None) -> OperatorResult:
        return self._ask(WatchLocation(location, watch, self.who, address))

    def weather_view(self) -> list[dict[str, Any]] | None:
        """Central's weather rows now (read-your-writes after a watch or a reading); None when it
        does not answer in time."""
        ref = self.directory.wait_for(self.central, self.timeout)
        if ref is None:
            return None
        try:
            rows = ref.ask(WeatherView(), timeout=self.timeout)
        except Exception:  # restarting, or too slow: the caller falls back to the latest snapshot
            return None
        return list(rows) if isinstance(rows, list) else None

    def _ask(self, message: Any) -> OperatorResult:
        deadline = time.monotonic() + self.timeout
        ref = self.directory.wait_for(self.central, self.timeout)
        if ref is None:
            return OperatorResult(UNAVAILABLE, f"Central is restarting and did not come back within "
                                               f"{self.timeout:g} s; try again.")
        try:
            answer = ref.ask(message, timeout=max(0.1, deadline - time.monotonic()))
        except pykka.Timeout:
            return OperatorResult(UNAVAILABLE, f"Central did not answer within {self.timeout:g} s; try again.")
        except pykka.ActorDeadError:
            return OperatorResult(UNAVAILABLE, "Central is restarting; try again in a few seconds.")
        except Exception as exc:  # the handler failed (Central restarts): say so, do not fail the request
            log.warning("web: Central failed on %s: %s", type(message).__name__, exc)
            return OperatorResult(UNAVAILABLE, f"Central failed while handling the command ({type(exc).__name__}) "
                                               "and is restarting; try again.")
        if isinstance(answer, OperatorResult):
            return answer
        log.warning("web: Central answered %s with %r", type(message).__name__, type(answer).__name__)
        return OperatorResult(UNAVAILABLE, "Central gave an answer this API does not know; see Central's log.")


@dataclass(frozen=True, slots=True)
class HubStats:
    """Ask the :class:`WebHubActor`: its hub's counters (``EventHub.stats``)."""


class WebHubActor(SupervisedActor):
    """Registered as "web": hands each snapshot Central tells it to the :class:`EventHub`."""

    def __init__(self, hub: EventHub, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.hub = hub

    def on_receive(self, message: Any) -> Any:
        match message:
            case PanelSnapshot():
                self.hub.publish(message)
            case HubStats():
                return self.hub.stats()
        return None
