"""schedule(): the process's one timer thread tells messages back to actors at their deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.runtime import pending_timers, schedule
from tests.waiting import wait_until


class Collector(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[float, Any]] = []

    def on_receive(self, message: Any) -> Any:
        if message == "got?":
            return list(self.got)
        self.got.append((time.monotonic(), message))
        return None


@pytest.fixture
def collector() -> Iterator[pykka.ActorRef[Any]]:
    ref = Collector.start()
    yield ref
    ref.stop()


def got(ref: pykka.ActorRef[Any]) -> list[Any]:
    return [m for _, m in ref.ask("got?")]


def test_deadlines_in_order_and_a_cancelled_one_never_told(collector) -> None:
    start = time.monotonic()
    schedule(0.30, collector, "c")
    schedule(0.10, collector, "a")
    dropped = schedule(0.20, collector, "never")
    schedule(0.20, collector, "b")
    dropped.cancel()
    wait_until(lambda: len(got(collector)) == 3, timeout=5, what="three messages told")
    times = collector.ask("got?")
    assert [m for _, m in times] == ["a", "b", "c"]
    assert times[0][0] - start >= 0.1 - 0.01  # not before its deadline
    time.sleep(0.2)
    assert "never" not in got(collector)


def test_a_nearer_deadline_set_later_is_not_held_behind_a_far_one(collector) -> None:
    far = schedule(30, collector, "far")
    start = time.monotonic()
    schedule(0.05, collector, "near")
    wait_until(lambda: got(collector) == ["near"], timeout=5, what="the near deadline told")
    assert time.monotonic() - start < 2
    far.cancel()
    assert not far.active()


def test_a_thousand_timers_start_no_thread(collector) -> None:
    schedule(0, collector, "warm")  # the timer thread exists from the first use on
    wait_until(lambda: got(collector) == ["warm"], timeout=5)
    before = {t.ident for t in threading.enumerate()}
    timers = [schedule(0.2 + i / 10_000, collector, i) for i in range(1000)]
    assert {t.ident for t in threading.enumerate()} - before == set()
    for t in timers[::2]:
        t.cancel()
    wait_until(lambda: len(got(collector)) == 501, timeout=10, what="the 500 kept timers told")
    assert got(collector)[1:] == list(range(1, 1000, 2))
    wait_until(lambda: pending_timers() < 1000, timeout=5, what="cancelled entries dropped at their deadline")


def test_a_dead_actor_does_not_stop_the_timer_thread(collector) -> None:
    gone = Collector.start()
    gone.stop()
    schedule(0.01, gone, "to nobody")
    schedule(0.05, collector, "still works")
    wait_until(lambda: got(collector) == ["still works"], timeout=5, what="later timers still told")
