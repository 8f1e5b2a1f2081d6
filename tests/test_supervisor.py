"""Supervision: restarts with backoff, on_start crashes, intensity, stale notices."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pykka
import pytest

from supervisors.supervisor import ChildSpec, GetRestartLog, StartChild, Supervisor, TerminateChild, WhichChildren
from transport.runtime import ChildExited, Directory, SupervisedActor, Supervision
from tests.waiting import wait_until


class Counter:
    """Shared, thread-safe record of what the children did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts = 0
        self.teardowns = 0

    def started(self) -> int:
        with self.lock:
            self.starts += 1
            return self.starts

    def torn(self) -> None:
        with self.lock:
            self.teardowns += 1


class Worker(SupervisedActor):
    """Answers 'ping'; crashes on 'boom' (a tell) — pykka kills it then."""

    def __init__(self, counter: Counter, fail_first_starts: int = 0, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.counter = counter
        self.fail_first_starts = fail_first_starts

    def setup(self) -> None:
        n = self.counter.started()
        if n <= self.fail_first_starts:
            raise OSError(f"port busy (start {n})")

    def teardown(self) -> None:
        self.counter.torn()

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        if message == "ping":
            return "pong"
        if message == "quit":
            self.stop()
        return None


def ping(directory: Directory, name: str) -> bool:
    ref = directory.get(name)
    try:
        return ref is not None and ref.ask("ping", timeout=1) == "pong"
    except (pykka.ActorDeadError, pykka.Timeout):
        return False


def test_crash_in_on_receive_is_restarted_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    counter, directory = Counter(), Directory()
    sup = Supervisor.start("t", [ChildSpec("w", Worker, (counter,))], directory=directory, backoff_base=0.05)
    wait_until(lambda: ping(directory, "w"), what="first start")
    first = directory.get("w")
    first.tell("boom")
    wait_until(lambda: ping(directory, "w") and directory.get("w") is not first, what="restart")
    assert counter.starts == 2 and counter.teardowns == 1  # teardown ran after the crash
    restarts = sup.ask(GetRestartLog())
    assert len(restarts) == 1 and 0.04 <= restarts[0][1] < 1.0
    assert any("restarted w after" in r.getMessage() for r in caplog.records)
    assert any("crashed (ValueError: boom)" in r.getMessage() for r in caplog.records)
    sup.stop()
    assert counter.teardowns == 2


def test_crash_in_on_start_is_restarted() -> None:
    counter, directory = Counter(), Directory()
    sup = Supervisor.start("t", [ChildSpec("w", Worker, (counter, 2))], directory=directory, backoff_base=0.01)
    wait_until(lambda: ping(directory, "w"), what="third start succeeds")
    assert counter.starts == 3
    assert sup.ask(WhichChildren())["w"] == (3, True)
    sup.stop()


def test_crash_storm_trips_intensity_and_escalates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    counter, escalated = Counter(), threading.Event()
    reasons: list[str] = []

    def on_escalate(reason: str) -> None:
        reasons.append(reason)
        escalated.set()

    sup = Supervisor.start(
        "storm", [ChildSpec("w", Worker, (counter, 10_000))],
        max_restarts=3, period=10, backoff_base=0.01, backoff_max=0.05, on_escalate=on_escalate,
    )
    assert escalated.wait(10), "the supervisor never escalated"
    assert counter.starts == 4  # the first start plus three restarts
    assert "more than 3 restarts in 10 s" in reasons[0]
    wait_until(lambda: not sup.is_alive(), what="supervisor stops after escalating")


def test_nested_supervisor_escalates_to_parent() -> None:
    counter, directory = Counter(), Directory()
    inner = ChildSpec(
        "inner", Supervisor, ("inner", [ChildSpec("w", Worker, (counter, 10_000))]),
        {"directory": directory, "max_restarts": 1, "backoff_base": 0.01},
    )
    outer = Supervisor.start("outer", [inner], directory=directory, max_restarts=5, backoff_base=0.01)
    # the inner supervisor gives up after 2 failed starts, crashes, and is restarted by the outer one
    wait_until(lambda: outer.ask(WhichChildren())["inner"][0] >= 2, what="outer restarts inner")
    outer.stop()


def test_stale_exit_notice_is_ignored() -> None:
    counter, directory = Counter(), Directory()
    sup = Supervisor.start("t", [ChildSpec("w", Worker, (counter,))], directory=directory)
    wait_until(lambda: ping(directory, "w"))
    current = directory.get("w")
    sup.tell(ChildExited("w", 0, RuntimeError("old news")))  # generation 0 is long gone
    assert sup.ask(WhichChildren())["w"] == (1, True)
    assert directory.get("w") is current
    sup.stop()


def test_transient_and_temporary_children() -> None:
    counter, directory = Counter(), Directory()
    sup = Supervisor.start("t", [], directory=directory)
    sup.ask(StartChild(ChildSpec("tr", Worker, (counter,), restart="transient")))
    sup.ask(StartChild(ChildSpec("tmp", Worker, (counter,), restart="temporary")))
    directory.get("tr").tell("quit")  # normal exit: not restarted
    directory.get("tmp").tell("boom")  # crash: temporary, not restarted
    wait_until(lambda: sup.ask(WhichChildren()) == {}, what="both children gone")
    assert sup.ask(StartChild(ChildSpec("x", Worker, (counter,)))) is not None
    assert sup.ask(TerminateChild("x")) is True
    assert sup.ask(WhichChildren()) == {}
    sup.stop()


def test_stop_tears_down_every_child() -> None:
    counter, directory = Counter(), Directory()
    specs = [ChildSpec(f"w{i}", Worker, (counter,)) for i in range(5)]
    sup = Supervisor.start("t", specs, directory=directory)
    wait_until(lambda: all(ping(directory, f"w{i}") for i in range(5)))
    sup.stop()
    assert counter.teardowns == 5
    assert pykka.ActorRegistry.get_all() == []
