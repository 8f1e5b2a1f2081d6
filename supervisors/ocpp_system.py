"""EV_OCPP, the OCPP 1.6J gateway (issue #13): its actor system, its embedding API and its command.

Real chargers and OCPP simulators connect to ``ws://HOST:PORT/ocpp/<cp_id>``
(``wss://`` with ``--tls``) and join the network as CPs; Central needs no OCPP
knowledge: for each charger the gateway logs in to Central like that CP's
Monitor (with the charger's registry secret, its Basic-auth password) and
publishes its telemetry and completions like that CP's Engine. docs/ocpp.md
has the message mapping and how to point a charger at the gateway.

Supervision tree::

    EV_OCPP (one_for_one)
    ├─ publisher        Publisher: the gateway's one Kafka producer (telemetry, completions)
    └─ gateway (rest_for_one)
       ├─ chargers      Supervisor, one child per charger connection (temporary):
       │  └─ charger:<id>#<n> ChargerTree (rest_for_one, at most 3 restarts in 10 s); closes the
       │     │                connection when it stops or gives up
       │     ├─ ocpp:<id>#<n>          OcppChargerActor: the charger's OCPP handlers; Monitor and Engine
       │     └─ ocpp-central:<id>#<n>  ClientLink to Central (authenticated, sealed)
       └─ ocpp-listener OcppListener: the WebSocket server (its own asyncio thread); handshake,
                        Basic auth, one tree per accepted connection, stopped when it closes

Why this shape: a charger's actor and its Central link live and die with the
charger's WebSocket (a charger that is gone must not look online: its link to
Central closes with it and Central shows it DISCONNECTED at once); what must
outlive a connection, a crash or the gateway itself is in the journal
(``--journal``, :mod:`persistence.ocpp_journal`). A crashed charger actor is
restarted with its link (which logs in again) while the WebSocket stays open.
When ``chargers`` gives up, the listener restarts after it: every charger
reconnects. The publisher is outside: a Kafka outage or a publisher restart
touches no connection (completions are re-sent until Kafka confirms them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from actors.ocpp_charger import OcppChargerActor, OcppOptions
from actors.ocpp_clock import SharedClock
from actors.runtime import Directory
from persistence.ocpp_journal import OcppJournal
from supervisors import options as opts
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, pick, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec, Supervisor, TerminateChild, spawner_by_name
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport import http_common as http
from transport.broker import KafkaSettings
from transport.client_link import ClientLink
from transport.kafka import Publisher
from transport.link import LinkOptions
from transport.ocpp_server import OcppListener, OcppPort, OcppServerOptions, Opened
from transport.ocpp_wire import ChargerPort, OcppLimits

log = logging.getLogger("evcharging.ocpp")

__all__ = ["OcppSystemConfig", "start_ocpp", "gateway_port", "build_parser", "config_from_args", "check_config",
           "main", "CERT_FILE", "KEY_FILE"]

CERT_FILE: Final = "ocpp-cert.pem"
KEY_FILE: Final = "ocpp-key.pem"
CHARGER_RESTARTS: Final = (3, 10.0)  # a charger's actor and link: at most 3 restarts in 10 s, then it is closed


@dataclass(frozen=True, slots=True)
class OcppSystemConfig:
    """Everything EV_OCPP needs; each field but ``name`` is an argument (env twin EV_<FLAG>).

    The charger actors' timings default from :class:`~actors.ocpp_charger.OcppOptions`, the
    server's from :class:`~transport.ocpp_server.OcppServerOptions` and
    :class:`~transport.ocpp_wire.OcppLimits`, the Central links' from ClientLink."""

    central_host: str = setting("127.0.0.1", help="Central's HOST:PORT (where Monitors connect)", positional=True,
                                address="central")
    central_port: int = setting(6001, address="central")
    broker: str = setting("127.0.0.1:9092", help="Kafka bootstrap server HOST:PORT", positional=True,
                          parse=opts.bootstrap)
    listen_host: str = setting("0.0.0.0", flag="--listen", address="listen",
                               help="HOST:PORT chargers connect to (ws://HOST:PORT/ocpp/<charger id>)")
    listen_port: int = setting(9000, address="listen")
    path_prefix: str = inherit(OcppServerOptions, "path_prefix", help="the URL path before the charger id")
    journal: str = setting("run/ocpp.journal", help="the gateway's own SQLite file (transactions and chargers; "
                                                    "no secrets)")
    topic_prefix: str = setting("", help="prefix of every Kafka topic name (isolation)")
    security: str = setting("basic", choices=("basic", "none"),
                            help="'basic': chargers send HTTP Basic auth (their id and registry secret) and the "
                                 "gateway logs them in to Central (OCPP security profile 1, 2 with --tls); "
                                 "'none': no authentication, for a Central with --enroll open (development only)")
    tls: bool = setting(False, help="serve wss:// (OCPP security profile 2) with --cert/--key, or a self-signed "
                                    f"pair ({CERT_FILE}, {KEY_FILE} next to the journal) made on the first start")
    cert: str = setting("", help="TLS certificate (PEM) for --tls, with --key")
    key: str = setting("", help="the TLS certificate's private key (PEM), with --cert")
    cert_names: str = setting(http.DEFAULT_CERT_NAMES, help="comma-separated names and addresses a self-signed "
                                                            "certificate made here is valid for")
    max_chargers: int = inherit(OcppServerOptions, "max_chargers", help="chargers connected at once")
    max_size: int = inherit(OcppServerOptions, "max_size", help="bytes of one WebSocket message (a larger one "
                                                                "closes the connection, code 1009)")
    open_timeout: float = inherit(OcppServerOptions, "open_timeout",
                                  help="seconds the whole opening handshake may take (Central's login included)")
    login_timeout: float = inherit(OcppServerOptions, "login_timeout",
                                   help="seconds to wait for Central's verdict on a charger's login (then 503)")
    ping_interval: float = inherit(OcppServerOptions, "ping_interval", help="seconds between WebSocket pings")
    ping_timeout: float = inherit(OcppServerOptions, "ping_timeout",
                                  help="seconds a charger may take to answer a ping before its connection is closed")
    handshakes: int = inherit(OcppServerOptions, "handshakes",
                              help="charger logins whose password is hashed at once (Argon2id, ~19 MiB each)")
    failures: int = inherit(OcppServerOptions, "failures",
                            help="refused logins per address and charger id within --failure-window, then 429")
    failure_window: float = inherit(OcppServerOptions, "failure_window", help="seconds over which refusals count")
    answer_timeout: float = inherit(OcppLimits, "answer_timeout",
                                    help="seconds the gateway may take to answer a charger (then InternalError)")
    call_timeout: float = inherit(OcppLimits, "call_timeout", help="seconds a charger may take to answer the gateway")
    max_requests: int = inherit(OcppLimits, "max_requests", help="a charger's requests waiting to be handled")
    max_calls: int = inherit(OcppLimits, "max_calls", help="calls to one charger waiting their turn")
    max_bad: int = inherit(OcppLimits, "max_bad", help="malformed frames in a row before a connection is closed")
    heartbeat_interval: float = inherit(OcppOptions, "heartbeat_interval",
                                        help="seconds between life messages to Central for each connected charger")
    boot_interval: int = inherit(OcppOptions, "boot_interval",
                                 help="the Heartbeat interval (s) chargers are told in BootNotification.conf")
    silence_timeout: float = inherit(OcppOptions, "silence_timeout",
                                     help="seconds without any OCPP message before a connection is closed "
                                          "(0: twice --boot-interval plus 30)")
    register_timeout: float = inherit(OcppOptions, "register_timeout",
                                      help="seconds to wait for each answer of Central during a login")
    relogin_delay: float = inherit(OcppOptions, "relogin_delay",
                                   help="seconds to wait before logging in again after losing Central")
    local_timeout: float = inherit(OcppOptions, "local_timeout",
                                   help="seconds to wait for Central to authorise a driver at the charger")
    remote_timeout: float = inherit(OcppOptions, "remote_timeout",
                                    help="seconds a charger may take to accept a remote start (keep it under "
                                         "Central's --authorize-timeout)")
    plug_timeout: float = inherit(OcppOptions, "plug_timeout",
                                  help="seconds an authorised charge may wait for StartTransaction (then 0 kWh)")
    stop_confirm: float = inherit(OcppOptions, "stop_confirm",
                                  help="after re-registering while stopped: seconds to wait for Central to repeat "
                                       "its stop order before making the charger Operative again")
    connector: int = inherit(OcppOptions, "connector",
                             help="the connector a remote start names (0: let the charger choose)")
    completion_ack_timeout: float = inherit(OcppOptions, "completion_ack_timeout",
                                            help="seconds to wait for Kafka to confirm a completion before resending")
    completion_retry_base: float = inherit(OcppOptions, "completion_retry_base",
                                           help="first wait (s) before sending an unconfirmed completion again")
    completion_retry_max: float = inherit(OcppOptions, "completion_retry_max",
                                          help="longest wait (s) between two sends of an unconfirmed completion")
    billing_check: float = inherit(OcppOptions, "billing_check",
                                   help="seconds between asks to Central about completions whose ticket was not seen")
    republish_after: float = inherit(OcppOptions, "republish_after",
                                     help="seconds after which a completion without Central's ticket is sent again")
    connect_timeout: float = inherit(ClientLink, "connect_timeout", help="seconds one connection attempt to Central "
                                                                         "may take")
    retry_base: float = inherit(ClientLink, "retry_base", help="first wait (s) before reconnecting to Central")
    retry_max: float = inherit(ClientLink, "retry_max", help="longest wait (s) between two attempts to reach Central")
    ack_timeout: float = inherit(LinkOptions, "ack_timeout", help="seconds to wait for Central's ACK of a frame")
    name: str = internal("EV_OCPP")

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.broker, topic_prefix=self.topic_prefix)

    @property
    def charger_options(self) -> OcppOptions:
        return pick(OcppOptions, self)

    @property
    def state_dir(self) -> Path:
        return Path(self.journal).resolve().parent


class ChargerTree(Supervisor):
    """The supervisor of one charger connection: its actor and its Central link (rest_for_one).

    It owns the connection's lifetime: when it stops (the connection closed, the gateway stops) or gives
    up (its children crashed too often), the charger's WebSocket is closed with it. A restart of the
    actor alone keeps the connection open."""

    def __init__(self, name: str, children: list[ChildSpec], port: ChargerPort, **options: Any) -> None:
        super().__init__(name, children, **options)
        self.port = port

    def teardown(self) -> None:
        super().teardown()
        self.port.close("the gateway stopped serving this connection")


def _server_options(config: OcppSystemConfig) -> OcppServerOptions:
    tls: tuple[str, str] | None = None
    if config.tls:
        cert, key, made = http.tls_files(config.cert, config.key, config.state_dir, CERT_FILE, KEY_FILE,
                                         http.cert_names(config.cert_names, config.listen_host), title="EV_OCPP")
        tls = (str(cert), str(key))
        log.info("EV_OCPP: TLS certificate %s (fingerprint %s)%s", cert, http.fingerprint(cert),
                 " — made now, self-signed: give it to the chargers to trust" if made else "")
    return pick(OcppServerOptions, config, host=config.listen_host, port=config.listen_port,
                security=config.security == "basic", tls=tls, limits=pick(OcppLimits, config))


def start_ocpp(config: OcppSystemConfig) -> RunningSystem:
    """Start the gateway; returns once it listens (:func:`gateway_port` says where, with port 0).

    Raises ValueError (a sentence) for a bad configuration or TLS files, OSError/RuntimeError when
    the port cannot be bound or the journal cannot be opened."""
    problem = check_config(config)
    if problem:
        raise ValueError(problem)
    Path(config.journal).parent.mkdir(parents=True, exist_ok=True)
    journal = OcppJournal.open(config.journal)  # the system's, shared by every charger actor; a bad file fails here
    journal.write_behind(1.0)
    try:
        server = _server_options(config)
    except BaseException:
        journal.close()
        raise
    directory = Directory()
    charger_options = config.charger_options
    link_kwargs = {"connect_timeout": config.connect_timeout, "retry_base": config.retry_base,
                   "retry_max": config.retry_max, "options": LinkOptions(ack_timeout=config.ack_timeout)}
    spawn = spawner_by_name(directory, "chargers", timeout=15.0, restart="temporary", wait=True)
    clock = SharedClock(config.heartbeat_interval, name="ocpp-clock")  # one thread ticks every charger

    def open_charger(cp_id: str, n: int, port: ChargerPort, verifier: bytes | None) -> Opened:
        tree, actor, link = f"charger:{cp_id}#{n}", f"ocpp:{cp_id}#{n}", f"ocpp-central:{cp_id}#{n}"
        children = [
            ChildSpec(actor, OcppChargerActor, (cp_id, directory, port, verifier, journal),
                      {"options": charger_options, "central_link": link, "publisher": "publisher",
                       "clock": clock}),
            ChildSpec(link, ClientLink, (config.central_host, config.central_port, actor, directory),
                      {"peer_name": "CENTRAL", "component": f"ocpp-central-{cp_id}", **link_kwargs}),
        ]
        restarts, period = CHARGER_RESTARTS
        spawn(tree, ChargerTree, (tree, children, port), {"directory": directory, "strategy": "rest_for_one",
                                                          "max_restarts": restarts, "period": period})
        return Opened(tree, actor)

    def close_charger(tree: str) -> None:
        chargers = directory.get("chargers")
        if chargers is not None:
            try:
                chargers.ask(TerminateChild(tree), timeout=15.0)
            except Exception as exc:  # the supervisor is stopping: its children stop with it
                log.debug("could not stop %s: %s", tree, exc)

    gateway = [
        ChildSpec("chargers", Supervisor, ("chargers",), {"directory": directory}),
        ChildSpec("ocpp-listener", OcppListener, (server, directory, open_charger, close_charger),
                  {}, shutdown_timeout=20.0),
    ]
    children = [
        ChildSpec("publisher", Publisher, (config.kafka,), {"component": "ocpp-publisher"}),
        ChildSpec("gateway", Supervisor, ("gateway", gateway), {"directory": directory, "strategy": "rest_for_one"},
                  shutdown_timeout=30.0),
    ]
    try:
        system = start_system(config.name, children, directory=directory)
    except BaseException:
        clock.stop()
        journal.close()
        raise
    system.on_stop += [clock.stop, journal.close]
    return system


def gateway_port(system: RunningSystem, timeout: float = 5.0) -> int:
    """The port the gateway listens on (useful with port 0)."""
    return int(system.ask("ocpp-listener", OcppPort(), timeout=timeout))


# --- the command --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = parser_for(OcppSystemConfig, "EV_OCPP",
                   "OCPP 1.6J gateway: real chargers and OCPP simulators join the network as CPs. Point a charger "
                   "at ws://HOST:PORT/ocpp/<charger id> with HTTP Basic auth (the charger id and its registry "
                   "secret); see docs/ocpp.md.")
    add_process_flags(p, console=False)
    return p


def config_from_args(args: argparse.Namespace) -> OcppSystemConfig:
    return from_args(OcppSystemConfig, args)


def check_config(config: OcppSystemConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    if not config.path_prefix.startswith("/") or not config.path_prefix.endswith("/"):
        return "--path-prefix must start and end with '/' (e.g. /ocpp/)"
    if bool(config.cert) != bool(config.key):
        return "--cert and --key go together: give both, or neither for a self-signed certificate"
    if (config.cert or config.key) and not config.tls:
        return "--cert/--key are for --tls (OCPP security profile 2)"
    if config.login_timeout >= config.open_timeout:
        return "--login-timeout must be shorter than --open-timeout (the login is part of the handshake)"
    for name in ("max_chargers", "max_size", "handshakes", "failures", "max_requests", "max_calls", "max_bad",
                 "boot_interval"):
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("open_timeout", "login_timeout", "ping_interval", "ping_timeout", "failure_window",
                 "answer_timeout", "call_timeout", "heartbeat_interval", "register_timeout", "local_timeout",
                 "remote_timeout", "plug_timeout", "stop_confirm", "completion_ack_timeout", "billing_check",
                 "republish_after", "connect_timeout", "retry_base", "retry_max", "ack_timeout"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    if config.silence_timeout < 0 or config.relogin_delay < 0 or not 0 <= config.connector <= 64:
        return "--silence-timeout and --relogin-delay must be at least 0, --connector from 0 to 64"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    setup_logging("EV_OCPP", "", log_file=args.log_file, level=args.log_level)
    problem = check_config(config)
    if problem:
        log.error("Cannot start the OCPP gateway: %s", problem)
        return 2
    if config.security == "none":
        log.warning("DEVELOPMENT MODE (--security none): chargers are not authenticated; only a Central started "
                    "with --enroll open accepts them")

    def started(system: RunningSystem) -> str:
        scheme = "wss" if config.tls else "ws"
        return (f"OCPP gateway started: chargers connect to {scheme}://{config.listen_host}:{gateway_port(system)}"
                f"{config.path_prefix}<charger id>; Central at {config.central_host}:{config.central_port}, "
                f"Kafka at {config.broker}, journal {config.journal}")

    return run_until_signal(lambda: start_ocpp(config), RunningSystem.stop, "OCPP gateway", started, log)


if __name__ == "__main__":
    sys.exit(main())
