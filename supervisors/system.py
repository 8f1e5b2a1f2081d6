"""A running actor system: its top supervisor, its directory, and how to stop it.

Each ``start_*`` function of ``supervisors/`` returns a :class:`RunningSystem`.
Apps that embed the actors use only this: start, look things up, stop.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.runtime import Directory
from supervisors.supervisor import ChildSpec, Supervisor, start_tree
from transport.kafka import ConsumerPump, wait_ready

log = logging.getLogger("evcharging.system")

GC_THRESHOLD_ENV = "EV_GC_THRESHOLD"
#: Allocations between two collections of the youngest generation (Python's default is 700).
DEFAULT_GC_THRESHOLD = 20_000
#: The largest threshold taken (a larger one is said and lowered to this).
MAX_GC_THRESHOLD = 10_000_000


def tune_gc() -> int | None:
    """Tune the cyclic garbage collector for a long-running program; returns the threshold set.

    Why: the actors allocate a few short-lived objects per message, and at 1,000 CPs Central's
    collector ran ~100 young and ~10 older collections a second: 0.3-0.5 s of every 10 s (3-5 % of
    a core, in bench.scale). Collecting the youngest generation every ``EV_GC_THRESHOLD``
    (default 20,000) allocations instead of every 700, with what start-up built frozen out of the
    collector's sight (``gc.freeze``), cut that to 0.01-0.05 s per 10 s at the same RSS. Cycles are
    still collected, only later. ``EV_GC_THRESHOLD=0`` leaves Python's defaults.
    Called by the long-running programs (``run_until_signal``: Central, the Monitor, the Engine, EV_OCPP,
    EV_W) once their system started; an app embedding the actors may call it too.
    """
    raw = os.environ.get(GC_THRESHOLD_ENV, "").strip()
    try:
        threshold = int(raw) if raw else DEFAULT_GC_THRESHOLD
    except ValueError:
        log.warning("%s=%r is not a whole number: using %d", GC_THRESHOLD_ENV, raw, DEFAULT_GC_THRESHOLD)
        threshold = DEFAULT_GC_THRESHOLD
    if threshold < 0:
        log.warning("%s=%r is below 0 (0 leaves Python's defaults): using %d", GC_THRESHOLD_ENV, raw,
                    DEFAULT_GC_THRESHOLD)
        threshold = DEFAULT_GC_THRESHOLD
    if threshold > MAX_GC_THRESHOLD:  # gc.set_threshold refuses what does not fit a C int
        log.warning("%s=%r is above %d: using %d", GC_THRESHOLD_ENV, raw, MAX_GC_THRESHOLD, MAX_GC_THRESHOLD)
        threshold = MAX_GC_THRESHOLD
    if threshold == 0:
        return None
    gc.collect()  # what start-up left as garbage goes now, not into the frozen generation
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    return threshold


@dataclass
class RunningSystem:
    """Handle on one started actor system (Central, a Monitor, an Engine, a Driver)."""

    name: str
    supervisor: pykka.ActorRef[Any]
    directory: Directory
    escalated: threading.Event = field(default_factory=threading.Event)
    escalation_reason: str = ""
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    consumers: tuple[str, ...] = ()  # names of its Kafka consumer pumps

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block until every Kafka consumer is positioned (group joined); False on timeout.

        ``start_*`` returns as soon as the actors run; a group consumer needs a few
        more seconds to join. Records sent meanwhile are not lost (they are read
        once it joins), but callers that want an answer within a deadline wait here.
        """
        deadline = time.monotonic() + timeout
        for name in self.consumers:
            ref = self.get(name)
            if ref is None or not wait_ready(ref, timeout=max(0.0, deadline - time.monotonic())):
                return False
        return True

    def get(self, name: str) -> pykka.ActorRef[Any] | None:
        """The current actor named ``name`` (children are registered by name)."""
        return self.directory.get(name)

    def ask(self, name: str, message: Any, timeout: float = 10.0) -> Any:
        """Ask the actor named ``name``; raises LookupError when it is not running."""
        ref = self.get(name)
        if ref is None:
            raise LookupError(f"{self.name}: no running actor named {name!r}")
        return ref.ask(message, timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.supervisor.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the whole tree, children first; safe to call twice."""
        if self.supervisor.is_alive():
            try:
                self.supervisor.stop(block=True, timeout=timeout)
            except pykka.Timeout:
                log.warning("%s: did not stop within %.0f s", self.name, timeout)
        for hook in self.on_stop:
            try:
                hook()
            except Exception as exc:
                log.warning("%s: cleanup failed: %s", self.name, exc)
        self.on_stop.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the system stops by itself (escalation); True if it did."""
        return self.escalated.wait(timeout)

    def __enter__(self) -> RunningSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_system(name: str, children: list[ChildSpec], directory: Directory | None = None,
                 **options: Any) -> RunningSystem:
    """Start ``children`` under one top supervisor named ``name``."""
    directory = directory if directory is not None else Directory()
    holder: dict[str, RunningSystem] = {}
    escalated = threading.Event()

    def on_escalate(reason: str) -> None:
        if "system" in holder:
            holder["system"].escalation_reason = reason
        escalated.set()

    ref = start_tree(name, children, directory=directory, on_escalate=on_escalate, **options)
    pumps = tuple(_consumers(children))
    system = RunningSystem(name, ref, directory, escalated, consumers=pumps)
    holder["system"] = system
    return system


def _consumers(children: list[ChildSpec] | tuple[ChildSpec, ...]) -> list[str]:
    """Names of the Kafka consumer pumps in a tree of child specs (nested supervisors included)."""
    names: list[str] = []
    for spec in children:
        if issubclass(spec.actor_class, ConsumerPump):
            names.append(spec.name)
        elif issubclass(spec.actor_class, Supervisor):
            nested = spec.args[1] if len(spec.args) > 1 else spec.kwargs.get("children", ())
            names += _consumers(nested)
    return names


def run_until_signal(start: Callable[[], RunningSystem], stop: Callable[[RunningSystem], None],
                     what: str, started: Callable[[RunningSystem], str], logger: logging.Logger = log) -> int:
    """Start a system; stop it on SIGINT/SIGTERM (exit 0); exit 1 when it gives up.

    Shared by the programs' ``main`` functions.
    """
    quit_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        quit_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        system = start()
    except Exception as exc:
        logger.error("Cannot start the %s: %s", what, exc)
        return 1
    logger.info("%s", started(system))
    tune_gc()
    while not quit_requested.is_set():
        if system.wait(0.2):
            logger.error("The %s gives up: %s", what, system.escalation_reason or "a part failed too often")
            system.stop()
            return 1
    logger.info("Stopping the %s…", what)
    stop(system)
    logger.info("%s stopped", what)
    return 0
