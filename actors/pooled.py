"""Pooled actors: many pykka actors served by a few threads, for the ones there are thousands of.

Why: a ``pykka.ThreadingActor`` is a thread. Central holds two actors per CP (its
connection and its session), so at 1,000 CPs it ran ~2,000 threads, and every
message to one of them woke a thread that then queued for the GIL: at 1,000 CPs
the connection actors alone took a quarter of a core for a heartbeat a second
each, most of it in thread hand-offs, not in their own work.

:class:`Pooled` keeps everything pykka promises an actor (an ``ActorRef`` with
``tell``/``ask``/``stop``, one message at a time, ``on_start``/``on_stop``/
``on_failure``, the same exception rules) and changes only where the actor
runs: its inbox is a deque, and the first message that arrives while the actor
is idle puts the actor on its *pool*'s run queue; a pool thread takes it, hands
it up to :data:`SLICE` messages, and puts it back at the end of the queue if
more are waiting (fair between actors, in order within one). This is pykka's
own extension point (``_create_actor_inbox``, ``_create_future``,
``_start_actor_loop``), the one its gevent and eventlet runtimes used.

The rule that matters more here than for a threading actor: **a pooled actor
must not block** for long, because it holds one of its pool's few threads. A
pool per kind of actor (``pool`` class attribute) keeps one kind's rare
blocking (a session's billing asks the ledger) from stalling another
(connections). Threads per pool: ``EV_ACTOR_POOL_THREADS`` (default 2).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections import deque
from typing import Any, ClassVar

import pykka
from pykka import ActorDeadError, ActorRegistry, messages
from pykka._envelope import Envelope

log = logging.getLogger("evcharging.runtime")

#: messages one actor handles before it yields its pool thread to the next actor
SLICE = 32
POOL_THREADS_ENV = "EV_ACTOR_POOL_THREADS"
DEFAULT_POOL_THREADS = 2


def pool_threads() -> int:
    """Threads per pool, from ``EV_ACTOR_POOL_THREADS`` (1-64; default 2)."""
    raw = os.environ.get(POOL_THREADS_ENV, "")
    try:
        n = int(raw) if raw else DEFAULT_POOL_THREADS
    except ValueError:
        n = DEFAULT_POOL_THREADS
    return min(64, max(1, n))


class _Pool:
    """A run queue of actors and the threads that run them (started on first use)."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self._ready: queue.SimpleQueue[Pooled] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-pool-{i + 1}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, actor: Pooled) -> None:
        self._ready.put(actor)

    def _work(self) -> None:
        while True:
            actor = self._ready.get()
            try:
                actor._run_slice()
            except BaseException:  # the slice catches everything; this is a last guard
                log.exception("pool %s: an actor's slice failed; the pool thread goes on", self.name)


_pools: dict[tuple[str, int], _Pool] = {}
_pools_lock = threading.Lock()


def _pool(name: str) -> _Pool:
    key = (name, os.getpid())  # a forked child starts its own threads
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = _Pool(name, pool_threads())
    return pool


class _Inbox:
    """A pooled actor's inbox: ``put`` appends and, if the actor is idle, puts it on its pool."""

    __slots__ = ("_actor", "_closed", "_items", "_lock", "_scheduled")

    def __init__(self) -> None:
        self._items: deque[Envelope[Any]] = deque()
        self._lock = threading.Lock()
        self._actor: Pooled | None = None  # bound when the actor starts
        self._scheduled = True  # until bound: nothing to schedule yet
        self._closed = False

    def bind(self, actor: Pooled) -> None:
        with self._lock:
            self._actor = actor
        actor._pooled_on.submit(actor)  # the first slice runs on_start, then anything told meanwhile

    def put(self, envelope: Envelope[Any], /) -> None:
        with self._lock:
            if self._closed:
                dead = True
            else:
                dead = False
                self._items.append(envelope)
                if self._scheduled:
                    return
                self._scheduled = True
                actor = self._actor
        if dead:
            _answer_dead(envelope, "has stopped")
            return
        assert actor is not None
        actor._pooled_on.submit(actor)

    def get(self) -> Envelope[Any]:
        """The oldest message (pykka's teardown drains with this); IndexError if none."""
        return self._items.popleft()

    def get_nowait(self) -> Envelope[Any] | None:
        try:
            return self._items.popleft()
        except IndexError:
            return None

    def empty(self) -> bool:
        return not self._items

    def yield_slice(self) -> bool:
        """After a slice: True if the actor must run again (messages are waiting)."""
        with self._lock:
            if self._items:
                return True
            self._scheduled = False
            return False

    def close(self) -> list[Envelope[Any]]:
        """No more messages: the ones still here are returned (to be answered "dead")."""
        with self._lock:
            self._closed = True
            left = list(self._items)
            self._items.clear()
        return left


def _answer_dead(envelope: Envelope[Any], why: str) -> None:
    if envelope.reply_to is not None:
        if isinstance(envelope.message, messages._ActorStop):
            envelope.reply_to.set(None)  # stopping a stopped actor: done
        else:
            envelope.reply_to.set_exception(exc_info=(ActorDeadError, ActorDeadError(f"the actor {why}"), None))


class Pooled(pykka.ThreadingActor):
    """Mixin (first in the bases) that runs a pykka actor on a shared pool instead of its own thread.

    ``pool``: the name of the pool; actors that may block briefly (billing) get a pool of their own.
    """

    pool: ClassVar[str] = "actors"
    actor_inbox: _Inbox

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    def _start_actor_loop(self) -> None:
        self._pooled_on = _pool(self.pool)
        self._pooled_started = False
        self.actor_inbox.bind(self)

    # --- run by a pool thread ----------------------------------------------
    def _run_slice(self) -> None:
        """pykka's actor loop, cut into slices: setup once, then up to SLICE messages."""
        inbox = self.actor_inbox
        if not self._pooled_started:
            self._pooled_started = True
            self._actor_loop_setup()  # on_start; a failure there marks the actor stopped
        handled = 0
        while handled < SLICE and not self.actor_stopped.is_set():
            envelope = inbox.get_nowait()
            if envelope is None:
                break
            handled += 1
            self._handle_envelope(envelope)
        if self.actor_stopped.is_set():
            for envelope in inbox.close():
                _answer_dead(envelope, "stopped before handling the message")
            return
        if inbox.yield_slice():
            self._pooled_on.submit(self)

    def _handle_envelope(self, envelope: Envelope[Any]) -> None:
        """One message, with pykka's rules (``pykka.Actor._actor_loop_running``): an exception
        goes to the asker, or, for a tell, fails the actor (``on_failure``)."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                log.debug("Exception returned from %s to caller", self, exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # as pykka: a KeyboardInterrupt or SystemExit stops everything
            log.debug("%r in %s. Stopping all actors.", sys.exc_info()[1], self)
            self._stop()
            # Not on this thread: stop_all waits for every actor, and this pool's others need it to stop.
            threading.Thread(target=ActorRegistry.stop_all, name="stop-all", daemon=True).start()
