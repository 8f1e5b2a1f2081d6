"""Supervision: restarts with backoff, on_start crashes, intensity, stale notices."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pykka
import pytest

from actors.runtime import ChildExited, Directory, SupervisedActor, Supervision
from supervisors.supervisor import ChildSpec, GetRestartLog, StartChild, Supervisor, TerminateChild, WhichChildren
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


def test_crash_in_on_receive_is_restarted_with_backoff(caplog: pytest.LogCaptureFixture, stop_at_end) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    counter, directory = Counter(), Directory()
    sup = stop_at_end(Supervisor.start("t", [ChildSpec("w", Worker, (counter,))], directory=directory,
                                       backoff_base=0.05))
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


def test_crash_in_on_start_is_restarted(stop_at_end) -> None:
    counter, directory = Counter(), Directory()
    sup = stop_at_end(Supervisor.start("t", [ChildSpec("w", Worker, (counter, 2))], directory=directory,
                                       backoff_base=0.01))
    wait_until(lambda: ping(directory, "w"), what="third start succeeds")
    assert counter.starts == 3
    assert sup.ask(WhichChildren())["w"] == (3, True)
    sup.stop()


def test_crash_storm_trips_intensity_and_escalates(caplog: pytest.LogCaptureFixture, stop_at_end) -> None:
    caplog.set_level(logging.INFO, logger="evcharging")
    counter, escalated = Counter(), threading.Event()
    reasons: list[str] = []

    def on_escalate(reason: str) -> None:
        reasons.append(reason)
        escalated.set()

    sup = stop_at_end(Supervisor.start(
        "storm", [ChildSpec("w", Worker, (counter, 10_000))],
        max_restarts=3, period=10, backoff_base=0.01, backoff_max=0.05, on_escalate=on_escalate,
    ))
    assert escalated.wait(10), "the supervisor never escalated"
    assert counter.starts == 4  # the first start plus three restarts
    assert "more than 3 restarts in 10 s" in reasons[0]
    wait_until(lambda: not sup.is_alive(), what="supervisor stops after escalating")


def test_nested_supervisor_escalates_to_parent(stop_at_end) -> None:
    counter, directory = Counter(), Directory()
    inner = ChildSpec(
        "inner", Supervisor, ("inner", [ChildSpec("w", Worker, (counter, 10_000))]),
        {"directory": directory, "max_restarts": 1, "backoff_base": 0.01},
    )
    outer = stop_at_end(Supervisor.start("outer", [inner], directory=directory, max_restarts=5, backoff_base=0.01))
    # the inner supervisor gives up after 2 failed starts, crashes, and is restarted by the outer one
    wait_until(lambda: outer.ask(WhichChildren())["inner"][0] >= 2, what="outer restarts inner")
    outer.stop()


def test_stale_exit_notice_is_ignored(stop_at_end) -> None:
    counter, directory = Counter(), Directory()
    sup = stop_at_end(Supervisor.start("t", [ChildSpec("w", Worker, (counter,))], directory=directory))
    wait_until(lambda: ping(directory, "w"))
    current = directory.get("w")
    sup.tell(ChildExited("w", 0, RuntimeError("old news")))  # generation 0 is long gone
    assert sup.ask(WhichChildren())["w"] == (1, True)
    assert directory.get("w") is current
    sup.stop()


def test_transient_and_temporary_children(stop_at_end) -> None:
    counter, directory = Counter(), Directory()
    sup = stop_at_end(Supervisor.start("t", [], directory=directory))
    sup.ask(StartChild(ChildSpec("tr", Worker, (counter,), restart="transient")))
    sup.ask(StartChild(ChildSpec("tmp", Worker, (counter,), restart="temporary")))
    directory.get("tr").tell("quit")  # normal exit: not restarted
    directory.get("tmp").tell("boom")  # crash: temporary, not restarted
    wait_until(lambda: sup.ask(WhichChildren()) == {}, what="both children gone")
    assert sup.ask(StartChild(ChildSpec("x", Worker, (counter,)))) is not None
    assert sup.ask(TerminateChild("x")) is True
    assert sup.ask(WhichChildren()) == {}
    sup.stop()


def test_stop_tears_down_every_child(stop_at_end) -> None:
    counter, directory = Counter(), Directory()
    specs = [ChildSpec(f"w{i}", Worker, (counter,)) for i in range(5)]
    sup = stop_at_end(Supervisor.start("t", specs, directory=directory))
    wait_until(lambda: all(ping(directory, f"w{i}") for i in range(5)))
    sup.stop()
    assert counter.teardowns == 5
    assert pykka.ActorRegistry.get_all() == []


# --- strategies (OTP semantics) ---------------------------------------------------
def _strategy_tree(strategy: str, counters: dict[str, Counter], restart_c: str = "permanent") -> Any:
    directory = Directory()
    specs = [ChildSpec("a", Worker, (counters["a"],)), ChildSpec("b", Worker, (counters["b"],)),
             ChildSpec("c", Worker, (counters["c"],), restart=restart_c)]  # type: ignore[arg-type]
    sup = Supervisor.start("top", specs, directory=directory, strategy=strategy, backoff_base=0.01)
    sup.ask(WhichChildren())
    return sup, directory


@pytest.mark.parametrize("strategy, crashed, restarted", [
    ("one_for_one", "b", {"b"}),
    ("rest_for_one", "b", {"b", "c"}),
    ("rest_for_one", "a", {"a", "b", "c"}),
    ("rest_for_one", "c", {"c"}),
    ("one_for_all", "b", {"a", "b", "c"}),
])
def test_strategy_restarts_the_right_siblings(strategy: str, crashed: str, restarted: set[str]) -> None:
    counters = {n: Counter() for n in "abc"}
    sup, directory = _strategy_tree(strategy, counters)
    try:
        generations = sup.ask(WhichChildren())
        directory.get(crashed).tell("boom")
        wait_until(lambda: all(ping(directory, n) for n in "abc")
                   and {n for n, (g, _) in sup.ask(WhichChildren()).items() if g > generations[n][0]} == restarted,
                   what=f"{strategy}: {sorted(restarted)} restarted after {crashed} crashed")
        for name in "abc":
            assert counters[name].starts == (2 if name in restarted else 1), name
            assert counters[name].teardowns == (1 if name in restarted else 0), name
    finally:
        sup.stop()


def test_rest_for_one_stops_dependants_before_and_starts_them_after_their_owner() -> None:
    order: list[str] = []
    lock = threading.Lock()

    class Logged(Worker):
        def setup(self) -> None:
            with lock:
                order.append(f"start {self.child_name}")

        def teardown(self) -> None:
            with lock:
                order.append(f"stop {self.child_name}")

    directory = Directory()
    specs = [ChildSpec(n, Logged, (Counter(),)) for n in ("owner", "link", "pump")]
    sup = Supervisor.start("top", specs, directory=directory, strategy="rest_for_one", backoff_base=0.01)
    sup.ask(WhichChildren())
    try:
        order.clear()
        directory.get("owner").tell("boom")
        wait_until(lambda: len(order) == 6, what="three stops and three starts")
        assert order == ["stop owner", "stop pump", "stop link", "start owner", "start link", "start pump"]
    finally:
        sup.stop()


def test_rest_for_one_does_not_restart_temporary_dependants() -> None:
    counters = {n: Counter() for n in "abc"}
    sup, directory = _strategy_tree("rest_for_one", counters, restart_c="temporary")
    try:
        directory.get("a").tell("boom")
        wait_until(lambda: ping(directory, "a") and ping(directory, "b"), what="a and b back")
        assert set(sup.ask(WhichChildren())) == {"a", "b"}
        assert counters["c"].starts == 1 and counters["c"].teardowns == 1
    finally:
        sup.stop()


def test_a_crash_counts_once_towards_intensity_however_many_siblings_restart() -> None:
    counters = {n: Counter() for n in "abc"}
    escalated = threading.Event()
    directory = Directory()
    specs = [ChildSpec(n, Worker, (counters[n],)) for n in "abc"]
    sup = Supervisor.start("top", specs, directory=directory, strategy="one_for_all", backoff_base=0.01,
                           max_restarts=2, period=30, on_escalate=lambda reason: escalated.set())
    sup.ask(WhichChildren())
    try:
        for _ in range(2):
            directory.get("a").tell("boom")
            wait_until(lambda: all(ping(directory, n) for n in "abc"), what="all back")
        assert not escalated.is_set()
        directory.get("a").tell("boom")
        assert escalated.wait(5), "the third crash in the period escalates"
    finally:
        if sup.is_alive():
            sup.stop()


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown supervision strategy"):
        Supervisor("x", strategy="all_for_none")  # type: ignore[arg-type]


def test_directory_wait_for_blocks_a_plain_thread_until_the_name_runs() -> None:
    directory = Directory()
    counter = Counter()
    assert directory.wait_for("late", 0.1) is None  # bounded: nobody registers it
    ref = Worker.start(counter)
    try:
        threading.Timer(0.2, directory.register, args=("late", ref)).start()
        assert directory.wait_for("late", 5) is ref
    finally:
        ref.stop()


class _Recorder(SupervisedActor):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if message == "seen?":
            return list(self.seen)
        if message == "block":
            gate.wait(10)
        self.seen.append(message)
        return None


gate = threading.Event()


def test_a_threaded_actors_mailbox_keeps_order_and_answers_asks_left_at_stop_as_dead() -> None:
    """The mailbox is a queue.SimpleQueue (actors/runtime.py): pykka's contract stays: messages in
    the order told, from many threads; an ask still queued when the actor stops fails at once."""
    import queue

    ref = _Recorder.start()
    try:
        assert isinstance(ref.actor_inbox, queue.SimpleQueue)
        senders = [threading.Thread(target=lambda k=k: [ref.tell((k, i)) for i in range(500)]) for k in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        seen = ref.ask("seen?", timeout=10)
        assert len(seen) == 2000
        for k in range(4):
            assert [i for s, i in seen if s == k] == list(range(500))  # each sender's order kept
        gate.clear()
        ref.tell("block")
        stopped = ref.stop(block=False)  # queued behind the blocked message
        late = ref.ask("seen?", block=False)  # queued behind the stop
        gate.set()
        stopped.get(timeout=10)
        with pytest.raises(pykka.ActorDeadError):
            late.get(timeout=10)
    finally:
        gate.set()
        if ref.is_alive():
            ref.stop()
