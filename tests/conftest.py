"""Shared fixtures: a test that leaves an actor running fails; one local broker per run."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka
import pytest

if TYPE_CHECKING:
    from transport.broker import KafkaSettings, LocalBroker

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


#: How long a test's actors may take to finish stopping after its fixtures were torn down
#: (a supervisor stops its children one by one; a stop may be asynchronous).
LEAK_GRACE_S = 3.0


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """Every test must stop the actors it started: one still running afterwards fails the test.

    pykka threads are not daemons, so a leaked actor would hang the run: they are
    stopped here all the same, and then the test fails naming their classes.
    This fixture is set up first and torn down last, so the test's own fixtures
    (``with`` blocks, ``yield`` fixtures that stop their system) have run by
    then. No fixture of broader scope (module, session) keeps actors across
    tests: ``broker`` is a child process, not an actor. One that did would have
    to be exempted here explicitly, by the actors' URNs.
    """
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while (alive := [ref for ref in pykka.ActorRegistry.get_all() if ref.is_alive()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
    if alive:
        counts = Counter(ref.actor_class.__name__ for ref in alive)
        names = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(counts.items()))
        pytest.fail(f"the test left {len(alive)} actor(s) running: {names} "
                    "(stop what you start: a `with` block, or a fixture that stops it in its teardown)",
                    pytrace=False)


@pytest.fixture
def stop_at_end() -> Iterator[Callable[[Any], Any]]:
    """``sup = stop_at_end(Supervisor.start(...))``: the ref is stopped when the test ends, passed or failed
    (stopping a ref that already stopped does nothing)."""
    refs: list[Any] = []

    def keep(ref: Any) -> Any:
        refs.append(ref)
        return ref

    yield keep
    for ref in reversed(refs):
        ref.stop()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One real Tansu broker for the whole run (or EVCHARGING_TEST_BROKER=host:port)."""
    from transport.broker import LocalBroker

    log_dir = tmp_path_factory.mktemp("broker")
    b = LocalBroker(log_path=log_dir / "tansu.log")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def kafka_settings(broker: LocalBroker, request: pytest.FixtureRequest) -> KafkaSettings:
    """Settings with a topic prefix unique to the test, topics created."""
    import uuid

    from transport.broker import KafkaSettings, ensure_topics

    prefix = f"t{uuid.uuid4().hex[:8]}."
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=prefix)
    ensure_topics(settings)
    return settings


#: The multi-process scenarios run one at a time (one xdist group), while the in-process tests
#: share the other worker: two fault scenarios at once on two cores would time each other out.
HEAVY_GROUP = "processes"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group(HEAVY_GROUP))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Fault-matrix rows travel with the test's report, so the table is complete when the tests
    run in several processes (pytest-xdist) as well as in one."""
    outcome = yield
    if call.when == "teardown" and _IN_WORKER:
        from tests import fault_matrix

        outcome.get_result().user_properties.extend(fault_matrix.take())


_IN_WORKER = False


def pytest_configure(config: pytest.Config) -> None:
    global _IN_WORKER
    _IN_WORKER = hasattr(config, "workerinput")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from tests import fault_matrix

    if not _IN_WORKER:  # the process that prints the table
        fault_matrix.give(value for name, value in report.user_properties if name == fault_matrix.PROPERTY)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the fault matrix (tests/fault_matrix.py) when any scenario recorded a row."""
    from tests import fault_matrix

    if fault_matrix.ROWS:
        terminalreporter.section("fault matrix")
        terminalreporter.write_line(fault_matrix.render())
        bad = [r.scenario for r in fault_matrix.ROWS if r.lost or r.double_billed]
        terminalreporter.write_line("lost and double-billed are 0 everywhere" if not bad
                                    else f"LOST OR DOUBLE-BILLED SUPPLIES in: {', '.join(bad)}")
    if fault_matrix.ATTACKS:
        terminalreporter.section("fault matrix: attacks")
        terminalreporter.write_line(fault_matrix.render_attacks())
        bad = [r.scenario for r in fault_matrix.ATTACKS if r.forged_bills or r.takeovers or not r.genuine_ok]
        terminalreporter.write_line("0 forged bills and 0 takeovers everywhere; genuine traffic unaffected"
                                    if not bad else f"AN ATTACK GOT THROUGH in: {', '.join(bad)}")
