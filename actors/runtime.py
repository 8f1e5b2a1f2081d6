"""The actor runtime: the child side of supervision, timers and a name directory.

pykka has no links or monitors: an actor that dies tells nobody. Every actor
in this project therefore derives from :class:`SupervisedActor`, which reports
its own exit (crash in ``on_start``, crash in a message handler, or a normal
stop) to the supervisor that started it. The supervisor side lives in
``supervisors/``. This module is the one part of ``actors/`` that
``transport/`` imports: transport actors (connections, Kafka pumps) derive
from the same base as the domain actors, but never import a domain actor.

Actors never sleep: :func:`schedule` has the process's one timer thread
``tell`` a message back later, and :class:`Ticker` does so periodically.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
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
    @staticmethod
    def _create_actor_inbox() -> Any:
        """The mailbox: a ``queue.SimpleQueue`` instead of pykka's ``queue.Queue``.

        Why: pykka only puts, gets and asks ``empty()``, which SimpleQueue does in C, without the
        Python-level lock and condition a ``queue.Queue`` takes on every put and get (and whose
        waiters must reacquire the interpreter lock to hand over). Every tell between threads
        pays this: at 1,000 CPs several thousand a second. Unbounded, as pykka's is.
        """
        return queue.SimpleQueue()

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


class Scheduled:
    """A message :func:`schedule` will tell later; :meth:`cancel` before then and it never is."""

    __slots__ = ("done", "message", "ref")

    def __init__(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        self.ref = ref
        self.message = message
        self.done = False  # told or cancelled

    def cancel(self) -> None:
        self.done = True

    def active(self) -> bool:
        """Still to be told."""
        return not self.done


class _TimerThread:
    """The process's one timer thread: a heap of deadlines on a monotonic clock.

    Why not a ``threading.Timer`` per call: a link arms an ACK timer for every frame
    it sends, so at 1,000 CPs that was 1,000 thread starts a second and a thousand
    threads alive at any moment. A cancelled entry stays in the heap until its
    deadline and is then dropped, which bounds the heap by rate x longest delay.
    Its only work is one ``tell`` per deadline, so being a daemon cut short at
    interpreter exit leaves nothing half-written.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Scheduled]] = []
        self._order = itertools.count()  # equal deadlines fire in the order they were set
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> Scheduled:
        item = Scheduled(ref, message)
        when = time.monotonic() + max(0.0, delay)
        with self._wake:
            if self._thread is None or self._pid != os.getpid():  # first use, or a forked child
                self._heap = [e for e in self._heap if self._pid == os.getpid()]
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (when, next(self._order), item))
            if self._heap[0][2] is item:
                self._wake.notify()  # the new deadline is the nearest: the thread sleeps less
        return item

    def pending(self) -> int:
        """Entries in the heap (cancelled ones included, until their deadline)."""
        with self._wake:
            return len(self._heap)

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._wake:
                heap = self._heap
                now = time.monotonic()
                while not heap or heap[0][0] > now:
                    self._wake.wait(heap[0][0] - now if heap else None)
                    heap = self._heap
                    now = time.monotonic()
                due = []
                while heap and heap[0][0] <= now:
                    due.append(heapq.heappop(heap)[2])
            for item in due:
                if not item.done:
                    item.done = True
                    tell(item.ref, item.message)


_timers = _TimerThread()


def schedule(delay: float, ref: pykka.ActorRef[Any], message: Any) -> Scheduled:
    """Tell ``message`` to ``ref`` after ``delay`` seconds; ``cancel()`` the result to abort."""
    return _timers.add(delay, ref, message)


def pending_timers() -> int:
    """How many timer entries the process holds (for tests and the bench)."""
    return _timers.pending()


class Ticker:
    """Tells ``message`` to ``ref`` every ``interval`` seconds until stopped.

    One thread per ticker, drift-free (sleeps to the next multiple of the
    interval on a monotonic clock), stopped with :meth:`stop` from teardown.
    """

    def __init__(self, interval: float, ref: pykka.ActorRef[Any], message: Any, name: str = "ticker", *,
                 make: Callable[[], Any] | None = None) -> None:
        """``make``: builds each message when it is told (one saying when, say) instead of ``message``."""
        self.interval = interval
        self._ref = ref
        self._message = message
        self._make = make
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            if not tell(self._ref, self._message if self._make is None else self._make()):
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
        self._fan_ins: dict[str, FanIn] = {}

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
        # No lock: one dict lookup is atomic in CPython, and every tell goes through here. Under
        # load a contended lock made each caller give up the GIL and queue for it again (at 1,000
        # CPs Central's actor spent its ticks waiting here); writers still take the lock.
        ref = self._refs.get(name)
        return ref if ref is not None and ref.is_alive() else None

    def tell(self, name: str, message: Any) -> bool:
        """Tell the current actor named ``name``; False if there is none."""
        return tell(self.get(name), message)

    def fan_in(self, name: str) -> FanIn:
        """The one :class:`FanIn` to the actor named ``name`` (for many senders of frequent messages)."""
        box = self._fan_ins.get(name)
        if box is None:
            with self._lock:
                box = self._fan_ins.setdefault(name, FanIn(self, name))
        return box

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._refs)


@dataclass(frozen=True, slots=True, eq=False)
class Drain:
    """FanIn → its actor: take what waits in ``box`` (:meth:`FanIn.take`) and handle each as a message."""

    box: FanIn


class FanIn:
    """Many senders → one actor, without the mailbox's lock on each sender's path.

    Why: a mailbox has one lock every sender takes (pykka's ``queue.Queue``; ours, a
    ``queue.SimpleQueue``, takes one too, in C). At 1,000 CPs a thousand session actors told the
    one publisher a message a second each, and queued on that queue's mutex: a lock convoy under
    the GIL (829 of them were waiting there in one py-spy dump, the publisher itself could not
    take its next message, and Central stalled behind it). Here a sender appends to a deque
    (atomic under the GIL) and tells the actor one :class:`Drain` unless one is already on its
    way; the actor takes everything waiting at once. Order per sender is kept.

    A Drain lost with an actor that died is told again by the next sender after
    ``retell_after`` seconds, so a restarted actor picks up what waited.
    """

    retell_after = 1.0

    def __init__(self, directory: Directory, name: str) -> None:
        self._directory = directory
        self._name = name
        self._items: deque[Any] = deque()
        self._told_at = 0.0  # when the pending Drain was told; 0: none pending

    def tell(self, message: Any) -> None:
        self._items.append(message)
        told = self._told_at
        now = time.monotonic()
        if told and now - told < self.retell_after:
            return  # the actor will take it with the Drain already on its way
        self._told_at = now
        if not self._directory.tell(self._name, Drain(self)):
            self._told_at = 0.0  # nobody to tell now: the next sender tries again

    def take(self) -> list[Any]:
        """Everything waiting, oldest first (called by the actor on :class:`Drain`)."""
        self._told_at = 0.0  # before taking: a message appended from now on gets its own Drain
        items = self._items
        out = []
        try:
            while True:
                out.append(items.popleft())
        except IndexError:
            return out

    def __len__(self) -> int:
        return len(self._items)
