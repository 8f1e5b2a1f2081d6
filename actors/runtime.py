"""The actor runtime: the child side of supervision, timers and a name directory.

pykka has no links or monitors: an actor that dies tells nobody. Every actor
in this project therefore derives from :class:`SupervisedActor`, which reports
its own exit (crash in ``on_start``, crash in a message handler, or a normal
stop) to the supervisor that started it. The supervisor side lives in
``supervisors/``. This module is the one part of ``actors/`` that
``transport/`` imports: transport actors (connections, Kafka pumps) derive
from the same base as the domain actors, but never import a domain actor.

Actors never sleep: :func:`schedule` starts a timer thread that ``tell``s a
message back later, and :class:`Ticker` does so periodically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka
import tenacity

log = logging.getLogger("evcharging.runtime")


@dataclass(frozen=True, slots=True)
class Supervision:
    """Who started an actor, under which child name, in which generation."""

    supervisor: pykka.ActorRef[Any]
    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class ChildExited:
    """Sent by a child to its supervisor when it stops, for whatever reason.

    ``error`` is None for a normal stop. ``during_start`` tells a failing
    ``setup`` apart from a crash while running.
    """

    name: str
    generation: int
    error: BaseException | None
    during_start: bool = False


class SupervisedActor(pykka.ThreadingActor):
    """Base class of every actor: reports its exit to its supervisor.

    Subclasses override :meth:`setup` (instead of ``on_start``) and
    :meth:`teardown` (runs exactly once, on a normal stop *and* after a crash,
    unlike pykka's ``on_stop``). An actor started without a supervisor
    (``supervision=None``) works the same and reports to nobody.
    """

    def __init__(self, *, supervision: Supervision | None = None) -> None:
        super().__init__()
        self.supervision = supervision
        self._torn_down = False

    # --- hooks for subclasses -------------------------------------------
    def setup(self) -> None:
        """Acquire resources; runs in the actor's thread before any message."""

    def teardown(self) -> None:
        """Release resources; must not raise and must not block for long."""

    # --- pykka hooks ------------------------------------------------------
    def on_start(self) -> None:
        try:
            self.setup()
        except Exception as exc:
            # pykka would log this and stop the actor, telling nobody.
            self._teardown_once()
            self._notify_supervisor(exc, during_start=True)
            raise

    def on_stop(self) -> None:
        self._teardown_once()
        self._notify_supervisor(None)

    def on_failure(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                   tb: TracebackType | None) -> None:
        self._teardown_once()
        self._notify_supervisor(exc_value)

    # --- helpers ------------------------------------------------------------
    @property
    def child_name(self) -> str:
        return self.supervision.name if self.supervision else type(self).__name__

    def _teardown_once(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        try:
            self.teardown()
        except Exception as exc:  # teardown must never mask the real exit reason
            log.warning("%s: cleanup failed: %s", self.child_name, exc)

    def _notify_supervisor(self, error: BaseException | None, during_start: bool = False) -> None:
        if self.supervision is None:
            return
        notice = ChildExited(self.supervision.name, self.supervision.generation, error, during_start)
        tell(self.supervision.supervisor, notice)


def backoff_strategy(base: float, maximum: float) -> Callable[[int], float]:
    """Delay before retry number ``n`` (1-based): exponential with jitter.

    tenacity computes it; we never let tenacity *sleep*, because an actor
    that sleeps blocks its mailbox. Callers schedule a timer instead.
    """
    wait = tenacity.wait_exponential_jitter(multiplier=base, max=maximum, jitter=base)
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]

    def delay(n: int) -> float:
        state.attempt_number = max(1, n)
        return float(wait(state))

    return delay


def tell(ref: pykka.ActorRef[Any] | None, message: Any) -> bool:
    """Tell ``ref`` if it is alive; return False (never raise) otherwise."""
    if ref is None:
        return False
    try:
        ref.tell(message)
        return True
    except pykka.ActorDeadError:
        return False


def schedule(delay: float, ref: pykka.ActorRef[Any], message: Any) -> threading.Timer:
    """Tell ``message`` to ``ref`` after ``delay`` seconds; cancel() to abort.

    The timer thread is a daemon: it only ever performs one ``tell``, so
    being cut short at interpreter exit cannot leave anything half-written.
    """
    timer = threading.Timer(max(0.0, delay), tell, args=(ref, message))
    timer.daemon = True
    timer.start()
    return timer


class Ticker:
    """Tells ``message`` to ``ref`` every ``interval`` seconds until stopped.

    One thread per ticker, drift-free (sleeps to the next multiple of the
    interval on a monotonic clock), stopped with :meth:`stop` from teardown.
    """

    def __init__(self, interval: float, ref: pykka.ActorRef[Any], message: Any, name: str = "ticker") -> None:
        self.interval = interval
        self._ref = ref
        self._message = message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            if not tell(self._ref, self._message):
                return
            deadline += self.interval

    def stop(self) -> None:
        self._stop.set()


class Directory:
    """Thread-safe map from a child name to its current ActorRef.

    Supervisors register each child under its name when (re)started, so a
    sibling always reaches the current generation without holding a stale
    ref: ``directory.get("central")`` at send time, never cached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._refs: dict[str, pykka.ActorRef[Any]] = {}

    def register(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._refs[name] = ref
            self._registered.notify_all()

    def wait_for(self, name: str, timeout: float) -> pykka.ActorRef[Any] | None:
        """Block until an actor named ``name`` runs (None after ``timeout``).

        For plain threads only (e.g. a listener's handshake thread waiting while a
        supervisor restarts): an actor must never block its mailbox on this.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                ref = self._refs.get(name)
                if ref is not None and ref.is_alive():
                    return ref
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                # a registered ref can die without an unregister yet: look again soon
                self._registered.wait(min(left, 0.05))

    def unregister(self, name: str, ref: pykka.ActorRef[Any] | None = None) -> None:
        with self._lock:
            if ref is None or self._refs.get(name) is ref:
                self._refs.pop(name, None)

    def get(self, name: str) -> pykka.ActorRef[Any] | None:
        with self._lock:
            ref = self._refs.get(name)
        return ref if ref is not None and ref.is_alive() else None

    def tell(self, name: str, message: Any) -> bool:
        """Tell the current actor named ``name``; False if there is none."""
        return tell(self.get(name), message)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._refs)
