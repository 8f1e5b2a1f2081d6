"""EV_CP_M: one charging point's Monitor as a supervised actor system.

Children of the top supervisor, in start order:

* ``monitor``      — :class:`~actors.monitor.MonitorActor` (the state);
* ``engine-link``  — :class:`~transport.client_link.ClientLink` to the Engine;
* ``central-link`` — :class:`~transport.client_link.ClientLink` to Central.

The links reconnect by themselves; the Monitor outlives them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from actors.monitor import MonitorActor, MonitorOptions
from supervisors import options as opts
from supervisors.system import run_until_signal
from supervisors.logs import setup_logging
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, start_system
from transport.client_link import ClientLink
from transport.link import LinkOptions
from transport.runtime import Directory

log = logging.getLogger("evcharging.monitor")

__all__ = ["MonitorConfig", "start_monitor", "main"]


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Everything one Monitor needs; each field is a flag of EV_CP_M."""

    engine_host: str = "127.0.0.1"
    engine_port: int = 7001
    central_host: str = "127.0.0.1"
    central_port: int = 6001
    cp_id: str = "CP1"
    location: str | None = None
    heartbeat_interval: float = 1.0
    health_interval: float = 1.0
    health_timeout: float = 1.5
    register_retry: float = 5.0
    register_timeout: float = 5.0
    stop_confirm: float = 2.0
    connect_timeout: float = 2.0
    retry_base: float = 0.5
    retry_max: float = 2.0
    ack_timeout: float = 2.0
    name: str = "EV_CP_M"

    @property
    def monitor_options(self) -> MonitorOptions:
        return MonitorOptions(
            location=self.location, heartbeat_interval=self.heartbeat_interval,
            health_interval=self.health_interval, health_timeout=self.health_timeout,
            register_retry=self.register_retry, register_timeout=self.register_timeout,
            stop_confirm=self.stop_confirm,
        )


def start_monitor(config: MonitorConfig = MonitorConfig()) -> RunningSystem:
    """Start a Monitor; it connects (and keeps reconnecting) to its Engine and to Central."""
    directory = Directory()
    link_kwargs = {
        "connect_timeout": config.connect_timeout, "retry_base": config.retry_base,
        "retry_max": config.retry_max, "options": LinkOptions(ack_timeout=config.ack_timeout),
    }
    children = [
        ChildSpec("monitor", MonitorActor, (config.cp_id, directory), {"options": config.monitor_options}),
        ChildSpec("engine-link", ClientLink, (config.engine_host, config.engine_port, "monitor", directory),
                  {"peer_name": "ENGINE", "component": "engine-link", **link_kwargs}),
        ChildSpec("central-link", ClientLink, (config.central_host, config.central_port, "monitor", directory),
                  {"peer_name": "CENTRAL", "component": "central-link", **link_kwargs}),
    ]
    return start_system(config.name, children, directory=directory)


# --- the command ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="EV_CP_M", description="A charging point's Monitor.")
    opts.positional_or_env(p, "engine", "EV_ENGINE", "the Engine's HOST:PORT", type=opts.host_port)
    opts.positional_or_env(p, "central", "EV_CENTRAL", "Central's HOST:PORT", type=opts.host_port)
    opts.positional_or_env(p, "cp_id", "EV_CP_ID", "this charging point's id")
    opts.add(p, "--location", default=None, help="where the CP is (sent when Central does not know it yet)")
    opts.add(p, "--heartbeat-interval", default=1.0, type=float, help="seconds between life messages to Central")
    opts.add(p, "--health-interval", default=1.0, type=float, help="seconds between health checks of the Engine")
    opts.add(p, "--health-timeout", default=1.5, type=float,
             help="seconds without an answer before the Engine counts as KO")
    opts.add(p, "--register-retry", default=5.0, type=float, help="seconds before registering again after a refusal")
    opts.add(p, "--topic-prefix", default="",
             help="accepted so every program takes the launcher's common flags; unused (the Monitor has no Kafka)")
    opts.add(p, "--log-file", help="also write a detailed log here")
    opts.add(p, "--log-level", default="INFO", help="terminal log level")
    return p


def config_from_args(args: argparse.Namespace) -> MonitorConfig:
    (engine_host, engine_port), (central_host, central_port) = args.engine, args.central
    return MonitorConfig(
        engine_host=engine_host, engine_port=engine_port, central_host=central_host, central_port=central_port,
        cp_id=args.cp_id, location=args.location, heartbeat_interval=args.heartbeat_interval,
        health_interval=args.health_interval, health_timeout=args.health_timeout,
        register_retry=args.register_retry,
    )


def check_config(config: MonitorConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    if not config.cp_id or len(config.cp_id) > 64:
        return "the CP id must be 1 to 64 characters long"
    for name in ("heartbeat_interval", "health_interval", "health_timeout", "register_retry"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    setup_logging("EV_CP_M", config.cp_id, log_file=args.log_file, level=args.log_level)
    problem = check_config(config)
    if problem:
        log.error("Cannot start the Monitor: %s", problem)
        return 2
    def started(_system: RunningSystem) -> str:
        return (f"Monitor of {config.cp_id} started: Engine at {config.engine_host}:{config.engine_port}, "
                f"Central at {config.central_host}:{config.central_port}")

    return run_until_signal(lambda: start_monitor(config), RunningSystem.stop, "Monitor", started, log)


if __name__ == "__main__":
    sys.exit(main())
