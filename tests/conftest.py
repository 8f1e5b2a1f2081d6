"""Shared fixtures: every test ends with no actor alive; one local broker per run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pykka
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """pykka threads are not daemons: a test that leaks one would hang the run."""
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator["LocalBroker"]:
    """One real Tansu broker for the whole run (or EVCHARGING_TEST_BROKER=host:port)."""
    from transport.broker import LocalBroker

    log_dir = tmp_path_factory.mktemp("broker")
    b = LocalBroker(log_path=log_dir / "tansu.log")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def kafka_settings(broker: "LocalBroker", request: pytest.FixtureRequest) -> "KafkaSettings":
    """Settings with a topic prefix unique to the test, topics created."""
    import uuid

    from transport.broker import KafkaSettings, ensure_topics

    prefix = f"t{uuid.uuid4().hex[:8]}."
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=prefix)
    ensure_topics(settings)
    return settings


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    """Print the fault matrix (tests/fault_matrix.py) when any scenario recorded a row."""
    from tests import fault_matrix

    if fault_matrix.ROWS:
        terminalreporter.section("fault matrix")
        terminalreporter.write_line(fault_matrix.render())
        bad = [r.scenario for r in fault_matrix.ROWS if r.lost or r.double_billed]
        terminalreporter.write_line("lost and double-billed are 0 everywhere" if not bad
                                    else f"LOST OR DOUBLE-BILLED SUPPLIES in: {', '.join(bad)}")
