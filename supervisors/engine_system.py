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
from typing import TextIO

from actors.console import ConsoleReader
from actors.engine import EngineActor, EngineOptions, ShutdownSupply
from actors.runtime import Directory
from supervisors import options as opts
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, pick, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec, Supervisor, spawner_by_name
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport.broker import KafkaSettings
from transport.kafka import Publisher
from transport.listener import Listener, ListenerPort

log = logging.getLogger("evcharging.engine")

__all__ = ["EngineConfig", "start_engine", "stop_engine", "engine_port", "run_until_signal", "main"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one Engine needs; each field but ``console`` (``--no-console``), ``console_stream``
    and ``name`` is an argument of EV_CP_E.

    The Engine actor's physics and timings take their defaults from
    :class:`~actors.engine.EngineOptions` (see :mod:`supervisors.settings`).
    """

    broker: str = setting("127.0.0.1:9092", help="Kafka bootstrap server HOST:PORT", positional=True,
                          parse=opts.bootstrap)
    listen_host: str = setting("0.0.0.0", help="HOST:PORT where the Monitor connects", flag="--listen",
                               address="listen")
    listen_port: int = setting(7001, address="listen")
    journal: str | None = setting(None, help="the supply journal file (default run/engine-<port>.journal)")
    power_kw: float = inherit(EngineOptions, "power_kw", help="charging power in kW")
    tick: float = inherit(EngineOptions, "tick", help="seconds between telemetry records")
    auto_plug: bool = inherit(EngineOptions, "auto_plug", help="plug the vehicle in by itself (unattended mode)")
    plug_delay: float = inherit(EngineOptions, "plug_delay", help="seconds before the automatic plug-in")
    plug_timeout: float = inherit(EngineOptions, "plug_timeout",
                                  help="seconds to wait for a plug-in before ending the supply with 0 kWh")
    supply_seconds: float | None = inherit(EngineOptions, "supply_seconds",
                                           help="unplug by itself after this many seconds of supply (unattended mode)")
    completion_retry_base: float = inherit(EngineOptions, "completion_retry_base",
                                           help="first wait (s) before sending an unconfirmed completion again")
    completion_retry_max: float = inherit(EngineOptions, "completion_retry_max",
                                          help="longest wait (s) between two sends of an unconfirmed completion")
    completion_ack_timeout: float = inherit(EngineOptions, "completion_ack_timeout",
                                            help="seconds to wait for Kafka to confirm a completion the Publisher "
                                                 "holds before sending it again")
    monitor_grace: float = inherit(EngineOptions, "monitor_grace",
                                   help="seconds a supply outlives its Monitor's link (a restarted Monitor is back "
                                        "sooner)")
    billing_check: float = inherit(EngineOptions, "billing_check",
                                   help="seconds between asks to Central about completions whose ticket was not seen")
    republish_after: float = inherit(EngineOptions, "republish_after",
                                     help="seconds after which a completion without Central's ticket is sent again")
    topic_prefix: str = setting("", help="prefix of every Kafka topic name (isolation)")
    cp_id: str | None = inherit(EngineOptions, "expected_cp_id",
                                help="the CP id this Engine expects (optional; also its log tag)")
    console: bool = internal(True)
    console_stream: TextIO | None = internal(None)  # None: stdin
    max_connections: int = setting(4, help="Monitor connections accepted at once")
    name: str = internal("EV_CP_E")

    @property
    def journal_path(self) -> str:
        return self.journal or str(Path("run") / f"engine-{self.listen_port}.journal")

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.broker, topic_prefix=self.topic_prefix)

    @property
    def engine_options(self) -> EngineOptions:
        """The Engine actor's options: the fields of :class:`EngineOptions`, taken from this config."""
        return pick(EngineOptions, self, expected_cp_id=self.cp_id)


def start_engine(config: EngineConfig = EngineConfig()) -> RunningSystem:
    """Start an Engine and return once its children run (the listener is bound)."""
    Path(config.journal_path).parent.mkdir(parents=True, exist_ok=True)
    directory = Directory()
    # core is rest_for_one, owners first: the engine needs the publisher's acks for
    # its completions, and the Monitor connections feed the engine; when the engine
    # restarts they restart after it and the Monitor says hello to the new one.
    # The console and the listener only reach the others by name and restart alone;
    # the listener stays out of core so an engine restart keeps the port open.
    core = [
        ChildSpec("publisher", Publisher, (config.kafka,), {"component": "engine-publisher"}),
        ChildSpec("engine", EngineActor, (config.journal_path, directory),
                  {"options": config.engine_options, "publisher": "publisher"}),
        ChildSpec("monitor-conns", Supervisor, ("monitor-conns",), {"directory": directory}),
    ]
    children = [ChildSpec("console", ConsoleReader, ("engine", directory), {"stream": config.console_stream})
                ] if config.console else []
    children += [
        ChildSpec("core", Supervisor, ("core", core), {"directory": directory, "strategy": "rest_for_one"}),
        ChildSpec("monitor-listener", Listener,
                  (config.listen_host, config.listen_port, "engine", directory,
                   spawner_by_name(directory, "monitor-conns", wait=True)),
                  {"max_connections": config.max_connections, "component": "monitor-listener"}),
    ]
    return start_system(config.name, children, directory=directory)


def engine_port(system: RunningSystem, timeout: float = 5.0) -> int:
    """The port the Engine listens on (useful with listen_port=0)."""
    return int(system.ask("monitor-listener", ListenerPort(), timeout=timeout))


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
    """EV_CP_E's parser: one argument per field of :class:`EngineConfig`, then the process's."""
    p = parser_for(EngineConfig, "EV_CP_E", "A charging point's Engine (the charger).")
    add_process_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return from_args(EngineConfig, args, console=not args.no_console)


def check_config(config: EngineConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    for name in ("power_kw", "tick", "plug_timeout", "completion_retry_base", "completion_retry_max",
                 "completion_ack_timeout"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    for name in ("plug_delay", "monitor_grace"):
        if getattr(config, name) < 0:
            return f"--{name.replace('_', '-')} must not be negative"
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
