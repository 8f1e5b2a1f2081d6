"""OTP-style supervisor for pykka actors: child specs, one-for-one, intensity.

A :class:`Supervisor` is itself a :class:`SupervisedActor`, so trees nest.
Children report their exit with :class:`ChildExited` (see
``transport/runtime.py``); the supervisor restarts them after a backoff
computed by tenacity, counts restarts in a sliding window (*restart
intensity*: at most ``max_restarts`` in ``period`` seconds) and, past it,
stops its children and escalates: to its own parent by crashing, or, at the
top, by calling ``on_escalate`` so the process can exit with a clear line.

Each start of a child bumps its *generation*; a late exit notice from an
older generation is ignored, so a slow death can never kill its replacement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import pykka
from transport.runtime import ChildExited, Directory, SupervisedActor, Supervision, backoff_strategy, schedule

log = logging.getLogger("evcharging.supervisor")

Restart = Literal["permanent", "transient", "temporary"]
"""permanent: always restarted; transient: only after a crash; temporary: never."""


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
    name: str
    generation: int


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    generation: int = 0
    ref: pykka.ActorRef[Any] | None = None
    crashed_at: float | None = None
    timer: threading.Timer | None = None


class Supervisor(SupervisedActor):
    """One-for-one supervisor: a crashed child is restarted alone."""

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
        on_escalate: Callable[[str], None] | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.name = name
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

    # --- lifecycle ------------------------------------------------------------
    def setup(self) -> None:
        for spec in self._initial:
            self._add(spec)

    def teardown(self) -> None:
        self._stopping = True
        for child in reversed(list(self._children.values())):
            self._stop_child(child)
        self._children.clear()

    # --- messages ------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case ChildExited():
                self._on_exit(message)
            case _RestartDue(name, generation):
                self._on_restart_due(name, generation)
            case StartChild(spec):
                return self._add(spec)
            case TerminateChild(name):
                child = self._children.pop(name, None)
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
        if child.timer is not None:
            child.timer.cancel()
        child.generation += 1  # any notice the dying actor sends is now stale
        ref, child.ref = child.ref, None
        if ref is None:
            return
        self.directory.unregister(child.spec.name, ref)
        try:
            ref.stop(block=True, timeout=child.spec.shutdown_timeout)
        except pykka.Timeout:
            log.warning("%s: child %r did not stop within %.0f s", self.name, child.spec.name, child.spec.shutdown_timeout)
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
        delay = self._delay(len(self._restarts))
        log.warning(
            "%s: %s %s; restarting in %.2f s (restart %d of %d allowed in %g s)",
            self.name, notice.name, what, delay, len(self._restarts), self.max_restarts, self.period,
        )
        child.crashed_at = now
        child.timer = schedule(delay, self.actor_ref, _RestartDue(notice.name, child.generation))

    def _on_restart_due(self, name: str, generation: int) -> None:
        child = self._children.get(name)
        if child is None or child.generation != generation or self._stopping:
            return
        child.timer = None
        self._start(child)
        if child.crashed_at is not None and child.ref is not None:
            delay = time.monotonic() - child.crashed_at
            self._restart_log.append((name, delay, time.time()))
            log.info("%s: restarted %s after %.3f s (generation %d)", self.name, name, delay, child.generation)

    def _escalate(self, reason: str) -> None:
        log.error(reason)
        self._stopping = True
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


def spawner(supervisor: pykka.ActorRef[Supervisor], timeout: float = 10.0) -> Callable[..., Any]:
    """A ``spawn(name, cls, args, kwargs)`` function for transport actors.

    Transport cannot import this module; the wiring code hands it this
    function instead, which starts a *temporary* child of ``supervisor``.
    Call it from a plain thread, never from the supervisor's own thread.
    """

    def spawn(name: str, actor_class: type[SupervisedActor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = ChildSpec(name, actor_class, args, kwargs, restart="temporary")
        return supervisor.ask(StartChild(spec), timeout=timeout)

    return spawn


def spawner_by_name(directory: Directory, supervisor_name: str, timeout: float = 10.0) -> Callable[..., Any]:
    """Like :func:`spawner`, but finds the supervisor by name at each call,
    so it keeps working after that supervisor was itself restarted."""

    def spawn(name: str, actor_class: type[SupervisedActor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        supervisor = directory.get(supervisor_name)
        if supervisor is None:
            raise RuntimeError(f"supervisor {supervisor_name!r} is not running")
        return spawner(supervisor, timeout)(name, actor_class, args, kwargs)

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
    ref.ask(WhichChildren(), timeout=30)
    return ref
