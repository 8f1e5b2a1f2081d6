"""EV_CP_E: one charging point's Engine as a supervised actor system.

Children of the top supervisor, in start order:

* ``publisher``        — the only Kafka producer (telemetry, completions);
* ``engine``           — :class:`~actors.engine.EngineActor`, the charger;
* ``monitor-conns``    — a supervisor for the Monitor's connection actors;
* ``monitor-listener`` — accepts the Monitor's socket (owner ``engine``);
* ``console``          — keys typed at the CP (unless ``--no-console``).

The publisher starts first so the Engine's start-up recovery finds it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from actors.console import ConsoleReader
from actors.engine import EngineActor, EngineOptions, ShutdownSupply
from supervisors import options as opts
from supervisors.logs import setup_logging
from supervisors.supervisor import ChildSpec, Supervisor, spawner
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport.broker import KafkaSettings
from transport.kafka import Publisher
from transport.listener import Listener
from transport.runtime import Directory

log = logging.getLogger("evcharging.engine")

__all__ = ["EngineConfig", "start_engine", "stop_engine", "engine_port", "run_until_signal", "main"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one Engine needs; each field is a flag of EV_CP_E."""

    broker: str = "127.0.0.1:9092"
    listen_host: str = "0.0.0.0"
    listen_port: int = 7001
    journal: str | None = None  # default: run/engine-<listen_port>.journal
    power_kw: float = 7.4
    tick: float = 1.0
    auto_plug: bool = False
    plug_delay: float = 1.0
    plug_timeout: float = 60.0
    supply_seconds: float | None = None
    topic_prefix: str = ""
    cp_id: str | None = None  # optional: the id this Engine expects its Monitor to confirm
    console: bool = True
    console_stream: TextIO | None = None  # None: stdin
    max_connections: int = 4
    name: str = "EV_CP_E"

    @property
    def journal_path(self) -> str:
        return self.journal or str(Path("run") / f"engine-{self.listen_port}.journal")

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.broker, topic_prefix=self.topic_prefix)

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            power_kw=self.power_kw, tick=self.tick, auto_plug=self.auto_plug, plug_delay=self.plug_delay,
            plug_timeout=self.plug_timeout, supply_seconds=self.supply_seconds, expected_cp_id=self.cp_id,
        )


def _lazy_spawner(directory: Directory, name: str) -> Callable[..., Any]:
    """A spawn function that finds the connection supervisor at spawn time,
    so it keeps working after that supervisor was restarted."""

    def spawn(*args: Any) -> Any:
        ref = directory.get(name)
        if ref is None:
            raise LookupError(f"the {name} supervisor is not running")
        return spawner(ref)(*args)

    return spawn


def start_engine(config: EngineConfig = EngineConfig()) -> RunningSystem:
    """Start an Engine and return once its children run (the listener is bound)."""
    Path(config.journal_path).parent.mkdir(parents=True, exist_ok=True)
    directory = Directory()
    children = [
        ChildSpec("publisher", Publisher, (config.kafka,), {"component": "engine-publisher"}),
        ChildSpec("engine", EngineActor, (config.journal_path, directory),
                  {"options": config.engine_options, "publisher": "publisher"}),
        ChildSpec("monitor-conns", Supervisor, ("monitor-conns",), {"directory": directory}),
        ChildSpec("monitor-listener", Listener,
                  (config.listen_host, config.listen_port, "engine", directory,
                   _lazy_spawner(directory, "monitor-conns")),
                  {"max_connections": config.max_connections, "component": "monitor-listener"}),
    ]
    if config.console:
        children.append(ChildSpec("console", ConsoleReader, ("engine", directory),
                                  {"stream": config.console_stream}))
    return start_system(config.name, children, directory=directory)


def engine_port(system: RunningSystem, timeout: float = 5.0) -> int:
    """The port the Engine listens on (useful with listen_port=0)."""
    return int(system.ask("monitor-listener", "port", timeout=timeout))


def stop_engine(system: RunningSystem, grace: float = 5.0) -> None:
    """Stop politely: end a live supply, give Kafka ``grace`` s to confirm, stop."""
    try:
        request = ShutdownSupply()
        system.ask("engine", request, timeout=grace)
        if not request.drained.wait(grace):
            log.warning("Kafka did not confirm every completion within %g s — "
                        "they will be sent again when this Engine starts", grace)
    except Exception as exc:  # the engine is not running: nothing to end
        log.debug("no supply to end before stopping: %s", exc)
    system.stop()


# --- the command ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="EV_CP_E", description="A charging point's Engine (the charger).")
    opts.positional_or_env(p, "broker", "EV_BROKER", "Kafka bootstrap server HOST:PORT", type=opts.host_port)
    opts.add(p, "--listen", default="0.0.0.0:7001", type=opts.host_port,
             help="HOST:PORT where the Monitor connects")
    opts.add(p, "--journal", help="the supply journal file (default run/engine-<port>.journal)")
    opts.add(p, "--power-kw", default=7.4, type=float, help="charging power in kW")
    opts.add(p, "--tick", default=1.0, type=float, help="seconds between telemetry records")
    opts.add(p, "--auto-plug", action="store_true", default=False,
             help="plug the vehicle in by itself (unattended mode)")
    opts.add(p, "--plug-delay", default=1.0, type=float, help="seconds before the automatic plug-in")
    opts.add(p, "--plug-timeout", default=60.0, type=float,
             help="seconds to wait for a plug-in before ending the supply with 0 kWh")
    opts.add(p, "--supply-seconds", default=None, type=float,
             help="unplug by itself after this many seconds of supply (unattended mode)")
    opts.add(p, "--topic-prefix", default="", help="prefix of every Kafka topic name (isolation)")
    opts.add(p, "--cp-id", default=None, help="the CP id this Engine expects (optional; also its log tag)")
    opts.add(p, "--max-connections", default=4, type=int, help="Monitor connections accepted at once")
    opts.add(p, "--log-file", help="also write a detailed log here")
    opts.add(p, "--log-level", default="INFO", help="terminal log level")
    opts.add(p, "--no-console", action="store_true", default=False, help="do not read commands from stdin")
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    broker_host, broker_port = args.broker
    listen_host, listen_port = args.listen
    return EngineConfig(
        broker=f"{broker_host}:{broker_port}", listen_host=listen_host, listen_port=listen_port,
        journal=args.journal, power_kw=args.power_kw, tick=args.tick, auto_plug=args.auto_plug,
        plug_delay=args.plug_delay, plug_timeout=args.plug_timeout, supply_seconds=args.supply_seconds,
        topic_prefix=args.topic_prefix, cp_id=args.cp_id, console=not args.no_console,
        max_connections=args.max_connections,
    )


def check_config(config: EngineConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    for name in ("power_kw", "tick", "plug_timeout"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    if config.plug_delay < 0:
        return "--plug-delay must not be negative"
    if config.supply_seconds is not None and config.supply_seconds <= 0:
        return "--supply-seconds must be greater than 0"
    if config.max_connections < 1:
        return "--max-connections must be at least 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    ident = config.cp_id or f":{config.listen_port}"
    setup_logging("EV_CP_E", ident, log_file=args.log_file, level=args.log_level)
    problem = check_config(config)
    if problem:
        log.error("Cannot start the Engine: %s", problem)
        return 2
    def started(system: RunningSystem) -> str:
        try:
            where = f"listening for its Monitor on {config.listen_host}:{engine_port(system)}"
        except Exception:  # the listener is being restarted; the supervisor logs why
            where = f"not yet listening on {config.listen_host}:{config.listen_port}"
        hint = " — type help for the commands" if config.console else ""
        return f"Engine started: {where}, Kafka at {config.broker}{hint}"

    return run_until_signal(lambda: start_engine(config), stop_engine, "Engine", started)


if __name__ == "__main__":
    sys.exit(main())
