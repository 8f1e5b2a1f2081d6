"""OTP-style supervisor for pykka actors: child specs, strategies, intensity.

A :class:`Supervisor` is itself a :class:`SupervisedActor`, so trees nest.
Children report their exit with :class:`ChildExited` (see
``actors/runtime.py``); the supervisor restarts them after a backoff computed
by tenacity, counts restarts in a sliding window (*restart intensity*: at
most ``max_restarts`` in ``period`` seconds) and, past it, stops its children
and escalates: to its own parent by crashing, or, at the top, by calling
``on_escalate`` so the process can exit with a clear line.

The *strategy* says which siblings restart with a crashed child, as in OTP:

* ``one_for_one``: the child alone (its siblings do not depend on it);
* ``rest_for_one``: the child and every child started after it (they depend
  on it: an owner comes before the links, pumps and listeners that feed it,
  so when the owner restarts they restart after it and introduce themselves
  to the new owner again);
* ``one_for_all``: every child.

Siblings restarted with a crash are stopped in reverse start order and
started again in start order; a *temporary* sibling is stopped and not
restarted. Each start of a child bumps its *generation*; a late exit notice
from an older generation is ignored, so a slow death can never kill its
replacement.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka

from actors.runtime import ChildExited, Directory, Scheduled, SupervisedActor, Supervision, backoff_strategy, schedule

log = logging.getLogger("evcharging.supervisor")

Restart = Literal["permanent", "transient", "temporary"]
"""permanent: always restarted; transient: only after a crash; temporary: never."""

Strategy = Literal["one_for_one", "rest_for_one", "one_for_all"]
"""Which siblings restart with a crashed child (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to start one child. ``kwargs`` must not contain ``supervision``."""

    name: str
    actor_class: type[SupervisedActor]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    restart: Restart = "permanent"
    shutdown_timeout: float = 5.0


class SupervisorEscalation(RuntimeError):
    """A child crashed more often than the restart intensity allows."""


# --- messages a supervisor understands --------------------------------------
@dataclass(frozen=True, slots=True)
class StartChild:
    """Add and start a child at run time (e.g. one session actor per supply)."""

    spec: ChildSpec


@dataclass(frozen=True, slots=True)
class TerminateChild:
    """Stop a child and forget its spec (it is not restarted)."""

    name: str


@dataclass(frozen=True, slots=True)
class WhichChildren:
    """Ask: returns {name: (generation, alive)}."""


@dataclass(frozen=True, slots=True)
class GetRestartLog:
    """Ask: returns a list of (name, delay_s, at) for every restart so far."""


@dataclass(frozen=True, slots=True)
class _RestartDue:
    """The backoff of restart ``incident`` is over: start its children again."""

    incident: int


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    generation: int = 0
    ref: pykka.ActorRef[Any] | None = None
    crashed_at: float | None = None


class Supervisor(SupervisedActor):
    """Restarts crashed children by its ``strategy`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        children: list[ChildSpec] | tuple[ChildSpec, ...] = (),
        *,
        directory: Directory | None = None,
        max_restarts: int = 5,
        period: float = 10.0,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        strategy: Strategy = "one_for_one",
        on_escalate: Callable[[str], None] | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        if strategy not in ("one_for_one", "rest_for_one", "one_for_all"):
            raise ValueError(f"unknown supervision strategy {strategy!r}")
        self.name = name
        self.strategy = strategy
        self.directory = directory if directory is not None else Directory()
        self.max_restarts = max_restarts
        self.period = period
        self._delay = backoff_strategy(backoff_base, backoff_max)
        self._on_escalate = on_escalate
        self._initial = list(children)
        self._children: dict[str, _Child] = {}
        self._restarts: deque[float] = deque()
        self._restart_log: list[tuple[str, float, float]] = []
        self._stopping = False
        self._incidents: dict[int, list[str]] = {}  # pending restart -> names, in start order
        self._next_incident = 0
        self._timers: dict[int, Scheduled] = {}

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        for spec in self._initial:
            self._add(spec)

    def teardown(self) -> None:
        self._stopping = True
        self._cancel_timers()
        for child in reversed(list(self._children.values())):
            self._stop_child(child)
        self._children.clear()

    # --- messages ------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case ChildExited():
                self._on_exit(message)
            case _RestartDue(incident):
                self._on_restart_due(incident)
            case StartChild(spec):
                return self._add(spec)
            case TerminateChild(name):
                child = self._children.pop(name, None)
                for pending in self._incidents.values():
                    if name in pending:
                        pending.remove(name)
                if child is not None:
                    self._stop_child(child)
                return child is not None
            case WhichChildren():
                return {n: (c.generation, bool(c.ref and c.ref.is_alive())) for n, c in self._children.items()}
            case GetRestartLog():
                return list(self._restart_log)
            case _:
                log.warning("%s: ignoring unexpected message %r", self.name, type(message).__name__)
        return None

    # --- internals -----------------------------------------------------------
    def _add(self, spec: ChildSpec) -> pykka.ActorRef[Any] | None:
        if spec.name in self._children:
            raise ValueError(f"{self.name}: a child named {spec.name!r} already exists")
        child = _Child(spec)
        self._children[spec.name] = child
        self._start(child)
        return child.ref

    def _start(self, child: _Child) -> None:
        child.generation += 1
        spec = child.spec
        supervision = Supervision(self.actor_ref, spec.name, child.generation)
        try:
            child.ref = spec.actor_class.start(*spec.args, supervision=supervision, **dict(spec.kwargs))
        except Exception as exc:  # the constructor itself failed
            child.ref = None
            self.actor_ref.tell(ChildExited(spec.name, child.generation, exc, during_start=True))
            return
        self.directory.register(spec.name, child.ref)

    def _stop_child(self, child: _Child) -> None:
        child.generation += 1  # any notice the dying actor sends is now stale
        ref, child.ref = child.ref, None
        if ref is None:
            return
        self.directory.unregister(child.spec.name, ref)
        try:
            ref.stop(block=True, timeout=child.spec.shutdown_timeout)
        except pykka.Timeout:
            log.warning("%s: child %r did not stop within %.0f s", self.name, child.spec.name,
                        child.spec.shutdown_timeout)
        except pykka.ActorDeadError:
            pass

    def _on_exit(self, notice: ChildExited) -> None:
        child = self._children.get(notice.name)
        if child is None or child.generation != notice.generation or self._stopping:
            log.debug("%s: ignoring stale exit notice of %s (gen %d)", self.name, notice.name, notice.generation)
            return
        if child.ref is not None:
            self.directory.unregister(notice.name, child.ref)
        child.ref = None
        crashed = notice.error is not None
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and not crashed):
            del self._children[notice.name]
            if crashed:
                log.warning("%s: %s stopped after an error: %s", self.name, notice.name, _describe(notice.error))
            return
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self.period:
            self._restarts.popleft()
        what = _describe(notice.error) if crashed else "stopped unexpectedly"
        if notice.during_start:
            what = f"failed to start ({what})"
        if len(self._restarts) > self.max_restarts:
            self._escalate(
                f"{self.name}: {notice.name} {what}; it needed more than {self.max_restarts} restarts "
                f"in {self.period:g} s, so the supervisor gives up"
            )
            return
        group = self._restart_group(notice.name)
        for sibling in reversed(group[1:]):  # dependants first, in reverse start order
            self._stop_child(sibling)
            if sibling.spec.restart == "temporary":
                del self._children[sibling.spec.name]
        names = [c.spec.name for c in group if c.spec.name in self._children]
        for pending in self._incidents.values():  # this restart takes them over
            pending[:] = [n for n in pending if n not in names]
        delay = self._delay(len(self._restarts))
        also = f" with {', '.join(names[1:])} ({self.strategy})" if len(names) > 1 else ""
        log.warning(
            "%s: %s %s; restarting it%s in %.2f s (restart %d of %d allowed in %g s)",
            self.name, notice.name, what, also, delay, len(self._restarts), self.max_restarts, self.period,
        )
        child.crashed_at = now
        self._next_incident += 1
        self._incidents[self._next_incident] = names
        self._timers[self._next_incident] = schedule(delay, self.actor_ref, _RestartDue(self._next_incident))

    def _restart_group(self, name: str) -> list[_Child]:
        """The crashed child first, then the siblings its strategy restarts with it, in start order."""
        children = list(self._children.values())
        index = next(i for i, c in enumerate(children) if c.spec.name == name)
        if self.strategy == "one_for_one":
            return [children[index]]
        others = children[index + 1:] if self.strategy == "rest_for_one" else children[:index] + children[index + 1:]
        return [children[index], *others]

    def _on_restart_due(self, incident: int) -> None:
        names = self._incidents.pop(incident, [])
        self._timers.pop(incident, None)
        if self._stopping:
            return
        order = {n: i for i, n in enumerate(self._children)}
        for name in sorted(names, key=lambda n: order.get(n, len(order))):
            child = self._children.get(name)
            if child is None or child.ref is not None:
                continue
            self._start(child)
            if child.crashed_at is not None and child.ref is not None:
                delay = time.monotonic() - child.crashed_at
                child.crashed_at = None
                self._restart_log.append((name, delay, time.time()))
                log.info("%s: restarted %s after %.3f s (generation %d)", self.name, name, delay, child.generation)

    def _cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._incidents.clear()

    def _escalate(self, reason: str) -> None:
        log.error(reason)
        self._stopping = True
        self._cancel_timers()
        for child in reversed(list(self._children.values())):
            self._stop_child(child)
        self._children.clear()
        if self.supervision is not None:
            raise SupervisorEscalation(reason)  # crash: our own supervisor sees it
        if self._on_escalate is not None:
            try:
                self._on_escalate(reason)
            except Exception as exc:
                log.error("%s: escalation handler failed: %s", self.name, exc)
        self.actor_ref.stop(block=False)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "stopped"
    text = str(error) or type(error).__name__
    return f"crashed ({type(error).__name__}: {text})" if str(error) else f"crashed ({text})"


def spawner(supervisor: pykka.ActorRef[Supervisor], timeout: float = 10.0,
            restart: Restart = "temporary") -> Callable[..., Any]:
    """A ``spawn(name, cls, args, kwargs)`` function for actors that start children.

    Transport and the domain actors cannot import this module; the wiring
    code hands them this function instead, which starts a child of
    ``supervisor`` with the given ``restart`` policy. Call it from any thread
    but the supervisor's own.
    """

    def spawn(name: str, actor_class: type[SupervisedActor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = ChildSpec(name, actor_class, args, kwargs, restart=restart)
        return supervisor.ask(StartChild(spec), timeout=timeout)

    return spawn


def spawner_by_name(directory: Directory, supervisor_name: str, timeout: float = 10.0,
                    restart: Restart = "temporary", *, wait: bool = False) -> Callable[..., Any]:
    """Like :func:`spawner`, but finds the supervisor by name at each call,
    so it keeps working after that supervisor was itself restarted.

    ``wait``: while it is being restarted (its owner restarted, rest_for_one),
    block until it is back, at most ``timeout`` seconds — only for callers on a
    plain thread (a listener's handshake); an actor's spawner must not wait,
    it fails at once instead.
    """

    def spawn(name: str, actor_class: type[SupervisedActor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        deadline = time.monotonic() + timeout
        supervisor = directory.wait_for(supervisor_name, timeout) if wait else directory.get(supervisor_name)
        if supervisor is None:
            raise RuntimeError(f"supervisor {supervisor_name!r} is not running")
        try:
            return spawner(supervisor, timeout, restart)(name, actor_class, args, kwargs)
        except pykka.ActorDeadError:  # stopped between the lookup and the ask: once more
            return spawn(name, actor_class, args, kwargs) if time.monotonic() < deadline else None

    return spawn


def start_tree(
    name: str,
    children: list[ChildSpec],
    **options: Any,
) -> pykka.ActorRef[Supervisor]:
    """Start a top-level supervisor and return once its children were started.

    ``Supervisor.start`` alone returns before the children exist (they are
    started in the supervisor's own thread); the ask below waits for that.
    Options are those of :class:`Supervisor`.
    """
    ref = Supervisor.start(name, children, **options)
    _wait_started(ref, options.get("directory"))
    return ref


def _wait_started(ref: pykka.ActorRef[Supervisor], directory: Directory | None, timeout: float = 30) -> None:
    """Return once ``ref`` and every supervisor below it have started their children."""
    names: dict[str, tuple[int, bool]] = ref.ask(WhichChildren(), block=True, timeout=timeout)
    if directory is None:
        return
    for name in names:
        child = directory.get(name)
        if child is not None and issubclass(child.actor_class, Supervisor):
            _wait_started(child, directory, timeout)
