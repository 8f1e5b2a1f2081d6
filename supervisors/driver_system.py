"""EV_Driver: the driver app as one supervised actor system.

Children of the "driver" supervisor, started in this order:

* ``publisher`` — the only Kafka producer (``driver_requests``);
* ``pump``      — a :class:`~transport.kafka.ConsumerPump` on this driver's
  partition of ``driver_responses`` (``partition_key=driver_id``), asking
  ``driver`` to handle each poll;
* ``driver``    — :class:`~actors.driver.DriverActor`, the domain state;
* ``console``   — a :class:`~actors.console.ConsoleReader` (unless --no-console).

The driver sends nothing before its pump is positioned: the pump starts at
the end of the partition, so an answer published before that would be lost.
The actor itself polls the pump's readiness with a timer (so a restarted
driver or pump is handled the same way); :func:`start_driver` also waits for
it, so that a caller gets a driver that is already listening.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from actors.console import ConsoleReader
from actors.driver import DriverActor
from supervisors import options
from supervisors.logs import setup_logging
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, start_system
from transport import protocol
from transport.broker import BrokerUnavailable, KafkaSettings, ensure_topics
from transport.kafka import ConsumerPump, Publisher
from transport.runtime import Directory

log = logging.getLogger("evcharging.driver")


@dataclass(frozen=True, slots=True)
class DriverConfig:
    """Everything one driver app needs; each field is a flag of EV_Driver."""

    broker: str
    driver_id: str
    services_file: str | None = None  # None: interactive mode
    pause: float = 4.0
    request_timeout: float = 10.0
    topic_prefix: str = ""
    console: bool = True
    console_stream: TextIO | None = None  # None: stdin
    exit_when_done: bool = False
    results_json: str | None = None  # file mode: write the results here (when done, and on stop)
    hello_retry_max: float = 15.0
    ticket_notice_interval: float = 30.0
    ready_timeout: float = 20.0  # how long start_driver waits for the pump (it keeps trying after)
    # An idle pump polls the broker this often: 10 ms (the transport default) costs ~10 % of a CPU
    # per driver; 100 ms costs ~2 % and adds ~20 ms to an answer, nothing a person notices.
    fetch_max_wait_ms: int = 100


def read_services(path: str | Path) -> tuple[str, ...]:
    """CP ids from a services file: one per line; blank lines and ``#`` comments skipped."""
    ids: list[str] = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) > 1 or len(line) > protocol.ID_MAX_LEN:
            raise ValueError(f"{path}, line {number}: {line!r} is not a CP id (one id per line)")
        ids.append(line)
    return tuple(ids)


def start_driver(config: DriverConfig) -> RunningSystem:
    """Start the driver's actor system; returns once its pump listens (or ready_timeout passed).

    Raises ValueError/OSError for a bad services file (nothing is started then).
    """
    services = read_services(config.services_file) if config.services_file else None
    settings = KafkaSettings(bootstrap=config.broker, topic_prefix=config.topic_prefix,
                             fetch_max_wait_ms=config.fetch_max_wait_ms)
    try:
        ensure_topics(settings, timeout=5.0)
    except BrokerUnavailable as exc:  # not fatal: publisher and pump keep retrying
        log.warning("%s — will keep trying", exc)
    directory = Directory()
    driver_kwargs: dict[str, Any] = {
        "services": services, "pause": config.pause, "request_timeout": config.request_timeout,
        "hello_backoff_max": config.hello_retry_max, "ticket_notice_interval": config.ticket_notice_interval,
        "exit_when_done": config.exit_when_done,
        "report": _results_writer(Path(config.results_json)) if config.results_json else None,
    }
    # Started in this order and stopped in reverse: the driver stops before its
    # links (so it never mistakes the shutdown for a broken link) and the
    # publisher last (so the ticket acks the driver queued are flushed).
    children = [
        ChildSpec("publisher", Publisher, (settings,), {"component": "publisher"}),
        ChildSpec("pump", ConsumerPump, (settings, ("driver_responses",), "driver", directory),
                  {"partition_key": config.driver_id, "component": "pump"}),
        ChildSpec("driver", DriverActor, (config.driver_id, directory), driver_kwargs),
    ]
    if config.console:
        children.append(ChildSpec("console", ConsoleReader, ("driver", directory), {"stream": config.console_stream}))
    system = start_system("driver", children, directory=directory)
    if not system.wait_ready(config.ready_timeout):
        log.warning("Cannot reach Kafka at %s yet — the driver keeps trying", config.broker)
    return system


def _results_writer(path: Path) -> Any:
    """A report hook that replaces ``path`` atomically (a reader never sees half a file)."""

    def write(snapshot: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(snapshot, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    return write


# --- the command line -------------------------------------------------------------
def _bootstrap(text: str) -> str:
    """HOST:PORT (or a comma-separated list of them), checked."""
    for part in text.split(","):
        options.host_port(part.strip())
    return text


def _driver_id(text: str) -> str:
    complaint = protocol.IdRule().complaint(text)
    if complaint:
        raise argparse.ArgumentTypeError(f"driver id {complaint}")
    return text


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="EV_Driver",
        description="The driver app: list charging points, charge, stop, see live consumption and tickets. "
                    "Interactive by default; --services FILE runs one supply per CP id in FILE.",
    )
    options.positional_or_env(p, "broker", "EV_BROKER", "Kafka bootstrap server HOST:PORT", type=_bootstrap)
    options.positional_or_env(p, "driver_id", "EV_DRIVER_ID", "this driver's id", type=_driver_id)
    options.add(p, "--services", help="file with one CP id per line (blank lines and # comments skipped)")
    options.add(p, "--pause", default=4.0, type=_non_negative, help="seconds between two services")
    options.add(p, "--request-timeout", default=10.0, type=_positive,
                help="seconds to wait for Central's answer before saying it is unavailable")
    options.add(p, "--hello-retry-max", default=15.0, type=_positive,
                help="longest wait between two hellos while Central does not answer")
    options.add(p, "--ticket-notice-interval", default=30.0, type=_positive,
                help="say 'still waiting for the ticket' after this many quiet seconds")
    options.add(p, "--results-json", help="with --services: write the per-service results to this JSON file")
    options.add(p, "--topic-prefix", default="", help="prefix of every Kafka topic (isolation)")
    options.add(p, "--log-file", help="also write everything (with details) to this file")
    options.add(p, "--log-level", default="INFO", help="terminal log level (DEBUG, INFO, WARNING)")
    options.add(p, "--no-console", default=False, action="store_true", help="do not read commands from stdin")
    options.add(p, "--exit-when-done", default=False, action="store_true",
                help="stop when every service of --services is done")
    return p


def main(argv: list[str]) -> int:
    """Run EV_Driver until quit, a signal, or (with --exit-when-done) the last service."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (argparse printed why)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    setup_logging("driver", args.driver_id, log_file=args.log_file, level=args.log_level)
    config = DriverConfig(
        broker=args.broker, driver_id=args.driver_id, services_file=args.services, pause=args.pause,
        request_timeout=args.request_timeout, topic_prefix=args.topic_prefix, console=not args.no_console,
        exit_when_done=args.exit_when_done, results_json=args.results_json, hello_retry_max=args.hello_retry_max,
        ticket_notice_interval=args.ticket_notice_interval,
    )
    stop = threading.Event()
    restore = _install_signal_handlers(stop)
    system: RunningSystem | None = None
    try:
        system = start_driver(config)
        while not stop.is_set() and system.alive:
            stop.wait(0.2)
        if stop.is_set():
            log.info("Stopping the driver app (a supply in progress goes on at the CP)")
        if system.escalated.is_set():
            log.error("The driver app stopped: %s", system.escalation_reason or "a part kept failing")
            return 1
        return 0
    except (OSError, ValueError) as exc:
        log.error("Cannot start the driver: %s", exc)
        return 2
    except Exception as exc:  # never a traceback on the terminal (the log file keeps it)
        log.error("The driver app failed: %s", exc, exc_info=True)
        return 1
    finally:
        if system is not None:
            system.stop()
        restore()


def _install_signal_handlers(stop: threading.Event) -> Any:
    """SIGINT/SIGTERM/SIGHUP set ``stop``; returns a function that restores the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    saved: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            saved[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in saved.items():
            signal.signal(sig, old)

    return restore
