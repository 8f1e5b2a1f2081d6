"""EV_CP_E: one charging point's Engine as a supervised actor system.

Children of the top supervisor, in start order:

* ``publisher``        — the only Kafka producer (telemetry, completions);
* ``engine``           — :class:`~actors.engine.EngineActor`, the charger;
* ``monitor-conns``    — a supervisor for the Monitor's connection actors;
* ``monitor-listener`` — accepts the Monitor's socket (owner ``engine``);
* ``console``          — keys typed at the CP (unless ``--no-console``).

The publisher starts first so the Engine's start-up recovery finds it.

With the CP's credential (``--credential-file`` or ``EV_CP_SECRET``; issue
#11) the Engine obeys only a Monitor that pairs with it: every connection's
frames go to the engine as unpaired until it proves the credential, and a
connection that has not paired within ``--auth-timeout`` is closed. Without
one the Engine runs as before (development mode) and says so loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from actors.console import ConsoleReader
from actors.engine import EngineActor, EngineOptions, ShutdownSupply
from actors.engine_pairing import EngineCredential
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
from transport.security import SecurityError, load_credential

#: The environment variable that may hold the CP's secret (never a flag: argv is visible to every user).
SECRET_ENV = "EV_CP_SECRET"

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
    listen_host: str = setting("127.0.0.1", flag="--listen", address="listen",
                               help="HOST:PORT where the Monitor connects (loopback by default: the Monitor runs "
                                    "on the same host; with the Monitor on another host pass --listen "
                                    "0.0.0.0:PORT explicitly)")
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
                                help="the CP id this Engine is (its log tag; required with a credential unless "
                                     "the credential file names it)")
    credential_file: str | None = setting(None, help="the CP's credential file (JSON {\"kind\": \"cp\", \"id\", "
                                                     "\"secret\"} or the bare secret, mode 0600); or the secret in "
                                                     f"env {SECRET_ENV}. Without either the Engine obeys any "
                                                     "Monitor (development mode)")
    auth_timeout: float = setting(5.0, help="seconds a connection has to pair (prove the CP's credential) before it "
                                            "is closed; with a credential")
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


def engine_credential(config: EngineConfig) -> tuple[EngineConfig, EngineCredential | None]:
    """The CP's credential (its verifier, computed here, once) and the config with the CP id it names;
    (config, None) without one. A :class:`SecurityError` says what is wrong with it."""
    cp_id = config.cp_id
    if cp_id is None and config.credential_file:
        cp_id = _named_in(config.credential_file)
    file_or_env = config.credential_file or None
    if cp_id is None:
        if file_or_env or _secret_in_env():
            raise SecurityError("a credential needs the CP id: give --cp-id (or a credential file naming \"id\")")
        return config, None
    credential = load_credential("cp", cp_id, file=file_or_env, env=SECRET_ENV)
    if credential is None:
        return config, None
    return dataclasses.replace(config, cp_id=cp_id), EngineCredential(cp_id, credential.verifier())


def _named_in(path: str) -> str | None:
    """The "id" a JSON credential file names (None for a bare secret; load_credential reports read errors)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        named = json.loads(text).get("id") if text.startswith("{") else None
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


def _secret_in_env() -> bool:
    import os

    return bool(os.environ.get(SECRET_ENV))


def start_engine(config: EngineConfig = EngineConfig()) -> RunningSystem:
    """Start an Engine and return once its children run (the listener is bound).

    Raises :class:`~transport.security.SecurityError` when the credential cannot be used.
    """
    config, credential = engine_credential(config)
    if credential is None:
        log.warning("DEVELOPMENT MODE: this Engine has no credential (--credential-file or %s), so it obeys "
                    "ANY client that connects to %s:%d and publishes unsealed records; never run it like this "
                    "where others can reach it", SECRET_ENV, config.listen_host, config.listen_port)
    else:
        log.info("Engine of CP %s: it obeys only a Monitor that proves the CP's credential", credential.cp_id)
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
                  {"options": config.engine_options, "publisher": "publisher", "credential": credential}),
        ChildSpec("monitor-conns", Supervisor, ("monitor-conns",), {"directory": directory}),
    ]
    children = [ChildSpec("console", ConsoleReader, ("engine", directory), {"stream": config.console_stream})
                ] if config.console else []
    children += [
        ChildSpec("core", Supervisor, ("core", core), {"directory": directory, "strategy": "rest_for_one"}),
        ChildSpec("monitor-listener", Listener,
                  (config.listen_host, config.listen_port, "engine", directory,
                   spawner_by_name(directory, "monitor-conns", wait=True)),
                  {"max_connections": config.max_connections, "component": "monitor-listener",
                   # with a credential, frames go to the engine as unpaired until the link is admitted
                   **({"gate": "engine", "auth_deadline": config.auth_timeout} if credential else {})}),
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
    if config.auth_timeout <= 0:
        return "--auth-timeout must be greater than 0"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    ident = config.cp_id or (_named_in(config.credential_file) if config.credential_file else None) \
        or f":{config.listen_port}"
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

    # A credential that cannot be used stops the start with its sentence ("Cannot start the Engine: …").
    return run_until_signal(lambda: start_engine(config), stop_engine, "Engine", started)


if __name__ == "__main__":
    sys.exit(main())
