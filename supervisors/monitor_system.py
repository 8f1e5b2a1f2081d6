"""EV_CP_M: one charging point's Monitor as a supervised actor system.

Children of the top supervisor, in start order:

* ``monitor``      — :class:`~actors.monitor.MonitorActor` (the state);
* ``engine-link``  — :class:`~transport.client_link.ClientLink` to the Engine;
* ``central-link`` — :class:`~transport.client_link.ClientLink` to Central;
* ``console``      — :class:`~actors.console.ConsoleReader` → ``monitor``
  (the menu: ``re-authenticate``, ``status``; EV_CP_M without ``--no-console``).

The CP's credential (issue #11) comes from ``--credential-file`` or the
environment variable ``EV_CP_SECRET`` (never from the command line); without
one the Monitor neither authenticates nor seals (a Central with ``--enroll open``).

Strategy rest_for_one: a link that crashes restarts alone (and reconnects);
when the Monitor restarts, both links restart after it, so the new Monitor
learns them from their ``LinkUp`` (the Engine keeps a running supply for
its ``--monitor-grace``, longer than that takes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from actors.console import ConsoleReader
from actors.monitor import MonitorActor, MonitorOptions
from actors.runtime import Directory
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, pick, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport.client_link import ClientLink
from transport.link import LinkOptions
from transport.security import Credential, SecurityError, load_credential

log = logging.getLogger("evcharging.monitor")

__all__ = ["MonitorConfig", "start_monitor", "load_monitor_credential", "main", "SECRET_ENV"]

SECRET_ENV = "EV_CP_SECRET"  # the secret itself, when there is no credential file (never a flag)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Everything one Monitor needs; each field but ``name`` is an argument of EV_CP_M.

    The Monitor actor's timings take their defaults from
    :class:`~actors.monitor.MonitorOptions`, the links' from
    :class:`~transport.client_link.ClientLink` (see :mod:`supervisors.settings`).
    """

    engine_host: str = setting("127.0.0.1", help="the Engine's HOST:PORT", positional=True, address="engine")
    engine_port: int = setting(7001, address="engine")
    central_host: str = setting("127.0.0.1", help="Central's HOST:PORT", positional=True, address="central")
    central_port: int = setting(6001, address="central")
    cp_id: str = setting("CP1", help="this charging point's id", positional=True)
    location: str | None = inherit(MonitorOptions, "location",
                                   help="where the CP is (sent when Central does not know it yet)")
    heartbeat_interval: float = inherit(MonitorOptions, "heartbeat_interval",
                                        help="seconds between life messages to Central")
    health_interval: float = inherit(MonitorOptions, "health_interval",
                                     help="seconds between health checks of the Engine")
    health_timeout: float = inherit(MonitorOptions, "health_timeout",
                                    help="seconds without an answer before the Engine counts as KO")
    register_retry: float = inherit(MonitorOptions, "register_retry",
                                    help="seconds before registering again after a refusal")
    register_timeout: float = inherit(MonitorOptions, "register_timeout",
                                      help="seconds to wait for Central's answer to a registration")
    stop_confirm: float = inherit(MonitorOptions, "stop_confirm",
                                  help="after re-registering while stopped: seconds to wait for Central to "
                                       "repeat its stop order before resuming")
    connect_timeout: float = inherit(ClientLink, "connect_timeout",
                                     help="seconds one connection attempt (to the Engine or Central) may take")
    retry_base: float = inherit(ClientLink, "retry_base", help="first wait (s) before reconnecting a lost link")
    retry_max: float = inherit(ClientLink, "retry_max", help="longest wait (s) between two reconnection attempts")
    ack_timeout: float = inherit(LinkOptions, "ack_timeout", help="seconds to wait for the peer's ACK of a frame")
    credential_file: str | None = setting(None, help="file with this CP's credential from the registry (JSON or the "
                                                     f"bare secret, mode 0600); without it, {SECRET_ENV} is read; "
                                                     "without either the Monitor does not authenticate")
    name: str = internal("EV_CP_M")

    @property
    def monitor_options(self) -> MonitorOptions:
        """The Monitor actor's options: the fields of :class:`MonitorOptions`, taken from this config."""
        return pick(MonitorOptions, self)


def load_monitor_credential(config: MonitorConfig) -> Credential | None:
    """The CP's credential: ``--credential-file``, else ``EV_CP_SECRET``; None without either.
    A :class:`~transport.security.SecurityError` says what is wrong with the file."""
    return load_credential("cp", config.cp_id, file=config.credential_file, env=SECRET_ENV)


def start_monitor(config: MonitorConfig = MonitorConfig(), *, console: bool = False,
                  credential: Credential | None = None) -> RunningSystem:
    """Start a Monitor; it connects (and keeps reconnecting) to its Engine and to Central.

    ``credential``: given, or loaded from the config (file, then environment); ``console``: read
    the menu's commands from stdin."""
    if credential is None:
        credential = load_monitor_credential(config)
    directory = Directory()
    link_kwargs = {
        "connect_timeout": config.connect_timeout, "retry_base": config.retry_base,
        "retry_max": config.retry_max, "options": LinkOptions(ack_timeout=config.ack_timeout),
    }
    children = [
        ChildSpec("monitor", MonitorActor, (config.cp_id, directory),
                  {"options": config.monitor_options, "credential": credential}),
        ChildSpec("engine-link", ClientLink, (config.engine_host, config.engine_port, "monitor", directory),
                  {"peer_name": "ENGINE", "component": "engine-link", **link_kwargs}),
        ChildSpec("central-link", ClientLink, (config.central_host, config.central_port, "monitor", directory),
                  {"peer_name": "CENTRAL", "component": "central-link", **link_kwargs}),
    ]
    if console:
        children.append(ChildSpec("console", ConsoleReader, ("monitor", directory)))
    # rest_for_one: the links feed the Monitor; when it restarts they reconnect after
    # it and introduce themselves (LinkUp), so it greets the Engine and registers again.
    return start_system(config.name, children, directory=directory, strategy="rest_for_one")


# --- the command ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """EV_CP_M's parser: one argument per field of :class:`MonitorConfig`, then the process's."""
    p = parser_for(MonitorConfig, "EV_CP_M", "A charging point's Monitor. Type re-authenticate (a new login and "
                                             "key with Central) or status.")
    add_process_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> MonitorConfig:
    return from_args(MonitorConfig, args)


def check_config(config: MonitorConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    if not config.cp_id or len(config.cp_id) > 64:
        return "the CP id must be 1 to 64 characters long"
    for name in ("heartbeat_interval", "health_interval", "health_timeout", "register_retry", "register_timeout",
                 "stop_confirm", "connect_timeout", "retry_base", "retry_max", "ack_timeout"):
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
    try:
        credential = load_monitor_credential(config)
    except SecurityError as exc:
        log.error("Cannot start the Monitor: %s", exc)
        return 2

    def started(_system: RunningSystem) -> str:
        how = "authenticating with its credential" if credential else "WITHOUT a credential (not authenticated)"
        return (f"Monitor of {config.cp_id} started: Engine at {config.engine_host}:{config.engine_port}, "
                f"Central at {config.central_host}:{config.central_port}, {how}")

    return run_until_signal(lambda: start_monitor(config, console=not args.no_console, credential=credential),
                            RunningSystem.stop, "Monitor", started, log)


if __name__ == "__main__":
    sys.exit(main())
