"""Crash a running actor from a test, the way a bug would: an exception raised
inside the actor's own thread while it handles a message.

No hook in production code: pykka lets anyone replace an attribute of an actor
from its own thread (``ProxySetAttr``). We replace ``on_receive`` with a
function that raises, then tell the actor one message. pykka calls
``on_failure`` (our ``SupervisedActor`` reports the exit) and stops the actor,
exactly as for an exception in a real handler. The replacement lives on that
instance only, so the restarted actor (a new instance) is healthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pykka
from pykka.messages import ProxySetAttr


class InjectedFault(RuntimeError):
    """The exception a crashed actor dies of (its name shows in the supervisor's log)."""


@dataclass(frozen=True)
class _Poke:
    """Any message: the actor handles it with the raising on_receive."""


def crash(ref: pykka.ActorRef[Any], reason: str = "injected fault") -> None:
    """Make the actor behind ``ref`` raise inside its own thread, once."""

    def boom(message: Any) -> Any:
        raise InjectedFault(reason)

    ref.tell(ProxySetAttr(attr_path=("on_receive",), value=boom))
    ref.tell(_Poke())
