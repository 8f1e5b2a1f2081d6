"""One clock thread for every charger actor of the gateway, instead of a Ticker each.

A Ticker is a thread; at 200 chargers that is 200 threads waking every second
for one message each. :class:`SharedClock` is one thread that tells every
registered actor its tick once per ``interval``, spread evenly over the
interval (no burst of 200 messages at once). An actor registers in ``setup``
and leaves in ``teardown``; a dead actor is dropped at its next tick. Like
every timer here, it only ever ``tell``s.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pykka

from actors.runtime import tell

__all__ = ["SharedClock"]


class SharedClock:
    """Tells each registered ``(ref, message)`` once per ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float, name: str = "clock") -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._members: dict[str, tuple[pykka.ActorRef[Any], Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        with self._lock:
            self._members[ref.actor_urn] = (ref, message)

    def remove(self, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._members.pop(ref.actor_urn, None)

    def __len__(self) -> int:
        return len(self._members)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            deadline += self.interval
            with self._lock:
                members = list(self._members.values())
            step = self.interval / max(1, len(members))
            for i, (ref, message) in enumerate(members):
                wait = deadline - self.interval + i * step - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                if not tell(ref, message):
                    self.remove(ref)
            rest = deadline - time.monotonic()
            if rest > 0 and self._stop.wait(rest):
                return
            if rest < -self.interval:  # far behind (a stall): start again from now, skip the missed ticks
                deadline = time.monotonic()
