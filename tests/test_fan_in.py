"""FanIn: many senders to one actor through a deque and one Drain, not through the mailbox's lock."""

from __future__ import annotations

import threading
from typing import Any

import pykka

from actors.runtime import Directory, Drain
from tests.waiting import wait_until


class Collector(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []
        self.drains = 0

    def on_receive(self, message: Any) -> Any:
        match message:
            case Drain(box):
                self.drains += 1
                self.got.extend(box.take())
            case "got?":
                return list(self.got), self.drains
            case "crash soon":
                threading.Event().wait(0.2)
                raise RuntimeError("crashed on purpose")
        return None


def test_every_message_of_many_senders_arrives_in_each_senders_order_with_few_drains() -> None:
    directory = Directory()
    ref = Collector.start()
    directory.register("sink", ref)
    try:
        box = directory.fan_in("sink")
        assert directory.fan_in("sink") is box  # one per name

        def sender(n: int) -> None:
            for i in range(200):
                box.tell((n, i))

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: len(ref.ask("got?")[0]) == 50 * 200, timeout=10, what="all 10,000 messages")
        got, drains = ref.ask("got?")
        for n in range(50):
            assert [i for m, i in got if m == n] == list(range(200))  # each sender's order kept
        assert drains < 50 * 200 / 10, drains  # taken in batches, not one mailbox message each
        assert len(box) == 0
    finally:
        ref.stop()


def test_a_drain_lost_with_a_crashed_actor_is_told_again_to_its_next_generation() -> None:
    directory = Directory()
    first = Collector.start()
    directory.register("sink", first)
    box = directory.fan_in("sink")
    box.retell_after = 0.3
    first.tell("crash soon")  # raises after 0.2 s: the Drain queued behind it dies with the actor
    box.tell("lost drain")
    wait_until(lambda: not first.is_alive(), timeout=5, what="the first generation dead")
    second = Collector.start()
    directory.register("sink", second)
    try:
        box.tell("after the restart")  # a Drain is still thought on its way: none told yet
        threading.Event().wait(0.4)
        assert got_of(second) == []
        box.tell("later")  # past retell_after: told again, and everything waiting is taken
        wait_until(lambda: got_of(second) == ["lost drain", "after the restart", "later"], timeout=5,
                   what="the waiting messages delivered to the new generation")
    finally:
        second.stop()


def got_of(ref: pykka.ActorRef[Any]) -> list[Any]:
    got: list[Any] = ref.ask("got?")[0]
    return got
