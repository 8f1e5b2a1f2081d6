"""Pooled actors (actors/pooled.py): pykka's actor contract, on a few shared threads."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import pykka
import pytest

from actors.pooled import POOL_THREADS_ENV, SLICE, Pooled, pool_threads
from actors.runtime import ChildExited, SupervisedActor, Supervision
from supervisors.supervisor import ChildSpec, WhichChildren, start_tree
from tests.waiting import wait_until


class Counter(Pooled, SupervisedActor):
    pool = "test-counters"
    started: ClassVar[list[str]] = []

    def __init__(self, name: str = "c", *, fail_start: bool = False,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.name = name
        self.fail_start = fail_start
        self.seen: list[Any] = []
        self.threads: set[str] = set()

    def setup(self) -> None:
        if self.fail_start:
            raise RuntimeError("cannot start")
        Counter.started.append(self.name)

    def on_receive(self, message: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        match message:
            case ("boom", why):
                raise RuntimeError(why)
            case ("block", event):
                event.wait(5)
            case "seen?":
                return list(self.seen)
            case "threads?":
                return set(self.threads)
            case _:
                self.seen.append(message)
        return None


class Blocker(Pooled, SupervisedActor):
    pool = "test-blockers"

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, threading.Event):
            message.wait(5)
        return "ok"


def test_many_actors_share_a_few_threads_and_keep_each_ones_order() -> None:
    before = threading.active_count()
    refs = [Counter.start(f"c{i}") for i in range(300)]
    try:
        for n in range(50):
            for ref in refs:
                ref.tell(n)
        for ref in refs:
            assert ref.ask("seen?", timeout=10) == list(range(50))
        # one pool ("test-counters") at most: its threads, not one per actor
        assert threading.active_count() - before <= pool_threads()
        threads = set().union(*(ref.ask("threads?", timeout=5) for ref in refs))
        assert threads and all(t.startswith("test-counters-pool-") for t in threads)
    finally:
        for ref in refs:
            ref.stop()


def test_an_exception_in_an_ask_goes_to_the_caller_and_the_actor_lives_on() -> None:
    ref = Counter.start()
    try:
        with pytest.raises(RuntimeError, match="for the caller"):
            ref.ask(("boom", "for the caller"), timeout=5)
        assert ref.is_alive()
        ref.tell("after")
        assert ref.ask("seen?", timeout=5) == ["after"]
    finally:
        ref.stop()


def test_a_crash_in_a_tell_kills_the_actor_and_its_supervisor_restarts_it() -> None:
    tree = start_tree("t", [ChildSpec("counter", Counter, ("x",))], backoff_base=0.01)
    try:
        first = tree.ask(WhichChildren())["counter"]
        counter = tree.proxy().directory.get().get("counter")
        counter.tell(("boom", "crash on purpose"))
        wait_until(lambda: tree.ask(WhichChildren())["counter"][0] > first[0], what="a new generation")
        again = tree.proxy().directory.get().get("counter")
        wait_until(lambda: again is not None and again.is_alive(), what="the restarted child")
        again.tell("hello")
        assert again.ask("seen?", timeout=5) == ["hello"]
    finally:
        tree.stop()


class Recorder(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if message == "got?":
            return list(self.got)
        self.got.append(message)
        return None


def test_a_failing_start_is_reported_to_the_supervisor_and_asks_are_answered_dead() -> None:
    recorder = Recorder.start()
    try:
        ref = Counter.start("bad", fail_start=True, supervision=Supervision(recorder, "bad", 1))
        wait_until(lambda: recorder.ask("got?") != [], what="the exit notice")
        (notice,) = recorder.ask("got?")
        assert isinstance(notice, ChildExited) and notice.during_start and "cannot start" in str(notice.error)
        assert not ref.is_alive()
        with pytest.raises(pykka.ActorDeadError):
            ref.ask("seen?", timeout=5)
    finally:
        recorder.stop()


def test_messages_waiting_when_the_actor_stops_are_answered_dead_not_left_hanging() -> None:
    ref = Counter.start()
    gate = threading.Event()
    ref.tell(("block", gate))
    stop = ref.stop(block=False)
    later = ref.ask("seen?", block=False)  # behind the stop: never handled
    gate.set()
    assert stop.get(timeout=5) is True
    with pytest.raises(pykka.ActorDeadError):
        later.get(timeout=5)


class Fair(Counter):
    pool = "test-fair"  # a pool of one thread (set in the test before its first use)
    log: ClassVar[list[str]] = []

    def on_receive(self, message: Any) -> Any:
        Fair.log.append(self.name)
        return super().on_receive(message)


def test_a_busy_actor_yields_its_thread_after_a_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POOL_THREADS_ENV, "1")
    busy, quiet = Fair.start("busy"), Fair.start("quiet")
    try:
        gate = threading.Event()
        busy.tell(("block", gate))  # the pool's one thread waits in busy...
        for n in range(SLICE * 20):
            busy.tell(n)  # ...while 640 more messages queue for busy
        quiet.tell("one")  # and one for quiet, after them
        gate.set()
        assert quiet.ask("seen?", timeout=10) == ["one"]
        assert busy.ask("seen?", timeout=10) == list(range(SLICE * 20))
        order = [name for name in Fair.log if name in ("busy", "quiet")]
        # quiet ran after busy's first slice, not after all of busy's messages
        assert order.index("quiet") <= SLICE + 1
    finally:
        busy.stop()
        quiet.stop()


def test_an_actor_blocking_in_one_pool_does_not_stall_another_pool() -> None:
    blockers = [Blocker.start() for _ in range(pool_threads())]
    gate = threading.Event()
    counter = Counter.start()
    try:
        for b in blockers:
            b.tell(gate)  # every thread of the "test-blockers" pool now waits
        t0 = time.monotonic()
        counter.tell("x")
        assert counter.ask("seen?", timeout=5) == ["x"]
        assert time.monotonic() - t0 < 1.0
        late = blockers[0].ask("anything", block=False)
        with pytest.raises(pykka.Timeout):
            late.get(timeout=0.2)  # its pool is full of waiting actors...
        gate.set()
        assert late.get(timeout=5) == "ok"  # ...and serves again once they return
    finally:
        gate.set()
        counter.stop()
        for b in blockers:
            b.stop()
