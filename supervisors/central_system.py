"""Central's actor system: wiring, the embedding API and the EV_Central command.

Supervision tree::

    central (one_for_one)      services reached by name; nobody keeps state derived from them
    ├─ ledger            LedgerActor: sessions + tickets, the money (SQLite)
    ├─ publisher         Publisher: driver_responses
    ├─ panel             PanelActor: renders snapshots
    ├─ console           ConsoleReader: typed commands → central (by name)
    ├─ gatekeeper        GatekeeperActor: CP authentication, CP keys, revocation (the gate of every
    │                    Monitor connection until it is admitted)
    ├─ core (rest_for_one)     each child depends on those before it
    │  ├─ sessions          Supervisor (one_for_one) of SessionActor "session:<id>" (transient)
    │  ├─ central           CentralActor: registry, states, authorisation, admin
    │  ├─ monitor-conns     Supervisor of ServerConnection, one per Monitor (temporary)
    │  ├─ requests-pump     ConsumerPump driver_requests → central
    │  ├─ router            SessionRouter: Engine records → session actors
    │  └─ sessions-pump     ConsumerPump charging_session_data + _complete → router
    ├─ monitor-listener  Listener: Monitor sockets → monitor-conns (keeps the port open)
    ├─ web               WebHubActor: panel snapshots → the API's live state and event stream
    └─ api               ApiServer: API_Central's uvicorn thread (HTTPS, on a socket the system keeps)

Why this order: Central re-adopts the live sessions from the database when
it starts (sessions that still run keep their actor). When it restarts,
everything after it restarts too: the Monitor connections close, the
Monitors reconnect at once and register with the new Central (which
re-learns its CPs from them); the pumps re-read what was not committed and
the router waits until the new Central has reloaded its sessions. When the
sessions supervisor gives up, Central restarts after it and recreates the
session actors from the database.

The gatekeeper is a top-level (one_for_one) child, before ``core`` and the
listener: connections are gated from the first one, and its crash touches
nothing else. Admitted links no longer pass through it, so live CPs stay
connected; only challenges in flight are lost (those Monitors reconnect).
The :class:`~transport.security.Keyring` (Central's CP keys, shared with
the router that opens the Engines' sealed records) belongs to the system,
not to an actor: it is created and loaded once here (the keys current at
the previous stop become *replaced*; records sealed with them still open
for ``--key-grace``), and survives every restart inside the system.

API_Central (``--api-port``; docs/api.md) is two top-level children after the
listener: "web" receives every panel snapshot Central tells it and keeps the
latest state and the event stream's listeners in an
:class:`~actors.web_hub.EventHub`; "api" owns the uvicorn thread that serves
it. Like the keyring, the hub, the token, the TLS files and the listening
socket belong to the system: made or bound once in :func:`start_central` (a
bad certificate or a busy port fails the start with a sentence), they survive
the restart of either child, and the port never changes. Neither is under
``core``: a restart of Central does not close the operators' event streams;
while it restarts, commands answer 503.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from actors.central import CentralActor, CentralConfig
from actors.console import ConsoleReader
from actors.gatekeeper import GatekeeperActor, prepare_keyring
from actors.ledger import LedgerActor
from actors.panel import PanelActor
from actors.router import SessionRouter
from actors.runtime import Directory
from actors.web_hub import QUEUE_LIMIT, CentralCommands, EventHub, WebHubActor
from persistence import Repository
from supervisors import options as opt
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, internal, pick, setting
from supervisors.settings import build_parser as parser_for
from supervisors.supervisor import ChildSpec, Supervisor, spawner_by_name
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport import http_common as http
from transport import security
from transport.broker import BrokerUnavailable, KafkaSettings, ensure_topics
from transport.central_api import KEEPALIVE, MAX_STREAMS, ApiInfo, ApiServer, GetApiInfo, make_app
from transport.kafka import ConsumerPump, Publisher
from transport.listener import Listener
from transport.security import Keyring

log = logging.getLogger("evcharging.central")

API_TOKEN_ENV: Final = "EV_API_TOKEN"  #: the operator token itself, when no --api-token-file is given
API_CERT_FILE: Final = "api-cert.pem"
API_KEY_FILE: Final = "api-key.pem"
API_TOKEN_FILE: Final = "api-token"
#: API_Central's port on the command line (EV_Registry's default is 8443: both run on Central's host).
API_PORT: Final = 8444


def parse_api_port(text: str) -> int | None:
    """``--api-port``: a port number, or ``off`` (no API)."""
    if text.strip().lower() in ("off", "none", "no"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None


@dataclass(frozen=True, slots=True)
class CentralSystemConfig:
    """Everything EV_Central needs; each field but ``console`` (``--no-console``) is a flag.

    The Central actor's policies and timings take their defaults from
    :class:`~actors.central.CentralConfig` (see :mod:`supervisors.settings`).
    """

    port: int = setting(help="TCP port the Monitors connect to", positional=True, env="EV_CENTRAL_PORT")
    broker: str = setting(help="Kafka bootstrap HOST:PORT", positional=True, parse=opt.bootstrap)
    db_path: str = setting("central.db", flag="--db", help="SQLite database file")
    host: str = setting("0.0.0.0", help="address to listen on for Monitors")
    topic_prefix: str = setting("", help="prefix of every Kafka topic (isolation)")
    enroll: str = inherit(CentralConfig, "enroll", choices=("registry", "open"),
                          help="'registry': only registered CPs, authenticated with their credential, their "
                               "messages sealed; 'open': no authentication, unknown CPs enrolled (development only)")
    auth_timeout: float = inherit(CentralConfig, "auth_timeout",
                                  help="seconds a Monitor connection has to authenticate before it is closed")
    auth_failures: int = inherit(CentralConfig, "auth_failures",
                                 help="failed authentications from one address within --auth-window before its "
                                      "attempts are refused")
    auth_window: float = inherit(CentralConfig, "auth_window", help="seconds over which failed authentications count")
    key_grace: float = inherit(CentralConfig, "key_grace",
                               help="seconds a replaced CP key still opens the Engine's Kafka records")
    default_price: float = inherit(CentralConfig, "default_price", help="€/kWh of a newly enrolled CP")
    default_location: str = inherit(CentralConfig, "default_location",
                                    help="location of a newly enrolled CP whose Monitor sends none")
    life_timeout: float = inherit(CentralConfig, "life_timeout", help="seconds without a life message → DISCONNECTED")
    life_check_interval: float = inherit(CentralConfig, "life_check_interval",
                                         help="seconds between two checks for silent CPs")
    authorize_timeout: float = inherit(CentralConfig, "authorize_timeout",
                                       help="seconds to wait for a CP's authorisation")
    request_max_age: float = inherit(CentralConfig, "request_max_age",
                                     help="after Central was down longer than this, the charge requests that "
                                          "waited in Kafka meanwhile are denied (Central's own clock)")
    panel: str = setting("off", cli_default="rich", choices=("rich", "text", "off"),
                         help="live terminal panel; 'off' gives plain log lines (embedded: off)")
    panel_interval: float = inherit(CentralConfig, "panel_interval", help="seconds between two panel snapshots")
    reconcile_grace: float = inherit(CentralConfig, "reconcile_grace",
                                     help="seconds a CP's heartbeat may disagree with Central about a session "
                                          "before Central acts (cancel, close or stop it)")
    completion_wait: float = inherit(CentralConfig, "completion_wait",
                                     help="seconds to wait for the completion of a supply the CP ended before "
                                          "billing it from the CP's final figures")
    stop_retry: float = inherit(CentralConfig, "stop_retry",
                                help="seconds between repeats of a cancel or stop the CP has not confirmed")
    lost_deadline: float = inherit(CentralConfig, "lost_deadline",
                                   help="seconds a live session's CP may be gone before Central closes it from "
                                        "its last checkpoint (flagged for review)")
    console: bool = internal(False)
    group_id: str = setting("evcharging-central",
                            help="Kafka consumer group of Central (the topic prefix is prepended)")
    max_monitors: int = setting(5000, help="Monitor connections accepted at once")
    requests_idle_fetch_wait_ms: int = setting(250, help="after 2 s without a driver request, the broker may hold "
                                                         "a poll of driver_requests this long (ms): the idle cost, "
                                                         "paid once by the first request after a quiet spell")
    telemetry_fetch_wait_ms: int = setting(100, help="longest time (ms) the broker holds one poll of Central's "
                                                     "telemetry consumer when nothing is new "
                                                     "(the driver-requests consumer keeps the transport's 10 ms)")
    telemetry_idle_fetch_wait_ms: int = setting(500, help="after 2 s without telemetry or a completion, the broker "
                                                          "may hold a poll of them this long (ms): the idle cost, "
                                                          "paid once by the first reading after a quiet spell")
    signature_max_age: float = inherit(CentralConfig, "signature_max_age",
                                       help="seconds a driver's signed request stays valid (older: denied as a replay)")
    api_port: int | None = setting(None, cli_default=API_PORT, parse=parse_api_port,
                                   help="port of API_Central, the operators' HTTPS API, event stream and web panel "
                                        "(0: any free port, logged; 'off': no API; embedded: off)")
    api_host: str = setting("0.0.0.0", help="address API_Central listens on")
    api_tls: str = setting("on", choices=("on", "off"),
                           help="'off' serves plain HTTP (only behind a TLS proxy: the token would travel in clear)")
    api_cert: str = setting("", help="API_Central's TLS certificate (PEM), with --api-key; neither: a self-signed "
                                     f"one, {API_CERT_FILE} next to the database, made on the first start")
    api_key: str = setting("", help="the TLS certificate's private key (PEM), with --api-cert")
    api_cert_names: str = setting(http.DEFAULT_CERT_NAMES,
                                  help="comma-separated host names and IP addresses a self-signed certificate made "
                                       "here is valid for (this host's name is always added)")
    api_token_file: str = setting("", help=f"file holding the operator token; without it, env {API_TOKEN_ENV}; "
                                           f"without that, a token generated into {API_TOKEN_FILE} next to the "
                                           "database on the first start")
    api_keepalive: float = setting(KEEPALIVE, help="seconds between two keepalive comments on an idle event stream")
    api_max_streams: int = setting(MAX_STREAMS, help="event streams open at once (one more is answered 503)")
    api_stream_queue: int = setting(QUEUE_LIMIT, help="events a stream may have waiting before it is reset to a "
                                                      "fresh snapshot (its client reads too slowly)")
    api_command_timeout: float = setting(5.0, help="seconds an API command waits for Central's answer (then 503)")

    @property
    def central_config(self) -> CentralConfig:
        """The Central actor's options: the fields of :class:`CentralConfig`, taken from this config."""
        return pick(CentralConfig, self)


def seed_cps(db_path: str, path: str) -> int:
    """Load ``id,location,price[,max_power_kw]`` lines (CSV) into Central's database.

    ``max_power_kw`` (optional; 350 kW for a new CP without it) bounds the energy
    Central bills for a session at that CP (see ``Repository.complete_session``)."""
    n = 0
    with Repository(db_path) as repo, open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            cp_id, location, price = (c.strip() for c in row[:3])
            power = row[3].strip() if len(row) > 3 else ""
            repo.upsert_cp(cp_id, location, float(price), float(power) if power else None)
            n += 1
    return n


#: Records per poll of the telemetry pump. A catching-up Central (after a restart, a burst)
#: gets more readings of each session per poll, and applies them as one (see SessionRouter).
SESSIONS_POLL_RECORDS = 2000


def start_central(config: CentralSystemConfig) -> RunningSystem:
    """Start Central in this process; returns once every child was started."""
    settings = KafkaSettings(bootstrap=config.broker, topic_prefix=config.topic_prefix)
    telemetry = dataclasses.replace(settings, fetch_max_wait_ms=config.telemetry_fetch_wait_ms)
    try:
        ensure_topics(settings, timeout=5.0)
    except BrokerUnavailable as exc:
        log.warning("%s — Central starts anyway and keeps retrying", exc)
    directory = Directory()
    central_cfg = config.central_config
    secured = config.enroll != "open"
    keyring = Keyring(grace=config.key_grace)  # one per Central system: the gatekeeper issues, the router opens
    with Repository(config.db_path) as repo:
        loaded = prepare_keyring(repo, keyring)
    log.info("Central: %d CP key(s) loaded that may still open records sealed before this start", loaded)
    core = [
        ChildSpec("sessions", Supervisor, ("sessions",), {"directory": directory}),
        ChildSpec("central", CentralActor,
                  (central_cfg, directory, spawner_by_name(directory, "sessions", restart="transient"))),
        # Connections are temporary children: a connection actor owns one accepted socket,
        # which is gone when it crashes; the Monitor reconnects and gets a fresh actor.
        # Before the pumps: a pump that crashes (a broker outage) must not close them.
        ChildSpec("monitor-conns", Supervisor, ("monitor-conns",), {"directory": directory}),
        ChildSpec("requests-pump", ConsumerPump, (settings, ("driver_requests",), "central", directory),
                  {"group_id": config.topic_prefix + config.group_id, "component": "central-requests",
                   "idle_fetch_wait_ms": config.requests_idle_fetch_wait_ms}),
        ChildSpec("router", SessionRouter, (directory,), {"keyring": keyring, "require_sealed": secured}),
        ChildSpec("sessions-pump", ConsumerPump,
                  (telemetry, ("charging_session_data", "charging_session_complete"), "router", directory),
                  {"group_id": config.topic_prefix + config.group_id + "-sessions", "component": "central-sessions",
                   "max_records": SESSIONS_POLL_RECORDS,
                   "idle_fetch_wait_ms": max(config.telemetry_idle_fetch_wait_ms, config.telemetry_fetch_wait_ms)}),
    ]
    children = [
        ChildSpec("ledger", LedgerActor, (config.db_path,)),
        ChildSpec("publisher", Publisher, (settings,), {"component": "central", "faults": (directory, "central")}),
        ChildSpec("panel", PanelActor, (config.panel,)),
    ]
    if config.console:
        children.append(ChildSpec("console", ConsoleReader, ("central", directory)))
    # Before core and the listener: every Monitor connection is gated from the first one.
    children.append(ChildSpec("gatekeeper", GatekeeperActor, (central_cfg, keyring, directory)))
    children.append(ChildSpec("core", Supervisor, ("core", core),
                              {"directory": directory, "strategy": "rest_for_one", "max_restarts": 10, "period": 30}))
    # The listener comes after the connections' supervisor (it spawns into it, waiting
    # while that restarts) and outside "core": a restart of Central must not close the
    # listening socket, or reconnecting Monitors would find the port closed.
    children.append(ChildSpec("monitor-listener", Listener,
                              (config.host, config.port, "central", directory,
                               spawner_by_name(directory, "monitor-conns", wait=True)),
                              {"max_connections": config.max_monitors, "component": "central-listener",
                               "gate": "gatekeeper", "auth_deadline": config.auth_timeout if secured else None}))
    api = _prepare_api(config, directory, keyring) if config.api_port is not None else None
    if api is not None:
        children += api.children
    try:
        system = start_system("central", children, directory, max_restarts=10, period=30)
    except BaseException:
        if api is not None:
            api.sock.close()
        raise
    if api is not None:
        system.on_stop.append(api.sock.close)
    return system


@dataclass(frozen=True, slots=True)
class _Api:
    children: list[ChildSpec]
    sock: socket.socket


def _prepare_api(config: CentralSystemConfig, directory: Directory, keyring: Keyring) -> _Api:
    """What API_Central needs, made once per system: the hub, its TLS files and token, its socket."""
    problem = _check_api(config)
    if problem:
        raise ValueError(problem)
    state_dir = Path(config.db_path).resolve().parent
    tls = config.api_tls == "on"
    cert: Path | None = None
    key: Path | None = None
    made = False
    if tls:
        names = http.cert_names(config.api_cert_names, config.api_host)
        cert, key, made = http.tls_files(config.api_cert, config.api_key, state_dir, API_CERT_FILE, API_KEY_FILE,
                                         names, title="API_Central")
        try:  # a bad pair fails the start with a sentence, not every start of the server actor
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}") from exc
    else:
        log.warning("API_Central serves plain HTTP (--api-tls off): the operator token travels in clear; "
                    "put it behind a TLS proxy")
    token, source = http.load_token(config.api_token_file, API_TOKEN_ENV, state_dir / API_TOKEN_FILE,
                                    what="operator token")
    sock = http.bind(config.api_host, config.api_port or 0)
    port = sock.getsockname()[1]
    info = ApiInfo(url=http.client_url(config.api_host, port, tls=tls), port=port, tls=tls,
                   ca_path=str(cert) if cert else None, fingerprint=http.fingerprint(cert) if cert else None,
                   token=token, token_source=source, generated_cert=made)
    hub = EventHub(queue_limit=config.api_stream_queue)
    commands = CentralCommands(directory, timeout=config.api_command_timeout)
    limiter = security.FailureLimiter(limit=config.auth_failures, window=config.auth_window)
    db_path = config.db_path

    def app() -> Any:
        return make_app(hub, commands, lambda: Repository(db_path), token, keyring=keyring, limiter=limiter,
                        keepalive=config.api_keepalive, max_streams=config.api_max_streams)

    children = [ChildSpec("web", WebHubActor, (hub,)),
                ChildSpec("api", ApiServer, (app, sock, info), {"cert": cert, "key": key}, shutdown_timeout=10.0)]
    return _Api(children, sock)


def api_info(system: RunningSystem, timeout: float = 10.0) -> ApiInfo | None:
    """Where the system's API_Central is (URL, certificate, token), or None when it runs without one."""
    if system.directory.wait_for("api", timeout) is None:
        return None
    info: ApiInfo = system.ask("api", GetApiInfo(), timeout=timeout)
    return info


def api_line(info: ApiInfo) -> str:
    """The line Central logs at start: where the API and the panel are, never the token."""
    trust = f"certificate {info.ca_path}, fingerprint {info.fingerprint}" if info.tls else "plain HTTP"
    return f"API_Central: the web panel is at {info.panel_url} ({trust}; operator token in {info.token_source})"


def build_parser() -> argparse.ArgumentParser:
    """EV_Central's parser: one argument per field of :class:`CentralSystemConfig`, then --seed and the process's."""
    p = parser_for(CentralSystemConfig, "EV_Central",
                   "Central of the EV charging network: CP registry, authorisation, billing, live panel.")
    opt.add(p, "--seed", default=None, help="CSV file of id,location,price[,max_power_kw] to load at start")
    add_process_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> CentralSystemConfig:
    return from_args(CentralSystemConfig, args, console=not args.no_console)


def check_config(config: CentralSystemConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    if not 0 <= config.port < 65536:
        return "the port must be between 0 and 65535"
    for name in ("life_timeout", "life_check_interval", "authorize_timeout", "request_max_age", "panel_interval"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    if config.default_price < 0:
        return "--default-price must not be negative"
    if config.max_monitors < 1:
        return "--max-monitors must be at least 1"
    if config.requests_idle_fetch_wait_ms < 1:
        return "--requests-idle-fetch-wait-ms must be at least 1"
    if config.telemetry_fetch_wait_ms < 1:
        return "--telemetry-fetch-wait-ms must be at least 1"
    if config.telemetry_idle_fetch_wait_ms < 1:
        return "--telemetry-idle-fetch-wait-ms must be at least 1"
    for name in ("auth_timeout", "auth_window"):
        if getattr(config, name) <= 0:
            return f"--{name.replace('_', '-')} must be greater than 0"
    if config.auth_failures < 1:
        return "--auth-failures must be at least 1"
    if config.key_grace < 0:
        return "--key-grace must not be negative"
    return _check_api(config)


def _check_api(config: CentralSystemConfig) -> str | None:
    if config.api_port is not None and not 0 <= config.api_port < 65536:
        return "--api-port must be between 0 and 65535, or 'off'"
    if bool(config.api_cert) != bool(config.api_key):
        return "--api-cert and --api-key go together: give both, or neither for a self-signed certificate"
    if config.api_keepalive <= 0 or config.api_command_timeout <= 0:
        return "--api-keepalive and --api-command-timeout must be greater than 0"
    if config.api_max_streams < 1:
        return "--api-max-streams must be at least 1"
    if config.api_stream_queue < 2:
        return "--api-stream-queue must be at least 2"
    return None


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    problem = check_config(config)
    if problem:
        parser.error(problem)  # on the terminal even when the panel will own it; exits with 2
    panel_on = args.panel == "rich"
    setup_logging("central", "", log_file=args.log_file, level=args.log_level, console=not panel_on)
    if args.seed:
        try:
            log.info("Loaded %d CPs from %s", seed_cps(args.db, args.seed), args.seed)
        except (OSError, ValueError, IndexError) as exc:
            log.error("Cannot load the CP seed file %s: %s", args.seed, exc)
            return 2
    return run_until_signal(lambda: start_central(config), RunningSystem.stop, "Central",
                            lambda s: _ready_line(s, config), log)


READY = "Central is ready"  # the launcher waits for this line before starting drivers


def _ready_line(system: RunningSystem, config: CentralSystemConfig, timeout: float = 30.0) -> str:
    """Wait (bounded) until Central's Kafka consumers joined their groups; say so."""
    log.info("Central listening on %s:%d, Kafka at %s — joining the consumer groups", config.host, config.port,
             config.broker)
    started = time.monotonic()
    if config.api_port is not None and (info := api_info(system)) is not None:
        log.info("%s", api_line(info))
    if system.wait_ready(timeout):
        return f"{READY}: Kafka consumers joined in {time.monotonic() - started:.1f} s"
    return (f"Central's Kafka consumers have not joined after {timeout:g} s — driver requests are answered "
            "as soon as they do")


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
