"""EV_Driver: the driver app as one supervised actor system.

Children of the "driver" supervisor (``rest_for_one``), started in this
order — an owner before what feeds it, so that when an owner restarts, what
depends on it restarts after it and introduces itself to the new owner:

* ``publisher`` — the only Kafka producer (``driver_requests``);
* ``driver``    — :class:`~actors.driver.DriverActor`, request correlation:
  pending requests, timeouts, the hello, the live supply, tickets seen;
* ``services``  — :class:`~actors.driver_services.ServicesRunner`, the
  services file and its results (only with --services); its progress is kept
  in a store created here, so a restarted runner goes on where it was;
* ``output``    — :class:`~actors.driver_console.DriverConsole`, every
  sentence shown to the person, and typed lines parsed into commands;
* ``pump``      — a :class:`~transport.kafka.ConsumerPump` on this driver's
  partition of ``driver_responses`` (``partition_key=driver_id``), asking
  ``driver`` to handle each poll;
* ``console``   — a :class:`~actors.console.ConsoleReader` telling ``output``
  each typed line (unless --no-console).

With a secret (``--secret-file`` or ``EV_DRIVER_SECRET``) the driver computes
its verifier once here and ``driver`` signs every request it publishes
(docs/protocol.md, "Signed driver requests"); without one its requests go
unsigned (development: a Central with ``--enroll open``), said once at start.

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
from actors.driver_console import DriverConsole
from actors.driver_services import ServicesProgressStore, ServicesRunner
from actors.runtime import Directory
from supervisors import options
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, start_system
from transport import protocol, security
from transport.broker import BrokerUnavailable, KafkaSettings, ensure_topics
from transport.kafka import ConsumerPump, Publisher

log = logging.getLogger("evcharging.driver")

SECRET_ENV = "EV_DRIVER_SECRET"
"""The environment variable that may hold the driver's secret itself (docs/protocol.md, "Credentials")."""


# --- argument types -----------------------------------------------------------------
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


@dataclass(frozen=True, slots=True)
class DriverConfig:
    """Everything one driver app needs; each field but ``console`` (``--no-console``) and
    ``console_stream`` is an argument of EV_Driver.

    The actors' timings take their defaults from the actors' constructors (see :mod:`supervisors.settings`).
    """

    broker: str = setting(help="Kafka bootstrap server HOST:PORT", positional=True, parse=options.bootstrap)
    driver_id: str = setting(help="this driver's id", positional=True, parse=_driver_id)
    services_file: str | None = setting(None, flag="--services",  # None: interactive mode
                                        help="file with one CP id per line (blank lines and # comments skipped)")
    pause: float = inherit(ServicesRunner, "pause", parse=_non_negative, help="seconds between two services")
    request_timeout: float = inherit(DriverActor, "request_timeout", parse=_positive,
                                     help="seconds to wait for Central's answer before saying it is unavailable")
    topic_prefix: str = setting("", help="prefix of every Kafka topic (isolation)")
    console: bool = internal(True)
    console_stream: TextIO | None = internal(None)  # None: stdin
    exit_when_done: bool = setting(False, help="stop when every service of --services is done")
    results_json: str | None = setting(None, help="with --services: write the per-service results to this JSON "
                                                  "file (when done, and on stop)")
    hello_retry_max: float = inherit(DriverActor, "hello_backoff_max", parse=_positive,
                                     help="longest wait between two hellos while Central does not answer")
    ticket_notice_interval: float = inherit(DriverActor, "ticket_notice_interval", parse=_positive,
                                            help="say 'still waiting for the ticket' after this many quiet seconds")
    ready_timeout: float = setting(20.0, parse=_positive,
                                   help="seconds to wait for Kafka at start before saying it is unreachable "
                                        "(the driver keeps trying after)")
    # An idle pump polls the broker this often: 10 ms (the transport default) costs ~10 % of a CPU
    # per driver; 100 ms costs ~2 % and adds ~20 ms to an answer, nothing a person notices.
    fetch_max_wait_ms: int = setting(100, help="longest wait (ms) of one poll of the driver's answers")
    secret_file: str | None = setting(None, help="file with this driver's secret (the bare secret, or the registry's "
                                                 f"JSON credential); else {SECRET_ENV} holds it; without either, "
                                                 "requests go unsigned (a Central with security on denies them)")


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

    Raises ValueError/OSError for a bad services file or secret (nothing is started then).
    """
    services = read_services(config.services_file) if config.services_file else None
    verifier = driver_verifier(config)
    settings = KafkaSettings(bootstrap=config.broker, topic_prefix=config.topic_prefix,
                             fetch_max_wait_ms=config.fetch_max_wait_ms)
    try:
        ensure_topics(settings, timeout=5.0)
    except BrokerUnavailable as exc:  # not fatal: publisher and pump keep retrying
        log.warning("%s — will keep trying", exc)
    directory = Directory()
    driver_kwargs: dict[str, Any] = {
        "request_timeout": config.request_timeout, "hello_backoff_max": config.hello_retry_max,
        "ticket_notice_interval": config.ticket_notice_interval, "verifier": verifier,
    }
    # Started in this order (see the module docstring), stopped in reverse: the
    # pump stops before the driver (which never mistakes the shutdown for a
    # broken link: a missing pump is just waited for), the services runner
    # writes its report as it stops, and the publisher stops last (so the
    # ticket acks the driver queued are flushed).
    children = [
        ChildSpec("publisher", Publisher, (settings,), {"component": "publisher"}),
        ChildSpec("driver", DriverActor, (config.driver_id, directory), driver_kwargs),
    ]
    if services is not None:
        children.append(ChildSpec("services", ServicesRunner, (config.driver_id, directory, services), {
            "pause": config.pause, "progress": ServicesProgressStore(), "exit_when_done": config.exit_when_done,
            "report": _results_writer(Path(config.results_json)) if config.results_json else None,
        }))
    children += [
        ChildSpec("output", DriverConsole, (config.driver_id, directory),
                  {"services_total": len(services) if services is not None else None}),
        ChildSpec("pump", ConsumerPump, (settings, ("driver_responses",), "driver", directory),
                  {"partition_key": config.driver_id, "component": "pump"}),
    ]
    if config.console:
        children.append(ChildSpec("console", ConsoleReader, ("output", directory), {"stream": config.console_stream}))
    system = start_system("driver", children, directory=directory, strategy="rest_for_one")
    if not system.wait_ready(config.ready_timeout):
        log.warning("Cannot reach Kafka at %s yet — the driver keeps trying", config.broker)
    return system


def driver_verifier(config: DriverConfig) -> bytes | None:
    """The verifier every request is signed with, computed once per process (Argon2id, ~60 ms), from
    ``--secret-file`` or else ``EV_DRIVER_SECRET``; None (and one warning) without a secret.

    Raises :class:`~transport.security.SecurityError` (a ValueError) for an unreadable file, one
    naming another driver, or a secret of the wrong length.
    """
    credential = security.load_credential("driver", config.driver_id, file=config.secret_file, env=SECRET_ENV)
    if credential is None:
        log.warning("No secret for driver %s (--secret-file or %s): requests go unsigned, and a Central "
                    "with security on denies them", config.driver_id, SECRET_ENV)
        return None
    return credential.verifier()


def _results_writer(path: Path) -> Any:
    """A report hook that replaces ``path`` atomically (a reader never sees half a file)."""

    def write(snapshot: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(snapshot, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    return write


# --- the command line -------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """EV_Driver's parser: one argument per field of :class:`DriverConfig`, then the process's."""
    p = parser_for(DriverConfig, "EV_Driver",
                   "The driver app: list charging points, charge, stop, see live consumption and tickets. "
                   "Interactive by default; --services FILE runs one supply per CP id in FILE.")
    add_process_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> DriverConfig:
    return from_args(DriverConfig, args, console=not args.no_console)


def check_config(config: DriverConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None (the argument types check the rest)."""
    if config.fetch_max_wait_ms < 1:
        return "--fetch-max-wait-ms must be at least 1"
    return None


def main(argv: list[str]) -> int:
    """Run EV_Driver until quit, a signal, or (with --exit-when-done) the last service."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (argparse printed why)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    setup_logging("driver", args.driver_id, log_file=args.log_file, level=args.log_level)
    config = config_from_args(args)
    problem = check_config(config)
    if problem:
        log.error("Cannot start the driver: %s", problem)
        return 2
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
        log.exception("The driver app failed: %s", exc)
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
